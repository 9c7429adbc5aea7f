"""torchrun worker for tests/test_baselines.py: DynamicPulling and DropSlowest on 3 ranks (gloo, fp64).

Every rank regenerates each step's global batch (9 tasks of unequal sizes, 19 samples) from fixed
seeds and computes the single-process references itself, at the parameters it holds when it calls
``backward`` (the test checks that every rank held the same ones). Emulated speeds 1, 2, 4 (sleep
mode, no jitter). Parts, in this order, every rank building the same baselines:

``pulling``  DynamicPulling, chunk 1, 4 SGD steps: p.grad against the whole batch's gradient, the
             tasks each rank computed, parameter hashes after every step.
``drop``     DropSlowest, one backup, 7 SGD steps; rank 1 stalls STALL seconds in step 2; exact checks on
             steps 0, 1, 5, 6: p.grad against the gradient over the contributors' samples, the reported
             relative error against one computed here, wall times, parameter hashes.
``failures`` bad arguments (on every rank, or on one rank only), a bad ``tasks``, a loss that raises on
             one rank, ranks passing different weights (then a step that succeeds), and the Store keys
             left after close().

Usage: ``torchrun --nproc-per-node 3 baselines_worker.py OUT_DIR``; writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from codedgrad.baselines import BaselineStepError, DropSlowest, DynamicPulling
from codedgrad.emulate import Heterogeneity
from codedgrad.runtime import ConfigurationError

TASK_SIZES = (2, 3, 1, 2, 3, 2, 1, 3, 2)
STARTS = [sum(TASK_SIZES[:j]) for j in range(len(TASK_SIZES))]
SPEEDS = (1.0, 2.0, 4.0)
BASE = 0.02  # seconds per task on the speed-1 rank
STALL = 1.0  # rank 1's forced stall in DropSlowest's step 2
PULL_STEPS, DROP_STEPS = 4, 7
CHECKED = (0, 1, 5, 6)  # DropSlowest steps run with exact_check=True


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(500 + step)
    n = sum(TASK_SIZES)
    return (
        torch.randn(n, 4, generator=generator, dtype=torch.float64),
        torch.randn(n, 3, generator=generator, dtype=torch.float64),
    )


def samples(task_ids) -> list[int]:
    return [STARTS[j] + i for j in task_ids for i in range(TASK_SIZES[j])]


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum(dim=1).mean()


def batch_loss_for(model: nn.Module, step: int):
    x, y = global_batch(step)

    def batch_loss(task_ids: list[int]) -> torch.Tensor:
        rows = samples(task_ids)
        return mean_loss(model, x[rows], y[rows])

    return batch_loss


def reference(state: dict, step: int, task_ids) -> torch.Tensor:
    """One process's gradient of the mean loss over those tasks' samples, flattened."""
    model = make_model()
    model.load_state_dict(state)
    x, y = global_batch(step)
    rows = samples(task_ids)
    grads = torch.autograd.grad(mean_loss(model, x[rows], y[rows]), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def params_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    return digest.hexdigest()


def sgd_step(model: nn.Module, lr: float = 0.1) -> None:
    """Plain SGD by hand: torch.optim's first use imports torch._dynamo (seconds on a busy machine)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=-lr)
            p.grad = None


