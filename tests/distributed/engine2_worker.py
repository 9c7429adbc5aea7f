"""Worker for tests/test_engine_lifecycle.py: the engine's second generation under torchrun (gloo).

One launch of 4 ranks checks: a 3 s stall inside one task does not hold the others (the release
completes later steps ahead of the stalled compute thread), with exactness and bitwise-identical
parameters and buffers after 16 SGD steps; unequal task weights and a ragged batch; the decoded
loss; a ``state_dict`` round trip; the five review defects (an exception between commit and
accumulation, a long first step under a short timeout, plan versions after a failed agreement, a
mismatched setting, a module without trainable parameters); errors that say what went wrong;
non-finite gradients; and that ``close()`` leaves no thread, process group or Store key behind.
"""

from __future__ import annotations

import datetime
import itertools
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from codedgrad import CodedDataParallel
from codedgrad.emulate import Heterogeneity
from codedgrad.runtime import CodedStepError
from codedgrad.runtime.buffers import FlatGradients
from codedgrad.runtime.coordinator import StoreCoordinator
from tests.distributed.engine_worker import (
    FEATURES,
    grads,
    identical_across_ranks,
    make_data,
    make_model,
    reference_grads,
    relative_error,
    task_loss_fn,
    write_results_and_exit,
)


class Buffered(nn.Module):
    """A model with a buffer used in the forward pass (fixed) and one each rank updates (a counter)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(99)
        self.layer = nn.Linear(FEATURES, 1)
        self.register_buffer("scale", torch.tensor([0.5]))
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.seen += x.shape[0]  # differs by rank: rank 0's copy is what every rank must end with
        return self.layer(x) * self.scale


def sgd_run(cdp: CodedDataParallel, reference: nn.Module, steps: int, num_tasks: int) -> dict:
    """``steps`` SGD steps on the engine and on one process; per-step reports and the final comparison."""
    opt = torch.optim.SGD(cdp.module.parameters(), lr=0.05)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
    reports = []
    for step in range(steps):
        x, y = make_data(num_tasks, torch.float64, step)
        opt.zero_grad()
        reports.append(cdp.backward(task_loss_fn(cdp.module, x, y), num_tasks))
        opt.step()
        ref_opt.zero_grad()
        reference_grads(reference, num_tasks, x, y)
        ref_opt.step()
    params = list(cdp.module.parameters())
    return {
        "identical": identical_across_ranks(params),
        "buffers_identical": identical_across_ranks(list(cdp.module.buffers())) if list(cdp.module.buffers()) else True,
        "error": relative_error(params, list(reference.parameters())),
        "step_time": [r.step_time for r in reports],
        "ahead": [r.ahead for r in reports],
        "computed": [r.computed for r in reports],
    }


# Steps of the stall scenario: the stall at step 5, at most max_steps_ahead (4) steps completed for the
# stalled rank meanwhile (6-9), then six ordinary steps after it caught up before parameters are compared.
STALL_STEPS = 16


def scenario_stall(rank: int, world: int, results: dict) -> None:
    """A 3 s stall of rank 1 inside its first task of step 5, against the same run without it."""
    for name, stalls in (("steady", ()), ("stalled", ((1, 5, 3.0),))):
        het = Heterogeneity(speeds=[1.0] * world, base=0.02, jitter=0.0, forced_stalls=stalls, seed=1)
        for module_name, make in (("plain", lambda: make_model(torch.float64)), ("buffers", Buffered)):
            if module_name == "buffers" and name == "steady":
                continue
            model = make().double()
            reference = make().double()
            reference.load_state_dict(model.state_dict())
            # replan_every=0: spare work helps at once (the plan's times are not measured seconds); on
            # explicitly: the scenario is about spare work, whatever "auto" resolves to.
            with CodedDataParallel(
                model, redundancy=1.25, emulate=het, replan_every=0, spare_work=True, timeout=30
            ) as cdp:
                run = sgd_run(cdp, reference, steps=STALL_STEPS, num_tasks=16)
            results[f"{name}_{module_name}"] = run


def scenario_weights(rank: int, world: int, results: dict) -> None:
    """Unequal task sizes (a ragged batch of 50 samples in 12 tasks) and the decoded loss."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(50, FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    bounds = torch.linspace(0, 50, 13).round().long().tolist()
    bounds[3] = bounds[2]  # one empty task (weight 0), as a ragged last batch can make
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    out = {}
    for code, redundancy in (("repetition", 1.25), ("cyclic", 2), ("frc", 2)):
        model = make_model(torch.float64)
        reference = make_model(torch.float64)
        with CodedDataParallel(model, code=code, redundancy=redundancy, replan_every=0, timeout=30) as cdp:
            slot = cdp.value_slot("mae", {"prog_bar": True})

            def task_loss(j: int, slot=slot):
                rows = slice(bounds[j], bounds[j + 1])
                error = cdp.module(x[rows], 0) - y[rows]
                return (error**2).mean(), {slot: error.abs().mean()}  # a logged metric, decoded like the loss

            model.zero_grad()
            report = cdp.backward(task_loss, sizes)
            loss = ((reference(x, 0) - y) ** 2).mean()
            loss.backward()
            mae = (reference(x, 0) - y).abs().mean().item()
            got = grads(model)
            want = [torch.zeros_like(p) if p.grad is None else p.grad for p in reference.parameters()]
            out[code] = {
                "error": relative_error(got, want),
                "loss_error": abs(report.loss - loss.item()) / loss.item(),
                "mae_error": abs(report.values[slot] - mae) / mae,
                "names": cdp.value_names(),
                "identical": identical_across_ranks(got),
            }
    results["weights"] = out


