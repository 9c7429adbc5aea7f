"""The pieces of ``recipes/bench.py``: workloads, strategies behind one interface, the ideal bound.

Every strategy computes the same global batch of K equal tasks per step, through
``batch_loss(task_ids) -> mean loss over those tasks' samples`` (equal tasks: the mean of their
means). A :class:`Workload` builds that function for any forward callable (a DDP wrapper, a bare
module), for step ``s``'s global batch (a seeded draw of ``K · samples_per_task`` training samples).

Strategies (:data:`STRATEGIES`), each an object with ``module`` and ``backward(loss_for) -> StepInfo``
where ``loss_for(model)`` returns ``batch_loss`` computed through ``model``:

* ``ddp``: torch's DistributedDataParallel, K/P tasks per rank as one batch;
* ``balanced``: the same with per-rank task counts from the batch-size-aware optimal split
  (:func:`balanced_counts`), exact through the coded hook's sample counts;
* ``coded``: :class:`~codedgrad.CodedDataParallel` with its defaults (repetition, ``redundancy="auto"``,
  ``spare_work="auto"``);
* ``cyclic``: ``CodedDataParallel(code="cyclic", redundancy=2)`` (rank-level MDS, s = 1);
* ``drop_slowest``: :class:`~codedgrad.baselines.DropSlowest` (one backup rank; inexact);
* ``pulling``: :class:`~codedgrad.baselines.DynamicPulling` (chunks from a shared counter, no plan).

The DDP strategies emulate the cluster like the engine (:mod:`codedgrad.emulate`, compute mode): a
rank's delay scales its forward and backward measured up to the moment its last gradient bucket is
ready, and is slept in that bucket's comm hook, before its all-reduce (``backward()`` itself also
waits for the other ranks, which is not compute).
"""

from __future__ import annotations

import copy
import math
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from codedgrad import CodedDataParallel, baselines
from codedgrad.emulate import Heterogeneity
from codedgrad.lightning._timed_hook import TimedHookState, timed_coded_hook
from codedgrad.recipes.datamodules import build_datamodule
from codedgrad.recipes.models import build_model
from codedgrad.runtime import CodedHookState

__all__ = [
    "EXACT",
    "STRATEGIES",
    "CostCurve",
    "StepInfo",
    "Workload",
    "balanced_counts",
    "build_strategy",
    "ideal_bound",
    "load_cluster",
    "measure_allreduce",
    "measure_compute",
    "relative_error",
]

STRATEGIES = ("ddp", "balanced", "coded", "cyclic", "drop_slowest", "pulling")
EXACT = frozenset(STRATEGIES) - {"drop_slowest"}
"""Strategies whose gradient must equal a single process's on the same global batch."""

BatchLoss = Callable[[list[int]], torch.Tensor]
LossFor = Callable[[Callable[..., torch.Tensor]], BatchLoss]


# -- workloads -----------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model and its data, cut into global batches of ``num_tasks`` equal tasks.

    Args:
        name: label in reports (e.g. ``"cnn"``).
        model: the network (every strategy trains a deep copy).
        kind: ``"classification"`` or ``"text"`` (cross-entropy over every position).
        x, y: training inputs and targets.
        val_x, val_y: validation inputs and targets.
        num_tasks: K, tasks per global batch.
        samples_per_task: samples in a task.
        seed: the global batches' seed.
    """

    name: str
    model: nn.Module
    kind: str
    x: torch.Tensor
    y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_tasks: int
    samples_per_task: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_tasks < 1 or self.samples_per_task < 1:
            raise ValueError(
                f"num_tasks and samples_per_task: must be >= 1, got {self.num_tasks}, {self.samples_per_task}"
            )
        if self.global_batch > len(self.x):
            raise ValueError(
                f"num_tasks x samples_per_task: a global batch of {self.global_batch} samples is more than the "
                f"{len(self.x)} training samples"
            )

    @property
    def global_batch(self) -> int:
        """Samples per step (``num_tasks · samples_per_task``)."""
        return self.num_tasks * self.samples_per_task

    def indices(self, step: int) -> torch.Tensor:
        """Step ``step``'s global batch: epochs of a seeded permutation, a batch's samples in task order."""
        per_epoch = len(self.x) // self.global_batch
        epoch, position = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
        chosen = order[position * self.global_batch : (position + 1) * self.global_batch]
        return torch.as_tensor(chosen, dtype=torch.long)

    def loss_for(self, step: int) -> LossFor:
        """``loss_for(model)``: step ``step``'s ``batch_loss(task_ids)`` computed through ``model``."""
        rows = self.indices(step).view(self.num_tasks, self.samples_per_task)

        def loss_for(model: Callable[..., torch.Tensor]) -> BatchLoss:
            def batch_loss(task_ids: list[int]) -> torch.Tensor:
                index = rows[torch.as_tensor(list(task_ids), dtype=torch.long)].reshape(-1)
                out = model(self.x[index])
                return F.cross_entropy(out.reshape(-1, out.shape[-1]), self.y[index].reshape(-1))

            return batch_loss

        return loss_for

    @torch.no_grad()
    def accuracy(self, module: nn.Module) -> float:
        """Validation accuracy (next-character accuracy for text)."""
        out = module(self.val_x)
        return float((out.argmax(-1) == self.val_y).float().mean())