def state_of(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_pulling(rank: int) -> dict:
    model = make_model()
    emulate = Heterogeneity(speeds=SPEEDS, base=BASE, jitter=0.0)
    out: dict = {"errors": [], "computed": [], "owners": [], "pulls": [], "hashes": [], "contributors": []}
    with DynamicPulling(model, chunk=1, emulate=emulate, timeout=30) as pulling:
        for step in range(PULL_STEPS):
            state = state_of(model)
            report = pulling.backward(batch_loss_for(model, step), list(TASK_SIZES))
            out["errors"].append(relative(flat_grad(model), reference(state, step, range(len(TASK_SIZES)))))
            out["computed"].append(list(report.computed))
            out["owners"].append(list(report.owners))
            out["pulls"].append(report.pulls)
            out["contributors"].append(list(report.contributors))
            sgd_step(model)
            out["hashes"].append(params_hash(model))
        out["chunk"] = report.chunk
    return out


def run_drop(rank: int) -> dict:
    model = make_model()
    emulate = Heterogeneity(speeds=SPEEDS, base=BASE, jitter=0.0, forced_stalls=((1, 2, STALL),))
    out: dict = {"steps": [], "hashes": []}
    with DropSlowest(model, backups=1, emulate=emulate, timeout=30) as baseline:
        for step in range(DROP_STEPS):
            state = state_of(model)
            began = time.perf_counter()
            report = baseline.backward(batch_loss_for(model, step), list(TASK_SIZES), exact_check=step in CHECKED)
            wall = time.perf_counter() - began
            used = reference(state, step, report.tasks_used)
            full = reference(state, step, range(len(TASK_SIZES)))
            entry = {
                "wall": wall,
                "step_time": report.step_time,
                "contributors": list(report.contributors),
                "dropped": list(report.dropped),
                "tasks_used": list(report.tasks_used),
                "computed": list(report.computed),
                "ahead": report.ahead,
                "error_used": relative(flat_grad(model), used),
                "error_full_here": relative(used, full),
                "relative_error": report.relative_error,
                "loss_finite": math.isfinite(report.loss),
            }
            out["steps"].append(entry)
            sgd_step(model)
            out["hashes"].append(params_hash(model))
    return out


def expect_error(kinds: tuple[type[BaseException], ...], build) -> str:
    try:
        build()
    except kinds as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def run_failures(rank: int) -> dict:
    out: dict = {}
    model = make_model()
    out["backups_too_many"] = expect_error((ConfigurationError,), lambda: DropSlowest(model, backups=3))
    out["chunk_on_one_rank"] = expect_error(
        (ConfigurationError,), lambda: DynamicPulling(model, chunk=0 if rank == 1 else 2)
    )
    two = Heterogeneity(speeds=[1.0, 1.0], base=0.01)
    out["world_mismatch"] = expect_error((ConfigurationError,), lambda: DropSlowest(model, emulate=two))

    # Ranks 0 and 1 stall 0.5 s after their first chunk of step 0 (the failing call's), so rank 2 pulls
    # a task and raises even if it comes late: ranks 0 and 1 pull all 9 tasks in ~55 ms otherwise.
    emulate = Heterogeneity(speeds=SPEEDS, base=BASE, jitter=0.0, forced_stalls=((0, 0, 0.5), (1, 0, 0.5)))
    with DynamicPulling(model, chunk=1, emulate=emulate, timeout=30) as pulling:
        loss = batch_loss_for(model, 0)
        out["pulling_too_few_tasks"] = expect_error((ValueError,), lambda: pulling.backward(loss, 2))
        out["pulling_bad_weight"] = expect_error((ValueError,), lambda: pulling.backward(loss, [1, 2, -1, 4]))

        def failing(task_ids: list[int]) -> torch.Tensor:
            if rank == 2:
                raise RuntimeError("no such sample")
            return loss(task_ids)

        out["pulling_loss_raises"] = expect_error((BaselineStepError,), lambda: pulling.backward(failing, 9))
        other = [*TASK_SIZES[:-1], 3] if rank == 0 else list(TASK_SIZES)
        out["pulling_other_tasks"] = expect_error((BaselineStepError,), lambda: pulling.backward(loss, other))
        pulling.backward(loss, list(TASK_SIZES))  # the ranks are still in step
        out["pulling_after_failure"] = relative(flat_grad(model), reference(state_of(model), 0, range(9)))
        model.zero_grad()
    # Ranks 0 and 1 stall 0.5 s in step 0, so rank 2's failure comes first even on a busy machine.
    stalls = Heterogeneity(speeds=SPEEDS, base=BASE, jitter=0.0, forced_stalls=((0, 0, 0.5), (1, 0, 0.5)))
    with DropSlowest(model, backups=1, emulate=stalls, timeout=30) as baseline:
        out["drop_empty_share"] = expect_error((ValueError,), lambda: baseline.backward(loss, [1, 1, 1, 0, 0, 0, 1]))

        def failing_first(task_ids: list[int]) -> torch.Tensor:
            if rank == 2:  # before any other rank finished
                raise RuntimeError("no such sample")
            return loss(task_ids)

        out["drop_loss_raises"] = expect_error((BaselineStepError,), lambda: baseline.backward(failing_first, 9))
        report = baseline.backward(loss, list(TASK_SIZES))
        out["drop_after_failure"] = len(report.contributors)
    # After close() on every rank no key of these instances' steps is left in the Store. Rank 0's
    # close() deletes failed steps' keys; without the barrier a rank could look before it has.
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    left = []
    for kind, name, steps, keys in (
        ("pulling", 0, PULL_STEPS, ("next", "gate", "arrived/0", "arrived/1", "arrived/2")),
        ("drop_slowest", 0, DROP_STEPS, ("order", "count", "gate")),
        ("pulling", 2, 3, ("next", "gate", "arrived/0", "arrived/1", "arrived/2")),  # 2 failed steps, then one
        ("drop_slowest", 3, 2, ("order", "count", "gate")),
    ):
        keys = [f"{t}/{what}" for t in range(steps) for what in keys]
        prefix = dist.PrefixStore(f"codedgrad-baselines/{kind}/{name}", store)
        left += [f"{kind}/{name}/{key}" for key in keys if prefix.check([key])]
    out["keys_left"] = left
    return out


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    result: dict = {}
    try:
        result["pulling"] = run_pulling(rank)
        result["drop"] = run_drop(rank)
        dist.barrier()  # the stalled rank's last steps are done before the failure scenarios begin
        result["failures"] = run_failures(rank)
    except Exception:
        result["crash"] = traceback.format_exc()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
