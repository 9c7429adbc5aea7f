"""Plans: built from agreed inputs, fingerprint-checked across ranks, and re-planned from measurements.

:class:`Planner` owns the current plan: it builds plans, agrees them through the Store (a plan is
adopted only when every rank built the same fingerprint, so floating-point differences between hosts
can never leave ranks on different plans), measures this rank's task times, runs the profile
exchange every few steps, and saves and restores its state with the engine. Whether an exchange
switches plans is :class:`~codedgrad.runtime.policy.ReplanPolicy`'s decision (runtime/policy.py).
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np

from codedgrad.codes import CodeError, GradientCode, Work, make_code
from codedgrad.codes.repetition import homogeneous_profiles
from codedgrad.plan import PlanError, choose_redundancy
from codedgrad.profile import (
    CostModel,
    WorkerProfile,
    fit_cost_model,
    fit_profile,
    profiles_from_dict,
    profiles_to_dict,
)
from codedgrad.runtime.config import AUTO, AUTO_START, ConfigurationError, EngineConfig, agree
from codedgrad.runtime.coordinator import StoreCoordinator
from codedgrad.runtime.direct import has_nothing_to_decide, one_copy_each
from codedgrad.runtime.policy import (
    FEW_SAMPLES_ERROR,
    MAX_WINDOWS,
    MIN_SAMPLES,
    Measurement,
    ReplanPolicy,
    chunk_calls_shift,
)

__all__ = ["COST_SAMPLES", "MIN_SAMPLES_REPLAN", "SHAPE_CALLS", "Plan", "Planner"]

#: Every exchange's decision at DEBUG level (``logging.getLogger("codedgrad.replan")``): what each rank
#: measured and what the plan became, to see why a plan moved (or did not).
log = logging.getLogger("codedgrad.replan")

#: A measurement gathers the newest windows until it holds this many task times (or :data:`MAX_WINDOWS`);
#: with fewer, its speed error says how far to trust it (:func:`~codedgrad.runtime.policy.pool_equal_speeds`).
MIN_SAMPLES_REPLAN = 16
#: The cost model (fixed + per-sample compute of a call) is fitted to this many of the newest calls.
COST_SAMPLES = 256
#: Calls at each end of a 2x range of sizes that a cost model needs before its split into fixed and
#: per-sample parts (the cost shape) counts.
SHAPE_CALLS = 4


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
        redundancy: the plan's Ω (the configured one, or the planner's choice with ``"auto"``).
    """

    version: int
    num_tasks: int
    profiles: tuple[WorkerProfile, ...]
    measured: bool
    code: GradientCode
    queue: tuple[Work, ...]
    fingerprint: str
    redundancy: float = 1.0

    def planned_tasks(self) -> list[int]:
        """The tasks this rank's queue holds, in order (primaries, then backups)."""
        return [task for work in self.queue for task in work.tasks]