def build_workload(cfg: Mapping[str, Any], seed: int = 0) -> Workload:
    """A :class:`Workload` from a config entry: ``model``, ``data``, ``num_tasks``, ``samples_per_task``."""
    data = build_datamodule(dict(cfg["data"]), seed=seed)
    torch.manual_seed(seed)
    model = build_model(dict(cfg["model"]), data.describe())
    train, val = data.train_set, data.val_set
    x, y = train.tensors
    val_x, val_y = val.tensors
    return Workload(
        str(cfg["model"]["name"]),
        model,
        data.kind,
        x,
        y,
        val_x,
        val_y,
        int(cfg["num_tasks"]),
        int(cfg["samples_per_task"]),
        seed,
    )


# -- measuring compute and the ideal bound -------------------------------------------------------


@dataclass(frozen=True)
class CostCurve:
    """Measured forward+backward seconds of a batch of ``n`` tasks, for a few ``n``; interpolated between.

    Args:
        sizes: the measured task counts, increasing.
        seconds: the median time of each.
    """

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"sizes: must be increasing and match seconds, got {self.sizes} and {self.seconds}")

    def __call__(self, n: float) -> float:
        """Seconds for ``n`` tasks: linear between measured sizes, proportional beyond them."""
        if n <= 0:
            return 0.0
        if n >= self.sizes[-1]:
            return self.seconds[-1] * n / self.sizes[-1]
        if n <= self.sizes[0]:
            return self.seconds[0] * n / self.sizes[0]
        return float(np.interp(n, self.sizes, self.seconds))

    def best_throughput(self) -> tuple[int, float]:
        """``(n, tasks per second)`` at the measured size with the highest throughput."""
        rates = [n / s for n, s in zip(self.sizes, self.seconds)]
        best = int(np.argmax(rates))
        return self.sizes[best], rates[best]


def measure_compute(module: nn.Module, workload: Workload, sizes: Sequence[int], repeats: int = 5) -> CostCurve:
    """This rank's forward+backward seconds for batches of each of ``sizes`` tasks (median of ``repeats``).

    Every rank measures at the same time (a barrier before each size), so the measurement sees the
    same sharing of the machine's cores as the benchmark.
    """
    model = copy.deepcopy(module)
    loss_for = workload.loss_for(0)(model)
    times: dict[int, list[float]] = {n: [] for n in sizes}
    for i in range(repeats + 1):
        for n in sizes:  # sizes interleaved: a slow spell of the machine hits every size alike
            dist.barrier()
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss_for(list(range(n))).backward()
            if i > 0:  # the first round warms the allocations up
                times[n].append(time.perf_counter() - start)
    return CostCurve(tuple(int(n) for n in sizes), tuple(float(np.median(times[n])) for n in sizes))


def measure_allreduce(module: nn.Module, repeats: int = 10) -> float:
    """Median seconds of one all-reduce of a gradient-sized float tensor over the world."""
    flat = torch.zeros(sum(p.numel() for p in module.parameters() if p.requires_grad))
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(flat)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def unit_factors(het: Heterogeneity, step: int | None = None) -> list[float]:
    """Each rank's mean emulated time of a task as a multiple of its real compute (slowdown × noise mean)."""
    return [p.mean / het.base for p in het.profiles(step)]


