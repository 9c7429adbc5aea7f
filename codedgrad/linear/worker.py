"""A worker's side of a stream session: serve jobs in order, purge what is no longer needed.

For job j the worker reads ``in/j``, then runs its coded tasks in order. After each one it takes an
ordinal from the ``n/j`` counter; results within the first ``needed`` are posted, and the one that
completes the job sets ``done/j`` at once. A *watcher thread*, on a Store client of its own (one
client serialises its operations), follows ``done/0, done/1, …``: the emulated part of a task waits
on it, so a task is dropped the moment its job is decided, not when its delay would have ended.
Before job j+1 the worker waits for ``done/j``: jobs are served in order, as in the model.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from codedgrad.emulate import Heterogeneity
from codedgrad.linear import wire
from codedgrad.linear.mds import CodedMatrix

__all__ = ["INTERRUPTED", "LATE", "USED", "Seat", "StreamTimeout", "WorkerLog", "client", "fetch", "serve"]

USED, LATE, INTERRUPTED = 0, 1, 2
"""Outcomes of a task: its result was among the first ``needed``; it finished after the job was
decided; the job was decided while it ran (its emulated part was cut short)."""

_NEVER = 1 << 62  # "decided up to" once the session has ended


class StreamTimeout(TimeoutError):
    """A wait on another rank ran out; the message names the rank, the job and the key."""


def client(store: dist.Store, timeout: float) -> dist.Store:
    """A Store client of its own whose blocking ``get`` gives up after ``timeout`` seconds.

    Each clone is a new connection: make them once and reuse them. (Opening a dozen at once, as
    every session did at first, once cost a job 3.7 s: a dropped connection attempt is retried
    after 1 s, then 2 s.)
    """
    own = store.clone()
    own.set_timeout(datetime.timedelta(seconds=timeout))
    return own


def fetch(store: dist.Store, keys: list[str], timeout: float, who: str, what: str) -> list[bytes]:
    """The values of ``keys``, waiting until they all exist (one round trip when they already do).

    Raises:
        StreamTimeout: naming ``who`` waited how long for ``what`` and which keys.
    """
    try:
        return store.multi_get(keys) if len(keys) > 1 else [store.get(keys[0])]
    except dist.DistStoreError as error:
        if "timeout" not in str(error).lower():
            raise
        shown = keys if len(keys) <= 3 else [*keys[:3], "…"]
        raise StreamTimeout(f"{who}: waited {timeout:g} s for {what} (keys {shown})") from None


@dataclass
class WorkerLog:
    """What one worker did in a session (monotonic times, seconds).

    Attributes:
        rank: the worker's global rank.
        task_job, task_index, task_position: job, coded task and position in the worker's queue.
        task_start: when the task began (before its real compute).
        task_finish: when it got its ordinal (its result then exists).
        task_cycle: its start to the start of the worker's next task of the job (posting included).
        task_outcome: :data:`USED`, :data:`LATE` or :data:`INTERRUPTED` (calibration tasks: USED).
        job: the jobs this worker started, with ``job_start`` (after reading the input) and
            ``job_skipped`` (tasks dropped before they began).
        at_job: the job the worker was at when it left.
        error: what went wrong, if the worker failed.
    """

    rank: int
    task_job: list[int] = field(default_factory=list)
    task_index: list[int] = field(default_factory=list)
    task_position: list[int] = field(default_factory=list)
    task_start: list[float] = field(default_factory=list)
    task_finish: list[float] = field(default_factory=list)
    task_cycle: list[float] = field(default_factory=list)
    task_outcome: list[int] = field(default_factory=list)
    job: list[int] = field(default_factory=list)
    job_start: list[float] = field(default_factory=list)
    job_skipped: list[int] = field(default_factory=list)
    at_job: int = 0
    error: str | None = None

    def record(self, job: int, index: int, position: int, start: float, finish: float, outcome: int) -> None:
        """Log a task; the previous task of the same job ends its cycle where this one starts."""
        if self.task_job and self.task_job[-1] == job:
            self.task_cycle[-1] = start - self.task_start[-1]
        self.task_job.append(job)
        self.task_index.append(index)
        self.task_position.append(position)
        self.task_start.append(start)
        self.task_finish.append(finish)
        self.task_cycle.append(time.monotonic() - start)
        self.task_outcome.append(outcome)


class _Watcher(threading.Thread):
    """Follows ``done/j`` for j = 0, 1, … and publishes how far the jobs are decided."""

    def __init__(self, store: dist.Store, timeout: float, who: str) -> None:
        super().__init__(name=f"codedgrad-linear-watcher-{who}", daemon=True)
        self._store, self._timeout, self._who = store, timeout, who
        self._cond = threading.Condition()
        self.decided = -1
        self.ended_at: int | None = None  # the job whose done key ended the session (stop or abort)
        self.error: BaseException | None = None

    def run(self) -> None:
        job = 0
        try:
            while True:
                (value,) = fetch(self._store, [wire.done_key(job)], self._timeout, self._who, f"job {job} to end")
                ok = wire.unpack_done(value) is not None
                with self._cond:
                    if ok:
                        self.decided = job
                    else:
                        self.ended_at, self.decided = job, _NEVER
                    self._cond.notify_all()
                if not ok:
                    return
                job += 1
        except BaseException as error:  # handed to the serving thread, which raises it
            with self._cond:
                self.error, self.decided = error, _NEVER
                self._cond.notify_all()

    def wait_decided(self, job: int, seconds: float) -> bool:
        """Wait up to ``seconds`` for job ``job`` to be decided; True if it is."""
        with self._cond:
            return self._cond.wait_for(lambda: self.decided >= job, timeout=seconds)

    def is_decided(self, job: int) -> bool:
        """Whether job ``job`` is decided (or the session has ended)."""
        return self.decided >= job


@dataclass(frozen=True)
class Seat:
    """Where a worker sits in a session.

    Attributes:
        operators: the coded matrices jobs may name.
        slots: this worker's coded tasks, in the order it runs them.
        needed: results a coded job needs (K).
        worker: this worker's index among the workers (its emulation rank).
        workers: the number of workers.
        rank: its global rank (for messages).
        emulate: emulated heterogeneity, or None.
        step_offset: emulated step of job 0 (sessions with equal offsets see the same delays).
        timeout: seconds any wait on another rank may last.
    """

    operators: Sequence[CodedMatrix]
    slots: Sequence[int]
    needed: int
    worker: int
    workers: int
    rank: int
    emulate: Heterogeneity | None
    step_offset: int
    timeout: float

    def delay(self, job: int, position: int) -> float:
        """The emulated part of this worker's task at ``position`` of ``job`` (0 without emulation)."""
        return 0.0 if self.emulate is None else self.emulate.task_delay(self.worker, self.step_offset + job, position)


