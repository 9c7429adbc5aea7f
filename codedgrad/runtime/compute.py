"""The compute thread's work in one step: this rank's queue, then spare work.

Each result is computed into fresh gradients (the loss scaled by its weight share and the code's
coefficient, in the accumulator's precision), then committed with one compare-and-set and, if the
decoder uses it, added to the step's accumulator, both under the step's lock: the release can never
freeze the accumulator between a commit and its addition (see :mod:`~codedgrad.runtime.step`).
Once the queue is dry, an idle rank takes other ranks' open tasks when the spare-work policy
(:mod:`codedgrad.codes.spare`) says that can end the step sooner.

With a ``batch_loss`` (the loss of a set of tasks at once) and task-level repetition, a rank runs
its *primaries* in chunks: several tasks in one forward/backward, so the fixed cost of a call is paid
once per chunk. Chunks follow guided self-scheduling (:func:`chunk_size`): about half of the
still-open primaries first, then smaller and smaller, never below the size at which the fixed cost
is a tenth of the chunk's time (from the rank's measured :class:`~codedgrad.profile.CostModel`), so
the work in flight when the step is decided is short. Without spare work, the leading primaries that
no other rank holds go in the first chunk whole (up to an even share, DDP's batch per rank, for
memory): only this rank can ever compute them. A chunk commits all its results with one
compare-and-set, all or none (:meth:`StepChannel.commit_all`): its gradient is one sum, so if a
backup covered one of its tasks meanwhile, nothing is committed and the still-open tasks go back to
the queue. Backups and spare work stay single tasks: they decide the step's end.

With a ``batch_loss`` the commits of the queue overlap compute: a chunk's commit (its Store round
trips and the accumulation, still one critical section under the step's lock) runs on a short-lived
helper thread while the compute thread starts the next chunk. At most one commit is in flight, and
it is joined before the next one, before spare work (which needs the fresh decoder state) and before
the step's work ends, so no helper outlives the step's work. ``StepReport.commit_exposed`` is the
part of the commits' time the compute thread waited for.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from codedgrad.codes import Work
from codedgrad.codes.repetition import RepetitionCode
from codedgrad.codes.spare import next_spare_check, spare_work
from codedgrad.runtime.config import EngineConfig
from codedgrad.runtime.coordinator import StepChannel
from codedgrad.runtime.direct import BucketLauncher
from codedgrad.runtime.replan import Plan
from codedgrad.runtime.step import StepPhase, StepRecord

__all__ = ["MAX_OVERHEAD_SHARE", "StepLoss", "TaskRunner", "chunk_size"]

#: A chunk is at least large enough that the fixed cost of a call is at most this share of its time.
MAX_OVERHEAD_SHARE = 0.1


def chunk_size(open_tasks: int, min_tasks: int = 1) -> int:
    """Guided self-scheduling: the size of the next chunk of a rank's ``open_tasks`` primaries.

    Half of what is open (rounded up), so the chunks shrink geometrically towards the end of the
    step, but at least ``min_tasks`` (where the fixed cost stops being small) and at most what is open.

    >>> [chunk_size(n) for n in (20, 10, 5, 2, 1)]
    [10, 5, 3, 1, 1]
    """
    if open_tasks < 1:
        raise ValueError(f"open_tasks: must be >= 1, got {open_tasks}")
    if min_tasks < 1:
        raise ValueError(f"min_tasks: must be >= 1, got {min_tasks}")
    return min(open_tasks, max(min_tasks, (open_tasks + 1) // 2))


@dataclass(frozen=True)
class StepLoss:
    """The user's loss of one step: per task (``task_loss(j)``) or per set of tasks (``batch_loss(ids)``).

    Exactly one is given. ``batch_loss(ids)`` returns the mean loss over the union of those tasks'
    samples (weights: the tasks' sample counts); either may return ``(loss, {slot: value})``.
    """

    task_loss: Callable[[int], object] | None = None
    batch_loss: Callable[[list[int]], object] | None = None

    def __post_init__(self) -> None:
        if (self.task_loss is None) == (self.batch_loss is None):
            raise TypeError("codedgrad: backward() needs exactly one of task_loss and batch_loss")
        given = self.task_loss if self.task_loss is not None else self.batch_loss
        if not callable(given):
            name = "task_loss" if self.task_loss is not None else "batch_loss"
            raise TypeError(f"codedgrad: {name} must be callable, got {type(given).__name__}")

    @property
    def batched(self) -> bool:
        return self.batch_loss is not None

    def __call__(self, tasks: Sequence[int]) -> object:
        if self.batch_loss is not None:
            return self.batch_loss(list(tasks))
        assert self.task_loss is not None and len(tasks) == 1
        return self.task_loss(tasks[0])

    def name(self, tasks: Sequence[int]) -> str:
        """How the call is shown in an error message."""
        return f"batch_loss({list(tasks)})" if self.batched else f"task_loss({tasks[0]})"


@dataclass
class _Computed:
    """One result's gradients, computed and not yet committed."""

    results: tuple[int, ...]
    grads: list[torch.Tensor | None]  # times grad_scale: the result's share of the step's gradient
    loss_sum: float
    values: dict[int, tuple[float, float]]  # slot -> (Σ scale·value, Σ scale)
    start: float
    computed: float
    grad_scale: float = 1.0


class _Committer:
    """At most one commit in flight on a helper thread (see the module docstring)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._on_done: Callable[[bool], None] | None = None
        self._used = False

    def submit(self, commit: Callable[[], bool], on_done: Callable[[bool], None]) -> None:
        """Run ``commit()`` on a helper thread; ``on_done(used)`` runs on the compute thread at :meth:`join`."""
        self._on_done = on_done

        def run() -> None:
            try:
                self._used = commit()
            except BaseException as error:  # handed to the compute thread at join()
                self._error = error

        self._thread = threading.Thread(target=run, name="codedgrad-commit", daemon=True)
        self._thread.start()

    def join(self) -> float:
        """Wait for the commit in flight (if any); the seconds waited. Re-raises the commit's error."""
        thread, self._thread = self._thread, None
        if thread is None:
            return 0.0
        begin = time.perf_counter()
        interrupted: BaseException | None = None
        while thread.is_alive():  # a Ctrl-C must not leave the helper on the Store client we share
            try:
                thread.join()
            except KeyboardInterrupt as error:  # the commit is bounded by the Store's timeout
                interrupted = error
        if interrupted is not None:
            raise interrupted
        waited = time.perf_counter() - begin
        error, self._error = self._error, None
        if error is not None:
            raise error
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self._used)
        return waited


