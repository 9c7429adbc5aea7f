"""The re-planning policy: from what every rank measured, whether to switch plans, and to what.

Pure (no Store, no torch): its rules are unit-tested on their own, and every rank applies them to
the same gathered bytes, so every rank decides the same. :class:`~codedgrad.runtime.replan.Planner`
gathers the :class:`Measurement` of every rank at an exchange and asks :class:`ReplanPolicy`.

Why the policy compares *measured* step times: the planner predicts a step from profiles fitted to
task times, but the real step also depends on backups, spare work and stalls that the prediction
leaves out. A switch that the prediction favours can make the real step slower; so after a switch
the next window's measured step time is compared with the window before it, and a switch that made
things slower is reverted and the plan held for a while.

What the policy plans with is filtered for noise, because on shared cores a rank's window speed
wanders by 10–50 %: :func:`harmonize` describes every rank in one cost shape and reads its speed at
its own call size; a rank's windows accumulate in a :class:`SpeedEstimate` until one shows a change
beyond their error, far beyond it or twice in a row; and ranks whose estimates cannot be told apart
share one pooled profile (:func:`pool_equal_speeds`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from codedgrad.plan import optimal_split, split_statistics
from codedgrad.profile import CostModel, WorkerProfile, profiles_from_dict, profiles_to_dict

__all__ = [
    "FEW_SAMPLES_ERROR",
    "FIRST_WINDOW_ERROR",
    "MAX_FIXED_SHARE",
    "MAX_WINDOWS",
    "MAX_WINDOW_NOISE",
    "MIN_SAMPLES",
    "MIN_SPEED_ERROR",
    "SAME_SPEED_Z",
    "Measurement",
    "ReplanPolicy",
    "SpeedEstimate",
    "chunk_calls_shift",
    "cost_shape",
    "harmonize",
    "pool_equal_speeds",
    "predicted_step_time",
    "share_seconds",
]

#: Task times every rank must have measured (since its last fit was used) before measured profiles
#: replace a starting guess: any measurement beats a guess that may not even be in seconds.
MIN_SAMPLES = 8
#: A fit uses the newest exchange windows that together hold enough samples, at most this many:
#: a rank that computes few tasks per step still gets a fit, and none older than this. A guess waits
#: this many exchanges for :data:`MIN_SAMPLES` task times from every rank.
MAX_WINDOWS = 3


@dataclass(frozen=True)
class Measurement:
    """What one rank measured since the last exchange (published at the exchange).

    Attributes:
        profile: the rank's fitted task-time profile, or None without task times.
        step_time: the rank's median step time over the window (seconds), or None.
        samples: how many task times the fit used.
        cost: the rank's fitted compute cost per call (fixed + per sample), or None.
        whole_calls: the profile's mean is the time of whole one-task calls, each call's fixed cost
            included (the rank ran no chunk, so its fixed and per-sample parts could not be told
            apart); :func:`harmonize` splits it like the chunked ranks' profiles.
        task_weight: the mean weight (samples) of the tasks measured, which turns ``cost`` into
            seconds per task.
        call_tasks: the window's typical call size in tasks (the task-weighted mean: the size of
            call the average task ran in), where its speed is read.
        call_seconds: the window's estimate of one call of ``call_tasks`` tasks: the median of its
            calls' times over what ``cost`` predicts for them, times ``cost``'s call of that size.
            ``cost`` is fitted to the newest few hundred calls, which a rank that slowed down a few
            steps ago outvotes; this follows the window. None without a cost model.
        speed_error: the relative standard error of the rank's speed in this window (of
            ``call_seconds``, or of the profile's mean without a cost model), for
            :func:`pool_equal_speeds`; None when unknown.
        shape_known: ``cost``'s calls spanned sizes at least 2x apart, so its split into fixed and
            per-sample parts means something (calls of one size are fitted as all per sample).
        step_error: the relative standard error of ``step_time`` (from the window's spread), or None
            with fewer than 3 steps: whether a switch made steps slower is judged against it.
    """

    profile: WorkerProfile | None
    step_time: float | None
    samples: int = 0
    cost: CostModel | None = None
    whole_calls: bool = False
    task_weight: float = 0.0
    call_tasks: float = 0.0
    call_seconds: float | None = None
    speed_error: float | None = None
    shape_known: bool = True
    step_error: float | None = None

    def to_json(self) -> str:
        profile = profiles_to_dict([self.profile]) if self.profile is not None else None
        cost = [self.cost.fixed, self.cost.per_sample, self.cost.fixed_stderr] if self.cost is not None else None
        return json.dumps(
            {
                "profile": profile,
                "step_time": self.step_time,
                "samples": self.samples,
                "cost": cost,
                "whole_calls": self.whole_calls,
                "task_weight": self.task_weight,
                "call_tasks": self.call_tasks,
                "call_seconds": self.call_seconds,
                "speed_error": self.speed_error,
                "shape_known": self.shape_known,
                "step_error": self.step_error,
            }
        )

    @staticmethod
    def from_json(text: bytes | str) -> Measurement:
        data = json.loads(text)
        profile = profiles_from_dict(data["profile"])[0] if data["profile"] is not None else None
        cost = CostModel(*data["cost"]) if data.get("cost") is not None else None
        whole = bool(data.get("whole_calls", False))
        weight = float(data.get("task_weight", 0.0))
        call, error, step_error = data.get("call_seconds"), data.get("speed_error"), data.get("step_error")
        return Measurement(
            profile, data["step_time"], int(data.get("samples", 0)), cost, whole, weight,
            float(data.get("call_tasks", 0.0)), float(call) if call is not None else None,
            float(error) if error is not None else None, bool(data.get("shape_known", True)),
            float(step_error) if step_error is not None else None,
        )  # fmt: skip


#: :func:`harmonize` never reads more than this share of a one-task call as fixed cost (a fit's noise
#: must not leave a rank with a per-task time near zero).
MAX_FIXED_SHARE = 0.9


def chunk_calls_shift(fixed: float, num_tasks: int, world_size: int, direct: bool = False) -> float:
    """The fixed cost a rank's primaries pay per step: ``fixed`` times the calls of an even share.

    Guided self-scheduling halves what is open, so an even share of K/P tasks takes about
    log2(K/P) + 1 calls; a direct step runs a share up to an even one as one call (a rank given
    more runs ceil(n / even) calls, which this per-step constant leaves out: it slightly favours
    the fastest rank). The same rule for every rank: counting a
    rank's own calls would feed back (spare work adds calls, a larger shift loses primaries, which
    makes more spare work). Charging a direct plan the coded step's calls took tasks from every slow
    rank: on hetero4 it gave the fastest rank 28 of 32 tasks where its measured cost curve gives 15.
    """
    if direct:
        return fixed
    share = num_tasks / world_size
    return fixed * (math.log2(max(1.0, share)) + 1.0)


def cost_shape(shared: Sequence[Measurement], previous: float | None = None) -> float | None:
    """``γ``: a call's fixed cost in units of one task's cost, shared by every rank (same model).

    The median over the ranks whose cost models can tell the parts apart (``shape_known``); without
    one (a plan of direct steps runs calls of one size per rank), ``previous``: the shape does not
    change with the plan, and a fit of one size reads it as 0, which made a rank given a task or two
    look twice as slow per task as it was (its calls are mostly fixed cost).
    """
    ratios = [
        m.cost.fixed / (m.cost.per_sample * m.task_weight)
        for m in shared
        if m.shape_known
        and not m.whole_calls
        and m.cost is not None
        and m.profile is not None
        and m.cost.per_sample * m.task_weight > 0
    ]
    if not ratios:
        return previous
    return min(float(np.median(ratios)), MAX_FIXED_SHARE / (1.0 - MAX_FIXED_SHARE))


def harmonize(
    shared: Sequence[Measurement], num_tasks: int, direct: bool = False, gamma: float | None = None
) -> list[Measurement]:
    """Every rank's profile from one cost shape shared by all ranks and the rank's own speed.

    The ranks run the same model, so their costs differ by a speed factor: one ratio ``γ`` of a
    call's fixed cost to a task's cost (``gamma``, or :func:`cost_shape` of ``shared``) describes
    every rank. Each rank's speed is read where its measurements are precise, at its own operating
    point: the time of its typical call (``call_seconds`` of ``call_tasks`` tasks), or of its
    one-task calls for a rank that ran only those (a slow rank given a task or two), divided by
    ``γ`` plus the call's tasks. A single rank's split into fixed and per-task parts is noise where
    its calls had nearly one size (a direct step runs one chunk per rank): judged alone, ranks as
    fast as each other looked up to 50 % apart and re-plans chased that noise. A rank of small calls,
    judged alone or extrapolated to an even share by its own fit, looked slower per task than it
    is, lost tasks, kept its calls small and looked slower still. Without a known shape the profiles
    stay as they are. ``direct``: the plans run direct steps (see :func:`chunk_calls_shift`).
    """
    share = num_tasks / len(shared)
    if gamma is None:
        gamma = cost_shape(shared)
    if gamma is None:
        return list(shared)
    out = []
    for m in shared:
        if m.profile is not None and m.cost is not None and (m.whole_calls or m.task_weight > 0):
            if m.whole_calls:  # one task per call: the profile's mean is a whole call's time
                per_task = m.profile.mean / (1.0 + gamma)
            elif m.call_seconds is not None and m.call_tasks > 0:
                per_task = m.call_seconds / (gamma + m.call_tasks)
            else:
                per_task = m.cost.seconds(m.task_weight * share) / (gamma + share)
            if per_task > 0:
                profile = WorkerProfile(
                    shift=chunk_calls_shift(gamma * per_task, num_tasks, len(shared), direct),
                    mean=per_task,
                    std=min(m.profile.std, per_task),
                )
                m = replace(m, profile=profile, whole_calls=False)
        out.append(m)
    return out


#: Ranks whose speeds differ by less than this many standard errors are planned as equally fast.
SAME_SPEED_Z = 2.0
#: The least relative error a speed is taken to have (a window of identical times is not exact).
MIN_SPEED_ERROR = 0.02
#: ... of a window with fewer than 3 calls (or task times without a cost model): its spread says little.
FEW_SAMPLES_ERROR = 0.3
#: The most a window's speeds are taken to wander: ranks about 1.5x apart are always told apart.
MAX_WINDOW_NOISE = 0.15
#: ... and at the first exchange, before the windows' wander can be seen: ranks less than about 28 %
#: apart (2 · √2 · 10 %) start even; the next exchange tells them apart if they really differ.
FIRST_WINDOW_ERROR = 0.1


@dataclass(frozen=True)
class SpeedEstimate:
    """A rank's speed from one or more windows: the log of its time for a share
    (:func:`share_seconds`), and that log's variance (the squared relative error)."""

    log_seconds: float
    variance: float
    windows: int = 1

    @staticmethod
    def of(profile: WorkerProfile, error: float, share: float) -> SpeedEstimate:
        """One window's (or a planned profile's) estimate, ``error`` its relative error."""
        return SpeedEstimate(math.log(max(share_seconds(profile, share), 1e-12)), error**2)

    @property
    def seconds(self) -> float:
        return math.exp(self.log_seconds)

    @property
    def error(self) -> float:
        return math.sqrt(self.variance)

    def merged(self, window: SpeedEstimate) -> SpeedEstimate:
        """This estimate and a new window, each weighed by the inverse of its variance (the result's
        error at least :data:`MIN_SPEED_ERROR`: no number of windows makes a speed exact)."""
        weight, other = 1.0 / self.variance, 1.0 / window.variance
        log_seconds = (weight * self.log_seconds + other * window.log_seconds) / (weight + other)
        variance = max(MIN_SPEED_ERROR**2, 1.0 / (weight + other))
        return SpeedEstimate(log_seconds, variance, self.windows + window.windows)


