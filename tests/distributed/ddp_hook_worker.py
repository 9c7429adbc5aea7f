"""torchrun worker for tests/test_ddp_hook.py: the coded all-reduce as a DDP comm hook, 3 ranks, gloo.

Ranks process 2, 5 and 9 samples of a 16-sample global batch (fixed-seed data every rank regenerates)
with a small float64 model. For each of three DDP set-ups, a few SGD steps are run and, at every
step, the gradient DDP leaves in ``p.grad`` is compared with single-process references computed on
this rank at the same parameters:

* ``counts``: coded hook with ``sample_counts=[2, 5, 9]`` on the default group;
* ``coefficient``: coded hook with an explicit coefficient ``n_rank / 16`` on a ``new_group``;
* ``plain``: DDP without a hook (divides by the world size: the wrong gradient with unequal batches).

Tiny buckets force several buckets per step; DDP rebuilds them after the first iteration, so each
set-up runs several steps. Also checked: parameters bitwise identical across ranks, the SGD trajectory
against a single-process one, :func:`coded_allreduce_` on its own, and the hook state's lazy validation.

The hook's agreement check, each scenario with a fresh DDP model (a step that fails ends it):

* ``differ``: rank 2 passes other sample counts from the start;
* ``one_changes``: every rank agrees for three steps (past the bucket rebuild), then rank 1 alone
  changes its counts: every rank must fail at that step, also those whose counts did not change;
* ``all_change``: every rank changes its counts (and batch sizes) together: no error, still exact;
* ``mixed``: rank 0 uses an explicit coefficient, the others sample counts;
* ``wrong_length``: rank 2's counts (given before the process group existed) have 2 entries;
* ``branches``: two parallel branches run in a rank-dependent order, so gradients become ready in
  different orders on different ranks; DDP must still launch buckets in index order.

Usage: ``torchrun --nproc-per-node 3 ddp_hook_worker.py OUT_DIR``; writes ``OUT_DIR/rank{r}.json``.
"""

# No ``from __future__ import annotations``: DDP's register_comm_hook rejects string annotations.
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from codedgrad.runtime import CodedHookState, coded_allreduce_, coded_allreduce_hook

BATCH_SIZES = (2, 5, 9)
GLOBAL_BATCH = sum(BATCH_SIZES)
IN_FEATURES, HIDDEN, OUT_FEATURES = 4, 6, 3
STEPS = 4
LR = 0.1
# 51 float64 parameters = 408 bytes; a 200-byte cap gives DDP more than one bucket.
BUCKET_CAP_MB = 200 / 2**20


def make_model() -> nn.Module:
    torch.manual_seed(0)  # same initial parameters on every rank and in the references
    return nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT_FEATURES)).double()


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's 16-sample global batch; every rank regenerates the same one."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=generator, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, OUT_FEATURES, generator=generator, dtype=torch.float64)
    return x, y


