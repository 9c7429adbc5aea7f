"""The soak: N ranks train for a given time under stalls, drift and injected faults, checking as they go.

``recipes/soak.py`` (Hydra, under torchrun) calls :func:`run`; docs/soak.md says how to read the
report. Each rank trains scikit-learn's digits with :class:`~codedgrad.recipes.models.DigitsCNN` in
fp64 through :class:`~codedgrad.CodedDataParallel` directly, on DDP's global batches
(:class:`~codedgrad.data.GlobalBatchSampler`, :class:`~codedgrad.data.TaskData`), while:

* the engine's EMULATED cluster (:class:`~codedgrad.emulate.Heterogeneity`) gives ranks unequal
  speeds, jitter, random stalls and one speed change (``change_step``); the soak adds further drift
  itself, since a Heterogeneity has one change: from ``drift.every`` steps on, one rank per phase of
  ``drift.every`` steps runs ``drift.factor`` times slower (an extra sleep in its tasks);
* :func:`injected_fault`, a pure function of (seed, step, rank, task), makes a task raise
  :class:`InjectedFault` or return a non-finite loss. The engine fails such a step on every rank
  (an exception: :class:`~codedgrad.runtime.CodedStepTimeout` naming it on the others; a used NaN:
  :class:`~codedgrad.runtime.NonFiniteGradientError` everywhere), or completes it everywhere when
  it was decided without the faulty work (the exception is then ``report.late_error``). The loop
  catches the error, skips the optimizer step and goes on: a *failed-and-recovered* step.

Every ``check_every`` steps the ranks exchange the outcome of each step since the last check and a
digest of their parameters (one ``all_gather_object``), and every rank judges them alike
(:func:`judge_window`): the same outcome of every step on every rank, every failure explained by
an injected fault, every injected exception either failing its step or reported late, the same
decoded loss, bitwise-identical parameters. Every ``verify_every`` steps rank 0 recomputes the
step's global-batch gradient and loss in one process and compares. A watchdog counts a step (or a
check) longer than ``hang_seconds`` as a hang: it dumps every thread's stack and fails the run.
Every ``sample_every`` seconds each rank samples the Store's key count, its RSS and its threads.
"""

from __future__ import annotations

import copy
import datetime
import enum
import faulthandler
import hashlib
import itertools
import json
import logging
import math
import os
import re
import statistics
import sys
import threading
import time
import tracemalloc
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from codedgrad.data import GlobalBatchSampler, TaskData
from codedgrad.emulate import Heterogeneity
from codedgrad.recipes.models import DigitsCNN
from codedgrad.runtime import CodedDataParallel, CodedStepTimeout, NonFiniteGradientError

__all__ = [
    "InjectedFault",
    "Outcome",
    "SoakConfig",
    "injected_fault",
    "judge_window",
    "parse_duration",
    "run",
    "store_key_bound",
]

log = logging.getLogger("codedgrad.soak")


# -- configuration ---------------------------------------------------------------------------------

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string like ``"90"``, ``"90s"``, ``"30m"``, ``"1.5h"``.

    Raises:
        ValueError: anything else, or a duration that is not > 0.
    """
    if isinstance(value, bool):
        raise ValueError(f"duration: must be seconds or a string like 30m, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(value))
        if match is None:
            raise ValueError(f"duration: must be seconds or a string like 90s, 30m, 1h; got {value!r}")
        seconds = float(match.group(1)) * _UNITS.get(match.group(2) or "s", 1.0)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"duration: must be > 0, got {value!r}")
    return seconds


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise ValueError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class EngineSettings:
    """The engine's arguments the soak exposes (the rest are CodedDataParallel's defaults)."""

    redundancy: float | str = "auto"
    code: str = "repetition"
    timeout: float = 20.0
    replan_every: int = 20
    max_steps_ahead: int = 4
    spare_work: bool | str = True  # exercised on purpose, whatever "auto" would resolve to

    def __post_init__(self) -> None:
        _positive("engine.timeout", self.timeout)
        _positive("engine.replan_every", self.replan_every, allow_zero=True)
        _positive("engine.max_steps_ahead", self.max_steps_ahead)


@dataclass
class EmulationSettings:
    """The engine's emulated cluster; ``speeds`` and ``change_speeds`` repeat to the world size."""

    speeds: list[float] = field(default_factory=lambda: [1.0, 1.0, 2.0, 4.0])
    base: float = 0.02
    jitter: float = 0.5
    stall_prob: float = 0.01
    stall_factor: float = 25.0
    change_step: int | None = 1000
    change_speeds: list[float] | None = field(default_factory=lambda: [4.0, 2.0, 1.0, 1.0])

    def build(self, world_size: int, seed: int) -> Heterogeneity:
        """The :class:`Heterogeneity` for ``world_size`` ranks (it validates every field)."""

        def fit(speeds: Sequence[float]) -> list[float]:
            return [float(speeds[r % len(speeds)]) for r in range(world_size)]

        return Heterogeneity(
            speeds=fit(self.speeds), base=self.base, jitter=self.jitter, stall_prob=self.stall_prob,
            stall_factor=self.stall_factor, seed=seed, change_step=self.change_step,
            change_speeds=None if self.change_speeds is None else fit(self.change_speeds),
        )  # fmt: skip


