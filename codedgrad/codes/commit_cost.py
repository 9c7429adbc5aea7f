"""What a commit costs on the c10d Store as the world grows: a model fitted to ``bench_scale.py``.

A coded step commits every result with one ``compare_set`` on the step's single state key
(``codedgrad/runtime/coordinator.py``). The rank's expected value is the one it got from its own
last round trip, so:

* the **first** attempt fails when any other rank committed since then. Between two commits a
  rank computes a task of ``gap`` seconds, during which the others commit at rate ``λ_others``:
  the first attempt is stale with probability ``s = 1 − exp(−λ_others · gap)`` (≈ 1 for P ≥ 8);
* every **retry** starts from the value the failed attempt returned, one round trip ``rtt`` old:
  it fails with probability ``q = 1 − exp(−λ_others · rtt)`` (the contention of the single key);

so a commit takes ``1 + s / (1 − q)`` round trips, and ``latency = rtt · (1 + expected retries)``.
The round trip itself grows with the load of the Store server (one thread serves every request):
``rtt = rtt0 + service · ρ / (1 − ρ)`` with ``ρ = (operations per second) · service``, and
``operations per second = λ · (round trips + other operations per commit)``. ``λ``, the commits
per second of all ranks, depends on the latency again (a rank commits once per ``gap + latency``):
:func:`commit_latency` solves the fixed point. The ranks form a closed system, so an overloaded
server does not give an infinite latency but a long one: the commits slow the ranks down.

The **cost share** of a step is the share of a rank's working time spent committing,
``latency / (task + latency)``: the compute thread waits for its commit before the next task.

Pure Python and numpy; nothing here touches torch.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FITTED",
    "CommitCostModel",
    "CommitEstimate",
    "CommitProtocol",
    "commit_latency",
    "crossing_world_size",
    "expected_round_trips",
    "fit_commit_model",
    "project",
]


class CommitProtocol(enum.Enum):
    """How a commit reaches the Store."""

    CAS = "cas"  # today's: compare-and-set of the step's one state key, retried on a race
    COUNTERS = "counters"  # race-free (docs/scale.md): add on the task's key, add on the covered count


@dataclass(frozen=True)
class CommitCostModel:
    """The parameters of the commit cost (seconds).

    Attributes:
        round_trip: ``rtt0``, one Store round trip (client to server and back) on an idle server.
        service: the server's time per operation (it serves one at a time): ``1 / service`` is the
            most operations per second it can take.
        other_ops_per_commit: Store operations per commit besides the compare-and-set attempts
            (the decision flag, waits, begins, refreshes, clean-up, spread over the step's commits).
        protocol: :attr:`CommitProtocol.CAS` (retries as above) or :attr:`CommitProtocol.COUNTERS`
            (two round trips per commit, never a retry).
    """

    round_trip: float
    service: float
    other_ops_per_commit: float = 0.0
    protocol: CommitProtocol = CommitProtocol.CAS

    def __post_init__(self) -> None:
        if not isinstance(self.protocol, CommitProtocol):
            raise ValueError(f"protocol: must be a CommitProtocol, got {self.protocol!r}")
        for name in ("round_trip", "service", "other_ops_per_commit"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if self.round_trip <= 0:
            raise ValueError(f"round_trip: must be > 0, got {self.round_trip!r}")


@dataclass(frozen=True)
class CommitEstimate:
    """The model's answer for one cluster.

    Attributes:
        latency: seconds per commit (``inf`` when the Store server is saturated).
        round_trips: compare-and-set attempts per commit (1 + expected retries).
        round_trip: seconds of one round trip at this load.
        commits_per_second: of all ranks together (``λ``).
        server_load: ``ρ``, the server's busy share (< 1; near 1 when the Store is the bottleneck).
        share: the share of the ranks' working time spent committing (``latency / (gap + latency)``
            for equal ranks; with unequal ones, all commit seconds over all rank seconds).
    """

    latency: float
    round_trips: float
    round_trip: float
    commits_per_second: float
    server_load: float
    share: float


# Fitted to the coordination-only runs of `bench_scale.py` at P = 4, 8, 16 and 32 with the bench lock
# held and 62-94 % idle CPU (run 2 of docs/scale.md; sleep emulation, tasks of 25-100 ms, 8 tasks
# per rank, Ω = 1.2), the Store's time per operation from its capacity phase (41 000 gets/s at best):
#     OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --ranks 4,8,16,32 --two-nodes 8 \
#         --protocols cas,add --steps 12 --block 3
#     .venv/bin/python benchmarks/project_scale.py --fit outputs/scale/<timestamp>/scale.json --fit-ranks 4,8,16,32
# See docs/scale.md for the measurements and how well the model follows them.
FITTED = CommitCostModel(round_trip=2.11e-4, service=2.44e-5, other_ops_per_commit=0.45)


def _groups(world_size: int, task_seconds: float | Sequence[float]) -> list[tuple[float, int]]:
    """``(task time, number of ranks)`` per distinct task time (a homogeneous world is one group)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size: must be an integer >= 1, got {world_size!r}")
    if isinstance(task_seconds, (int, float)):
        gaps = [float(task_seconds)]
        counts = {gaps[0]: world_size}
    else:
        gaps = [float(g) for g in task_seconds]
        if len(gaps) != world_size:
            raise ValueError(f"task_seconds: need one task time per rank ({world_size}), got {len(gaps)}")
        counts = Counter(gaps)
    if any(not math.isfinite(g) or g <= 0 for g in gaps):
        raise ValueError(f"task_seconds: every task time must be finite and > 0, got {task_seconds!r}")
    return sorted(counts.items())


