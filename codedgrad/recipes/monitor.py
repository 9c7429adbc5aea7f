"""``CodedMonitor``: step times, the ideal bound, per-rank work and figures in TensorBoard.

Every step, on every rank, the monitor times the training batch (``on_train_batch_start`` to
``on_train_batch_end``, local clock only: no collective) and logs ``perf/step_time``, ``perf/bound``
(the global batch's emulated work on the pooled capacity of all ranks, docs/design.md, "The model") and
``perf/bound_ratio`` through ``self.log``, so they reach Lightning's TensorBoardLogger and the
progress bar. The bound is an expectation: a lucky step can come in under it.

Per-rank values (tasks computed, used and purged, spare work, time waited, plan version, stalls seen)
are gathered to rank 0 every ``every_n_steps`` steps by one small ``all_gather`` of a fixed-size
tensor, and rank 0 writes them as ``rank{r}/…`` through the same logger. Why a gather and not one
event file per rank: the figures (the load split, a step's timeline by rank) need every rank's
numbers in one place anyway, one run in TensorBoard is easier to read than one per rank, and a
collective every N steps (never every step) costs little. The gathered steps are decided by the
step index alone, so every rank enters the same gathers.

What a strategy exposes is read with ``getattr`` and defaults, so any strategy works:

* ``last_report``: a :class:`~codedgrad.runtime.engine.StepReport`-like object (``computed``, ``used``,
  ``purged``, ``spare``, ``time_waited``, ``plan_version``, ``task_seconds``, ``emulated_seconds``,
  ``num_tasks``); without it (plain DDP, balanced) the rank's tasks are its share of the global batch
  (``len(batch) · K / global_batch``), nothing is purged and, when the recipe's own delay emulated
  them (plain DDP), the timeline shows the emulated delay of each sample and the time waited is the
  emulated delay of the slowest rank minus its own;
* ``profiles`` (a list of :class:`~codedgrad.profile.WorkerProfile`, one per rank), ``split`` (tasks
  per rank) or ``counts`` (samples per rank, as ``balanced`` has), and ``stalls_seen`` (per rank,
  cumulative). Without ``stalls_seen``, a stall is a task (or sample) that took more than
  ``stall_ratio`` times its rank's mean emulated time for it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger

from codedgrad.emulate import Heterogeneity
from codedgrad.recipes.emulation import EmulatedDelay, batch_len, pooled_bound, stalled_tasks

__all__ = ["MAX_TASKS", "RANK_FIELDS", "CodedMonitor"]

RANK_FIELDS = (
    "step_time",
    "computed",
    "used",
    "purged",
    "spare",
    "time_waited",
    "plan_version",
    "stalls_seen",
    "emulated_seconds",
)
"""Per-rank scalars, written as ``rank{r}/{field}``."""

MAX_TASKS = 512
"""Task times gathered per rank for the timeline figure (later tasks are left out of it)."""

_HEADER = len(RANK_FIELDS) + 1  # the fields, then how many task times follow


class CodedMonitor(pl.Callback):
    """Writes the step-time, bound, per-rank and figure logs described in the module docstring.

    Args:
        het: the emulation, per sample (None: no bound, no stall detection).
        num_tasks: tasks per global batch (K), for the bound and the ideal split.
        global_batch: samples per global batch, to count a rank's tasks when no report does.
        every_n_steps: gather and write per-rank scalars every this many steps (from step 0).
        figure_every_n_steps: draw the figures every this many steps (a multiple of ``every_n_steps``
            is best: figures are drawn only at gathered steps).
        stall_ratio: a task longer than this many times its rank's mean emulated task time is a stall.
        emulator: the :class:`EmulatedDelay` of a strategy without built-in emulation, if any.
    """

    def __init__(
        self,
        het: Heterogeneity | None,
        num_tasks: int,
        global_batch: int,
        every_n_steps: int = 10,
        figure_every_n_steps: int = 50,
        stall_ratio: float = 5.0,
        emulator: EmulatedDelay | None = None,
    ):
        super().__init__()
        if every_n_steps < 1 or figure_every_n_steps < 1:
            raise ValueError("monitor: every_n_steps and figure_every_n_steps must be >= 1")
        self.het, self.num_tasks, self.global_batch = het, num_tasks, global_batch
        self.every_n_steps, self.figure_every_n_steps = every_n_steps, figure_every_n_steps
        self.stall_ratio, self.emulator = stall_ratio, emulator
        self.stalls_seen = 0
        self._start, self._batch_len = 0.0, global_batch

    # -- every step, every rank, no communication ------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writer = _writer(trainer)
        if writer is not None and self.het is not None:
            writer.add_text("emulation", self.het.describe(), 0)  # timings are emulated: say so

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self._start = time.perf_counter()
        self._batch_len = batch_len(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step_time = time.perf_counter() - self._start
        step = trainer.global_step - 1  # the optimizer step that just finished
        report = getattr(trainer.strategy, "last_report", None)
        num_tasks = int(getattr(report, "num_tasks", self.num_tasks) or self.num_tasks)
        log = {"perf/step_time": step_time}
        if self.het is not None:
            bound = pooled_bound(self.het, self.global_batch, max(step, 0))
            log.update({"perf/bound": bound, "perf/bound_ratio": step_time / bound})
        for name, value in log.items():
            # sync_dist=False: rank 0's own clock; a collective per step would distort what is measured.
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=name != "perf/bound", batch_size=1)
        row = self._rank_row(trainer, report, num_tasks, step, step_time)
        if step >= 0 and step % self.every_n_steps == 0:
            rows = _gather(row, trainer.strategy.root_device)
            if trainer.global_rank == 0:
                self._write(trainer, rows, step)

    def _rank_row(self, trainer: pl.Trainer, report: Any, num_tasks: int, step: int, step_time: float) -> np.ndarray:
        """This rank's fields and task times as one fixed-size vector (NaN: not known)."""
        if report is not None:
            values = {f: float(getattr(report, f, math.nan)) for f in RANK_FIELDS[1:]}
            task_seconds = list(getattr(report, "task_seconds", []) or [])
            unit = self.global_batch / num_tasks  # samples per task: the stall limit scales with it
        else:
            task_seconds = list(self.emulator.last_sample_seconds) if self.emulator else []
            tasks = self._batch_len * num_tasks / self.global_batch
            values = dict.fromkeys(RANK_FIELDS[1:], math.nan)
            values.update(computed=tasks, used=tasks, purged=0.0, spare=0.0, plan_version=0.0)
            values["emulated_seconds"] = sum(task_seconds) if self.emulator else math.nan
            unit = 1.0  # the emulator's times are per sample
        reported_stalls = getattr(trainer.strategy, "stalls_seen", None)
        if reported_stalls is not None:
            self.stalls_seen = int(reported_stalls[trainer.global_rank])
        elif self.het is not None and step >= 0:
            limit = self.stall_ratio * unit
            self.stalls_seen += stalled_tasks(self.het, trainer.global_rank, step, task_seconds, limit)
        values.update(step_time=step_time, stalls_seen=float(self.stalls_seen))
        row = np.full(_HEADER + MAX_TASKS, math.nan)
        row[: len(RANK_FIELDS)] = [values[f] for f in RANK_FIELDS]
        kept = task_seconds[:MAX_TASKS]
        row[len(RANK_FIELDS)] = len(kept)
        row[_HEADER : _HEADER + len(kept)] = kept
        return row

    # -- rank 0, at gathered steps ----------------------------------------------------------------

    def _write(self, trainer: pl.Trainer, rows: np.ndarray, step: int) -> None:
        writer = _writer(trainer)
        if writer is None:
            return
        fields = {f: rows[:, i].copy() for i, f in enumerate(RANK_FIELDS)}
        if np.isnan(fields["time_waited"]).all() and not np.isnan(fields["emulated_seconds"]).any():
            # No report: a synchronous step waits for the slowest rank's emulated delay.
            fields["time_waited"] = fields["emulated_seconds"].max() - fields["emulated_seconds"]
        for name, values in fields.items():
            for rank, value in enumerate(values):
                if not math.isnan(value):
                    writer.add_scalar(f"rank{rank}/{name}", value, step)
        profiles = getattr(trainer.strategy, "profiles", None)
        for rank, profile in enumerate(profiles or ()):
            for attr in ("shift", "mean", "std"):
                writer.add_scalar(f"rank{rank}/profile_{attr}", float(getattr(profile, attr)), step)
        if step % self.figure_every_n_steps == 0:
            split = getattr(trainer.strategy, "split", None)
            counts = getattr(trainer.strategy, "counts", None)
            if split is None and counts is not None:  # samples per rank: in tasks, like the other bars
                split = np.asarray(counts, dtype=float) * self.num_tasks / self.global_batch
            task_seconds = [row[_HEADER : _HEADER + int(row[len(RANK_FIELDS)])] for row in rows]
            writer.add_figure("figures/load_split", self._split_figure(fields, split, step), step)
            # Without a report (plain DDP) the per-task times are the emulated delays; real compute is "rest".
            note = "" if getattr(trainer.strategy, "last_report", None) is not None else ": emulated, per sample"
            timeline = _timeline_figure(task_seconds, fields["step_time"], step, note)
            writer.add_figure("figures/timeline", timeline, step)

    def _split_figure(self, fields: dict[str, np.ndarray], split: Sequence[int] | None, step: int) -> Figure:
        """Bars per rank: tasks assigned (the plan's split), computed and used; the ideal share as a mark."""
        ranks = np.arange(len(fields["computed"]))
        series = {"computed": fields["computed"], "used": fields["used"]}
        if split is not None:
            series = {"assigned": np.asarray(split, dtype=float), **series}
        fig = Figure(figsize=(7.5, 3.5))  # no pyplot: no global figure registry, no display backend
        ax = fig.subplots()
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            ax.bar(ranks + (i - (len(series) - 1) / 2) * width, values, width, label=label)
        if self.het is not None:
            speeds = np.asarray(self.het.speeds_at(step))
            ideal = self.num_tasks * speeds / speeds.sum()
            ax.scatter(ranks, ideal, marker="_", s=600, color="black", label="speed-proportional", zorder=3)
        ax.set(xlabel="rank", ylabel="tasks", xticks=ranks, title=f"load split, step {step}")
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))  # beside the bars, not on them
        fig.tight_layout()
        return fig


