"""Worker for tests/test_engine.py: CodedDataParallel under torchrun (gloo), many checks per launch.

Every rank can compute the single-process reference itself: the data and the initial model are
generated from fixed seeds, so ``reference_grads`` is "one process computing the same global batch".

Scenarios (first argument):

``exact``     every code and dtype against the reference, under emulated heterogeneity and forced
              stall patterns; 50 SGD steps compared bitwise across ranks and with the reference run;
              the Store's key count over 200 steps.
``failures``  bad configurations (every rank must raise before any collective) and a rank that stops
              committing (the others must time out naming it).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from codedgrad import CodedDataParallel
from codedgrad.emulate import Heterogeneity
from codedgrad.runtime import ConfigurationError
from codedgrad.runtime.coordinator import CodedStepTimeout, StepMismatchError

SAMPLES_PER_TASK = 3
FEATURES = 5


class Net(nn.Module):
    """A small MLP with a side branch that only even tasks use (parameters without gradient)."""

    def __init__(self, with_unused: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 1))
        self.branch = nn.Linear(FEATURES, 1)
        if with_unused:
            self.unused = nn.Linear(2, 2)  # never in any loss: its gradient must stay None

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        out = self.body(x)
        return out + self.branch(x) if task % 2 == 0 else out


def make_model(dtype: torch.dtype, with_unused: bool = True) -> Net:
    torch.manual_seed(1234)
    return Net(with_unused).to(dtype)


#: Gradient buckets of at most 13 float64 elements: Net(with_unused=False) fills four (the first layer's
#: weight; its bias; the last layer; the side branch), so a direct step reduces three of them during
#: its backward when its last call uses the branch (an even task).
TINY_BUCKETS_MB = 1e-4


def make_data(num_tasks: int, dtype: torch.dtype, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(num_tasks * SAMPLES_PER_TASK, FEATURES, generator=generator).to(dtype)
    y = torch.randn(num_tasks * SAMPLES_PER_TASK, 1, generator=generator).to(dtype)
    return x, y


def task_loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def task_loss(task: int) -> torch.Tensor:
        rows = slice(task * SAMPLES_PER_TASK, (task + 1) * SAMPLES_PER_TASK)
        return ((model(x[rows], task) - y[rows]) ** 2).mean()

    return task_loss


def reference_grads(model: nn.Module, num_tasks: int, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """One process, the whole global batch: gradient of the mean over tasks of each task's mean loss."""
    model.zero_grad(set_to_none=False)
    loss_of = task_loss_fn(model, x, y)
    total = sum(loss_of(j) for j in range(num_tasks)) / num_tasks
    total.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]