def pool_equal_speeds(shared: Sequence[Measurement], error_floor: float = MIN_SPEED_ERROR) -> tuple[WorkerProfile, ...]:
    """Every rank's profile, ranks that the measurements cannot tell apart sharing one pooled profile.

    Ranks are taken from the fastest; a rank joins the group of the rank that opened it when their
    per-task means differ by less than :data:`SAME_SPEED_Z` times their combined relative error
    (:attr:`Measurement.speed_error`, at least ``error_floor``). Without this an equal cluster is
    split by noise: on shared cores a rank's window speed wanders by 10–50 %, more than the
    threshold a re-plan must beat, and the uneven split then costs real time every step.
    """
    profiles = [m.profile for m in shared]
    assert all(p is not None for p in profiles)
    errors = [max(error_floor, m.speed_error if m.speed_error is not None else 0.0) for m in shared]
    order = sorted(range(len(shared)), key=lambda r: profiles[r].mean)  # type: ignore[union-attr]
    groups: list[list[int]] = []
    for r in order:
        if groups:
            anchor = groups[-1][0]
            gap = math.log(profiles[r].mean / profiles[anchor].mean)  # type: ignore[union-attr]
            if gap <= SAME_SPEED_Z * math.hypot(errors[r], errors[anchor]):
                groups[-1].append(r)
                continue
        groups.append([r])
    out = list(profiles)
    for group in groups:
        if len(group) > 1:
            pooled = _pooled([profiles[r] for r in group])  # type: ignore[misc]
            for r in group:
                out[r] = pooled
    return tuple(out)  # type: ignore[arg-type]


