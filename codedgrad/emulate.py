"""Heterogeneity and straggler *emulation* for tests and benchmarks (docs/design.md#emulation).

One CPU machine cannot show real heterogeneity: all ranks share the same cores. This module makes
ranks look unequal and noisy by adding a seeded delay after the real compute of every task:

* rank r's mean emulated task time is ``base / speeds[r]``; a share ``jitter`` of it is exponential
  and the rest fixed (a shifted exponential, the paper's task-time model);
* with probability ``stall_prob`` a task takes ``stall_factor`` times its mean instead (a straggler);
* from step ``change_step`` on the speeds become ``change_speeds`` (a node slowing down mid-run);
* ``forced_stalls`` add a fixed extra delay to one rank's first task of one step, so a test can say
  "rank 2 stalls 2 s on step 5" without relying on chance.

The delay of ``(rank, step, task index)`` is a pure function of the configuration: it does not depend
on what the other ranks do, on the order of calls or on timing, so a run can be replayed exactly.

**The same cluster for plain DDP.** :class:`~codedgrad.CodedDataParallel` sleeps
:meth:`Heterogeneity.task_delay` after its i-th task of a step. A plain DDP loop that processes a
rank's share of ``n`` tasks as one batch sleeps :meth:`Heterogeneity.sleep_batch` ``(rank, step, n)``,
the sum of the same delays, so both see the same emulated cluster and can be compared fairly::

    from codedgrad.emulate import Heterogeneity

    emulate = Heterogeneity(speeds=[1, 1, 2, 4], base=0.02, stall_prob=0.01)  # or Heterogeneity.from_env()
    for step, (x, y) in enumerate(loader):                 # this rank's batch: n tasks' samples
        loss = loss_fn(ddp(x), y)
        emulate.sleep_batch(rank, step, n)                 # the delay this rank would add for n tasks
        loss.backward()

A "task" is whatever unit ``base`` is the time of: set ``base`` to a sample's time and pass sample
counts to emulate per-sample work.

**Two modes** (:class:`EmulationMode`):

* ``"sleep"`` (the default): the delays above, in seconds, whatever the task really computed. The
  emulated work dwarfs or replaces the real one; ``base`` sets its scale.
* ``"compute"``: the delay scales the task's *measured* compute. A rank of speed ``s`` takes
  ``(s_ref / s)`` times what the task really took, times the same seeded noise (shifted exponential
  of mean 1, or ``stall_factor`` on a stall), where ``s_ref`` is the fastest speed the emulation ever
  names (``speeds`` and ``change_speeds``). The caller measures the compute and passes it as
  ``compute_seconds``; the delay is what must be slept on top of it::

      emulated = compute_seconds * (s_ref / s) * noise        # the task's emulated duration
      delay = max(0, emulated - compute_seconds) + forced stall

  Because the delay multiplies real compute, batching efficiency shows: a rank that runs 64 samples
  as one batch measures less than 64 single samples and is slowed in proportion. A rank cannot run
  faster than its real compute, so noise below 1 on the fastest rank is clipped to 1 (its mean
  emulated time is then slightly above its compute; :meth:`Heterogeneity.profiles` includes that).
  ``base`` then only says what one unit is expected to really cost (for :meth:`Heterogeneity.profiles`
  and :meth:`Heterogeneity.mean_task_time`, the planner's prior before anything is measured).
  :meth:`Heterogeneity.batch_delay` splits a batch's compute evenly over its units and sums their delays.

This is emulation, never measurement of real hardware: anything that uses it must report it as
such (:meth:`Heterogeneity.describe`), and production runs do not use it. torchrun scripts and
recipes pick it up unchanged from the ``CODEDGRAD_EMULATE`` environment variable
(:meth:`Heterogeneity.from_env`), whose value is the JSON of :meth:`Heterogeneity.to_json`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from codedgrad.profile import WorkerProfile

__all__ = ["ENV_VARIABLE", "FIELDS", "EmulationError", "EmulationMode", "Heterogeneity"]

ENV_VARIABLE = "CODEDGRAD_EMULATE"
"""The environment variable :meth:`Heterogeneity.from_env` reads by default."""

FIELDS = (  # the settings a Heterogeneity is built from (its to_dict keys)
    "speeds",
    "base",
    "jitter",
    "stall_prob",
    "stall_factor",
    "seed",
    "change_step",
    "change_speeds",
    "forced_stalls",
    "mode",
)


class EmulationMode(str, Enum):
    """What an emulated delay is made of (module docstring, "Two modes")."""

    SLEEP = "sleep"
    """Seeded seconds of ``base / speed`` scale, whatever the real compute took."""
    COMPUTE = "compute"
    """The task's measured compute, scaled by ``s_ref / speed`` and the seeded noise."""