class TaskRunner:
    """Runs one rank's tasks of a step on the compute thread.

    Args:
        params: the parameters whose gradients are computed.
        rank: this rank.
        config: the agreed configuration (spare work, emulation).
        no_wait: whether a release thread reduces the step (so a decision shows in the record's phase).
        on_cuda: synchronise the stream before a commit, so "committed" means "computed".
        record_task: called with each result's (number of tasks, summed task weight, compute seconds),
            for the profiles and the cost model.
        after_task: called after each result's compute (rank 0 snapshots its module buffers).
        mark_accumulated: called after each addition to the accumulator (CUDA stream order).
        min_chunk_weight: the least summed task weight a chunk should have (from the cost model; 0:
            no fixed cost known, chunks may shrink to one task).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        rank: int,
        config: EngineConfig,
        no_wait: bool,
        on_cuda: bool,
        record_task: Callable[[int, float, float], None],
        after_task: Callable[[], None],
        mark_accumulated: Callable[[StepRecord], None],
        min_chunk_weight: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._params = list(params)
        self._rank = rank
        self._config = config
        self._no_wait = no_wait
        self._on_cuda = on_cuda
        self._record_task = record_task
        self._after_task = after_task
        self._mark_accumulated = mark_accumulated
        self._min_chunk_weight = min_chunk_weight

    def run(self, record: StepRecord, channel: StepChannel, loss: StepLoss) -> None:
        """This rank's queue, then spare work, committing each result as it is done."""
        plan: Plan = record.plan  # type: ignore[assignment]
        record.compute_busy = True
        committer = _Committer() if loss.batched else None
        try:
            if loss.batched and isinstance(plan.code, RepetitionCode):
                if not self._chunked_queue(record, channel, loss, committer):
                    return
            else:
                queue = plan.queue
                for position, work in enumerate(queue):
                    state = channel.state
                    if record.phase is not StepPhase.RUNNING or state.decided:
                        record.report.purged += len(queue) - position
                        return
                    if not state.is_needed(self._rank, work.result):
                        record.report.purged += 1
                        continue
                    self._compute_and_commit(record, channel, work, loss)
        finally:
            try:
                if committer is not None:
                    record.report.commit_exposed += committer.join()
            finally:
                record.compute_busy = False
        self._spare_work(record, channel, loss)

    def run_direct(self, record: StepRecord, loss: StepLoss, launcher: BucketLauncher | None = None) -> None:
        """A plan with nothing to decide (:mod:`~codedgrad.runtime.direct`): this rank's queue, all of it
        primaries, accumulated without commits.

        With ``batch_loss`` the tasks run in as few, as equal chunks as an even share (DDP's batch
        per rank, what the user sized memory for) allows; with ``task_loss`` one call per task. The
        last call's backward hands its gradients to ``launcher``, which reduces buckets meanwhile;
        every call adds its gradients straight into the accumulator.
        """
        plan: Plan = record.plan  # type: ignore[assignment]
        tasks = [work.result for work in plan.queue]
        code = plan.code
        calls = math.ceil(len(tasks) / math.ceil(code.num_tasks / code.num_ranks)) if loss.batched else len(tasks)
        base, extra = divmod(len(tasks), max(1, calls))
        begin = 0
        for i in range(calls):
            chunk = tuple(tasks[begin : begin + base + (i < extra)])
            begin += len(chunk)
            overlap = i == calls - 1 and launcher is not None and launcher.overlaps
            work = Work(chunk[0], chunk, (1.0,) * len(chunk))
            computed = self._compute(record, None, work, loss, launcher, overlap)
            assert computed is not None  # a direct step is never decided or released while it computes
            record.accumulator.add_(computed.grads, computed.loss_sum, computed.values)
            record.accumulated.extend(computed.results)
            record.report.chunk_sizes.append(len(chunk))
            _report_result(record, computed, used=True)
        record.report.time_to_decision = time.perf_counter() - record.start

    def _chunked_queue(
        self, record: StepRecord, channel: StepChannel, loss: StepLoss, committer: _Committer | None
    ) -> bool:
        """The queue of a repetition code: primaries in shrinking chunks, then backups one by one.

        Returns False when the step ended (decided or released) before the queue did.
        """
        plan: Plan = record.plan  # type: ignore[assignment]
        code: RepetitionCode = plan.code  # type: ignore[assignment]
        weights = record.weights
        assert weights is not None and committer is not None
        primaries = deque(w.result for w in plan.queue if int(code.primary_of[w.result]) == self._rank)
        backups = [w for w in plan.queue if int(code.primary_of[w.result]) != self._rank]
        mean_weight = record.weights_total / len(weights)
        min_weight = self._min_chunk_weight()
        min_tasks = max(1, math.ceil(min_weight / mean_weight)) if mean_weight > 0 and math.isfinite(min_weight) else 1
        # No chunk beyond DDP's batch per rank: its activations are what the user sized memory for.
        even_share = math.ceil(code.num_tasks / code.num_ranks)

        def requeue(results: tuple[int, ...]) -> Callable[[bool], None]:
            def done(used: bool) -> None:
                if not used and len(results) > 1:  # a backup covered part of it: redo what is still open
                    state = channel.state
                    if not state.decided:
                        primaries.extendleft(reversed([j for j in results if state.is_needed(self._rank, j)]))

            return done

        def ended() -> bool:
            return record.phase is not StepPhase.RUNNING or channel.state.decided

        while True:
            if not primaries and not backups:
                # The last commit may hand tasks back (a chunk a backup overlapped): wait for it.
                record.report.commit_exposed += committer.join()
                if not primaries:
                    return True
            if ended():
                record.report.purged += len(primaries) + len(backups)
                return False
            state = channel.state
            if primaries:
                open_ids = [j for j in primaries if state.is_needed(self._rank, j)]
                record.report.purged += len(primaries) - len(open_ids)
                primaries.clear()
                if not open_ids:
                    record.report.commit_exposed += committer.join()  # a requeue may refill primaries
                    continue
                size = chunk_size(len(open_ids), min_tasks)
                if not self._config.spare_work:  # only backups can take over a primary: see _sole_prefix
                    size = max(size, min(_sole_prefix(code, self._rank, open_ids), even_share))
                chunk, rest = tuple(open_ids[:size]), open_ids[size:]
                primaries.extend(rest)
                work = Work(chunk[0], chunk, (1.0,) * len(chunk))
            else:
                work = backups.pop(0)
                if not state.is_needed(self._rank, work.result):
                    record.report.purged += 1
                    continue
            computed = self._compute(record, channel, work, loss)
            # The previous commit ran meanwhile: wait for it before this one (one in flight).
            record.report.commit_exposed += committer.join()
            if computed is None:
                continue
            record.report.chunk_sizes.append(len(work.tasks))
            committer.submit(
                lambda computed=computed: self._commit(record, channel, computed), requeue(computed.results)
            )

    def _spare_work(self, record: StepRecord, channel: StepChannel, loss: StepLoss) -> None:
        """Cover other ranks' open work while the code offers it and helping can end the step sooner."""
        plan: Plan = record.plan  # type: ignore[assignment]
        state = channel.state
        while self._config.spare_work and record.phase is StepPhase.RUNNING and not state.decided:
            # Whether helping pays is judged against the plan's task times, which must be measured
            # seconds for that; until they are, take whatever is open (owners running single tasks).
            elapsed = time.perf_counter() - record.start if plan.measured else None
            work = spare_work(state, self._rank, elapsed=elapsed, owners_in_chunks=loss.batched)
            if work is None:
                retry = None if elapsed is None else next_spare_check(state, self._rank, elapsed)
                if retry is None or not self._idle(record, channel, record.start + retry):
                    return
                with record.lock:  # still RUNNING under the lock: the step's keys cannot be deleted meanwhile
                    if record.phase is not StepPhase.RUNNING:
                        return
                    state = channel.refresh()
                continue
            record.report.spare += 1
            record.compute_busy = True
            try:
                self._compute_and_commit(record, channel, work, loss)
            finally:
                record.compute_busy = False
            state = channel.state

    def _idle(self, record: StepRecord, channel: StepChannel, until: float) -> bool:
        """Wait until ``until`` (perf_counter) unless the step ends first; True if it did not end."""
        begin = time.perf_counter()
        seconds = max(0.0, until - begin)
        if self._no_wait:
            ended = record.done.wait(timeout=seconds) or record.phase is not StepPhase.RUNNING
        else:
            ended = channel.poll_decided(seconds)
        record.report.time_waited += time.perf_counter() - begin
        return not ended

    def _compute_and_commit(self, record: StepRecord, channel: StepChannel, work: Work, loss: StepLoss) -> None:
        computed = self._compute(record, channel, work, loss)
        if computed is not None:
            begin = time.perf_counter()
            self._commit(record, channel, computed)
            record.report.commit_exposed += time.perf_counter() - begin  # on this thread: all exposed

    def _compute(
        self,
        record: StepRecord,
        channel: StepChannel | None,
        work: Work,
        loss: StepLoss,
        direct: BucketLauncher | None = None,
        overlap: bool = False,
    ) -> _Computed | None:
        """``work``'s gradient, scaled by its weight share; None when the step no longer needs it.

        A chunk of a repetition code (several tasks, all with coefficient 1) is one call of the
        batch loss; a rank-level code's work (coefficients per task) is one call per task. In a
        direct step (``direct``: nothing to commit) the gradients go straight into the accumulator,
        during the backward with ``overlap`` (:meth:`BucketLauncher.arm`), and the result carries none.
        """
        start = time.perf_counter()
        weights, total = record.weights, record.weights_total
        assert weights is not None
        grads: list[torch.Tensor | None] = [None] * len(self._params)
        grad_scale = 1.0
        loss_sum = 0.0
        values: dict[int, tuple[float, float]] = {}  # slot -> (Σ scale·value, Σ scale)
        chunked = len(work.tasks) > 1 and loss.batched and all(c == 1.0 for c in work.coefficients)
        calls = [(work.tasks, 1.0)] if chunked else [((t,), c) for t, c in zip(work.tasks, work.coefficients)]
        for i, (tasks, coefficient) in enumerate(calls):
            if i > 0 and self._decided_meanwhile(record, channel):
                return None  # a rank-level result the step no longer needs: decided while computing it
            call_start = time.perf_counter()
            weight = math.fsum(weights[t] for t in tasks)
            if weight == 0:
                continue  # empty tasks: nothing to compute, but their commit still counts
            scale = coefficient * weight / total
            output = _checked_output(loss(tasks), loss.name(tasks), self._rank, self._config.value_slots)
            task_loss, task_values = output
            if record.phase is not StepPhase.RUNNING:
                return None  # released during the forward pass: the backward would be wasted
            if overlap:  # one call (a direct step's chunk): a second would add into buckets already sent
                assert direct is not None and len(calls) == 1
                direct.arm(scale)
            try:
                task_grads = torch.autograd.grad(task_loss, self._params, allow_unused=True)
            except RuntimeError as error:
                if "does not require grad" in str(error):
                    raise TypeError(
                        f"codedgrad: {loss.name(tasks)} on rank {self._rank} returned a loss that does not depend "
                        "on the module's parameters (computed under torch.no_grad(), or detached)"
                    ) from error
                raise
            finally:
                if overlap:
                    direct.disarm()  # type: ignore[union-attr]
            if direct is None and len(calls) == 1:
                # Kept as autograd returned them, scaled when added: no scaled copy in fresh memory.
                grads, grad_scale = list(task_grads), scale
            elif direct is None:  # several calls (a rank-level code's coefficients) sum into one result
                # Scale in the accumulator's precision: bf16(w / W) would bias every gradient.
                _add_scaled(grads, task_grads, scale, record.accumulator.dtypes)
            elif overlap:  # the hooks added them during the backward
                direct.record_uses()
            else:
                record.accumulator.add_scaled_(task_grads, scale)
            del task_grads
            loss_sum += scale * float(task_loss.detach())
            for slot, value in task_values.items():
                weighted, share = values.get(slot, (0.0, 0.0))
                values[slot] = (weighted + scale * value, share + scale)
            if self._config.emulate is not None:  # compute mode scales the call's measured compute
                if self._on_cuda and self._config.emulate.mode == "compute":
                    torch.cuda.current_stream().synchronize()
                record.report.emulated_seconds += self._config.emulate.sleep_batch(
                    self._rank,
                    record.step,
                    len(tasks),
                    first=record.tasks_run,
                    compute_seconds=time.perf_counter() - call_start,
                )
            record.tasks_run += len(tasks)
        if self._on_cuda:
            torch.cuda.current_stream().synchronize()  # commit means "done", and the timer must see it
        computed = time.perf_counter()
        self._after_task()
        # The profile is of compute alone: Store latency is the same for every rank and would
        # flatten the measured speed ratios (a fast rank's tasks look relatively slower).
        self._record_task(len(work.tasks), math.fsum(weights[t] for t in work.tasks), computed - start)
        results = work.tasks if chunked else (work.result,)
        return _Computed(tuple(results), grads, loss_sum, values, start, computed, grad_scale)

    def _commit(self, record: StepRecord, channel: StepChannel, computed: _Computed) -> bool:
        """Commit a computed result (or chunk) and, if used, accumulate it: one critical section."""
        used = False
        with record.lock:  # the release cannot freeze the accumulator between the commit and the addition
            if record.phase is StepPhase.RUNNING:
                trips = channel.commit_round_trips
                commit_start = time.perf_counter()
                used = channel.commit_all(computed.results)
                record.report.commit_seconds.append(time.perf_counter() - commit_start)
                record.report.commit_round_trips += channel.commit_round_trips - trips
                if used:
                    record.accumulator.add_(computed.grads, computed.loss_sum, computed.values, computed.grad_scale)
                    record.accumulated.extend(computed.results)  # after the addition completed
                    self._mark_accumulated(record)
        _report_result(record, computed, used)
        return used

    def _decided_meanwhile(self, record: StepRecord, channel: StepChannel | None) -> bool:
        if self._no_wait or channel is None:
            return record.phase is not StepPhase.RUNNING  # the release watches the Store; no round trip
        return channel.refresh().decided


