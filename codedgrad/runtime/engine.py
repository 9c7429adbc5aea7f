"""CodedDataParallel: one coded optimizer step over torch.distributed (DESIGN.md §3).

A step is an explicit sequence of phases, each a method below:

1. **plan** (:meth:`CodedDataParallel._ensure_plan`): every rank builds the same code from the same
   inputs and the ranks check through the Store that they agree, before any collective;
2. **compute** (:meth:`CodedDataParallel._compute_queue`): walk this rank's queue, skip what is
   already covered, compute each result into a fresh gradient list, commit it by compare-and-set
   and add it to the step's accumulator only if the commit is used;
3. **decide**: once the queue is dry, cover other ranks' uncovered work where the code allows it,
   else wait on the Store for the decision (bounded by ``timeout``);
4. **reduce** (:meth:`CodedDataParallel._arrive_and_reduce`): once every rank has arrived, one SUM
   all-reduce per flat bucket of the accumulators scaled by the decoder's rank coefficients. With
   the no-wait release (the default) this runs on a release thread with its own Store client and
   process group as soon as the step is decided (:meth:`CodedDataParallel._release`), so a rank
   busy with a task that can no longer be used does not hold the others up;
5. **clean up**: delete the step's Store keys and broadcast rank 0's module buffers.

Re-planning happens in phase 1 of a later step: every few steps the ranks exchange measured
profiles and switch plans together when the predicted step time improves enough.

The per-step data a phase needs, and what the compute and release threads share, travels in a
:class:`_StepContext`. One step is in flight at a time: ``backward`` returns only after its release
is done, so the accumulator and the coordinator's view can be reused by the next step.

A failure on one rank (an exception in ``task_loss``, a timeout) seals the step's gate as abandoned,
so every rank fails the same step and they all move on to the next step index together. Only when
the gate was already sealed ``go`` (the no-wait release reduced the step while this rank's failing
task was still running) has the step completed everywhere; then this rank completes it too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from codedgrad.codes import CODE_NAMES, CodeError, GradientCode, Work, make_code
from codedgrad.codes.base import DecoderState
from codedgrad.codes.repetition import homogeneous_profiles
from codedgrad.emulate import Heterogeneity
from codedgrad.plan import PlanError, optimal_split, split_statistics
from codedgrad.profile import WorkerProfile, fit_profile, profiles_from_dict, profiles_to_dict
from codedgrad.runtime.buffers import FlatGradients
from codedgrad.runtime.coordinator import CodedStepTimeout, StoreCoordinator
from codedgrad.runtime.hooks import coded_allreduce_

__all__ = ["CodedDataParallel", "ConfigurationError", "StepReport"]

_instances: dict[tuple[int, ...], itertools.count] = {}  # per process group: engines built so far


class ConfigurationError(ValueError):
    """The ranks' configurations are invalid or disagree; raised on every rank, before any collective."""


@dataclass
class StepReport:
    """What one rank did in one coded step.

    Attributes:
        step: step index (0-based, counted by the engine).
        rank: this rank.
        plan_version: version of the plan the step ran under (bumped at every re-plan).
        computed: results this rank computed (including those whose commit was not used).
        used: results of this rank that the decoder used.
        purged: results in this rank's queue it skipped because they were covered or the step decided.
        spare: results computed for other ranks after this rank's own queue ran dry.
        time_to_decision: seconds from the step's start until this rank saw it decided.
        time_waited: seconds spent waiting for the decision and for the other ranks to arrive.
        allreduce_time: seconds in the coded all-reduce.
        step_time: seconds of the whole :meth:`CodedDataParallel.backward`.
        rank_coefficient: this rank's decoding coefficient in the coded all-reduce.
        condition_number: of the decoder's linear system (1 for 0/1 codes).
        task_seconds: wall time of each computed result, commit included (on CUDA after the work is done).
        commit_seconds: wall time of each commit: its Store round trips and the decoder update, not
            the accumulation.
        commit_round_trips: Store round trips of this step's commits (one each, plus one per race
            with another rank's commit; flagging the decision is a set, sent without a reply).
        emulated_seconds: delay added by :mod:`codedgrad.emulate` (0 in production).
        late_error: an exception on this rank (e.g. from ``task_loss``) that came after the step was
            decided without this rank's remaining work (no-wait release): the step completed on every
            rank and is exact, so the error is reported here and as a ``RuntimeWarning`` instead of
            being raised on one rank only.
    """

    step: int
    rank: int
    plan_version: int
    num_tasks: int  # K of the step
    computed: int = 0
    used: int = 0
    purged: int = 0
    spare: int = 0
    time_to_decision: float = 0.0
    time_waited: float = 0.0
    allreduce_time: float = 0.0
    step_time: float = 0.0
    rank_coefficient: float = 1.0
    condition_number: float = 1.0
    task_seconds: list[float] = field(default_factory=list)
    commit_seconds: list[float] = field(default_factory=list)
    commit_round_trips: int = 0
    emulated_seconds: float = 0.0
    late_error: str | None = None


