"""The release: reduce each decided step, in step order, on a thread of its own.

:func:`reduce_step` is the reduction of one step: wait for the decision, freeze the accumulator
(RUNNING → RELEASING under the step's lock), arrive with the list of accumulated results, and, once
every rank arrived and the accounts add up, one SUM all-reduce per flat bucket scaled by this rank's
decoding coefficient; then share rank 0's module buffers. The synchronous step calls it on the
compute thread; the no-wait release calls it from :class:`Releaser`.

:class:`StepRelease` is the thread's schedule, which :class:`Releaser` (the engine's) and the
drop-slowest baseline share: one thread that serves steps strictly in order, runs ahead of a stalled
compute thread, and stops at a failure or at ``close``; each supplies the work of one step.

:class:`Releaser` is one thread per engine, with its own process group (collectives from two threads
on one group can interleave and abort) and its own Store client. It serves steps strictly in order.
When this rank's compute thread is still inside step t while the others have begun step t+1, the
releaser joins step t+1 on its own (the Store header says it runs under the same plan), contributes
an empty accumulator, and keeps the reduced gradient for the compute thread, which applies it
without computing anything of that step; so nobody waits for a straggler's task in flight, not at
the decision and not at the next step. At most ``max_steps_ahead`` steps are served that way.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, Protocol, TypeVar

import torch
import torch.distributed as dist

from codedgrad.runtime.coordinator import StepChannel, StoreCoordinator
from codedgrad.runtime.hooks import coded_allreduce_
from codedgrad.runtime.step import StepPhase, StepRecord

__all__ = ["BufferShare", "CollectiveFailed", "Releaser", "ServedStep", "StepRelease", "read_decoded", "reduce_step"]


class CollectiveFailed(RuntimeError):
    """The coded all-reduce of a step failed (a rank died or hung inside it); the message names the
    step and the ranks that did not report the failure themselves. The process group is unusable
    afterwards: end the job (torchrun restarts it from the last checkpoint)."""


@dataclass
class BufferShare:
    """Rank 0's module buffers, carried by the release after every step.

    Args:
        source: the global rank whose buffers everyone takes.
        snapshot: on the source rank, returns a copy of its buffers as of its last finished task.
        like: tensors shaped like the buffers (received into fresh copies of these).
        group: the group to broadcast on.
    """

    source: int
    is_source: bool
    snapshot: Callable[[], list[torch.Tensor]]
    like: list[torch.Tensor]

    def share(self, group: dist.ProcessGroup | None) -> list[torch.Tensor]:
        tensors = self.snapshot() if self.is_source else [torch.empty_like(t) for t in self.like]
        for tensor in tensors:
            dist.broadcast(tensor, src=self.source, group=group)
        return tensors


def reduce_step(
    record: StepRecord,
    channel: StepChannel,
    group: dist.ProcessGroup | None,
    rank: int,
    buffers: BufferShare | None = None,
    stream: torch.cuda.Stream | None = None,
    cleanup: Callable[[int], None] | None = None,
) -> None:
    """Reduce one step on the calling thread; the record ends REDUCED or FAILED (never half-way).

    ``cleanup(step)`` runs after the collective and before the compute thread is woken: every rank
    is then past every wait of the step, and a caller that counts Store keys between steps sees
    them gone. Raises nothing: an error is stored in ``record.error`` for the compute thread to raise.
    """
    try:
        decided = channel.wait_decided(busy=lambda: record.compute_busy)
        with record.lock:  # a commit in progress is accumulated (or not) before the freeze
            if record.phase is not StepPhase.RUNNING:  # the compute thread failed the step meanwhile
                failed_locally = True
            else:
                failed_locally = False
                record.phase, record.decided = StepPhase.RELEASING, decided
                accumulated = list(record.accumulated)
        decision_time = time.perf_counter()
        record.report.time_to_decision = decision_time - record.start
        if failed_locally:
            channel.abandon(f"{type(record.error).__name__}: {record.error}")
            record.finish(StepPhase.FAILED)
            return
        channel.arrive_and_wait(decided, accumulated)
        decoding = decided.decoding()
        coefficient = float(decoding.rank_coefficients[rank])
        record.report.rank_coefficient = coefficient
        record.report.condition_number = float(decoding.condition_number)
        start = time.perf_counter()
        try:
            if stream is not None:
                # Work on the release's own stream, after the compute stream's accumulation, so that the
                # reduction does not queue behind the kernels of a task still in flight.
                if record.accumulated_event is not None:
                    stream.wait_event(record.accumulated_event)
                with torch.cuda.stream(stream):
                    _reduce_buckets(record, coefficient, group, buffers)
                    record.reduced_event = torch.cuda.Event()
                    record.reduced_event.record()
            else:
                _reduce_buckets(record, coefficient, group, buffers)
        except Exception as error:  # a rank died or hung inside the collective (the group's timeout)
            raise CollectiveFailed(_name_lost_ranks(channel, error)) from error
        record.report.allreduce_time = time.perf_counter() - start
        record.report.release_lag = time.perf_counter() - decision_time
    except BaseException as error:  # handed to the compute thread, which raises it
        # Wake the others at once (a timeout here is everyone's): the gate refuses once it is "go".
        try:
            channel.abandon(f"{type(error).__name__}: {error}")
        except Exception:
            pass
        record.finish(StepPhase.FAILED, error)
        return
    # The collective is done on every rank: from here on nothing may fail this step on one rank.
    if cleanup is not None:
        try:
            cleanup(record.step)
        except Exception as error:
            warnings.warn(
                f"codedgrad: step {record.step}: Store clean-up failed: {error}", RuntimeWarning, stacklevel=2
            )
    record.finish(StepPhase.REDUCED)


def _name_lost_ranks(channel: StepChannel, error: Exception) -> str:
    """What to say when the coded all-reduce of ``channel``'s step failed on this rank.

    The collective's own error names an address, not a rank. Every rank whose collective failed says
    so in the Store and waits up to the timeout for the others: those that never say so are the
    ranks that died (or hang) inside it.
    """
    step, rank, world = channel.step, channel.rank, channel.world_size
    keys = [f"s{step}/collective_failed/{r}" for r in range(world)]
    try:
        channel.client.set(keys[rank], b"1")
        try:
            channel.client.wait(keys, timedelta(seconds=channel.timeout))
            lost = []
        except dist.DistStoreError:
            lost = [r for r, key in enumerate(keys) if not channel.client.check([key])]
    except Exception as store_error:  # the Store is gone too (e.g. its host died)
        return (
            f"codedgrad: rank {rank}: the coded all-reduce of step {step} failed and the Store is unreachable "
            f"({store_error}); the collective said: {error}"
        )
    if lost:
        who = f"ranks {lost} did not report back within {channel.timeout:g} s (crashed, killed or hung in it)"
    else:
        who = "every rank saw it fail"
    return f"codedgrad: rank {rank}: the coded all-reduce of step {step} failed: {who}; the collective said: {error}"


def _reduce_buckets(
    record: StepRecord, coefficient: float, group: dist.ProcessGroup | None, buffers: BufferShare | None
) -> None:
    for bucket in record.accumulator:
        coded_allreduce_(bucket, coefficient, group)
    read_decoded(record, group, buffers)


def read_decoded(record: StepRecord, group: dist.ProcessGroup | None, buffers: BufferShare | None) -> None:
    """After the all-reduce: the decoded loss, values and finiteness into the report; rank 0's buffers."""
    # The same values on every rank after the all-reduce, so every rank reaches the same verdict.
    record.report.finite = record.accumulator.is_finite()
    record.report.loss = float(record.accumulator.loss)
    decoded = record.accumulator.values.tolist()
    record.report.values = {slot: total / weight for slot, (total, weight) in enumerate(decoded) if weight != 0}
    if buffers is not None:
        record.buffers = buffers.share(group)