@dataclass
class ReplanPolicy:
    """When to switch plans, from every rank's measurements (the same decision on every rank).

    Args:
        threshold: switch only when the predicted step time improves by more than this share.
        hold_exchanges: after a revert, keep the plan for this many exchanges.
        gamma: the planner's γ.
        direct: the measured plans run direct steps (each rank's share in one call); the Planner sets
            it from the plan in use at every exchange.
    """

    threshold: float = 0.1
    hold_exchanges: int = 3
    gamma: float = 1.0
    direct: bool = False
    _previous: tuple[WorkerProfile, ...] | None = field(default=None, repr=False)  # the plan before a switch
    _window_before: float | None = field(default=None, repr=False)  # its measured step time
    _window_error_before: float = field(default=0.0, repr=False)  # that time's relative error
    _switched_to: tuple[WorkerProfile, ...] | None = field(default=None, repr=False)  # the fits switched on
    _hold: int = field(default=0, repr=False)
    _speeds: tuple[float, ...] | None = field(default=None, repr=False)  # each rank's mean at the last exchange
    _unmeasured: tuple[int, ...] = field(default=(), repr=False)  # per rank: exchanges in a row without task times
    _waited: int = field(default=0, repr=False)  # exchanges a guess has waited for enough task times
    _deviations: tuple[int, ...] = field(default=(), repr=False)  # per rank: the last window's _deviation
    _cost_shape: float | None = field(default=None, repr=False)  # the last known cost_shape
    _estimates: tuple[SpeedEstimate, ...] = field(default=(), repr=False)  # per rank: its windows so far
    _basis: tuple[int, bool] | None = field(default=None, repr=False)  # (K, direct) the speeds are read for

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
        share = num_tasks / len(shared)
        if self._basis != (num_tasks, self.direct) or len(self._estimates) not in (0, len(shared)):
            # A time for a share depends on K and on the calls a step is charged (direct or not):
            # windows read in another basis neither accumulate nor show wander.
            self._basis = (num_tasks, self.direct)
            self._estimates = self._deviations = ()
            self._speeds = None
        if not measured_before:  # a new guess (a new K): a switch made for another K is not judged here
            self._previous = self._window_before = self._switched_to = None
        self._cost_shape = cost_shape(shared, self._cost_shape)
        shared = harmonize(shared, num_tasks, self.direct, self._cost_shape)
        times = [m.step_time for m in shared if m.step_time is not None]
        window = float(np.median(times)) if len(times) == len(shared) else None
        window_error = _window_step_error(shared)
        if self._previous is not None and window is not None and self._window_before is not None:
            previous, before, switched_to = self._previous, self._window_before, self._switched_to
            self._previous = self._window_before = self._switched_to = None
            # The switch made real steps slower by more than half the threshold and by more than the
            # two windows' noise: go back, and hold. (A window is a few steps: with jittery tasks its
            # median moves by 5-10 %, and a margin of half the threshold alone reverted a right
            # switch about every other time.) Unless the ranks' speeds changed since (the fits
            # moved): then the windows do not compare.
            noise = SAME_SPEED_Z * math.hypot(self._window_error_before, window_error)
            slower = window > before * (1.0 + max(self.threshold / 2, noise))
            if slower and not _speeds_changed(switched_to, shared, share):
                self._hold = self.hold_exchanges
                self._deviations = ()
                return "revert", previous
        if self._hold > 0:
            self._hold -= 1
            return "keep", None
        if not measured_before:
            # Replacing the guess needs a few task times from every rank, but a rank the guess gives one
            # task per step (or none) may never gather them: after MAX_WINDOWS exchanges of waiting,
            # go with what there is (few task times are weighed by their error; a rank with none is
            # planned like the others, as uncertain as a guess, and measured under the new plan).
            short = any(m.profile is None or m.samples < MIN_SAMPLES for m in shared)
            if all(m.profile is None for m in shared) or (short and self._waited < MAX_WINDOWS):
                self._waited += 1
                return "keep", None
            self._waited = 0
            made_up = [m.profile is None for m in shared]
            if short:  # waited long enough: a rank with no task time is planned like the others
                pooled = _pooled([m.profile for m in shared if m.profile is not None])
                shared = [
                    m if m.profile is not None else replace(m, profile=pooled, speed_error=FEW_SAMPLES_ERROR)
                    for m in shared
                ]
        # A rank without task times in its windows (given none, or everything purged) keeps the profile
        # it is planned with, as uncertain as a guess: the others' news must not wait for it, and a
        # rank given almost nothing still reports what its few tasks show (pool_equal_speeds weighs
        # them by their error), so a rank that became fast is not starved of the tasks that show it.
        # The error doubles with every exchange it goes without, so that a rank planned with no task
        # at all (a direct plan has no spare work to measure it) is pooled with faster ranks now and
        # then, and shows whether it became fast.
        before = self._unmeasured if len(self._unmeasured) == len(shared) else (0,) * len(shared)
        self._unmeasured = tuple(n + 1 if m.profile is None else 0 for n, m in zip(before, shared))
        shared = [
            m if m.profile is not None else replace(m, profile=c, speed_error=FEW_SAMPLES_ERROR * 2 ** (n - 1))
            for m, c, n in zip(shared, current, self._unmeasured)
        ]
        noise = self._window_noise(shared, share)
        errors = [max(noise, m.speed_error if m.speed_error is not None else 0.0) for m in shared]
        windows = [SpeedEstimate.of(m.profile, e, share) for m, e in zip(shared, errors)]  # type: ignore[arg-type]
        if measured_before:
            # A rank's speed is what its windows since its last change show together, each weighed by
            # its error, so that evidence accumulates: one window of a direct plan is 3-4 calls per
            # rank, and ranks 2x apart (1.6x measured: per-task overhead compresses speeds) cannot be
            # told apart by any single window. Judged one window at a time against their pooled plan,
            # such ranks stayed pooled for good (hetero4: the speed-4 and speed-2 ranks, [4, 4, 12, 12]).
            # A window within the combined error joins the estimate. One beyond it is set aside, unless
            # it is far beyond or in the same direction as the window before: then the estimate starts
            # again from this window. On shared cores the scheduler slows a rank by up to 2x for a
            # window or two, and each plan switch costs a coded step: what earlier windows established
            # is not lost to one noisy window.
            priors = self._priors(current, noise, share)
            deviations = [_deviation(w, p) if n == 0 else 0 for w, p, n in zip(windows, priors, self._unmeasured)]
            before = self._deviations if len(self._deviations) == len(shared) else (0,) * len(shared)
            self._deviations = tuple(deviations)
            estimates = []
            for own, prior, d, b, n in zip(windows, priors, deviations, before, self._unmeasured):
                if n > 0:  # no window: the prior, as uncertain as the rank's (growing) error says
                    estimates.append(SpeedEstimate(prior.log_seconds, max(prior.variance, own.variance), 1))
                elif d == 0:
                    estimates.append(prior.merged(own))
                elif abs(d) < 2 and d * b <= 0:  # set aside: wander, unless the next window shows it too
                    estimates.append(prior)
                else:
                    estimates.append(own)
        else:
            estimates = windows
            self._deviations = ()
        self._estimates = tuple(estimates)
        if not measured_before:  # a profile made up for a rank without task times is no evidence
            self._estimates = tuple(
                SpeedEstimate(e.log_seconds, max(e.variance, 1.0), 0) if m else e for e, m in zip(estimates, made_up)
            )
        # An estimate's error is at least a window's wander over the square root of its windows, and
        # no less than from four windows: windows do not wander independently (the scheduler favours a
        # rank for a while; a rank given more tasks runs longer alone on shared cores), so many windows
        # are less precise than their count says.
        pooling_errors = [max(e.error, noise / math.sqrt(min(max(e.windows, 1), 4))) for e in estimates]
        shared = [
            replace(m, speed_error=error)
            if e.log_seconds == w.log_seconds  # the window's speed: its profile as it is
            else replace(m, profile=_at_speed(m.profile, e.seconds, share), speed_error=error)  # type: ignore[arg-type]
            for m, w, e, error in zip(shared, windows, estimates, pooling_errors)
        ]
        measured = pool_equal_speeds(shared)
        if not measured_before:  # a guess, perhaps not even in seconds: always replace it
            even = (_pooled(measured),) * len(measured)
            if len(set(current)) == 1 and not self._pays(measured, even, num_tasks):
                # From an even guess, ranks whose measured differences do not pay for an uneven split
                # (noise, on a homogeneous cluster) stay even: one pooled profile, in measured units.
                return "switch", even
            return "switch", measured
        if self._pays(measured, current, num_tasks):
            self._previous, self._window_before, self._switched_to = tuple(current), window, measured
            self._window_error_before = window_error
            return "switch", measured
        return "keep", None

    def _window_noise(self, shared: Sequence[Measurement], share: float) -> float:
        """How far a rank's speed moves from one exchange to the next (relative, one window's error).

        A window's own spread misses what moves a whole window (on shared cores, which rank the
        scheduler favours for a while): the ranks' changes since the last exchange show it. The
        median over ranks, so that one rank really changing speed does not count as noise. Speeds
        are compared in the time of a share (:func:`share_seconds`): a re-fitted cost shape moves
        every rank's per-task mean, which is not wander.
        """
        times = (share_seconds(m.profile, share) for m in shared if m.profile is not None)
        speeds = tuple(t for t in times if t > 0)
        previous, self._speeds = self._speeds, speeds if len(speeds) == len(shared) else None
        if previous is None or self._speeds is None or len(previous) != len(speeds):
            return FIRST_WINDOW_ERROR  # one window (the first, warm-up's noisiest) cannot show its wander
        changes = [abs(math.log(now / before)) for now, before in zip(speeds, previous)]
        # σ of one window from the median absolute change of two: 1.4826 · median / √2; at most
        # MAX_WINDOW_NOISE, since a change of plan moves the measured speeds too (on shared cores a
        # rank given more tasks runs longer alone), and that is not noise.
        wander = 1.4826 * float(np.median(changes)) / math.sqrt(2.0)
        return min(MAX_WINDOW_NOISE, max(MIN_SPEED_ERROR, wander))

    def _priors(self, current: Sequence[WorkerProfile], noise: float, share: float) -> list[SpeedEstimate]:
        """Every rank's estimate so far; without one (a restored run, or K or the kind of step changed),
        the profile it is planned with, as precise as a window's wander (``noise``). ``decide`` has
        dropped estimates of another world size, so any that are left are one per rank."""
        if self._estimates:
            return list(self._estimates)
        return [SpeedEstimate.of(c, noise, share) for c in current]

    def _pays(self, measured: Sequence[WorkerProfile], current: Sequence[WorkerProfile], num_tasks: int) -> bool:
        """Whether the split from ``measured`` beats ``current``'s split by more than the threshold (both
        predicted with the measured profiles)."""
        now = predicted_step_time(measured, _split(tuple(current), num_tasks, self.gamma))
        proposed = predicted_step_time(measured, _split(tuple(measured), num_tasks, self.gamma))
        return proposed < (1.0 - self.threshold) * now

    def state_dict(self) -> dict:
        # The cost shape too: under a direct plan every call has one size, so a restored run could
        # not learn it again, and would read a rank of small calls as slow.
        return {"hold": self._hold, "cost_shape": self._cost_shape}

    def load_state_dict(self, state: dict) -> None:
        self._hold = int(state.get("hold", 0))
        shape = state.get("cost_shape")
        # What the windows since showed belongs to the run that was replaced.
        self._previous = self._window_before = self._switched_to = self._speeds = None
        self._unmeasured = self._deviations = self._estimates = ()
        self._waited = 0
        self._cost_shape = float(shape) if shape is not None else None


