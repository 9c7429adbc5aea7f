"""Cyclic MDS gradient code (Tandon et al., "Gradient Coding", ICML 2017, Algorithm 2).

The K tasks are grouped into n contiguous, near-equal *partitions* (one per rank). Rank i computes
one coded gradient ``f_i = Σ_j B[i, j] · g_(partition j)`` over the s + 1 partitions i, i+1, …, i+s
(mod n). B is built so that any n − s of its rows span the all-ones vector: then from any n − s
responders R there are a with ``aᵀ B_R = 1ᵀ``, and ``Σ_{i∈R} a_i f_i = Σ_j g_j``.

Construction: draw a random s × n matrix H (seeded, so every rank builds the same B) and replace its
last column so that H·1 = 0. Row i of B has support {i, …, i+s}, B[i, i] = 1, and the other s
entries solve H·b_i = 0. All rows then lie in the (n − s)-dimensional null space of H, which
contains 1, and for a generic H any n − s of them are independent, hence span that null space.

Decoding solves ``B_Rᵀ a = 1`` in float64 by least squares, checks the residual (refusing above
1e-9 relative: then the responders do not determine the sum) and reports the condition number of
B_R, which bounds how much rounding error in the coded gradients the decoding amplifies. The
condition number grows quickly with n and s; see ``codes/README.md`` for measured values.
Unlike repetition and fractional repetition, this construction gives every rank the same load
(s + 1 partitions), whatever the profiles.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from codedgrad.codes.base import CodeError, Decoding, RankLevelCode, Work
from codedgrad.codes.fractional import stragglers_from_redundancy
from codedgrad.codes.repetition import check_profiles
from codedgrad.profile import WorkerProfile

__all__ = ["RESIDUAL_TOLERANCE", "CyclicMDSCode", "best_seed", "cyclic_mds_matrix"]

#: Largest relative residual ‖B_Rᵀa − 1‖ / ‖1‖ accepted as a decoding.
RESIDUAL_TOLERANCE = 1e-9


def cyclic_mds_matrix(n: int, s: int, seed: int = 0) -> np.ndarray:
    """The n × n encoding matrix B of Algorithm 2 (cyclic support {i, …, i+s} mod n).

    Args:
        n: number of ranks (and partitions).
        s: number of stragglers tolerated, 0 ≤ s < n.
        seed: seed of the random matrix H; every rank must use the same one.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise CodeError(f"seed: must be an integer, got {seed!r}")
    if not 0 <= s < n:
        raise CodeError(f"redundancy: need 0 <= s < n = {n}, got s = {s}")
    if s == 0:
        return np.eye(n)
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((s, n))
    h[:, -1] = -h[:, :-1].sum(axis=1)  # H·1 = 0, so 1 lies in the null space the rows of B span
    b = np.zeros((n, n))
    for i in range(n):
        support = [(i + t) % n for t in range(s + 1)]
        b[i, support[0]] = 1.0
        b[i, support[1:]] = -np.linalg.solve(h[:, support[1:]], h[:, support[0]])
    return b


class CyclicMDSCode(RankLevelCode):
    """Cyclic MDS gradient code: any s stragglers tolerated, decoding by least squares.

    Args:
        num_ranks: n ≥ s + 1.
        num_tasks: K ≥ n.
        redundancy: Ω = s + 1, an integer.
        profiles: checked for length only: the cyclic construction gives equal loads.
        gamma: unused (accepted so that every code has the same constructor).
        seed: seed of the random construction (all ranks must agree; the default 0 is fine).

    Attributes:
        stragglers: s.
        matrix: the encoding matrix B (float64, n × n).
        bounds: partition j is tasks ``[bounds[j], bounds[j + 1])``.
    """

    name = "cyclic"

    def __init__(
        self,
        num_ranks: int,
        num_tasks: int,
        redundancy: float = 2.0,
        profiles: Sequence[WorkerProfile] | None = None,
        gamma: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(num_ranks, num_tasks)
        self.stragglers = stragglers_from_redundancy(redundancy, num_ranks)
        self.profiles = check_profiles(profiles, num_ranks)
        self.matrix = cyclic_mds_matrix(num_ranks, self.stragglers, seed)
        n = num_ranks
        sizes = np.full(n, num_tasks // n)
        sizes[: num_tasks % n] += 1
        self.bounds = np.concatenate([[0], np.cumsum(sizes)])
        for i in range(n):
            tasks: list[int] = []
            coefficients: list[float] = []
            for t in range(self.stragglers + 1):
                j = (i + t) % n
                part = range(int(self.bounds[j]), int(self.bounds[j + 1]))
                tasks.extend(part)
                coefficients.extend([float(self.matrix[i, j])] * len(part))
            self._works[i] = Work(i, tuple(tasks), tuple(coefficients))

    def condition_number(self, responders: Sequence[int]) -> float:
        """σ_max / σ_r of B_R, r = min(|R|, n − s): the conditioning of the decoding from R.

        All rows of B lie in an (n − s)-dimensional space, so B_R has at most n − s non-zero
        singular values; the ratio over those is what amplifies errors in the coded gradients.
        """
        rows = self.matrix[sorted(responders)]
        singular = np.linalg.svd(rows, compute_uv=False)
        rank = min(len(rows), self.num_ranks - self.stragglers)
        return float(singular[0] / singular[rank - 1]) if singular[rank - 1] > 0 else float("inf")

    def worst_condition_number(self) -> float:
        """The largest :meth:`condition_number` over all sets of exactly n − s responders.

        Minimal sets are the worst case in practice (more rows only add to the Gram matrix); there
        are C(n, s) of them, so this is for the sizes one would deploy (n ≲ 20), not for large n.
        """
        n, s = self.num_ranks, self.stragglers
        return max(self.condition_number(r) for r in itertools.combinations(range(n), n - s))

    def _solve(self, responders: tuple[int, ...]) -> Decoding | None:
        rows = self.matrix[list(responders)]
        ones = np.ones(self.num_ranks)
        a, *_ = np.linalg.lstsq(rows.T, ones, rcond=None)
        residual = np.linalg.norm(rows.T @ a - ones) / np.linalg.norm(ones)
        if not residual <= RESIDUAL_TOLERANCE:  # also refuses NaN
            return None
        coefficients = np.zeros(self.num_ranks)
        coefficients[list(responders)] = a
        return Decoding(coefficients, self.condition_number(responders))

    def _describe_missing(self, responders: tuple[int, ...]) -> str:
        waiting = [r for r in range(self.num_ranks) if r not in responders]
        need = self.num_ranks - self.stragglers
        return (
            f"cyclic: {len(responders)} responders {list(responders)} do not decode "
            f"(any {need} of {self.num_ranks} do); waiting for ranks {waiting}"
        )


def best_seed(num_ranks: int, redundancy: float, tries: int = 16) -> int:
    """The seed in ``range(tries)`` whose construction has the smallest worst-case condition number.

    Deterministic, so every rank that calls it with the same arguments gets the same seed. The
    default seed 0 is often 10–100× worse conditioned than the best of a few seeds (see
    ``codes/README.md``); the search costs ``tries × C(n, s)`` small SVDs.
    """
    if tries < 1:
        raise CodeError(f"tries: must be >= 1, got {tries}")
    worst = [
        CyclicMDSCode(num_ranks, num_ranks, redundancy, seed=seed).worst_condition_number() for seed in range(tries)
    ]
    return int(np.argmin(worst))