class EmulationError(ValueError):
    """An emulation setting is invalid; the message starts with the offending field."""


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _finite(name: str, value: object) -> float:
    if not _is_number(value):
        raise EmulationError(f"{name}: must be a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:  # an integer beyond any float (JSON allows 10**400)
        raise EmulationError(f"{name}: must be finite, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(number):
        raise EmulationError(f"{name}: must be finite, got {value!r}")
    return number


def _compute_seconds(value: object) -> float:
    seconds = _finite("compute_seconds", value)
    if seconds < 0:
        raise EmulationError(f"compute_seconds: must be >= 0, got {seconds!r}")
    return seconds


def _speed_tuple(name: str, values: object) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
        raise EmulationError(f"{name}: must be a list of speeds, got {values!r}")
    if len(values) == 0:
        raise EmulationError(f"{name}: need at least one rank")
    speeds = []
    for i, value in enumerate(values):
        speed = _finite(f"{name}[{i}]", value)
        if speed <= 0:
            raise EmulationError(f"{name}[{i}]: must be > 0, got {speed!r}")
        speeds.append(speed)
    return tuple(speeds)


@dataclass(frozen=True)
class Heterogeneity:
    """Seeded per-rank, per-task delays that emulate unequal and noisy workers.

    Args:
        speeds: relative speed of each rank (positive, finite); ``len(speeds)`` is the world size.
        base: mean emulated task time, in seconds, of a rank of speed 1 when it does not stall (> 0).
        jitter: share of the mean that is exponential, in [0, 1]; the rest ``(1 − jitter)·mean`` is
            fixed. ``jitter=1`` gives exponential task times, ``jitter=0`` constant ones.
        stall_prob: probability, in [0, 1], that a task stalls.
        stall_factor: a stalled task takes ``stall_factor`` times the rank's mean (≥ 1).
        seed: non-negative integer; each rank's delays are derived from ``(seed, rank, step, index)``.
        change_step: first step at which ``change_speeds`` apply (≥ 0), or None for no change.
        change_speeds: the speeds from ``change_step`` on; same length as ``speeds``.
        forced_stalls: ``(rank, step, seconds)`` tuples: an extra delay of ``seconds`` on that rank's
            first task (index 0) of that step, on top of its random delay.
        mode: ``"sleep"`` (delays of ``base / speed`` seconds) or ``"compute"`` (delays that scale the
            measured ``compute_seconds`` passed to the delay methods; ``base`` is then the expected
            real compute of one unit, used by :meth:`profiles` only). See the module docstring.

    Example::

        >>> het = Heterogeneity(speeds=[1.0, 1.0, 0.5], base=0.005, stall_prob=0.01)
        >>> het.profiles()[2].mean  # slow rank, including its rare stalls
        0.0109
    """

    speeds: tuple[float, ...]
    base: float
    jitter: float = 0.5
    stall_prob: float = 0.0
    stall_factor: float = 10.0
    seed: int = 0
    change_step: int | None = None
    change_speeds: tuple[float, ...] | None = None
    forced_stalls: tuple[tuple[int, int, float], ...] = field(default=())
    mode: EmulationMode = EmulationMode.SLEEP

    def __post_init__(self) -> None:
        # Normalise to immutable, plain-Python values so instances hash, compare and serialise the
        # same however they were built (lists from JSON, numpy arrays from a script).
        set_ = object.__setattr__
        set_(self, "speeds", _speed_tuple("speeds", self.speeds))
        base = _finite("base", self.base)
        if base <= 0:
            raise EmulationError(f"base: must be > 0, got {base!r}")
        set_(self, "base", base)
        for name in ("jitter", "stall_prob"):
            value = _finite(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise EmulationError(f"{name}: must be in [0, 1], got {value!r}")
            set_(self, name, value)
        stall_factor = _finite("stall_factor", self.stall_factor)
        if stall_factor < 1.0:
            raise EmulationError(f"stall_factor: must be >= 1, got {stall_factor!r}")
        set_(self, "stall_factor", stall_factor)
        if not _is_int(self.seed) or self.seed < 0:
            raise EmulationError(f"seed: must be an integer >= 0, got {self.seed!r}")
        set_(self, "seed", int(self.seed))
        self._check_change()
        self._check_forced_stalls()
        try:
            set_(self, "mode", EmulationMode(self.mode))
        except ValueError:
            known = ", ".join(repr(m.value) for m in EmulationMode)
            raise EmulationError(f"mode: must be one of {known}, got {self.mode!r}") from None

    def _check_change(self) -> None:
        if (self.change_step is None) != (self.change_speeds is None):
            missing = "change_speeds" if self.change_speeds is None else "change_step"
            raise EmulationError(f"{missing}: change_step and change_speeds must be given together")
        if self.change_step is None:
            return
        if not _is_int(self.change_step) or self.change_step < 0:
            raise EmulationError(f"change_step: must be an integer >= 0, got {self.change_step!r}")
        object.__setattr__(self, "change_step", int(self.change_step))
        change_speeds = _speed_tuple("change_speeds", self.change_speeds)
        if len(change_speeds) != len(self.speeds):
            raise EmulationError(
                f"change_speeds: must have one speed per rank ({len(self.speeds)}), got {len(change_speeds)}"
            )
        object.__setattr__(self, "change_speeds", change_speeds)

    def _check_forced_stalls(self) -> None:
        stalls = self.forced_stalls
        if isinstance(stalls, (str, bytes)) or not isinstance(stalls, Sequence):
            raise EmulationError(f"forced_stalls: must be a list of (rank, step, seconds), got {stalls!r}")
        normalised = []
        for i, entry in enumerate(stalls):
            name = f"forced_stalls[{i}]"
            if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 3:
                raise EmulationError(f"{name}: must be (rank, step, seconds), got {entry!r}")
            rank, step, seconds = entry
            if not _is_int(rank) or not 0 <= rank < len(self.speeds):
                raise EmulationError(f"{name}.rank: must be an integer in [0, {len(self.speeds)}), got {rank!r}")
            if not _is_int(step) or step < 0:
                raise EmulationError(f"{name}.step: must be an integer >= 0, got {step!r}")
            seconds = _finite(f"{name}.seconds", seconds)
            if seconds < 0:
                raise EmulationError(f"{name}.seconds: must be >= 0, got {seconds!r}")
            normalised.append((int(rank), int(step), seconds))
        object.__setattr__(self, "forced_stalls", tuple(normalised))

    # -- the delay model -------------------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """The number of ranks this emulation describes (``len(speeds)``)."""
        return len(self.speeds)

    def check_world_size(self, world_size: int) -> None:
        """Raise :class:`EmulationError` unless this emulation has one speed per rank of the job.

        Args:
            world_size: the number of ranks actually running (e.g. ``dist.get_world_size()``).
        """
        if world_size != self.world_size:
            raise EmulationError(
                f"speeds: the emulation describes {self.world_size} ranks but the job has {world_size}; "
                f"give one speed per rank"
            )

    def speeds_at(self, step: int) -> tuple[float, ...]:
        """The speeds in force at ``step`` (``change_speeds`` from ``change_step`` on)."""
        if self.change_step is not None and step >= self.change_step:
            assert self.change_speeds is not None
            return self.change_speeds
        return self.speeds

    @property
    def reference_speed(self) -> float:
        """``s_ref``: the fastest speed named (``speeds`` and ``change_speeds``); compute mode's unit."""
        return max(self.speeds + (self.change_speeds or ()))

    def slowdown(self, rank: int, step: int = 0) -> float:
        """``s_ref / speed`` of ``rank`` at ``step`` (≥ 1): how many times its real compute a task takes
        in compute mode, before noise."""
        self._check_call(rank, step, 0)
        return self.reference_speed / self.speeds_at(step)[rank]

    def mean_task_time(self, rank: int, step: int = 0) -> float:
        """The mean of a task of ``rank`` at ``step`` that does not stall.

        ``base / speed`` in sleep mode; in compute mode ``base · s_ref / speed``, ``base`` being the
        expected real compute of a task (noise clipping on the fastest ranks left out).
        """
        self._check_call(rank, step, 0)
        if self.mode is EmulationMode.COMPUTE:
            return self.base * self.slowdown(rank, step)
        return self.base / self.speeds_at(step)[rank]

    def task_delay(self, rank: int, step: int, index: int, compute_seconds: float = 0.0) -> float:
        """The emulated duration, in seconds, of task ``index`` of ``step`` on ``rank``.

        A pure function of the configuration and its arguments: every rank can compute any rank's
        delays, in any order, and a rerun gets the same values.

        Args:
            rank: global rank (0 ≤ rank < world_size).
            step: optimizer step (≥ 0).
            index: position of the task within the rank's work of that step (≥ 0).
            compute_seconds: the task's measured compute (≥ 0); compute mode scales it, sleep mode
                ignores it.

        Returns:
            The seconds to sleep after the task's real compute (compute mode: on top of it).
        """
        self._check_call(rank, step, index)
        compute_seconds = _compute_seconds(compute_seconds)
        if self.mode is EmulationMode.COMPUTE:
            return self._compute_delay(rank, step, index, compute_seconds)
        mean = self.base / self.speeds_at(step)[rank]
        # One independent stream per (seed, rank, step, index): no shared generator state, so the
        # value cannot depend on call order or on other ranks. Both draws are always made so the
        # stream layout does not depend on the parameters.
        rng = np.random.default_rng([self.seed, rank, step, index])
        stall_draw, exp_draw = rng.random(), rng.standard_exponential()
        if stall_draw < self.stall_prob:
            delay = self.stall_factor * mean
        else:
            delay = (1.0 - self.jitter) * mean + self.jitter * mean * float(exp_draw)
        if index == 0:
            delay += self._forced_stall(rank, step)
        return delay

    def _compute_delay(self, rank: int, step: int, index: int, compute_seconds: float) -> float:
        """Compute mode: ``compute · s_ref/s · noise − compute``, clipped at 0, plus any forced stall."""
        # The same stream and draws as sleep mode, so both modes stall on the same tasks.
        rng = np.random.default_rng([self.seed, rank, step, index])
        stall_draw, exp_draw = rng.random(), rng.standard_exponential()
        if stall_draw < self.stall_prob:
            noise = self.stall_factor
        else:
            noise = (1.0 - self.jitter) + self.jitter * float(exp_draw)
        emulated = compute_seconds * self.slowdown(rank, step) * noise
        delay = max(0.0, emulated - compute_seconds)
        if index == 0:
            delay += self._forced_stall(rank, step)
        return delay

    def sleep(self, rank: int, step: int, index: int, compute_seconds: float = 0.0) -> float:
        """Sleep for :meth:`task_delay` (call it after the task's real compute) and return it."""
        delay = self.task_delay(rank, step, index, compute_seconds)
        if delay > 0:
            time.sleep(delay)
        return delay

    def batch_delay(self, rank: int, step: int, count: int, first: int = 0, compute_seconds: float = 0.0) -> float:
        """The emulated duration, in seconds, of ``count`` tasks done at once by ``rank`` at ``step``.

        The sum of :meth:`task_delay` over task indices ``first … first + count − 1``: a batch of
        ``count`` tasks' work costs on the emulated cluster what those tasks cost one by one (forced
        stalls included when the batch holds index 0). Use it to emulate the same cluster for plain
        DDP, which processes a rank's share as one batch.

        Args:
            rank: global rank (0 ≤ rank < world_size).
            step: optimizer step (≥ 0).
            count: number of tasks (or samples, if ``base`` is a sample's time) in the batch (≥ 0).
            first: index of the batch's first task within the rank's work of that step (≥ 0).
            compute_seconds: the whole batch's measured compute (≥ 0); compute mode gives each task
                an equal share of it, sleep mode ignores it.
        """
        for name, value in (("count", count), ("first", first)):
            if not _is_int(value) or value < 0:
                raise EmulationError(f"{name}: must be an integer >= 0, got {value!r}")
        self._check_call(rank, step, first)
        compute_seconds = _compute_seconds(compute_seconds)
        if self.mode is EmulationMode.COMPUTE:
            share = compute_seconds / count if count else 0.0
            return float(sum(self._compute_delay(rank, step, i, share) for i in range(first, first + count)))
        return float(sum(self.task_delay(rank, step, index) for index in range(first, first + count)))

    def sleep_batch(self, rank: int, step: int, count: int, first: int = 0, compute_seconds: float = 0.0) -> float:
        """Sleep for :meth:`batch_delay` (call it after the batch's real compute) and return it.

        One sleep for the whole batch rather than one per task: sleeping has an overhead of its own,
        which per-task sleeps would add ``count`` times.
        """
        delay = self.batch_delay(rank, step, count, first, compute_seconds)
        if delay > 0:
            time.sleep(delay)
        return delay

    def profiles(self, step: int | None = None) -> list[WorkerProfile]:
        """The :class:`~codedgrad.profile.WorkerProfile` each rank's emulated task times follow.

        Uses the initial ``speeds`` (before any ``change_step``), or those in force at ``step`` when
        given; includes the stall contribution
        (mean and std of the mixture) and leaves out ``forced_stalls`` (one-off events, not a rate).
        The shift is 0: all emulated time is per task. In compute mode the times are those of a task
        whose real compute is ``base`` (the noise clipped at 1 where the rank would beat its compute).
        """
        p, factor, jitter = self.stall_prob, self.stall_factor, self.jitter
        if step is not None:
            self._check_call(0, step, 0)
        speeds = self.speeds if step is None else self.speeds_at(step)
        if self.mode is EmulationMode.COMPUTE:
            return [self._compute_profile(self.reference_speed / speed) for speed in speeds]
        profiles = []
        for speed in speeds:
            mean = self.base / speed
            # Normal task: (1 − j)μ + Exp(jμ), so E = μ and E[X²] = μ² + (jμ)². Stall: exactly Fμ.
            mixture_mean = (1.0 - p) * mean + p * factor * mean
            second_moment = (1.0 - p) * (mean**2 + (jitter * mean) ** 2) + p * (factor * mean) ** 2
            variance = max(second_moment - mixture_mean**2, 0.0)  # clamp rounding below zero
            profiles.append(WorkerProfile(shift=0.0, mean=mixture_mean, std=math.sqrt(variance)))
        return profiles

    def _compute_profile(self, slowdown: float) -> WorkerProfile:
        """Moments of ``base · max(1, slowdown · noise)``: the compute-mode time of a unit."""
        a, p, factor, j = slowdown, self.stall_prob, self.stall_factor, self.jitter
        # Normal unit: noise N = (1 − j) + j·E with E ~ Exp(1); a·N < 1 exactly when E < t.
        t = (1.0 / a - (1.0 - j)) / j if j > 0 else -1.0
        if t <= 0:  # never clipped
            m1, m2 = a, a * a * (1.0 + j * j)
        else:
            # E[E; E ≥ t] = (t + 1)e^−t and E[E²; E ≥ t] = (t² + 2t + 2)e^−t.
            tail = math.exp(-t)
            m1 = (1.0 - tail) + a * tail * ((1.0 - j) + j * (t + 1.0))
            m2 = (1.0 - tail) + a * a * tail * (
                (1.0 - j) ** 2 + 2.0 * (1.0 - j) * j * (t + 1.0) + j * j * (t * t + 2.0 * t + 2.0)
            )
        stalled = a * factor  # ≥ 1: never clipped
        mean = (1.0 - p) * m1 + p * stalled
        second = (1.0 - p) * m2 + p * stalled**2
        std = math.sqrt(max(second - mean**2, 0.0))
        return WorkerProfile(shift=0.0, mean=self.base * mean, std=self.base * std)

    def describe(self) -> str:
        """A one-line, human-readable statement that timings are emulated, for logs and reports."""
        text = (
            f"EMULATED heterogeneity (not real hardware): speeds={list(self.speeds)}, base={self.base:g}s, "
            f"jitter={self.jitter:g}, stall_prob={self.stall_prob:g}, stall_factor={self.stall_factor:g}, "
            f"seed={self.seed}"
        )
        if self.change_step is not None:
            text += f", speeds -> {list(self.change_speeds or ())} from step {self.change_step}"
        if self.forced_stalls:
            text += f", forced_stalls={[list(s) for s in self.forced_stalls]}"
        if self.mode is EmulationMode.COMPUTE:
            text += f", mode=compute (a task takes its measured compute x {self.reference_speed:g}/speed x noise)"
        return text

    def _forced_stall(self, rank: int, step: int) -> float:
        return sum(seconds for r, s, seconds in self.forced_stalls if r == rank and s == step)

    def _check_call(self, rank: int, step: int, index: int) -> None:
        if not _is_int(rank) or not 0 <= rank < self.world_size:
            raise EmulationError(f"rank: must be an integer in [0, {self.world_size}), got {rank!r}")
        if not _is_int(step) or step < 0:
            raise EmulationError(f"step: must be an integer >= 0, got {step!r}")
        if not _is_int(index) or index < 0:
            raise EmulationError(f"index: must be an integer >= 0, got {index!r}")

    # -- serialisation ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (the inverse of :meth:`from_dict`)."""
        return {
            "speeds": list(self.speeds),
            "base": self.base,
            "jitter": self.jitter,
            "stall_prob": self.stall_prob,
            "stall_factor": self.stall_factor,
            "seed": self.seed,
            "change_step": self.change_step,
            "change_speeds": None if self.change_speeds is None else list(self.change_speeds),
            "forced_stalls": [list(s) for s in self.forced_stalls],
            "mode": self.mode.value,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> Heterogeneity:
        """Build from a dict with the constructor's fields; ``speeds`` and ``base`` are required.

        Args:
            data: the settings.
            source: where they came from (e.g. an environment variable); prefixed to error messages.
        """
        prefix = f"{source}: " if source else ""
        if not isinstance(data, Mapping):
            raise EmulationError(f"{prefix}expected a JSON object with the emulation settings, got {data!r}")
        unknown = sorted(k if isinstance(k, str) else repr(k) for k in set(data) - set(FIELDS))  # keys may not be text
        if unknown:
            raise EmulationError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(FIELDS)})")
        for required in ("speeds", "base"):
            if required not in data:
                raise EmulationError(f"{prefix}{required}: missing")
        try:
            return cls(**data)
        except EmulationError as error:
            raise EmulationError(f"{prefix}{error}") from None

    def to_json(self) -> str:
        """A compact JSON string, e.g. the value of ``CODEDGRAD_EMULATE``."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str | None = None) -> Heterogeneity:
        """Parse :meth:`to_json`'s output; errors name ``source`` (if given) and the field."""
        prefix = f"{source}: " if source else ""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise EmulationError(f"{prefix}not valid JSON ({error.msg} at column {error.colno})") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_env(cls, variable: str = ENV_VARIABLE) -> Heterogeneity | None:
        """Read the emulation from an environment variable holding :meth:`to_json`'s output.

        Returns None when the variable is unset or empty (no emulation). A malformed value raises
        :class:`EmulationError` (a ValueError) whose message names the variable and the field.
        """
        text = os.environ.get(variable, "").strip()
        if not text:
            return None
        return cls.from_json(text, source=variable)
