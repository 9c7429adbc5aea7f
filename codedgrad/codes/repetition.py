"""Task-level repetition with backups: the default code (docs/design.md, "The codes").

Every task has one *primary* rank: the optimal split at Ω = 1 says how many, and rank 0 gets tasks
``[0, k_0)``, rank 1 the next ``k_1``, and so on. The ``round(K·Ω) − K`` extra slots of the split at
Ω become *backups*: copies of other ranks' tasks, appended to the backup rank's queue after its own
primaries. Nobody computes a task someone already finished (purging), so a backup only costs compute
when two ranks race on the same task, and the first committed result of each task is the one used.

Which tasks get backups, and in which order (see also ``codes/README.md``)
-----------------------------------------------------------------------------
A rank works through its primaries in order, so the task at position i (1-based) of rank q is done
at ``F_i = c_q + X_1 + … + X_i``: mean ``μ_i = c_q + i·m_q``, standard deviation ``σ_i = √i·σ_q``.
Let ``T = max_q (c_q + k_q·m_q)`` be the predicted makespan of the primaries (the optimal split makes
the ranks' expected finishes nearly equal, and it is about when ranks turn to their backups). A
backup can only pay off when its task would otherwise be finished after T, so we score a task by

    z_i = (μ_i − T) / σ_i                      standard deviations of the task's finish past T;
    risk_i = E[(F_i − T)⁺] − E[(F_{i−1} − T)⁺]  the expected time task i adds to its rank's lateness
                                                past T, ≈ m_q · Φ(z_i),

with the normal approximation ``E[(F − T)⁺] = σ φ(z) + (μ − T) Φ(z)``. ``risk_i`` is what a backup that
finishes first can save: the probability that the primary is late (Φ of the z-score) times the
time the primary would spend on the task, so that backing up a slow rank's task is worth more than
a fast rank's at the same z. Tasks are backed up in decreasing risk (ties: larger z, later in its
block, lower rank). Within one rank risk grows towards the tail; across ranks it prefers the tails
of noisy, slow and late ranks; a rank with σ_q = 0 that finishes before T never needs a backup.
(Ranking by z alone, and by the ranks' tails round-robin, were measured too; see the README.)

Backups are handed out in rounds: every task gets its first copy (highest risk first) before any
task gets a second one, so that one task is never backed up twice while an at-risk task has none.
Each copy goes to the rank that will reach its next free backup slot earliest in expectation
(``c_p + (k_p + backups so far)·m_p``) among the ranks that may hold it: never the task's primary,
never a rank that already holds it. When all of those are full, the round's copies are rearranged
along an augmenting path (bipartite matching), so a task is passed over only if no arrangement of
the round can place it. Consequences: the riskiest tasks sit in the earliest-reached backup slots;
the tail of one slow rank is spread over several helpers, each working from the tail end while the
primary works from the front, so they meet in the middle; and each rank's backups are ordered by
round, then risk: most likely needed first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.special import ndtr  # Φ; scipy.stats would add ~0.5 s to every process's start

from codedgrad.codes.base import (
    CodeError,
    DecoderState,
    Decoding,
    GradientCode,
    NotDecodable,
    Work,
    pack_bits,
    unpack_bits,
)
from codedgrad.plan import PlanError, optimal_split
from codedgrad.profile import WorkerProfile

__all__ = ["BACKUP_ORDERS", "RepetitionCode", "RepetitionState", "homogeneous_profiles"]

#: Ways to rank tasks for backups: "risk" (the default, see the module docstring) and two model-free
#: baselines kept for comparison: "tail" (the ranks' last tasks round-robin: last of each rank, then
#: the second-to-last of each, …) and "task" (plain task order 0, 1, 2, …).
BACKUP_ORDERS = ("risk", "tail", "task")


def homogeneous_profiles(num_ranks: int) -> list[WorkerProfile]:
    """Identical workers with exponential task times: what ``profiles=None`` means."""
    return [WorkerProfile(shift=0.0, mean=1.0, std=1.0)] * num_ranks


def check_profiles(profiles: Sequence[WorkerProfile] | None, num_ranks: int) -> list[WorkerProfile]:
    """``profiles`` as a list of ``num_ranks`` profiles (homogeneous when None), or CodeError."""
    if profiles is None:
        return homogeneous_profiles(num_ranks)
    profiles = list(profiles)
    if len(profiles) != num_ranks:
        raise CodeError(f"profiles: need one per rank ({num_ranks}), got {len(profiles)}")
    for i, p in enumerate(profiles):
        if not isinstance(p, WorkerProfile):
            raise CodeError(f"profiles[{i}]: expected a WorkerProfile, got {type(p).__name__}")
    return profiles


def split_or_code_error(
    profiles: Sequence[WorkerProfile], tasks: int, redundancy: float, gamma: float, capacity: int | None = None
) -> np.ndarray:
    """:func:`optimal_split`, with its argument errors re-raised as :class:`CodeError`."""
    try:
        return optimal_split(profiles, tasks, redundancy, gamma, capacity)
    except PlanError as error:
        raise CodeError(str(error)) from None


def _expected_excess(mean: np.ndarray, std: np.ndarray, level: float) -> np.ndarray:
    """E[(F − level)⁺] for F ~ Normal(mean, std²), elementwise (std = 0: F = mean exactly)."""
    gap = mean - level
    out = np.maximum(gap, 0.0)
    noisy = std > 0
    # A tiny std overflows z (to ±inf) or z² in the pdf (to inf); both give the right limits,
    # Φ = 0 or 1 and φ = 0, so the overflow is not worth a warning.
    with np.errstate(over="ignore"):
        z = gap[noisy] / std[noisy]
        pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        out[noisy] = std[noisy] * pdf + gap[noisy] * ndtr(z)
    return out


class RepetitionCode(GradientCode):
    """Task-level repetition with backups (the default code).

    Args:
        num_ranks: P, the number of ranks.
        num_tasks: K, the number of equal tasks of a step (K ≥ P).
        redundancy: Ω ≥ 1; ``round(K·Ω)`` task slots in all, at most P copies of a task (Ω ≤ P).
        profiles: one :class:`WorkerProfile` per rank; None means identical workers.
        gamma: weight of the second moment in the split's cost (see :func:`optimal_split`).
        backup_order: how tasks are ranked for backups, one of :data:`BACKUP_ORDERS`; only "risk"
            uses the worker model, the others are baselines for comparison.

    Attributes:
        primaries: int64 array, the number of primary tasks of each rank.
        primary_of: int64 array, the primary rank of each task.
        backups: per rank, the tasks it backs up, in queue order.
        risk: float array, each task's risk: expected time it adds past the predicted makespan.
        z: float array, each task's finish past the predicted makespan in standard deviations.
    """

    name = "repetition"

    def __init__(
        self,
        num_ranks: int,
        num_tasks: int,
        redundancy: float = 1.0,
        profiles: Sequence[WorkerProfile] | None = None,
        gamma: float = 1.0,
        backup_order: str = "risk",
    ) -> None:
        super().__init__(num_ranks, num_tasks)
        if not (isinstance(redundancy, (int, float)) and math.isfinite(redundancy) and redundancy >= 1.0):
            raise CodeError(f"redundancy: must be a finite number >= 1, got {redundancy!r}")
        if redundancy > num_ranks:
            raise CodeError(f"redundancy: at most one copy of a task per rank, so Ω <= {num_ranks}, got {redundancy}")
        if backup_order not in BACKUP_ORDERS:
            raise CodeError(f"backup_order: must be one of {BACKUP_ORDERS}, got {backup_order!r}")
        self.profiles = check_profiles(profiles, num_ranks)
        self.redundancy = float(redundancy)
        self.gamma = gamma
        self.backup_order = backup_order

        self.primaries = split_or_code_error(self.profiles, num_tasks, 1.0, gamma)
        ends = np.cumsum(self.primaries)
        self._block_start = ends - self.primaries
        self.primary_of = np.repeat(np.arange(num_ranks), self.primaries)

        # A rank can hold each task once, so its total load is at most K; that caps its backups at
        # K − k_p, exactly the number of tasks it may back up.
        total = split_or_code_error(self.profiles, num_tasks, redundancy, gamma, capacity=num_tasks)
        self.risk, self.z = self._risk_scores()
        counts = self._backup_counts(total)
        self.backups = self._assign_backups(counts, self._priority())

        self._queues = [
            [Work(j, (j,), (1.0,)) for j in range(int(self._block_start[r]), int(ends[r]))]
            + [Work(j, (j,), (1.0,)) for j in self.backups[r]]
            for r in range(num_ranks)
        ]
        self._holders = [[int(self.primary_of[j])] for j in range(num_tasks)]
        for r, tasks in enumerate(self.backups):
            for j in tasks:
                self._holders[j].append(r)

    # --- plan ------------------------------------------------------------------------------------

    def _risk_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """Each task's (risk, z) against the predicted makespan T (see the module docstring)."""
        tasks = np.arange(self.num_tasks)
        position = tasks - self._block_start[self.primary_of] + 1  # 1-based, within the primary's block
        shift, mean, std = (
            np.array([getattr(p, f) for p in self.profiles])[self.primary_of] for f in ("shift", "mean", "std")
        )
        finish = shift + position * mean
        makespan = float(finish.max())
        late_now = _expected_excess(finish, np.sqrt(position) * std, makespan)
        late_before = _expected_excess(finish - mean, np.sqrt(position - 1) * std, makespan)
        gap = finish - makespan
        spread = np.sqrt(position) * std
        # σ = 0: the task finishes exactly at μ, so z = ±∞ (0 when μ = T: it *is* the makespan).
        z = np.where(gap > 0, np.inf, -np.inf)
        z[gap == 0] = 0.0
        with np.errstate(over="ignore"):
            z[spread > 0] = gap[spread > 0] / spread[spread > 0]
        return late_now - late_before, z

    def _priority(self) -> list[int]:
        """Tasks in the order they receive backups (first = first to get a copy)."""
        k = self.num_tasks
        if self.backup_order == "task":
            return list(range(k))
        position = np.arange(k) - self._block_start[self.primary_of]
        if self.backup_order == "tail":
            # position counted from the end of the task's own block: 0 for every rank's last task
            from_end = self.primaries[self.primary_of] - 1 - position
            return np.lexsort((self.primary_of, from_end)).tolist()
        # "risk": largest risk first; ties (e.g. risk underflowing to 0, or identical ranks) by larger
        # z, then later in the block, then lower rank, so that identical ranks' tails interleave.
        return np.lexsort((self.primary_of, -position, -self.z, -self.risk)).tolist()

    def _backup_counts(self, total: np.ndarray) -> np.ndarray:
        """Backups per rank: the split at Ω minus the primaries (never negative, total preserved)."""
        counts = np.maximum(total - self.primaries, 0)
        excess = int(counts.sum()) - (int(total.sum()) - self.num_tasks)
        # The integer split is monotone in Ω, so this only corrects a rounding tie: take the extra
        # slots back from the ranks with the most backups (deterministically, lowest rank first).
        while excess > 0:
            r = int(np.argmax(counts))
            counts[r] -= 1
            excess -= 1
        return counts

    def _assign_backups(self, counts: np.ndarray, priority: list[int]) -> list[list[int]]:
        """Hand out ``counts[p]`` backup slots per rank to tasks, in rounds over ``priority``.

        Round c tries to give each task, in priority order, its c-th copy. A rank is *eligible* for
        a task if it is not its primary and does not hold it yet. The copy goes to the eligible rank
        with a free slot whose next slot starts earliest in expectation; if every eligible rank is
        full, an augmenting path may still make room (move one of this round's copies from an
        eligible rank to another rank that can take it, and so on until a rank with a free slot).
        Processing in priority order and never dropping a task once placed gives, in each round, a
        largest possible set of tasks with a c-th copy, preferring the riskier ones; a task is
        passed over only when no rearrangement can place it. The last round fills every slot: a
        rank with a free slot could take every task it does not hold.

        Returns:
            Per rank, its backups ordered by round, then priority: most likely needed first.
        """
        p_count = self.num_ranks
        free = counts.astype(np.int64).copy()
        held = [set(range(int(s), int(s + k))) for s, k in zip(self._block_start, self.primaries)]
        rank_of = {j: i for i, j in enumerate(priority)}
        backups: list[list[int]] = [[] for _ in range(p_count)]
        for _ in range(p_count - 1):  # a task can have at most P − 1 backups
            if not free.any():
                break
            placed: list[list[int]] = [[] for _ in range(p_count)]  # this round's copies per rank
            for j in priority:
                if not free.any():
                    break
                self._place(j, placed, free, held)
            for p in range(p_count):
                placed[p].sort(key=rank_of.get)
                backups[p].extend(placed[p])
                held[p].update(placed[p])
        if free.any():
            raise AssertionError("backup slots left unassigned")  # impossible, see the docstring
        return backups

    def _place(self, task: int, placed: list[list[int]], free: np.ndarray, held: list[set[int]]) -> bool:
        """Give ``task`` one copy this round, rearranging this round's copies if needed.

        Hand-written rather than scipy's matching on purpose. ``maximum_bipartite_matching`` finds *a*
        largest set of copies but not the riskiest one; ``linear_sum_assignment`` could prefer risky
        tasks through weights, but no cost function reproduces the sequential rule "this copy goes to
        the rank whose next free slot starts earliest, given the copies placed before it" (the slot
        a copy lands in depends on the order of placement), and its tie-breaking between equal-cost
        assignments is an implementation detail that every rank, whatever its scipy version, would
        have to share. Which rank holds which copy, and in which order, is what the measured tables
        of ``codes/README.md`` rest on. The tests check this search against scipy's matching.
        """

        def can_take(p: int, j: int) -> bool:
            return j not in held[p] and j not in placed[p]

        def next_start(p: int) -> float:  # expected start of rank p's next backup slot
            return self.profiles[p].shift + (len(held[p]) + len(placed[p])) * self.profiles[p].mean

        direct = [p for p in range(self.num_ranks) if free[p] > 0 and can_take(p, task)]
        if direct:
            p = min(direct, key=lambda q: (next_start(q), q))
            placed[p].append(task)
            free[p] -= 1
            return True
        # Breadth-first search for an augmenting path: `task` goes to a full rank p1, which passes one
        # of this round's copies j1 to a rank p2 that can take it, …, until a rank with a free slot.
        parent: dict[int, tuple[int, int]] = {}  # rank -> (rank the moved task comes from or −1, task)
        frontier = [(p, -1, task) for p in range(self.num_ranks) if can_take(p, task)]
        while frontier:
            following = []
            for p, source, moved in frontier:
                if p in parent:
                    continue
                parent[p] = (source, moved)
                if free[p] > 0:
                    free[p] -= 1
                    while p != -1:  # apply the path backwards
                        source, moved = parent[p]
                        placed[p].append(moved)
                        if source != -1:
                            placed[source].remove(moved)
                        p = source
                    return True
                following.extend(
                    (q, p, j) for j in placed[p] for q in range(self.num_ranks) if q not in parent and can_take(q, j)
                )
            frontier = following
        return False

    # --- GradientCode -------------------------------------------------------------------------------

    def queue(self, rank: int) -> list[Work]:
        self._check_rank(rank)
        return list(self._queues[rank])

    def holders(self, task: int) -> list[int]:
        """The ranks holding ``task``: its primary first, then its backups in the order handed out."""
        return list(self._holders[task])

    def new_state(self) -> RepetitionState:
        return RepetitionState(self, bytearray(self.num_tasks))

    def state_from_bytes(self, data: bytes) -> RepetitionState:
        return RepetitionState(self, bytearray(unpack_bits(data, self.num_tasks).astype(np.uint8).tobytes()))

    def tolerates(self, stragglers: Iterable[int]) -> bool:
        """True iff every task has a holder outside ``stragglers`` (its primary or a backup)."""
        lost = set(stragglers)
        for r in lost:
            self._check_rank(r)
        return all(not lost.issuperset(h) for h in self._holders)