def _at_round_trip(
    rtt: float, groups: list[tuple[float, int]], protocol: CommitProtocol = CommitProtocol.CAS
) -> tuple[list[float], list[float]]:
    """Per group of equal ranks, one rank's commit rate and round trips per commit at round trip ``rtt``.

    The retries depend on the others' commit rate ``λ − r`` (``r``: the rank's own), and the rates
    on the latency. The total ``λ`` solves ``λ = Σ n / (gap + latency(λ))``, whose right side falls
    as ``λ`` grows: a bisection. A rank's own rate is taken as ``min(1 / (gap + rtt), λ / n)``, exact
    for a homogeneous world (``λ / P``) and a small bias otherwise.
    """

    def trips_at(total: float) -> list[float]:
        if protocol is CommitProtocol.COUNTERS:
            return [2.0] * len(groups)
        trips = []
        for gap, n in groups:
            others = total - min(1.0 / (gap + rtt), total / n)
            stale = -math.expm1(-others * gap)  # the first attempt's value is one task old
            fresh = math.exp(-min(others * rtt, 700.0))  # a retry's value is one round trip old
            trips.append(1.0 + stale / fresh)
        return trips

    def supply(total: float) -> float:  # the commit rate the ranks sustain when the others commit at `total`
        return sum(n / (gap + rtt * t) for (gap, n), t in zip(groups, trips_at(total)))

    lo, hi = 0.0, sum(n / gap for gap, n in groups)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if supply(mid) > mid else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    trips = trips_at(hi)
    return [1.0 / (gap + rtt * t) for (gap, _), t in zip(groups, trips)], trips


def commit_latency(model: CommitCostModel, world_size: int, task_seconds: float | Sequence[float]) -> CommitEstimate:
    """The expected commit cost of ``world_size`` ranks that each commit once per task.

    The ranks form a closed system (a rank waits for its commit before its next task), so the
    server's load settles below 1: as it nears saturation the round trip grows and the ranks commit
    less often. The round trip is found by bisection on ``rtt = rtt0 + service·ρ(rtt)/(1 − ρ(rtt))``.

    Args:
        model: the fitted parameters.
        world_size: ranks committing to the one state key.
        task_seconds: each rank's mean task time (the gap between its commits), or one for all.

    Returns:
        The latency and round trips averaged over the commits (a fast rank commits more often and
        so weighs more), the round trip, load and cost share.
    """
    groups = _groups(world_size, task_seconds)

    def load(rtt: float) -> tuple[float, list[float], list[float]]:
        rates, trips = _at_round_trip(rtt, groups, model.protocol)
        ops = sum(n * r * (t + model.other_ops_per_commit) for (_, n), r, t in zip(groups, rates, trips))
        return ops * model.service, rates, trips

    def excess(rtt: float) -> float:  # > 0 while the server's queue makes round trips longer than rtt
        rho = load(rtt)[0]
        return math.inf if rho >= 1.0 else model.round_trip + model.service * rho / (1.0 - rho) - rtt

    lo, hi = model.round_trip, model.round_trip
    while excess(hi) > 0:
        hi *= 2.0
    if hi > lo:
        for _ in range(200):  # bisection in log space: round trips span µs to seconds
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
            if hi / lo < 1 + 1e-9:
                break
    rtt = hi
    rho, rates, trips = load(rtt)
    weight = sum(n * r for (_, n), r in zip(groups, rates))

    def mean(values: Sequence[float]) -> float:  # over the ranks, weighted by their commit rates
        return sum(n * r * v for (_, n), r, v in zip(groups, rates, values)) / weight

    latencies = [rtt * t for t in trips]
    # Of all ranks' time, the share spent committing: Σ rate · latency / P (a rank's rate is
    # 1 / (gap + latency), so this is also latency / (gap + latency) for a homogeneous world).
    share = sum(n * r * lat for (_, n), r, lat in zip(groups, rates, latencies)) / world_size
    return CommitEstimate(mean(latencies), mean(trips), rtt, weight, rho, share)