def grads(module: nn.Module) -> list[torch.Tensor]:
    """Every parameter's gradient, zeros for one that has none (no task used it)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g.double() - w.double()).norm() ** 2) for g, w in zip(got, want)) ** 0.5
    den = sum(float(w.double().norm() ** 2) for w in want) ** 0.5
    return num / den


def identical_across_ranks(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.detach().double().flatten() for t in tensors])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered)


def run_steps(cdp: CodedDataParallel, steps: int, num_tasks: int, dtype: torch.dtype, batched: bool = False) -> dict:
    """Run ``steps`` coded steps (fresh data each) and compare each with the reference.

    ``batched``: give the engine a ``batch_loss`` (the mean of the tasks' losses; equal task sizes).
    """
    reference = make_model(dtype, with_unused=hasattr(cdp.module, "unused"))
    reference.load_state_dict(cdp.module.state_dict())
    errors, reports = [], []
    for step in range(steps):
        x, y = make_data(num_tasks, dtype, step)
        cdp.module.zero_grad(set_to_none=True)
        task_loss = task_loss_fn(cdp.module, x, y)
        if batched:
            batch_loss = lambda ids, task_loss=task_loss: sum(task_loss(j) for j in ids) / len(ids)  # noqa: E731
            report = cdp.backward(tasks=num_tasks, batch_loss=batch_loss)
        else:
            report = cdp.backward(task_loss, num_tasks)
        want = reference_grads(reference, num_tasks, x, y)
        got = grads(cdp.module)
        errors.append(relative_error(got, want))
        reports.append(report)
    return {
        "max_error": max(errors),
        "identical": identical_across_ranks(grads(cdp.module)),
        # no task uses it: left alone, as DDP
        "unused_grad_none": not hasattr(cdp.module, "unused") or cdp.module.unused.weight.grad is None,
        "computed": [r.computed for r in reports],
        "used": [r.used for r in reports],
        "purged": [r.purged for r in reports],
        "spare": [r.spare for r in reports],
        "time_to_decision": [r.time_to_decision for r in reports],
        "step_time": [r.step_time for r in reports],
        "plan_version": [r.plan_version for r in reports],
        "commit_seconds": [c for r in reports for c in r.commit_seconds],
        "direct": [r.direct for r in reports],
        "buckets_overlapped": [r.buckets_overlapped for r in reports],
        "hooks_left": sum(len(p._backward_hooks or {}) for p in cdp.module.parameters()),  # the direct step's
    }


def scenario_exact(rank: int, world: int) -> dict:
    results: dict = {}
    noisy = Heterogeneity(speeds=[1.0, 1.0, 2.0, 4.0][:world], base=0.004, jitter=0.5, stall_prob=0.05, seed=7)
    configs = {
        "repetition_1": dict(code="repetition", redundancy=1.0),
        "repetition_1.25": dict(code="repetition", redundancy=1.25),
        "repetition_2": dict(code="repetition", redundancy=2.0),
        "frc_2": dict(code="frc", redundancy=2),
        "cyclic_2": dict(code="cyclic", redundancy=2),
        "repetition_1.25_sync": dict(code="repetition", redundancy=1.25, no_wait=False),
        "frc_2_sync": dict(code="frc", redundancy=2, no_wait=False),
    }
    for name, kwargs in configs.items():
        cdp = CodedDataParallel(make_model(torch.float64), emulate=noisy, timeout=30, **kwargs)
        results[name] = run_steps(cdp, steps=3, num_tasks=12, dtype=torch.float64)
    # spare_work="auto" and redundancy="auto", resolved: without emulation, with compute emulation, and with sleeps.
    os.environ.pop("CODEDGRAD_EMULATE", None)  # emulate=None reads it: a developer's setting must not leak in
    for name, emulate in (("none", None), ("compute", replace(noisy, mode="compute")), ("sleep", noisy)):
        with CodedDataParallel(make_model(torch.float64), redundancy="auto", emulate=emulate, timeout=30) as cdp:
            results[f"spare_auto_{name}"] = {
                "spare_work": cdp.config.spare_work,
                "redundancy": cdp.config.redundancy,
                "shared": cdp.shared_devices,
            }
    # A plan with nothing to decide (Ω = 1, no spare work) runs direct once measured (8 task times per
    # rank, 2-3 per step here: about 8 steps) but for the first step under each plan: the all-reduce is
    # the agreement. Then another K: a plan from a guess again, so coded steps (the release thread
    # serves them after the direct ones it skipped), then direct again.
    direct = dict(redundancy=1.0, spare_work=False, replan_every=2, warmup_steps=2, max_steps_ahead=1, timeout=30)
    # Direct steps leave no Store keys behind (the exchanges' go with the steps), and a plan restored
    # from a checkpoint runs its first step coded (a first step may compile for longer than timeout).
    store = dist.distributed_c10d._get_default_store()
    # "direct" reduces buckets during its backward (tiny buckets); "direct_sync" has one bucket.
    for name, no_wait in (("direct", True), ("direct_sync", False)):
        overlapped = name == "direct"
        model_args = (torch.float64, not overlapped)
        direct["bucket_cap_mb"] = TINY_BUCKETS_MB if overlapped else 25.0
        with CodedDataParallel(make_model(*model_args), no_wait=no_wait, **direct) as cdp:
            results[name] = {
                "first": run_steps(cdp, steps=14, num_tasks=12, dtype=torch.float64),
                "batched": run_steps(cdp, steps=2, num_tasks=12, dtype=torch.float64, batched=True),
                "other_k": run_steps(cdp, steps=16, num_tasks=10, dtype=torch.float64, batched=True),
            }
            keys = []
            for _ in range(4):
                dist.barrier()  # quiescent: every rank is between steps while the keys are counted
                keys.append(store.num_keys())
                dist.barrier()
                run_steps(cdp, steps=6, num_tasks=10, dtype=torch.float64)  # three exchanges
            # An exchange's keys live until every rank is past it, so the count depends on where the
            # exchanges fall; 12 exchanges that each left their P + 1 keys would add 60.
            results[name]["key_counts"] = keys
            saved = cdp.state_dict()
        with CodedDataParallel(make_model(*model_args), no_wait=no_wait, **direct) as cdp:
            cdp.load_state_dict(saved)
            results[name]["restored"] = run_steps(cdp, steps=3, num_tasks=10, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        cdp = CodedDataParallel(make_model(dtype), redundancy=1.25, emulate=noisy, timeout=30)
        results[f"repetition_1.25_{str(dtype)[6:]}"] = run_steps(cdp, steps=2, num_tasks=12, dtype=dtype)

    # Forced patterns: rank 1 stalls 2 s on its first task of step 1; rank world-1 is 10x slower always.
    stall = Heterogeneity(speeds=[1.0] * world, base=0.004, jitter=0.0, forced_stalls=((1, 1, 2.0),), seed=3)
    for name, no_wait in (("stall", True), ("stall_sync", False)):
        cdp = CodedDataParallel(
            make_model(torch.float64), redundancy=1.25, emulate=stall, no_wait=no_wait, spare_work=True, timeout=30
        )
        results[name] = run_steps(cdp, steps=3, num_tasks=16, dtype=torch.float64)
    # The same stall at step 7, once task times are measured (profiles published at step 4 from the
    # tasks of steps 1-3, at least 8 per rank even on a loaded machine, read at step 6 with
    # max_steps_ahead=1, or at once in the synchronous step): spare work now waits until the
    # stalled rank is late beyond its noise, then covers it.
    late_stall = Heterogeneity(speeds=[1.0] * world, base=0.004, jitter=0.0, forced_stalls=((1, 7, 2.0),), seed=3)
    for name, no_wait in (("stall_timed", True), ("stall_timed_sync", False)):
        cdp = CodedDataParallel(
            make_model(torch.float64),
            redundancy=1.25,
            emulate=late_stall,
            no_wait=no_wait,
            replan_every=2,
            warmup_steps=4,
            max_steps_ahead=1,
            spare_work=True,  # the scenario is about spare work, whatever "auto" resolves to
            timeout=30,
        )
        results[name] = run_steps(cdp, steps=9, num_tasks=16, dtype=torch.float64)
        results[name]["measured"] = cdp.plan.measured
    slow = Heterogeneity(speeds=[1.0] * (world - 1) + [0.1], base=0.004, jitter=0.2, seed=4)
    for code, redundancy in (("repetition", 1.25), ("cyclic", 2)):
        cdp = CodedDataParallel(make_model(torch.float64), code=code, redundancy=redundancy, emulate=slow, timeout=30)
        results[f"slow_{code}"] = run_steps(cdp, steps=3, num_tasks=16, dtype=torch.float64)

    # Re-planning from measured task times: start homogeneous, re-plan after 3 warm-up steps and then
    # every 4 steps (each exchange read 2 steps after it is published); from step 12 on the speeds are
    # reversed and the plan must follow.
    speeds = [1.0, 1.0, 2.0, 4.0][:world]
    drifting = Heterogeneity(speeds=speeds, base=0.01, jitter=0.3, seed=5, change_step=12, change_speeds=speeds[::-1])
    replanning = dict(redundancy=1.0, emulate=drifting, replan_every=4, warmup_steps=3, max_steps_ahead=1, timeout=30)
    cdp = CodedDataParallel(make_model(torch.float64), **replanning)
    run = run_steps(cdp, steps=52, num_tasks=16, dtype=torch.float64)  # 40 steps after the change
    results["replan"] = {
        "max_error": run["max_error"],
        "versions": run["plan_version"],
        "means_end": [p.mean for p in cdp.profiles],
        "primaries_end": len(cdp.plan.queue),
        "measured_before_k_change": cdp.plan.measured,
    }
    # Another K: a new plan, whose per-task times are no longer measured (tasks of another size).
    results["replan"]["new_k_error"] = run_steps(cdp, steps=1, num_tasks=20, dtype=torch.float64)["max_error"]
    results["replan"]["measured_after_k_change"] = cdp.plan.measured
    cdp = CodedDataParallel(make_model(torch.float64), **replanning)
    run = run_steps(cdp, steps=11, num_tasks=16, dtype=torch.float64)
    results["replan"]["means_mid"] = [p.mean for p in cdp.profiles]
    results["replan"]["primaries_mid"] = len(cdp.plan.queue)

    # 50 SGD steps: parameters bitwise identical across ranks, and equal to the single-process run.
    light = Heterogeneity(speeds=noisy.speeds, base=0.001, jitter=0.5, stall_prob=0.05, seed=11)
    cdp = CodedDataParallel(make_model(torch.float64), redundancy=1.25, emulate=light, timeout=30)
    reference = make_model(torch.float64)
    opt = torch.optim.SGD(cdp.module.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    for step in range(50):
        x, y = make_data(8, torch.float64, step)
        opt.zero_grad()
        cdp.backward(task_loss_fn(cdp.module, x, y), 8)
        opt.step()
        ref_opt.zero_grad()
        reference_grads(reference, 8, x, y)
        ref_opt.step()
    params = list(cdp.module.parameters())
    results["sgd"] = {
        "identical": identical_across_ranks(params),
        "error": relative_error(params, list(reference.parameters())),
    }

    # The Store must not grow with the number of steps.
    store = dist.distributed_c10d._get_default_store()
    # No profile exchanges here: their keys live a few steps (until every rank is past them), so
    # counts would depend on where the exchanges fall; close() is checked to leave none.
    cdp = CodedDataParallel(make_model(torch.float64), redundancy=1.5, replan_every=0, timeout=30)
    counts = {}
    x, y = make_data(8, torch.float64)
    for step in range(200):
        cdp.backward(task_loss_fn(cdp.module, x, y), 8)
        if step in (9, 199):
            dist.barrier()  # quiescent: every rank is between steps while the keys are counted
            counts[step] = store.num_keys()
            dist.barrier()
    results["store_keys"] = counts
    return results


def expect_error(results: dict, name: str, make) -> None:
    try:
        make()
    except (ConfigurationError, ValueError) as error:
        results[name] = {"type": type(error).__name__, "message": str(error)}
    else:
        results[name] = {"type": None, "message": ""}


def run_with_task_error(cdp: CodedDataParallel, rank: int, delay: float) -> dict:
    """Four steps where rank 1's task_loss raises ValueError at step 1 (after ``delay`` seconds)."""
    store = dist.distributed_c10d._get_default_store()
    keys = []
    x, y = make_data(8, torch.float64)
    outcomes, late_errors, identical = [], [], []
    for step in range(4):
        good = task_loss_fn(cdp.module, x, y)
        cdp.module.zero_grad(set_to_none=False)

        def task_loss(task, good=good, fail=(rank == 1 and step == 1)):
            if fail:
                time.sleep(delay)
                raise ValueError("a bad batch")
            return good(task)

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                report = cdp.backward(task_loss, 8)
            outcomes.append("ok")
            late_errors.append([report.late_error, [str(w.message) for w in caught]])
        except (ValueError, CodedStepTimeout) as error:
            outcomes.append(type(error).__name__)
            late_errors.append(None)
        identical.append(identical_across_ranks(grads(cdp.module)))
        if step in (0, 3):
            dist.barrier()  # quiescent: every rank is between steps while the keys are counted
            keys.append(store.num_keys())
            dist.barrier()
    return {
        "outcomes": outcomes,
        "late_errors": late_errors,
        "identical": identical,
        "step": cdp.step_index,
        "new_keys": keys[1] - keys[0],  # from after the first step to after the last
    }


class FailingBackward(torch.autograd.Function):
    """The identity whose backward raises: placed after the first layer, the layers above it have
    their gradients (and, with tiny buckets, their all-reduce launched) before the error."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("a bad backward")


def run_with_backward_error(cdp: CodedDataParallel, rank: int) -> dict:
    """Four direct steps (batch_loss) where rank 1's backward raises ValueError midway at step 1."""
    x, y = make_data(8, torch.float64)
    model = cdp.module
    outcomes, identical, overlapped = [], [], []
    for step in range(4):
        good = task_loss_fn(model, x, y)

        def batch_loss(ids, good=good, fail=(rank == 1 and step == 1)):
            if not fail:
                return sum(good(j) for j in ids) / len(ids)
            hidden = FailingBackward.apply(model.body[1](model.body[0](x)))
            return ((model.body[2](hidden) + model.branch(x) - y) ** 2).mean()

        model.zero_grad(set_to_none=False)
        try:
            report = cdp.backward(tasks=8, batch_loss=batch_loss)
            outcomes.append("ok")
            overlapped.append(report.buckets_overlapped)
        except (ValueError, CodedStepTimeout) as error:
            outcomes.append(type(error).__name__)
            overlapped.append(None)
        identical.append(identical_across_ranks(grads(model)))
    return {
        "outcomes": outcomes,
        "identical": identical,
        "buckets_overlapped": overlapped,
        "hooks_left": sum(len(p._backward_hooks or {}) for p in model.parameters()),
        "after": run_steps(cdp, steps=2, num_tasks=8, dtype=torch.float64, batched=True),
    }


def scenario_failures(rank: int, world: int) -> dict:
    results: dict = {}
    model = make_model(torch.float64)
    # Each of these must raise on every rank, from the Store gather, before any collective.
    expect_error(results, "bad_redundancy", lambda: CodedDataParallel(model, redundancy=0.5 if rank == 1 else 1.25))
    expect_error(results, "mismatch", lambda: CodedDataParallel(model, redundancy=1.0 + 0.25 * rank))
    expect_error(
        results, "world_size", lambda: CodedDataParallel(model, emulate=Heterogeneity([1.0] * (world + 1), 0.01))
    )

    def too_few_tasks():
        cdp = CodedDataParallel(model, redundancy=1.0)
        x, y = make_data(world - 1, torch.float64)
        cdp.backward(task_loss_fn(cdp.module, x, y), world - 1)

    expect_error(results, "too_few_tasks", too_few_tasks)

    retry = CodedDataParallel(make_model(torch.float64), redundancy=1.0)

    def different_tasks():  # rank 0 asks for another K than the others: caught before any collective
        tasks = 6 if rank == 0 else 9
        x, y = make_data(tasks, torch.float64)
        retry.backward(task_loss_fn(retry.module, x, y), tasks)

    expect_error(results, "different_tasks", different_tasks)
    # The same engine, called again with one K everywhere, agrees afresh and computes exactly.
    results["retry_after_error"] = run_steps(retry, steps=2, num_tasks=9, dtype=torch.float64)
    # The process group must still work after all of that: nothing half-started a collective.
    t = torch.ones(1)
    dist.all_reduce(t)
    results["group_ok"] = float(t) == world

    # An exception in one rank's task_loss at step 1, before the step can be decided (no backups, no
    # spare work): every rank fails that step, and training goes on.
    for name, no_wait in (("task_error", True), ("task_error_sync", False)):
        cdp = CodedDataParallel(model, redundancy=1.0, no_wait=no_wait, spare_work=False, replan_every=0, timeout=10.0)
        results[name] = run_with_task_error(cdp, rank, delay=0.0)
    # The same in a direct step (Ω = 1, no spare work, measured: nothing to decide): every rank fails it
    # at the all-reduce, which carries each rank's status; then a step where rank 0 passes other task
    # weights, refused on every rank by the keys the all-reduce carries too; training goes on.
    # Measured after the warm-up exchanges (every 2 steps until 8 task times per rank), then no exchange
    # for 50 steps: no plan switch (whose first step runs coded) can fall on the steps checked here.
    cdp = CodedDataParallel(
        model, redundancy=1.0, spare_work=False, replan_every=50, warmup_steps=2, max_steps_ahead=1, timeout=10.0
    )
    warm = run_steps(cdp, steps=10, num_tasks=8, dtype=torch.float64)
    results["direct_task_error"] = run_with_task_error(cdp, rank, delay=0.0)
    results["direct_task_error"]["warm_direct"] = warm["direct"][-1]
    x, y = make_data(8, torch.float64)
    weights = [1.0] * 7 + [2.0 if rank == 0 else 1.0]
    try:
        cdp.backward(task_loss_fn(cdp.module, x, y), weights)
        results["direct_mismatch"] = {"type": None, "message": ""}
    except StepMismatchError as error:
        results["direct_mismatch"] = {"type": type(error).__name__, "message": str(error)}
    results["direct_mismatch"]["after"] = run_steps(cdp, steps=2, num_tasks=8, dtype=torch.float64)
    cdp.close()
    # An error inside rank 1's backward after its last layers' buckets went to the all-reduce (launched
    # from the backward's hooks): every rank fails that step at once, and the next steps are exact.
    with CodedDataParallel(
        make_model(torch.float64, with_unused=False),
        bucket_cap_mb=TINY_BUCKETS_MB,
        redundancy=1.0,
        spare_work=False,
        replan_every=50,
        warmup_steps=2,
        max_steps_ahead=1,
        timeout=10.0,
    ) as overlapped:
        warm = run_steps(overlapped, steps=10, num_tasks=8, dtype=torch.float64)
        results["direct_backward_error"] = run_with_backward_error(overlapped, rank)
        results["direct_backward_error"]["warm_direct"] = warm["direct"][-1]

    # The same error after the step was decided without it: rank 1's first task of step 1 runs 1.5 s,
    # the others cover its work (spare work), the release reduces the step on every rank, and only
    # then does the task raise. The step completed everywhere, so every rank must go on as "ok".
    # A buffer makes every completed step end with a broadcast: rank 1 must take part in it too.
    with_buffer = make_model(torch.float64)
    with_buffer.register_buffer("marker", torch.full((3,), float(rank)))
    # Every task takes 100 ms, so that rank 1 is inside its first task before the others can cover its
    # share (~300 ms): with the tiny model's 1-2 ms tasks a rank late by a few ms into step 1 found the
    # step decided, computed nothing and had no error to report (one fresh-clone run in several).
    paced = Heterogeneity(speeds=[1.0] * world, base=0.1, jitter=0.0, seed=0)
    cdp = CodedDataParallel(with_buffer, redundancy=1.0, spare_work=True, replan_every=0, timeout=10.0, emulate=paced)
    results["late_task_error"] = run_with_task_error(cdp, rank, delay=1.5)
    results["late_task_error"]["buffer"] = with_buffer.marker.tolist()

    # A rank that stops committing, two ways, each bounded by a 2 s timeout.
    # (a) Rank world-1 hangs for 6 s before step 1, outside any task: the others cover its tasks,
    #     decide the step and time out at the arrival, naming it; it fails when it comes back.
    #     No release ahead: a rank asleep between steps may otherwise have steps 1 and 2 completed for
    #     it by its release thread (correct too, but then nobody times out), depending on who looks first.
    #     Spare work (the others cover the silent rank's tasks, so the step is decided without it).
    cdp = CodedDataParallel(model, redundancy=1.0, timeout=2.0, max_steps_ahead=0, spare_work=True)
    results["timeout_arrival"] = run_until_timeout(cdp, rank, hang=(world - 1, 1, 6.0))
    dist.barrier()  # no collective was entered above, so the group is intact
    # (b) Fractional repetition with s = 0 cannot lose a rank: rank world-1 stalls 6 s inside its
    #     task of step 1, the step cannot be decided, and the others time out waiting, naming it.
    stalled = Heterogeneity(speeds=[1.0] * world, base=0.002, jitter=0.0, forced_stalls=((world - 1, 1, 6.0),))
    cdp = CodedDataParallel(model, code="frc", redundancy=1, emulate=stalled, timeout=2.0)
    results["timeout_decision"] = run_until_timeout(cdp, rank)
    return results


def run_until_timeout(cdp: CodedDataParallel, rank: int, hang: tuple[int, int, float] | None = None) -> dict:
    """Run 3 steps; ``hang = (rank, step, seconds)`` makes that rank sleep before that step."""
    x, y = make_data(8, torch.float64)
    start = time.perf_counter()
    outcome = {"type": None, "message": ""}
    try:
        for step in range(3):
            if hang is not None and (rank, step) == hang[:2]:
                time.sleep(hang[2])
            cdp.backward(task_loss_fn(cdp.module, x, y), 8)
    except CodedStepTimeout as error:
        outcome = {"type": type(error).__name__, "message": str(error)}
    outcome["seconds"] = time.perf_counter() - start
    return outcome


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        results = {"exact": scenario_exact, "failures": scenario_failures}[scenario](rank, world)
    except Exception:
        results = {"crash": traceback.format_exc()}
    write_results_and_exit(out_dir, rank, results)


def write_results_and_exit(out_dir: Path, rank: int, results: dict) -> None:
    """Write this rank's results for the pytest side and leave at once.

    After a timeout scenario the group may hold a half-finished step: leave without a collective.
    """
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