class Planner:
    """The current plan of one engine, agreed across ranks and re-planned from measurements.

    Args:
        coordinator: the engine's Store access (for the gathers).
        config: the agreed configuration.
        rank: this rank.
        world_size: number of ranks.
        lag: steps between publishing this rank's measurements and reading everyone's. With the
            no-wait release a rank's compute thread may be up to ``max_steps_ahead`` steps behind
            the others; a lag beyond that means an exchange never waits for a stalled rank. A plan
            that runs direct steps (lockstep) reads its exchanges at once.
    """

    def __init__(
        self, coordinator: StoreCoordinator, config: EngineConfig, rank: int, world_size: int, lag: int = 0
    ) -> None:
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
        # Per-task seconds per exchange window (newest last) and step times of the current window: a
        # profile describes the recent past, so a rank that slowed down is not outvoted by the many
        # fast tasks it ran before.
        # (tasks, their weight, seconds) per call
        self._windows: deque[list[tuple[int, float, float]]] = deque([[]], maxlen=MAX_WINDOWS)
        self._step_seconds: deque[float] = deque(maxlen=1024)
        self._restored: dict | None = None
        self._lag = lag
        self._pending: tuple[str, int] | None = None  # an exchange published: (its gather, the step to read it)
        self._skip_step = True  # the first step under a new plan: warm-up (allocations, caches) is not speed
        self._last_direct = False  # whether the last step ran direct (every rank alike)
        # (summed task weight, compute seconds) of the newest calls, for the cost model; kept across
        # plans (a call's cost does not depend on the plan), refitted lazily.
        self._calls: deque[tuple[float, float]] = deque(maxlen=COST_SAMPLES)
        self._cost: CostModel | None = None
        self._cost_stale = 0
        #: Every rank's cost model from the last exchange (None where a rank had none).
        self.shared_costs: tuple[CostModel | None, ...] = ()

    # ----------------------------------------------------------------- the plan of a step
    def plan_for(self, num_tasks: int, step: int = 0) -> Plan:
        """The plan of step ``step`` for ``num_tasks`` tasks (agreeing a new one if needed).

        Runs on the compute thread at the start of every step. Every rank reaches the gathers in
        here at the same step: a new K or a plan switch waits for every rank's compute thread; a
        profile exchange publishes at one step and reads everyone's ``lag`` steps later.
        """
        if self._restored is not None:
            restored, self._restored = self._restored, None
            if restored["num_tasks"] == num_tasks:
                profiles = tuple(profiles_from_dict(restored["profiles"]))
                self._next_version = restored["version"]
                self._adopt(num_tasks, profiles, restored["measured"], step)
                return self._plan_checked()
        if self.plan is None or self.plan.num_tasks != num_tasks:
            # What was measured for another K is still the best guess of relative speed, but not a
            # clock for tasks of this size.
            guess = self._guess or homogeneous_profiles(self._world_size)
            profiles = self.plan.profiles if self.plan is not None else guess
            self._adopt(num_tasks, tuple(profiles), measured=False, step=step)
            self._windows = deque([[]], maxlen=MAX_WINDOWS)
            self._step_seconds.clear()
            self._steps_since_exchange = 0
            self._pending = None  # every rank drops it alike: K is agreed
        elif self._pending is not None and step >= self._pending[1]:
            self._collect(step)
        elif self._pending is None and self._exchange_due():
            self._publish(step)
            if self._pending is not None and self._pending[1] == step:
                self._collect(step)
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

    def _publish(self, step: int) -> None:
        """Publish this rank's measurements of the window that ends here; read them at ``step + lag``."""
        # After a direct step every rank's compute thread is in this step (each direct step ends in an
        # all-reduce of every rank): read the exchange at once. After a coded step a rank may be behind.
        lag = 0 if self._last_direct and self.direct_ready else self._lag
        prefix = self._coordinator.publish("profiles", self._measure().to_json().encode(), step + lag)
        self._pending = (prefix, step + lag)
        self._steps_since_exchange = 0
        self._windows.append([])
        self._step_seconds.clear()

    def _collect(self, step: int) -> None:
        """Read every rank's measurements, let the policy decide, and switch together if it says so."""
        assert self.plan is not None and self._pending is not None
        prefix, self._pending = self._pending[0], None
        shared = [Measurement.from_json(v) for v in self._coordinator.collect(prefix)]
        self.shared_costs = tuple(m.cost for m in shared)
        self._policy.direct = self._direct_plans  # the plans decided on are costed like the one in use
        action, profiles = self._policy.decide(self.plan.profiles, self.plan.measured, self.plan.num_tasks, shared)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", _describe_exchange(step, self.plan, shared, action, profiles))
        if action == "keep" or profiles is None:
            return
        try:
            self._adopt(self.plan.num_tasks, profiles, measured=True, step=step)
        except ConfigurationError as error:  # raised alike on every rank: all keep the current plan
            warnings.warn(f"codedgrad: re-plan skipped on every rank: {error}", RuntimeWarning, stacklevel=3)
            return
        if log.isEnabledFor(logging.DEBUG):
            code = self.plan.code
            tasks = [sum(len(w.tasks) for w in code.queue(r)) for r in range(self._world_size)]
            log.debug("codedgrad: plan v%d from step %d: tasks per rank %s", self.plan.version, step, tasks)

    def _measure(self) -> Measurement:
        """Fit the newest windows that together hold enough task times (or None).

        The windows before the current one are kept until they are used in a fit of every rank;
        :data:`MAX_WINDOWS` bounds how old a sample can be.
        """
        needed = MIN_SAMPLES_REPLAN if self.plan is not None and self.plan.measured else MIN_SAMPLES
        calls: list[tuple[int, float, float]] = []
        for window in reversed(self._windows):
            calls = window + calls
            if sum(n for n, _, _ in calls) >= needed:
                break
        # Chunks (several tasks per call) pay the fixed cost of a call once: a per-task time of
        # seconds / tasks would make a rank with larger chunks look faster, win more tasks, get
        # larger chunks, and so on. So with chunks the fixed part is taken out of every call and
        # becomes the profile's shift (per step: fixed · the calls of an even share), and the mean is the
        # per-task part of the cost model (per sample times the tasks' mean weight), the same
        # whatever the chunk sizes, at the window's speed (below); the spread is fitted to the
        # calls' per-task times net of the fixed part. One task per call (task_loss) leaves the
        # times as they are.
        cost = self.cost_model()
        chunked = cost is not None and any(n > 1 for n, _, _ in calls)
        fixed = cost.fixed if cost is not None and chunked else 0.0
        tasks = [max(0.0, seconds - fixed) / n for n, _, seconds in calls for _ in range(n)]
        profile = fit_profile(tasks) if tasks else None  # the policy weighs a few by their error
        task_weight = sum(w for _, w, _ in calls) / sum(n for n, _, _ in calls) if calls else 0.0
        # The window's calls against the cost model: their median ratio is the window's speed level.
        # The model is fitted to the newest 256 calls, which a rank that changed speed a few windows
        # ago outvotes: its shape holds, its level is the window's. (A plan of direct steps runs one
        # call size, so the policy cannot re-read the window's speed through the cost shape either:
        # without this level a 4x change of speed moved the profile for 20 steps and more.)
        predicted = [(seconds, cost.seconds(w)) for _, w, seconds in calls] if cost is not None else []
        ratios = np.array([seconds / model for seconds, model in predicted if model > 0])
        level = float(np.median(ratios)) if ratios.size else 1.0
        if profile is not None and cost is not None and chunked and level > 0:
            num_tasks = self.plan.num_tasks if self.plan is not None else self._world_size
            shift = chunk_calls_shift(fixed * level, num_tasks, self._world_size, self._direct_plans)
            mean = cost.per_sample * task_weight * level
            if mean > 0:
                profile = WorkerProfile(shift=shift, mean=mean, std=min(profile.std, mean))
        steps = list(self._step_seconds)
        step_time = float(np.median(steps)) if steps else None
        step_error = _median_error(np.array(steps), step_time) if len(steps) >= 3 and step_time else None
        whole = cost is not None and not chunked
        call_tasks = sum(n * n for n, _, _ in calls) / sum(n for n, _, _ in calls) if calls else 0.0
        call_seconds, error = None, None
        if cost is not None and calls:
            if ratios.size:
                call_seconds = level * cost.seconds(task_weight * call_tasks)
                error = _median_error(ratios, level) if ratios.size >= 3 and level > 0 else FEW_SAMPLES_ERROR
        elif profile is not None and profile.mean > 0:
            error = profile.std / profile.mean / math.sqrt(len(tasks)) if len(tasks) >= 3 else FEW_SAMPLES_ERROR
        # The fit tells a call's fixed part from its per-sample part only with several calls at each
        # end of a range of sizes at least 2x wide: one odd call (an epoch's smaller last batch)
        # among hundreds of one size pins the intercept on its own noise.
        sizes = [w for w, _ in self._calls]
        largest = max(sizes, default=0.0)
        small = sum(1 for w in sizes if 2 * w <= largest)
        shape_known = min(small, len(sizes) - small) >= SHAPE_CALLS
        return Measurement(
            profile, step_time, len(tasks), cost, whole, task_weight, call_tasks, call_seconds, error, shape_known,
            step_error,
        )  # fmt: skip

    def _adopt(self, num_tasks: int, profiles: tuple[WorkerProfile, ...], measured: bool, step: int) -> None:
        """Build the plan, agree its fingerprint with every rank, and only then make it current."""
        plan, error = None, None
        try:
            plan = self._build(num_tasks, profiles, measured, self._next_version)
        except Exception as exc:
            error = (
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, (CodeError, PlanError, ValueError)) else str(exc)
            )
        values = {
            "num_tasks": num_tasks,
            "version": self._next_version,
            "plan": plan.fingerprint if plan else None,
            "measured": measured,  # decides, with the plan, whether steps run direct: every rank alike
        }
        agree(self._coordinator, "plan", values, error, step)  # raises on every rank alike; nothing changed then
        assert plan is not None
        self.plan = plan
        self._next_version += 1
        self._skip_step = True

    def _build(self, num_tasks: int, profiles: tuple[WorkerProfile, ...], measured: bool, version: int) -> Plan:
        config = self._config
        redundancy = config.redundancy
        if redundancy == AUTO:
            # The least Ω whose simulated step is within 2 % of the best (seeded: the same on every
            # rank, and the fingerprint check below catches a host whose floating point differs).
            redundancy = AUTO_START
            if measured:
                candidates = tuple(o for o in (1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5) if o <= self._world_size)
                # Backups are calls of their own: their fixed cost, from every rank's cost model
                # (the same gathered bytes on every rank), counts against redundancy.
                overhead = [c.fixed if c is not None else 0.0 for c in self.shared_costs]
                if len(overhead) != len(profiles):
                    overhead = [0.0] * len(profiles)
                redundancy = choose_redundancy(
                    list(profiles), num_tasks, candidates, gamma=config.gamma, jobs=500, task_overhead=overhead
                )
            redundancy = min(float(redundancy), float(self._world_size))
        code = make_code(config.code, self._world_size, num_tasks, float(redundancy), list(profiles), config.gamma)
        queues = [code.queue(r) for r in range(self._world_size)]
        digest = repr([[(w.result, w.tasks, w.coefficients) for w in q] for q in queues])
        fingerprint = hashlib.sha256(digest.encode()).hexdigest()[:16]
        return Plan(
            version, num_tasks, profiles, measured, code, tuple(queues[self._rank]), fingerprint, float(redundancy)
        )

    # ----------------------------------------------------------------- measurements
    def record_task(self, tasks: int, weight: float, seconds: float) -> None:
        """One result's compute time (forward, backward, emulated delay; not the commit).

        Args:
            tasks: how many tasks the call computed (a chunk has several).
            weight: their summed weight (samples).
            seconds: the call's compute seconds.
        """
        if self._skip_step or not (math.isfinite(seconds) and seconds >= 0) or tasks < 1:
            return
        self._windows[-1].append((tasks, weight, seconds))
        if math.isfinite(weight) and weight > 0:
            self._calls.append((weight, seconds))
            self._cost_stale += 1

    def cost_model(self) -> CostModel | None:
        """This rank's fitted cost per call (fixed + per sample), or None before :data:`MIN_SAMPLES` calls."""
        if len(self._calls) < MIN_SAMPLES:
            return None
        if self._cost is None or self._cost_stale >= 16:  # refit every 16 calls: a fit costs ~1 ms
            weights, seconds = zip(*self._calls)
            self._cost, self._cost_stale = fit_cost_model(weights, seconds), 0
        return self._cost

    def min_chunk_weight(self, overhead_share: float) -> float:
        """The least summed task weight of a chunk whose fixed cost is at most ``overhead_share`` of it."""
        cost = self.cost_model()
        return 0.0 if cost is None else cost.min_samples(overhead_share)

    @property
    def _direct_plans(self) -> bool:
        """Whether the plan in use, once measured, runs direct steps (a share in one call per rank):
        from the plan itself, since ``redundancy="auto"`` may choose Ω = 1 for one plan and not another."""
        return one_copy_each(self.plan, self._config.spare_work)

    @property
    def direct_ready(self) -> bool:
        """Whether the next step runs direct (:mod:`~codedgrad.runtime.direct`): the plan leaves nothing
        to decide and a step under it already finished in this process. The first step under a plan
        (adopted, switched to or restored) runs the coded step: its warm-up (a compile, allocations)
        may take longer than ``timeout``, which bounds a direct step's wait for the others' compute.
        The same on every rank: plans are adopted, and steps counted, at the same steps everywhere."""
        return has_nothing_to_decide(self.plan, self._config.spare_work) and not self._skip_step

    def step_ended(self, step_seconds: float | None, direct: bool = False) -> None:
        """Count a step of the current plan (and its time, when this rank computed it; ``direct``: it ran direct)."""
        self._last_direct = direct
        self._steps_since_exchange += 1
        if step_seconds is not None and not self._skip_step:
            self._step_seconds.append(step_seconds)
        self._skip_step = False

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
        self._pending = None  # an exchange in flight belongs to the run that was replaced
        self._steps_since_exchange = int(state.get("steps_since_exchange", 0))
        self._policy.load_state_dict(state.get("policy", {}))