def scenario_state(rank: int, world: int, results: dict) -> None:
    """A state_dict round trip resumes with the same plan and no warm-up."""
    het = Heterogeneity(speeds=[1.0, 1.0, 2.0, 4.0][:world], base=0.004, jitter=0.3, seed=2)
    model = make_model(torch.float64)
    with CodedDataParallel(
        model, redundancy="auto", emulate=het, replan_every=4, warmup_steps=4, max_steps_ahead=1, timeout=30
    ) as cdp:
        for step in range(9):  # published at step 4 (tasks of steps 1-3), read and switched at step 6
            x, y = make_data(32, torch.float64, step)
            cdp.backward(task_loss_fn(cdp.module, x, y), 32)
        saved = cdp.state_dict()
        before = {"version": cdp.plan_version, "measured": cdp.plan.measured, "step": cdp.step_index}
        before["redundancy"] = cdp.plan.redundancy
        before["means"] = [p.mean for p in cdp.profiles]
    fresh = make_model(torch.float64)
    with CodedDataParallel(
        fresh, redundancy="auto", emulate=het, replan_every=4, warmup_steps=4, max_steps_ahead=1, timeout=30
    ) as cdp:
        cdp.load_state_dict(saved)
        reference = make_model(torch.float64)
        reference.load_state_dict(cdp.module.state_dict(), strict=False)
        x, y = make_data(32, torch.float64, 9)
        report = cdp.backward(task_loss_fn(cdp.module, x, y), 32)
        want = reference_grads(reference, 32, x, y)
        after = {"version": cdp.plan_version, "measured": cdp.plan.measured, "step": report.step}
        after["redundancy"] = cdp.plan.redundancy
        after["means"] = [p.mean for p in cdp.profiles]
        after["error"] = relative_error(grads(cdp.module), want)
    results["state"] = {"before": before, "after": after}


def outcome(fn) -> dict:
    start = time.perf_counter()
    try:
        fn()
    except Exception as error:
        seconds = time.perf_counter() - start
        step_error = isinstance(error, CodedStepError)  # the one type a loop catches to skip a failed step
        return {"type": type(error).__name__, "message": str(error), "seconds": seconds, "step_error": step_error}
    return {"type": None, "message": "", "seconds": time.perf_counter() - start, "step_error": False}


