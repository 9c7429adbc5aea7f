"""The load split: how many of a job's task slots each worker gets (docs/design.md, "The model").

The *optimal split* of Esfahanizadeh, Cohen & Médard gives worker p a real load κ_p ≥ 0 with
Σ κ_p = K·Ω such that every worker in use has the same cost ``f_p(κ) = E[T_p] + γ·E[T_p²]``.
f_p is an increasing quadratic in κ, so for a common *water level* θ each κ_p(θ) is the positive
root of ``γm²κ² + (m + 2γcm + γσ²)κ + (c + γc²) − θ = 0`` and zero below the constant term.
Σ κ_p(θ) is continuous and increasing in θ, so Brent's method (``scipy.optimize.brentq``) finds the
level on a bracket to machine precision.
Integer loads come from a deterministic rounding that, among all integer splits with the same
total, minimises the largest cost (see :func:`optimal_split`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq

from codedgrad.profile import WorkerProfile

__all__ = [
    "MAX_SLOTS",
    "PlanError",
    "SplitStatistics",
    "capacity_time",
    "choose_redundancy",
    "optimal_split",
    "propose_num_tasks",
    "real_split",
    "split_statistics",
    "stream_lower_bound",
    "total_slots",
    "training_step_lower_bound",
    "uniform_split",
]


#: The most task slots (K·Ω) of one job: counts of slots stay exact in float64 up to here.
MAX_SLOTS = 2**53


class PlanError(ValueError):
    """The planner's inputs are invalid; the message names the offending argument."""


def _check_profiles(profiles: Sequence[WorkerProfile]) -> None:
    if len(profiles) == 0:
        raise PlanError("profiles: need at least one worker")
    for i, p in enumerate(profiles):
        if not isinstance(p, WorkerProfile):
            raise PlanError(f"profiles[{i}]: expected a WorkerProfile, got {type(p).__name__}")