class RepetitionState(DecoderState):
    """Which tasks are covered (have a used result); serialised as a bitmask of ⌈K/8⌉ bytes."""

    def __init__(self, code: RepetitionCode, covered: bytearray) -> None:
        self._code = code
        self._covered = covered  # one byte (0/1) per task: fast to test from Python
        self._open = code.num_tasks - sum(covered)

    @property
    def decided(self) -> bool:
        return self._open == 0

    @property
    def code(self) -> RepetitionCode:
        """The code whose step this state decodes (read by the spare-work policy, :mod:`.spare`)."""
        return self._code

    def open_tasks(self) -> list[int]:
        """The tasks without a used result yet, ascending."""
        return [j for j, c in enumerate(self._covered) if not c]

    def is_needed(self, rank: int, result: int) -> bool:
        return not self._covered[result]

    def commit(self, rank: int, result: int) -> bool:
        if not 0 <= result < self._code.num_tasks:
            raise CodeError(f"result: must be a task in [0, {self._code.num_tasks}), got {result}")
        if self._covered[result]:
            return False
        self._covered[result] = 1
        self._open -= 1
        return True

    def decoding(self) -> Decoding:
        if not self.decided:
            raise NotDecodable(self.missing())
        return Decoding(np.ones(self._code.num_ranks))

    def missing(self) -> str:
        """E.g. ``"3 of 40 tasks open: rank 1's 12-13, rank 3's 39"`` (at most 8 runs listed)."""
        if self.decided:
            return "nothing (decided)"
        runs: list[str] = []
        start = None
        open_tasks = self.open_tasks()
        for i, j in enumerate(open_tasks):
            if start is None:
                start = j
            last = i + 1 == len(open_tasks)
            if last or open_tasks[i + 1] != j + 1 or self._code.primary_of[j + 1] != self._code.primary_of[j]:
                rank = int(self._code.primary_of[j])
                runs.append(f"rank {rank}'s {start}" + (f"-{j}" if j > start else ""))
                start = None
        shown = ", ".join(runs[:8]) + (", …" if len(runs) > 8 else "")
        return f"{self._open} of {self._code.num_tasks} tasks open: {shown}"

    def to_bytes(self) -> bytes:
        return pack_bits(self._covered)