def scenario_defects(rank: int, world: int, results: dict) -> None:
    x, y = make_data(8, torch.float64)

    # 1. An exception between a used commit and its accumulation (rank 1, step 1): every rank fails
    #    that step; nobody applies a gradient missing the task; training goes on exactly.
    #    With batch_loss the failing commit runs on the commit helper thread, for a chunk.
    original_add = FlatGradients.add_
    for key, batched in (("commit_then_fail", False), ("commit_then_fail_chunks", True)):
        model = make_model(torch.float64)
        reference = make_model(torch.float64)
        outcomes, messages, errors, step_errors = [], [], [], []
        with CodedDataParallel(model, redundancy=1.0, spare_work=False, timeout=10) as cdp:
            per_task = task_loss_fn(cdp.module, x, y)

            def chunk_loss(ids: list[int], per_task=per_task) -> torch.Tensor:  # equal tasks: the plain mean
                return sum(per_task(j) for j in ids) / len(ids)

            for step in range(3):
                inject = rank == 1 and step == 1

                def add_then_fail(self, *args, _inject=inject, **kwargs):
                    if _inject:
                        raise RuntimeError("injected between commit and accumulation")
                    return original_add(self, *args, **kwargs)

                FlatGradients.add_ = add_then_fail
                try:
                    model.zero_grad()
                    if batched:
                        result = outcome(lambda: cdp.backward(tasks=8, batch_loss=chunk_loss))
                    else:
                        result = outcome(lambda per_task=per_task: cdp.backward(per_task, 8))
                finally:
                    FlatGradients.add_ = original_add
                outcomes.append(result["type"])
                messages.append(result["message"])
                step_errors.append(result["step_error"])
                if result["type"] is None:
                    want = reference_grads(reference, 8, x, y)
                    errors.append(relative_error(grads(model), want))
        results[key] = {"outcomes": outcomes, "messages": messages, "errors": errors, "step_errors": step_errors}

    # 2. A first step of 2 s of every rank's own work under timeout=1 (like torch.compile): fine.
    long_first = {}
    for no_wait in (True, False):
        model = make_model(torch.float64)
        reference = make_model(torch.float64)
        with CodedDataParallel(model, redundancy=1.0, no_wait=no_wait, spare_work=False, timeout=1.0) as cdp:
            calls = []
            good = task_loss_fn(cdp.module, x, y)

            def slow_first(j: int, calls=calls, good=good) -> torch.Tensor:
                if not calls:
                    time.sleep(2.0)
                calls.append(j)
                return good(j)

            result = outcome(lambda: cdp.backward(slow_first, 8))
            if result["type"] is None:
                result["error"] = relative_error(grads(model), reference_grads(reference, 8, x, y))
        long_first["no_wait" if no_wait else "sync"] = result
    results["long_first_step"] = long_first

    # 3. Different K on one rank: a clear error everywhere, then the same engine agrees afresh and
    #    every rank ends on the same plan version.
    with CodedDataParallel(make_model(torch.float64), redundancy=1.0, timeout=10) as cdp:
        tasks = 6 if rank == 0 else 9
        xs, ys = make_data(tasks, torch.float64)
        failed = outcome(lambda: cdp.backward(task_loss_fn(cdp.module, xs, ys), tasks))
        xs, ys = make_data(9, torch.float64)
        versions = []
        for _ in range(2):
            cdp.backward(task_loss_fn(cdp.module, xs, ys), 9)
            versions.append(cdp.plan_version)
        gathered = [None] * world
        dist.all_gather_object(gathered, versions)
        results["plan_versions"] = {"failed": failed, "versions": gathered}
    # Different task weights on one rank with the same K: the step fails on every rank.
    with CodedDataParallel(make_model(torch.float64), redundancy=1.0, timeout=10) as cdp:
        weights = [3.0] * 8 if rank != 2 else [3.0] * 7 + [2.0]
        results["different_weights"] = outcome(lambda: cdp.backward(task_loss_fn(cdp.module, x, y), weights))

    # 4. Settings and modules that differ on one rank: every rank raises, naming the first difference.
    results["bucket_mismatch"] = outcome(
        lambda: CodedDataParallel(make_model(torch.float64), bucket_cap_mb=25.0 if rank != 1 else 8.0).close()
    )
    results["replan_mismatch"] = outcome(
        lambda: CodedDataParallel(make_model(torch.float64), replan_every=50 if rank != 3 else 10).close()
    )

    def odd_module():
        model = make_model(torch.float64)
        if rank == 2:
            model.body[2] = nn.Linear(8, 2).double()
        CodedDataParallel(model).close()

    results["shape_mismatch"] = outcome(odd_module)

    def odd_buffer():
        model = make_model(torch.float64)
        model.register_buffer("stat", torch.zeros(3 if rank != 0 else 4, dtype=torch.float64))
        CodedDataParallel(model).close()

    results["buffer_mismatch"] = outcome(odd_buffer)

    # 5. A module without trainable parameters: a clear error on every rank, at once.
    frozen = make_model(torch.float64).requires_grad_(False)
    results["no_parameters"] = outcome(lambda: CodedDataParallel(frozen, timeout=30).close())
    results["cyclic_fraction"] = outcome(
        lambda: CodedDataParallel(make_model(torch.float64), code="cyclic", redundancy=1.5)
    )

    # Errors that say what went wrong: task_loss returning a float, None, a vector.
    bad_returns = {}
    for kind, value in (("float", lambda: 1.5), ("none", lambda: None), ("vector", lambda: torch.ones(3))):
        with CodedDataParallel(make_model(torch.float64), redundancy=1.0, spare_work=False, timeout=10) as cdp:
            good = task_loss_fn(cdp.module, x, y)

            def task_loss(j, _value=value, _good=good):
                return _value() if rank == 3 else _good(j)

            bad_returns[kind] = outcome(lambda: cdp.backward(task_loss, 8))
            bad_returns[kind]["then"] = outcome(lambda: cdp.backward(task_loss_fn(cdp.module, x, y), 8))["type"]
    results["bad_returns"] = bad_returns

    # BatchNorm is accepted, with a warning that names the layer.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = nn.Sequential(nn.Linear(FEATURES, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
        CodedDataParallel(model).close()
    results["batchnorm_warning"] = [str(w.message) for w in caught if "BatchNorm" in str(w.message)]


