"""CodedDataParallel: the module face of the coded step (see docs/design.md, "The step protocol").

This file composes the parts; each has a file of its own:

* :mod:`~codedgrad.runtime.config`: :class:`EngineConfig`, validated and agreed by every rank;
* :mod:`~codedgrad.runtime.replan`: the plan of each step, agreed by fingerprint, and re-planning;
* :mod:`~codedgrad.runtime.coordinator`: the step protocol on the c10d Store;
* :mod:`~codedgrad.runtime.step`: one step in flight, its phase (:class:`StepPhase`) and report;
* :mod:`~codedgrad.runtime.compute`: this rank's tasks of a step (queue, spare work, commits);
* :mod:`~codedgrad.runtime.release`: the reduction of a decided step, and the release thread.

What stays here is the compute thread's side of a step: take the plan, begin the step, run this
rank's queue (each result committed and accumulated in one critical section), cover other ranks'
open work when that pays, then wait for the release (or reduce on this thread without it), and
apply the decoded gradient. A failure before the step is released fails it on every rank; after
that, the step completes everywhere and this rank applies it too.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from numbers import Real

import torch
import torch.distributed as dist
from torch import nn

from codedgrad.emulate import EmulationError, EmulationMode, Heterogeneity
from codedgrad.profile import WorkerProfile
from codedgrad.runtime.buffers import FlatGradients
from codedgrad.runtime.compute import MAX_OVERHEAD_SHARE, StepLoss, TaskRunner
from codedgrad.runtime.config import AUTO, ConfigurationError, EngineConfig, agree, describe_module
from codedgrad.runtime.coordinator import StepChannel, StepMismatchError, StoreCoordinator
from codedgrad.runtime.coordinator import weights_digest as _digest
from codedgrad.runtime.devices import DeviceSeat, SeatError, shared_devices
from codedgrad.runtime.direct import AGREEMENT_SLOTS, BucketLauncher, reduce_direct, step_key
from codedgrad.runtime.release import BufferShare, CollectiveFailed, Releaser, reduce_step
from codedgrad.runtime.replan import Plan, Planner
from codedgrad.runtime.step import NonFiniteGradientError, StepPhase, StepRecord, StepReport

__all__ = ["CodedDataParallel", "ConfigurationError", "NonFiniteGradientError", "StepReport"]

_instances: dict[tuple[int, ...], itertools.count] = {}  # per process group: engines built so far
_open_engines: weakref.WeakSet[CodedDataParallel] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    # A release thread still blocked in the Store, or a release process group destroyed by the
    # interpreter's teardown while its thread lives, aborts the process ("terminate called without an
    # active exception"). End them first, so a finished script exits 0 with or without close().
    for engine in list(_open_engines):
        engine._stop_release(join_timeout=5.0, destroy_group=True)


class CodedDataParallel(nn.Module):
    """Data parallelism with coded, heterogeneity-aware gradient computation and exact gradients.

    Wrap the model on every rank, then replace ``loss.backward()`` by ``cdp.backward(task_loss, tasks)``
    where ``task_loss(j)`` returns the mean loss of task j's samples and ``tasks`` is K (equal tasks)
    or the tasks' weights (their sample counts). Afterwards ``p.grad`` on every rank is the gradient
    of the weighted mean loss over the whole global batch, whichever ranks were slow, and the
    optimizer steps identically everywhere. :mod:`codedgrad.data` builds tasks from a data set.

    Exactness holds for a loss that is a mean over independent samples, as with gradient
    accumulation: a forward pass that mixes samples across the batch (BatchNorm in training mode,
    warned about at construction) or draws per-rank randomness (dropout without a per-task seed)
    computes a different function on tasks than on the whole batch. A parameter that no task used on
    any rank keeps its ``p.grad`` (None after ``zero_grad()``), as with DDP.

    Args:
        module: the model (its parameters and buffers are broadcast from rank 0 at construction).
        redundancy: ``"auto"`` (default) lets the planner choose Ω for each plan from the measured
            profiles (the least one within 2 % of the best simulated step), starting at 1.25; where
            ranks share a compute device (see ``spare_work``) it resolves to 1: a backup's compute
            would be taken from the rank it covers. The resolved setting is
            ``cdp.config.redundancy``. Or a number: Ω ≥ 1, the
            share of extra task slots (repetition; 1.05–1.3 is the useful range on a noisy cluster,
            see ``codedgrad plan``), or s + 1 for ``frc``/``cyclic`` (required there).
        gamma: weight of the second moment in the planner's cost (0 balances means only).
        code: ``"repetition"`` (default), ``"uncoded"``, ``"frc"`` or ``"cyclic"``.
        profiles: one :class:`WorkerProfile` per rank to start from; None starts homogeneous and
            re-plans from the measured task times after ``warmup_steps``.
        emulate: a :class:`~codedgrad.emulate.Heterogeneity` that adds emulated per-task delays;
            None reads ``CODEDGRAD_EMULATE`` from the environment (absent: no emulation).
        timeout: seconds a rank may wait *without progress from the others* before a
            :class:`CodedStepTimeout` naming what is missing. Its own compute never counts: a first
            step that compiles for minutes is fine.
        process_group: group for the coded all-reduce (default: the world). Several groups (e.g. the
            data-parallel groups of a 2-D layout) get separate Store namespaces.
        store: c10d Store for the step protocol (default: the default process group's store).
        name: the engine's Store namespace within its group; needed only when ranks build different
            numbers of engines (by default the n-th engine of a group on every rank is matched).
        replan_every: steps between profile exchanges (0 disables re-planning).
        replan_threshold: switch plans only when the predicted step time improves by more than this
            share; a switch that makes the measured step time worse is reverted.
        warmup_steps: steps measured before the first re-plan when no profiles are given.
        spare_work: once this rank's queue is dry and the step is not decided, compute other ranks'
            open tasks (repetition codes) when that can end the step sooner. ``"auto"`` (default): on
            unless ranks share a compute device (several ranks per GPU, or more threads than cores on
            a host), where a helper's compute is taken from the rank it helps (emulation in sleep
            mode keeps it on: sleeps take no compute); the resolved setting is
            ``cdp.config.spare_work`` and what is shared ``cdp.shared_devices``.
        no_wait: reduce on a release thread, with its own process group, as soon as the step is
            decided, so that no rank waits for another rank's task in flight (default). With a custom
            ``process_group`` only the synchronous step is available.
        broadcast_buffers: after every step give every rank rank 0's module buffers (carried by
            the release in step order, not a barrier of its own).
        bucket_cap_mb: largest flat gradient bucket of the coded all-reduce.
        max_steps_ahead: steps the release may complete for this rank while its compute thread is
            still inside an earlier one (a stall); each costs one gradient buffer while it lasts.
        nonfinite: ``"raise"`` (every rank raises :class:`NonFiniteGradientError` when the decoded
            gradient or loss is not finite, leaving ``p.grad`` untouched) or ``"keep"`` (write it,
            e.g. for ``torch.amp.GradScaler``, which then skips the step on every rank alike).
        value_slots: how many named scalars besides the loss a step can decode (``task_loss`` may
            return ``(loss, {cdp.value_slot("acc"): acc})``; ``report.values`` holds the global
            batch's weighted means); two elements of the first bucket each.
    """

    def __init__(
        self,
        module: nn.Module,
        redundancy: float | str = "auto",
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
        spare_work: bool | str = "auto",
        no_wait: bool = True,
        broadcast_buffers: bool = True,
        bucket_cap_mb: float = 25.0,
        max_steps_ahead: int = 4,
        nonfinite: str = "raise",
        value_slots: int = 16,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("CodedDataParallel needs torch.distributed: call init_process_group first")
        self.module = module
        self._group = process_group
        self._rank = dist.get_rank(process_group)
        self._world_size = dist.get_world_size(process_group)
        if store is None:
            store = dist.distributed_c10d._get_default_store()
        group_ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))
        if name is None:
            name = str(next(_instances.setdefault(group_ranks, itertools.count())))
        group_id = hashlib.sha256(repr(group_ranks).encode()).hexdigest()[:12]
        safe_timeout = timeout if isinstance(timeout, Real) and math.isfinite(timeout) and timeout > 0 else 300.0
        self._coordinator = StoreCoordinator(
            dist.PrefixStore(f"codedgrad/{_job_namespace()}/{group_id}/{name}", store),
            self._rank,
            self._world_size,
            safe_timeout,
        )
        # Validate locally, then agree: a bad setting on one rank fails every rank with its message,
        # before any collective.
        error, config, seat = None, None, None
        try:
            if emulate is None:
                emulate = Heterogeneity.from_env()
            config = EngineConfig(
                redundancy=redundancy, gamma=gamma, code=code, profiles=profiles, emulate=emulate,
                timeout=timeout, replan_every=replan_every, replan_threshold=replan_threshold,
                warmup_steps=warmup_steps, spare_work=spare_work, no_wait=no_wait,
                broadcast_buffers=broadcast_buffers, bucket_cap_mb=bucket_cap_mb,
                max_steps_ahead=max_steps_ahead, nonfinite=nonfinite, value_slots=value_slots,
            )  # fmt: skip
            config.check_world(self._world_size)
            if not any(p.requires_grad for p in module.parameters()):
                raise ConfigurationError("module: has no parameter that requires grad (nothing to train)")
        except (ConfigurationError, EmulationError) as exc:
            error = str(exc)
        try:  # published after the agreement; described now so that a failure is agreed, not waited for
            first = next((p for p in module.parameters() if p.requires_grad), None)
            seat = DeviceSeat.here(first.device if first is not None else torch.device("cpu"))
        except Exception as exc:
            error = error or f"module: could not describe its device ({type(exc).__name__}: {exc})"
        values = config.to_dict() if config is not None else {}
        if config is not None:
            # The release needs a group of its own and a second Store client; fall back to the
            # synchronous step where either is missing, the same way on every rank.
            values["no_wait"] = config.no_wait and process_group is None and self._coordinator.has_wait_client
            values.update(describe_module(module))
        agree(self._coordinator, "config", values, error)
        assert config is not None
        # What ranks share a device (one Store gather). Redundant work only pays with capacity that
        # would otherwise sit idle: where ranks share a device, a backup's or a helper's compute is
        # taken from the rank it covers, so spare_work="auto" is off and redundancy="auto" is Ω = 1
        # there, unless the emulation sleeps (a sleep takes nothing from the others).
        assert seat is not None
        self.shared_devices = self._find_shared_devices(seat)
        sleeps = config.emulate is not None and config.emulate.mode is EmulationMode.SLEEP
        idle_capacity = sleeps or not self.shared_devices
        if config.spare_work == AUTO:
            config = replace(config, spare_work=idle_capacity)
        if config.redundancy == AUTO and not idle_capacity:
            config = replace(config, redundancy=1.0)
        self.config = config
        self._no_wait = bool(values["no_wait"])
        _warn_about_batch_statistics(module)

        self._params = [p for p in module.parameters() if p.requires_grad]
        self._on_cuda = any(p.is_cuda for p in self._params)
        self._bucket_bytes = max(1, int(config.bucket_cap_mb * 2**20))
        self._free: list[FlatGradients] = []  # accumulators not in use (one per step in flight)
        self._free_lock = threading.Lock()
        self._broadcast(itertools.chain(module.parameters(), module.buffers()))
        # A rank's compute thread may be up to max_steps_ahead steps behind what its release reduces.
        behind = config.max_steps_ahead if self._no_wait else 0
        self._coordinator.steps_behind = behind
        self._planner = Planner(
            self._coordinator, config, self._rank, self._world_size, lag=behind + 1 if behind else 0
        )
        self._tasks = TaskRunner(
            self._params,
            self._rank,
            config,
            self._no_wait,
            self._on_cuda,
            record_task=self._planner.record_task,
            after_task=self._snapshot_buffers,
            mark_accumulated=self._mark_accumulated,
            min_chunk_weight=lambda: self._planner.min_chunk_weight(MAX_OVERHEAD_SHARE),
        )
        self._step = 0
        self._buffers_lock = threading.Lock()
        self._latest_buffers: list[torch.Tensor] = []
        self._buffer_share = self._make_buffer_share()
        self._release_group: dist.ProcessGroup | None = None
        self._release_stream: torch.cuda.Stream | None = None
        self._releaser: Releaser | None = None
        if self._no_wait:  # every rank agreed on it above, so every rank joins new_group
            self._release_group = dist.new_group(timeout=timedelta(seconds=config.timeout), backend=dist.get_backend())
            if self._on_cuda:
                self._release_stream = torch.cuda.Stream(device=self._params[0].device)
        self._slots: dict[str, int] = {}  # names of decoded values this rank has seen -> their slots
        self._broken: BaseException | None = None  # the release could not be ended: never reuse its buffers
        self._closed = False
        self.last_report: StepReport | None = None
        _open_engines.add(self)

    def _find_shared_devices(self, seat: DeviceSeat) -> list[str]:
        """Which ranks share a compute device, one line each (the same list on every rank)."""
        seats = []
        for rank, data in enumerate(self._coordinator.gather("devices", seat.to_bytes())):
            try:
                seats.append(DeviceSeat.from_bytes(data))
            except SeatError as error:  # the same bytes on every rank: every rank raises alike
                raise ConfigurationError(f"codedgrad: rank {rank}'s device in the Store: {error}") from None
        return shared_devices(seats)

    # ----------------------------------------------------------------- public API
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @property
    def step_index(self) -> int:
        """The index of the next step (steps completed or failed so far)."""
        return self._step

    @property
    def plan_version(self) -> int:
        plan = self._planner.plan
        return plan.version if plan is not None else -1

    @property
    def profiles(self) -> list[WorkerProfile] | None:
        """The profiles the current plan was built from."""
        plan = self._planner.plan
        if plan is not None:
            return list(plan.profiles)
        return list(self.config.profiles) if self.config.profiles is not None else None

    @property
    def plan(self) -> Plan | None:
        """The current plan (None before the first step)."""
        return self._planner.plan

    def value_slot(self, name: str, meta: dict | None = None) -> int:
        """The slot of a named scalar to decode with the loss, the same on every rank.

        The first rank to ask registers ``name`` (with ``meta``, any JSON-able description such as
        logging options) in the engine's Store namespace; every later caller, on any rank, gets the
        same slot. Ranks that never saw the name read it with :meth:`value_names`.

        Raises:
            ValueError: more names than ``value_slots``.
        """
        slot = self._slots.get(name)
        if slot is None:
            names = self._register_value(name, meta)
            slot = next(i for i, (known, _) in enumerate(names) if known == name)
            if slot >= self.config.value_slots:
                raise ValueError(
                    f"codedgrad: {name!r} would be value number {slot + 1}, but value_slots={self.config.value_slots}; "
                    "raise value_slots"
                )
            self._slots[name] = slot
        return slot

    def value_names(self) -> list[tuple[str, dict | None]]:
        """Every registered (name, meta), in slot order (one Store read)."""
        store = self._coordinator.store
        if not store.check(["values"]):
            return []
        return [(name, meta) for name, meta in json.loads(store.get("values"))]

    def _register_value(self, name: str, meta: dict | None) -> list[tuple[str, dict | None]]:
        store = self._coordinator.store
        current = store.compare_set("values", b"", b"[]")  # create-or-read
        if current == b"[]":
            self._coordinator.defer_until_close("values")
        while True:
            names = json.loads(current)
            if any(known == name for known, _ in names):
                return [tuple(entry) for entry in names]
            desired = json.dumps([*names, [name, meta]]).encode()
            answer = store.compare_set("values", current, desired)
            if answer == desired:
                return [tuple(entry) for entry in json.loads(desired)]
            current = answer  # another rank registered one meanwhile: try again on its list

    def planned_tasks(self) -> list[int]:
        """The tasks this rank's current plan computes, in order (primaries, then backups).

        A hint for prefetching a step's data (:meth:`codedgrad.data.TaskData.prefetch`); the next step
        may run under a new plan after a profile exchange, and spare work takes other tasks on demand.
        """
        plan = self._planner.plan
        return plan.planned_tasks() if plan is not None else []

    def backward(
        self,
        task_loss: Callable[[int], torch.Tensor] | None = None,
        tasks: int | Sequence[float] | None = None,
        *,
        batch_loss: Callable[[list[int]], torch.Tensor] | None = None,
    ) -> StepReport:
        """Run one coded step; afterwards ``p.grad`` is the gradient of the weighted mean loss.

        Give exactly one of ``task_loss`` and ``batch_loss``. With ``batch_loss`` the engine runs
        several of this rank's primary tasks in one call ("chunk"): large chunks first, shrinking
        towards the end of the step, so the fixed cost of a forward/backward is paid a few times
        per step rather than once per task, and the commits run while the next chunk computes.

        Args:
            task_loss: ``task_loss(j)`` returns the mean loss (a scalar tensor) of task j's samples.
                It is called only for the tasks this rank computes, in the plan's order.
            tasks: K, the number of equal tasks, or one weight per task (e.g. its number of
                samples or tokens; ≥ 0, not all 0). At least one task per rank. Every rank must
                pass the same value.
            batch_loss: ``batch_loss(ids)`` returns the mean loss over the union of the samples of
                tasks ``ids`` (a list, ascending within a chunk), i.e. the tasks' losses weighted by
                their weights (sample counts). Either loss may return ``(loss, {slot: value})``.

        Returns:
            This rank's :class:`StepReport`; ``report.loss`` is the decoded loss of the global batch.

        Raises:
            CodedStepError: the base of the three below: the step failed on every rank, nothing was
                applied, and the next ``backward`` may follow (catch this one to skip a failed step).
                The rank whose own task raised re-raises that exception instead.
            CodedStepTimeout: a rank made no progress for ``timeout`` seconds (the step failed everywhere).
            StepMismatchError: ranks passed different tasks or ran different plans (the step failed everywhere).
            NonFiniteGradientError: the decoded gradient is not finite (``nonfinite="raise"``; on every rank).
        """
        self._check_usable()
        start = time.perf_counter()
        loss = StepLoss(task_loss, batch_loss)
        if tasks is None:
            raise TypeError("codedgrad: backward() needs tasks (K, or one weight per task)")
        weights = _task_weights(tasks)
        self._snapshot_buffers()  # rank 0: buffers changed between steps (a load, a manual edit) are shared too
        plan = self._planner.plan_for(len(weights), self._step)
        digest = _digest(weights)
        step = self._step
        if self._planner.direct_ready:
            return self._direct_step(plan, weights, digest, loss, start)
        fresh = self._new_record(step, plan, weights, digest, start)
        if self._no_wait:
            releaser = self._releaser_for(step)
            releaser.skip_to(step)  # past the direct steps it did not serve
            record = releaser.claim(step, lambda: fresh)
        else:
            record = fresh
        if record is not fresh:
            self._release_accumulator(fresh.accumulator)
        channel = self._coordinator.channel(step, plan.code, plan.version, digest, wait=False)
        try:
            if record.ahead:  # the release began this step while this thread was in an earlier one
                self._join_ahead(record, channel, weights, digest, loss)
            else:
                with record.lock:  # not frozen yet, so the step's keys still exist: begin cannot recreate them
                    open_step = record.phase is StepPhase.RUNNING
                    if open_step:
                        channel.begin()
                if open_step:
                    self._tasks.run(record, channel, loss)
            self._wait_for_release(record, channel)
        except BaseException as error:
            completed = self._fail_or_complete(record, channel, error)
            if not completed:
                raise
            if not isinstance(error, Exception):  # Ctrl-C, SystemExit: stop, but leave the step done
                self._apply(record, start)
                raise
            # Every rank reduced this step without the failed work (it was decided before this
            # rank's task ended): applying it here too keeps all ranks on the same path.
            record.report.late_error = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"codedgrad: rank {self._rank}: {record.report.late_error}, after step {step} was decided without "
                "this rank's remaining work; the step completed exactly on every rank and is applied here too",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._apply(record, start)

    def close(self) -> None:
        """End the release thread, destroy its process group and delete this engine's Store keys.

        Call it on every rank once training is done (or use the engine as a context manager). A
        script that ends without it still exits cleanly: the release is stopped at exit.
        """
        if self._closed:
            return
        self._stop_release(join_timeout=max(5.0, self.config.timeout), destroy_group=True)
        self._closed = True
        _open_engines.discard(self)
        try:
            self._coordinator.close()
        except (RuntimeError, dist.DistError) as error:  # the Store went away first (e.g. at exit)
            warnings.warn(f"codedgrad: could not delete the engine's Store keys: {error}", RuntimeWarning, stacklevel=2)

    def __enter__(self) -> CodedDataParallel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ----------------------------------------------------------------- checkpoints
    def get_extra_state(self) -> dict:
        """The engine's state in ``state_dict()``: step index and plan (profiles, version)."""
        return {"format": 1, "step": self._step, "planner": self._planner.state_dict()}

    def set_extra_state(self, state: dict) -> None:
        """Restore :meth:`get_extra_state`: the next step re-agrees the saved plan, without warm-up."""
        if not isinstance(state, dict) or state.get("format") != 1:
            raise ValueError(f"codedgrad: not a CodedDataParallel state (got {type(state).__name__})")
        if self._releaser is not None and self._releaser.holds_steps():
            raise RuntimeError(
                "codedgrad: load_state_dict while the release holds steps completed ahead for this rank (it was "
                "stalled); load a state before training or right after a step on every rank"
            )
        self._stop_release(join_timeout=max(5.0, self.config.timeout))  # restarted at the restored step
        self._step = int(state["step"])
        self._planner.load_state_dict(state["planner"])
        self._snapshot_buffers()

    # ----------------------------------------------------------------- the compute thread's step
    def _direct_step(
        self, plan: Plan, weights: tuple[float, ...], digest: bytes, loss: StepLoss, start: float
    ) -> StepReport:
        """A step whose plan leaves nothing to decide: compute, then the all-reduce is the agreement.

        The release thread is idle meanwhile (no step was handed to it), so its process group, whose
        timeout is the engine's, carries the collective; without one (``no_wait=False``, or a custom
        process group), the engine's group does, with that group's timeout.
        """
        record = self._new_record(self._step, plan, weights, digest, start)
        record.report.direct = True
        group = self._release_group if self._release_group is not None else self._group
        error: BaseException | None = None
        launcher = BucketLauncher(record.accumulator, group)
        try:
            self._tasks.run_direct(record, loss, launcher)
        except BaseException as exc:  # take part in the collective anyway: the others fail at once
            error = exc
        key = step_key(record.step, plan.version, plan.fingerprint, digest)
        try:
            interrupted = reduce_direct(
                record, group, self._rank, self._world_size, key, error, launcher, self._buffer_share
            )
        except BaseException as failure:
            record.finish(StepPhase.FAILED, failure)
            if isinstance(failure, CollectiveFailed):
                self._broken = failure  # the group (or the buffers in its hands) may be unusable: stop here
            self._leave(record, failed=True, in_store=False)
            raise
        record.finish(StepPhase.REDUCED)
        self._coordinator.direct_step_done(record.step)
        report = self._apply(record, start)
        if interrupted is not None:  # Ctrl-C during the collective: stop, after the step every rank applied
            raise interrupted
        return report

    def _wait_for_release(self, record: StepRecord, channel: StepChannel) -> None:
        """The step's reduction: on the release thread (wait for it), or here (synchronous step)."""
        begin = time.perf_counter()
        if self._no_wait:
            # A release that will never end this record fails the step on every rank, not a wait for ever.
            releaser = self._releaser
            problem = "the release thread is gone" if releaser is None else releaser.wait_served(record)
            if problem is not None:
                raise RuntimeError(f"codedgrad: rank {self._rank}: {problem}")
        else:
            reduce_step(
                record, channel, self._group, self._rank, self._buffer_share, cleanup=self._coordinator.step_done
            )
        waited = time.perf_counter() - begin - record.report.allreduce_time
        record.report.time_waited += max(0.0, waited)
        if record.phase is StepPhase.FAILED:
            if isinstance(record.error, CollectiveFailed):
                self._broken = record.error  # as after a direct step's: the group may be unusable
            raise record.error if record.error is not None else RuntimeError("codedgrad: the step failed")

    def _join_ahead(
        self,
        record: StepRecord,
        channel: StepChannel,
        weights: tuple[float, ...],
        digest: bytes,
        loss: StepLoss,
    ) -> None:
        """The release began this step before this thread got here: compute in it if it is still open."""
        if record.digest != digest:
            raise StepMismatchError(
                f"codedgrad: rank {self._rank}: step {record.step} ran with other task weights on the other ranks "
                f"({record.digest.hex()} against this rank's {digest.hex()}); every rank must pass the same tasks"
            )
        with record.lock:
            if record.phase is not StepPhase.RUNNING:
                record.report.ahead = True
                return
            channel.begin()  # the keys exist: the release cannot freeze (and then delete) while we hold the lock
            record.weights = weights
            record.weights_total = math.fsum(weights)
            record.ahead = record.report.ahead = False
        self._tasks.run(record, channel, loss)

    def _fail_or_complete(self, record: StepRecord, channel: StepChannel, error: BaseException) -> bool:
        """After an error on this thread: fail the step on every rank, or find that it completed.

        If the release had not frozen the accumulator, the step fails here and now (RUNNING → FAILED
        under the lock, so the release can never arrive with it) and the others are woken. If it
        had, every rank goes on with the step; this waits for its end and says whether it completed.
        """
        failed_here = record.fail(error)
        if failed_here:
            try:
                channel.abandon(f"{type(error).__name__}: {error}")
            except Exception as store_error:
                warnings.warn(
                    f"codedgrad: could not abandon step {record.step}: {store_error}", RuntimeWarning, stacklevel=2
                )
            if not self._no_wait:
                record.finish(StepPhase.FAILED)
        deadline = time.monotonic() + 3 * self.config.timeout + 10
        while not record.done.wait(timeout=1.0):
            releaser = self._releaser
            if failed_here and (releaser is None or not releaser.will_serve(record.step)):
                # Failed under the lock before any freeze, so no thread holds the accumulator; and the
                # release, which ends such a record when it reaches the step, never will.
                record.finish(StepPhase.FAILED)
                break
            if time.monotonic() > deadline:
                self._broken = error  # a release thread still holds the accumulator: never reuse it
                return False
        if record.phase is StepPhase.REDUCED:
            return True
        self._leave(record, failed=True)
        return False

    def _apply(self, record: StepRecord, start: float) -> StepReport:
        """Write the reduced gradient (and rank 0's buffers) and leave the step (``start``: when
        ``backward`` was called)."""
        report = record.report
        if record.reduced_event is not None:
            torch.cuda.current_stream().wait_event(record.reduced_event)
        if report.finite or self.config.nonfinite == "keep":
            record.accumulator.write_to_params()
        if record.buffers is not None:
            with torch.no_grad():
                for buffer, value in zip(self.module.buffers(), record.buffers):
                    buffer.copy_(value)
            if self._rank == 0:
                self._snapshot_buffers()
        report.step_time = time.perf_counter() - start
        self._leave(record, failed=False)
        self.last_report = report
        if not report.finite and self.config.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"codedgrad: the decoded gradient of step {report.step} is not finite (loss {report.loss}); "
                "p.grad is left as it was on every rank. Use nonfinite='keep' with a GradScaler."
            )
        return report

    def _leave(self, record: StepRecord, failed: bool, in_store: bool = True) -> None:
        if failed and in_store:  # a direct step (in_store=False) has no keys to clean up
            self._coordinator.step_failed(record.step)
        self._planner.step_ended(
            None if failed or record.report.ahead else record.report.step_time, direct=record.report.direct
        )
        self._step = record.step + 1
        if self._releaser is not None:
            self._releaser.left(record.step)
        self._release_accumulator(record.accumulator)

    # ----------------------------------------------------------------- records and the release
    def _new_record(self, step: int, plan: Plan, weights: tuple[float, ...] | None, digest: bytes, start: float):
        accumulator = self._take_accumulator()
        record = StepRecord(
            step=step,
            plan=plan,
            weights=weights,
            digest=digest,
            accumulator=accumulator,
            report=StepReport(step=step, rank=self._rank, plan_version=plan.version, num_tasks=plan.num_tasks),
            start=start,
        )
        record.weights_total = math.fsum(weights) if weights is not None else 0.0
        self._mark_accumulated(record)
        return record

    def _record_ahead(self, step: int, version: int, digest: bytes) -> StepRecord | None:
        """A record for the release to serve ``step`` before this rank's compute thread gets there."""
        plan = self._planner.plan
        if plan is None or plan.version != version:
            return None  # another plan: the compute thread must take part in its agreement first
        record = self._new_record(step, plan, None, digest, time.perf_counter())
        record.ahead = True
        record.report.ahead = True
        return record

    def _releaser_for(self, step: int) -> Releaser:
        if self._releaser is None:
            assert self._release_group is not None
            self._releaser = Releaser(
                self._coordinator,
                self._release_group,
                self._rank,
                first_step=step,
                max_steps_ahead=self.config.max_steps_ahead,
                new_record=self._record_ahead,
                channel_for=self._release_channel,
                buffers=self._buffer_share,
                stream=self._release_stream,
            )
        return self._releaser

    def _release_channel(self, record: StepRecord) -> StepChannel:
        plan: Plan = record.plan  # type: ignore[assignment]
        return self._coordinator.channel(record.step, plan.code, plan.version, record.digest, wait=True)

    def _stop_release(self, join_timeout: float, destroy_group: bool = False) -> None:
        """End the release thread (it is restarted at the next step), and destroy its group if asked."""
        releaser, self._releaser = self._releaser, None
        if releaser is not None and not releaser.close(join_timeout):
            self._broken = RuntimeError("the release thread did not end in time")
            # It may still use its group: leave the group alone, now and at a later close() (destroying
            # a group under a thread inside one of its collectives aborts the process).
            self._release_group = None
            return
        group, self._release_group = (self._release_group, None) if destroy_group else (None, self._release_group)
        if group is not None and dist.is_initialized():
            try:
                dist.destroy_process_group(group)
            except (RuntimeError, ValueError) as error:  # already gone with the default group
                warnings.warn(
                    f"codedgrad: could not destroy the release's process group: {error}", RuntimeWarning, stacklevel=2
                )

    def _take_accumulator(self) -> FlatGradients:
        with self._free_lock:
            accumulator = self._free.pop() if self._free else None
        if accumulator is None:
            accumulator = FlatGradients(
                self._params, self._bucket_bytes, self.config.value_slots, AGREEMENT_SLOTS * self._world_size
            )
        else:
            accumulator.zero_()
        return accumulator

    def _release_accumulator(self, accumulator: FlatGradients) -> None:
        with self._free_lock:
            if len(self._free) <= self.config.max_steps_ahead:
                self._free.append(accumulator)

    def _mark_accumulated(self, record: StepRecord) -> None:
        """CUDA: let the release stream wait for what the compute stream has accumulated so far."""
        if self._release_stream is not None:
            record.accumulated_event = torch.cuda.Event()
            record.accumulated_event.record()

    # ----------------------------------------------------------------- module buffers
    def _make_buffer_share(self) -> BufferShare | None:
        buffers = list(self.module.buffers())
        if not (self.config.broadcast_buffers and buffers):
            return None
        source = dist.get_global_rank(self._group, 0) if self._group is not None else 0
        self._snapshot_buffers()
        return BufferShare(source, self._rank == 0, self._latest_snapshot, buffers)

    def _snapshot_buffers(self) -> None:
        """On rank 0: copy its buffers as they are after its last finished task (what the release shares)."""
        if self._rank != 0 or not self.config.broadcast_buffers:
            return
        buffers = [b.detach().clone() for b in self.module.buffers()]
        if buffers:
            with self._buffers_lock:
                self._latest_buffers = buffers

    def _latest_snapshot(self) -> list[torch.Tensor]:
        with self._buffers_lock:
            return [b.clone() for b in self._latest_buffers]

    # ----------------------------------------------------------------- helpers
    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("codedgrad: this engine is closed")
        if self._broken is not None:
            raise RuntimeError(f"codedgrad: this engine is unusable since an earlier step failed: {self._broken}")

    def _broadcast(self, tensors) -> None:
        source = dist.get_global_rank(self._group, 0) if self._group is not None else 0
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor.data, src=source, group=self._group)