def _real(name: str, value: object, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a finite float >= ``minimum`` (> if ``strict``), or PlanError naming ``name``."""
    relation = ">" if strict else ">="
    problem = PlanError(f"{name}: must be finite and {relation} {minimum:g}, got {value!r}"[:200])
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise problem
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise problem from None
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        raise problem
    return number


def _count(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (numpy integers too, never a bool), or PlanError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PlanError(f"{name}: must be an integer >= {minimum}, got {value!r}"[:200])
    return int(value)


def _check_gamma(gamma: float) -> None:
    _real("gamma", gamma)


def total_slots(tasks: int, redundancy: float = 1.0) -> int:
    """K·Ω rounded to the nearest integer (halves to even): the task slots handed out per job."""
    tasks = _count("tasks", tasks, 1)
    redundancy = _real("redundancy", redundancy, 1.0)
    if tasks > MAX_SLOTS or tasks * redundancy > MAX_SLOTS:
        raise PlanError(
            f"redundancy: K·Ω = {tasks} × {redundancy:g} slots is more than the planner counts ({MAX_SLOTS})"
        )
    return round(tasks * redundancy)


def _cost_coefficients(profiles: Sequence[WorkerProfile], gamma: float) -> tuple[np.ndarray, ...]:
    """(a, b, c0) with f_p(κ) = a_p κ² + b_p κ + c0_p."""
    c = np.array([p.shift for p in profiles])
    m = np.array([p.mean for p in profiles])
    s = np.array([p.std for p in profiles])
    return gamma * m * m, m + 2 * gamma * c * m + gamma * s * s, c + gamma * c * c


def _load_at_level(theta: float, a: np.ndarray, b: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """κ_p(θ): the non-negative root of a κ² + b κ + c0 = θ (0 when θ ≤ c0).

    Written as 2d / (b + √(b² + 4ad)) with d = θ − c0, which is exact for a = 0 (γ = 0) and does
    not cancel when a is small.
    """
    d = np.maximum(theta - c0, 0.0)
    return 2 * d / (b + np.sqrt(b * b + 4 * a * d))


def real_split(
    profiles: Sequence[WorkerProfile],
    total: float,
    gamma: float = 1.0,
    capacity: float | None = None,
) -> tuple[np.ndarray, float]:
    """The real-valued optimal loads (summing to ``total``) and the common cost level θ.

    Args:
        profiles: one profile per worker.
        total: the number of task slots to hand out (K·Ω).
        gamma: weight of the second moment in the cost.
        capacity: optional upper bound on each worker's load (e.g. K for a code that never gives a
            worker the same task twice); capped workers have a cost below θ.
    """
    _check_profiles(profiles)
    _check_gamma(gamma)
    if not (math.isfinite(total) and total >= 0):
        raise PlanError(f"total: must be finite and >= 0, got {total!r}")
    if capacity is not None and capacity * len(profiles) < total:
        raise PlanError(f"capacity: {len(profiles)} workers × {capacity} cannot hold {total} slots")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below, by name
        a, b, c0 = _cost_coefficients(profiles, gamma)
    cap = np.inf if capacity is None else float(capacity)

    def excess(theta: float) -> float:
        return float(np.minimum(_load_at_level(theta, a, b, c0), cap).sum()) - total

    # Bracket: at θ = min c0 nobody works (excess −total ≤ 0); at θ = max f_p(min(total, cap))
    # every worker holds min(total, cap) slots, together at least total (excess ≥ 0).
    one = min(float(total), cap)
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = float(c0.min()), float(np.max(a * one * one + b * one + c0))
        discriminant = float(np.max(b * b + 4 * a * (hi - c0)))  # the largest one _load_at_level meets
    if not (math.isfinite(hi) and math.isfinite(discriminant)):  # overflow: no level can be found
        name = "gamma" if gamma > 0 else "profiles"
        raise PlanError(
            f"{name}: the cost E[T] + γ·E[T²] of {one:g} slots overflows a float with γ = {gamma:g} and these "
            "profiles; use a smaller γ or profiles in other units"
        )
    if excess(hi) <= 0:
        # Every worker must be full (workers × min(total, cap) = total): θ is the top of the bracket,
        # where rounding in κ_p can leave the excess a hair below zero, which brentq would refuse.
        theta = hi
    else:
        # The excess is continuous and non-decreasing in θ (piecewise smooth: kinks where a worker
        # joins or reaches the cap), all a bracketing method needs. xtol is the smallest positive
        # float and rtol the least brentq accepts (4 ulp), so it stops only when the bracket cannot
        # shrink further: θ to machine precision.
        theta = brentq(excess, lo, hi, xtol=np.finfo(float).tiny, rtol=4 * np.finfo(float).eps, maxiter=200)
    load = np.minimum(_load_at_level(theta, a, b, c0), cap)
    return load, theta


def optimal_split(
    profiles: Sequence[WorkerProfile],
    tasks: int,
    redundancy: float = 1.0,
    gamma: float = 1.0,
    capacity: int | None = None,
) -> np.ndarray:
    """Integer loads that minimise the largest worker cost, summing exactly to round(K·Ω).

    The rounding is deterministic: every worker first gets ⌊κ_p⌋ of its real optimal load, then the
    remaining slots go one at a time to the worker whose cost after taking it is smallest (ties to
    the lower index). Taking slots in increasing order of marginal cost f_p(k) picks the N smallest
    of all values {f_p(k) : k ≥ 1}, so the largest cost is the N-th smallest value, which no integer
    split with the same total can beat; the floors are exactly the values below θ, so starting
    from them changes nothing but the run time.

    Args:
        profiles: one profile per worker.
        tasks: K, the number of equal tasks a job is split into.
        redundancy: Ω ≥ 1; K·Ω slots are handed out.
        gamma: weight of the second moment in the cost (0 balances expected finish times only).
        capacity: optional largest load of one worker.

    Returns:
        int64 array of loads, one per worker.
    """
    total = total_slots(tasks, redundancy)
    if capacity is not None:  # no worker can hold more than every slot: a larger cap changes nothing
        capacity = min(_count("capacity", capacity, 0), total)
    load, _ = real_split(profiles, total, gamma, capacity)
    a, b, c0 = _cost_coefficients(profiles, gamma)
    split = np.floor(load).astype(np.int64)
    cap = np.iinfo(np.int64).max if capacity is None else int(capacity)
    np.minimum(split, cap, out=split)

    # The heap loop runs on plain Python floats: numpy scalar indexing would dominate its cost.
    loads, a_, b_, c_ = split.tolist(), a.tolist(), b.tolist(), c0.tolist()
    first = (a * (split + 1) ** 2 + b * (split + 1) + c0).tolist()
    heap = [(first[p], p) for p in range(len(loads)) if loads[p] < cap]
    heapq.heapify(heap)
    for _ in range(total - sum(loads)):
        _, p = heapq.heappop(heap)
        loads[p] += 1
        if loads[p] < cap:
            k = loads[p] + 1
            heapq.heappush(heap, (a_[p] * (k * k) + b_[p] * k + c_[p], p))
    return np.array(loads, dtype=np.int64)


def uniform_split(workers: int | Sequence[WorkerProfile], tasks: int, redundancy: float = 1.0) -> np.ndarray:
    """The heterogeneity-oblivious baseline: round(K·Ω) slots spread evenly, remainder to the first."""
    count = workers if isinstance(workers, (int, np.integer)) else len(workers)
    if count < 1:
        raise PlanError(f"workers: need at least one, got {count}")
    total = total_slots(tasks, redundancy)
    split = np.full(count, total // count, dtype=np.int64)
    split[: total % count] += 1
    return split


@dataclass(frozen=True)
class SplitStatistics:
    """Predicted per-worker finish times and costs of a split (idle workers finish at 0)."""

    loads: np.ndarray
    mean_finish: np.ndarray
    std_finish: np.ndarray
    cost: np.ndarray

    @property
    def max_cost(self) -> float:
        """The largest cost among workers with work: what the optimal split minimises."""
        return float(self.cost[self.loads > 0].max())


def split_statistics(
    profiles: Sequence[WorkerProfile], split: Sequence[int] | np.ndarray, gamma: float = 1.0
) -> SplitStatistics:
    """E[T_p], std[T_p] and cost f_p for each worker under ``split``."""
    _check_profiles(profiles)
    _check_gamma(gamma)
    loads = np.asarray(split, dtype=np.int64)
    if loads.shape != (len(profiles),) or np.any(loads < 0):
        raise PlanError(f"split: need {len(profiles)} non-negative loads, got {list(loads)}")
    a, b, c0 = _cost_coefficients(profiles, gamma)
    busy = loads > 0
    mean = np.where(busy, [p.expected_time(k) for p, k in zip(profiles, loads)], 0.0)
    std = np.sqrt(loads) * np.array([p.std for p in profiles])
    cost = np.where(busy, a * loads * loads + b * loads + c0, 0.0)
    return SplitStatistics(loads=loads, mean_finish=mean, std_finish=std, cost=cost)


def capacity_time(profiles: Sequence[WorkerProfile], tasks: int) -> float:
    """The fluid lower bound on one job's time: all capacity pooled, no waste.

    The earliest t at which the workers can together have done K tasks on average,
    Σ_p max(0, t − c_p)/m_p = K; with no shifts this is K / Σ_p (1/m_p) (docs/design.md, "The model").
    It bounds the *expected* job time for task times with std ≤ mean (shifted exponential,
    exponential, deterministic). With heavier-tailed tasks (std > mean) and redundancy a job can
    on average finish sooner, because the fastest of many long-tailed copies beats the mean.
    """
    _check_profiles(profiles)
    total_slots(tasks)
    order = sorted(profiles, key=lambda p: p.shift)
    rate_sum = shift_over_mean = 0.0
    for i, p in enumerate(order):
        rate_sum += 1.0 / p.mean
        shift_over_mean += p.shift / p.mean
        t = (tasks + shift_over_mean) / rate_sum
        if i + 1 == len(order) or t <= order[i + 1].shift:
            return t
    raise AssertionError("unreachable")


def stream_lower_bound(profiles: Sequence[WorkerProfile], tasks: int, arrival_rate: float) -> float:
    """Ideal mean in-order delay: M/G/1 with deterministic service S = :func:`capacity_time`.

    Pollaczek–Khinchine: λS² / (2(1 − λS)) + S. Raises :class:`PlanError` when λS ≥ 1, because no
    split can keep that queue stable.
    """
    if not (math.isfinite(arrival_rate) and arrival_rate > 0):
        raise PlanError(f"arrival_rate: must be finite and > 0, got {arrival_rate!r}")
    service = capacity_time(profiles, tasks)
    load = arrival_rate * service
    if load >= 1:
        raise PlanError(
            f"arrival_rate: {arrival_rate:g} jobs per unit time is at or above capacity "
            f"({1 / service:.6g}); the queue would be unstable"
        )
    return arrival_rate * service**2 / (2 * (1 - load)) + service


def training_step_lower_bound(profiles: Sequence[WorkerProfile], tasks: int, allreduce_time: float = 0.0) -> float:
    """Closed-loop bound on one training step: :func:`capacity_time` plus the gradient all-reduce."""
    if not (math.isfinite(allreduce_time) and allreduce_time >= 0):
        raise PlanError(f"allreduce_time: must be finite and >= 0, got {allreduce_time!r}")
    return capacity_time(profiles, tasks) + allreduce_time


def choose_redundancy(
    profiles: Sequence[WorkerProfile],
    tasks: int,
    candidates: Sequence[float] = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5),
    tolerance: float = 0.02,
    gamma: float = 1.0,
    arrival_rate: float | None = None,
    jobs: int = 2000,
    seed: int = 0,
    task_overhead: float | Sequence[float] = 0.0,
) -> float:
    """The smallest Ω whose simulated mean delay is within ``tolerance`` of the best candidate.

    Redundancy costs compute (and, in training, energy and memory) for every job, so among the
    candidates that are nearly as fast as the fastest we take the least redundant one. Each
    candidate is simulated with the optimal split from the same seed (the arrivals are shared;
    the task times are drawn per split), with enough jobs that ``tolerance`` exceeds the noise.

    Args:
        profiles, tasks, gamma: as for :func:`optimal_split`.
        candidates: the redundancies to try (each ≥ 1).
        tolerance: relative slack over the best mean delay (0.02 = within 2 %).
        arrival_rate: λ of the stream model; None simulates closed-loop training steps instead.
        jobs: jobs (or steps) simulated per candidate.
        seed: random seed.
        task_overhead: the fixed cost of one call (seconds, one value or one per worker), as in
            :class:`~codedgrad.profile.CostModel`. With a ``batch_loss`` a rank's primaries run in a
            few chunks that pay it rarely, but every backup is a call of its own; so each worker's
            mean slot time is raised by ``overhead · (Ω − 1) / Ω``, the share of its slots that
            are backups. 0 (the default) simulates the profiles as they are.
    """
    from codedgrad import sim  # plan and sim are peers; import late to keep module loading acyclic

    if not candidates:
        raise PlanError("candidates: need at least one redundancy")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise PlanError(f"tolerance: must be finite and >= 0, got {tolerance!r}")
    try:
        overheads = np.broadcast_to(np.asarray(task_overhead, dtype=np.float64), (len(profiles),))
    except (TypeError, ValueError):
        raise PlanError(f"task_overhead: need one number or one per worker, got {task_overhead!r}"[:200]) from None
    if not (np.all(np.isfinite(overheads)) and np.all(overheads >= 0)):
        raise PlanError(f"task_overhead: must be finite and >= 0, got {task_overhead!r}")
    delays = []
    for omega in candidates:
        split = optimal_split(profiles, tasks, omega, gamma)
        backup_share = (omega - 1.0) / omega if omega > 0 else 0.0
        simulated = [
            WorkerProfile(p.shift, p.mean + float(o) * backup_share, p.std) for p, o in zip(profiles, overheads)
        ]
        if arrival_rate is None:
            delay = sim.simulate_training(simulated, split, tasks, steps=jobs, seed=seed).mean_step_time
        else:
            delay = sim.simulate_stream(simulated, split, tasks, arrival_rate, jobs=jobs, seed=seed).mean_delay
        delays.append(delay)
    best = min(delays)
    return min(omega for omega, d in zip(candidates, delays) if d <= best * (1 + tolerance))


def propose_num_tasks(
    world_size: int,
    step_compute_seconds: float,
    task_overhead_seconds: float,
    commit_seconds: float = 0.0,
    max_tasks: int | None = None,
    chunked: bool = False,
    redundancy: float = 1.0,
) -> int:
    """A number of tasks K that balances per-task overhead against the tail of a step.

    Splitting a step into more tasks has two opposite effects:

    * every task pays a fixed overhead ``o`` (the commit's Store round trips, kernel launches, the
      fixed part of a forward/backward), and a rank runs about K/P of them: + K·o/P per step;
    * the step ends with a *tail*: the ranks finish their last tasks at different moments, and
      whoever waits, waits for at most the rest of one in-flight task of length ``W/K`` (W the
      step's compute on one rank of average speed, spread over P ranks): + W/K per step.

    ``T(K) ≈ W/P + K·o/P + W/K`` is smallest at ``K* = sqrt(W·P/o)``. The result is then kept at
    least P (one task per rank), at least long enough that a task lasts 50 commits (docs/design.md,
    "Facts about the stack": coordination must stay a small share of the work), and at most
    ``max_tasks`` (e.g. the global batch size, one sample per task).

    Args:
        world_size: P, the number of ranks.
        step_compute_seconds: W, the time one average rank needs for the whole global batch.
        task_overhead_seconds: o, the fixed cost of one task, commit included.
        commit_seconds: the median commit time, for the 50× rule (0 to skip it).
        max_tasks: an upper bound on K, at least ``world_size``.
        chunked: the engine runs a rank's primaries in chunks that halve towards the end of the
            step (``backward(batch_loss=...)``): a rank then pays ``o`` about ``log2(K/P) + 1``
            times for its primaries instead of K/P times, plus once per backup, so
            ``T(K) ≈ W/P + o·(log2(K/P) + 1) + o·K·(Ω − 1)/P + W/K``, minimised over integer K.
            Tasks can then be much smaller: only the backups and the last chunks pay per task.
        redundancy: Ω, for the backups' overhead when ``chunked``.
    """
    world_size = _count("world_size", world_size, 1)
    work = _real("step_compute_seconds", step_compute_seconds, strict=True)
    overhead = _real("task_overhead_seconds", task_overhead_seconds, strict=True)
    commit = _real("commit_seconds", commit_seconds)
    redundancy = _real("redundancy", redundancy, minimum=1.0)
    if max_tasks is not None:
        max_tasks = _count("max_tasks", max_tasks, world_size)  # K >= P: one task per rank at least
    if chunked:
        p = world_size
        upper = max_tasks if max_tasks is not None else int(min(1e6, 100 * (work / overhead) + p))
        candidates = np.unique(np.geomspace(p, max(p, upper), 400).round().astype(np.int64)).astype(np.float64)
        predicted = work / p + overhead * (np.log2(candidates / p) + 1) + overhead * candidates * (redundancy - 1) / p
        predicted += work / candidates
        tasks = float(candidates[int(np.argmin(predicted))])
    else:
        tasks = math.sqrt(work * world_size) / math.sqrt(overhead)  # two roots: the ratio may overflow
    if commit > 0:  # a task lasts W/K on an average rank; keep it >= 50 commits
        tasks = min(tasks, work / (50 * commit))
    if max_tasks is not None:
        tasks = min(tasks, max_tasks)
    if not math.isfinite(tasks):
        raise PlanError(
            f"task_overhead_seconds: {overhead:g} s is too small against {work:g} s of compute for a finite "
            "number of tasks; give max_tasks"
        )
    return max(world_size, round(tasks))