class ServedStep(Protocol):
    """What :class:`StepRelease` reads of a step's record: its step, how far it has got, and its end."""

    step: int
    phase: StepPhase
    done: threading.Event


R = TypeVar("R", bound=ServedStep)


class StepRelease(Generic[R]):
    """One thread that serves a rank's steps strictly in step order, ahead of a stalled compute thread too.

    The compute thread hands each step's record over with :meth:`claim` and lets go of it with
    :meth:`left`; the thread serves the records one step after the other. While the compute thread
    is still inside (or behind) a step this thread has already served successfully, the thread looks
    for the next step on the Store (:meth:`_record_ahead`: the others began it) and serves it on its
    own, at most ``max_steps_ahead`` steps beyond the compute thread's, and never past a failed step:
    the compute thread decides what comes after a failure.

    A subclass supplies the work of one step and calls :meth:`_start` at the end of its constructor:

    * :meth:`_serve` serves one step (bounded waits only) and ends its record REDUCED or FAILED;
    * :meth:`_record_ahead` makes the record of a step the others began, or says it is not there yet;
    * :meth:`_serve_failed` ends a record whose :meth:`_serve` raised; the thread then ends too (its
      process group may be unusable), and the compute thread sees it no longer :attr:`alive`.

    Args:
        first_step: the step it serves first.
        max_steps_ahead: steps it may serve while the compute thread is inside an earlier one (0: none).
        name: the thread's name.
    """

    #: Sleeps between two looks for a step the other ranks began: the first, and the longest (doubling).
    probe_intervals: tuple[float, float] = (0.001, 0.02)

    def __init__(self, first_step: int, max_steps_ahead: int, name: str) -> None:
        self._max_ahead = max_steps_ahead
        self._cond = threading.Condition()
        self._records: dict[int, R] = {}
        self._next = first_step  # the step to serve next
        self._compute_step = first_step  # the step the compute thread is in (or will begin next)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _start(self) -> None:
        self._thread.start()

    def claim(self, step: int, make: Callable[[], R]) -> R:
        """The record of ``step`` for the compute thread: the one served ahead, or ``make()``'s, submitted."""
        with self._cond:
            self._compute_step = step
            record = self._records.get(step)
            if record is None:
                record = self._records[step] = make()
                self._cond.notify_all()
            return record

    def left(self, step: int) -> None:
        """The compute thread is done with ``step`` (applied or failed): forget its record."""
        with self._cond:
            self._records.pop(step, None)
            self._compute_step = max(self._compute_step, step + 1)
            self._cond.notify_all()

    def skip_to(self, step: int) -> None:
        """The compute thread ran the steps before ``step`` without this thread (direct steps, see
        :mod:`~codedgrad.runtime.direct`): serve ``step`` next. Nothing changes while a record is held."""
        with self._cond:
            if self._next < step and not self._records:
                self._next = step
                self._compute_step = max(self._compute_step, step)
                self._cond.notify_all()

    def holds_steps(self) -> bool:
        """Whether records of steps the compute thread has not left are held (e.g. served ahead)."""
        with self._cond:
            return any(step >= self._compute_step for step in self._records)

    def will_serve(self, step: int) -> bool:
        """Whether the thread may still serve ``step``: it is alive and has not gone past it. It serves
        steps in order and ends a record before it moves on, so a record of ``step`` that is not done
        once this is False never will be."""
        with self._cond:
            return self._thread.is_alive() and self._next <= step

    def wait_served(self, record: R) -> str | None:
        """Block until ``record`` is done (None), or say why it never will be: the thread ended, or it went
        past the step without ending the record (a bug). Its own waits are bounded, so this is too."""
        while not record.done.wait(timeout=1.0):
            # ``done`` again after ``will_serve``: the thread sets it before it moves on.
            if not self.will_serve(record.step) and not record.done.is_set():
                if not self.alive:
                    return f"the release thread ended during step {record.step}"
                return f"the release thread went past step {record.step} without reducing it (a bug: please report it)"
        return None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float) -> bool:
        """Stop the thread after the step it is serving; True if it ended within ``timeout``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- supplied by a subclass --------------------------------------------------------------------

    def _serve(self, record: R) -> None:
        """Serve one step; the record ends REDUCED or FAILED (an exception: see :meth:`_serve_failed`)."""
        raise NotImplementedError

    def _record_ahead(self, step: int) -> R | None:
        """A record to serve ``step`` without the compute thread, if the others began it (else None)."""
        raise NotImplementedError

    def _serve_failed(self, record: R, error: BaseException) -> None:
        """End ``record`` FAILED because :meth:`_serve` raised ``error``."""
        raise NotImplementedError

    # -- the thread --------------------------------------------------------------------------------

    def _run(self) -> None:
        first, longest = self.probe_intervals
        interval = first
        while True:
            with self._cond:
                # Not a wait for another rank: idle until the compute thread submits a step or closes.
                while not self._closing and self._next not in self._records and not self._may_go_ahead():
                    self._cond.wait()
                if self._closing:
                    return
                record = self._records.get(self._next)
            if record is None:  # the compute thread is behind: join the next step if others began it
                record = self._try_ahead(self._next)
                if record is None:
                    with self._cond:
                        # A claim made while the probe was out (a Store round trip) has notified no
                        # one: look again before sleeping, or the step waits out the interval.
                        if not self._closing and self._next not in self._records:
                            self._cond.wait(interval)  # woken early by the compute thread's claim
                    interval = min(2 * interval, longest)
                    continue
            interval = first
            try:
                self._serve(record)
            except BaseException as error:  # the group may be unusable now: end the thread after this step
                self._serve_failed(record, error)
                return
            with self._cond:
                # Not ``+= 1``: between the record's end (which wakes the compute thread) and here, the
                # compute thread may leave the step and :meth:`skip_to` the next one, which already
                # moved ``_next`` on; counting it again skipped that step, whose compute thread then
                # waited for it forever.
                self._next = max(self._next, record.step + 1)
                if record.phase is StepPhase.FAILED:
                    # Never run ahead of a failure: the compute thread decides what comes next.
                    self._compute_step = max(self._compute_step, record.step)

    def _may_go_ahead(self) -> bool:
        """Whether to look for the next step on the Store without the compute thread (lock held)."""
        if self._max_ahead <= 0 or self._next - self._compute_step > self._max_ahead:
            return False
        previous = self._records.get(self._next - 1)
        # Only after a step that this thread reduced and the compute thread has not left yet (it is
        # still inside it, or behind), never after a failure.
        return previous is not None and previous.phase is StepPhase.REDUCED and self._compute_step < self._next

    def _try_ahead(self, step: int) -> R | None:
        """The record of ``step`` if the others began it, else None. If looking raises (the Store, or
        memory for a record), stop running ahead for good and say so: this thread must live on to serve
        the steps the compute thread claims."""
        try:
            record = self._record_ahead(step)
        except Exception as error:
            with self._cond:
                self._max_ahead = 0
            warnings.warn(
                f"codedgrad: the release stops running ahead of this rank's compute thread: looking for step "
                f"{step} failed ({type(error).__name__}: {error})",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        if record is None:
            return None
        with self._cond:
            if step in self._records:  # the compute thread claimed it meanwhile
                return self._records[step]
            if self._compute_step >= step:
                return None
            self._records[step] = record
            return record


class Releaser(StepRelease[StepRecord]):
    """The engine's no-wait release: reduces this rank's steps with :func:`reduce_step` as they are decided.

    Args:
        coordinator: the engine's Store access (the thread uses its wait client).
        group: a process group of the release's own.
        rank: this rank in the group.
        first_step: the step it serves first.
        max_steps_ahead: steps it may complete while the compute thread is inside an earlier one.
        new_record: makes a record for a step served ahead: ``new_record(step, plan_version, digest)
            -> StepRecord | None`` (None when the compute thread's plan is not the one the step runs under).
        channel_for: the step's view of the Store on the wait client.
        buffers: rank 0's buffers to share after every step, or None.
        stream: on CUDA, the release's own stream.
    """

    def __init__(
        self,
        coordinator: StoreCoordinator,
        group: dist.ProcessGroup,
        rank: int,
        first_step: int,
        max_steps_ahead: int,
        new_record: Callable[[int, int, bytes], StepRecord | None],
        channel_for: Callable[[StepRecord], StepChannel],
        buffers: BufferShare | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        super().__init__(first_step, max_steps_ahead, name="codedgrad-release")
        self._coordinator = coordinator
        self.group = group
        self._rank = rank
        self._new_record = new_record
        self._channel_for = channel_for
        self._buffers = buffers
        self._stream = stream
        self._start()

    def _serve(self, record: StepRecord) -> None:
        channel = self._channel_for(record)
        reduce_step(record, channel, self.group, self._rank, self._buffers, self._stream, self._coordinator.step_done)

    def _record_ahead(self, step: int) -> StepRecord | None:
        header = self._coordinator.step_exists(step)
        return None if header is None else self._new_record(step, *header)

    def _serve_failed(self, record: StepRecord, error: BaseException) -> None:
        record.finish(StepPhase.FAILED, error)
