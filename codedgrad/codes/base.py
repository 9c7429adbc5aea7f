"""The interface every gradient code implements (docs/design.md, "The codes").

A code answers two questions for the runtime:

* **What does rank r compute, in which order?** :meth:`GradientCode.queue` lists :class:`Work`
  items. Each item is one *result* the rank computes and then commits: the weighted sum
  ``Σ_i coefficients[i] · g_{tasks[i]}`` of task gradients (for task-level repetition a single task
  with weight 1; for rank-level codes all of the rank's partitions, one coded gradient).
* **Is what has been committed enough, and how is it combined?** A :class:`DecoderState`, fed with
  commits ``(rank, result)``, says whether a result is still worth computing, whether a commit is
  used, and once *decided* returns a :class:`Decoding`: one multiplier per rank such that
  ``Σ_r rank_coefficients[r] · accumulator_r = Σ_j g_j`` exactly, where ``accumulator_r`` is the sum
  of rank r's results whose commit returned True.

The runtime keeps the decoder state of a step in the c10d Store and updates it with
compare-and-set, so a state serialises to a few bytes (:meth:`DecoderState.to_bytes`) and every
rank rebuilds the same state from them (:meth:`GradientCode.state_from_bytes`).

Below the interface: :func:`pack_bits`/:func:`unpack_bits` (the bitmasks the states serialise to)
and :class:`RankLevelCode`/:class:`ResponderState`, the machinery shared by the codes where each
rank computes one coded result and the decoder only needs the set of responders.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CodeError",
    "DecoderState",
    "Decoding",
    "GradientCode",
    "NotDecodable",
    "RankLevelCode",
    "ResponderState",
    "Work",
    "pack_bits",
    "unpack_bits",
]


class CodeError(ValueError):
    """A code cannot be built from the given arguments (the message names the argument)."""


class NotDecodable(RuntimeError):
    """The committed results do not determine the exact sum; the decoder refuses to guess."""


@dataclass(frozen=True)
class Work:
    """One result a rank computes and commits: ``Σ_i coefficients[i] · g_{tasks[i]}``.

    Attributes:
        result: the id the decoder knows this result by (unique within a code).
        tasks: the tasks (partitions of the global batch) whose gradients it sums.
        coefficients: the weight of each task's gradient, same length as ``tasks``.
    """

    result: int
    tasks: tuple[int, ...]
    coefficients: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.tasks) != len(self.coefficients) or not self.tasks:
            raise CodeError(f"Work {self.result}: need as many coefficients as tasks (at least one)")


@dataclass(frozen=True)
class Decoding:
    """How the ranks' accumulators combine into the exact sum of all task gradients.

    Attributes:
        rank_coefficients: float64 array, one multiplier per rank for the coded all-reduce.
        condition_number: of the linear system solved (1.0 for 0/1 codes).
    """

    rank_coefficients: np.ndarray
    condition_number: float = 1.0


class DecoderState(ABC):
    """The decoder's knowledge of one step: which results have been committed."""

    @property
    @abstractmethod
    def decided(self) -> bool:
        """True once the committed results determine the exact sum (it never becomes False again)."""

    @abstractmethod
    def is_needed(self, rank: int, result: int) -> bool:
        """Whether computing ``result`` on ``rank`` can still be used (False once covered or decided)."""

    @abstractmethod
    def commit(self, rank: int, result: int) -> bool:
        """Record that ``rank`` finished ``result``; True if the rank must add it to its accumulator.

        A commit that is not used (already covered, or the step already decided) changes nothing.
        """

    @abstractmethod
    def decoding(self) -> Decoding:
        """The combination, once :attr:`decided`; raises :class:`NotDecodable` before."""

    @abstractmethod
    def missing(self) -> str:
        """A short human description of what is still missing (for timeout errors)."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """A compact serialisation; :meth:`GradientCode.state_from_bytes` inverts it."""


class GradientCode(ABC):
    """A gradient code over ``num_ranks`` ranks and ``num_tasks`` equal tasks."""

    name: str = "abstract"

    def __init__(self, num_ranks: int, num_tasks: int) -> None:
        if num_ranks < 1:
            raise CodeError(f"num_ranks: must be >= 1, got {num_ranks}")
        if num_tasks < num_ranks:
            raise CodeError(f"num_tasks: need at least one task per rank ({num_ranks}), got {num_tasks}")
        self.num_ranks = num_ranks
        self.num_tasks = num_tasks

    @abstractmethod
    def queue(self, rank: int) -> list[Work]:
        """Rank ``rank``'s ordered work list."""

    @abstractmethod
    def new_state(self) -> DecoderState:
        """The decoder state of a step before any commit."""

    @abstractmethod
    def state_from_bytes(self, data: bytes) -> DecoderState:
        """Rebuild a state from :meth:`DecoderState.to_bytes` (raises CodeError when malformed)."""

    @abstractmethod
    def tolerates(self, stragglers: Iterable[int]) -> bool:
        """Whether the code claims to decode when exactly these ranks never commit."""

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.num_ranks:
            raise CodeError(f"rank: must be in [0, {self.num_ranks}), got {rank}")


# --- Shared machinery (added with the codes; nothing above depends on it) -------------------------