@dataclass
class _Plan:
    version: int
    num_tasks: int
    profiles: list[WorkerProfile]
    code: GradientCode
    queue: list[Work]


@dataclass
class _StepContext:
    """Everything one step owns: its index, plan, accumulator, report, clock and release state.

    ``lock`` orders the compute thread's commit-and-accumulate against the release: once
    ``released`` is set (under the lock) no result is added to the accumulator any more.
    """

    step: int
    plan: _Plan
    accumulator: FlatGradients
    report: StepReport
    task_loss: Callable[[int], torch.Tensor]
    start: float = field(default_factory=time.perf_counter)
    tasks_run: int = 0  # index of the next task for the emulator
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False
    decided_state: DecoderState | None = None
    reduced: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    # CUDA only: orders the compute stream's accumulation before, and its use of the gradients
    # after, the reduction on the release stream.
    accumulated: torch.cuda.Event | None = None
    reduced_on_device: torch.cuda.Event | None = None


class CodedDataParallel(nn.Module):
    """Data parallelism with coded, heterogeneity-aware gradient computation and exact gradients.

    Wrap the model on every rank, then replace ``loss.backward()`` by ``cdp.backward(task_loss, K)``
    where ``task_loss(j)`` returns the mean loss of task j's micro-batch (the global batch split into
    K equal tasks). Afterwards ``p.grad`` on every rank is the gradient of the mean loss over the
    whole global batch, whichever ranks were slow, and the optimizer steps identically everywhere.

    Exactness holds for a loss that is a mean over independent tasks, as with gradient
    accumulation: a forward pass that mixes samples across the batch (BatchNorm in training mode)
    or draws per-rank randomness (dropout without a per-task seed) computes a different function on
    micro-batches than on the whole batch. Module buffers (e.g. running statistics) are broadcast
    from rank 0 after every step so that all ranks hold the same model. Every parameter ends a step
    with a gradient; one that no task used gets zeros (exclude such parameters from weight decay).

    Args:
        module: the model (its parameters and buffers are broadcast from rank 0 at construction).
        redundancy: Ω ≥ 1, the share of extra task slots (repetition), or s+1 for ``frc``/``cyclic``.
            1.05–1.3 is the useful range for repetition on a noisy cluster (see ``codedgrad plan``).
        gamma: weight of the second moment in the planner's cost (0 balances means only).
        code: ``"repetition"`` (default), ``"uncoded"``, ``"frc"`` or ``"cyclic"``.
        profiles: one :class:`WorkerProfile` per rank to start from; None starts homogeneous and
            re-plans from the measured task times after ``warmup_steps``.
        emulate: a :class:`~codedgrad.emulate.Heterogeneity` that adds emulated per-task delays;
            None reads ``CODEDGRAD_EMULATE`` from the environment (absent: no emulation).
        timeout: seconds any wait on another rank may take before a :class:`CodedStepTimeout`.
        process_group: group for the coded all-reduce (default: the world). Several groups (e.g. the
            data-parallel groups of a 2-D layout) get separate Store namespaces.
        store: c10d Store for the step protocol (default: the default process group's store).
        name: the engine's Store namespace within its group; needed only when ranks build different
            numbers of engines (by default the n-th engine of a group on every rank is matched).
        replan_every: steps between profile exchanges (0 disables re-planning).
        replan_threshold: re-plan only when the predicted step time improves by more than this share
            (the first exchange of measured profiles always replaces the starting ones).
        warmup_steps: steps measured before the first re-plan when no profiles are given.
        spare_work: once this rank's queue is dry and the step is not decided, compute other ranks'
            uncovered tasks (repetition codes) instead of waiting, when that can end the step sooner:
            the rank behind has more than one of this rank's tasks left, or is late beyond its
            noise (see ``RepetitionState.spare_work``); until measured task times of every rank are
            in the plan (the first profile exchange; never with ``replan_every=0``), whenever work
            is open. False gives the static baselines.
        no_wait: run the coded all-reduce on a release thread with its own process group as soon as
            the step is decided, so that no rank waits for another rank's task in flight (a rank that
            is late skips its remaining work). Needs a Store that can be cloned; with a custom
            ``process_group`` it is available only on the world group.
        broadcast_buffers: broadcast rank 0's module buffers after every step. This is a collective
            on the compute thread, so a module with buffers re-synchronises the ranks every step.
        bucket_cap_mb: largest flat gradient bucket of the coded all-reduce.
    """

    def __init__(
        self,
        module: nn.Module,
        redundancy: float = 1.25,
        gamma: float = 1.0,
        code: str = "repetition",
        profiles: Sequence[WorkerProfile] | None = None,
        emulate: Heterogeneity | None = None,
        timeout: float = 300.0,
        process_group: dist.ProcessGroup | None = None,
        store: dist.Store | None = None,
        name: str | None = None,
        replan_every: int = 50,
        replan_threshold: float = 0.1,
        warmup_steps: int = 3,
        spare_work: bool = True,
        no_wait: bool = True,
        broadcast_buffers: bool = True,
        bucket_cap_mb: float = 25.0,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("CodedDataParallel needs torch.distributed: call init_process_group first")
        self.module = module
        self._group = process_group
        self._rank = dist.get_rank(process_group)
        self._world_size = dist.get_world_size(process_group)
        self._redundancy = redundancy
        self._gamma = gamma
        self._code_name = code
        self._timeout = timeout
        self._replan_every = replan_every
        self._replan_threshold = replan_threshold
        self._warmup_steps = warmup_steps
        self._spare_work = spare_work
        self._broadcast_buffers = broadcast_buffers
        self._emulate = emulate if emulate is not None else Heterogeneity.from_env()
        self._profiles = list(profiles) if profiles is not None else None
        self._measured_profiles = self._profiles is not None
        self._plan_is_measured = False  # whether the plan's profiles were measured in this run
        if store is None:
            store = dist.distributed_c10d._get_default_store()
        group_ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))
        if name is None:
            name = str(next(_instances.setdefault(group_ranks, itertools.count())))
        group_id = hashlib.sha256(repr(group_ranks).encode()).hexdigest()[:12]
        self._coordinator = StoreCoordinator(
            dist.PrefixStore(f"codedgrad/{group_id}/{name}", store), self._rank, self._world_size, timeout
        )
        # The release thread's collectives need a group of their own (collectives issued from two
        # threads on one group can interleave, DESIGN.md §4), and its waits a Store client of their own.
        self._no_wait = bool(no_wait and process_group is None and self._coordinator.has_wait_client)
        self._broken: BaseException | None = None  # set when a release thread could not be ended
        # Check every rank's configuration through the Store before the first collective.
        self._agree("config", self._config(), self._validate_config())
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._on_cuda = any(p.is_cuda for p in self._params)
        self._accumulator = FlatGradients(self._params, bucket_bytes=max(1, int(bucket_cap_mb * 2**20)))
        self._broadcast_state()
        self._release_group: dist.ProcessGroup | None = None
        self._release_stream: torch.cuda.Stream | None = None
        if self._no_wait:  # every rank agreed on it above, so every rank joins new_group
            self._release_group = dist.new_group(timeout=timedelta(seconds=timeout), backend=dist.get_backend())
            if self._on_cuda:
                self._release_stream = torch.cuda.Stream(device=self._params[0].device)
        self._plan: _Plan | None = None
        self._step = 0
        self._steps_since_plan = 0
        self._plan_versions = 0
        # Per-task seconds since the last profile exchange: a profile describes the recent past, so a
        # rank that slowed down is not outvoted by the many fast tasks it ran before.
        self._recent_seconds: deque[float] = deque(maxlen=4096)
        self.last_report: StepReport | None = None

    # ----------------------------------------------------------------- public API
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def plan_version(self) -> int:
        return self._plan.version if self._plan else -1

    @property
    def profiles(self) -> list[WorkerProfile] | None:
        """The profiles the current plan was built from."""
        return list(self._plan.profiles) if self._plan else self._profiles

    def backward(self, task_loss: Callable[[int], torch.Tensor], num_tasks: int) -> StepReport:
        """Run one coded step; afterwards ``p.grad`` is the gradient of the mean loss over all tasks.

        Args:
            task_loss: ``task_loss(j)`` returns the mean loss (a scalar tensor) of task j's micro-batch.
                It is called only for the tasks this rank computes, in the plan's order.
            num_tasks: K, the number of equal tasks the global batch is split into (≥ world size).

        Returns:
            This rank's :class:`StepReport`.
        """
        if self._broken is not None:
            raise RuntimeError(f"codedgrad: this engine is unusable since an earlier step failed: {self._broken}")
        plan = self._ensure_plan(num_tasks)
        ctx = _StepContext(
            step=self._step,
            plan=plan,
            accumulator=self._accumulator,
            report=StepReport(step=self._step, rank=self._rank, plan_version=plan.version, num_tasks=num_tasks),
            task_loss=task_loss,
        )
        ctx.accumulator.zero_()
        self._mark_accumulated(ctx)
        self._coordinator.begin(ctx.step, plan.code)
        if self._release_group is not None:
            threading.Thread(
                target=self._release, args=(ctx,), name=f"codedgrad-release-{ctx.step}", daemon=True
            ).start()
        try:
            self._compute_queue(ctx)
            self._decide(ctx)
        except BaseException as error:
            completed = self._fail_step(ctx, error)
            if not completed:
                raise
            if not isinstance(error, Exception):  # Ctrl-C, SystemExit: stop, but leave the step done
                self._finish_step(ctx)
                raise
            # Every rank already reduced this step without the failed work (it was decided before
            # this rank's task ended): applying it here too keeps all ranks on the same path.
            ctx.report.late_error = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"codedgrad: rank {self._rank}: {ctx.report.late_error}, after step {ctx.step} was decided without "
                "this rank's remaining work; the step completed exactly on every rank and is applied here too",
                RuntimeWarning,
                stacklevel=2,
            )
        self._finish_step(ctx)
        ctx.report.step_time = time.perf_counter() - ctx.start
        self.last_report = ctx.report
        return ctx.report

    def _finish_step(self, ctx: _StepContext) -> None:
        """Apply the reduced gradient, clean up and share the buffers: the step completed on every rank.

        Every rank that completes a step runs this, whatever else happened on it, so that the
        buffer broadcast (a collective) is matched on every rank.
        """
        if ctx.reduced_on_device is not None:
            torch.cuda.current_stream().wait_event(ctx.reduced_on_device)
        ctx.accumulator.write_to_params()
        self._coordinator.finish()  # also the gathers' keys: every rank passed them before this step's collective
        self._step += 1
        self._steps_since_plan += 1
        if self._broadcast_buffers:
            self._broadcast(self.module.buffers())

    # ----------------------------------------------------------------- phases of a step
    def _compute_queue(self, ctx: _StepContext) -> None:
        # No read before each item: begin() read the state, and every successful commit leaves this
        # rank's view exactly current (a commit that raced is retried on the Store's answer).
        queue = ctx.plan.queue
        for position, work in enumerate(queue):
            state = self._coordinator.state
            if ctx.released or state.decided:
                ctx.report.purged += len(queue) - position
                return
            if not state.is_needed(self._rank, work.result):
                ctx.report.purged += 1
                continue
            self._compute_and_commit(ctx, work)

    def _decide(self, ctx: _StepContext) -> None:
        """Cover other ranks' uncovered work while the code allows it, then finish the reduction.

        With the no-wait release the reduction runs on the release thread as soon as the step is
        decided; this thread only waits for it to end. Without it, this thread waits for the
        decision, the other ranks' arrival and the collective itself.
        """
        state = self._coordinator.state
        while not (ctx.released or state.decided) and self._spare_work:
            # Whether helping pays is judged against the plan's task times, which must be measured
            # seconds for that; until the first profile exchange, take whatever is open.
            elapsed = time.perf_counter() - ctx.start if self._plan_is_measured else None
            spare = state.spare_work(self._rank, elapsed=elapsed)
            if spare is None:  # nothing worth doing now; maybe once a rank falls behind its schedule
                state = self._idle_until_behind(ctx, state, elapsed)
                if state is None:
                    break
                continue
            ctx.report.spare += 1
            self._compute_and_commit(ctx, spare)
            state = self._coordinator.state
        start = time.perf_counter()
        if self._release_group is None:
            state = self._coordinator.state
            ctx.decided_state = state if state.decided else self._coordinator.wait_decided()
            ctx.report.time_to_decision = time.perf_counter() - ctx.start
            self._arrive_and_reduce(ctx, self._group)
        elif not self._wait_for_release(ctx):
            raise CodedStepTimeout(f"codedgrad: rank {self._rank}: the release of step {ctx.step} did not finish")
        # Time this thread spent waiting for others (the all-reduce itself is reported separately).
        ctx.report.time_waited += max(0.0, time.perf_counter() - start - ctx.report.allreduce_time)
        if ctx.error is not None:
            raise ctx.error

    def _idle_until_behind(self, ctx: _StepContext, state: DecoderState, elapsed: float | None) -> DecoderState | None:
        """After spare work was declined: idle until some rank may be behind, then read the state again.

        Returns None when there is nothing to wait for or the step ended meanwhile: with the no-wait
        release, once the release is done (a decision alone is caught by ``released``); without it,
        once the decision flag is set. The idle time counts as waited.
        """
        retry = None if elapsed is None else state.next_spare_check(self._rank, elapsed)
        if retry is None:
            return None
        idle_start = time.perf_counter()
        seconds = max(0.0, ctx.start + retry - idle_start)
        if self._release_group is not None:
            ended = ctx.reduced.wait(timeout=seconds)
        else:
            ended = self._coordinator.poll_decided(seconds)
        ctx.report.time_waited += time.perf_counter() - idle_start
        if ended:
            return None
        with ctx.lock:  # unreleased under the lock: the step's keys cannot be deleted meanwhile
            return None if ctx.released else self._coordinator.refresh()

    def _wait_for_release(self, ctx: _StepContext) -> bool:
        # The release's decision wait, arrival wait and collective each time out after ``timeout``.
        return ctx.reduced.wait(timeout=3 * self._timeout + 10)

    def _fail_step(self, ctx: _StepContext, error: BaseException) -> bool:
        """Keep the ranks in step after this rank failed mid-step; True if the step completed anyway.

        The step's gate is sealed as abandoned unless every rank had already gone on (``go``): then
        the others fail the same step at their arrival, and every rank leaves this step index
        behind, so a caller that catches the error can go on training. If they had gone on (the
        no-wait release reduced the step while this rank's failed task was still running), the
        step completed on every rank with what this rank had committed, which is exact; the caller
        must then finish it (:meth:`_finish_step`) like any other step.
        """
        with ctx.lock:
            ctx.released = True  # nothing more goes into the accumulator
        abandoned = self._coordinator.abandon(f"{type(error).__name__}: {error}")
        if self._release_group is not None and not self._wait_for_release(ctx):
            self._broken = error  # a release thread still holds the accumulator: never reuse it
            return False
        # Only the release can have gone on without this thread: in the synchronous step this thread
        # arrives itself, so a failure after "go" is a failure of the collective, never a completion.
        completed = self._release_group is not None and not abandoned and ctx.error is None
        if not completed:
            self._coordinator.leave_failed()
            self._step += 1
            self._steps_since_plan += 1
        return completed

    def _release(self, ctx: _StepContext) -> None:
        """The no-wait release (own thread, own Store client, own process group).

        As soon as the step is decided, freeze this rank's accumulator and reduce it, while the
        compute thread may still be busy with a task that can no longer be used.
        """
        try:
            state = self._coordinator.wait_decided()
            with ctx.lock:  # a commit in progress is used or not, and accumulated, before we go on
                ctx.released, ctx.decided_state = True, state
            ctx.report.time_to_decision = time.perf_counter() - ctx.start
            self._arrive_and_reduce(ctx, self._release_group)
        except BaseException as error:  # handed to the compute thread, which raises it
            with ctx.lock:
                ctx.released = True  # stop the compute thread from working for a dead step
            ctx.error = error
        finally:
            ctx.reduced.set()

    def _compute_and_commit(self, ctx: _StepContext, work: Work) -> None:
        start = time.perf_counter()
        grads: list[torch.Tensor | None] = [None] * len(self._params)
        for i, (task, coefficient) in enumerate(zip(work.tasks, work.coefficients)):
            if i > 0 and self._decided_meanwhile(ctx):
                return  # a rank-level result the step no longer needs: decided while computing it
            loss = ctx.task_loss(task)
            if ctx.released:
                return  # released during the forward pass: the backward would be wasted
            task_grads = torch.autograd.grad(loss, self._params, allow_unused=True)
            # Scale in the accumulator's precision: bf16(coefficient / K) would bias every gradient.
            _add_scaled(grads, task_grads, coefficient / ctx.plan.num_tasks, ctx.accumulator.dtypes)
            if self._emulate is not None:
                ctx.report.emulated_seconds += self._emulate.sleep(self._rank, ctx.step, ctx.tasks_run)
            ctx.tasks_run += 1
        if self._on_cuda:
            torch.cuda.current_stream().synchronize()  # commit means "done", and the timer must see it
        with ctx.lock:
            # Once released, the step's keys may already be gone and the accumulator is being reduced.
            used = False
            if not ctx.released:
                round_trips = self._coordinator.commit_round_trips
                commit_start = time.perf_counter()
                used = self._coordinator.commit(work.result)
                ctx.report.commit_seconds.append(time.perf_counter() - commit_start)
                ctx.report.commit_round_trips += self._coordinator.commit_round_trips - round_trips
            if used:
                ctx.accumulator.add_(grads)
                self._mark_accumulated(ctx)
        ctx.report.computed += 1
        ctx.report.used += used
        elapsed = time.perf_counter() - start
        ctx.report.task_seconds.append(elapsed)
        self._recent_seconds.append(elapsed / len(work.tasks))

    def _mark_accumulated(self, ctx: _StepContext) -> None:
        """CUDA: let the release stream wait for what the compute stream has accumulated so far."""
        if self._release_stream is not None:
            ctx.accumulated = torch.cuda.Event()
            ctx.accumulated.record()

    def _decided_meanwhile(self, ctx: _StepContext) -> bool:
        if self._release_group is not None:
            return ctx.released  # the release thread watches the Store; no round trip here
        return self._coordinator.refresh().decided

    def _arrive_and_reduce(self, ctx: _StepContext, group: dist.ProcessGroup | None) -> None:
        """Wait for every rank at the Store, then the coded all-reduce of the flat buckets."""
        self._coordinator.arrive_and_wait()
        decoding = ctx.decided_state.decoding()
        coefficient = float(decoding.rank_coefficients[self._rank])
        ctx.report.rank_coefficient = coefficient
        ctx.report.condition_number = float(decoding.condition_number)
        start = time.perf_counter()
        if self._release_stream is not None and group is self._release_group:
            # The release thread works on its own stream, after the compute stream's accumulation,
            # so that it does not queue behind the kernels of a task still in flight.
            self._release_stream.wait_event(ctx.accumulated)
            with torch.cuda.stream(self._release_stream):
                for bucket in ctx.accumulator:
                    coded_allreduce_(bucket, coefficient, group)
                ctx.reduced_on_device = torch.cuda.Event()
                ctx.reduced_on_device.record()
        else:
            for bucket in ctx.accumulator:
                coded_allreduce_(bucket, coefficient, group)
        ctx.report.allreduce_time = time.perf_counter() - start

    # ----------------------------------------------------------------- planning
    def _ensure_plan(self, num_tasks: int) -> _Plan:
        if self._plan is None or self._plan.num_tasks != num_tasks:
            # Keep what was measured so far as a guess for the split (with nothing known, every rank
            # is alike); but those are times of tasks of another size, not for the clock.
            profiles = self.profiles or homogeneous_profiles(self._world_size)
            self._plan = self._agreed_plan(num_tasks, profiles)
            self._plan_is_measured = False
            self._recent_seconds.clear()
        elif self._replan_due():
            self._maybe_replan()
        return self._plan

    def _replan_due(self) -> bool:
        if self._replan_every <= 0:
            return False
        period = self._replan_every if self._measured_profiles else self._warmup_steps
        return self._steps_since_plan >= period

    def _maybe_replan(self) -> None:
        """Exchange fitted profiles and switch plans when the predicted step time improves enough
        (or always, the first time).

        Every rank receives the same profiles from the Store and applies the same deterministic rule,
        so all ranks switch (or not) at the same step without another round of agreement.
        """
        assert self._plan is not None
        own, fitted = self._fitted_profile()
        name = f"profiles/{self._plan.version}/{self._step}"
        payload = {"profile": profiles_to_dict([own]), "fitted": fitted}
        shared = [json.loads(value) for value in self._coordinator.gather(name, json.dumps(payload).encode())]
        measured = [profiles_from_dict(entry["profile"])[0] for entry in shared]
        all_fitted = all(entry["fitted"] for entry in shared)
        self._steps_since_plan = 0  # also when the plan stays: the next exchange is a period away
        K = self._plan.num_tasks
        current = _predicted_step_time(measured, optimal_split(self._plan.profiles, K, 1.0, self._gamma))
        proposed = _predicted_step_time(measured, optimal_split(measured, K, 1.0, self._gamma))
        self._measured_profiles = True
        # The first measurements always replace the starting profiles: those are a guess, perhaps in
        # other units than seconds, and spare work compares the plan's task times with the clock.
        if not self._plan_is_measured or proposed < (1.0 - self._replan_threshold) * current:
            self._plan = self._build_plan(K, measured)
            self._plan_is_measured = all_fitted  # a rank short of samples sent its old guess

    def _fitted_profile(self) -> tuple[WorkerProfile, bool]:
        """This rank's profile from its task times since the last exchange, and whether it was fitted."""
        assert self._plan is not None
        samples = list(self._recent_seconds)
        self._recent_seconds.clear()
        if len(samples) < 3:  # too few measurements (e.g. everything purged): keep the old profile
            return self._plan.profiles[self._rank], False
        return fit_profile(samples), True

    def _agreed_plan(self, num_tasks: int, profiles: list[WorkerProfile]) -> _Plan:
        """Build the plan and check through the Store that every rank built the same one."""
        name = f"plan/{self._plan_versions}"  # before building: a failed build must not move the name
        plan, error = None, None
        try:
            plan = self._build_plan(num_tasks, profiles)
        except (CodeError, PlanError, ValueError) as exc:
            error = str(exc)
        fingerprint = _fingerprint(plan) if plan else ""
        self._agree(name, {"num_tasks": num_tasks, "plan": fingerprint}, error)
        assert plan is not None
        return plan

    def _build_plan(self, num_tasks: int, profiles: list[WorkerProfile]) -> _Plan:
        code = make_code(self._code_name, self._world_size, num_tasks, self._redundancy, profiles, self._gamma)
        version = self._plan_versions
        self._plan_versions += 1
        return _Plan(version, num_tasks, profiles, code, code.queue(self._rank))

    # ----------------------------------------------------------------- start-up checks
    def _config(self) -> dict:
        shapes = [(tuple(p.shape), str(p.dtype)) for p in self.module.parameters()]
        return {
            "world_size": self._world_size,
            "code": self._code_name,
            "redundancy": self._redundancy,
            "gamma": self._gamma,
            "timeout": self._timeout,
            "profiles": profiles_to_dict(self._profiles) if self._profiles else None,
            "emulate": self._emulate.to_json() if self._emulate else None,
            "spare_work": self._spare_work,
            "no_wait": self._no_wait,
            "parameters": hashlib.sha256(repr(shapes).encode()).hexdigest()[:16],
        }

    def _validate_config(self) -> str | None:
        """This rank's configuration error, if any (reported on every rank by :meth:`_agree`)."""
        if self._code_name not in CODE_NAMES:
            return f"code: must be one of {', '.join(CODE_NAMES)}, got {self._code_name!r}"
        if not (isinstance(self._redundancy, (int, float)) and math.isfinite(self._redundancy)):
            return f"redundancy: must be a finite number, got {self._redundancy!r}"
        if self._redundancy < 1:
            return f"redundancy: must be >= 1, got {self._redundancy}"
        if not (math.isfinite(self._gamma) and self._gamma >= 0):
            return f"gamma: must be finite and >= 0, got {self._gamma}"
        if not (self._timeout > 0 and math.isfinite(self._timeout)):
            return f"timeout: must be a positive number of seconds, got {self._timeout}"
        if self._profiles is not None and len(self._profiles) != self._world_size:
            return f"profiles: {len(self._profiles)} profiles for a world of {self._world_size} ranks"
        if self._emulate is not None and len(self._emulate.speeds) != self._world_size:
            return f"emulate.speeds: {len(self._emulate.speeds)} speeds for a world of {self._world_size} ranks"
        return None

    def _agree(self, name: str, config: dict, error: str | None) -> None:
        """Gather every rank's configuration and error; raise the same ConfigurationError everywhere."""
        payload = json.dumps({"config": config, "error": error}, sort_keys=True).encode()
        everyone = [json.loads(value) for value in self._coordinator.gather(name, payload)]
        ranks_by_error: dict[str, list[int]] = {}
        for r, entry in enumerate(everyone):
            if entry["error"]:
                ranks_by_error.setdefault(entry["error"], []).append(r)
        problems = [f"{_ranks(ranks)}: {error}" for error, ranks in ranks_by_error.items()]
        for key in config:
            values = [json.dumps(entry["config"].get(key), sort_keys=True) for entry in everyone]
            if len(set(values)) > 1:
                per_rank = ", ".join(f"rank {r}={v}" for r, v in enumerate(values))
                problems.append(f"ranks disagree on {key}: {per_rank}")
        if problems:
            raise ConfigurationError("codedgrad: " + "; ".join(problems))

    def _broadcast_state(self) -> None:
        self._broadcast(itertools.chain(self.module.parameters(), self.module.buffers()))

    def _broadcast(self, tensors) -> None:
        source = dist.get_global_rank(self._group, 0) if self._group is not None else 0
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=source, group=self._group)


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _add_scaled(
    total: list[torch.Tensor | None], new: Sequence[torch.Tensor | None], scale: float, dtypes: Sequence[torch.dtype]
) -> None:
    """total[i] += scale · new[i], in ``dtypes[i]`` (None counts as zero)."""
    for i, (grad, dtype) in enumerate(zip(new, dtypes)):
        if grad is None:
            continue
        if total[i] is None:
            total[i] = grad.to(dtype) * scale
        else:
            total[i].add_(grad.to(dtype), alpha=scale)


def _predicted_step_time(profiles: Sequence[WorkerProfile], split: Sequence[int]) -> float:
    """The slowest rank's expected finish time under ``split`` (the planner's view of a step)."""
    return float(split_statistics(profiles, split).mean_finish.max())


def _fingerprint(plan: _Plan) -> str:
    queues = [[(w.result, w.tasks, w.coefficients) for w in plan.code.queue(r)] for r in range(plan.code.num_ranks)]
    return hashlib.sha256(repr(queues).encode()).hexdigest()[:16]