def _job_namespace() -> str:
    """torchrun's run id, and its restart attempt where every worker counts it alike (one agent).

    Two jobs on one Store then never meet, nor does a restarted attempt meet the dead one's step keys.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "") if os.environ.get("GROUP_WORLD_SIZE") == "1" else ""
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{attempt}"


def _task_weights(tasks: int | Sequence[float]) -> tuple[float, ...]:
    """``tasks`` as one weight per task (K equal tasks: weight 1 each), validated."""
    if isinstance(tasks, bool):
        raise TypeError(f"codedgrad: tasks must be a number of tasks or a list of task weights, got {tasks!r}")
    if isinstance(tasks, int):
        if tasks < 1:
            raise ValueError(f"codedgrad: tasks: need at least one task, got {tasks}")
        return (1.0,) * tasks
    try:
        weights = tuple(float(w) for w in tasks)
    except (TypeError, ValueError):
        raise TypeError(
            f"codedgrad: tasks must be a number of tasks or a list of task weights, got {tasks!r}"
        ) from None
    if not weights:
        raise ValueError("codedgrad: tasks: the list of task weights is empty")
    for j, w in enumerate(weights):
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"codedgrad: tasks[{j}]: a task weight must be finite and >= 0, got {w}")
    if not math.fsum(weights) > 0:
        raise ValueError("codedgrad: tasks: the task weights sum to 0")
    return weights


def _warn_about_batch_statistics(module: nn.Module) -> None:
    """BatchNorm in training mode mixes samples across a task: the coded gradient is then not the
    whole batch's gradient (each task normalises with its own statistics)."""
    names = [
        name or type(m).__name__ for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    if names:
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        warnings.warn(
            f"codedgrad: {len(names)} BatchNorm layer(s) ({shown}) normalise each task with its own batch "
            "statistics, so the gradient is not the global batch's: use GroupNorm/LayerNorm, or put them in "
            "eval mode, for exact gradients (see docs/design.md, 'What breaks exactness')",
            UserWarning,
            stacklevel=3,
        )