def _timeline_figure(task_seconds: Sequence[np.ndarray], step_times: np.ndarray, step: int, note: str) -> Figure:
    """One row per rank: its tasks back to back from the step's start, then the rest of its step (hatched)."""
    fig = Figure(figsize=(7, 0.6 * len(task_seconds) + 1.5))
    ax = fig.subplots()
    for rank, (tasks, total) in enumerate(zip(task_seconds, step_times)):
        starts = np.concatenate([[0.0], np.cumsum(tasks)[:-1]]) if len(tasks) else np.zeros(0)
        ax.broken_barh(list(zip(starts, tasks)), (rank - 0.4, 0.8), facecolors="tab:blue", edgecolor="white")
        busy = float(np.sum(tasks))
        if total > busy:
            ax.broken_barh([(busy, total - busy)], (rank - 0.4, 0.8), facecolors="none", hatch="//", edgecolor="grey")
    ax.set(xlabel="seconds since the step started", ylabel="rank", yticks=range(len(task_seconds)))
    ax.set_title(f"step {step}: tasks (blue{note}) and the rest of the step (hatched)", fontsize="medium")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def _gather(row: np.ndarray, device: torch.device) -> np.ndarray:
    """Every rank's row, stacked (one all_gather; just this rank's row without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return row[None, :]
    local = torch.as_tensor(row, dtype=torch.float64, device=device)
    rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, local)
    return torch.stack(rows).cpu().numpy()


def _writer(trainer: pl.Trainer) -> Any:
    """The SummaryWriter of the trainer's TensorBoardLogger on rank 0, else None."""
    if trainer.global_rank != 0:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None