@dataclass
class DriftSettings:
    """From step ``every`` on, one rank per phase of ``every`` steps runs ``factor`` times slower."""

    every: int = 400
    factor: float = 3.0

    def __post_init__(self) -> None:
        _positive("drift.every", self.every, allow_zero=True)
        if not (isinstance(self.factor, (int, float)) and self.factor >= 1):
            raise ValueError(f"drift.factor: must be >= 1, got {self.factor!r}")


@dataclass
class FaultSettings:
    """Probabilities, per task a rank computes, of an injected exception and of a non-finite loss."""

    exception_prob: float = 0.001
    nonfinite_prob: float = 0.001

    def __post_init__(self) -> None:
        for name in ("exception_prob", "nonfinite_prob"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"faults.{name}: must be in [0, 1], got {value!r}")
        if self.exception_prob + self.nonfinite_prob > 1:
            raise ValueError("faults: exception_prob + nonfinite_prob must be <= 1")


@dataclass
class CheckSettings:
    """How often and how strictly the soak checks."""

    check_every: int = 10  # steps between outcome exchanges and parameter checksums
    verify_every: int = 25  # steps between single-process recomputations on rank 0
    tolerance: float = 1e-10  # relative error of a verified gradient and loss (fp64)
    sample_every: float = 10.0  # seconds between resource samples
    warmup: float = 60.0  # seconds before the resource baselines
    hang_seconds: float = 120.0  # a step or check longer than this is a hang
    rss_growth_mb: float = 50.0  # allowed RSS growth after warm-up, per rank
    trace_memory: bool = False  # tracemalloc: where Python memory grew after warm-up (slow; a diagnosis)

    def __post_init__(self) -> None:
        for name in ("check_every", "verify_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"checks.{name}: must be an integer >= 1, got {value!r}")
        for name in ("tolerance", "sample_every", "hang_seconds", "rss_growth_mb"):
            _positive(f"checks.{name}", getattr(self, name))
        _positive("checks.warmup", self.warmup, allow_zero=True)


@dataclass
class SoakConfig:
    """The soak's configuration (``conf/soak.yaml``), validated on construction.

    Args:
        duration: how long to train: seconds, or a string like ``"30m"`` (parsed to seconds).
        max_steps: stop after this many steps too (0: no limit).
        seed: seeds the model, the data order, the emulation and the faults.
        batch_size: per rank, as with DDP; a global batch is ``batch_size × world size`` samples.
        tasks_per_rank: K = ``tasks_per_rank × world size`` tasks per step.
        channels: the CNN's two convolution widths.
        lr, momentum: SGD.
    """

    duration: float | str = 180.0
    max_steps: int = 0
    seed: int = 0
    batch_size: int = 8
    tasks_per_rank: int = 4
    channels: list[int] = field(default_factory=lambda: [8, 16])
    lr: float = 0.05
    momentum: float = 0.9
    engine: EngineSettings = field(default_factory=EngineSettings)
    emulate: EmulationSettings = field(default_factory=EmulationSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)
    faults: FaultSettings = field(default_factory=FaultSettings)
    checks: CheckSettings = field(default_factory=CheckSettings)

    def __post_init__(self) -> None:
        self.duration = parse_duration(self.duration)
        for name, minimum in (("max_steps", 0), ("seed", 0), ("batch_size", 1), ("tasks_per_rank", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
        if self.tasks_per_rank > self.batch_size:
            raise ValueError(f"tasks_per_rank: at most batch_size ({self.batch_size}) (a task holds >= 1 sample)")
        if len(self.channels) != 2:
            raise ValueError(f"channels: need two convolution widths, got {self.channels!r}")
        _positive("lr", self.lr)
        _positive("momentum", self.momentum, allow_zero=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SoakConfig:
        """Build from the composed Hydra config (plain dicts); an unknown key is an error naming it."""
        groups = {
            "engine": EngineSettings, "emulate": EmulationSettings, "drift": DriftSettings,
            "faults": FaultSettings, "checks": CheckSettings,
        }  # fmt: skip
        args: dict[str, Any] = {}
        for key, value in data.items():
            if key in groups:
                try:
                    args[key] = groups[key](**dict(value or {}))
                except TypeError as error:
                    raise ValueError(f"{key}: {error}") from None
            elif key in cls.__dataclass_fields__:
                args[key] = value
            else:
                raise ValueError(f"{key}: unknown setting of the soak")
        return cls(**args)


# -- faults and drift ------------------------------------------------------------------------------


class InjectedFault(RuntimeError):
    """The exception the soak makes a task raise."""


class Outcome(str, enum.Enum):
    """What a step came to on one rank."""

    OK = "ok"  # applied (an injected exception may have come late: report.late_error)
    EXCEPTION = "exception"  # failed everywhere because a task raised InjectedFault
    NONFINITE = "nonfinite"  # failed everywhere because the decoded gradient was not finite
    OTHER = "other"  # failed for a reason the soak did not inject: a wrong result


def injected_fault(seed: int, step: int, rank: int, task: int, faults: FaultSettings) -> Outcome:
    """The fault injected into ``task`` when ``rank`` computes it at ``step`` (OK: none).

    A pure function of its arguments, so a run can be replayed and every rank can tell what any
    rank injected.
    """
    draw = np.random.default_rng([seed, 0x50AC, step, rank, task]).random()
    if draw < faults.exception_prob:
        return Outcome.EXCEPTION
    if draw < faults.exception_prob + faults.nonfinite_prob:
        return Outcome.NONFINITE
    return Outcome.OK


def drift_factor(seed: int, step: int, rank: int, world_size: int, drift: DriftSettings) -> float:
    """How many times slower than its emulated speed ``rank`` runs at ``step`` (1: no drift)."""
    if drift.every == 0 or step < drift.every:
        return 1.0
    phase = step // drift.every
    slow = int(np.random.default_rng([seed, 0xD71F, phase]).integers(world_size))
    return float(drift.factor) if rank == slow else 1.0


def classify(error: BaseException) -> Outcome:
    """The outcome of a step whose ``backward`` raised ``error`` on this rank."""
    if isinstance(error, InjectedFault):
        return Outcome.EXCEPTION
    if isinstance(error, NonFiniteGradientError):
        return Outcome.NONFINITE
    if isinstance(error, CodedStepTimeout) and InjectedFault.__name__ in str(error):
        return Outcome.EXCEPTION  # abandoned by the rank whose task raised it
    return Outcome.OTHER


# -- judging what the ranks did --------------------------------------------------------------------


@dataclass
class StepLog:
    """One rank's account of one step, exchanged at the next check."""

    step: int
    outcome: str
    injected: list[str]  # kinds of faults this rank injected at this step (Outcome values)
    late_error: bool  # backward returned, with an InjectedFault in report.late_error
    loss: str  # float.hex() of the decoded loss; "" when not finite or not available
    error: str = ""  # the error's text when the step failed

    def to_list(self) -> list:
        return [self.step, self.outcome, self.injected, self.late_error, self.loss, self.error]

    @classmethod
    def from_list(cls, values: Sequence) -> StepLog:
        return cls(*values)


@dataclass
class Verdict:
    """What :func:`judge_window` found: counts and the problems (each a wrong result)."""

    steps: int = 0
    ok: int = 0
    failed: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome if o is not Outcome.OK})
    late_errors: int = 0
    unused_nonfinite: int = 0  # a non-finite loss injected into a result the decoder did not use
    checksums: int = 0
    checksum_mismatches: int = 0
    lost_steps: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, other: Verdict) -> None:
        self.steps += other.steps
        self.ok += other.ok
        for key, value in other.failed.items():
            self.failed[key] += value
        for name in ("late_errors", "unused_nonfinite", "checksums", "checksum_mismatches", "lost_steps"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.problems.extend(other.problems)


def judge_window(logs: Sequence[Sequence[StepLog]], digests: Sequence[str], first_step: int) -> Verdict:
    """Judge the steps since the last check, from every rank's logs (rank order) and parameter digests.

    Every rank calls this on the same gathered data, so every rank reaches the same verdict.

    Args:
        logs: per rank, its :class:`StepLog` of each step from ``first_step`` on, in order.
        digests: per rank, the digest of its parameters after the last of those steps.
        first_step: the first step of the window.
    """
    verdict = Verdict(checksums=1)
    if len(set(digests)) != 1:
        verdict.checksum_mismatches = 1
        verdict.problems.append(f"parameters differ across ranks after step {first_step + len(logs[0]) - 1}: {digests}")
    lengths = {len(rank_logs) for rank_logs in logs}
    if len(lengths) != 1:
        verdict.problems.append(f"ranks logged different numbers of steps from step {first_step}: {sorted(lengths)}")
    for i in range(min(lengths)):
        step = first_step + i
        entries = [rank_logs[i] for rank_logs in logs]
        verdict.steps += 1
        if any(entry.step != step for entry in entries):
            verdict.lost_steps += 1
            verdict.problems.append(f"step {step}: ranks logged steps {[e.step for e in entries]} (a step lost)")
            continue
        outcomes = [entry.outcome for entry in entries]
        injected = {kind for entry in entries for kind in entry.injected}
        if len(set(outcomes)) != 1:
            verdict.problems.append(f"step {step}: ranks disagree on its outcome: {outcomes} ({_errors(entries)})")
            continue
        outcome = Outcome(outcomes[0])
        if outcome is Outcome.OK:
            verdict.ok += 1
            for rank, entry in enumerate(entries):
                if Outcome.EXCEPTION.value in entry.injected and not entry.late_error:
                    verdict.problems.append(
                        f"step {step}: rank {rank}'s task raised, yet the step completed without a late error"
                    )
                verdict.late_errors += entry.late_error
            verdict.unused_nonfinite += Outcome.NONFINITE.value in injected
            losses = {entry.loss for entry in entries if entry.loss}
            if len(losses) > 1:
                verdict.problems.append(f"step {step}: ranks decoded different losses: {sorted(losses)}")
            continue
        verdict.failed[outcome.value] += 1
        if outcome is Outcome.OTHER or outcome.value not in injected:
            verdict.lost_steps += 1
            verdict.problems.append(
                f"step {step}: failed on every rank as {outcome.value!r} with no such fault injected "
                f"(injected: {sorted(injected) or 'none'}; {_errors(entries)})"
            )
    return verdict


def _errors(entries: Sequence[StepLog]) -> str:
    return "; ".join(f"rank {r}: {e.error[:200]}" for r, e in enumerate(entries) if e.error) or "no errors"


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of the bytes of every parameter and buffer, in order (equal iff bitwise equal)."""
    digest = hashlib.sha256()
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def store_key_bound(base: int, world_size: int, max_steps_ahead: int, failure_run: int) -> int:
    """The most Store keys the engine may hold at once, from its clean-up rules (coordinator.py).

    A step holds ``W + 3`` keys (state, decided, gate, one arrival per rank), deleted right after
    its coded all-reduce. Steps in flight: the release may serve up to ``max_steps_ahead`` steps
    ahead of the slowest compute thread, plus the step being cleaned up. A failed step's keys stay
    until the next step that succeeds, so a run of ``failure_run`` failures adds as many steps. A
    profile exchange holds ``W + 1`` keys until every rank is past it; at most three are alive
    (published, collected, being deleted). ``base``: the keys before the first step (torchrun's,
    the process groups', the engine's configuration).
    """
    per_step = world_size + 3
    return base + per_step * (max_steps_ahead + 2 + failure_run) + 3 * (world_size + 1) + 2


# -- resources -------------------------------------------------------------------------------------


def _proc_status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return -1


@dataclass
class Sample:
    """One rank's resources at one moment."""

    seconds: float  # since the soak started
    steps: int
    failed: int
    store_keys: int
    rss_mb: float
    threads: int  # threading.active_count()
    os_threads: int  # Threads in /proc/self/status


def _os_threads() -> int:
    """This process's OS threads, the least of three reads 10 ms apart.

    A thread that was joined a moment ago (a step's prefetch thread) can still be exiting in the
    kernel; a leaked thread stays in all three reads.
    """
    counts = []
    for _ in range(3):
        counts.append(_proc_status("Threads"))
        time.sleep(0.01)
    return min(counts)


def take_sample(start: float, steps: int, failed: int, store: dist.Store) -> Sample:
    return Sample(
        seconds=round(time.monotonic() - start, 3), steps=steps, failed=failed, store_keys=store.num_keys(),
        rss_mb=round(_proc_status("VmRSS") / 1024, 2), threads=threading.active_count(),
        os_threads=_os_threads(),
    )  # fmt: skip


def resource_summary(samples: Sequence[Sample], warmup: float) -> dict[str, Any]:
    """RSS and threads at start, after warm-up and at the end, and the RSS slope after warm-up (MB/h)."""
    after = [s for s in samples if s.seconds >= warmup] or list(samples)
    first, base, last = samples[0], after[0], samples[-1]
    slope = 0.0
    if len(after) >= 3 and after[-1].seconds > after[0].seconds:
        t = np.array([s.seconds for s in after]) / 3600.0
        slope = float(np.polyfit(t, np.array([s.rss_mb for s in after]), 1)[0])
    return {
        "rss_mb": {"start": first.rss_mb, "after_warmup": base.rss_mb, "end": last.rss_mb,
                   "max_after_warmup": max(s.rss_mb for s in after), "slope_mb_per_hour": round(slope, 2)},
        "threads": {"start": first.threads, "after_warmup": base.threads, "end": last.threads,
                    "min_after_warmup": min(s.threads for s in after),
                    "max_after_warmup": max(s.threads for s in after)},
        "os_threads": {"start": first.os_threads, "after_warmup": base.os_threads, "end": last.os_threads,
                       "min_after_warmup": min(s.os_threads for s in after),
                       "max_after_warmup": max(s.os_threads for s in after)},
        "store_keys": {"min_after_warmup": min(s.store_keys for s in after),
                       "max_after_warmup": max(s.store_keys for s in after),
                       "max": max(s.store_keys for s in samples)},
        "samples_after_warmup": len(after),
    }  # fmt: skip


# -- the hang watchdog -----------------------------------------------------------------------------


class Watchdog:
    """Counts a step (or check) that lasts longer than ``seconds`` as a hang.

    It then writes every thread's stack (:mod:`faulthandler`) to ``hang_rank{r}.txt`` and stderr,
    calls ``on_hang`` (rank 0 writes a report saying so) and ends the process with status 3 (torchrun
    then stops the other ranks). Not ``faulthandler.dump_traceback_later``: re-armed every step, it
    starts an OS thread each time, which the soak's thread count would catch still exiting.
    """

    def __init__(self, seconds: float, rank: int, out: Path, on_hang: Callable[[str], None]) -> None:
        self.seconds, self.rank, self.out, self.on_hang = seconds, rank, out, on_hang
        self._lock = threading.Lock()
        self._what: str | None = None
        self._since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="soak-watchdog", daemon=True)
        self._thread.start()

    def enter(self, what: str) -> None:
        with self._lock:
            self._what, self._since = what, time.monotonic()

    def leave(self) -> None:
        with self._lock:
            self._what = None

    def close(self) -> None:
        self.leave()
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                what, elapsed = self._what, time.monotonic() - self._since
            if what is not None and elapsed > self.seconds:
                self._fire(what, elapsed)

    def _fire(self, what: str, elapsed: float) -> None:
        message = f"HANG: rank {self.rank}: {what} has run {elapsed:.0f} s (hang_seconds={self.seconds:g})"
        path = self.out / f"hang_rank{self.rank}.txt"
        with open(path, "w") as file:
            file.write(message + "\n")
            file.flush()
            faulthandler.dump_traceback(file, all_threads=True)
        print(message + f"; every thread's stack in {path}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(sys.stderr, all_threads=True)
        try:
            self.on_hang(message)
        finally:
            os._exit(3)


# -- the run ---------------------------------------------------------------------------------------


def load_digits_fp64() -> TensorDataset:
    """scikit-learn's digits (pixels / 16) in fp64, as the recipes' ``data=digits`` (train and val together).

    Read here rather than through :mod:`codedgrad.recipes.datamodules`, whose Lightning import
    costs seconds of every launch.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return TensorDataset(
        torch.tensor(digits.images / 16.0, dtype=torch.float64), torch.tensor(digits.target, dtype=torch.long)
    )


class _Injector:
    """The task loss with the soak's faults and drift, and what it injected in the current step."""

    def __init__(self, cfg: SoakConfig, rank: int, world_size: int, het: Heterogeneity) -> None:
        self.cfg, self.rank, self.world_size, self.het = cfg, rank, world_size, het
        self.step = 0
        self.injected: set[str] = set()
        self.slowdown = 1.0

    def begin(self, step: int) -> None:
        self.step, self.injected = step, set()
        self.slowdown = drift_factor(self.cfg.seed, step, self.rank, self.world_size, self.cfg.drift)

    def task_loss(self, model: torch.nn.Module, data: TaskData) -> Callable[[int], torch.Tensor]:
        def loss_of(task: int) -> torch.Tensor:
            x, y = data[task]
            loss = F.cross_entropy(model(x), y)
            if self.slowdown > 1:  # the soak's drift, on top of the engine's emulated delay
                time.sleep((self.slowdown - 1) * self.het.mean_task_time(self.rank, self.step))
            fault = injected_fault(self.cfg.seed, self.step, self.rank, task, self.cfg.faults)
            if fault is not Outcome.OK:
                self.injected.add(fault.value)
            if fault is Outcome.EXCEPTION:
                raise InjectedFault(f"injected by the soak: step {self.step}, rank {self.rank}, task {task}")
            if fault is Outcome.NONFINITE:
                return loss * float("nan")
            return loss

        return loss_of


class _MemoryTrace:
    """With ``trace_memory``: where Python allocations grew between the end of warm-up and the end."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._base: tracemalloc.Snapshot | None = None
        if enabled:
            tracemalloc.start(1)  # one frame: comparing deeper tracebacks takes minutes

    def after_warmup(self, warm: bool) -> None:
        if self.enabled and warm and self._base is None:
            self._base = tracemalloc.take_snapshot()

    def growth(self, top: int = 12) -> list[str] | None:
        """The ``top`` allocation sites by growth since warm-up (None when not tracing)."""
        if not self.enabled or self._base is None:
            return None
        stats = tracemalloc.take_snapshot().compare_to(self._base, "lineno")
        tracemalloc.stop()
        lines = []
        for stat in stats[:top]:
            where = " <- ".join(f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}" for frame in stat.traceback)
            lines.append(f"{stat.size_diff / 1024:+.1f} KiB in {stat.count_diff:+d} blocks: {where}")
            log.info("memory growth after warm-up: %s", lines[-1])
        return lines


def _relative_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    num = math.sqrt(sum(float((g - w).pow(2).sum()) for g, w in zip(got, want)))
    den = math.sqrt(sum(float(w.pow(2).sum()) for w in want))
    return num / den if den > 0 else num


def run(cfg: SoakConfig, out: Path) -> bool:
    """Soak on every rank of the initialised default process group; True if the verdict is PASS.

    Rank 0 prints the summary table and writes ``out/soak.json``.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    het = cfg.emulate.build(world, cfg.seed)
    checks = cfg.checks
    torch.manual_seed(cfg.seed)
    model = DigitsCNN(10, tuple(cfg.channels)).double()
    dataset = load_digits_fp64()
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, world, seed=cfg.seed, drop_last=True)
    num_tasks = cfg.tasks_per_rank * world
    injector = _Injector(cfg, rank, world, het)
    # The engine's late-error warning names the step, so each is a new entry in the warnings
    # registry; the soak counts them from report.late_error instead.
    warnings.filterwarnings("ignore", message=r"codedgrad: rank \d+: InjectedFault", category=RuntimeWarning)

    # torch's own Store keys for a new process group's rendezvous (the engine's release makes one):
    # they stay after the group is destroyed, so they are part of the baseline, not the engine's.
    dist.barrier()
    keys_before = store.num_keys()
    dist.barrier()
    dist.destroy_process_group(dist.new_group(backend="gloo"))
    dist.barrier()
    group_keys = store.num_keys() - keys_before
    dist.barrier()
    keys_before = store.num_keys()
    dist.barrier()

    total = Verdict()
    state: dict[str, Any] = {"step": 0}
    samples: list[Sample] = []
    verified: list[dict[str, float]] = []
    step_seconds: deque[float] = deque(maxlen=4096)  # the latest steps' times (bounded: the soak measures growth)
    longest_step = 0.0
    ahead_steps = 0
    failure_run = longest_failure_run = 0

    def on_hang(message: str) -> None:
        if rank == 0:
            partial = {"verdict": f"FAIL: {message}", "hangs": 1, "steps": state["step"], "totals": asdict(total),
                       "config": asdict(cfg), "samples": [asdict(s) for s in samples]}  # fmt: skip
            (out / "soak.json").write_text(json.dumps(partial, indent=1) + "\n")

    watchdog = Watchdog(checks.hang_seconds, rank, out, on_hang)
    cdp = CodedDataParallel(
        model, redundancy=cfg.engine.redundancy, code=cfg.engine.code, emulate=het, timeout=cfg.engine.timeout,
        replan_every=cfg.engine.replan_every, max_steps_ahead=cfg.engine.max_steps_ahead,
        spare_work=cfg.engine.spare_work,
    )  # fmt: skip
    # Before the clock starts: the first optimizer imports parts of torch that take seconds to load.
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    keys_engine = store.num_keys()  # with the engine's configuration and its release group
    start = time.monotonic()  # the soak's clock starts at its first step
    memory = _MemoryTrace(checks.trace_memory)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    samples.append(take_sample(start, 0, 0, store))
    if rank == 0:
        log.info("%s", het.describe())
        log.info("soaking %d ranks for %.0f s: K=%d tasks of %d samples, faults %s, drift %s", world, cfg.duration,
                 num_tasks, cfg.batch_size * world // num_tasks, asdict(cfg.faults), asdict(cfg.drift))  # fmt: skip

    window: list[StepLog] = []
    window_start = 0
    verify_due = 0
    next_sample = start + checks.sample_every
    batches: list[list[int]] = []
    step = 0
    failed_steps = 0
    stop = False
    try:
        while not stop:
            epoch, position = divmod(step, len(sampler))
            if position == 0:
                sampler.set_epoch(epoch)
                batches = list(sampler)
            indices = batches[position]
            reference = copy.deepcopy(model) if rank == 0 and step >= verify_due else None
            opt.zero_grad()
            injector.begin(step)
            state["step"] = step
            watchdog.enter(f"step {step}")
            began = time.perf_counter()
            entry = StepLog(step, Outcome.OK.value, [], False, "")
            report = None
            with TaskData(dataset, indices, num_tasks) as data:
                data.prefetch(cdp.planned_tasks())
                try:
                    report = cdp.backward(injector.task_loss(model, data), data.weights)
                except Exception as error:  # every failure is judged, none is fatal here
                    entry.outcome = classify(error).value
                    entry.error = f"{type(error).__name__}: {error}"[:500]
            watchdog.leave()
            step_seconds.append(time.perf_counter() - began)
            longest_step = max(longest_step, step_seconds[-1])
            entry.injected = sorted(injector.injected)
            if cdp.step_index != step + 1:
                entry.outcome = Outcome.OTHER.value
                entry.error = f"the engine's step index is {cdp.step_index} after step {step}"
            if report is not None:
                entry.late_error = bool(report.late_error) and InjectedFault.__name__ in report.late_error
                entry.loss = report.loss.hex() if math.isfinite(report.loss) else ""
                ahead_steps += report.ahead
                failure_run = 0
                if reference is not None:
                    verified.append(_verify(reference, model, dataset, indices, report.loss))
                    verify_due = step + checks.verify_every
                opt.step()
            else:
                failed_steps += 1
                failure_run += 1
                longest_failure_run = max(longest_failure_run, failure_run)
                if entry.outcome == Outcome.OTHER.value:
                    log.error("step %d failed: %s", step, entry.error)
            window.append(entry)
            step += 1

            if step % checks.check_every == 0:
                watchdog.enter(f"the check after step {step - 1}")
                want_stop = time.monotonic() - start >= cfg.duration or (0 < cfg.max_steps <= step)
                mine = [[e.to_list() for e in window], parameter_digest(model), want_stop]
                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, mine)
                watchdog.leave()
                verdict = judge_window(
                    [[StepLog.from_list(e) for e in g[0]] for g in gathered], [g[1] for g in gathered], window_start
                )
                total.add(verdict)
                for problem in verdict.problems:
                    log.error("WRONG: %s", problem)
                stop = any(g[2] for g in gathered) or bool(verdict.problems)
                window, window_start = [], step
            now = time.monotonic()
            memory.after_warmup(now - start >= checks.warmup)
            if now >= next_sample or stop:
                samples.append(take_sample(start, step, failed_steps, store))
                next_sample = now + checks.sample_every
                if rank == 0 and not stop:
                    log.info("%.0f s: %d steps, %d failed and recovered; keys %d, RSS %.1f MB, threads %d",
                             now - start, step, failed_steps, samples[-1].store_keys, samples[-1].rss_mb,
                             samples[-1].threads)  # fmt: skip
        elapsed = time.monotonic() - start
        plan_version = cdp.plan_version
        redundancy = cdp.plan.redundancy if cdp.plan is not None else None
    finally:
        watchdog.enter("closing the engine")
        cdp.close()
        watchdog.leave()
    growth = memory.growth()
    watchdog.enter("the final exchange")
    dist.barrier()
    keys_after_close = store.num_keys()
    dist.barrier()
    mine = {
        "resources": resource_summary(samples, checks.warmup),
        "samples": [asdict(s) for s in samples],
        "verified": verified,
        "ahead_steps": ahead_steps,
        "median_step_ms": 1e3 * statistics.median(step_seconds) if step_seconds else None,  # of the latest 4096
        "max_step_s": longest_step,
        "plan_version": plan_version,
        "redundancy": redundancy,
        "memory_growth": growth,
        "keys": {"before_engine": keys_before, "with_engine": keys_engine, "torch_group_keys": group_keys,
                 "after_close": keys_after_close, "longest_failure_run": longest_failure_run},
    }  # fmt: skip
    gathered_ranks: list[Any] = [None] * world
    dist.all_gather_object(gathered_ranks, mine)
    watchdog.close()
    # Every rank judges rank 0's key counts (taken between barriers, but for the engine's, taken just
    # after its construction), so every rank reaches the same verdict and exit status.
    keys = dict(gathered_ranks[0]["keys"])
    keys["bound"] = store_key_bound(keys["with_engine"], world, cfg.engine.max_steps_ahead, longest_failure_run)
    report_data = _report(cfg, het, world, total, gathered_ranks, elapsed, started_at, keys)
    if rank == 0:
        (out / "soak.json").write_text(json.dumps(report_data, indent=1) + "\n")
        print(summary_table(report_data), flush=True)
        log.info("written: %s", out / "soak.json")
    return report_data["verdict"] == "PASS"


def _verify(
    reference: torch.nn.Module, model: torch.nn.Module, dataset: TensorDataset, indices: Sequence[int], loss: float
) -> dict[str, float]:
    """Rank 0: the global batch's gradient and loss in one process against the decoded ones."""
    x, y = dataset[list(indices)]
    reference.zero_grad(set_to_none=True)
    want_loss = F.cross_entropy(reference(x), y)
    want_loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    got = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in reference.parameters() if p.requires_grad]
    loss_error = abs(loss - want_loss.item()) / abs(want_loss.item()) if math.isfinite(loss) else 0.0
    return {"gradient": _relative_error(got, want), "loss": loss_error, "loss_decoded": math.isfinite(loss)}


