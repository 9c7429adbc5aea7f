"""The direct step: a plan with nothing to decide runs without the Store (see docs/design.md).

When every task has exactly one holder (task-level repetition with Ω = 1: no backups) and spare
work is off, a step's decision is known before it begins: every task's result comes from its
primary rank. Commits, the decision and the arrival gate in the Store would only add round trips
to every step (about a third of a step on a quiet homogeneous cluster, measured). So each rank
computes its primaries into its accumulator and enters the SUM all-reduce at once, as DDP does:
the collective is the agreement.

Nothing is given up for it. The first gradient bucket carries a few more elements: each rank
writes, in its own slots, whether its tasks succeeded and a key of what it computed (step, plan,
task weights; two 24-bit halves, exact in the bucket's float32 or float64, which the SUM of the
others' zeros keeps exact). After the SUM every rank holds every rank's entries, so a
rank whose task raised, or one that ran other tasks or another step, fails the step on every rank
before anything is applied, with a message that names it. The exact gradient is the same sum as in
the coded step (each rank's results scaled by their weight share, coefficient 1).

The difference a user can see: a rank waits for the others' compute inside the collective, so the
collective's timeout bounds that wait, as with DDP: the engine's ``timeout`` on the release's
process group (with ``no_wait=False``, the engine's own group and its timeout). That is why the first
step under every plan (adopted from a guess, switched to, or restored from a checkpoint, when a first
step may compile for minutes) runs the coded step, whose waits count only time without progress. On
NCCL a collective that times out is torn down by NCCL's watchdog, which ends the process, rather
than raised as :class:`CollectiveFailed`.
"""

from __future__ import annotations

import hashlib
import time

import torch
import torch.distributed as dist

from codedgrad.codes.repetition import RepetitionCode
from codedgrad.runtime.coordinator import CodedStepTimeout, StepMismatchError
from codedgrad.runtime.release import BufferShare, CollectiveFailed, read_decoded
from codedgrad.runtime.step import StepRecord

__all__ = ["AGREEMENT_SLOTS", "has_nothing_to_decide", "one_copy_each", "reduce_direct", "step_key"]

#: Elements per rank in the first bucket: its status and the two halves of its step key.
AGREEMENT_SLOTS = 3
_OK, _FAILED = 1.0, 2.0  # a rank's status slot (0 would mean it never wrote one: impossible in a SUM)
_HALF = 2**24  # integers below this are exact in float32


def one_copy_each(plan: object, spare_work: bool) -> bool:
    """Whether ``plan`` (an engine :class:`~codedgrad.runtime.replan.Plan`) puts every task on exactly
    one rank, without spare work: once measured, such a plan runs direct steps."""
    code = getattr(plan, "code", None)
    return not spare_work and isinstance(code, RepetitionCode) and not any(len(b) for b in code.backups)


def has_nothing_to_decide(plan: object, spare_work: bool) -> bool:
    """Whether ``plan`` runs as a direct step: :func:`one_copy_each`, and measured task times (see the
    module docstring)."""
    return bool(getattr(plan, "measured", False)) and one_copy_each(plan, spare_work)


def step_key(step: int, plan_version: int, fingerprint: str, digest: bytes) -> int:
    """A 48-bit key of what a rank computes in a step, equal on ranks that agree (sent as two 24-bit halves)."""
    text = f"{step}/{plan_version}/{fingerprint}/".encode() + digest
    return int.from_bytes(hashlib.sha256(text).digest()[:6], "little")


def reduce_direct(
    record: StepRecord,
    group: dist.ProcessGroup | None,
    rank: int,
    world_size: int,
    key: int,
    error: BaseException | None,
    buffers: BufferShare | None = None,
) -> KeyboardInterrupt | None:
    """The direct step's all-reduce and agreement, on the calling thread; raises if the step failed.

    Every rank calls it, also one whose tasks raised (``error``): it takes part with a failed status,
    so the others fail at once instead of waiting out a timeout, then re-raises its own error. A
    Ctrl-C while the collective is in flight does not leave it half done (the others are in it too,
    and this rank's buffers would still be written): the step is finished and the interrupt returned,
    for the caller to raise once the step is applied, as a coded step does after its decision.

    Raises:
        CollectiveFailed: a collective failed (a rank died or hung past the group's timeout).
        CodedStepTimeout: another rank's tasks failed (the step is abandoned on every rank).
        StepMismatchError: ranks computed different steps, plans or task weights.
    """
    accumulator = record.accumulator
    agreement = accumulator.agreement.view(AGREEMENT_SLOTS, world_size)
    try:  # in the buckets' own dtype (float32 or float64 for gradients), never the default dtype
        entry = [_OK if error is None else _FAILED, key // _HALF, key % _HALF]
        agreement[:, rank] = torch.tensor(entry, dtype=agreement.dtype, device=agreement.device)
    except Exception as failure:  # the status stays 0: the others read this rank as failed
        error = error or failure
    start = time.perf_counter()
    interrupted: KeyboardInterrupt | None = None
    try:
        works = [dist.all_reduce(bucket, group=group, async_op=True) for bucket in accumulator]
        for work in works:
            while True:
                try:
                    work.wait()
                    break
                except KeyboardInterrupt as stop:  # bounded by the group's timeout
                    interrupted = stop
    except BaseException as failure:  # a failed collective, or Ctrl-C while they were being issued
        raise CollectiveFailed(_collective_failed(rank, record.step, failure)) from failure
    record.report.allreduce_time = time.perf_counter() - start
    record.report.release_lag = record.report.allreduce_time
    status, high, low = agreement.tolist()
    if error is not None:
        raise error
    failed = [r for r in range(world_size) if status[r] != _OK]
    if failed:
        raise CodedStepTimeout(
            f"codedgrad: rank {rank}: step {record.step} was abandoned by rank(s) {failed}: their tasks failed "
            "(each raises its own error); no rank applies the step"
        )
    keys = [(h, lo) for h, lo in zip(high, low)]
    differ = [r for r in range(world_size) if keys[r] != keys[rank]]
    if differ:
        raise StepMismatchError(
            f"codedgrad: rank {rank}: ranks {differ} computed another step, plan or task weights than this rank "
            f"in step {record.step}; every rank must pass the same tasks to the same number of backward() calls"
        )
    try:  # every rank got here (the same verdicts above): the buffers' broadcast is everyone's
        read_decoded(record, group, buffers)
    except Exception as failure:
        raise CollectiveFailed(_collective_failed(rank, record.step, failure)) from failure
    return interrupted


def _collective_failed(rank: int, step: int, failure: BaseException) -> str:
    return (
        f"codedgrad: rank {rank}: the all-reduce of step {step} (a direct step: the plan leaves nothing to "
        f"decide) failed; a rank died, hung, or computed past the group's timeout: {failure}"
    )
