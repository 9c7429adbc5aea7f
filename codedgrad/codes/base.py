"""The interface every gradient code implements (DESIGN.md §2).

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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["CodeError", "DecoderState", "Decoding", "GradientCode", "NotDecodable", "Work"]


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
