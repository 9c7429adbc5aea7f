"""DropSlowest: synchronous SGD with backup workers on an all-reduce. Inexact.

Chen, Pan, Monga, Bengio, Jozefowicz, "Revisiting Distributed Synchronous SGD" (2016): run P workers,
use the gradients of the first P − b to finish each step and drop the b slowest. Here on an
all-reduce instead of a parameter server, with torch.distributed parts only:

* **Who finished.** Each rank computes its uniform share of the K tasks (as DDP splits them) as one
  batch, then appends its rank to the step's order list in the c10d Store (``store.append``) and
  increments the step's counter (``store.add``). The rank whose increment reaches P − b seals the
  step's gate ``go``; the contributors are the first P − b entries of the order list (every rank
  appended before it counted, so the list holds them by then, and every rank reads the same ones).
* **Joining the all-reduce without finishing.** Every rank must take part in the collective, but a
  dropped rank is by definition still computing. So each rank has a release thread with its own
  gloo group (collectives from two threads on one group can interleave and abort), as
  :class:`~codedgrad.CodedDataParallel` does. It waits for the gate and all-reduces: this rank's
  gradient scaled by its weight share among the contributors, or zeros when the rank was dropped,
  while its compute thread may still be inside the batch. The alternative, computing in chunks
  and checking the Store between them, would lose the one-batch efficiency of the baseline and
  would still make everyone wait for a stall inside a chunk (a real stall cannot be interrupted).
* **The leftover compute.** A dropped rank's compute thread finishes its batch (a forward/backward
  cannot be interrupted), finds the step already reduced and applies it, its own work discarded,
  as a backup worker's late gradient is discarded. If it is still behind when later steps begin,
  its release thread joins them too with zeros (at most ``max_steps_ahead``), and its compute thread
  applies them without computing when it gets there, which is what a worker that fetches the
  newest parameters does. A rank that enters a step the others already completed computes nothing.

Store keys of step t (under this instance's namespace): ``{t}/order``, ``{t}/count`` and ``{t}/gate``
(``go``, or why the step failed). A compute thread writes them only while its release has not yet
passed the gate of that step (both under the step's lock), so once the all-reduce is done no rank
writes them again and rank 0 deletes them; those of a failed step after the next step that
succeeds, or at :meth:`DropSlowest.close`.
"""

from __future__ import annotations

import atexit
import math
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

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
    uniform_shares,
    usable_timeout,
)
from codedgrad.emulate import Heterogeneity
from codedgrad.runtime.buffers import FlatGradients
from codedgrad.runtime.config import ConfigurationError
from codedgrad.runtime.coordinator import weights_digest
from codedgrad.runtime.hooks import coded_allreduce_
from codedgrad.runtime.release import StepRelease
from codedgrad.runtime.step import StepPhase

__all__ = ["DropReport", "DropSlowest"]

_open: weakref.WeakSet[DropSlowest] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # A release thread alive while the interpreter tears its process group down aborts the process.
    for baseline in list(_open):
        baseline.close()


@dataclass
class DropReport(BaselineReport):
    """:class:`BaselineReport` of a :class:`DropSlowest` step.

    Attributes:
        dropped: the ranks whose work of this step is not in the gradient.
        ahead: this rank applied the step without computing it (the others had completed it first).
        relative_error: with ``exact_check=True``, ‖g − g_exact‖ / ‖g_exact‖ of the applied gradient g
            against the whole global batch's gradient (NaN if a rank's loss failed); else None.
        exact_loss: with ``exact_check=True``, the whole global batch's loss.
        check_time: seconds the exact check took on this rank (it waits for every rank's batch).
        late_error: this rank's ``batch_loss`` raised after the step was decided without it: the
            step completed on every rank and was applied here too.
    """

    dropped: tuple[int, ...] = ()
    ahead: bool = False
    relative_error: float | None = None
    exact_loss: float | None = None
    check_time: float = 0.0
    late_error: str | None = None