def _median_error(values: np.ndarray, median: float) -> float:
    """The relative standard error of ``median`` (the median of ``values``), from their spread (MAD)."""
    return 1.4826 * float(np.median(np.abs(values - median))) / median / math.sqrt(values.size)


def _describe_exchange(
    step: int, plan: Plan, shared: list[Measurement], action: str, profiles: tuple[WorkerProfile, ...] | None
) -> str:
    """One line per exchange for the DEBUG log: per rank, the task times measured (per-task mean in ms,
    its relative error, the typical call's tasks) and the profiles planned before and after."""

    def ms(p: WorkerProfile | None) -> str:
        return "-" if p is None else f"{p.shift * 1e3:.2f}+{p.mean * 1e3:.2f}"

    measured = ", ".join(
        f"{ms(m.profile)} ±{m.speed_error or 0:.0%} ({m.samples} tasks, calls of {m.call_tasks:.1f})" for m in shared
    )
    planned = ", ".join(ms(p) for p in plan.profiles)
    after = ", ".join(ms(p) for p in profiles) if profiles is not None else "as before"
    return (
        f"codedgrad: exchange at step {step} (plan v{plan.version}): {action}; measured (shift+mean ms) "
        f"[{measured}]; planned [{planned}] -> [{after}]"
    )
