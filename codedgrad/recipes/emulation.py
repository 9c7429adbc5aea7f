"""The ``cluster`` config group as a :class:`~codedgrad.emulate.Heterogeneity`, its ideal bound, and
the per-batch delay that makes a strategy without built-in emulation (plain ``ddp``) equally slow.

A cluster profile names speeds for a fixed number of ranks (``hetero4``: 1, 1, 2, 4). A job with a
different world size gets a resized profile (logged): fewer ranks take speeds spread evenly over the
list, so the fastest and slowest stay; more ranks repeat the list.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from codedgrad.emulate import Heterogeneity
from codedgrad.plan import capacity_time

__all__ = ["EmulatedDelay", "batch_len", "build_emulation", "fit_speeds", "pooled_bound", "stalled_tasks"]

log = logging.getLogger(__name__)

_HETEROGENEITY_KEYS = ("speeds", "base", "jitter", "stall_prob", "stall_factor", "seed", "change_step", "change_speeds")


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


def pooled_bound(het: Heterogeneity, num_tasks: int, step: int = 0) -> float:
    """The ideal step time: ``num_tasks`` tasks on all ranks' pooled capacity, ``K / Σ_p 1/m_p``.

    ``m_p`` is rank p's mean emulated task time at ``step`` (speed changes applied, stalls included
    at their rate; DESIGN.md §1). It leaves out real compute and the all-reduce, so it bounds the
    emulated part of a step.
    """
    steady = replace(het, speeds=het.speeds_at(step), change_step=None, change_speeds=None, forced_stalls=())
    return capacity_time(steady.profiles(), num_tasks)


def stalled_tasks(het: Heterogeneity, rank: int, step: int, task_seconds: Sequence[float], ratio: float) -> int:
    """How many of ``task_seconds`` took more than ``ratio`` times ``rank``'s mean task time at ``step``."""
    limit = ratio * het.mean_task_time(rank, step)
    return sum(1 for t in task_seconds if t > limit)


class EmulatedDelay(pl.Callback):
    """Sleeps on each rank, once per training batch, for the emulated time of its share of the tasks.

    For strategies that do not take ``emulate=`` (plain DDP): the rank's batch counts as
    ``round(len(batch) · num_tasks / global_batch)`` tasks, and the delay is the sum of their
    :meth:`Heterogeneity.task_delay` (the same draws a coded strategy would make for those tasks).
    The sleep is in ``on_before_backward``: inside the step, before the gradient all-reduce, so the
    other ranks wait for it in their backward, as they would for a slow device.

    Attributes:
        last_task_seconds: the emulated delay of each task of the last batch on this rank.
        last_tasks: how many tasks the last batch counted as.
    """

    def __init__(self, het: Heterogeneity, num_tasks: int, global_batch: int):
        super().__init__()
        self.het, self.num_tasks, self.global_batch = het, num_tasks, global_batch
        self.last_task_seconds: list[float] = []
        self.last_tasks = 0
        self._batch_len = global_batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._batch_len = batch_len(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        tasks = max(1, round(self._batch_len * self.num_tasks / self.global_batch))
        rank, step = trainer.global_rank, trainer.global_step
        self.last_task_seconds = [self.het.task_delay(rank, step, i) for i in range(tasks)]
        self.last_tasks = tasks
        time.sleep(sum(self.last_task_seconds))  # one sleep: fewer wake-ups than one per task


def batch_len(batch: Any) -> int:
    """Samples in a batch (the first dimension of its first tensor)."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, Mapping) and batch:
        return batch_len(next(iter(batch.values())))
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 1