def ideal_bound(curve: CostCurve, factors: Sequence[float], num_tasks: int, allreduce: float) -> float:
    """The ideal step: K tasks on the pooled capacity, each rank at its best batch size, plus one all-reduce.

    Rank r's throughput is its best measured tasks per second divided by its factor (s_max/s_r times
    the noise mean, stalls included); the bound is ``K / Σ_r throughput_r + allreduce``.
    """
    _, best = curve.best_throughput()
    return num_tasks / sum(best / f for f in factors) + allreduce


def balanced_counts(curve: CostCurve, factors: Sequence[float], num_tasks: int) -> list[int]:
    """Per-rank task counts that minimise the slowest rank's predicted time ``curve(n_r) · factor_r``.

    Batch-size aware: the predicted time of ``n`` tasks is the measured (interpolated) cost of a batch
    of ``n``, not ``n`` times a task's. Greedy from one task each (DDP needs a non-empty batch on every
    rank): the next task goes where it ends soonest, which is optimal for increasing costs.
    """
    if num_tasks < len(factors):
        raise ValueError(f"num_tasks: need at least one task per rank ({len(factors)}), got {num_tasks}")
    counts = [1] * len(factors)
    for _ in range(num_tasks - len(factors)):
        r = min(range(len(factors)), key=lambda q: (curve(counts[q] + 1) * factors[q], q))
        counts[r] += 1
    return counts


def predicted_step(curve: CostCurve, factors: Sequence[float], counts: Sequence[int], allreduce: float) -> float:
    """The mean-model step time of a static split: the slowest rank's ``curve(n_r) · factor_r`` plus the all-reduce."""
    return max(curve(n) * f for n, f in zip(counts, factors)) + allreduce


# -- strategies ----------------------------------------------------------------------------------


@dataclass
class StepInfo:
    """What one rank saw of one step of a strategy."""

    seconds: float
    report: Any = None
    extra: dict[str, float] = field(default_factory=dict)


class DDPStep:
    """DistributedDataParallel over a static split: this rank's ``counts[rank]`` tasks as one batch.

    Exact for any counts: the coded hook weights each rank's mean gradient by its task count. With an
    emulation, the last bucket's hook sleeps the emulated delay of this rank's batch, scaled from its
    compute up to then (compute mode; sleep mode ignores it), before that bucket's all-reduce.
    """

    def __init__(self, module: nn.Module, counts: Sequence[int], het: Heterogeneity | None) -> None:
        self.module = module
        self.counts = list(counts)
        rank = dist.get_rank()
        self._rank, self._het, self._step = rank, het, 0
        self._ddp = DistributedDataParallel(module)
        self._state = TimedHookState(CodedHookState(sample_counts=self.counts))
        self._ddp.register_comm_hook(self._state, timed_coded_hook)
        first = sum(self.counts[:rank])
        self._tasks = list(range(first, first + self.counts[rank]))

    def backward(self, loss_for: LossFor) -> StepInfo:
        """One step: forward and backward of this rank's tasks; ``p.grad`` is the global batch's gradient."""
        start = time.perf_counter()
        if self._het is not None:
            het, rank, step, count = self._het, self._rank, self._step, len(self._tasks)
            self._state.before_last = lambda: het.sleep_batch(
                rank, step, count, compute_seconds=time.perf_counter() - start
            )
        loss_for(self._ddp)(self._tasks).backward()
        self._step += 1
        return StepInfo(time.perf_counter() - start)

    def close(self) -> None:
        """Nothing to end: DDP needs no clean-up."""


class EngineStep:
    """A :class:`~codedgrad.CodedDataParallel` (``coded``, ``cyclic``) or a baseline with the same shape."""

    def __init__(self, engine: Any, num_tasks: int) -> None:
        self.engine, self.module, self.num_tasks = engine, engine.module, num_tasks

    def backward(self, loss_for: LossFor) -> StepInfo:
        """One step of the engine; its report is kept in :attr:`StepInfo.report`."""
        start = time.perf_counter()
        batch_loss = loss_for(self.module)
        if isinstance(self.engine, CodedDataParallel):  # a rank's tasks in a few chunks (micro-batches)
            report = self.engine.backward(tasks=self.num_tasks, batch_loss=batch_loss)
        else:
            report = self.engine.backward(batch_loss, self.num_tasks)
        info = StepInfo(time.perf_counter() - start, report)
        plan = getattr(self.engine, "plan", None)
        if plan is not None:
            info.extra["redundancy"] = float(plan.redundancy)
        return info

    def close(self) -> None:
        """End the engine's release thread and its process group."""
        self.engine.close()


