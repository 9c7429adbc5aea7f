"""Plans: built from agreed inputs, fingerprint-checked across ranks, and re-planned from measurements.

Two parts with one job each:

* :class:`ReplanPolicy` decides, from what every rank measured, whether to switch plans. It is pure
  (no Store, no torch) so its rules are unit-tested on their own, and every rank applies it to the
  same gathered bytes, so every rank decides the same.
* :class:`Planner` owns the current plan: it builds plans, agrees them through the Store (a plan
  is adopted only when every rank built the same fingerprint, so floating-point differences between
  hosts can never leave ranks on different plans), runs the profile exchange every few steps, and
  saves and restores its state with the engine.

Why the policy compares *measured* step times: the planner predicts a step from profiles fitted to
task times, but the real step also depends on backups, spare work and stalls that the prediction
leaves out. A switch that the prediction favours can make the real step slower; so after a switch
the next window's measured step time is compared with the window before it, and a switch that made
things slower is reverted and the plan held for a while. A switch also needs enough samples from
every rank: a fit from a handful of tasks is noise.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from codedgrad.codes import CodeError, GradientCode, Work, make_code
from codedgrad.codes.repetition import homogeneous_profiles
from codedgrad.plan import PlanError, optimal_split, split_statistics
from codedgrad.profile import WorkerProfile, fit_profile, profiles_from_dict, profiles_to_dict
from codedgrad.runtime.config import ConfigurationError, EngineConfig, agree
from codedgrad.runtime.coordinator import StoreCoordinator

__all__ = ["MIN_SAMPLES", "Measurement", "Plan", "Planner", "ReplanPolicy"]

#: Task times a rank must have measured since the last exchange for its fit to count.
MIN_SAMPLES = 8


@dataclass(frozen=True)
class Plan:
    """One agreed plan: the code every rank runs for ``num_tasks`` tasks, and this rank's queue.

    Attributes:
        version: agreed version number (the same on every rank; bumped at every new plan).
        num_tasks: K.
        profiles: the profiles the split was computed from.
        measured: whether ``profiles`` are task times measured in this run for this K (in seconds),
            which spare work may compare with the clock.
        code: the gradient code.
        queue: this rank's ordered work.
        fingerprint: a digest of every rank's queue.
    """

    version: int
    num_tasks: int
    profiles: tuple[WorkerProfile, ...]
    measured: bool
    code: GradientCode
    queue: tuple[Work, ...]
    fingerprint: str

    def planned_tasks(self) -> list[int]:
        """The tasks this rank's queue holds, in order (primaries, then backups)."""
        return [task for work in self.queue for task in work.tasks]


@dataclass(frozen=True)
class Measurement:
    """What one rank measured since the last exchange (published at the exchange).

    Attributes:
        profile: the rank's fitted task-time profile, or None with fewer than :data:`MIN_SAMPLES` tasks.
        step_time: the rank's median step time over the window (seconds), or None.
    """

    profile: WorkerProfile | None
    step_time: float | None

    def to_json(self) -> str:
        profile = profiles_to_dict([self.profile]) if self.profile is not None else None
        return json.dumps({"profile": profile, "step_time": self.step_time})

    @staticmethod
    def from_json(text: bytes | str) -> Measurement:
        data = json.loads(text)
        profile = profiles_from_dict(data["profile"])[0] if data["profile"] is not None else None
        return Measurement(profile, data["step_time"])


