"""Spare work: what an idle rank computes for others once its own queue has run dry.

See docs/design.md, "The step protocol".

The no-wait release lets a rank whose queue is empty cover another rank's uncovered work instead of
waiting for the decision. Which work, and whether helping is worth it at all, is a *policy*: it
reads a decoder state (what is still open) and the code's plan (profiles, primaries) and changes
neither. It lives here, apart from the decoder states, so that those keep to decoding.

Only task-level repetition has spare work: any rank can compute any task, and the first commit of a
task is the one used. In the rank-level codes (frc, cyclic) a result is tied to the rank that owns
it, so there is nothing an idle rank could compute for another; both functions return None.

Which task: from the tail of the rank *most behind*, the primary rank with the most expected work
left on its open primaries (open tasks × mean task time). The owner works from the front of its
block, so the helper takes one from the back; idle ranks asking at the same moment are spread over
the back half of that tail (rank ``r`` takes the ``(r mod ⌈open/2⌉)``-th from the end) instead of all
racing for the same task. Several idle ranks may still be offered the same task; the decoder uses
the first commit.

Whether to help: given the time since the step started, a rank is helped only when that can end
the step sooner (:func:`_worth_helping`), and :func:`next_spare_check` says when asking again may
find an owner worth helping. On a quiet, homogeneous cluster every rank finishes within a task of
the others, and a helper that starts a whole task for a rank about to finish only delays its own
next step. See ``codes/README.md`` ("When helping pays") for the measurements.
"""

from __future__ import annotations

import math

import numpy as np

from codedgrad.codes.base import DecoderState, Work
from codedgrad.codes.repetition import RepetitionCode, RepetitionState

__all__ = ["next_spare_check", "spare_work"]


def spare_work(
    state: DecoderState, rank: int, elapsed: float | None = None, owners_in_chunks: bool = False
) -> Work | None:
    """Work ``rank`` may do for others once its own queue has run dry, or None to just wait.

    Args:
        state: the step's decoder state (not changed).
        rank: the idle rank asking.
        elapsed: time since the step started (seconds, in the profiles' units). With it, an owner is
            helped only when that is expected to end the step sooner, and the most-behind owner that
            qualifies is chosen; without it, whatever is open is offered.
        owners_in_chunks: owners run their primaries in chunks committed all or none (a
            ``batch_loss``). Their progress then shows only when a chunk commits, so an owner on
            schedule looks behind, and a copied task voids the owner's whole chunk in flight: with
            ``elapsed``, only an owner past :func:`_overdue_at` (a stall, a slowed node) is helped.

    Returns:
        A task of the most-behind owner that qualifies, as a :class:`Work` with that task's result
        id; None once the step is decided, when no owner is worth helping now, and always for
        rank-level codes.

    Raises:
        CodeError: ``rank`` is out of range (task-level repetition).
    """
    if not isinstance(state, RepetitionState) or state.decided:
        return None
    code = state.code
    code._check_rank(rank)
    open_tasks = state.open_tasks()
    open_by_owner: dict[int, list[int]] = {}
    left = np.zeros(code.num_ranks)  # each owner's expected work left: open tasks × mean task time
    for j in open_tasks:
        owner = int(code.primary_of[j])
        open_by_owner.setdefault(owner, []).append(j)
        left[owner] += code.profiles[owner].mean
    for owner in np.argsort(-left, kind="stable").tolist():  # most behind first, ties to the lower rank
        if left[owner] == 0:
            return None
        tail = open_by_owner[owner]  # ascending: the owner works from the front
        if elapsed is None:
            helping = True  # no measured task times yet to judge by (the first steps)
        elif owners_in_chunks:
            helping = elapsed >= _overdue_at(code, owner)
        else:
            helping = _worth_helping(code, rank, owner, len(tail), elapsed)
        if helping:
            task = tail[-1 - rank % ((len(tail) + 1) // 2)]
            return Work(task, (task,), (1.0,))
    return None


def next_spare_check(state: DecoderState, rank: int, elapsed: float) -> float | None:
    """After :func:`spare_work` returned None at ``elapsed``: when to ask again, or None to wait.

    The only way an owner becomes worth helping later is by falling behind its schedule, so this
    is the earliest time (since the step's start) at which an owner with open tasks becomes
    overdue (:func:`_overdue_at`); it may already have passed. None once the step is decided and
    always for rank-level codes.

    Raises:
        CodeError: ``rank`` is out of range (task-level repetition).
    """
    if not isinstance(state, RepetitionState) or state.decided:
        return None
    code = state.code
    code._check_rank(rank)
    owners = {int(code.primary_of[j]) for j in state.open_tasks()}
    return min((_overdue_at(code, owner) for owner in owners), default=None)


def _worth_helping(code: RepetitionCode, helper: int, owner: int, open_count: int, elapsed: float) -> bool:
    """Whether ``helper``, starting a task of ``owner`` now, is expected to end the step sooner.

    If the owner has one task left and the helper copies it, the step ends at ``min(R, H)``
    instead of ``R`` (R: the owner's time left, H: the helper's task time), but when the owner
    wins the helper has spent ``H − R`` that delays its next step. Expected gain minus expected
    waste is ``E[(R−H)⁺] − E[(H−R)⁺] = E[R] − E[H]``: help when the owner's expected time left
    exceeds the helper's mean task time (:func:`_expected_left`). With several tasks left the
    same comparison is a heuristic (the helper's copy of the last one shortens the owner's
    tail). An owner past :func:`_overdue_at` is straggling (a stall, a slowed node): its time
    left is unknown and may be long, so it is helped too.
    """
    expected = _expected_left(code, owner, open_count, elapsed)
    return expected > code.profiles[helper].mean or elapsed >= _overdue_at(code, owner)


def _expected_left(code: RepetitionCode, owner: int, open_count: int, elapsed: float) -> float:
    """The owner's expected time to finish its ``open_count`` open primaries, if on schedule.

    A task is modelled as a fixed part ``d = m − s`` plus an exponential part of mean ``s``
    (the profile's mean m and std s, s capped at m). The task in flight started, on schedule,
    at ``c + (k − n)·m`` (n of its k primaries open); its fixed part may still be running, and
    its exponential part has, being memoryless, still ``s`` to go; the other n − 1 take m each.
    Tasks covered by helpers from the tail count as the owner's progress here, which makes the
    task in flight look younger than it is: the estimate errs towards helping.
    """
    profile = code.profiles[owner]
    k, n = int(code.primaries[owner]), open_count
    jitter = min(profile.std, profile.mean)
    age = max(0.0, elapsed - (profile.shift + (k - n) * profile.mean))
    return (n - 1) * profile.mean + max(0.0, profile.mean - jitter - age) + jitter


def _overdue_at(code: RepetitionCode, owner: int) -> float:
    """When ``owner`` is late beyond its noise: its expected end plus two standard deviations of
    its k tasks, and at least half a task, which also absorbs the ranks' skewed step starts."""
    profile = code.profiles[owner]
    k = int(code.primaries[owner])
    return profile.shift + k * profile.mean + max(2.0 * profile.std * math.sqrt(k), 0.5 * profile.mean)
