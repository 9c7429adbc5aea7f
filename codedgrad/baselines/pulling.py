"""DynamicPulling: self-scheduling from a shared counter on the c10d Store, no plan. Exact.

Each step has one counter in the Store. A rank pulls the next ``chunk`` tasks with one
``store.add(counter, chunk)`` (the answer minus ``chunk`` is the first task it got), computes them as
one micro-batch, adds ``weight share · gradient`` to its accumulator, and pulls again until the
counter has passed K. Fast ranks simply pull more often, so no speed profile or plan is needed.
Every rank then publishes the tasks it computed, every rank checks that each task was computed
exactly once, and one SUM all-reduce per flat bucket gives every rank the exact gradient of the
global batch.

Store keys of step t (under this instance's namespace): ``{t}/next`` (the counter),
``{t}/arrived/{r}`` (rank r's tasks, or its error) and ``{t}/gate`` (``go``, or why the step was
abandoned: every rank enters the all-reduce or none does). Rank 0 deletes them right after the
all-reduce, when every rank is past them; those of a failed step after the next step that
succeeds, or at :meth:`DynamicPulling.close`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from codedgrad.baselines._common import (
    BaselineReport,
    BaselineStepError,
    BatchLoss,
    agree_on_settings,
    broadcast_module,
    check_timeout,
    emulated_sleep,
    loss_of,
    open_namespace,
    resolve_emulation,
    task_weights,
    usable_timeout,
)
from codedgrad.emulate import Heterogeneity
from codedgrad.runtime.buffers import FlatGradients
from codedgrad.runtime.config import ConfigurationError
from codedgrad.runtime.coordinator import wait_all, weights_digest
from codedgrad.runtime.step import CodedStepError

__all__ = ["DynamicPulling", "PullReport", "default_chunk"]

_STOP = 2**40  # added to the counter by a rank that failed: the others' next pull finds no task left


def default_chunk(num_tasks: int, world_size: int) -> int:
    """``max(1, K // (4P))``: about four pulls per rank per step on equal ranks (see :class:`DynamicPulling`)."""
    return max(1, num_tasks // (4 * world_size))


@dataclass
class PullReport(BaselineReport):
    """:class:`BaselineReport` of a :class:`DynamicPulling` step (every task is used: exact).

    Attributes:
        chunk: tasks per pull in this step.
        pulls: this rank's round trips to the counter (its last one found no task left).
        owners: for each task, the rank that computed it (the same on every rank).
    """

    chunk: int = 0
    pulls: int = 0
    owners: tuple[int, ...] = ()


class DynamicPulling:
    """Exact data parallelism by dynamic pulling of fixed-size chunks of tasks (self-scheduling).

    Replace ``loss.backward()`` by ``pulling.backward(batch_loss, tasks)``; afterwards ``p.grad`` on
    every rank is the gradient of the weighted mean loss over the **whole** global batch (exact, like
    DDP and the coded step), and ``optimizer.step()`` steps identically everywhere. Each rank pulls
    chunks of ``chunk`` tasks from a per-step counter on the c10d Store until none are left, so the
    work follows the ranks' speeds without a plan; the step ends when the last pulled chunk is done:
    a rank that stalls inside a chunk holds every rank (nothing is computed twice).

    **Choosing ``chunk``.** Each pull is one Store round trip (0.1–0.5 ms) and one micro-batch, so a
    chunk should last much longer than a round trip, and larger micro-batches use an accelerator
    better. But the step waits for the last chunk pulled, on whichever rank pulled it: the tail is up
    to one chunk on the slowest rank. The default ``K // (4P)`` gives about four pulls per rank on
    equal ranks; on unequal ranks choose the largest chunk whose time on the slowest rank is a small
    share (≲ 5–10 %) of the step, e.g. ``chunk = 1`` when a task already lasts tens of milliseconds.

    Exactness holds for a loss that is a mean over independent samples (``batch_loss(ids)`` is the
    mean over the union of those tasks' samples, weighted by ``tasks``), as in
    :class:`~codedgrad.CodedDataParallel`. Runs on the default process group and its Store.

    Args:
        module: the model (its parameters and buffers are broadcast from rank 0 at construction).
        chunk: tasks per pull (≥ 1), or None for :func:`default_chunk` of each step's K.
        emulate: emulated heterogeneity: after each chunk's compute the rank sleeps
            :meth:`Heterogeneity.sleep_batch` of that chunk (its n-th task of the step onwards);
            None reads ``CODEDGRAD_EMULATE`` (absent: no emulation).
        timeout: seconds a rank waits, once it found no task left, for the others to finish theirs;
            then every rank fails the step with a message naming the missing ranks.

    Raises:
        ConfigurationError: a bad setting on any rank, or ranks that disagree (on every rank, before
            any collective).

    Example::

        pulling = DynamicPulling(model, chunk=2)
        report = pulling.backward(lambda ids: loss_fn(model(*data.batch(ids))), data.weights)
        optimizer.step()
    """

    def __init__(
        self,
        module: nn.Module,
        chunk: int | None = None,
        emulate: Heterogeneity | None = None,
        timeout: float = 300.0,
    ) -> None:
        namespace = open_namespace("pulling", usable_timeout(timeout))
        self._store, self._coordinator, self._rank, self._world = namespace
        self.module = module
        emulation: list[Heterogeneity | None] = [None]

        def check() -> dict:
            if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
                raise ConfigurationError(f"chunk: must be an integer >= 1 or None, got {chunk!r}")
            emulation[0] = resolve_emulation(emulate, self._world)
            return {
                "chunk": chunk,
                "timeout": check_timeout(timeout),
                "emulate": None if emulation[0] is None else emulation[0].to_dict(),
            }

        agree_on_settings(self._coordinator, "DynamicPulling", module, check)
        self.chunk, self.timeout, self.emulate = chunk, float(timeout), emulation[0]
        broadcast_module(module)
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._accumulator = FlatGradients(self._params)
        self._step = 0
        self._stale: list[int] = []  # failed steps whose keys rank 0 deletes after the next success
        self._closed = False
        self.last_report: PullReport | None = None

    @property
    def step_index(self) -> int:
        """The index of the next step (steps completed or failed so far)."""
        return self._step

    def backward(self, batch_loss: BatchLoss, tasks: int | Sequence[float]) -> PullReport:
        """Run one step; afterwards ``p.grad`` is the exact gradient of the global batch's mean loss.

        Args:
            batch_loss: ``batch_loss(task_ids)`` returns the mean loss (a scalar tensor) over those
                tasks' samples; called once per chunk this rank pulls.
            tasks: K equal tasks, or one weight per task (its sample count). At least one task per
                rank. Every rank must pass the same value.

        Raises:
            TypeError / ValueError: bad ``tasks`` (raised here, before the step touches the Store).
            BaselineStepError: a rank's ``batch_loss`` raised, or a rank did not finish within
                ``timeout``; raised on every rank, and the ranks stay in step.
        """
        if self._closed:
            raise RuntimeError("DynamicPulling: backward after close()")
        weights = task_weights(tasks, self._world)
        start = time.perf_counter()
        step, self._step = self._step, self._step + 1
        num_tasks = len(weights)
        chunk = self.chunk or default_chunk(num_tasks, self._world)
        total = math.fsum(weights)
        report = PullReport(step=step, rank=self._rank, chunk=chunk)
        accumulator = self._accumulator
        accumulator.zero_()
        computed: list[int] = []
        error = None
        try:
            while True:
                first = self._store.add(f"{step}/next", chunk) - chunk
                report.pulls += 1
                if first >= num_tasks:
                    break
                ids = list(range(first, min(first + chunk, num_tasks)))
                began = time.perf_counter()
                loss = loss_of(batch_loss(ids), ids)
                grads = torch.autograd.grad(loss, self._params, allow_unused=True)
                share = math.fsum(weights[j] for j in ids) / total
                accumulator.add_([None if g is None else g * share for g in grads], loss.detach() * share)
                emulated_sleep(self.emulate, self._rank, step, len(ids), len(computed), time.perf_counter() - began)
                computed.extend(ids)
        except Exception as exc:
            error = f"rank {self._rank}: {type(exc).__name__}: {exc}"
            self._store.add(f"{step}/next", _STOP)  # the others stop pulling: this step fails anyway
        report.computed = tuple(computed)
        owners = self._arrive(step, weights, computed, error)
        for bucket in accumulator:
            dist.all_reduce(bucket)
        accumulator.write_to_params()
        report.loss = float(accumulator.loss)
        report.owners = tuple(owners)
        report.contributors = tuple(sorted(set(owners)))
        report.tasks_used = tuple(range(num_tasks))
        self._clean_up(step)
        report.step_time = time.perf_counter() - start
        self.last_report = report
        return report

    def close(self) -> None:
        """Delete this instance's Store keys (the last rank to close deletes the shared ones)."""
        if self._closed:
            return
        self._closed = True
        if self._rank == 0:
            for step in self._stale:
                self._delete_step(step)
        self._coordinator.close()

    def __enter__(self) -> DynamicPulling:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the end of a step -------------------------------------------------------------------------

    def _arrive(self, step: int, weights: tuple[float, ...], computed: list[int], error: str | None) -> list[int]:
        """Publish this rank's tasks (or error); every rank checks each task was computed once.

        Returns the rank that computed each task. Raises :class:`BaselineStepError` on every rank
        when a rank failed or timed out (none enters the all-reduce then).
        """
        num_tasks = len(weights)
        # The weights' digest lets every rank reach the same verdict when ranks passed different tasks.
        digest = weights_digest(weights).hex()
        arrival = b"E" + error.encode() if error else b"R" + json.dumps([digest, computed]).encode()
        self._store.set(f"{step}/arrived/{self._rank}", arrival)
        keys = [f"{step}/arrived/{r}" for r in range(self._world)]

        def owners_of(values: list[bytes]) -> tuple[list[int], list[int]]:
            count, owners = [0] * num_tasks, [-1] * num_tasks
            for r, value in enumerate(values):
                for j in json.loads(value[1:])[1]:
                    count[j] += 1
                    owners[j] = r
            return count, owners

        def audit(values: list[bytes]) -> str | None:
            for value in values:
                if value[:1] == b"E":
                    return value[1:].decode(errors="replace")
            digests = [json.loads(value[1:])[0] for value in values]
            if len(set(digests)) > 1:
                return f"ranks passed different tasks (weights digests by rank: {digests})"
            count, _ = owners_of(values)
            wrong = [j for j, c in enumerate(count) if c != 1]
            if wrong:  # the counter hands out each task once: a reset or shared Store key would show here
                return f"tasks {wrong[:8]} were computed {[count[j] for j in wrong[:8]]} times instead of once"
            return None

        try:
            values = wait_all(
                self._store, keys, f"{step}/gate", self.timeout, self._rank, f"at the end of step {step}", audit
            )
        except CodedStepError as exc:
            if self._rank == 0:
                self._stale.append(step)
            raise BaselineStepError(f"DynamicPulling: step {step} failed on every rank: {exc}") from None
        return owners_of(values)[1]

    def _clean_up(self, step: int) -> None:
        # After the all-reduce every rank is past every Store operation of this step (each had to
        # pass the gate to enter it), and past those of any earlier failed step.
        if self._rank != 0:
            return
        for old in [*self._stale, step]:
            self._delete_step(old)
        self._stale.clear()

    def _delete_step(self, step: int) -> None:
        for key in [f"{step}/next", f"{step}/gate", *(f"{step}/arrived/{r}" for r in range(self._world))]:
            self._store.delete_key(key)
