"""Accounting before the coded all-reduce: do the ranks' accumulators hold what the decoder uses?

The decoder's answer (:meth:`~codedgrad.codes.base.DecoderState.decoding`) is only the exact sum
if every result it counts was added to exactly one rank's gradient accumulator, and nothing else
was. The runtime publishes each rank's accumulated result ids with its arrival
(:func:`encode_results`, a bitmask of a few bytes), every rank reads them back
(:func:`decode_results`) and refuses to reduce unless :func:`check_accumulated` passes, so a lost,
doubled or stray result fails the step loudly on every rank instead of corrupting the gradient.

What "exactly what the decoder uses" means per code:

* task-level repetition (``"repetition"``, ``"uncoded"``): result id = task id, and the decided
  step uses one result of every task, so the accumulators together partition ``range(K)``;
* rank-level codes (``"frc"``, ``"cyclic"``): result id = rank, and every responder of the decided
  state (a rank whose commit was used) holds its own result, the other ranks nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from itertools import pairwise
from numbers import Integral

import numpy as np

from codedgrad.codes.base import (
    CodeError,
    DecoderState,
    GradientCode,
    RankLevelCode,
    ResponderState,
    pack_bits,
    unpack_bits,
)
from codedgrad.codes.repetition import RepetitionCode, RepetitionState

__all__ = ["check_accumulated", "decode_results", "encode_results"]


def check_accumulated(code: GradientCode, state: DecoderState, accumulated: Sequence[Collection[int]]) -> str | None:
    """Whether the ranks' accumulators together hold exactly the results the decoder uses.

    Args:
        code: the step's code.
        state: the step's decoder state, decided.
        accumulated: per rank (all ``code.num_ranks`` of them, in rank order), the result ids that
            rank added to its gradient accumulator.

    Returns:
        None when the accounts match; otherwise a one-line message naming the first discrepancy
        (ranks and results in ascending order), e.g. ``"task 7 is in no rank's accumulator"``,
        ``"task 3 is accumulated by ranks 0 and 2"`` or
        ``"rank 1 accumulated result 1 but is not a responder"``. An undecided state is a
        discrepancy too: the decoder uses nothing yet.

    Raises:
        CodeError: the code is of a kind this module does not know, or the state is not one of its
            decoder states (a programming error, not a discrepancy of the accounts).
    """
    expected = {RepetitionCode: RepetitionState, RankLevelCode: ResponderState}
    kind = next((k for k in expected if isinstance(code, k)), None)
    if kind is None:
        raise CodeError(f"code: no accounting for {type(code).__name__}")
    if not isinstance(state, expected[kind]):
        raise CodeError(f"state: a {type(state).__name__} is not a decoder state of {type(code).__name__}")
    if not state.decided:
        return f"the step is not decided: {state.missing()}"
    if len(accumulated) != code.num_ranks:
        return f"got the accumulators of {len(accumulated)} ranks, the code has {code.num_ranks}"
    if isinstance(code, RepetitionCode):
        return _check_tasks(code, accumulated)
    return _check_responders(code, state, accumulated)


def _sorted_ids(rank: int, results: Collection[int], num_results: int) -> tuple[list[int], str | None]:
    """A rank's result ids in ascending order, or the first that is not an id or appears twice."""
    ids: list[int] = []
    for result in results:
        if isinstance(result, bool) or not isinstance(result, Integral) or not 0 <= result < num_results:
            return [], f"rank {rank} accumulated {result!r}, not a result id in [0, {num_results})"
        ids.append(int(result))
    ids.sort()
    for a, b in pairwise(ids):
        if a == b:
            return [], f"rank {rank} accumulated result {a} twice"
    return ids, None


def _check_tasks(code: RepetitionCode, accumulated: Sequence[Collection[int]]) -> str | None:
    """Repetition: every task's result in exactly one rank's accumulator."""
    holders: list[list[int]] = [[] for _ in range(code.num_tasks)]
    for rank, results in enumerate(accumulated):
        ids, problem = _sorted_ids(rank, results, code.num_tasks)
        if problem is not None:
            return problem
        for task in ids:
            holders[task].append(rank)
    for task, ranks in enumerate(holders):
        if not ranks:
            return f"task {task} is in no rank's accumulator"
        if len(ranks) > 1:
            return f"task {task} is accumulated by ranks {_and(ranks)}"
    return None


def _check_responders(code: RankLevelCode, state: ResponderState, accumulated: Sequence[Collection[int]]) -> str | None:
    """Rank-level codes: each responder holds its own result, every other rank nothing."""
    responders = set(state.responders)
    for rank, results in enumerate(accumulated):
        ids, problem = _sorted_ids(rank, results, code.num_ranks)
        if problem is not None:
            return problem
        queue = code.queue(rank)
        own = queue[0].result if queue else None
        for result in ids:
            if own is None:
                return f"rank {rank} has no result of its own but accumulated result {result}"
            if result != own:
                return f"rank {rank} accumulated result {result}, which is not its own ({own})"
        if ids and rank not in responders:
            return f"rank {rank} accumulated result {own} but is not a responder"
        if not ids and rank in responders:
            return f"rank {rank} is a responder but did not accumulate its result {own}"
    return None


def _and(items: Sequence[int]) -> str:
    """``"0 and 2"``, ``"0, 2 and 5"``."""
    words = [str(i) for i in items]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def encode_results(results: Collection[int], num_results: int) -> bytes:
    """A rank's accumulated result ids as a bitmask of ⌈num_results/8⌉ bytes (see :func:`pack_bits`).

    Args:
        results: distinct result ids in ``[0, num_results)``.
        num_results: the number of result ids of the code (K for repetition, P for rank-level codes).

    Raises:
        CodeError: an id is out of range or not an integer, or appears twice (a set of flags cannot
            say that a result was added twice, so that is refused here rather than hidden).
    """
    _check_count(num_results)
    flags = np.zeros(num_results, dtype=bool)
    for result in results:
        if isinstance(result, bool) or not isinstance(result, Integral) or not 0 <= result < num_results:
            raise CodeError(f"results: {result!r} is not a result id in [0, {num_results})")
        if flags[result]:
            raise CodeError(f"results: result {result} appears twice")
        flags[result] = True
    return pack_bits(flags)


def decode_results(data: bytes, num_results: int) -> set[int]:
    """Invert :func:`encode_results`; raises :class:`CodeError` on malformed bytes (wrong length,
    padding bits set, not bytes)."""
    _check_count(num_results)
    return set(np.flatnonzero(unpack_bits(data, num_results)).tolist())


def _check_count(num_results: int) -> None:
    if isinstance(num_results, bool) or not isinstance(num_results, Integral) or num_results < 1:
        raise CodeError(f"num_results: must be an integer >= 1, got {num_results!r}")