def build_strategy(
    name: str,
    module: nn.Module,
    het: Heterogeneity,
    num_tasks: int,
    balanced: Sequence[int],
    engine_args: Mapping[str, Any] | None = None,
) -> DDPStep | EngineStep:
    """Build strategy ``name`` (one of :data:`STRATEGIES`) around ``module``; collective: every rank calls it.

    Args:
        name: the strategy.
        module: its own copy of the model.
        het: the emulated cluster (compute mode).
        num_tasks: K.
        balanced: the ``balanced`` strategy's per-rank task counts.
        engine_args: extra keyword arguments for the ``coded`` engine (e.g. ``replan_every``).
    """
    world = dist.get_world_size()
    if name == "ddp":
        return DDPStep(module, [num_tasks // world + (r < num_tasks % world) for r in range(world)], het)
    if name == "balanced":
        return DDPStep(module, balanced, het)
    args = dict(engine_args or {})
    if name == "coded":
        return EngineStep(CodedDataParallel(module, redundancy="auto", emulate=het, **args), num_tasks)
    if name == "cyclic":
        return EngineStep(CodedDataParallel(module, code="cyclic", redundancy=2, emulate=het, **args), num_tasks)
    if name in ("drop_slowest", "pulling"):
        timeout = float(args.get("timeout", 300.0))
        if name == "drop_slowest":
            return EngineStep(baselines.DropSlowest(module, backups=1, emulate=het, timeout=timeout), num_tasks)
        return EngineStep(baselines.DynamicPulling(module, emulate=het, timeout=timeout), num_tasks)
    raise ValueError(f"strategies: unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")


# -- exactness -----------------------------------------------------------------------------------


def reference_gradient(module: nn.Module, loss_for: LossFor, num_tasks: int) -> list[torch.Tensor]:
    """The gradient a single process computes on the whole global batch, with ``module``'s parameters."""
    twin = copy.deepcopy(module)
    twin.zero_grad(set_to_none=True)
    loss_for(twin)(list(range(num_tasks))).backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in twin.parameters()]


def relative_error(module: nn.Module, reference: Sequence[torch.Tensor]) -> float:
    """``‖g − g_ref‖ / ‖g_ref‖`` of ``module``'s ``p.grad`` against ``reference``."""
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()]
    diff = math.sqrt(sum(float((g.double() - r.double()).pow(2).sum()) for g, r in zip(grads, reference)))
    norm = math.sqrt(sum(float(r.double().pow(2).sum()) for r in reference))
    return diff / norm if norm > 0 else diff


# -- clusters ------------------------------------------------------------------------------------


def load_cluster(name: str, conf_dir: Path) -> dict[str, Any]:
    """``conf/cluster/<name>.yaml`` with its ``defaults`` chain merged (later entries win), as a dict."""
    path = conf_dir / "cluster" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / "cluster").glob("*.yaml"))
        raise ValueError(f"profiles: no cluster {name!r} in {conf_dir / 'cluster'} (known: {', '.join(known)})")
    raw = yaml.safe_load(path.read_text()) or {}
    merged: dict[str, Any] = {}
    defaults = raw.pop("defaults", ["_self_"])
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    for entry in defaults:
        merged.update(raw if entry == "_self_" else load_cluster(str(entry), conf_dir))
    return merged


def code_provenance() -> dict[str, Any]:
    """Which codedgrad this process imported: its directory, and the git commit of that tree.

    A benchmark records it with its results, so a number can be traced to its code. It also shows a
    mistake that is easy to make with an editable install: a script run from another checkout (a
    snapshot of an older commit) still imports the installed tree unless ``PYTHONPATH`` names its own.
    ``commit`` and ``dirty`` (uncommitted changes under the package) are None outside a git checkout.
    """
    import codedgrad

    package = Path(codedgrad.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".") if commit is not None else None
    return {"package": str(package), "commit": commit, "dirty": None if status is None else bool(status)}