@dataclass
class ReplanPolicy:
    """When to switch plans, from every rank's measurements (the same decision on every rank).

    Args:
        threshold: switch only when the predicted step time improves by more than this share.
        hold_exchanges: after a revert, keep the plan for this many exchanges.
        gamma: the planner's γ.
    """

    threshold: float = 0.1
    hold_exchanges: int = 3
    gamma: float = 1.0
    _previous: tuple[WorkerProfile, ...] | None = field(default=None, repr=False)  # the plan before a switch
    _window_before: float | None = field(default=None, repr=False)  # its measured step time
    _hold: int = field(default=0, repr=False)

    def decide(
        self, current: Sequence[WorkerProfile], measured_before: bool, num_tasks: int, shared: Sequence[Measurement]
    ) -> tuple[str, tuple[WorkerProfile, ...] | None]:
        """What to do at an exchange: ``("keep", None)``, ``("switch", profiles)`` or ``("revert", profiles)``.

        Args:
            current: the profiles of the plan in use.
            measured_before: whether those were measured (False: a starting guess, replaced as
                soon as every rank has enough samples).
            num_tasks: K.
            shared: every rank's measurement, in rank order.
        """
        times = [m.step_time for m in shared if m.step_time is not None]
        window = float(np.median(times)) if len(times) == len(shared) else None
        if self._previous is not None and window is not None and self._window_before is not None:
            previous, before = self._previous, self._window_before
            self._previous = self._window_before = None
            # The switch made real steps slower by more than half the threshold: go back, and hold.
            if window > before * (1.0 + self.threshold / 2):
                self._hold = self.hold_exchanges
                return "revert", previous
        if self._hold > 0:
            self._hold -= 1
            return "keep", None
        if any(m.profile is None for m in shared):
            return "keep", None  # a rank has too few samples (e.g. everything purged): its fit is noise
        measured = tuple(m.profile for m in shared if m.profile is not None)
        if not measured_before:
            return "switch", measured  # a guess, perhaps not even in seconds: always replace it
        now = predicted_step_time(measured, optimal_split(list(current), num_tasks, 1.0, self.gamma))
        proposed = predicted_step_time(measured, optimal_split(list(measured), num_tasks, 1.0, self.gamma))
        if proposed < (1.0 - self.threshold) * now:
            self._previous, self._window_before = tuple(current), window
            return "switch", measured
        return "keep", None

    def state_dict(self) -> dict:
        return {"hold": self._hold}

    def load_state_dict(self, state: dict) -> None:
        self._hold = int(state.get("hold", 0))


def predicted_step_time(profiles: Sequence[WorkerProfile], split: Sequence[int]) -> float:
    """The slowest rank's expected finish time under ``split`` (the planner's view of a step)."""
    return float(split_statistics(profiles, split).mean_finish.max())


