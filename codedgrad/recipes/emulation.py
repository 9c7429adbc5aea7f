"""The ``cluster`` config group as a :class:`~codedgrad.emulate.Heterogeneity`, its ideal bound, and
the per-batch delay that makes a strategy without built-in emulation (plain ``ddp``) equally slow.

A cluster's ``base`` is the emulated time of one *sample* on a rank of speed 1: a unit every strategy
shares, whatever it calls a task. ``balanced`` and the recipe's own delay for ``ddp`` draw one delay
per sample; a strategy that draws one per task (``coded``: K tasks per global batch) gets the same
emulation scaled to its task size by :func:`per_task`, so every strategy emulates the same mean work.

A cluster profile names speeds for a fixed number of ranks (``hetero4``: 1, 1, 2, 4). A job with a
different world size gets a resized profile (logged): fewer ranks take speeds spread evenly over the
list, so the fastest and slowest stay; more ranks repeat the list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from codedgrad.emulate import FIELDS, EmulationMode, Heterogeneity
from codedgrad.plan import capacity_time

__all__ = ["EmulatedDelay", "batch_len", "build_emulation", "fit_speeds", "per_task", "pooled_bound", "stalled_tasks"]

log = logging.getLogger(__name__)

# A cluster config holds every Heterogeneity setting but the tests-only forced stalls.
_HETEROGENEITY_KEYS = tuple(name for name in FIELDS if name != "forced_stalls")


def fit_speeds(speeds: Sequence[float], world_size: int) -> tuple[float, ...]:
    """``speeds`` resized to ``world_size`` ranks: evenly spread picks when shorter, repeats when longer."""
    speeds = tuple(float(s) for s in speeds)
    if len(speeds) == world_size:
        return speeds
    if world_size < len(speeds):
        picks = np.round(np.linspace(0, len(speeds) - 1, world_size)).astype(int)
        return tuple(speeds[i] for i in picks)
    return tuple(speeds[i % len(speeds)] for i in range(world_size))


def build_emulation(cfg: Mapping[str, Any], world_size: int) -> Heterogeneity | None:
    """The emulation a ``cluster`` config group describes, for a job of ``world_size`` ranks.

    Args:
        cfg: ``enabled`` (default true), ``speeds`` (None: all 1), ``base`` and the other
            :class:`Heterogeneity` fields; ``forced_stalls`` entries for ranks beyond the job are dropped.
        world_size: ranks in the job.

    Returns:
        None when ``enabled`` is false, else the emulation (one speed per rank).
    """
    if not cfg.get("enabled", True):
        return None
    args = {k: cfg[k] for k in _HETEROGENEITY_KEYS if cfg.get(k) is not None}
    name = cfg.get("name", "cluster")
    speeds = args.get("speeds") or [1.0] * world_size
    args["speeds"] = fit_speeds(speeds, world_size)
    if "change_speeds" in args:
        args["change_speeds"] = fit_speeds(args["change_speeds"], world_size)
    if len(speeds) != world_size:
        log.warning(
            "cluster=%s describes %d ranks but the job has %d: using speeds %s",
            name,
            len(speeds),
            world_size,
            list(args["speeds"]),
        )
    stalls = [tuple(s) for s in cfg.get("forced_stalls") or () if s[0] < world_size]
    return Heterogeneity(**args, forced_stalls=tuple(stalls))


def per_task(het: Heterogeneity, samples_per_task: float) -> Heterogeneity:
    """The per-sample emulation ``het`` for a consumer that draws one delay per task of this many samples."""
    return replace(het, base=het.base * samples_per_task)


def pooled_bound(het: Heterogeneity, units: int, step: int = 0) -> float:
    """The ideal time of ``units`` emulated units of work on all ranks' pooled capacity: ``units / Σ_p 1/m_p``.

    ``m_p`` is rank p's mean emulated time per unit at ``step`` (speed changes applied, stalls included
    at their rate; docs/design.md, "The model"). It leaves out real compute and the all-reduce, so it bounds the
    emulated part of a step.
    """
    steady = replace(het, speeds=het.speeds_at(step), change_step=None, change_speeds=None, forced_stalls=())
    return capacity_time(steady.profiles(), units)


def stalled_tasks(het: Heterogeneity, rank: int, step: int, task_seconds: Sequence[float], limit: float) -> int:
    """How many of ``task_seconds`` took more than ``limit`` times ``rank``'s mean unit time at ``step``.

    ``limit`` is the stall ratio times the samples per task when the task times are of tasks.
    """
    threshold = limit * het.mean_task_time(rank, step)
    return sum(1 for t in task_seconds if t > threshold)


class EmulatedDelay(pl.Callback):
    """Sleeps on each rank, once per training batch, for the emulated time of its samples.

    For strategies that do not take ``emulate=`` (plain DDP): the delay is the sum of
    :meth:`Heterogeneity.task_delay` over the batch's samples (index = position in the rank's batch,
    step = the global step), as ``balanced`` draws them.

    * Sleep mode: the sleep is in ``on_before_backward``: inside the step, before the gradient
      all-reduce, so the other ranks wait for it in their backward, as they would for a slow device.
    * Compute mode: the delay scales the rank's forward and backward, measured from the batch's start
      to the moment its last gradient bucket is ready (``backward()`` also waits for the all-reduce,
      which is not compute). A DDP comm hook sleeps there, before that bucket's all-reduce starts;
      it is registered on the DDP module at fit start (``allreduce_hook``: DDP's own averaging).

    Attributes:
        last_sample_seconds: the emulated delay of each sample of the last batch on this rank.
    """

    def __init__(self, het: Heterogeneity):
        super().__init__()
        self.het = het
        self.last_sample_seconds: list[float] = []
        self._batch_len = 0
        self._hook = _DelayHookState()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.het.mode is not EmulationMode.COMPUTE:
            return
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise TypeError(
                f"EmulatedDelay: compute-mode emulation hooks DDP's gradient all-reduce, but the strategy's model "
                f"is a {type(model).__name__}; use strategy='ddp'"
            )
        self._hook.process_group = model.process_group
        model.register_comm_hook(self._hook, _delay_then_allreduce)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._batch_len = batch_len(batch)
        if self.het.mode is EmulationMode.COMPUTE:
            rank, step, start = trainer.global_rank, trainer.global_step, time.perf_counter()
            cuda = pl_module.device.type == "cuda"

            def delay() -> None:
                if cuda:
                    torch.cuda.current_stream().synchronize()  # the host runs ahead of the GPU
                share = (time.perf_counter() - start) / max(self._batch_len, 1)
                self._sleep([self.het.task_delay(rank, step, i, share) for i in range(self._batch_len)])

            self._hook.before_last = delay

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self.het.mode is EmulationMode.COMPUTE:
            return  # the comm hook sleeps, once the backward's compute is known
        rank, step = trainer.global_rank, trainer.global_step
        self._sleep([self.het.task_delay(rank, step, i) for i in range(self._batch_len)])

    def _sleep(self, sample_seconds: list[float]) -> None:
        self.last_sample_seconds = sample_seconds
        time.sleep(sum(sample_seconds))  # one sleep: fewer wake-ups than one per sample


class _DelayHookState:
    """State of :func:`_delay_then_allreduce`: the process group and this step's delay."""

    __slots__ = ("before_last", "process_group")

    def __init__(self) -> None:
        self.process_group: dist.ProcessGroup | None = None
        self.before_last: Callable[[], None] | None = None


# No annotations: register_comm_hook compares them with the real types, and this module's are strings.
def _delay_then_allreduce(state, bucket):
    """DDP's averaging all-reduce, after the emulated delay when the last bucket is ready."""
    if state.before_last is not None and bucket.is_last():
        before_last, state.before_last = state.before_last, None  # once per step
        before_last()
    return default_hooks.allreduce_hook(state.process_group, bucket)


def batch_len(batch: Any) -> int:
    """Samples in a batch (the first dimension of its first tensor)."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, Mapping) and batch:
        return batch_len(next(iter(batch.values())))
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 1