def serve(store: dist.Store, watcher_store: dist.Store, seat: Seat) -> WorkerLog:
    """Serve the session's jobs until the master ends it; return what this worker did.

    ``store`` and ``watcher_store`` are two different clients (see :func:`client`) under the
    session's prefix: the watcher thread blocks on its own. On a failure the worker marks the first
    undecided job as aborted (so the master and the other workers stop at once instead of timing
    out) and re-raises.
    """
    who = f"rank {seat.rank}"
    log = WorkerLog(rank=seat.rank)
    watcher = _Watcher(watcher_store, seat.timeout, who)
    watcher.start()
    try:
        _serve_jobs(store, watcher, log, seat)
    except BaseException as error:
        _mark_abort(store, log.at_job, f"{who}: {error!r}")
        raise
    watcher.join(seat.timeout)
    return log


def _serve_jobs(store: dist.Store, watcher: _Watcher, log: WorkerLog, seat: Seat) -> None:
    who = f"rank {seat.rank}"
    job = 0
    while True:
        log.at_job = job
        if watcher.error is not None:
            raise watcher.error
        if watcher.ended_at is not None and job >= watcher.ended_at:
            return
        if watcher.is_decided(job):
            # Decided without this worker (it was late to start): nothing of it is worth computing.
            job += 1
            continue
        (value,) = fetch(store, [wire.input_key(job)], seat.timeout, who, f"job {job} to arrive")
        header, x = wire.unpack_input(value)
        if header.kind == wire.STOP:
            return
        log.job.append(job)
        log.job_start.append(time.monotonic())
        if header.kind == wire.CALIBRATE:
            _calibrate(store, log, seat, x, job, header.budget_us * 1e-6)
            log.job_skipped.append(0)
        else:
            operator = seat.operators[header.operator]
            log.job_skipped.append(_run_tasks(store, watcher, log, seat, operator, x, job))
        if not watcher.wait_decided(job, seat.timeout):
            raise StreamTimeout(f"{who}: waited {seat.timeout:g} s for job {job} to end (key {wire.done_key(job)})")
        job += 1


def _run_tasks(
    store: dist.Store, watcher: _Watcher, log: WorkerLog, seat: Seat, operator: CodedMatrix, x: torch.Tensor, job: int
) -> int:
    """Run this worker's coded tasks of ``job`` until they end or the job is decided; return those never started."""
    for position, index in enumerate(seat.slots):
        if watcher.is_decided(job):
            return len(seat.slots) - position
        start = time.monotonic()
        y = operator.task(index, x)
        # Emulation adds its delay after the real compute; waiting on the watcher makes it purgeable.
        remaining = seat.delay(job, position) - (time.monotonic() - start)
        if remaining > 0 and watcher.wait_decided(job, remaining):
            log.record(job, index, position, start, time.monotonic(), INTERRUPTED)
            return len(seat.slots) - position - 1
        ordinal = store.add(wire.ordinal_key(job), 1)
        finish = time.monotonic()
        if ordinal == seat.needed:  # this result completes the job: tell everyone first, then post it
            store.compare_set(wire.done_key(job), b"", wire.pack_done(finish))
        if ordinal <= seat.needed:
            store.set(wire.result_key(job, ordinal), wire.pack_result(index, y))
        log.record(job, index, position, start, finish, USED if ordinal <= seat.needed else LATE)
    return 0


def _calibrate(store: dist.Store, log: WorkerLog, seat: Seat, x: torch.Tensor, job: int, budget: float) -> None:
    """A calibration round: run coded tasks to the end, posting each like a result, for ``budget`` seconds."""
    operator = seat.operators[0]
    began = time.monotonic()
    position = 0
    while position == 0 or time.monotonic() - began < budget:
        index = (seat.worker + position) % operator.code.coded
        start = time.monotonic()
        y = operator.task(index, x)
        remaining = seat.delay(job, position) - (time.monotonic() - start)
        if remaining > 0:
            time.sleep(remaining)
        store.add(wire.ordinal_key(job), 1)
        finish = time.monotonic()
        store.set(wire.calibration_key(job, seat.worker), wire.pack_result(index, y))
        log.record(job, index, position, start, finish, USED)
        position += 1
    if store.add(wire.finished_key(job), 1) == seat.workers:
        store.compare_set(wire.done_key(job), b"", wire.pack_done(time.monotonic()))


def _mark_abort(store: dist.Store, job: int, message: str) -> None:
    """Mark the first undecided job from ``job`` on as aborted, ending the session for every rank."""
    marker = wire.ABORT + message.encode()
    while True:
        current = store.compare_set(wire.done_key(job), b"", marker)
        if wire.unpack_done(current) is None:  # ours, or the session already ended
            return
        job += 1
