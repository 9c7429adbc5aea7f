"""A stream of coded linear jobs on real processes: torch.distributed and the c10d Store (docs/design.md, "The model").

Rank 0 is the *master*, ranks 1…P the *workers*. A *session* (:meth:`StreamRunner.run`) fixes the
coded matrices and each worker's coded tasks (its load from a split, in contiguous blocks of the N
coded tasks); every rank calls it with the same arguments, which it checks by fingerprint. In a
session the master runs a function of a :class:`Master`, which submits jobs:

* :meth:`Master.stream`: jobs arrive as a Poisson process of rate λ (the arrival times the simulator
  draws for the same seed) and are served in order;
* :meth:`Master.apply`: one job now, its decoded product returned (iterative algorithms);
* :meth:`Master.calibrate`: rounds in which every worker runs tasks for a time budget, none purged,
  so their durations measure the workers' profiles without the bias of purging.

A job ends when any K coded results are in (:mod:`codedgrad.linear.worker` describes the worker's
side; :mod:`codedgrad.linear.wire` the keys). Times are ``time.monotonic()``, which all processes of
one host share: the decision time a worker stamps into ``done/j`` is then the job's end on the
master's clock too. Across hosts the master's own observation time is used instead.
"""

from __future__ import annotations

import hashlib
import math
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from codedgrad.emulate import Heterogeneity
from codedgrad.linear import wire
from codedgrad.linear.mds import CodedMatrix
from codedgrad.linear.worker import Seat, StreamTimeout, WorkerLog, client, fetch, serve
from codedgrad.sim import StreamResult

__all__ = [
    "JobLog",
    "Master",
    "SessionOutcome",
    "StreamAborted",
    "StreamRecord",
    "StreamRunner",
    "StreamTimeout",
    "assign_slots",
]

T = TypeVar("T")

# Jobs whose keys the master keeps; older ones are deleted (workers are never that far behind:
# a worker starts job j + 1 only after job j is decided).
_KEY_WINDOW = 32
# Head start of a stream's first arrival, so that publishing never starts behind schedule.
_LEAD_SECONDS = 0.05


class StreamAborted(RuntimeError):
    """A session ended early: another rank failed (its message is included) or the master gave up."""


def assign_slots(loads: Sequence[int]) -> list[list[int]]:
    """Each worker's coded tasks: contiguous blocks of 0…N−1 of the given sizes, in worker order."""
    slots, start = [], 0
    for load in loads:
        slots.append(list(range(start, start + int(load))))
        start += int(load)
    return slots


@dataclass
class JobLog:
    """The master's view of one job (monotonic seconds).

    Attributes:
        job: index within the session.
        kind: :data:`codedgrad.linear.wire.JOB` or :data:`~codedgrad.linear.wire.CALIBRATE`.
        needed: results that decide it (for a calibration round: the workers that must finish).
        published: when ``in/j`` was set.
        start: when its service could begin: max(arrival, previous end).
        end: when its last needed result existed.
        decode_seconds: time to fetch and decode the results (0 for calibration).
    """

    job: int
    kind: int
    needed: int
    published: float
    start: float
    end: float
    decode_seconds: float


@dataclass(frozen=True)
class StreamRecord:
    """A measured stream. ``result`` has the simulator's fields, times relative to the stream's start.

    Attributes:
        result: arrivals, starts, ends, service times and in-order delays of every job.
        first_job: the session index of the stream's first job.
        publish_lag: how late each job was published after its scheduled arrival (seconds).
        decode_seconds: time the master took to fetch and decode each job.
        decode_error: relative error ‖decoded − reference·x‖ / ‖reference·x‖ per job (empty without a reference).
    """

    result: StreamResult
    first_job: int
    publish_lag: np.ndarray
    decode_seconds: np.ndarray
    decode_error: np.ndarray


@dataclass
class SessionOutcome(Generic[T]):
    """What :meth:`StreamRunner.run` returns on the master.

    Attributes:
        value: the master function's return value.
        jobs: the master's log of every job of the session.
        workers: each worker's log, in rank order.
    """

    value: T
    jobs: list[JobLog]
    workers: list[WorkerLog]


