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

The all-reduce overlaps the backward, as DDP's does. While the last call of a rank's share runs its
backward, a hook on every parameter adds its gradient into its bucket, and a bucket whose parameters
are all in is launched at once (:class:`BucketLauncher`). Buckets go strictly from the last to the
first, on every rank in the same order whatever order autograd runs in (collectives must match). The
first bucket, which holds the first layers' gradients (ready last anyway), the loss and the
agreement, is launched after the compute, once the rank knows whether its tasks succeeded. A bucket
whose parameters get no gradient in that call waits for the end of the compute, and so do the
buckets before it (as with DDP, unused parameters cost the overlap, not the result).

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
from collections.abc import Callable

import torch
import torch.distributed as dist

from codedgrad.codes.repetition import RepetitionCode
from codedgrad.runtime.buffers import FlatGradients
from codedgrad.runtime.coordinator import CodedStepTimeout, StepMismatchError
from codedgrad.runtime.release import BufferShare, CollectiveFailed, read_decoded
from codedgrad.runtime.step import StepRecord

__all__ = ["AGREEMENT_SLOTS", "BucketLauncher", "has_nothing_to_decide", "one_copy_each", "reduce_direct", "step_key"]

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


class BucketLauncher:
    """Launches a direct step's bucket all-reduces, during the backward of its last call where it can.

    Made per step. :meth:`arm` registers a hook on every parameter for one backward: each gradient is
    added, scaled, to its slice of the accumulator, and the buckets whose parameters are all in are
    launched, last bucket first. :meth:`disarm` removes the hooks. :meth:`launch_rest` launches
    what is left, the first bucket last. With one bucket there is nothing to overlap, and :attr:`overlaps`
    is False.

    Args:
        accumulator: the step's flat buffers (their buckets are what is reduced).
        group: the process group of the collectives.
    """

    def __init__(self, accumulator: FlatGradients, group: dist.ProcessGroup | None) -> None:
        self._accumulator = accumulator
        self._group = group
        self._bucket_of = accumulator.bucket_of
        self._sizes = [0] * len(accumulator.buckets)  # per bucket: its parameters
        for bucket in self._bucket_of:
            self._sizes[bucket] += 1
        self._waiting = list(self._sizes)  # per bucket: its parameters' gradients still to come
        self._next = len(accumulator.buckets) - 1  # the next bucket to launch (descending)
        self._scale = 0.0
        self._handles: list = []
        self._armed = False  # a hook that outlives its backward (it should not) adds nothing
        self._used: list[int] = []  # parameters the hooks added a gradient to (see record_uses)
        self.works: list[dist.Work] = []
        #: The error of a launch from a hook (the collective is broken: the step fails on this rank).
        self.failure: BaseException | None = None

    @property
    def overlaps(self) -> bool:
        """Whether a bucket can be reduced while the backward runs: more than one bucket, all on one
        device. (Parameters on two devices have their hooks run by two autograd threads at once, and
        collectives on one group must not be issued from two threads.)"""
        buckets = self._accumulator.buckets
        return len(buckets) > 1 and len({b.device for b in buckets}) == 1

    @property
    def launched(self) -> int:
        """How many buckets are on their way."""
        return len(self.works)

    def arm(self, scale: float) -> None:
        """Hook the accumulator's parameters for one backward, of a loss scaled by ``scale``."""
        self._scale = scale
        self._waiting = list(self._sizes)
        self._armed = True
        try:  # a registration that fails (a parameter frozen since, a Ctrl-C) must not leave the others
            for i, p in enumerate(self._accumulator.params):
                self._handles.append(p.register_hook(self._hook(i)))
        except BaseException:
            self.disarm()
            raise

    def disarm(self) -> None:
        """Remove the hooks (also after a backward that raised)."""
        self._armed = False
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def record_uses(self) -> None:
        """After a hooked backward that succeeded: count the parameters it gave a gradient (the counts
        travel in the first bucket, which is launched after the compute)."""
        used, self._used = self._used, []
        self._accumulator.count_uses(used)

    def launch_rest(self) -> list[dist.Work]:
        """Launch every bucket not yet launched, in order, the first (agreement) bucket last; all the works."""
        while self._next >= 0:
            self._launch(self._next)
        return self.works

    def _hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def add(grad: torch.Tensor) -> None:
            if not self._armed:
                return
            self._accumulator.add_one_(index, grad, self._scale)
            self._used.append(index)
            bucket = self._bucket_of[index]
            self._waiting[bucket] -= 1
            while self._next >= 1 and self._waiting[self._next] == 0 and self.failure is None:
                try:
                    self._launch(self._next)
                except BaseException as failure:  # a Ctrl-C too: reduce_direct raises it as CollectiveFailed
                    self.failure = failure

        return add

    def _launch(self, bucket: int) -> None:
        self._next = bucket - 1
        self.works.append(dist.all_reduce(self._accumulator.buckets[bucket], group=self._group, async_op=True))


def reduce_direct(
    record: StepRecord,
    group: dist.ProcessGroup | None,
    rank: int,
    world_size: int,
    key: int,
    error: BaseException | None,
    launcher: BucketLauncher,
    buffers: BufferShare | None = None,
) -> KeyboardInterrupt | None:
    """The direct step's all-reduce and agreement, on the calling thread; raises if the step failed.

    Every rank calls it, also one whose tasks raised (``error``): it takes part with a failed status,
    so the others fail at once instead of waiting out a timeout, then re-raises its own error. The
    buckets ``launcher`` launched during the backward are joined here; the rest are launched. A
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
        if launcher.failure is not None:  # a launch from the backward's hooks failed
            raise launcher.failure
        record.report.buckets_overlapped = launcher.launched
        for work in launcher.launch_rest():
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
