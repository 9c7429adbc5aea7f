"""The compute thread's work in one step: this rank's queue, then spare work.

Each result is computed into fresh gradients (the task's loss scaled by its weight share and the
code's coefficient, in the accumulator's precision), then committed with one compare-and-set and,
if the decoder uses it, added to the step's accumulator, both under the step's lock: the release
can never freeze the accumulator between a commit and its addition (see :mod:`~codedgrad.runtime.step`).
Once the queue is dry, an idle rank takes other ranks' open tasks when the spare-work policy
(:mod:`codedgrad.codes.spare`) says that can end the step sooner.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from codedgrad.codes import Work
from codedgrad.codes.spare import next_spare_check, spare_work
from codedgrad.runtime.config import EngineConfig
from codedgrad.runtime.coordinator import StepChannel
from codedgrad.runtime.replan import Plan
from codedgrad.runtime.step import StepPhase, StepRecord

__all__ = ["TaskRunner"]


class TaskRunner:
    """Runs one rank's tasks of a step on the compute thread.

    Args:
        params: the parameters whose gradients are computed.
        rank: this rank.
        config: the agreed configuration (spare work, emulation).
        no_wait: whether a release thread reduces the step (so a decision shows in the record's phase).
        on_cuda: synchronise the stream before a commit, so "committed" means "computed".
        record_task: called with each result's compute seconds per task (for the profiles).
        after_task: called after each result's compute (rank 0 snapshots its module buffers).
        mark_accumulated: called after each addition to the accumulator (CUDA stream order).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        rank: int,
        config: EngineConfig,
        no_wait: bool,
        on_cuda: bool,
        record_task: Callable[[float], None],
        after_task: Callable[[], None],
        mark_accumulated: Callable[[StepRecord], None],
    ) -> None:
        self._params = list(params)
        self._rank = rank
        self._config = config
        self._no_wait = no_wait
        self._on_cuda = on_cuda
        self._record_task = record_task
        self._after_task = after_task
        self._mark_accumulated = mark_accumulated

    def run(self, record: StepRecord, channel: StepChannel, task_loss: Callable[[int], torch.Tensor]) -> None:
        """This rank's queue, then spare work, committing each result as it is done."""
        plan: Plan = record.plan  # type: ignore[assignment]
        record.compute_busy = True
        try:
            queue = plan.queue
            for position, work in enumerate(queue):
                state = channel.state
                if record.phase is not StepPhase.RUNNING or state.decided:
                    record.report.purged += len(queue) - position
                    return
                if not state.is_needed(self._rank, work.result):
                    record.report.purged += 1
                    continue
                self._compute_and_commit(record, channel, work, task_loss)
        finally:
            record.compute_busy = False
        self._spare_work(record, channel, task_loss)

    def _spare_work(self, record: StepRecord, channel: StepChannel, task_loss: Callable[[int], torch.Tensor]) -> None:
        """Cover other ranks' open work while the code offers it and helping can end the step sooner."""
        plan: Plan = record.plan  # type: ignore[assignment]
        state = channel.state
        while self._config.spare_work and record.phase is StepPhase.RUNNING and not state.decided:
            # Whether helping pays is judged against the plan's task times, which must be measured
            # seconds for that; until they are, take whatever is open.
            elapsed = time.perf_counter() - record.start if plan.measured else None
            work = spare_work(state, self._rank, elapsed=elapsed)
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
                self._compute_and_commit(record, channel, work, task_loss)
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

    def _compute_and_commit(
        self, record: StepRecord, channel: StepChannel, work: Work, task_loss: Callable[[int], torch.Tensor]
    ) -> None:
        start = time.perf_counter()
        weights, total = record.weights, record.weights_total
        assert weights is not None
        grads: list[torch.Tensor | None] = [None] * len(self._params)
        loss_sum = 0.0
        values: dict[int, tuple[float, float]] = {}  # slot -> (Σ scale·value, Σ scale)
        for i, (task, coefficient) in enumerate(zip(work.tasks, work.coefficients)):
            if i > 0 and self._decided_meanwhile(record, channel):
                return  # a rank-level result the step no longer needs: decided while computing it
            task_start = time.perf_counter()
            scale = coefficient * weights[task] / total
            if weights[task] == 0:
                continue  # an empty task: nothing to compute, but its commit still counts
            loss, task_values = _checked_output(task_loss(task), task, self._rank, self._config.value_slots)
            if record.phase is not StepPhase.RUNNING:
                return  # released during the forward pass: the backward would be wasted
            try:
                task_grads = torch.autograd.grad(loss, self._params, allow_unused=True)
            except RuntimeError as error:
                if "does not require grad" in str(error):
                    raise TypeError(
                        f"codedgrad: task_loss({task}) on rank {self._rank} returned a loss that does not depend "
                        "on the module's parameters (computed under torch.no_grad(), or detached)"
                    ) from error
                raise
            # Scale in the accumulator's precision: bf16(w / W) would bias every gradient.
            _add_scaled(grads, task_grads, scale, record.accumulator.dtypes)
            loss_sum += scale * float(loss.detach())
            for slot, value in task_values.items():
                weighted, weight = values.get(slot, (0.0, 0.0))
                values[slot] = (weighted + scale * value, weight + scale)
            if self._config.emulate is not None:  # compute mode scales the task's measured compute
                if self._on_cuda and self._config.emulate.mode == "compute":
                    torch.cuda.current_stream().synchronize()
                record.report.emulated_seconds += self._config.emulate.sleep(
                    self._rank, record.step, record.tasks_run, compute_seconds=time.perf_counter() - task_start
                )
            record.tasks_run += 1
        if self._on_cuda:
            torch.cuda.current_stream().synchronize()  # commit means "done", and the timer must see it
        computed = time.perf_counter()
        self._after_task()
        used = False
        with record.lock:  # the release cannot freeze the accumulator between the commit and the addition
            if record.phase is StepPhase.RUNNING:
                trips = channel.commit_round_trips
                commit_start = time.perf_counter()
                used = channel.commit(work.result)
                record.report.commit_seconds.append(time.perf_counter() - commit_start)
                record.report.commit_round_trips += channel.commit_round_trips - trips
                if used:
                    record.accumulator.add_(grads, loss_sum, values)
                    record.accumulated.append(work.result)  # after the addition completed
                    self._mark_accumulated(record)
        end = time.perf_counter()
        record.report.computed += 1
        record.report.used += used
        record.report.task_seconds.append(end - start)
        record.report.timeline.append((work.result, start - record.start, end - record.start, used))
        # The profile is of compute alone: Store latency is the same for every rank and would
        # flatten the measured speed ratios (a fast rank's tasks look relatively slower).
        self._record_task((computed - start) / len(work.tasks))

    def _decided_meanwhile(self, record: StepRecord, channel: StepChannel) -> bool:
        if self._no_wait:
            return record.phase is not StepPhase.RUNNING  # the release watches the Store; no round trip
        return channel.refresh().decided