def _report_result(record: StepRecord, computed: _Computed, used: bool) -> None:
    """A computed result (or chunk) in the step's report: counts, its time (commit included) and timeline."""
    end = time.perf_counter()
    count = len(computed.results)
    record.report.computed += count
    record.report.used += count if used else 0
    record.report.task_seconds.append(end - computed.start)
    for result in computed.results:
        record.report.timeline.append((result, computed.start - record.start, end - record.start, used))


def _sole_prefix(code: RepetitionCode, rank: int, open_ids: Sequence[int]) -> int:
    """How many of the first ``open_ids`` no other rank holds (without spare work, only ``rank`` can compute them).

    Chunks shrink so that whoever finishes first can take the tail; a task nobody else holds waits
    for this rank anyway, so the run of such tasks at the front (backups cover the riskier tail)
    goes in one chunk: one call's fixed cost instead of several, and a larger, faster batch.
    """
    count = 0
    for j in open_ids:
        if code.holders(j) != [rank]:
            break
        count += 1
    return count


def _checked_output(output: object, call: str, rank: int, slots: int) -> tuple[torch.Tensor, dict[int, float]]:
    """The result of ``call`` (``task_loss(j)`` or ``batch_loss([...])``) as (scalar loss, {slot: value}),
    or a TypeError that says what is wrong.

    ``task_loss`` returns the task's mean loss, or ``(loss, {slot: value})`` with other scalars to
    decode like the loss (each slot from ``CodedDataParallel.value_slot``).
    """
    values: dict[int, float] = {}
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        output, raw = output
        for slot, value in raw.items():
            if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < slots:
                raise TypeError(
                    f"codedgrad: {call} on rank {rank} returned a value for slot {slot!r}; slots are "
                    f"0..{slots - 1} (CodedDataParallel.value_slot(name) gives one)"
                )
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise TypeError(f"codedgrad: {call} on rank {rank}: value of slot {slot} is not a scalar")
                value = value.detach().item()
            values[slot] = float(value)  # type: ignore[arg-type]
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        shown = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else repr(output)[:80]
        raise TypeError(
            f"codedgrad: {call} on rank {rank} must return a scalar tensor (the mean loss of those tasks' "
            f"samples), got {shown}"
        )
    return output.reshape(()), values


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