def _report(
    cfg: SoakConfig,
    het: Heterogeneity,
    world: int,
    total: Verdict,
    ranks: Sequence[dict[str, Any]],
    elapsed: float,
    started_at: str,
    keys: dict[str, int],
) -> dict[str, Any]:
    """The soak's JSON report, with its verdict."""
    checks = cfg.checks
    verified = [v for r in ranks for v in r["verified"]]
    max_error = max((max(v["gradient"], v["loss"]) for v in verified), default=None)
    key_max = max(r["resources"]["store_keys"]["max"] for r in ranks)
    failures: list[str] = []
    if total.problems:
        failures.append(f"{len(total.problems)} wrong result(s), first: {total.problems[0]}")
    if total.checksum_mismatches:
        failures.append(f"{total.checksum_mismatches} parameter checksum mismatch(es)")
    if not verified:
        failures.append("no step was verified against one process")
    elif max_error is not None and max_error > checks.tolerance:
        failures.append(f"a verified step is off by {max_error:.3g} (tolerance {checks.tolerance:g})")
    if key_max > keys["bound"]:
        failures.append(f"the Store held {key_max} keys, above the bound of {keys['bound']}")
    expected_after = keys["before_engine"] + keys["torch_group_keys"]
    if keys["after_close"] != expected_after:
        failures.append(f"{keys['after_close']} Store keys after close(), expected {expected_after}")
    for rank, r in enumerate(ranks):
        res = r["resources"]
        growth = res["rss_mb"]["max_after_warmup"] - res["rss_mb"]["after_warmup"]
        if growth > checks.rss_growth_mb:
            failures.append(f"rank {rank}: RSS grew {growth:.1f} MB after warm-up (limit {checks.rss_growth_mb:g})")
        for kind in ("threads", "os_threads"):
            if res[kind]["min_after_warmup"] != res[kind]["max_after_warmup"]:
                failures.append(f"rank {rank}: {kind} varied after warm-up: {res[kind]}")
    return {
        "verdict": "PASS" if not failures else "FAIL: " + "; ".join(failures),
        "started_at": started_at,
        "seconds": round(elapsed, 1),
        "world_size": world,
        "steps": total.steps,
        "steps_ok": total.ok,
        "failed_and_recovered": {k: v for k, v in total.failed.items() if k != Outcome.OTHER.value},
        "failed_other": total.failed[Outcome.OTHER.value],
        "late_errors": total.late_errors,
        "unused_nonfinite": total.unused_nonfinite,
        "hangs": 0,
        "wrong": len(total.problems),
        "lost_steps": total.lost_steps,
        "problems": total.problems[:50],
        "checksums": {"compared": total.checksums, "mismatches": total.checksum_mismatches},
        "verified": {"steps": len(verified), "max_rel_error": max_error, "tolerance": checks.tolerance},
        "store_keys": {**keys, "max": key_max,
                       "min_after_warmup": min(r["resources"]["store_keys"]["min_after_warmup"] for r in ranks),
                       "max_after_warmup": max(r["resources"]["store_keys"]["max_after_warmup"] for r in ranks)},
        "ranks": [{k: v for k, v in r.items() if k not in ("samples", "verified", "keys")} for r in ranks],
        "samples": [r["samples"] for r in ranks],
        "emulation": het.describe(),
        "config": asdict(cfg),
    }  # fmt: skip