def rank_slice(rank: int) -> slice:
    start = sum(BATCH_SIZES[:rank])
    return slice(start, start + BATCH_SIZES[rank])


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the per-sample squared error."""
    return ((output - target) ** 2).sum(dim=1).mean()


def gradient(state: dict, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Single-process gradient of the mean loss over (x, y) at parameters ``state``."""
    model = make_model()
    model.load_state_dict(state)
    loss_fn(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    diff = sum(float((g - w).pow(2).sum()) for g, w in zip(got, want, strict=True))
    norm = sum(float(w.pow(2).sum()) for w in want)
    return (diff / norm) ** 0.5


def flat_parameters(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_setup(rank: int, state: CodedHookState | None) -> dict:
    """A few SGD steps of DDP (with the coded hook if ``state`` is given); errors per step."""
    model = make_model()
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB)
    buckets: list[list[int]] = [[] for _ in range(STEPS)]
    launches: list[list[list]] = [[] for _ in range(STEPS)]  # (index, is_last) in launch order
    current_step = [0]
    if state is not None:

        def hook(hook_state: CodedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
            buckets[current_step[0]].append(bucket.buffer().numel())  # record how DDP buckets
            launches[current_step[0]].append([bucket.index(), bucket.is_last()])
            return coded_allreduce_hook(hook_state, bucket)

        ddp.register_comm_hook(state, hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    reference = make_model()  # the single-process trajectory on the whole global batch
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=LR)

    exact_errors, average_errors = [], []
    for step in range(STEPS):
        current_step[0] = step
        x, y = global_batch(step)
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        exact = gradient(params, x, y)
        # What plain DDP computes: the unweighted mean of the ranks' local mean-loss gradients.
        local = [gradient(params, x[rank_slice(r)], y[rank_slice(r)]) for r in range(len(BATCH_SIZES))]
        average = [sum(parts) / len(BATCH_SIZES) for parts in zip(*local, strict=True)]

        optimizer.zero_grad(set_to_none=True)
        mine = rank_slice(rank)
        loss_fn(ddp(x[mine]), y[mine]).backward()
        got = [p.grad.detach().clone() for p in model.parameters()]
        exact_errors.append(relative_error(got, exact))
        average_errors.append(relative_error(got, average))
        optimizer.step()

        reference_optimizer.zero_grad(set_to_none=True)
        loss_fn(reference(x), y).backward()
        reference_optimizer.step()

    flat = flat_parameters(model)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    trajectory_error = float((flat - flat_parameters(reference)).norm() / flat_parameters(reference).norm())
    return {
        "exact_errors": exact_errors,
        "average_errors": average_errors,
        "trajectory_error": trajectory_error,
        "identical_across_ranks": all(torch.equal(g, gathered[0]) for g in gathered),
        "parameter_sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        "bucket_numels": buckets,
        "bucket_launches": launches,
    }


def error_line(error: BaseException) -> str:
    """The hook's one-line message out of what DDP raises (it may wrap it in a longer text)."""
    text = str(error)
    for line in text.splitlines():
        if "sample_counts:" in line:
            return line[line.index("sample_counts:") :]
    return text.splitlines()[0] if text else type(error).__name__


class Branches(nn.Module):
    """Two parallel linear branches, run in an order that depends on ``swap``.

    Autograd runs the later-created branch's backward first, so ``swap`` changes the order in which
    the branches' gradients become ready (and DDP's buckets fill).
    """

    def __init__(self, swap: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(IN_FEATURES, OUT_FEATURES).double()
        self.b = nn.Linear(IN_FEATURES, OUT_FEATURES).double()
        self.c = nn.Linear(IN_FEATURES, OUT_FEATURES).double()
        self.swap = swap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swap:
            return self.c(x) + self.b(x) + self.a(x)
        return self.a(x) + self.b(x) + self.c(x)


def run_scenario(
    rank: int,
    state: CodedHookState,
    steps: int,
    sizes_at: Callable[[int], Sequence[int]] = lambda step: BATCH_SIZES,
    before_step: Callable[[int, CodedHookState], None] | None = None,
    swap: bool | None = None,
) -> dict:
    """SGD steps of DDP with the coded hook until one fails; per step the error (or None) and the gradient error.

    Args:
        rank: this rank.
        state: the hook state (this rank's weights).
        steps: the most steps to run.
        sizes_at: the per-rank batch sizes of a step (summing to the global batch).
        before_step: called before each step's forward, e.g. to change the sample counts.
        swap: run the :class:`Branches` model with this branch order instead of the MLP.
    """
    model = make_model() if swap is None else Branches(swap)
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_CAP_MB)
    launches: list[list[list]] = []

    def hook(hook_state: CodedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        launches[-1].append([bucket.index(), bucket.is_last()])
        return coded_allreduce_hook(hook_state, bucket)

    ddp.register_comm_hook(state, hook)
    names = {id(p): name for name, p in model.named_parameters()}
    ready: list[list[str]] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: ready[-1].append(names[id(p)]))
    optimizer = torch.optim.SGD(ddp.parameters(), lr=LR)
    errors: list[str | None] = []
    exact_errors: list[float] = []
    for step in range(steps):
        if before_step is not None:
            before_step(step, state)
        sizes = list(sizes_at(step))
        x, y = global_batch(step)
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if swap is None:
            exact = gradient(params, x, y)
        else:
            reference = Branches(swap)
            reference.load_state_dict(params)
            loss_fn(reference(x), y).backward()
            exact = [p.grad.detach().clone() for p in reference.parameters()]
        optimizer.zero_grad(set_to_none=True)
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        launches.append([])
        ready.append([])
        try:
            loss_fn(ddp(x[mine]), y[mine]).backward()
        except (RuntimeError, ValueError) as error:
            errors.append(error_line(error))
            break
        errors.append(None)
        exact_errors.append(relative_error([p.grad.detach().clone() for p in model.parameters()], exact))
        optimizer.step()
    return {"errors": errors, "exact_errors": exact_errors, "bucket_launches": launches, "ready_order": ready}


def check_agreement(rank: int, wrong_length_state: CodedHookState) -> dict:
    """The agreement check's scenarios (see the module docstring)."""
    counts = list(BATCH_SIZES)
    rotated = BATCH_SIZES[1:] + BATCH_SIZES[:1]  # (5, 9, 2): also a 16-sample global batch

    def one_changes(step: int, state: CodedHookState) -> None:
        if step == 3 and rank == 1:
            state.set_sample_counts([2, 6, 9])

    def all_change(step: int, state: CodedHookState) -> None:
        if step == 2:
            state.set_sample_counts(list(rotated))

    return {
        "differ": run_scenario(rank, CodedHookState(sample_counts=[2, 5, 10] if rank == 2 else counts), 2),
        "one_changes": run_scenario(rank, CodedHookState(sample_counts=counts), 5, before_step=one_changes),
        "all_change": run_scenario(
            rank,
            CodedHookState(sample_counts=counts),
            4,
            sizes_at=lambda step: rotated if step >= 2 else BATCH_SIZES,
            before_step=all_change,
        ),
        "mixed": run_scenario(
            rank,
            CodedHookState(coefficient=BATCH_SIZES[0] / GLOBAL_BATCH)
            if rank == 0
            else CodedHookState(sample_counts=counts),
            2,
        ),
        "wrong_length": run_scenario(
            rank, wrong_length_state if rank == 2 else CodedHookState(sample_counts=counts), 2
        ),
        "branches": run_scenario(rank, CodedHookState(sample_counts=counts), STEPS, swap=rank % 2 == 1),
    }


def check_coded_allreduce(rank: int) -> dict:
    """coded_allreduce_ alone: a negative coefficient, and a 0 coefficient that drops a NaN."""
    tensor = torch.full((5,), float(rank + 1), dtype=torch.float64)
    coded_allreduce_(tensor, coefficient=float(rank - 1))  # Σ (r+1)(r−1) over r = 0, 1, 2 = 2
    poisoned = torch.full((5,), float("nan") if rank == 0 else float(rank), dtype=torch.float64)
    coded_allreduce_(poisoned, coefficient=0.0 if rank == 0 else 0.5)  # 0.5·1 + 0.5·2 = 1.5
    return {"weighted_sum": tensor.tolist(), "nan_dropped": poisoned.tolist()}


def main() -> None:
    out_dir = Path(sys.argv[1])
    # Constructed before the process group exists: the length check must wait until first use.
    lazy_state = CodedHookState(sample_counts=[1, 2])
    wrong_length_state = CodedHookState(sample_counts=[2, 14])  # rank 2's, in the agreement check
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    assert dist.get_world_size() == len(BATCH_SIZES), "run with --nproc-per-node 3"

    result: dict = {"rank": rank}
    try:
        _ = lazy_state.coefficient
        result["lazy_error"] = None
    except ValueError as error:
        result["lazy_error"] = str(error)
    try:
        CodedHookState(sample_counts=[1, 2])
        result["eager_error"] = None
    except ValueError as error:
        result["eager_error"] = str(error)

    counts_state = CodedHookState(sample_counts=list(BATCH_SIZES))
    result["counts_coefficient"] = counts_state.coefficient
    result["counts"] = run_setup(rank, counts_state)
    group = dist.new_group(list(range(dist.get_world_size())))
    result["coefficient"] = run_setup(rank, CodedHookState(group, coefficient=BATCH_SIZES[rank] / GLOBAL_BATCH))
    result["plain"] = run_setup(rank, None)
    result["allreduce"] = check_coded_allreduce(rank)
    result["agreement"] = check_agreement(rank, wrong_length_state)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