def expected_round_trips(world_size: int, task_seconds: float | Sequence[float], round_trip: float) -> float:
    """Compare-and-set attempts per commit when one round trip takes ``round_trip`` seconds.

    The retry model alone, without the server's queue: given a measured round trip, it says how
    many attempts the single state key should cost (averaged over the ranks by commit rate).
    """
    if not math.isfinite(round_trip) or round_trip <= 0:
        raise ValueError(f"round_trip: must be finite and > 0, got {round_trip!r}")
    groups = _groups(world_size, task_seconds)
    rates, trips = _at_round_trip(round_trip, groups)
    return sum(n * r * t for (_, n), r, t in zip(groups, rates, trips)) / sum(n * r for (_, n), r in zip(groups, rates))


def fit_commit_model(
    observations: Sequence[tuple[Sequence[float], float, float]], service: float | None = None
) -> CommitCostModel:
    """Fit the round trip (and the service time, unless given) to measurements.

    Args:
        observations: per measured world size, ``(gaps, mean commit latency, Store operations per
            commit)``: each rank's mean task time, the mean commit latency over all ranks (s) and
            the server's operations per commit (counted by the ranks).
        service: the server's time per operation if measured apart (e.g. ``1 / ops per second``
            of clients sending back to back); otherwise chosen on a grid from 1 µs to 1 ms.

    Returns:
        The fit minimising the squared log error of the mean latency; ``other_ops_per_commit`` is
        the measured operations per commit minus the model's attempts, averaged (at least 0).
    """
    if not observations:
        raise ValueError("observations: need at least one measured world size")
    if service is not None and (not math.isfinite(service) or service < 0):
        raise ValueError(f"service: must be finite and >= 0, got {service!r}")
    services = [service] if service is not None else [0.0] + [10 ** (e / 8) for e in range(-48, -23)]
    best: tuple[float, CommitCostModel] | None = None
    for candidate in services:
        # At low load the latency is proportional to the round trip: scale it until the mean ratio is 1.
        rtt0, other = 2e-4, 0.0
        for _ in range(8):
            model = CommitCostModel(rtt0, candidate, other)
            estimates = [commit_latency(model, len(gaps), gaps) for gaps, _, _ in observations]
            ratios = [latency / est.latency for (_, latency, _), est in zip(observations, estimates)]
            rtt0 *= math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            other = max(0.0, sum(o - e.round_trips for (_, _, o), e in zip(observations, estimates)) / len(estimates))
        model = CommitCostModel(rtt0, candidate, other)
        error = sum(
            math.log(commit_latency(model, len(gaps), gaps).latency / latency) ** 2 for gaps, latency, _ in observations
        )
        if best is None or error < best[0]:
            best = (error, model)
    assert best is not None
    return best[1]


def project(
    model: CommitCostModel, world_sizes: Sequence[int], task_seconds: Sequence[float]
) -> dict[float, list[CommitEstimate]]:
    """The commit cost of a homogeneous cluster, per task time, for each world size."""
    return {t: [commit_latency(model, p, t) for p in world_sizes] for t in task_seconds}


def crossing_world_size(
    model: CommitCostModel, task_seconds: float, share: float = 0.01, largest: int = 1 << 20
) -> int | None:
    """The smallest world size at which committing takes more than ``share`` of a rank's time.

    The share grows with the world size (more commits per second on the one key), so a bisection
    finds it. Returns 1 when even one rank alone pays more (the round trip is too long for the
    task), and None when no world size up to ``largest`` reaches it.
    """
    if not 0 < share < 1:
        raise ValueError(f"share: must be in (0, 1), got {share!r}")

    def above(p: int) -> bool:
        return commit_latency(model, p, task_seconds).share > share

    if above(1):
        return 1
    if not above(largest):
        return None
    lo, hi = 1, largest  # above(lo) is False, above(hi) is True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if above(mid) else (mid, hi)
    return hi
