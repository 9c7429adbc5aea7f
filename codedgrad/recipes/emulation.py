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
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from codedgrad.emulate import Heterogeneity
from codedgrad.plan import capacity_time

__all__ = ["EmulatedDelay", "batch_len", "build_emulation", "fit_speeds", "per_task", "pooled_bound", "stalled_tasks"]

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
    step = the global step), as ``balanced`` draws them. The sleep is in ``on_before_backward``:
    inside the step, before the gradient all-reduce, so the other ranks wait for it in their
    backward, as they would for a slow device.

    Attributes:
        last_sample_seconds: the emulated delay of each sample of the last batch on this rank.
    """

    def __init__(self, het: Heterogeneity):
        super().__init__()
        self.het = het
        self.last_sample_seconds: list[float] = []
        self._batch_len = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._batch_len = batch_len(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        rank, step = trainer.global_rank, trainer.global_step
        self.last_sample_seconds = [self.het.task_delay(rank, step, i) for i in range(self._batch_len)]
        time.sleep(sum(self.last_sample_seconds))  # one sleep: fewer wake-ups than one per sample


def batch_len(batch: Any) -> int:
    """Samples in a batch (the first dimension of its first tensor)."""
    while isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if isinstance(batch, Mapping) and batch:
        return batch_len(next(iter(batch.values())))
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else 1
