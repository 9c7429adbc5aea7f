"""Real-valued MDS codes for the row blocks of a matrix (docs/design.md, "The model"; docs/linear.md).

A matrix ``A`` (n × c) is cut into K row blocks ``A_0 … A_{K−1}`` (zero rows pad n up to a multiple
of K). A generator ``G`` (N × K, N = K·Ω) makes N *coded blocks* ``C_i = Σ_k G[i, k]·A_k``. A coded
task computes ``C_i·x``; because the product is linear, the results of any K distinct coded tasks
S satisfy ``Y_S = G_S·(A_k·x)_k`` and the K blocks of ``A·x`` are one K × K solve away. Any K rows of
G must therefore be invertible (maximum distance separable), and the solve amplifies rounding by
at most the condition number of ``G_S``: that number, over every decoding set S, is what makes a
real-valued code usable or not.

Kinds of generator:

* ``"orthogonal"`` (default): systematic, ``G = [I_K; P]``, each parity row a row of a seeded random
  orthogonal matrix (unit norm, like the identity rows). Any K rows are invertible with probability
  one; the worst condition number comes from the few decoding sets that lean on a small entry or
  minor of P, so the generator is the best of a few seeded draws by that worst case. Systematic: when
  the K uncoded tasks come first the decode is a copy, and Ω = 1 is exactly the uncoded split.
* ``"chebyshev"``: non-systematic, ``G[i, k] = T_k(x_i)`` at the N Chebyshev nodes of the first kind
  (a polynomial code in a well-conditioned basis): condition number about √2 for Ω = 1, growing
  quickly with the number of parity rows.
* ``"vandermonde"``: ``G[i, k] = x_i^k`` at equispaced nodes in [−1, 1], the textbook real
  Reed–Solomon code. Its condition number grows exponentially with K (10⁸ at K = 16, N = 20): here
  only as the baseline that shows why the others exist.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import ortho_group

from codedgrad.plan import total_slots

__all__ = ["KINDS", "CodedMatrix", "ConditionReport", "MDSCode", "MDSError"]

KINDS = ("orthogonal", "chebyshev", "vandermonde")

# Decoding sets examined when choosing among candidate generators (the final report samples more).
_SELECTION_SETS = 400
# Seeded candidate draws of an orthogonal generator; the one with the best sampled worst case wins.
_CANDIDATES = 8


class MDSError(ValueError):
    """An MDS code or a decode request is invalid; the message names the offending argument."""


@dataclass(frozen=True)
class ConditionReport:
    """Condition numbers (2-norm) of the K × K decoding matrices ``G_S`` of a code.

    Attributes:
        worst: the largest condition number found.
        worst_set: the decoding set (sorted coded-task indices) that has it.
        median: the median over the sets examined.
        sets: how many decoding sets were examined.
        exhaustive: True when every one of the C(N, K) sets was examined, False when they were sampled.
    """

    worst: float
    worst_set: tuple[int, ...]
    median: float
    sets: int
    exhaustive: bool


def _is_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def _decoding_sets(coded: int, tasks: int, max_sets: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """All K-subsets of range(N) if there are at most ``max_sets``, else ``max_sets`` random ones."""
    if math.comb(coded, tasks) <= max_sets:
        return np.array(list(itertools.combinations(range(coded), tasks)), dtype=np.int64), True
    # argsort of uniform keys is a random permutation per row, vectorised; its first K are a random set.
    sets = np.argsort(rng.random((max_sets, coded)), axis=1)[:, :tasks]
    return np.sort(sets, axis=1), False


def _conditions(generator: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """cond(G_S) for every row of ``sets``; singular sets give inf."""
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.linalg.cond(generator[sets])
    return np.where(np.isfinite(values), values, np.inf)


def _orthogonal_parity(tasks: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` parity rows: rows of independent Haar-random K × K orthogonal matrices."""
    if tasks == 1:  # ortho_group needs dim >= 2; a 1 × 1 orthogonal matrix is ±1
        return np.ones((rows, 1))
    blocks = [ortho_group.rvs(tasks, random_state=rng) for _ in range(-(-rows // tasks))]
    return np.vstack(blocks)[:rows]


def _generator(kind: str, tasks: int, coded: int, seed: int) -> np.ndarray:
    if kind == "chebyshev":
        nodes = np.cos(np.pi * (2 * np.arange(coded) + 1) / (2 * coded))
        g = np.polynomial.chebyshev.chebvander(nodes, tasks - 1)
        return g / np.linalg.norm(g, axis=0)  # equal column norms: scaling is free and helps the condition
    if kind == "vandermonde":
        nodes = np.linspace(-1.0, 1.0, coded) if coded > 1 else np.zeros(1)
        return np.vander(nodes, tasks, increasing=True)
    identity = np.eye(tasks)
    if coded == tasks:
        return identity
    # Random parity has a heavy tail of badly conditioned decoding sets; keep the best of a few draws,
    # judged on one common sample of sets (deterministic in the seed).
    rng = np.random.default_rng(seed)
    sets, _ = _decoding_sets(coded, tasks, _SELECTION_SETS, np.random.default_rng([seed, 1]))
    best, best_worst = identity, math.inf
    for _ in range(_CANDIDATES):
        candidate = np.vstack([identity, _orthogonal_parity(tasks, coded - tasks, rng)])
        worst = float(_conditions(candidate, sets).max())
        if worst < best_worst:
            best, best_worst = candidate, worst
    return best


class MDSCode:
    """A real (N, K) MDS code: K row blocks in, N coded blocks out, any K of them decode.

    Args:
        tasks: K, the number of row blocks a job is split into (≥ 1).
        coded: N, the number of coded blocks (≥ K); ``MDSCode.for_redundancy`` takes Ω instead.
        kind: the generator, one of :data:`KINDS` (see the module docstring).
        seed: seed of the random generator kinds (≥ 0).

    Raises:
        MDSError: an argument is invalid; the message names it.
    """

    def __init__(self, tasks: int, coded: int, kind: str = "orthogonal", seed: int = 0) -> None:
        if not _is_int(tasks) or tasks < 1:
            raise MDSError(f"tasks: must be an integer >= 1, got {tasks!r}")
        if not _is_int(coded) or coded < tasks:
            raise MDSError(f"coded: must be an integer >= tasks ({tasks}), got {coded!r}")
        if kind not in KINDS:
            raise MDSError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")
        if not _is_int(seed) or seed < 0:
            raise MDSError(f"seed: must be an integer >= 0, got {seed!r}")
        self.tasks, self.coded, self.kind, self.seed = int(tasks), int(coded), kind, int(seed)
        matrix = _generator(kind, self.tasks, self.coded, self.seed)
        matrix.flags.writeable = False
        self.generator: np.ndarray = matrix
        """The N × K float64 generator (read-only)."""
        self._torch_generator = torch.from_numpy(matrix.copy())  # torch wants a writable array
        self.systematic: bool = bool(np.array_equal(matrix[: self.tasks], np.eye(self.tasks)))
        """Whether the first K coded blocks are the uncoded blocks themselves."""

    @classmethod
    def for_redundancy(cls, tasks: int, redundancy: float, kind: str = "orthogonal", seed: int = 0) -> MDSCode:
        """The code with N = round(K·Ω) coded blocks, the planner's number of task slots."""
        return cls(tasks, total_slots(tasks, redundancy), kind, seed)

    def __repr__(self) -> str:
        return f"MDSCode(tasks={self.tasks}, coded={self.coded}, kind={self.kind!r}, seed={self.seed})"

    def block_rows(self, rows: int) -> int:
        """Rows per block for a matrix of ``rows`` rows: ⌈rows / K⌉ (the last blocks are zero-padded)."""
        if not _is_int(rows) or rows < 1:
            raise MDSError(f"rows: must be an integer >= 1, got {rows!r}")
        return -(-int(rows) // self.tasks)

    def encode(self, matrix: torch.Tensor) -> torch.Tensor:
        """The N coded row blocks of ``matrix`` (n × c), shape (N, ⌈n/K⌉, c), in ``matrix``'s dtype."""
        if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2 or not matrix.is_floating_point():
            raise MDSError(f"matrix: must be a 2-D floating-point tensor, got {_describe(matrix)}")
        rows = self.block_rows(matrix.shape[0])
        padded = matrix.new_zeros(self.tasks * rows, matrix.shape[1])
        padded[: matrix.shape[0]] = matrix
        g = self._torch_generator.to(dtype=matrix.dtype, device=matrix.device)
        return torch.einsum("nk,krc->nrc", g, padded.reshape(self.tasks, rows, matrix.shape[1]))

    def check_set(self, indices: Sequence[int]) -> list[int]:
        """Validate a decoding set: K distinct coded-task indices in [0, N); return them as a list."""
        chosen = [int(i) for i in indices] if all(_is_int(i) for i in indices) else None
        if chosen is None or len(chosen) != self.tasks or len(set(chosen)) != self.tasks:
            raise MDSError(f"indices: need {self.tasks} distinct coded-task indices, got {list(indices)!r}")
        if min(chosen) < 0 or max(chosen) >= self.coded:
            raise MDSError(f"indices: must lie in [0, {self.coded}), got {chosen}")
        return chosen

    def decode(self, indices: Sequence[int], results: torch.Tensor) -> torch.Tensor:
        """The K uncoded block results from the results of K coded tasks.

        Args:
            indices: the coded tasks that produced ``results`` (any K distinct ones).
            results: shape (K, …): ``results[j]`` is coded block ``indices[j]`` times the input.

        Returns:
            Shape (K, …): block k of ``A·x``. For a systematic code the uncoded results are copied and
            only the missing blocks are solved for (a smaller, better-conditioned system).
        """
        chosen = self.check_set(indices)
        if not isinstance(results, torch.Tensor) or results.ndim < 1 or results.shape[0] != self.tasks:
            raise MDSError(f"results: need a tensor with {self.tasks} rows along dim 0, got {_describe(results)}")
        if not results.is_floating_point():
            raise MDSError(f"results: must be floating point, got {results.dtype}")
        flat = results.reshape(self.tasks, -1)
        g = self._torch_generator.to(dtype=results.dtype, device=results.device)
        index = torch.as_tensor(chosen, device=results.device)
        if not self.systematic:
            return torch.linalg.solve(g[index], flat).reshape(results.shape)
        out = torch.empty_like(flat)
        known = [(j, i) for j, i in enumerate(chosen) if i < self.tasks]
        for j, i in known:
            out[i] = flat[j]
        missing = sorted(set(range(self.tasks)) - {i for _, i in known})
        if missing:
            parity = [j for j, i in enumerate(chosen) if i >= self.tasks]
            rows, cols = index[parity], torch.as_tensor(missing, device=results.device)
            have = torch.as_tensor([i for _, i in known], dtype=torch.long, device=results.device)
            # Parity result = G[b, missing]·y_missing + G[b, known]·y_known: move the known part over.
            rhs = flat[parity] - g[rows][:, have] @ out[have]
            out[cols] = torch.linalg.solve(g[rows][:, cols], rhs)
        return out.reshape(results.shape)

    def condition_number(self, indices: Sequence[int]) -> float:
        """cond₂(G_S) of one decoding set (inf when singular)."""
        chosen = self.check_set(indices)
        return float(_conditions(self.generator, np.array([chosen]))[0])

    def condition_report(self, max_sets: int = 5000, seed: int = 0) -> ConditionReport:
        """The worst and median condition number over decoding sets: all of them, or ``max_sets`` sampled.

        Args:
            max_sets: examine every K-subset if there are at most this many, else sample this many.
            seed: seed of the sample.
        """
        if not _is_int(max_sets) or max_sets < 1:
            raise MDSError(f"max_sets: must be an integer >= 1, got {max_sets!r}")
        if not _is_int(seed) or seed < 0:
            raise MDSError(f"seed: must be an integer >= 0, got {seed!r}")
        sets, exhaustive = _decoding_sets(self.coded, self.tasks, max_sets, np.random.default_rng(seed))
        values = _conditions(self.generator, sets)
        worst = int(np.argmax(values))
        return ConditionReport(
            worst=float(values[worst]),
            worst_set=tuple(int(i) for i in sets[worst]),
            median=float(np.median(values)),
            sets=len(sets),
            exhaustive=exhaustive,
        )


class CodedMatrix:
    """A matrix held as the N coded row blocks of an :class:`MDSCode`: what the coded tasks multiply.

    Args:
        matrix: the n × c matrix (floating point; float64 for exact decoding).
        code: the code whose generator mixes its K row blocks.
    """

    def __init__(self, matrix: torch.Tensor, code: MDSCode) -> None:
        if not isinstance(code, MDSCode):
            raise MDSError(f"code: expected an MDSCode, got {type(code).__name__}")
        self.code = code
        self.blocks = code.encode(matrix)
        """(N, ⌈n/K⌉, c): coded block i is ``blocks[i]``."""
        self.shape: tuple[int, int] = (int(matrix.shape[0]), int(matrix.shape[1]))
        """(n, c) of the original matrix."""

    def task(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Coded task ``index``: coded block ``index`` times ``x`` (a c-vector or a c × m matrix)."""
        if not _is_int(index) or not 0 <= index < self.code.coded:
            raise MDSError(f"index: must be an integer in [0, {self.code.coded}), got {index!r}")
        self._check_input(x)
        return self.blocks[index] @ x

    def decode(self, indices: Sequence[int], results: torch.Tensor) -> torch.Tensor:
        """``A·x`` (n rows, padding dropped) from the results of any K distinct coded tasks."""
        blocks = self.code.decode(indices, results)
        return blocks.reshape(-1, *blocks.shape[2:])[: self.shape[0]]

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim not in (1, 2) or x.shape[0] != self.shape[1]:
            raise MDSError(f"x: need a tensor of {self.shape[1]} rows (vector or matrix), got {_describe(x)}")
        if x.dtype != self.blocks.dtype:
            raise MDSError(f"x: dtype {x.dtype} differs from the matrix's {self.blocks.dtype}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