@dataclass
class _Step:
    """One step as the compute thread and the release thread share it (phase changes under ``lock``).

    Its phase, as :class:`~codedgrad.runtime.step.StepPhase` says: RUNNING while the compute thread
    may still report this rank as finished; RELEASING once the release passed the gate (this rank's
    Store writes for the step are over); REDUCED with the gradient in ``reduced``; FAILED on every
    rank (``error`` says why).
    """

    step: int
    weights: tuple[float, ...] | None  # None: made by the release ahead of the compute thread
    accumulator: FlatGradients | None  # this rank's share's gradient (scaled by the release)
    phase: StepPhase = StepPhase.RUNNING
    busy: bool = False  # the compute thread is inside this step's batch (the release's timeout waits)
    reduced: FlatGradients | None = None
    contributors: tuple[int, ...] = ()
    digest: str = ""  # the contributors' task weights
    error: str | None = None
    ready_at: float = 0.0  # perf_counter() when the reduced gradient was ready
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, phase: StepPhase, error: str | None = None) -> None:
        with self.lock:
            self.phase, self.error, self.ready_at = phase, error, time.perf_counter()
        self.done.set()


class DropSlowest:
    """Synchronous data parallelism that drops the ``backups`` slowest ranks of every step. Inexact.

    Replace ``loss.backward()`` by ``baseline.backward(batch_loss, tasks)``. Each rank computes its
    uniform share of the K tasks as one batch; the gradient set in ``p.grad`` on every rank is the
    gradient of the weighted mean loss over the samples of the first P − ``backups`` ranks to finish
    (exact over what it used: the same as a single process on those samples), and the slowest
    ranks' work of the step is dropped. So the step never waits for the ``backups`` slowest ranks,
    but its gradient is not the global batch's: it is an unbiased estimate of it only when which
    ranks are slow is unrelated to their data. ``backward(..., exact_check=True)`` also all-reduces
    the exact gradient and reports the applied gradient's relative error against it (that check
    waits for every rank: use it on sampled steps). ``backups=0`` is plain synchronous SGD.

    Runs on the default process group and its Store, plus a gloo-compatible group of its own for
    the release thread. ``optimizer.step()`` steps identically everywhere.

    Args:
        module: the model (its parameters and buffers are broadcast from rank 0 at construction).
        backups: b, the ranks dropped each step (0 ≤ b < world size).
        emulate: emulated heterogeneity: after its batch's compute a rank sleeps
            :meth:`Heterogeneity.sleep_batch` of its share; None reads ``CODEDGRAD_EMULATE``.
        timeout: seconds a rank waits for P − b ranks to finish a step once its own batch is done
            (while it computes, the wait goes on); then the step fails on every rank with a message
            naming the ranks that had not finished. Also the release group's collective timeout.
        max_steps_ahead: steps the release thread may complete without this rank while its compute
            thread is still inside an earlier one.

    Raises:
        ConfigurationError: a bad setting on any rank, or ranks that disagree (on every rank, before
            any collective).

    Example::

        with DropSlowest(model, backups=1) as baseline:
            report = baseline.backward(lambda ids: loss_fn(model(*data.batch(ids))), data.weights)
            optimizer.step()                     # report.contributors: whose samples were used
    """

    def __init__(
        self,
        module: nn.Module,
        backups: int = 1,
        emulate: Heterogeneity | None = None,
        timeout: float = 300.0,
        max_steps_ahead: int = 4,
    ) -> None:
        namespace = open_namespace("drop_slowest", usable_timeout(timeout))
        self._store, self._coordinator, self._rank, self._world = namespace
        self.module = module
        emulation: list[Heterogeneity | None] = [None]

        def check() -> dict:
            if isinstance(backups, bool) or not isinstance(backups, int) or not 0 <= backups < self._world:
                raise ConfigurationError(
                    f"backups: must be an integer in [0, {self._world}) with {self._world} ranks (at least one "
                    f"rank's work must be used), got {backups!r}"
                )
            if isinstance(max_steps_ahead, bool) or not isinstance(max_steps_ahead, int) or max_steps_ahead < 0:
                raise ConfigurationError(f"max_steps_ahead: must be an integer >= 0, got {max_steps_ahead!r}")
            emulation[0] = resolve_emulation(emulate, self._world)
            return {
                "backups": backups,
                "timeout": check_timeout(timeout),
                "max_steps_ahead": max_steps_ahead,
                "emulate": None if emulation[0] is None else emulation[0].to_dict(),
            }

        agree_on_settings(self._coordinator, "DropSlowest", module, check)
        self.backups, self.timeout, self.max_steps_ahead = backups, float(timeout), max_steps_ahead
        self.emulate = emulation[0]
        self._needed = self._world - backups
        broadcast_module(module)
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._local = FlatGradients(self._params)  # the compute thread's batch gradient
        self._spare: list[FlatGradients] = []  # zero buffers the release reduces for dropped steps
        self._spare_lock = threading.Lock()
        self._step = 0
        self._closed = False
        self.last_report: DropReport | None = None
        group = dist.new_group(timeout=timedelta(seconds=self.timeout), backend=dist.get_backend())
        self._release = _Release(self, group)
        _open.add(self)

    @property
    def step_index(self) -> int:
        """The index of the next step (steps completed or failed so far)."""
        return self._step

    def backward(self, batch_loss: BatchLoss, tasks: int | Sequence[float], exact_check: bool = False) -> DropReport:
        """Run one step; afterwards ``p.grad`` is the gradient over the first P − b ranks' samples.

        Args:
            batch_loss: ``batch_loss(task_ids)`` returns the mean loss (a scalar tensor) over those
                tasks' samples; called once, with this rank's share, unless the step was completed
                before this rank began it.
            tasks: K equal tasks, or one weight per task (its sample count); at least one task per
                rank, and each rank's share of positive weight. Every rank must pass the same value.
            exact_check: also compute the exact gradient of the whole global batch (every rank
                finishes its batch, one more all-reduce) and report the relative error. Every rank
                must pass the same value.

        Raises:
            TypeError / ValueError: bad ``tasks`` (raised here, before the step touches the Store).
            BaselineStepError: a rank's ``batch_loss`` raised before the step was decided, or too few
                ranks finished within ``timeout``; on every rank, and the ranks stay in step.
        """
        if self._closed:
            raise RuntimeError("DropSlowest: backward after close()")
        weights = task_weights(tasks, self._world)
        shares = uniform_shares(len(weights), self._world)
        for r, share in enumerate(shares):
            if not math.fsum(weights[j] for j in share) > 0:
                raise ValueError(
                    f"tasks: rank {r}'s share (tasks {share.start}..{share.stop - 1}) has weight 0; "
                    "DropSlowest needs every rank's share to hold samples"
                )
        start = time.perf_counter()
        step, self._step = self._step, self._step + 1
        record = self._release.claim(step, lambda: _Step(step, weights, self._local))
        report = DropReport(step=step, rank=self._rank, ahead=record.weights is None)
        own = list(shares[self._rank])
        digest = weights_digest(weights).hex()
        error, snapshot = None, None
        needed = record.phase is StepPhase.RUNNING  # else: the step was completed without this rank
        try:
            if needed or exact_check:
                local = self._compute(record, step, batch_loss, own)
                report.computed = tuple(own)
                # The release scales and reduces ``local`` in place once this rank counts as finished.
                snapshot = [bucket.clone() for bucket in local] if exact_check else None
                self._report_finished(record, digest)
        except Exception as exc:
            error = f"rank {self._rank}: {type(exc).__name__}: {exc}"
            self._fail(record, error)
        except BaseException as exc:  # Ctrl-C: fail the step for everyone, then stop
            self._fail(record, f"rank {self._rank}: {type(exc).__name__}")
            raise
        computed_at = time.perf_counter()
        try:
            if exact_check:  # every rank calls it exactly once per checked step, whatever happened
                exact = self._exact_gradient(snapshot, weights, shares)
                report.check_time = time.perf_counter() - computed_at
            self._wait(record)
            if record.phase is not StepPhase.REDUCED:
                raise BaselineStepError(f"DropSlowest: step {step} failed on every rank: {record.error}")
            if record.digest != digest:
                raise BaselineStepError(
                    f"DropSlowest: rank {self._rank} passed other tasks to step {step} than the ranks that finished "
                    "it; every rank must pass the same tasks"
                )
            assert record.reduced is not None
            record.reduced.write_to_params()
            report.loss = float(record.reduced.loss)
            report.contributors = record.contributors
            report.dropped = tuple(r for r in range(self._world) if r not in record.contributors)
            report.tasks_used = tuple(j for r in record.contributors for j in shares[r])
            if exact_check:
                report.relative_error, report.exact_loss = _relative_error(record.reduced, exact)
                # The check waits for every rank: time the step until its gradient was ready here.
                ready = max(record.ready_at, computed_at if needed else start)
                report.step_time = max(0.0, ready - start)
            else:
                report.step_time = time.perf_counter() - start
            if error is not None:
                report.late_error = error
                warnings.warn(
                    f"DropSlowest: {error}, after step {step} was decided without this rank; the step completed on "
                    "every rank and is applied here too",
                    RuntimeWarning,
                    stacklevel=2,
                )
        finally:
            self._release.left(step)
            if record.reduced is not None and record.reduced is not self._local:
                with self._spare_lock:
                    self._spare.append(record.reduced)
        self.last_report = report
        return report

    def close(self) -> None:
        """End the release thread, destroy its process group and delete this instance's Store keys."""
        if self._closed:
            return
        self._closed = True
        _open.discard(self)
        if not self._release.close(max(5.0, self.timeout)):
            warnings.warn("DropSlowest: the release thread did not end in time", RuntimeWarning, stacklevel=2)
            return
        if dist.is_initialized():
            try:
                dist.destroy_process_group(self._release.group)
            except (RuntimeError, ValueError) as exc:
                warnings.warn(f"DropSlowest: could not destroy the release group: {exc}", RuntimeWarning, stacklevel=2)
            try:
                if self._rank == 0:
                    for step in self._release.stale:
                        self._delete_step(step)
                self._coordinator.close()
            except (RuntimeError, dist.DistError) as exc:  # the Store went away first (e.g. at exit)
                warnings.warn(f"DropSlowest: could not delete Store keys: {exc}", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> DropSlowest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the compute thread ------------------------------------------------------------------------

    def _compute(self, record: _Step, step: int, batch_loss: BatchLoss, own: list[int]) -> FlatGradients:
        """This rank's share as one batch, into ``self._local`` (unscaled: the mean over the share)."""
        local = self._local
        local.zero_()
        record.busy = True
        try:
            began = time.perf_counter()
            loss = loss_of(batch_loss(own), own)
            grads = torch.autograd.grad(loss, self._params, allow_unused=True)
            local.add_(grads, loss.detach())
            emulated_sleep(self.emulate, self._rank, step, len(own), 0, time.perf_counter() - began)
        finally:
            record.busy = False
        return local

    def _report_finished(self, record: _Step, digest: str) -> None:
        """Tell the Store this rank finished, unless the release has already passed the gate."""
        with record.lock:
            if record.phase is not StepPhase.RUNNING:
                return  # decided without this rank: its work is dropped
            self._store.append(f"{record.step}/order", f"{self._rank}:{digest};".encode())
            if self._store.add(f"{record.step}/count", 1) == self._needed:
                self._store.compare_set(f"{record.step}/gate", b"", b"go")

    def _fail(self, record: _Step, error: str) -> None:
        """Fail the step on every rank, unless it was already decided without this rank (then it completes)."""
        with record.lock:
            if record.phase is StepPhase.RUNNING:
                self._store.compare_set(f"{record.step}/gate", b"", f"failed: {error}"[:500].encode())

    def _wait(self, record: _Step) -> None:
        # The release's own waits are bounded (the gate by ``timeout``, the collective by the group's).
        problem = self._release.wait_served(record)
        if problem is not None:
            raise BaselineStepError(f"DropSlowest: {problem}")

    def _exact_gradient(
        self, local: list[torch.Tensor] | None, weights: tuple[float, ...], shares: list[range]
    ) -> FlatGradients:
        """The whole global batch's gradient: every rank's share weighted, all-reduced (default group)."""
        exact = FlatGradients(self._params)
        for target, source in zip(exact, local or exact):
            if local is None:  # this rank has no gradient (its loss failed): make the check NaN everywhere
                target.fill_(math.nan)
            else:
                target.copy_(source)
        total = math.fsum(weights)
        coefficient = math.fsum(weights[j] for j in shares[self._rank]) / total
        for bucket in exact:
            coded_allreduce_(bucket, coefficient, None)
        return exact

    def _delete_step(self, step: int, client: dist.Store | None = None) -> None:
        for what in ("order", "count", "gate"):
            (client or self._store).delete_key(f"{step}/{what}")

    def _zero_buffer(self) -> FlatGradients:
        with self._spare_lock:
            buffer = self._spare.pop() if self._spare else None
        if buffer is None:
            return FlatGradients(self._params)
        buffer.zero_()
        return buffer


def _relative_error(applied: FlatGradients, exact: FlatGradients) -> tuple[float, float]:
    """‖applied − exact‖ / ‖exact‖ over the parameters' gradients, and the exact loss."""
    difference = math.fsum(float((a.double() - e.double()).pow(2).sum()) for a, e in zip(applied.views, exact.views))
    norm = math.fsum(float(e.double().pow(2).sum()) for e in exact.views)
    return math.sqrt(difference) / math.sqrt(norm) if norm > 0 else math.nan, float(exact.loss)


class _Release(StepRelease[_Step]):
    """The release thread: waits for each step's gate and joins its all-reduce, in step order.

    The schedule is :class:`~codedgrad.runtime.release.StepRelease`'s: it serves the step the
    compute thread is in, or, while the compute thread is still inside an earlier step that this
    thread already completed, the next steps the others began (found by polling their gate), at
    most ``max_steps_ahead`` of them.
    """

    def __init__(self, owner: DropSlowest, group: dist.ProcessGroup) -> None:
        super().__init__(first_step=0, max_steps_ahead=owner.max_steps_ahead, name="codedgrad-drop-slowest-release")
        self._owner = owner
        self.group = group
        self._client = owner._store.clone()  # one Store client serialises its operations
        self.stale: list[int] = []  # failed steps' keys, deleted by rank 0 after the next success
        self._start()

    def _record_ahead(self, step: int) -> _Step | None:
        if not self._client.check([f"{step}/gate"]):
            return None
        return _Step(step, None, None, phase=StepPhase.RELEASING)

    def _serve_failed(self, record: _Step, error: BaseException) -> None:
        record.finish(StepPhase.FAILED, f"rank {self._owner._rank}'s release: {type(error).__name__}: {error}")

    def _serve(self, record: _Step) -> None:
        owner, step = self._owner, record.step
        gate = self._wait_gate(record)
        with record.lock:  # from here on the compute thread does not write this step's keys
            if record.phase is StepPhase.RUNNING:
                record.phase = StepPhase.RELEASING
        if gate != b"go":
            self.stale.append(step)
            record.finish(StepPhase.FAILED, gate.decode(errors="replace"))
            return
        entries = [e.split(":") for e in self._client.get(f"{step}/order").decode().split(";") if e]
        first = entries[: owner._needed]
        contributors = tuple(sorted(int(rank) for rank, _ in first))
        digests = {digest for _, digest in first}
        if len(digests) != 1:  # every rank reads the same list, so every rank refuses the step
            self.stale.append(step)
            record.finish(StepPhase.FAILED, f"the ranks that finished passed different tasks (ranks {contributors})")
            return
        if owner._rank in contributors:  # its compute thread reported finished: its batch is done
            assert record.weights is not None and record.accumulator is not None
            shares = uniform_shares(len(record.weights), owner._world)
            share_weight = [math.fsum(record.weights[j] for j in shares[r]) for r in range(owner._world)]
            coefficient = share_weight[owner._rank] / math.fsum(share_weight[r] for r in contributors)
            buffer = record.accumulator
        else:
            coefficient, buffer = 0.0, owner._zero_buffer()
        for bucket in buffer:
            coded_allreduce_(bucket, coefficient, self.group)
        record.reduced, record.contributors, record.digest = buffer, contributors, digests.pop()
        # Every rank passed this step's gate (and those of earlier failed steps) to enter the collective.
        if owner._rank == 0:
            for old in [*self.stale, step]:
                owner._delete_step(old, self._client)
            self.stale.clear()
        record.finish(StepPhase.REDUCED)

    def _wait_gate(self, record: _Step) -> bytes:
        """The gate of the step (``go`` or why it failed); after ``timeout`` without progress, seal it failed."""
        owner, step = self._owner, record.step
        key, count_key = f"{step}/gate", f"{step}/count"
        slice_ = max(min(owner.timeout / 2, 30.0), 0.05)  # c10d logs a warning for every wait that times out
        last_count, last_progress = -1, time.monotonic()
        while True:
            try:
                self._client.wait([key], timedelta(seconds=slice_))
                return self._client.get(key)
            except dist.DistStoreError:
                count = int(self._client.get(count_key)) if self._client.check([count_key]) else 0
                now = time.monotonic()
                if count != last_count or record.busy:
                    last_count, last_progress = count, now
                elif now - last_progress >= owner.timeout:
                    order = self._client.get(f"{step}/order").decode() if self._client.check([f"{step}/order"]) else ""
                    finished = sorted(int(e.split(":")[0]) for e in order.split(";") if e)
                    missing = [r for r in range(owner._world) if r not in finished]
                    message = (
                        f"rank {owner._rank} waited {owner.timeout:g} s without progress for {owner._needed} of "
                        f"{owner._world} ranks to finish step {step}; finished: {finished}, not finished: {missing}"
                    )
                    return self._client.compare_set(key, b"", f"failed: {message}".encode())