class Planner:
    """The current plan of one engine, agreed across ranks and re-planned from measurements.

    Args:
        coordinator: the engine's Store access (for the gathers).
        config: the agreed configuration.
        rank: this rank.
        world_size: number of ranks.
    """

    def __init__(self, coordinator: StoreCoordinator, config: EngineConfig, rank: int, world_size: int) -> None:
        self._coordinator = coordinator
        self._config = config
        self._rank = rank
        self._world_size = world_size
        self._policy = ReplanPolicy(threshold=config.replan_threshold, gamma=config.gamma)
        self._guess = tuple(config.profiles) if config.profiles is not None else None
        self._measured_given = config.profiles is not None  # given profiles count as a real start
        self.plan: Plan | None = None
        self._next_version = 0
        self._steps_since_exchange = 0
        # Per-task seconds and step times since the last exchange: a profile describes the recent
        # past, so a rank that slowed down is not outvoted by the many fast tasks it ran before.
        self._task_seconds: deque[float] = deque(maxlen=4096)
        self._step_seconds: deque[float] = deque(maxlen=1024)
        self._restored: dict | None = None

    # ----------------------------------------------------------------- the plan of a step
    def plan_for(self, num_tasks: int) -> Plan:
        """The plan of the next step for ``num_tasks`` tasks (agreeing a new one if needed).

        Runs on the compute thread at the start of every step; the gathers in here are the only
        points where all ranks' compute threads meet, and every rank reaches them at the same step.
        """
        if self._restored is not None:
            restored, self._restored = self._restored, None
            if restored["num_tasks"] == num_tasks:
                profiles = tuple(profiles_from_dict(restored["profiles"]))
                self._next_version = restored["version"]
                self._adopt(num_tasks, profiles, restored["measured"])
                return self._plan_checked()
        if self.plan is None or self.plan.num_tasks != num_tasks:
            # What was measured for another K is still the best guess of relative speed, but not a
            # clock for tasks of this size.
            profiles = (
                self.plan.profiles if self.plan is not None else (self._guess or homogeneous_profiles(self._world_size))
            )
            self._adopt(num_tasks, tuple(profiles), measured=False)
            self._task_seconds.clear()
            self._step_seconds.clear()
            self._steps_since_exchange = 0
        elif self._exchange_due():
            self._exchange()
        return self._plan_checked()

    def _plan_checked(self) -> Plan:
        assert self.plan is not None
        return self.plan

    def _exchange_due(self) -> bool:
        if self._config.replan_every <= 0:
            return False
        measured = self.plan is not None and (self.plan.measured or self._measured_given)
        period = self._config.replan_every if measured else self._config.warmup_steps
        return self._steps_since_exchange >= period

    def _exchange(self) -> None:
        """Share this rank's measurements, let the policy decide, and switch together if it says so."""
        assert self.plan is not None
        mine = self._measure()
        shared = [Measurement.from_json(v) for v in self._coordinator.gather("profiles", mine.to_json().encode())]
        self._steps_since_exchange = 0
        action, profiles = self._policy.decide(self.plan.profiles, self.plan.measured, self.plan.num_tasks, shared)
        if all(m.profile is not None for m in shared):
            # The window was used (every rank had enough samples); otherwise keep collecting, so a
            # rank that computes few tasks per step still gets a fit over several windows.
            self._task_seconds.clear()
        self._step_seconds.clear()
        if action == "keep" or profiles is None:
            return
        try:
            self._adopt(self.plan.num_tasks, profiles, measured=True)
        except ConfigurationError as error:  # raised alike on every rank: all keep the current plan
            warnings.warn(f"codedgrad: re-plan skipped on every rank: {error}", RuntimeWarning, stacklevel=3)

    def _measure(self) -> Measurement:
        tasks, steps = list(self._task_seconds), list(self._step_seconds)
        profile = fit_profile(tasks) if len(tasks) >= MIN_SAMPLES else None
        step_time = float(np.median(steps)) if steps else None
        return Measurement(profile, step_time)

    def _adopt(self, num_tasks: int, profiles: tuple[WorkerProfile, ...], measured: bool) -> None:
        """Build the plan, agree its fingerprint with every rank, and only then make it current."""
        plan, error = None, None
        try:
            plan = self._build(num_tasks, profiles, measured, self._next_version)
        except (CodeError, PlanError, ValueError) as exc:
            error = str(exc)
        values = {"num_tasks": num_tasks, "version": self._next_version, "plan": plan.fingerprint if plan else None}
        agree(self._coordinator, "plan", values, error)  # raises on every rank alike; nothing changed then
        assert plan is not None
        self.plan = plan
        self._next_version += 1

    def _build(self, num_tasks: int, profiles: tuple[WorkerProfile, ...], measured: bool, version: int) -> Plan:
        config = self._config
        code = make_code(config.code, self._world_size, num_tasks, config.redundancy, list(profiles), config.gamma)
        queues = [code.queue(r) for r in range(self._world_size)]
        digest = repr([[(w.result, w.tasks, w.coefficients) for w in q] for q in queues])
        fingerprint = hashlib.sha256(digest.encode()).hexdigest()[:16]
        return Plan(version, num_tasks, profiles, measured, code, tuple(queues[self._rank]), fingerprint)

    # ----------------------------------------------------------------- measurements
    def record_task(self, seconds_per_task: float) -> None:
        if math.isfinite(seconds_per_task) and seconds_per_task >= 0:
            self._task_seconds.append(seconds_per_task)

    def step_ended(self, step_seconds: float | None) -> None:
        """Count a step of the current plan (and its time, when this rank computed it)."""
        self._steps_since_exchange += 1
        if step_seconds is not None:
            self._step_seconds.append(step_seconds)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        if self.plan is None:
            return {}
        return {
            "num_tasks": self.plan.num_tasks,
            "version": self.plan.version,
            "profiles": profiles_to_dict(self.plan.profiles),
            "measured": self.plan.measured,
            "steps_since_exchange": self._steps_since_exchange,
            "policy": self._policy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved plan: the next step with the same K re-agrees it (same version, no warm-up)."""
        if not state:
            return
        self._restored = state
        self.plan = None
        self._steps_since_exchange = int(state.get("steps_since_exchange", 0))
        self._policy.load_state_dict(state.get("policy", {}))