def _checked_output(output: object, task: int, rank: int, slots: int) -> tuple[torch.Tensor, dict[int, float]]:
    """``task_loss(task)``'s result as (scalar loss, {slot: value}), or a TypeError that says what is wrong.

    ``task_loss`` returns the task's mean loss, or ``(loss, {slot: value})`` with other scalars to
    decode like the loss (each slot from ``CodedDataParallel.value_slot``).
    """
    values: dict[int, float] = {}
    if isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], dict):
        output, raw = output
        for slot, value in raw.items():
            if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < slots:
                raise TypeError(
                    f"codedgrad: task_loss({task}) on rank {rank} returned a value for slot {slot!r}; slots are "
                    f"0..{slots - 1} (CodedDataParallel.value_slot(name) gives one)"
                )
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise TypeError(
                        f"codedgrad: task_loss({task}) on rank {rank}: value of slot {slot} is not a scalar"
                    )
                value = value.detach().item()
            values[slot] = float(value)  # type: ignore[arg-type]
    if not isinstance(output, torch.Tensor) or output.numel() != 1:
        shown = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else repr(output)[:80]
        raise TypeError(
            f"codedgrad: task_loss({task}) on rank {rank} must return a scalar tensor (the mean loss of task "
            f"{task}'s samples), got {shown}"
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