def share_seconds(profile: WorkerProfile, share: float) -> float:
    """A profile's expected time for ``share`` tasks: what its speed is compared in.

    Not the per-task mean: a window's cost shape (how much of a call is fixed, γ) is re-fitted at
    every exchange, and a rank that ran one-task calls carries the fixed cost in its mean. Two
    profiles of the same speed in different shapes have different means but nearly the same time
    for the share they are planned around.
    """
    return profile.shift + share * profile.mean


def _deviation(window: SpeedEstimate, prior: SpeedEstimate) -> int:
    """How a rank's window compares with its estimate so far (both uncertain): 0 within
    :data:`SAME_SPEED_Z` combined errors, +1 / -1 slower / faster beyond them, +2 / -2 beyond twice
    what they would be if the estimate were at least as uncertain as the window.

    The last: a window's error describes its spread, not the scheduler's heavy tail (a rank slowed 2x
    for a window): a precise estimate must not make one such window move the plan at once.
    """
    gap = window.log_seconds - prior.log_seconds
    bound = SAME_SPEED_Z * math.sqrt(window.variance + prior.variance)
    if abs(gap) <= bound:
        return 0
    far = 2 * SAME_SPEED_Z * math.sqrt(window.variance + max(prior.variance, window.variance))
    return int(math.copysign(2 if abs(gap) > far else 1, gap))


