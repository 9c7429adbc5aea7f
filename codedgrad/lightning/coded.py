"""``strategy="coded"``: coded, heterogeneity-aware steps with exact gradients for an unchanged LightningModule.

Each optimizer step is one :class:`~codedgrad.runtime.CodedDataParallel` step over DDP's global batch
(docs/design.md, "Data"): the batch is cut into tasks, every rank computes the tasks of its plan (and others'
when that ends the step sooner), the first decodable set of results decides the step, and every rank
ends with the exact gradient of the global batch's mean loss, whichever ranks were slow.

What the strategy does with Lightning (Lightning 2.6; the internals are named where they are met):

* **Data.** The user's ``batch_size`` stays per device: a global batch is ``batch_size × world size``
  samples, the *same* global batches in the same order as ``strategy="ddp"``
  (:class:`codedgrad.data.GlobalBatchSampler`, built from the ``DistributedSampler`` Lightning put in
  the train DataLoader). Every rank iterates the same global batches, but as index-only handles
  (:class:`GlobalBatch`); the samples are loaded per task with the user's dataset and ``collate_fn``
  (:class:`codedgrad.data.TaskData`), only for the tasks the rank computes: its plan's tasks are
  prefetched on a background thread while the previous step runs, spare work loads on demand.
* **The step.** ``training_step`` runs the coded step: the user's ``LightningModule.training_step`` is
  called once per *chunk* with the chunk's collated batch (the engine's ``batch_loss``: a rank runs
  its primary tasks in a few chunks, large first, and backups and spare work one task at a time;
  the batch is built from the chunk's tasks' samples, :meth:`codedgrad.data.TaskData.batch`),
  after ``on_before_batch_transfer``, ``transfer_batch_to_device``, ``on_after_batch_transfer``
  and the precision plugin's input conversion, inside its autocast context; its loss is the
  chunk's mean loss. No DDP wrapper: its reducer would all-reduce on every backward
  (docs/design.md, "Facts about the stack").
* **Gradients.** Lightning's automatic-optimization closure zeroes gradients between
  ``training_step`` and ``backward`` (``loops/optimization/automatic.py``, ``Closure.closure``): the
  decoded gradient is kept aside and put back in :meth:`CodedStrategy.backward`, which receives a
  placeholder loss holding the decoded global loss (no graph). ``on_before_backward`` sees that loss,
  ``on_after_backward``, gradient clipping and the optimizer see the exact global gradient.
  ``LightningModule.backward`` is not called (the engine runs the backward passes).
* **No per-step barrier.** Lightning broadcasts a SIGTERM flag from rank 0 at the start of every
  training step (``loops/training_epoch_loop.py``, ``_TrainingEpochLoop._broadcast_sigterm_tensor``,
  a ``torch.distributed.broadcast`` on the default group: a barrier in practice), and its SIGTERM
  handler broadcasts too (``trainer/connectors/signal_connector.py``, ``_sigterm_notifier_fn``). Both
  are replaced while fitting: a SIGTERM on any rank is published through the c10d Store with a stop
  step far enough ahead that no rank has begun it, and every rank stops cleanly at the start of that
  step (at most ``max_steps_ahead + 2`` steps after the signal), after the same completed steps.
* **Logging.** ``self.log`` calls made by the user's ``training_step`` are recorded per chunk and
  logged once per step. A scalar logged with the default mean reduction is **decoded with the
  gradient** (the engine's value slots, ``CodedDataParallel.value_slot``): every rank logs the global
  batch's value, weighted by the tasks' sample counts, at every step, also a rank that computed none
  of the step's tasks, which learns the key's name and options from the engine's registry. So
  ``sync_dist=True`` values are exact and the same on every rank with no collective inside the step
  (a scheduler or callback monitoring them decides alike everywhere). Other values (``reduce_fx``
  sum, max, min or a callable, torchmetrics objects) are aggregated over the tasks this rank computed;
  epoch-level aggregation still reduces across ranks at the epoch's end.
* **Checkpoints.** The engine's state (step index, plan, profiles) is stored under
  :data:`CHECKPOINT_KEY` and restored on resume; the module's ``state_dict`` stays the user's. The
  train loader is resumable (Lightning's ``state_dict``/``load_state_dict`` of a loader): a checkpoint
  saved mid-epoch records the global batches trained so far, and a resumed fit skips them, so it
  continues with the next global batch exactly (docs/reliability.md).
* **Evaluation.** Validation, test and predict loops are DDP's (``DistributedSampler`` shards, metrics
  weighted by sample counts by Lightning); they are not coded.

Example::

    import codedgrad.lightning  # registers "coded"

    trainer = Trainer(strategy="coded", devices=4)
    trainer = Trainer(strategy=CodedStrategy(redundancy=1.5, num_tasks=32), devices=4)
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.plugins.precision import MixedPrecision
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from codedgrad.data import GlobalBatchSampler, TaskData, split_tasks
from codedgrad.emulate import EmulationError, Heterogeneity
from codedgrad.lightning.base import CodedgradStrategy, destroy_at_exit
from codedgrad.lightning.checks import check_accumulation, check_clock_triggers
from codedgrad.lightning.sampling import ResumableLoader, global_batches_of
from codedgrad.profile import WorkerProfile
from codedgrad.runtime import CodedDataParallel, ConfigurationError, EngineConfig, StepReport

__all__ = ["CHECKPOINT_KEY", "CodedStrategy", "GlobalBatch"]

CHECKPOINT_KEY = "codedgrad_coded"
"""Where the strategy's state (the engine's step index and plan) is stored in a Lightning checkpoint."""

TASKS_PER_RANK = 4
"""The default number of tasks per rank (``num_tasks=None``), capped at the global batch size."""

# DDPStrategy arguments that make sense without the DDP wrapper; any other is refused.
_BASE_ARGUMENTS = (
    "accelerator",
    "parallel_devices",
    "cluster_environment",
    "checkpoint_io",
    "precision_plugin",
    "process_group_backend",
    "start_method",
)
_fits = itertools.count()  # per process: the n-th fit of every rank shares a Store namespace


class GlobalBatch:
    """What Lightning passes around as the training batch: one global batch, by index.

    The samples are loaded per task (:attr:`data`), only on the ranks that compute the task. Iterating
    yields the indices as a tensor, so Lightning infers the global batch size from it.

    Attributes:
        indices: the global batch's dataset indices (DDP's global batch, rank order).
        data: the batch cut into its non-empty tasks, loaded on demand.
        weights: the sample count of each of the step's tasks (trailing zeros: empty tasks of a batch
            smaller than the number of tasks).
        position: (epoch, index of the global batch in the epoch).
    """

    __slots__ = ("data", "indices", "position", "weights")

    def __init__(
        self, indices: list[int], data: TaskData, weights: list[int], position: tuple[int, int] = (0, 0)
    ) -> None:
        self.indices = indices
        self.data = data
        self.weights = weights
        self.position = position

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield torch.tensor(self.indices)

    def __repr__(self) -> str:
        return f"GlobalBatch(samples={len(self.indices)}, tasks={len(self.weights)})"


class _GlobalBatches:
    """The ``batch_sampler`` of the index-only train DataLoader: DDP's global batches.

    Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` (the :class:`GlobalBatchSampler`).
    ``positions`` holds the (epoch, index) of each batch yielded and not yet collated, oldest first.
    """

    def __init__(self, sampler: GlobalBatchSampler) -> None:
        self.sampler = sampler
        self.positions: deque[tuple[int, int]] = deque()
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained in it)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def resume_at(self, epoch: int, done: int) -> None:
        """Let the next pass over ``epoch`` start after its first ``done`` batches (a mid-epoch resume)."""
        self._resume = (epoch, done)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.sampler.epoch
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == epoch else 0
        self.positions.clear()  # batches read ahead by an abandoned pass are never collated
        for t, batch in enumerate(self.sampler):
            if t >= skip:
                self.positions.append((epoch, t))
                yield batch


class _Indices:
    """A map-style dataset of its own indices (the index-only train DataLoader reads nothing)."""

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> int:
        return index


class _LoggedKey:
    """What the user's ``self.log(name, ...)`` calls of one step recorded, task by task."""

    __slots__ = ("kwargs", "values")

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs
        self.values: list[tuple[Any, float]] = []  # (value, task weight)


class CodedStrategy(CodedgradStrategy):
    """Coded, heterogeneity-aware data parallelism with exact gradients, for an unchanged LightningModule.

    ``Trainer(strategy="coded")`` or ``Trainer(strategy=CodedStrategy(...))``. The user's
    ``training_step(batch, batch_idx)`` returns the mean loss of the batch it is given (or a dict with
    ``"loss"``); it is called once per chunk of tasks (one or several tasks' samples). Supported:
    automatic optimization, one map-style train DataLoader whose sampler Lightning makes a
    ``DistributedSampler`` (the default ``use_distributed_sampler=True``), no gradient accumulation,
    no SyncBatchNorm; checked precisions
    ``64-true``, ``32-true``, ``bf16-mixed`` (``16-mixed`` scales each task's loss with the GradScaler's
    scale and lets the scaler skip non-finite steps). Anything else raises at setup, on every rank,
    before any collective.

    The train DataLoader's ``num_workers`` are not used: the samples are read per task on a background
    thread of each rank (its planned tasks, while the previous step runs).

    Args:
        num_tasks: tasks per global batch (K). None: ``4 × world size``, at most the global batch size.
            A batch smaller than K (a ragged last batch) gets trailing empty tasks.
        redundancy: ``"auto"`` (default, repetition code): the planner chooses Ω for each plan from
            the measured profiles (the least Ω within 2 % of the best simulated step), starting at
            1.25 until task times are measured; 1 where ranks share a compute device (see
            ``spare_work``). Or a number: Ω ≥ 1, the share of extra task slots
            (``repetition``; useful range 1.05–1.3 on a noisy cluster, see ``codedgrad plan``), or
            s + 1 (``frc``, ``cyclic``).
        code: ``"repetition"`` (default), ``"uncoded"``, ``"frc"`` or ``"cyclic"``.
        gamma: the planner's weight of the second moment of task times.
        profiles: a starting :class:`~codedgrad.profile.WorkerProfile` per rank (per-task times); None
            starts homogeneous and re-plans from measured task times.
        emulate: emulated heterogeneity (tests and benchmarks, per task); None reads ``CODEDGRAD_EMULATE``.
        timeout: seconds a rank may wait without progress from the others in a coded step; also the
            process group's timeout for Lightning's own collectives (validation, checkpoints).
        replan_every: steps between profile exchanges (0: never re-plan).
        replan_threshold: re-plan only when the predicted step time improves by more than this share.
        spare_work: let an idle rank compute other ranks' open tasks when that ends the step sooner;
            ``"auto"`` (default): unless ranks share a compute device (sleep-mode emulation keeps it on).
        max_steps_ahead: steps the release may complete for a stalled rank meanwhile.
        bucket_cap_mb: largest flat gradient bucket of the all-reduce, as DDP's: where a step has
            nothing to decide (Ω = 1, no spare work) each bucket is reduced as soon as the last
            chunk's backward has filled it, so smaller buckets overlap more of the all-reduce with the
            backward, and larger ones cost fewer collectives.
        **kwargs: :class:`~pytorch_lightning.strategies.DDPStrategy`'s ``accelerator``,
            ``parallel_devices``, ``cluster_environment``, ``checkpoint_io``, ``precision_plugin``,
            ``process_group_backend``, ``start_method`` (DDP wrapper arguments are refused: there is
            no DDP wrapper).

    Raises:
        ValueError: an invalid argument (the message names it), or an argument of the DDP wrapper.
    """

    strategy_name = "coded"
    description = "Coded, heterogeneity-aware steps with exact gradients (codedgrad)"
    checkpoint_key = CHECKPOINT_KEY

    def __init__(
        self,
        num_tasks: int | None = None,
        redundancy: float | str = "auto",
        code: str = "repetition",
        gamma: float = 1.0,
        profiles: Sequence[WorkerProfile] | None = None,
        emulate: Heterogeneity | None = None,
        timeout: float = 300.0,
        replan_every: int = 50,
        replan_threshold: float = 0.1,
        spare_work: bool | str = "auto",
        max_steps_ahead: int = 4,
        bucket_cap_mb: float = 25.0,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(k for k in kwargs if k not in _BASE_ARGUMENTS)
        if unknown:
            raise ValueError(
                f"{unknown[0]}: strategy='coded' does not wrap the module in DistributedDataParallel, so DDP's "
                f"arguments do not apply (accepted besides its own: {', '.join(_BASE_ARGUMENTS)})"
            )
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1):
            raise ValueError(f"num_tasks: must be an integer >= 1 or None, got {num_tasks!r}")
        if emulate is None:
            emulate = Heterogeneity.from_env()
        try:  # every engine setting, validated here (the engine agrees them across ranks again at setup)
            config = EngineConfig(
                redundancy=redundancy, gamma=gamma, code=code, profiles=profiles, emulate=emulate,
                timeout=timeout, replan_every=replan_every, replan_threshold=replan_threshold,
                spare_work=spare_work, max_steps_ahead=max_steps_ahead, bucket_cap_mb=bucket_cap_mb,
            )  # fmt: skip
        except EmulationError as error:
            raise ValueError(f"emulate: {error}") from None
        super().__init__(timeout=timedelta(seconds=config.timeout), **kwargs)
        self._num_tasks_arg = num_tasks
        self._config = config
        self._engine: CodedDataParallel | None = None
        self._restored: dict[str, Any] | None = None  # engine state from a checkpoint, for the next engine
        self._num_tasks: int | None = None  # K of this fit (known with the train DataLoader)
        self._dataset: Any = None
        self._collate_fn: Any = None
        self._pin_memory = False
        self._open_data: list[TaskData] = []
        self._params: list[torch.nn.Parameter] = []  # the engine's parameters (those that require grad)
        self._pending_grads: list[tuple[torch.nn.Parameter, torch.Tensor | None]] | None = None
        self._local_sync = False
        self._last_logged: dict[str, tuple[Any, dict[str, Any]]] = {}
        self._last_report: StepReport | None = None
        self._loaded: dict[int, int] = {}
        self._steps = 0
        self._train_batches: _GlobalBatches | None = None
        self._trained: tuple[int, int] | None = None  # (epoch, global batches of it trained on)
        self._stop_store: dist.Store | None = None
        self._stop_at: int | None = None
        self._sigterm = False  # this rank received SIGTERM during the current fit
        self._slot_meta: dict[int, tuple[str, dict[str, Any] | None]] = {}  # decoded keys: slot -> (name, options)
        self._patched: list[tuple[object, str]] = []

    # -- what users, tests and the recipes' monitor read ----------------------------------------

    @property
    def engine(self) -> CodedDataParallel | None:
        """The engine of the current fit (None outside ``fit``, and after teardown)."""
        return self._engine

    @property
    def last_report(self) -> StepReport | None:
        """The :class:`~codedgrad.runtime.StepReport` of this rank's latest training step."""
        return self._last_report

    @property
    def num_tasks(self) -> int | None:
        """K, the tasks per global batch of the current fit (None before the train DataLoader)."""
        return self._num_tasks

    @property
    def profiles(self) -> list[WorkerProfile] | None:
        """The per-task profiles of the current plan (the given ones before the first step)."""
        if self._engine is not None:
            return self._engine.profiles
        return None if self._config.profiles is None else list(self._config.profiles)

    @property
    def split(self) -> list[int] | None:
        """Tasks assigned to each rank by the current plan (primaries and backups), or None."""
        plan = self._engine.plan if self._engine is not None else None
        if plan is None:
            return None
        return [sum(len(work.tasks) for work in plan.code.queue(rank)) for rank in range(self.world_size)]

    @property
    def loaded(self) -> dict[int, int]:
        """How often this rank read each dataset index for training steps in this fit."""
        return dict(self._loaded)

    @property
    def stop_step(self) -> int | None:
        """The step at whose start every rank stops after a SIGTERM (None: no SIGTERM seen)."""
        return self._stop_at

    # -- set-up -----------------------------------------------------------------------------------

    @override
    def setup_environment(self) -> None:
        # Settings the strategy cannot honour fail here: on every rank (they are the same everywhere),
        # before the process group exists, so no rank can be left waiting in a collective.
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            self._check_fit_settings(trainer)
        created = not (dist.is_available() and dist.is_initialized())
        super().setup_environment()
        if created:
            destroy_at_exit()

    def _check_fit_settings(self, trainer: Any) -> None:
        module = self.lightning_module
        if not module.automatic_optimization:
            raise ValueError(
                "automatic_optimization: strategy='coded' supports automatic optimization only (it runs the "
                "backward passes of each task itself); set automatic_optimization = True or use strategy='ddp'"
            )
        check_accumulation(trainer, "coded")
        check_clock_triggers(trainer, "coded")
        if self._layer_sync is not None:
            raise ValueError(
                "sync_batchnorm: strategy='coded' cannot synchronise batch statistics (ranks compute different "
                "tasks at different times); use GroupNorm/LayerNorm, or strategy='ddp'"
            )
        if not trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "use_distributed_sampler: strategy='coded' builds DDP's global batches from the DistributedSampler "
                "Lightning puts in the train DataLoader; leave Trainer(use_distributed_sampler=True)"
            )
        try:
            self._config.check_world(self.num_nodes * self.num_processes)
        except ConfigurationError as error:
            raise ValueError(str(error)) from None

    @override
    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._steps = 0
            self._stop_at = None
            self._sigterm = False
            self._last_logged = {}
            self._slot_meta = {}
            self._loaded = {}
            self._last_report = None
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            self._patch_lightning(trainer)

    @override
    def configure_ddp(self) -> None:
        # DDPStrategy.setup calls this while fitting, after the precision conversion and the move to
        # the device: build the engine instead of the DDP wrapper (the model stays the LightningModule).
        config = self._config
        precision = self.precision_plugin
        scaled = isinstance(precision, MixedPrecision) and precision.scaler is not None
        self._engine = CodedDataParallel(
            self.lightning_module,
            redundancy=config.redundancy,
            gamma=config.gamma,
            code=config.code,
            profiles=config.profiles,
            emulate=config.emulate,
            timeout=config.timeout,
            replan_every=config.replan_every,
            replan_threshold=config.replan_threshold,
            spare_work=config.spare_work,
            max_steps_ahead=config.max_steps_ahead,
            bucket_cap_mb=config.bucket_cap_mb,
            nonfinite="keep" if scaled else "raise",  # a GradScaler skips non-finite steps on every rank alike
        )
        self._params = [p for p in self.lightning_module.parameters() if p.requires_grad]
        if self._restored is not None:
            self._engine.set_extra_state(self._restored["engine"])
            self._restored = None

    def _patch_lightning(self, trainer: Any) -> None:
        """Replace Lightning's per-step SIGTERM broadcast and its handler's broadcast (see the module doc)."""
        store = dist.distributed_c10d._get_default_store()
        self._stop_store = dist.PrefixStore(f"codedgrad/lightning/coded/{next(_fits)}", store)
        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._broadcast_sigterm_tensor = self._check_sigterm
        signals = trainer._signal_connector
        signals._sigterm_notifier_fn = self._notify_sigterm
        self._patched = [(epoch_loop, "_broadcast_sigterm_tensor"), (signals, "_sigterm_notifier_fn")]

    def _notify_sigterm(self, signum: int, frame: Any) -> None:
        """Lightning's SIGTERM notifier without its broadcast, and without setting ``trainer.received_sigterm``.

        Lightning's loops stop at once on a rank where that is set (``training_epoch_loop.py`` and
        ``fit_loop.py``, ``on_advance_end``), which would leave the other ranks inside a step; it is set on
        every rank at the agreed stop step instead (:meth:`_check_sigterm`).
        """
        if not self._sigterm and self.launcher is not None:
            self.launcher.kill(signum)
        self._sigterm = True

    def _check_sigterm(self) -> None:
        """At the start of a training step: publish a SIGTERM, and stop at the agreed step on every rank."""
        store, step = self._stop_store, self._steps
        if store is None:
            return
        if self._stop_at is None:
            if self._sigterm:
                # No rank can have begun a step later than this rank's step + max_steps_ahead + 1 (the
                # release completes at most max_steps_ahead steps for a rank that has not reached them).
                proposal = str(step + self._config.max_steps_ahead + 2)
                self._stop_at = int(store.compare_set("stop_at", "", proposal).decode())
            elif store.check(["stop_at"]):
                self._stop_at = int(store.get("stop_at").decode())
        if self._stop_at is not None and step >= self._stop_at:
            self.lightning_module.trainer._signal_connector.received_sigterm = True
            raise SIGTERMException()

    # -- data -------------------------------------------------------------------------------------

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return super().process_dataloader(dataloader)  # evaluation and prediction: as DDP
        global_batches = global_batches_of(
            dataloader,
            self.world_size,
            self.global_rank,
            "coded",
            "any rank may compute any task of a global batch and loads its samples by index",
        )
        full = dataloader.batch_size * self.world_size  # type: ignore[operator]
        if self._num_tasks_arg is None:
            self._num_tasks = min(full, TASKS_PER_RANK * self.world_size)
        elif self._num_tasks_arg > full:
            raise ValueError(
                f"num_tasks: {self._num_tasks_arg} tasks cannot be cut from a global batch of {full} samples "
                f"(batch_size {dataloader.batch_size} × {self.world_size} ranks); use at most {full}"
            )
        else:
            self._num_tasks = self._num_tasks_arg
        self._dataset = dataloader.dataset
        self._collate_fn = dataloader.collate_fn
        self._pin_memory = bool(dataloader.pin_memory) and self.root_device.type == "cuda"
        self._train_batches = _GlobalBatches(global_batches)
        return ResumableLoader(
            _Indices(len(dataloader.dataset)),  # type: ignore[arg-type]
            batch_sampler=self._train_batches,
            collate_fn=self._open_batch,
            num_workers=0,
            progress=self._train_progress,
        )

    def _train_progress(self) -> dict[str, int]:
        """The train loader's state in a checkpoint: the global batches trained on in the current epoch."""
        return {} if self._trained is None else {"epoch": self._trained[0], "done": self._trained[1]}

    def _open_batch(self, indices: list[int]) -> GlobalBatch:
        """The collate function of the index-only loader: a handle whose planned tasks start loading now."""
        assert self._num_tasks is not None
        k = min(self._num_tasks, len(indices))
        sizes = [len(r) for r in split_tasks(len(indices), k)]
        data = TaskData(
            self._dataset,
            indices,
            sizes,
            collate_fn=self._collate_fn,
            pin_memory=self._pin_memory,
            timeout=self._config.timeout,
        )
        self._open_data.append(data)
        if self._engine is not None:  # Lightning fetches one batch ahead: this loads during the current step
            data.prefetch([j for j in self._engine.planned_tasks() if j < k])
        assert self._train_batches is not None
        position = self._train_batches.positions.popleft()  # the loader collates in the order it yields
        return GlobalBatch(list(indices), data, sizes + [0] * (self._num_tasks - k), position)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        if isinstance(batch, GlobalBatch):
            return batch  # the task batches are moved one by one (with the user's transfer hooks)
        return super().batch_to_device(batch, device=device, dataloader_idx=dataloader_idx)

    def _task_batch(self, data: TaskData, tasks: list[int]) -> Any:
        """The batch of ``tasks``' samples (one task, or a chunk of several), prepared as Lightning
        prepares a batch before ``training_step``."""
        module = self.lightning_module
        batch = self.precision_plugin.convert_input(data.batch(tasks))
        batch = module._on_before_batch_transfer(batch, dataloader_idx=0)
        return super().batch_to_device(batch, dataloader_idx=0)

    # -- the training step ------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        if not isinstance(batch, GlobalBatch):
            raise RuntimeError(
                "strategy='coded': training_step got a batch that the strategy's train DataLoader did not make "
                f"({type(batch).__name__}); one map-style train DataLoader is supported"
            )
        assert self._engine is not None
        module = self.lightning_module
        rest = args[1:]
        extra = {k: v for k, v in kwargs.items() if k != "batch"}
        outputs: list[Any] = []
        logged: dict[str, _LoggedKey] = {}
        original_log = module.log
        signature = inspect.signature(original_log)
        scale = self._loss_scale()

        def batch_loss(ids: list[int]) -> torch.Tensor:
            # One training_step over a chunk of tasks (the engine runs a rank's primaries in chunks):
            # its mean loss over the chunk's samples weighs each task by its size. Tasks without
            # samples (a ragged last batch's padding) add nothing and are left out.
            tasks = [j for j in ids if batch.weights[j] > 0]
            weight = float(sum(batch.weights[j] for j in tasks))
            calls: list[tuple[str, Any]] = []

            decoded: dict[int, Any] = {}

            def record(name: str, value: Any, *log_args: Any, **log_kwargs: Any) -> None:
                bound = signature.bind(name, value, *log_args, **log_kwargs)
                options = {k: v for k, v in bound.arguments.items() if k not in ("name", "value")}
                meta = _decodable_options(value, options)
                if meta is not None:  # a scalar mean: decoded with the loss, the global batch's on every rank
                    decoded[self._value_slot(name, meta)] = value
                    return
                logged.setdefault(name, _LoggedKey(options))
                calls.append((name, value))

            task_batch = self._task_batch(batch.data, tasks)
            module.log = record  # the user's self.log (and self.log_dict) of this task
            try:
                with self.precision_plugin.train_step_context():
                    output = module.training_step(task_batch, *rest, **extra)
            finally:
                del module.log
            loss = output.get("loss") if isinstance(output, dict) else output
            for name, value in calls:
                logged[name].values.append((value, weight))
            outputs.append(output)
            if scale != 1.0 and isinstance(loss, torch.Tensor):
                loss = loss * scale  # 16-mixed: the decoded gradient is scaled, as the GradScaler expects
            return (loss, decoded) if decoded else loss  # type: ignore[return-value]

        try:
            report = self._engine.backward(tasks=batch.weights, batch_loss=batch_loss)
        finally:
            self._finish_batch(batch)
        self._last_report = report
        self._steps += 1
        self._trained = (batch.position[0], batch.position[1] + 1)
        self._pending_grads = [(p, p.grad) for p in self._params]
        for p, _ in self._pending_grads:
            p.grad = None  # kept aside: the closure zeroes gradients before backward
        loss_value = report.loss / scale if math.isfinite(report.loss) else float("nan")
        self._relog(original_log, logged)
        self._log_decoded(original_log, report.values, len(batch.indices))
        loss = torch.tensor(loss_value, dtype=self._loss_dtype(), device=self.root_device)
        last = outputs[-1] if outputs else None
        if isinstance(last, dict):
            return {**{k: v for k, v in last.items() if k != "loss"}, "loss": loss}
        return loss

    def _finish_batch(self, batch: GlobalBatch) -> None:
        data = batch.data
        try:
            data.close()
        finally:
            for index, count in data.loaded.items():
                self._loaded[index] = self._loaded.get(index, 0) + count
            if data in self._open_data:
                self._open_data.remove(data)

    def _loss_scale(self) -> float:
        precision = self.precision_plugin
        if isinstance(precision, MixedPrecision) and precision.scaler is not None:
            return float(precision.scaler.get_scale())
        return 1.0

    def _loss_dtype(self) -> torch.dtype:
        dtype = self._params[0].dtype if self._params else torch.float32
        return dtype if dtype == torch.float64 else torch.float32

    def _value_slot(self, name: str, meta: dict[str, Any]) -> int:
        assert self._engine is not None
        slot = self._engine.value_slot(name, meta)
        self._slot_meta[slot] = (name, meta)
        return slot

    def _log_decoded(self, log: Any, values: dict[int, float], samples: int) -> None:
        """Log the values the engine decoded this step: the same keys and values on every rank.

        A rank that never logged a key itself (all its tasks were decided elsewhere) learns its name
        and options from the engine's registry.
        """
        if any(slot not in self._slot_meta for slot in values):
            assert self._engine is not None
            self._slot_meta.update(enumerate(self._engine.value_names()))
        self._local_sync = True  # already the global batch's values: no collective
        try:
            for slot, value in sorted(values.items()):
                name, meta = self._slot_meta[slot]
                tensor = torch.tensor(value, dtype=self._loss_dtype(), device=self.root_device)
                log(name, tensor, **(meta or {}), batch_size=samples)
        finally:
            self._local_sync = False

    def _relog(self, log: Any, logged: dict[str, _LoggedKey]) -> None:
        """Log once for the step each value that is not decoded (sum/max/min, torchmetrics), as this rank saw it."""
        names = list(logged) + [name for name in self._last_logged if name not in logged]
        self._local_sync = True  # the values are already what this rank should log: no collective
        try:
            for name in names:
                entry = logged.get(name)
                options = entry.kwargs if entry is not None else self._last_logged[name][1]
                if entry is not None:
                    value, weight = _aggregate(entry.values, options.get("reduce_fx", "mean"))
                else:
                    # This rank computed nothing for it in this step (a step the release completed ahead):
                    # repeat the previous value, with weight 0 in epoch means.
                    value, weight = self._last_logged[name][0], 0
                if weight > 0:
                    self._last_logged[name] = (value, options)
                log(name, value, **{**options, "batch_size": weight})
        finally:
            self._local_sync = False

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Put the decoded gradient back (the engine ran the backward passes); the hooks run as usual."""
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)  # on_before_backward
        pending, self._pending_grads = self._pending_grads, None
        if pending is None:
            raise RuntimeError("strategy='coded': backward without a coded training step before it")
        for p, grad in pending:
            p.grad = grad
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)  # on_after_backward
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        """As DDP's, except for the values the strategy logs inside a coded step (already global)."""
        if self._local_sync:
            return tensor
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    # -- checkpoints and teardown -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The engine's state (step index, plan and profiles) and the world it was measured in."""
        engine = self._engine.get_extra_state() if self._engine is not None else None
        return {"world_size": self.world_size, "num_tasks": self._num_tasks, "engine": engine, "trained": self._trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give :meth:`state_dict`'s engine state to the next engine (ignored, with a warning, for another world)."""
        progress = state.get("trained")
        if progress is not None:  # a checkpoint saved before any new step still says where training is
            self._trained = (int(progress[0]), int(progress[1]))
        if state.get("world_size") != self.world_size or state.get("engine") is None:
            rank_zero_warn(
                f"strategy='coded': the checkpoint's engine state is for {state.get('world_size')} ranks, this run "
                f"has {self.world_size}; starting from a fresh plan"
            )
            return
        self._restored = state

    @override
    def checkpoint_state(self) -> dict[str, Any] | None:
        return self.state_dict() if self._engine is not None else None

    @override
    def teardown(self) -> None:
        for owner, name in self._patched:
            owner.__dict__.pop(name, None)  # back to Lightning's methods
        self._patched = []
        self._stop_store = None
        self._pending_grads = None
        for data in list(self._open_data):  # batches fetched ahead and never trained on
            try:
                data.close()
            except TimeoutError as error:
                warnings.warn(f"strategy='coded': {error}", RuntimeWarning, stacklevel=2)
        self._open_data = []
        self._trained = None  # not in setup: a checkpoint is restored before it
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        super().teardown()


#: ``self.log`` options that travel with a decoded key (JSON, so every rank logs it the same way).
_DECODED_OPTIONS = ("prog_bar", "logger", "on_step", "on_epoch", "sync_dist", "add_dataloader_idx", "rank_zero_only")


def _decodable_options(value: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """The options to register for a logged scalar whose global value is its weighted mean, or None.

    The engine decodes weighted means; other reductions (sum, max, min, a callable) and torchmetrics
    objects (which keep their own state) are aggregated on each rank instead.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if options.get("reduce_fx", "mean") not in ("mean", torch.mean):
        return None
    return {k: options[k] for k in _DECODED_OPTIONS if k in options and isinstance(options[k], (bool, type(None)))}


def _aggregate(values: list[tuple[Any, float]], reduce_fx: Any) -> tuple[Any, float]:
    """One value from per-task ``(value, weight)``: weighted mean, sum, max or min, as ``reduce_fx`` says."""
    tensors = [(v, w) for v, w in values if isinstance(v, (torch.Tensor, int, float))]
    if len(tensors) != len(values):  # a torchmetrics Metric: its state holds every update; log it once
        return values[-1][0], sum(w for _, w in values)
    stacked = torch.stack([torch.as_tensor(v).detach().to(torch.float64).reshape(()) for v, _ in tensors])
    weights = torch.tensor([w for _, w in tensors], dtype=torch.float64)
    name = reduce_fx if isinstance(reduce_fx, str) else getattr(reduce_fx, "__name__", "")
    total = float(weights.sum())
    if name in ("sum",):
        value = stacked.sum()
    elif name in ("max", "amax"):
        value = stacked.max()
    elif name in ("min", "amin"):
        value = stacked.min()
    else:
        value = (stacked * weights).sum() / total if total > 0 else stacked.mean()
    device = next((v.device for v, _ in tensors if isinstance(v, torch.Tensor)), None)
    return value.to(device) if device is not None else value, total