def summary_table(report: Mapping[str, Any]) -> str:
    """The report as a few lines of text (what rank 0 prints)."""
    failed = report["failed_and_recovered"]
    keys = report["store_keys"]
    rows = [
        ("soaked", f"{report['seconds']:.0f} s on {report['world_size']} ranks"),
        ("steps", f"{report['steps']} ({report['steps_ok']} applied)"),
        ("failed and recovered", f"{sum(failed.values())} (exception {failed['exception']}, "
                                 f"non-finite {failed['nonfinite']}); other failures {report['failed_other']}"),
        ("late errors", f"{report['late_errors']} (injected exceptions after the decision, step completed)"),
        ("hangs", str(report["hangs"])),
        ("wrong results", f"{report['wrong']} (lost steps {report['lost_steps']})"),
        ("checksums", f"{report['checksums']['compared']} compared, {report['checksums']['mismatches']} mismatched"),
        ("verified steps", f"{report['verified']['steps']}, max rel. error {report['verified']['max_rel_error']}"),
        ("Store keys", f"{keys['min_after_warmup']}-{keys['max_after_warmup']} after warm-up (bound {keys['bound']}); "
                       f"{keys['after_close']} after close ({keys['before_engine']} before)"),
    ]  # fmt: skip
    for rank, r in enumerate(report["ranks"]):
        res = r["resources"]
        rss, threads = res["rss_mb"], res["os_threads"]
        rows.append(
            (f"rank {rank}", f"RSS {rss['start']:.0f}/{rss['after_warmup']:.0f}/{rss['end']:.0f} MB "
                             f"(start/warm/end, {rss['slope_mb_per_hour']:+.1f} MB/h), threads "
                             f"{threads['start']}/{threads['after_warmup']}/{threads['end']}, "
                             f"median step {r['median_step_ms']:.0f} ms, {r['ahead_steps']} ahead")
        )  # fmt: skip
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(["soak: EMULATED cluster (" + report["emulation"] + ")", *lines, f"verdict: {report['verdict']}"])