def _at_speed(window: WorkerProfile, seconds: float, share: float) -> WorkerProfile:
    """The window's profile (its cost shape) scaled to take ``seconds`` for a share: every rank is
    planned in the same shape, so that only speeds, not shapes, tell ranks apart."""
    if share_seconds(window, share) <= 0:
        return WorkerProfile(shift=0.0, mean=seconds / share, std=0.0)
    factor = seconds / share_seconds(window, share)
    return WorkerProfile(shift=window.shift * factor, mean=window.mean * factor, std=window.std * factor)


def _pooled(profiles: Sequence[WorkerProfile]) -> WorkerProfile:
    """One profile for ranks planned as equal: the ranks' mean shift and mean, and their pooled std."""
    return WorkerProfile(
        shift=float(np.mean([p.shift for p in profiles])),
        mean=float(np.mean([p.mean for p in profiles])),
        std=float(np.sqrt(np.mean([p.std**2 for p in profiles]))),
    )


#: A rank's speed moving by more than this share means its speed changed, not the plan's effect.
SPEED_CHANGE = 0.25


def _speeds_changed(before: Sequence[WorkerProfile] | None, shared: Sequence[Measurement], share: float) -> bool:
    """Whether some rank's time for a share moved by more than :data:`SPEED_CHANGE` since ``before``."""
    if before is None:
        return False
    for old, m in zip(before, shared):
        if m.profile is None:
            continue
        then, now = share_seconds(old, share), share_seconds(m.profile, share)
        if abs(now - then) > SPEED_CHANGE * then:
            return True
    return False


def _window_step_error(shared: Sequence[Measurement]) -> float:
    """The relative error of a window's step time: the median of the ranks' (0 where unknown). Every
    rank times the same synchronous steps, so the ranks' errors are not independent samples."""
    errors = [m.step_error for m in shared if m.step_error is not None]
    return float(np.median(errors)) if len(errors) == len(shared) else 0.0


@lru_cache(maxsize=16)
def _split(profiles: tuple[WorkerProfile, ...], num_tasks: int, gamma: float) -> tuple[int, ...]:
    """:func:`~codedgrad.plan.optimal_split` without redundancy, cached: every exchange splits the
    profiles of the plan in use again (a split costs ~0.3 ms of the compute thread)."""
    return tuple(optimal_split(list(profiles), num_tasks, 1.0, gamma))


def predicted_step_time(profiles: Sequence[WorkerProfile], split: Sequence[int]) -> float:
    """The slowest rank's expected finish time under ``split`` (the planner's view of a step)."""
    return float(split_statistics(profiles, split).mean_finish.max())
