"""One step in flight: its phase (a state machine), its accumulator and its report.

A step is shared by two threads: the compute thread runs tasks and commits them, the release
thread reduces the step once it is decided. :class:`StepRecord` is what they share, and
:class:`StepPhase` is the one place that says how far the step has got::

    RUNNING ──(decided; the release freezes the accumulator)──▶ RELEASING ──(all-reduce done)──▶ REDUCED
       │                                                            │
       └──────────────(abandoned, timed out, accounts wrong)────────┴──────────────▶ FAILED

Every transition happens under ``record.lock``. The compute thread adds a result to the
accumulator only while the phase is RUNNING and only in the same critical section as its commit,
so the release can never freeze an accumulator between a commit and its accumulation. What ends
up in the accumulator is listed in ``record.accumulated``; the release publishes that list and every
rank checks it against the decoder before the collective (see the coordinator), so even a failure
the lock cannot prevent (a Ctrl-C between the Store's answer and the accumulation) fails the step
on every rank instead of leaving a committed result out.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field

import torch

from codedgrad.codes.base import DecoderState
from codedgrad.runtime.buffers import FlatGradients

__all__ = ["CodedStepError", "NonFiniteGradientError", "StepPhase", "StepRecord", "StepReport"]


class CodedStepError(RuntimeError):
    """A step failed on every rank and nothing was applied: catch this one type to skip the step.

    Every rank raises a subclass in the same step, the parameters' gradients are left as they were,
    and the engine is ready for the next step, so a loop that catches it stays in step with the
    others. The subclass and the message say why (a rank's task raised or stalled, the ranks
    disagreed, the gradient was not finite). Two failures are not step errors: the rank whose own
    task raised re-raises that exception, and a collective that failed
    (:class:`~codedgrad.runtime.release.CollectiveFailed`) leaves the engine unusable.

    One case is on one rank only: a rank that reaches a step's end ``timeout`` seconds after the
    others went on without it raises :class:`~codedgrad.runtime.coordinator.CodedStepTimeout` saying
    "came ... too late"; it is out of step with the others, and going on does not help.
    """


class NonFiniteGradientError(CodedStepError, FloatingPointError):
    """The decoded gradient of a step is not finite; raised on every rank alike (it is the same everywhere)."""


class StepPhase(enum.Enum):
    RUNNING = "running"  # results may still be committed and accumulated
    RELEASING = "releasing"  # decided; the accumulator is frozen and being reduced
    REDUCED = "reduced"  # the exact gradient is in the accumulator, ready to apply
    FAILED = "failed"  # the step failed on every rank (or this rank's accumulator is unusable)


@dataclass
class StepReport:
    """What one rank did in one coded step.

    Attributes:
        step: step index (0-based, counted by the engine).
        rank: this rank.
        plan_version: version of the plan the step ran under (bumped at every re-plan).
        num_tasks: K of the step.
        loss: the decoded loss of the whole global batch (the weighted mean of the tasks' losses),
            reduced with the gradient; NaN when not available (a step completed by the release alone).
        values: the decoded scalars ``task_loss`` returned besides the loss, by slot: each the
            global batch's mean over the tasks that returned it, weighted by their weights.
        finite: whether the decoded gradient (and loss) is finite.
        computed: results this rank computed (including those whose commit was not used).
        used: results of this rank that the decoder used.
        purged: results in this rank's queue it skipped because they were covered or the step decided.
        spare: results computed for other ranks after this rank's own queue ran dry.
        ahead: True when the release completed this step while this rank was still in an earlier
            one; the rank then applied it without computing anything of it.
        time_to_decision: seconds from the step's start until this rank saw it decided.
        time_waited: seconds this rank's compute thread spent waiting for others.
        allreduce_time: seconds in the coded all-reduce (in a direct step from the end of this rank's
            compute: the buckets reduced during its backward count only where they were not done by then).
        release_lag: seconds from the decision to the end of the coded all-reduce on this rank.
        step_time: seconds of the whole :meth:`~codedgrad.runtime.engine.CodedDataParallel.backward`.
        rank_coefficient: this rank's decoding coefficient in the coded all-reduce.
        condition_number: of the decoder's linear system (1 for 0/1 codes).
        task_seconds: wall time of each computed result, commit included (on CUDA after the work is done).
        commit_seconds: wall time of each commit (its Store round trips), not the accumulation.
        commit_round_trips: Store round trips of this step's commits.
        commit_exposed: seconds the compute thread waited for commits that ran on the commit helper
            thread (``batch_loss`` only; the rest of those commits' time was hidden behind compute).
        chunk_sizes: tasks per result this rank computed from its queue with ``batch_loss``, in order
            (primaries in shrinking chunks, then backups as 1).
        emulated_seconds: delay added by :mod:`codedgrad.emulate` (0 in production).
        timeline: ``(result, start, end, used)`` of each computed result, seconds since the step's start.
        direct: the plan left nothing to decide (every task on one rank, no spare work), so the step
            ran without the Store: its all-reduce was the agreement (:mod:`~codedgrad.runtime.direct`).
        buckets_overlapped: of a direct step, the gradient buckets whose all-reduce began during this
            rank's backward (all but the first when each bucket's parameters got their gradient in the
            last call; 0 with one bucket).
        late_error: an exception on this rank that came after the step was decided without this
            rank's remaining work: the step completed exactly on every rank, so the error is reported
            here and as a ``RuntimeWarning`` instead of being raised on one rank only.
    """

    step: int
    rank: int
    plan_version: int
    num_tasks: int
    loss: float = float("nan")
    values: dict[int, float] = field(default_factory=dict)
    finite: bool = True
    computed: int = 0
    used: int = 0
    purged: int = 0
    spare: int = 0
    ahead: bool = False
    time_to_decision: float = 0.0
    time_waited: float = 0.0
    allreduce_time: float = 0.0
    release_lag: float = 0.0
    step_time: float = 0.0
    rank_coefficient: float = 1.0
    condition_number: float = 1.0
    task_seconds: list[float] = field(default_factory=list)
    commit_seconds: list[float] = field(default_factory=list)
    commit_round_trips: int = 0
    commit_exposed: float = 0.0
    chunk_sizes: list[int] = field(default_factory=list)
    emulated_seconds: float = 0.0
    timeline: list[tuple[int, float, float, bool]] = field(default_factory=list)
    direct: bool = False
    buckets_overlapped: int = 0
    late_error: str | None = None

    @property
    def commit_hidden(self) -> float:
        """Seconds of this step's commits (Store round trips) that ran while the compute thread computed."""
        return max(0.0, sum(self.commit_seconds) - self.commit_exposed)


@dataclass
class StepRecord:
    """Everything one step in flight owns, shared by the compute thread and the release thread.

    Attributes:
        step: the step index.
        plan: the plan the step runs under (engine-private type).
        weights: the task weights (sample counts) of the step; None for a step the release joined
            ahead of the compute thread (it contributes nothing to it).
        digest: the weights' digest, as in the step's Store header.
        accumulator: flat buffers of this rank's used results, each scaled by its weight share.
        report: this rank's report.
        start: ``time.perf_counter()`` when the step began on this rank.
        ahead: made by the release for a step the compute thread had not reached yet.
        phase: see :class:`StepPhase`; changed only under ``lock``.
        accumulated: the results added to ``accumulator`` (after the addition completed).
        decided: the decided decoder state, once the release saw it.
        error: why the step failed (raised on the compute thread).
        done: set when the phase becomes REDUCED or FAILED.
        buffers: rank 0's module buffers for this step (broadcast by the release), or None.
        compute_busy: the compute thread is running this step's own work (a wait for the decision
            does not time out meanwhile).
    """

    step: int
    plan: object
    weights: tuple[float, ...] | None
    digest: bytes
    accumulator: FlatGradients
    report: StepReport
    start: float
    ahead: bool = False
    weights_total: float = 0.0
    tasks_run: int = 0  # tasks computed so far (numbers the emulated delays)
    phase: StepPhase = StepPhase.RUNNING
    accumulated: list[int] = field(default_factory=list)
    decided: DecoderState | None = None
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)
    buffers: list[torch.Tensor] | None = None
    compute_busy: bool = False
    # CUDA only: the compute stream's accumulation before, and its use of the result after, the
    # reduction on the release stream.
    accumulated_event: torch.cuda.Event | None = None
    reduced_event: torch.cuda.Event | None = None

    def fail(self, error: BaseException) -> bool:
        """Move to FAILED unless the release already froze the accumulator; True if it did move."""
        with self.lock:
            if self.phase is not StepPhase.RUNNING:
                return False
            self.phase, self.error = StepPhase.FAILED, error
        return True

    def finish(self, phase: StepPhase, error: BaseException | None = None) -> None:
        """End the step (REDUCED or FAILED) and wake the compute thread."""
        with self.lock:
            self.phase = phase
            if error is not None and self.error is None:
                self.error = error
        self.done.set()