def scenario_precision(rank: int, world: int, results: dict) -> None:
    """bf16 autocast inside tasks; a NaN on one rank raises everywhere; GradScaler skips everywhere."""
    x, y = make_data(8, torch.float32)
    model = make_model(torch.float32)
    reference = make_model(torch.float32)
    with CodedDataParallel(model, redundancy=1.25, timeout=10) as cdp:
        good = task_loss_fn(cdp.module, x, y)

        def autocast_loss(j):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return good(j).float()

        cdp.backward(autocast_loss, 8)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = reference_grads(reference, 8, x, y)
        results["autocast_error"] = relative_error(grads(model), want)

        def nan_loss(j):
            loss = good(j)
            return loss * float("nan") if j == 5 else loss  # whoever computes task 5 (its result is used)

        before = [g.clone() for g in grads(model)]
        results["nan_raise"] = outcome(lambda: cdp.backward(nan_loss, 8))
        results["nan_grads_untouched"] = all(torch.equal(a, g) for a, g in zip(before, grads(model)))
    model = make_model(torch.float32)
    with CodedDataParallel(model, redundancy=1.0, spare_work=False, nonfinite="keep", timeout=10) as cdp:
        good = task_loss_fn(cdp.module, x, y)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        scaler.scale(torch.zeros(()))  # creates its scale now: a rank may compute no task in a step
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        skipped = []
        for step in range(3):
            opt.zero_grad()

            def scaled(j, _step=step):
                loss = good(j)
                if _step == 1 and rank == 2:
                    loss = loss * float("inf")
                return scaler.scale(loss)

            cdp.backward(scaled, 8)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped.append(scaler.get_scale() < scale)
        results["scaler"] = {"skipped": skipped, "identical": identical_across_ranks(list(model.parameters()))}


def scenario_lifecycle(rank: int, world: int, results: dict) -> None:
    """After close(): no extra threads, process groups or Store keys."""
    store = dist.distributed_c10d._get_default_store()
    dist.barrier()
    threads, groups, keys = threading.active_count(), len(dist.distributed_c10d._world.pg_map), store.num_keys()
    dist.barrier()
    # torch's own keys for a new process group's rendezvous (the release creates one): not ours.
    dist.destroy_process_group(dist.new_group(backend="gloo"))
    dist.barrier()
    group_keys = store.num_keys() - keys
    keys = store.num_keys()
    dist.barrier()
    x, y = make_data(8, torch.float64)
    model = make_model(torch.float64)
    model.register_buffer("marker", torch.zeros(2, dtype=torch.float64))
    cdp = CodedDataParallel(model, redundancy=1.25, replan_every=3, warmup_steps=2, timeout=10)
    for _ in range(8):
        cdp.backward(task_loss_fn(cdp.module, x, y), 8)
    during = {"threads": threading.active_count(), "groups": len(dist.distributed_c10d._world.pg_map)}
    cdp.close()
    dist.barrier()
    after = {
        "threads": threading.active_count(),
        "groups": len(dist.distributed_c10d._world.pg_map),
        "keys": store.num_keys(),
    }
    dist.barrier()
    results["lifecycle"] = {
        "before": {"threads": threads, "groups": groups, "keys": keys + group_keys},
        "during": during,
        "after": after,
        "closed_error": outcome(lambda: cdp.backward(task_loss_fn(cdp.module, x, y), 8))["message"],
    }