def _readonly(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class Master:
    """The master's handle on a session: submit jobs, collect and decode their results.

    Created by :meth:`StreamRunner.run`; not meant to be built by hand.
    """

    def __init__(
        self,
        store: dist.Store,
        publisher_store: dist.Store,
        operators: Sequence[CodedMatrix],
        workers: int,
        timeout: float,
        same_host: bool,
    ) -> None:
        self._store, self._publisher_store = store, publisher_store  # two clients: the publisher's blocks apart
        self._operators, self._workers = list(operators), workers
        self._timeout, self._same_host = timeout, same_host
        self._needed = operators[0].code.tasks
        self.jobs: list[JobLog] = []
        self._next = 0  # next job index
        self._last_end = -math.inf
        self._deleted_below = 0  # the keys of every job below this index are deleted

    @property
    def next_job(self) -> int:
        """The index the next submitted job will get."""
        return self._next

    def apply(self, x: torch.Tensor, operator: int = 0) -> torch.Tensor:
        """Run one coded job now (closed loop) and return the decoded product ``operators[operator] · x``."""
        coded = self._operator(operator)
        coded._check_input(x)
        job = self._next
        self._next += 1
        published = time.monotonic()
        self._store.set(wire.input_key(job), wire.pack_input(wire.JobHeader(wire.JOB, operator), x))
        output, _ = self._collect(job, wire.JOB, self._needed, published, published, coded)
        return output

    def stream(
        self,
        inputs: Sequence[torch.Tensor],
        arrival_rate: float,
        seed: int = 0,
        operator: int = 0,
        reference: torch.Tensor | None = None,
    ) -> StreamRecord:
        """Serve ``inputs`` as jobs arriving at Poisson times of rate λ, in order; measure every delay.

        Args:
            inputs: one input per job (each a vector or matrix the operator can multiply).
            arrival_rate: λ > 0, jobs per second.
            seed: the arrivals are those :func:`codedgrad.sim.simulate_stream` draws for this seed.
            operator: which coded matrix the jobs multiply.
            reference: the uncoded matrix, to record each job's decoding error (optional).
        """
        coded = self._operator(operator)
        if len(inputs) == 0:
            raise ValueError("inputs: need at least one job")
        for x in inputs:
            coded._check_input(x)
        if isinstance(arrival_rate, bool) or not (math.isfinite(arrival_rate) and arrival_rate > 0):
            raise ValueError(f"arrival_rate: must be finite and > 0, got {arrival_rate!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
        # The simulator's arrival stream for this seed (codedgrad.sim._streams): same seed, same arrivals.
        arrival_seed, _ = np.random.SeedSequence(seed).spawn(2)
        arrivals = np.cumsum(np.random.default_rng(arrival_seed).exponential(1.0 / arrival_rate, len(inputs)))
        first = self._next
        self._next += len(inputs)
        values = [wire.pack_input(wire.JobHeader(wire.JOB, operator), x) for x in inputs]
        origin = time.monotonic() + _LEAD_SECONDS
        published = np.full(len(inputs), np.nan)
        halt = threading.Event()
        failure: list[BaseException] = []

        def publish() -> None:  # on its own Store client: the main thread is blocked in waits meanwhile
            own = self._publisher_store
            try:
                for j, value in enumerate(values):
                    if halt.wait(max(0.0, origin + arrivals[j] - time.monotonic())):
                        return
                    own.set(wire.input_key(first + j), value)
                    published[j] = time.monotonic()
            except BaseException as error:  # re-raised by the main thread below
                failure.append(error)

        publisher = threading.Thread(target=publish, name="codedgrad-linear-publisher", daemon=True)
        publisher.start()
        ends, decode_seconds, errors = np.empty(len(inputs)), np.empty(len(inputs)), []
        try:
            for j, x in enumerate(inputs):
                output, log = self._collect(first + j, wire.JOB, self._needed, math.nan, origin + arrivals[j], coded)
                ends[j], decode_seconds[j] = log.end, log.decode_seconds
                log.published = float(published[j])
                if reference is not None:
                    truth = reference @ x
                    errors.append(float(torch.linalg.norm(output - truth) / torch.linalg.norm(truth)))
        except BaseException:
            halt.set()
            publisher.join(self._timeout)
            if failure:
                raise StreamAborted(f"master: publishing the stream failed: {failure[0]!r}") from failure[0]
            raise
        publisher.join(self._timeout)
        if failure:
            raise StreamAborted(f"master: publishing the stream failed: {failure[0]!r}") from failure[0]
        ends -= origin
        starts = np.maximum(arrivals, np.concatenate(([-math.inf], ends[:-1])))
        result = StreamResult(
            arrival_rate=float(arrival_rate),
            arrivals=_readonly(arrivals),
            starts=_readonly(starts),
            ends=_readonly(ends),
            service_times=_readonly(ends - starts),
            delays=_readonly(ends - arrivals),
        )
        return StreamRecord(
            result=result,
            first_job=first,
            publish_lag=_readonly(published - origin - arrivals),
            decode_seconds=_readonly(decode_seconds),
            decode_error=_readonly(np.array(errors)),
        )

    def calibrate(self, rounds: int, seconds: float) -> None:
        """Run ``rounds`` calibration rounds: every worker runs tasks to the end for ``seconds``.

        No task is purged, so the durations (in the workers' logs) measure the task times without
        the bias of purging: long tasks would otherwise be cut short more often than short ones.
        The rounds are queued at once, so each one after the first starts the way a queued stream
        job does (workers see the previous one decided, then start): the start latency matches too.
        :func:`codedgrad.linear.measure.fit_profiles` turns the logs into profiles.
        """
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds: must be an integer >= 1, got {rounds!r}")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < 4000:
            raise ValueError(f"seconds: must be a number in (0, 4000), got {seconds!r}")
        x = torch.ones(self._operators[0].shape[1], dtype=self._operators[0].blocks.dtype)
        header = wire.JobHeader(wire.CALIBRATE, 0, round(seconds * 1e6))
        first = self._next
        self._next += rounds
        published = time.monotonic()
        for job in range(first, first + rounds):
            self._store.set(wire.input_key(job), wire.pack_input(header, x))
        for job in range(first, first + rounds):
            self._collect(job, wire.CALIBRATE, self._workers, published, published, None)

    # -- internals -------------------------------------------------------------------------------

    def _operator(self, operator: int) -> CodedMatrix:
        if isinstance(operator, bool) or not isinstance(operator, int) or not 0 <= operator < len(self._operators):
            raise ValueError(f"operator: must be an index in [0, {len(self._operators)}), got {operator!r}")
        return self._operators[operator]

    def _collect(
        self, job: int, kind: int, needed: int, published: float, arrival: float, coded: CodedMatrix | None
    ) -> tuple[torch.Tensor | None, JobLog]:
        """Wait for job ``job`` to be decided, decode it (if ``coded``), log it and drop old keys."""
        start = max(arrival, self._last_end)
        try:
            (value,) = fetch(self._store, [wire.done_key(job)], self._timeout, "master", f"job {job} to end")
        except StreamTimeout as error:
            have = self._store.add(wire.ordinal_key(job), 0)
            raise StreamTimeout(f"{error}; it has {have} results and needs {needed}") from None
        observed = time.monotonic()
        decided_at = wire.unpack_done(value)
        if decided_at is None:
            raise StreamAborted(f"master: job {job} ended without being decided: {value.decode(errors='replace')}")
        end = decided_at if self._same_host else observed
        self._last_end = end
        output = None
        if coded is not None:
            keys = [wire.result_key(job, n) for n in range(1, needed + 1)]
            values = fetch(self._store, keys, self._timeout, "master", f"the {needed} results of job {job}")
            indices, results = zip(*(wire.unpack_result(v) for v in values))
            output = coded.decode(list(indices), torch.stack(results))
        log = JobLog(job, kind, needed, published, start, end, time.monotonic() - observed)
        self.jobs.append(log)
        self._delete_below(job - _KEY_WINDOW)
        return output, log

    def _delete_below(self, end: int) -> None:
        """Delete the keys of every job below ``end`` (calibration rounds leave fewer; deleting a
        missing key is harmless)."""
        for job in range(self._deleted_below, end):
            for key in wire.job_keys(job, self._needed, self._workers):
                self._store.delete_key(key)
        self._deleted_below = max(self._deleted_below, end)

    def finish(self, reason: bytes | None = None) -> None:
        """End the session: every worker leaves its serve loop.

        Marks the first undecided job's ``done`` key with ``stop`` (or ``reason``, an ``abort:…``
        value) and its ``in`` key with a stop header, so that a worker waiting on either wakes.
        The keys are deleted by :meth:`clean_up`, once every worker has left (a worker may still be
        reading the marker).
        """
        marker = b"stop" if reason is None else reason
        job = self.jobs[-1].job + 1 if self.jobs else 0
        while True:
            current = self._store.compare_set(wire.done_key(job), b"", marker)
            self._store.compare_set(wire.input_key(job), b"", wire.pack_input(wire.JobHeader(wire.STOP), None))
            if wire.unpack_done(current) is None:  # our marker, or a worker's abort: the session ends here
                break
            job += 1  # a worker decided this job just now: the next one is the first undecided
        # Jobs published but never served (an aborted stream) have keys too.
        self._next = max(self._next, job + 1)

    def clean_up(self) -> None:
        """Delete the session's remaining keys (after every worker has left it)."""
        self._delete_below(self._next)


class StreamRunner:
    """The ranks of the default process group as one master (rank 0) and P workers.

    Args:
        emulate: emulated heterogeneity of the P workers (``emulate.world_size == P``), or None.
        timeout: seconds any rank may wait for another (> 0).
        namespace: Store prefix of this runner's keys.
        store: the c10d Store (default: the one torchrun's ``init_process_group`` made).

    Every rank must build the runner with equal arguments (checked: a mismatch raises on every
    rank, naming the argument).
    """

    def __init__(
        self,
        *,
        emulate: Heterogeneity | None = None,
        timeout: float = 60.0,
        namespace: str = "codedgrad/linear",
        store: dist.Store | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise RuntimeError("StreamRunner: call torch.distributed.init_process_group first")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.world_size < 2:
            raise ValueError(f"world_size: need a master and at least one worker, got {self.world_size} rank(s)")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise ValueError(f"timeout: must be finite and > 0, got {timeout!r}")
        if emulate is not None and not isinstance(emulate, Heterogeneity):
            raise ValueError(f"emulate: expected a Heterogeneity or None, got {type(emulate).__name__}")
        if emulate is not None and emulate.world_size != self.world_size - 1:
            raise ValueError(
                f"emulate: has {emulate.world_size} speeds but there are {self.world_size - 1} workers "
                f"(world size {self.world_size} minus the master)"
            )
        self.emulate, self.timeout, self.namespace = emulate, float(timeout), namespace
        self._store = store if store is not None else dist.distributed_c10d._get_default_store()
        # Two clients per rank, made once: the main thread's, and the watcher's or publisher's.
        self._clients = (client(self._store, self.timeout), client(self._store, self.timeout))
        self._sessions = 0
        settings = {"emulate": None if emulate is None else emulate.to_json(), "timeout": self.timeout}
        settings["namespace"] = namespace
        views = self._all_gather((settings, socket.gethostname()))
        for name in settings:
            values = {repr(view[0][name]) for view in views}
            if len(values) > 1:
                raise ValueError(f"{name}: differs between ranks ({sorted(values)})")
        self.same_host = len({view[1] for view in views}) == 1
        """Whether all ranks share one monotonic clock (one host): then workers stamp job ends."""

    @property
    def is_master(self) -> bool:
        """Whether this rank is the master (rank 0)."""
        return self.rank == 0

    @property
    def workers(self) -> int:
        """P, the number of workers."""
        return self.world_size - 1

    def run(
        self,
        operators: Sequence[CodedMatrix],
        loads: Sequence[int],
        master: Callable[[Master], T],
        *,
        step_offset: int = 0,
    ) -> SessionOutcome[T] | None:
        """One session: the master calls ``master(handle)``, the workers serve until it returns.

        Collective: every rank calls it with equal ``operators``, ``loads`` and ``step_offset``.

        Args:
            operators: the coded matrices jobs may multiply; all share one code's (K, N).
            loads: coded tasks per worker, summing to N (e.g. a split from :mod:`codedgrad.plan`).
            master: run on the master with the session's :class:`Master`.
            step_offset: emulated step of the session's job 0. Sessions with equal offsets give job j
                the same emulated task times (common random numbers for comparisons).

        Returns:
            On the master a :class:`SessionOutcome`; on the workers None.

        Raises:
            ValueError: invalid or unequal arguments (on every rank, before any job).
            StreamAborted, StreamTimeout: a rank failed or went silent during the session.
        """
        loads = self._check_session(operators, loads, step_offset)
        session = self._sessions
        self._sessions += 1
        prefix = f"{self.namespace}/{session}"
        store, side_store = (dist.PrefixStore(prefix, own) for own in self._clients)
        code = operators[0].code
        if self.is_master:
            handle = Master(store, side_store, operators, self.workers, self.timeout, self.same_host)
            error: BaseException | None = None
            try:
                value = master(handle)
                handle.finish()
            except BaseException as caught:  # the workers must be released before it is raised
                error = caught
                handle.finish(wire.ABORT + f"master: {caught!r}".encode())
            logs = [None] * self.world_size
            dist.gather_object(None, logs, dst=0)  # every worker has left the session after this
            handle.clean_up()
            workers = [log for log in logs[1:] if log is not None]
            failed = [log for log in workers if log.error]
            if error is not None:
                if failed:
                    details = " | ".join(log.error for log in failed)
                    raise StreamAborted(f"{error}; worker errors: {details}") from error
                raise error
            if failed:
                raise StreamAborted("worker errors: " + " | ".join(log.error for log in failed))
            return SessionOutcome(value=value, jobs=handle.jobs, workers=workers)
        worker = self.rank - 1
        seat = Seat(
            operators=list(operators),
            slots=assign_slots(loads)[worker],
            needed=code.tasks,
            worker=worker,
            workers=self.workers,
            rank=self.rank,
            emulate=self.emulate,
            step_offset=step_offset,
            timeout=self.timeout,
        )
        failure: BaseException | None = None
        try:
            log = serve(store, side_store, seat)
        except BaseException as caught:  # reported to the master, then raised here
            failure = caught
            log = WorkerLog(rank=self.rank, error=f"rank {self.rank}: {caught!r}\n{traceback.format_exc(limit=4)}")
        dist.gather_object(log, None, dst=0)
        if failure is not None:
            raise failure
        return None

    # -- internals -------------------------------------------------------------------------------

    def _all_gather(self, value: Any) -> list[Any]:
        views: list[Any] = [None] * self.world_size
        dist.all_gather_object(views, value)
        return views

    def _check_session(self, operators: Sequence[CodedMatrix], loads: Sequence[int], step_offset: int) -> list[int]:
        """Validate the session's arguments here and check that every rank passed the same ones."""
        error = None
        try:
            loads = _check_arguments(operators, loads, step_offset, self.workers)
            fingerprint = _fingerprint(operators, loads, step_offset)
        except ValueError as caught:
            error, fingerprint = str(caught), None
        # Agree before anything else, so that a rank with bad input cannot leave the others waiting.
        views = self._all_gather((error, fingerprint))
        errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(views) if e]
        if errors:
            raise ValueError("; ".join(errors))
        if len({f for _, f in views}) > 1:
            raise ValueError("operators, loads, step_offset: differ between ranks (fingerprints do not match)")
        return loads


def _check_arguments(
    operators: Sequence[CodedMatrix], loads: Sequence[int], step_offset: int, workers: int
) -> list[int]:
    if not operators or not all(isinstance(op, CodedMatrix) for op in operators):
        raise ValueError("operators: need at least one CodedMatrix")
    shapes = {(op.code.tasks, op.code.coded) for op in operators}
    if len(shapes) > 1:
        raise ValueError(f"operators: must share one code's (tasks, coded), got {sorted(shapes)}")
    coded = operators[0].code.coded
    if len(loads) != workers or not all(
        not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= 0 for v in loads
    ):
        raise ValueError(f"loads: need {workers} integers >= 0 (one per worker), got {list(loads)}")
    if sum(int(v) for v in loads) != coded:
        raise ValueError(f"loads: must sum to the {coded} coded tasks, got {list(loads)} (sum {sum(loads)})")
    if isinstance(step_offset, bool) or not isinstance(step_offset, int) or step_offset < 0:
        raise ValueError(f"step_offset: must be an integer >= 0, got {step_offset!r}")
    return [int(v) for v in loads]


def _fingerprint(operators: Sequence[CodedMatrix], loads: list[int], step_offset: int) -> str:
    digest = hashlib.sha256(repr((loads, step_offset)).encode())
    for op in operators:
        digest.update(op.code.generator.tobytes())
        digest.update(op.blocks.contiguous().numpy().tobytes())
    return digest.hexdigest()
