"""Fractional repetition (Tandon et al., "Gradient Coding", ICML 2017), with heterogeneous speeds.

To survive any s stragglers, the ranks are split into s + 1 *groups* and every group covers all K
tasks on its own: s stragglers can touch at most s groups, so one group is complete. Each rank
computes one coded result, the plain sum of the gradients of its block of tasks, and the decoder
adds the blocks of an exact cover of the tasks.

Heterogeneity enters twice: groups are balanced by total speed (1/mean), and inside a group the
optimal split gives each rank a contiguous block sized to its profile. Because blocks are intervals
of [0, K), any set of responders whose blocks tile [0, K) decodes, also one that mixes groups; the
decoder finds such a tiling with a path search over the block end points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from codedgrad.codes.base import CodeError, Decoding, RankLevelCode, Work
from codedgrad.codes.repetition import check_profiles, split_or_code_error
from codedgrad.profile import WorkerProfile

__all__ = ["FractionalRepetitionCode", "speed_groups", "stragglers_from_redundancy"]


def stragglers_from_redundancy(redundancy: float, num_ranks: int) -> int:
    """s for a rank-level code with redundancy Ω = s + 1 (an integer, s < num_ranks), or CodeError."""
    if not (isinstance(redundancy, (int, float)) and math.isfinite(redundancy) and redundancy >= 1):
        raise CodeError(f"redundancy: must be a finite number >= 1, got {redundancy!r}")
    if redundancy != int(redundancy):
        raise CodeError(f"redundancy: must be an integer s + 1 (s stragglers tolerated), got {redundancy}")
    s = int(redundancy) - 1
    if s >= num_ranks:
        raise CodeError(
            f"redundancy: tolerating s = {s} stragglers needs at least s + 1 = {s + 1} ranks, got {num_ranks}"
        )
    return s


def speed_groups(profiles: Sequence[WorkerProfile], count: int) -> list[list[int]]:
    """Split ranks into ``count`` groups of near-equal total speed (1/mean), each non-empty.

    Greedy longest-processing-time: ranks from fastest to slowest (ties: lower rank first), each into
    the group with the least speed so far (ties: lower group). With at least ``count`` ranks the first
    ``count`` ranks open one group each, so no group is empty. Each group is returned in rank order.
    """
    if count > len(profiles):
        raise CodeError(f"redundancy: {len(profiles)} ranks cannot form {count} groups")
    order = sorted(range(len(profiles)), key=lambda r: (-profiles[r].rate, r))
    groups: list[list[int]] = [[] for _ in range(count)]
    speed = [0.0] * count
    for r in order:
        g = min(range(count), key=lambda i: (speed[i], i))
        groups[g].append(r)
        speed[g] += profiles[r].rate
    return [sorted(g) for g in groups]


class FractionalRepetitionCode(RankLevelCode):
    """Fractional repetition with s + 1 speed-balanced groups, each covering all tasks.

    Args:
        num_ranks: P ≥ s + 1.
        num_tasks: K ≥ P.
        redundancy: Ω = s + 1, an integer.
        profiles: one profile per rank; None means identical workers.
        gamma: weight of the second moment in the split inside each group.

    Attributes:
        stragglers: s.
        groups: the ranks of each group, in rank order.
        blocks: per rank, the half-open task interval ``(start, end)`` it sums (empty if start == end).
    """

    name = "frc"

    def __init__(
        self,
        num_ranks: int,
        num_tasks: int,
        redundancy: float = 2.0,
        profiles: Sequence[WorkerProfile] | None = None,
        gamma: float = 1.0,
    ) -> None:
        super().__init__(num_ranks, num_tasks)
        self.stragglers = stragglers_from_redundancy(redundancy, num_ranks)
        self.profiles = check_profiles(profiles, num_ranks)
        self.groups = speed_groups(self.profiles, self.stragglers + 1)
        self.blocks: list[tuple[int, int]] = [(0, 0)] * num_ranks
        for group in self.groups:
            loads = split_or_code_error([self.profiles[r] for r in group], num_tasks, 1.0, gamma)
            start = 0
            for r, load in zip(group, loads.tolist()):
                self.blocks[r] = (start, start + load)
                start += load
        for r, (start, end) in enumerate(self.blocks):
            if end > start:
                self._works[r] = Work(r, tuple(range(start, end)), (1.0,) * (end - start))
        # Responders' blocks by start point, ranks ascending: the edges of the cover search.
        self._starting_at: dict[int, list[int]] = {}
        for r, (start, end) in enumerate(self.blocks):
            if end > start:
                self._starting_at.setdefault(start, []).append(r)

    def cover(self, responders: Sequence[int]) -> list[int] | None:
        """Ranks among ``responders`` whose blocks tile [0, K) exactly, or None if there are none.

        Dynamic programming over task boundaries in increasing order: a boundary is reachable if a
        responder's block ends there and starts at a reachable boundary. Deterministic (first
        block found wins: lower start, then lower rank), so every rank picks the same cover.
        """
        members = set(responders)
        via: dict[int, int] = {}  # boundary -> the rank whose block reaches it
        reached = [False] * (self.num_tasks + 1)
        reached[0] = True
        for start in range(self.num_tasks):
            if not reached[start]:
                continue
            for r in self._starting_at.get(start, ()):
                end = self.blocks[r][1]
                if r in members and not reached[end]:
                    reached[end] = True
                    via[end] = r
        if not reached[self.num_tasks]:
            return None
        ranks, point = [], self.num_tasks
        while point > 0:
            ranks.append(via[point])
            point = self.blocks[via[point]][0]
        return sorted(ranks)

    def _solve(self, responders: tuple[int, ...]) -> Decoding | None:
        chosen = self.cover(responders)
        if chosen is None:
            return None
        coefficients = np.zeros(self.num_ranks)
        coefficients[chosen] = 1.0
        return Decoding(coefficients)

    def _describe_missing(self, responders: tuple[int, ...]) -> str:
        waiting = [
            f"group {g}: ranks {[r for r in group if r not in responders and self._works[r] is not None]}"
            for g, group in enumerate(self.groups)
        ]
        return f"frc: no exact cover of tasks [0, {self.num_tasks}) by responders {list(responders)}; " + "; ".join(
            waiting
        )