def scenario_review(rank: int, world: int, results: dict) -> None:
    """Two review findings: a Store error in the clean-up after a step's collective must not fail
    that step on one rank; a buffer loaded between steps reaches every rank even when rank 0 is
    stalled and finishes no task before the decision."""
    original = StoreCoordinator.step_done

    def flaky(self, step: int) -> None:
        original(self, step)
        if self.rank == 0 and step == 2:
            raise RuntimeError("injected Store error in delete_key")

    StoreCoordinator.step_done = flaky
    outcomes = []
    try:
        model = make_model(torch.float64)
        with CodedDataParallel(model, redundancy=1.25, replan_every=0, timeout=10) as cdp:
            for step in range(4):
                x, y = make_data(8, torch.float64, step)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outcomes.append(outcome(lambda x=x, y=y: cdp.backward(task_loss_fn(cdp.module, x, y), 8))["type"])
            identical = identical_across_ranks(grads(model))
    finally:
        StoreCoordinator.step_done = original
    results["cleanup_error"] = {"outcomes": outcomes, "identical": identical}

    model = make_model(torch.float64)
    model.register_buffer("marker", torch.zeros(2, dtype=torch.float64))
    het = Heterogeneity(speeds=[1.0] * world, base=0.001, jitter=0.0, forced_stalls=((0, 0, 1.5),))
    with CodedDataParallel(model, redundancy=2.0, replan_every=0, emulate=het, timeout=10) as cdp:
        model.load_state_dict({**model.state_dict(), "marker": torch.full((2,), 7.0, dtype=torch.float64)})
        x, y = make_data(4, torch.float64, 0)
        cdp.backward(task_loss_fn(cdp.module, x, y), 4)
        results["loaded_buffer"] = model.marker.tolist()


def scenario_chunks(rank: int, world: int, results: dict) -> None:
    """``batch_loss``: primaries in shrinking chunks, backups, spare work, a stall inside a chunk and
    a ragged batch with an empty task; fp64 SGD against one process, with and without the release."""
    sizes = [3] * 24
    sizes[5], sizes[17] = 0, 5  # an empty task and a larger one: weights are sample counts
    bounds = list(itertools.accumulate([0, *sizes]))
    het = Heterogeneity(
        speeds=[1.0, 1.0, 2.0, 4.0], base=0.01, jitter=0.5, stall_prob=0.05, seed=3, forced_stalls=((1, 3, 0.5),)
    )
    out = {}
    for name, no_wait, steps in (("release", True, 12), ("sync", False, 4)):
        model = make_model(torch.float64)
        reference = make_model(torch.float64)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05)
        calls: list[list[int]] = []
        reports, want = [], []
        with CodedDataParallel(model, redundancy=1.25, emulate=het, replan_every=0, timeout=30, no_wait=no_wait) as cdp:
            slot = cdp.value_slot("mae")
            for step in range(steps):
                generator = torch.Generator().manual_seed(700 + step)
                x = torch.randn(bounds[-1], FEATURES, generator=generator, dtype=torch.float64)
                y = torch.randn(bounds[-1], 1, generator=generator, dtype=torch.float64)

                def batch_loss(ids: list[int], x=x, y=y, calls=calls, slot=slot):
                    calls.append(list(ids))
                    rows = torch.cat([torch.arange(bounds[j], bounds[j + 1]) for j in ids])
                    error = cdp.module(x[rows], 0) - y[rows]
                    return (error**2).mean(), {slot: error.abs().mean()}

                opt.zero_grad()
                reports.append(cdp.backward(tasks=sizes, batch_loss=batch_loss))
                opt.step()
                ref_opt.zero_grad()
                ref_loss = ((reference(x, 0) - y) ** 2).mean()
                ref_loss.backward()
                ref_opt.step()
                want.append(ref_loss.item())
        params = list(model.parameters())
        out[name] = {
            "error": relative_error(params, list(reference.parameters())),
            "identical": identical_across_ranks(params),
            "loss_error": max(abs(r.loss - w) / w for r, w in zip(reports, want) if not r.ahead),
            "chunk_sizes": [r.chunk_sizes for r in reports],
            "largest_call": max((len(c) for c in calls), default=0),
            "used": [r.used for r in reports],
            "computed": [r.computed for r in reports],
            "spare": [r.spare for r in reports],
            "commit_exposed": sum(r.commit_exposed for r in reports),
            "commit_seconds": sum(sum(r.commit_seconds) for r in reports),
            "ahead": [r.ahead for r in reports],
            "step_time": [r.step_time for r in reports],
        }
    results["chunks"] = out


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict = {}
    for scenario in (
        scenario_lifecycle,
        scenario_review,
        scenario_defects,
        scenario_weights,
        scenario_state,
        scenario_precision,
        scenario_chunks,
        scenario_stall,
    ):
        try:
            scenario(rank, world, results)
        except Exception:
            import traceback

            results[f"crash_{scenario.__name__}"] = traceback.format_exc()
            break
        dist.barrier()
    write_results_and_exit(out_dir, rank, results)


if __name__ == "__main__":
    main()
