"""Simulators of the stream and training-step models (docs/design.md#the-model), vectorised with numpy.

**One job.** Every worker p starts at time 0 and works through its ``split[p]`` task slots in
order; its i-th result exists at ``shift_p + X_1 + … + X_i``. The job is done when K results exist
across all workers (coded-linear model: any K of the ``sum(split) >= K`` results suffice) and the
rest is purged, so a job's *service time* is the K-th smallest of all slot finish times.

**Task times.** The simulators draw X from :meth:`codedgrad.profile.WorkerProfile.sample_task_times`,
the one place that decides the distribution: constant when ``std == 0``, shifted exponential
``(mean − std) + Exp(std)`` when ``std <= mean`` (``std == mean`` is the paper's exponential task),
and gamma with the profile's mean and std when ``std > mean``.

**Stream** (:func:`simulate_stream`): jobs arrive as a Poisson process of rate λ and are served in
order; job j starts at ``max(arrival_j, end_{j-1})`` and its delay is ``end_j − arrival_j``.
**Training** (:func:`simulate_training`): closed loop, the next step starts when the previous one
ends; a step takes the service time plus the gradient all-reduce.

Every simulator takes a ``seed`` and is reproducible. Arrivals and service times come from two
independent streams derived from that seed, so two splits simulated with the same seed see the
same arrival times (common random numbers make their comparison less noisy), and a training run
and a stream run with the same seed and split see the same service times.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codedgrad.profile import WorkerProfile

__all__ = [
    "StreamResult",
    "TrainingResult",
    "service_times",
    "simulate_stream",
    "simulate_training",
    "success_rate",
]

# Largest number of slot finish times held at once (32 MB of float64): jobs are simulated in
# chunks of this many slots so that long streams with many slots per job fit in memory.
_CHUNK_FLOATS = 4_000_000

# Batches for the batch-means standard error: in-order delays are correlated from job to job (a
# long job delays the next ones), so the plain std/√n would understate the error of the mean.
_BATCHES = 20


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    return int(value)


def _check_split(profiles: Sequence[WorkerProfile], split: Sequence[int] | np.ndarray, tasks: int) -> np.ndarray:
    """Validate the simulator inputs; return the split as an int64 array."""
    if len(profiles) == 0:
        raise ValueError("profiles: need at least one worker")
    for i, p in enumerate(profiles):
        if not isinstance(p, WorkerProfile):
            raise ValueError(f"profiles[{i}]: expected a WorkerProfile, got {type(p).__name__}")
    _check_count("tasks", tasks)
    loads = np.asarray(split)
    if loads.shape != (len(profiles),):
        raise ValueError(f"split: need one load per worker ({len(profiles)}), got shape {loads.shape}")
    if loads.dtype.kind == "f" and np.all(np.isfinite(loads)) and np.all(loads == np.round(loads)):
        loads = loads.astype(np.int64)  # whole numbers stored as floats are fine
    if loads.dtype.kind not in "iu":
        raise ValueError(f"split: loads must be whole numbers, got {loads.tolist()}")
    loads = loads.astype(np.int64)
    if np.any(loads < 0):
        raise ValueError(f"split: loads must be >= 0, got {loads.tolist()}")
    if int(loads.sum()) < tasks:
        raise ValueError(
            f"split: hands out {int(loads.sum())} slots, fewer than tasks={tasks}; need sum(split) >= tasks"
        )
    return loads


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    return int(seed)


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(arrival stream, service stream): independent generators derived from one seed."""
    arrival, service = np.random.SeedSequence(_check_seed(seed)).spawn(2)
    return np.random.default_rng(arrival), np.random.default_rng(service)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _batch_means_stderr(values: np.ndarray) -> float:
    """Standard error of the mean of a correlated sequence, by the method of batch means."""
    n = values.size
    if n < 2:
        return math.nan
    if n < 2 * _BATCHES:
        return float(values.std(ddof=1) / math.sqrt(n))
    size = n // _BATCHES
    means = values[: size * _BATCHES].reshape(_BATCHES, size).mean(axis=1)
    return float(means.std(ddof=1) / math.sqrt(_BATCHES))