def pack_bits(flags: Sequence[bool] | bytes | bytearray | np.ndarray) -> bytes:
    """A bitmask of ``flags`` (first flag = most significant bit of the first byte, zero padding)."""
    if isinstance(flags, (bytes, bytearray)):
        flags = np.frombuffer(bytes(flags), dtype=np.uint8)
    return np.packbits(np.asarray(flags, dtype=bool)).tobytes()


def unpack_bits(data: bytes, count: int) -> np.ndarray:
    """Invert :func:`pack_bits` for ``count`` flags; raises :class:`CodeError` on a malformed mask.

    The length must be exactly ⌈count/8⌉ bytes and the padding bits zero, so that one state has
    exactly one serialisation (ranks compare states byte for byte in compare-and-set).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodeError(f"data: expected bytes, got {type(data).__name__}")
    expected = (count + 7) // 8
    if len(data) != expected:
        raise CodeError(f"data: expected {expected} bytes for {count} flags, got {len(data)}")
    bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8))
    if bits[count:].any():
        raise CodeError("data: padding bits are set")
    return bits[:count].astype(bool)


class RankLevelCode(GradientCode):
    """A code where each rank computes one coded result (result id = rank) and the decoder only
    needs to know *which* ranks responded (Tandon et al.'s fractional repetition and cyclic MDS).

    Subclasses fill ``self._works`` (one :class:`Work` or None per rank) and implement
    :meth:`_solve`. Decodability is monotone in the responder set (more responders never hurt), so
    a step is decided at the first commit after which the responders decode, and results that
    arrive later are not used.
    """

    def __init__(self, num_ranks: int, num_tasks: int) -> None:
        super().__init__(num_ranks, num_tasks)
        self._works: list[Work | None] = [None] * num_ranks
        # Decoding is a pure function of the responder set; the simulator and every rank ask for
        # the same few sets over and over, so remember them (bounded: at most 2^P sets exist).
        self._solved: dict[int, Decoding | None] = {}

    def queue(self, rank: int) -> list[Work]:
        self._check_rank(rank)
        work = self._works[rank]
        return [] if work is None else [work]

    def new_state(self) -> ResponderState:
        return ResponderState(self, 0)

    def state_from_bytes(self, data: bytes) -> ResponderState:
        flags = unpack_bits(data, self.num_ranks)
        return ResponderState(self, sum(1 << r for r in np.flatnonzero(flags).tolist()))

    def tolerates(self, stragglers: Iterable[int]) -> bool:
        """Exact: True iff the ranks that are not stragglers (and have work) decode."""
        mask = 0
        lost = set(stragglers)
        for rank in lost:
            self._check_rank(rank)
        for rank, work in enumerate(self._works):
            if work is not None and rank not in lost:
                mask |= 1 << rank
        return self.decode(mask) is not None

    def decode(self, mask: int) -> Decoding | None:
        """The decoding for the responders in bitmask ``mask`` (bit r = rank r), None if none exists."""
        if mask not in self._solved:
            if len(self._solved) > 65536:  # only reachable for large P; keep memory bounded
                self._solved.clear()
            responders = tuple(r for r in range(self.num_ranks) if mask >> r & 1)
            decoding = self._solve(responders) if responders else None
            if decoding is not None:
                decoding.rank_coefficients.setflags(write=False)  # shared between states
            self._solved[mask] = decoding
        return self._solved[mask]

    @abstractmethod
    def _solve(self, responders: tuple[int, ...]) -> Decoding | None:
        """The decoding from exactly these responders (ascending ranks), or None."""

    def _describe_missing(self, responders: tuple[int, ...]) -> str:
        waiting = [r for r, w in enumerate(self._works) if w is not None and r not in responders]
        return f"{self.name}: responders {list(responders)} do not decode yet; waiting for ranks {waiting}"


class ResponderState(DecoderState):
    """Decoder state of a :class:`RankLevelCode`: the set of ranks whose result was used.

    Serialised as a bitmask of ranks (⌈P/8⌉ bytes). Commits after the decision change nothing, so
    the set is frozen at the decision and every rank rebuilds the same decoding from the bytes.
    """

    def __init__(self, code: RankLevelCode, mask: int) -> None:
        self._code = code
        self._mask = mask
        self._decoding = code.decode(mask) if mask else None

    @property
    def decided(self) -> bool:
        return self._decoding is not None

    @property
    def responders(self) -> tuple[int, ...]:
        """Ranks whose result is used (committed before the decision), ascending."""
        return tuple(r for r in range(self._code.num_ranks) if self._mask >> r & 1)

    def is_needed(self, rank: int, result: int) -> bool:
        self._check(rank, result)
        return self._decoding is None and not self._mask >> rank & 1

    def commit(self, rank: int, result: int) -> bool:
        if not self.is_needed(rank, result):
            return False
        self._mask |= 1 << rank
        self._decoding = self._code.decode(self._mask)
        return True

    def decoding(self) -> Decoding:
        if self._decoding is None:
            raise NotDecodable(self.missing())
        return self._decoding

    def missing(self) -> str:
        if self._decoding is not None:
            return "nothing (decided)"
        return self._code._describe_missing(self.responders)

    def to_bytes(self) -> bytes:
        return pack_bits([bool(self._mask >> r & 1) for r in range(self._code.num_ranks)])

    def _check(self, rank: int, result: int) -> None:
        self._code._check_rank(rank)
        work = self._code._works[rank]
        if work is None or work.result != result:
            raise CodeError(f"result: rank {rank} has no result {result}")