def service_times(
    profiles: Sequence[WorkerProfile],
    split: Sequence[int] | np.ndarray,
    tasks: int,
    jobs: int,
    rng: np.random.Generator,
    *,
    chunk_floats: int = _CHUNK_FLOATS,
) -> np.ndarray:
    """Service times of ``jobs`` independent jobs: the time at which the K-th result exists.

    Args:
        profiles: one profile per worker.
        split: task slots per worker (non-negative integers, ``sum(split) >= tasks``).
        tasks: K, the number of results a job needs.
        jobs: how many jobs to simulate.
        rng: the random generator the task times are drawn from.
        chunk_floats: at most this many slot finish times are held in memory at once.

    Returns:
        float64 array of shape ``(jobs,)``.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    loads = _check_split(profiles, split, tasks)
    jobs = _check_count("jobs", jobs)
    chunk_floats = _check_count("chunk_floats", chunk_floats)
    slots = int(loads.sum())
    busy = [(profile, int(k)) for profile, k in zip(profiles, loads) if k > 0]
    chunk = max(1, chunk_floats // slots)
    out = np.empty(jobs)
    for first in range(0, jobs, chunk):
        n = min(chunk, jobs - first)
        # finish[j, s]: when slot s of job j yields its result; each worker owns a block of columns.
        finish = np.empty((n, slots))
        column = 0
        for profile, k in busy:
            block = finish[:, column : column + k]
            block[...] = profile.sample_task_times(rng, (n, k))
            np.cumsum(block, axis=1, out=block)  # a worker's i-th result needs its first i tasks
            block += profile.shift
            column += k
        # The job ends at the K-th smallest finish time; partition finds it in linear time.
        finish.partition(tasks - 1, axis=1)
        out[first : first + n] = finish[:, tasks - 1]
    return out


@dataclass(frozen=True, eq=False)
class StreamResult:
    """One simulated stream of jobs served in order (all arrays have one entry per job, read-only).

    Attributes:
        arrival_rate: λ, jobs per unit time.
        arrivals: arrival times (a Poisson process).
        starts: when each job's service starts, ``max(arrival_j, end_{j-1})``.
        ends: when each job is done.
        service_times: ``ends − starts``.
        delays: ``ends − arrivals``: waiting plus service.
    """

    arrival_rate: float
    arrivals: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    service_times: np.ndarray
    delays: np.ndarray

    @property
    def mean_delay(self) -> float:
        """Mean in-order delay (what the paper plots)."""
        return float(self.delays.mean())

    @property
    def mean_service_time(self) -> float:
        """Mean service time of one job."""
        return float(self.service_times.mean())

    @property
    def utilisation(self) -> float:
        """λ · mean service time: the share of time the workers are busy, if below 1."""
        return self.arrival_rate * self.mean_service_time

    @property
    def stable(self) -> bool:
        """Whether the queue keeps up (utilisation < 1); otherwise the delays grow without bound."""
        return self.utilisation < 1.0

    @property
    def delay_standard_error(self) -> float:
        """Standard error of :attr:`mean_delay` by batch means (delays are correlated)."""
        return _batch_means_stderr(self.delays)


def simulate_stream(
    profiles: Sequence[WorkerProfile],
    split: Sequence[int] | np.ndarray,
    tasks: int,
    arrival_rate: float,
    jobs: int = 10_000,
    seed: int = 0,
) -> StreamResult:
    """Simulate Poisson arrivals of rate λ served in order (docs/design.md#the-model, stream model).

    Args:
        profiles: one profile per worker.
        split: task slots per worker (``sum(split) >= tasks``).
        tasks: K, the number of results a job needs.
        arrival_rate: λ > 0, jobs per unit time.
        jobs: number of jobs to simulate.
        seed: random seed (see the module docstring for what it controls).

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    loads = _check_split(profiles, split, tasks)
    if isinstance(arrival_rate, bool) or not (
        isinstance(arrival_rate, (int, float, np.number)) and math.isfinite(arrival_rate) and arrival_rate > 0
    ):
        raise ValueError(f"arrival_rate: must be finite and > 0, got {arrival_rate!r}")
    jobs = _check_count("jobs", jobs)
    arrival_rng, service_rng = _streams(seed)
    arrivals = np.cumsum(arrival_rng.exponential(1.0 / arrival_rate, jobs))
    service = service_times(profiles, loads, tasks, jobs, service_rng)
    # Lindley's recursion start_j = max(a_j, end_{j-1}) without a Python loop: with C_j the total
    # service of jobs 1..j, end_j = C_j + max_{i<=j}(a_i − C_{i−1}), so start_j = C_{j−1} + that max.
    done_before = np.concatenate(([0.0], np.cumsum(service)[:-1]))
    starts = done_before + np.maximum.accumulate(arrivals - done_before)
    starts = np.maximum(starts, arrivals)  # undo rounding that could put a start an ulp before its arrival
    ends = starts + service
    return StreamResult(
        arrival_rate=float(arrival_rate),
        arrivals=_readonly(arrivals),
        starts=_readonly(starts),
        ends=_readonly(ends),
        service_times=_readonly(service),
        delays=_readonly(ends - arrivals),
    )


@dataclass(frozen=True, eq=False)
class TrainingResult:
    """Simulated closed-loop training steps (arrays read-only, one entry per step).

    Attributes:
        allreduce_time: the fixed gradient all-reduce time added to every step.
        service_times: time until the K-th result of each step exists.
        step_times: ``service_times + allreduce_time``.
    """

    allreduce_time: float
    service_times: np.ndarray
    step_times: np.ndarray

    @property
    def mean_step_time(self) -> float:
        """Mean time of one training step."""
        return float(self.step_times.mean())

    @property
    def step_time_standard_error(self) -> float:
        """Standard error of :attr:`mean_step_time` (steps are independent in the closed loop)."""
        return _batch_means_stderr(self.step_times)

    @property
    def ends(self) -> np.ndarray:
        """When each step ends (the first starts at 0, each next one when the previous ends)."""
        return np.cumsum(self.step_times)


def simulate_training(
    profiles: Sequence[WorkerProfile],
    split: Sequence[int] | np.ndarray,
    tasks: int,
    steps: int = 1000,
    allreduce_time: float = 0.0,
    seed: int = 0,
) -> TrainingResult:
    """Simulate closed-loop training: each step starts when the previous one ends.

    Args:
        profiles: one profile per worker.
        split: task slots per worker (``sum(split) >= tasks``).
        tasks: K, the number of results a step needs.
        steps: number of steps to simulate.
        allreduce_time: fixed time of the gradient all-reduce after each step (>= 0).
        seed: random seed; the same seed and split give the same service times as
            :func:`simulate_stream`.

    Raises:
        ValueError: an argument is invalid; the message names it.
    """
    loads = _check_split(profiles, split, tasks)
    steps = _check_count("steps", steps)
    if isinstance(allreduce_time, bool) or not (
        isinstance(allreduce_time, (int, float, np.number)) and math.isfinite(allreduce_time) and allreduce_time >= 0
    ):
        raise ValueError(f"allreduce_time: must be finite and >= 0, got {allreduce_time!r}")
    _, service_rng = _streams(seed)
    service = service_times(profiles, loads, tasks, steps, service_rng)
    return TrainingResult(
        allreduce_time=float(allreduce_time),
        service_times=_readonly(service),
        step_times=_readonly(service + allreduce_time),
    )


def success_rate(
    service_times: Sequence[float] | np.ndarray, deadlines: float | Sequence[float] | np.ndarray
) -> np.ndarray:
    """Share of jobs whose service time is within each deadline d (``service <= d``).

    Args:
        service_times: per-job service times (``end − start``), e.g. ``StreamResult.service_times``.
        deadlines: one deadline or an array of them.

    Returns:
        float array shaped like ``deadlines``, each value in [0, 1] and non-decreasing in d.
    """
    times = np.sort(np.asarray(service_times, dtype=np.float64).ravel())
    if times.size == 0:
        raise ValueError("service_times: need at least one job")
    if np.any(np.isnan(times)):
        raise ValueError("service_times: must not contain NaN")
    d = np.asarray(deadlines, dtype=np.float64)
    if np.any(np.isnan(d)):
        raise ValueError("deadlines: must not contain NaN")
    return np.searchsorted(times, d, side="right") / times.size
