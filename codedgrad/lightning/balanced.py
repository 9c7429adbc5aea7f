"""``strategy="balanced"``: plain DDP with per-rank batch sizes from measured speeds, exact gradients.

Every rank runs one batch per step, as with DDP, and DDP's bucketed all-reduce still overlaps the
backward. What changes (docs/design.md, "Communication overlap"):

* **Data.** The user's ``batch_size`` stays per device, so a global batch is ``batch_size × world
  size`` samples: the *same* global batches, in the same order, as ``strategy="ddp"``
  (:class:`codedgrad.data.GlobalBatchSampler`, built from the ``DistributedSampler`` Lightning would
  have used). Rank r loads only its contiguous share of ``counts[r]`` samples of each global batch.
* **Counts.** ``counts`` split a global batch by speed (:func:`codedgrad.data.balanced_counts`): evenly
  until measured, then from per-sample profiles that every ``replan_every`` steps are re-measured on
  each rank and exchanged with one ``all_gather`` of a few numbers; the ranks switch together, at the
  first batch no rank has read yet, when the predicted step time improves by more than
  ``replan_threshold``.
* **Gradient.** The coded all-reduce hook (:func:`codedgrad.runtime.coded_allreduce_hook`) weights
  each rank by ``counts[r] / Σ counts`` of the batch it holds (also the ragged last one), so the
  result is the exact gradient of the global batch's mean loss. Lightning registers comm hooks only
  on CUDA (``pytorch_lightning/strategies/ddp.py``, ``DDPStrategy._register_ddp_hooks``); this
  strategy registers it on every device.
* **Logging.** Inside ``training_step``, ``self.log(..., sync_dist=True)`` with the default mean
  reduction gives the mean weighted by ``counts``: for a per-sample mean such as the loss, the
  global batch's mean, as with DDP. Epoch-level means are weighted by each rank's batch size by
  Lightning itself. Values logged outside ``training_step`` are reduced as DDP does.

This is the comm-hook path of codedgrad: the best choice on a steady heterogeneous cluster without
stragglers, and an answer to per-GPU batch-size requests (Lightning issues #15573, #16914). With
stragglers, use the coded strategy.

Example::

    import codedgrad.lightning  # registers "balanced"

    trainer = Trainer(strategy="balanced", devices=4)
    trainer = Trainer(strategy=BalancedStrategy(replan_every=100), devices=4)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities.data import extract_batch_size
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from typing_extensions import override

from codedgrad.data import balanced_counts
from codedgrad.emulate import EmulationMode, Heterogeneity
from codedgrad.lightning._timed_hook import TimedHookState, timed_coded_hook
from codedgrad.lightning.base import CodedgradStrategy, destroy_at_exit
from codedgrad.lightning.checks import check_accumulation
from codedgrad.lightning.sampling import (
    CountsSchedule,
    Position,
    ResumableLoader,
    ShardBatchSampler,
    global_batches_of,
)
from codedgrad.lightning.speed import StepTimer
from codedgrad.profile import WorkerProfile
from codedgrad.runtime import CodedHookState

__all__ = ["BalancedStrategy"]

CHECKPOINT_KEY = "codedgrad_balanced"
"""Where the strategy's state (the profiles in force) is stored in a Lightning checkpoint."""

_LARGEST_FLOAT = 1.7976931348623157e308  # NaN, infinities and integers beyond it are not finite floats
_FOREIGN_HOOK_ARGUMENTS = ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period")


class BalancedStrategy(CodedgradStrategy):
    """DDP with speed-proportional per-rank batch sizes and the exact weighted gradient.

    Unchanged LightningModule and DataLoader; ``batch_size`` is per device as with DDP. Accepts
    every ``DDPStrategy`` argument except other communication hooks.

    Supported: automatic optimization, one map-style train DataLoader whose sampler Lightning
    replaces by a ``DistributedSampler`` (the default ``use_distributed_sampler=True``), no gradient
    accumulation; validation, test and predict loops as with DDP; precision as with DDP (checked:
    ``64-true``, ``32-true``, ``bf16-mixed``). Anything else raises at setup or at the first step.

    When the strategy started the process group, it destroys it at interpreter exit (gloo under
    torchrun can otherwise abort there, docs/design.md, "Facts about the stack"); the group stays
    usable between ``trainer.fit``, ``validate`` and ``test`` calls of the same script.

    Args:
        profiles: per-sample :class:`~codedgrad.profile.WorkerProfile` of each rank to start from
            (``mean``: seconds per sample; ``shift``: seconds per batch); None splits evenly.
        replan_every: training steps between re-measurements of the ranks' speeds (0: never; the
            counts then stay those of ``profiles``).
        replan_threshold: re-split only when the predicted step time improves by more than this
            share (0.05 = 5 %), so that noise does not move samples back and forth.
        gamma: the planner's weight of the second moment (:func:`codedgrad.plan.optimal_split`).
        emulate: emulated heterogeneity for tests and benchmarks: each training step sleeps, after
            the forward, for the emulated time of its ``counts[rank]`` samples
            (``Heterogeneity.sleep_batch``: one delay per sample, index = position in the rank's
            batch, step = the global step; ``base`` is a speed-1 rank's time per sample). In compute
            mode the delay scales the step's measured forward and backward instead, and is slept in
            the last gradient bucket's hook, before its all-reduce. None reads ``CODEDGRAD_EMULATE``.
        **kwargs: passed to :class:`~pytorch_lightning.strategies.DDPStrategy`.

    Raises:
        ValueError: an invalid argument, or another communication hook.
    """

    strategy_name = "balanced"
    description = "DDP with per-rank batch sizes from measured speeds and exact weighted gradients"
    checkpoint_key = CHECKPOINT_KEY

    def __init__(
        self,
        profiles: Sequence[WorkerProfile] | None = None,
        replan_every: int = 50,
        replan_threshold: float = 0.05,
        gamma: float = 1.0,
        emulate: Heterogeneity | None = None,
        **kwargs: Any,
    ) -> None:
        for name in _FOREIGN_HOOK_ARGUMENTS:
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name}: strategy='balanced' registers its own communication hook (the weighted, exact "
                    "all-reduce); it cannot be combined with another one"
                )
        if isinstance(replan_every, bool) or not isinstance(replan_every, int) or replan_every < 0:
            raise ValueError(f"replan_every: must be an integer >= 0 (0: never), got {replan_every!r}")
        if isinstance(replan_threshold, bool) or not (
            isinstance(replan_threshold, (int, float)) and 0 <= replan_threshold < 1
        ):
            raise ValueError(f"replan_threshold: must be in [0, 1), got {replan_threshold!r}"[:200])
        if isinstance(gamma, bool) or not (isinstance(gamma, (int, float)) and 0 <= gamma <= _LARGEST_FLOAT):
            raise ValueError(f"gamma: must be finite and >= 0, got {gamma!r}"[:200])
        if emulate is not None and not isinstance(emulate, Heterogeneity):
            raise ValueError(f"emulate: expected a Heterogeneity or None, got {type(emulate).__name__}")
        if profiles is not None:
            try:
                profiles = list(profiles)
            except TypeError:
                raise ValueError(f"profiles: expected a list of WorkerProfile, got {profiles!r}"[:200]) from None
            for i, profile in enumerate(profiles):
                if not isinstance(profile, WorkerProfile):
                    raise ValueError(f"profiles[{i}]: expected a WorkerProfile, got {type(profile).__name__}")
        super().__init__(**kwargs)
        self._profiles = profiles
        self._replan_every = replan_every
        self._replan_threshold = float(replan_threshold)
        self._gamma = float(gamma)
        self._emulate = emulate if emulate is not None else Heterogeneity.from_env()
        self._schedule: CountsSchedule | None = None
        self._batch_sampler: ShardBatchSampler | None = None
        self._hook_state: TimedHookState | None = None
        self._timer: StepTimer | None = None
        self._step_counts: list[int] | None = None  # the counts of the batch in training_step now
        self._last_batch: tuple[Position, list[int]] | None = None
        self._taken: tuple[Position, list[int]] | None = None  # this batch's (position, counts), once taken
        self._trained: Position | None = None  # (epoch, global batches trained in it): a checkpoint's resume point
        self._steps = 0
        self._replans = 0

    # -- what users and tests can read ------------------------------------------------------------

    @property
    def profiles(self) -> tuple[WorkerProfile, ...] | None:
        """The per-sample profiles the latest counts come from (None before setup, if none given)."""
        if self._schedule is not None:
            return self._schedule.current
        return None if self._profiles is None else tuple(self._profiles)

    @property
    def counts(self) -> list[int] | None:
        """Per-rank sample counts of a full global batch under the latest profiles (None before data)."""
        if self._schedule is None or self._batch_sampler is None:
            return None
        sampler = self._batch_sampler.sampler
        return self._schedule.latest_counts(sampler.batch_size * sampler.world_size)

    @property
    def last_batch(self) -> tuple[Position, list[int]] | None:
        """(epoch, index) and per-rank counts of the global batch of the latest training step."""
        return self._last_batch

    @property
    def replans(self) -> int:
        """How many times the counts were re-split since the strategy was created or restored."""
        return self._replans

    # -- set-up -----------------------------------------------------------------------------------

    @override
    def setup_environment(self) -> None:
        created = not (dist.is_available() and dist.is_initialized())
        super().setup_environment()
        if created:
            destroy_at_exit()

    @override
    def setup(self, trainer: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._check_fit_settings(trainer)
            profiles = self._schedule.current if self._schedule is not None else self._profiles
            self._schedule = CountsSchedule(self.world_size, profiles, self._gamma)
            self._steps = 0
        super().setup(trainer)

    def _check_fit_settings(self, trainer: Any) -> None:
        if not self.lightning_module.automatic_optimization:
            raise ValueError(
                "strategy='balanced' supports automatic optimization only (one backward per training step "
                "weighted by the batch's counts); set automatic_optimization = True or use strategy='ddp'"
            )
        check_accumulation(trainer, "balanced")
        if self._emulate is not None:
            self._emulate.check_world_size(self.world_size)
        if self._profiles is not None and len(self._profiles) != self.world_size:
            raise ValueError(f"profiles: need one profile per rank ({self.world_size}), got {len(self._profiles)}")

    @override
    def _register_ddp_hooks(self) -> None:
        # Lightning registers hooks only on CUDA; the weighting is needed on every device.
        assert isinstance(self.model, DistributedDataParallel)
        coded = CodedHookState(sample_counts=[1] * self.world_size)  # set per step from the batch's counts
        self._hook_state = TimedHookState(coded, cuda=self.root_device.type == "cuda")
        self._timer = StepTimer(self._hook_state)
        self.model.register_comm_hook(self._hook_state, timed_coded_hook)

    @override
    def process_dataloader(self, dataloader: object) -> object:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or trainer.state.stage != RunningStage.TRAINING:
            return super().process_dataloader(dataloader)  # evaluation and prediction: as DDP
        global_batches = global_batches_of(
            dataloader,
            self.world_size,
            self.global_rank,
            "balanced",
            "it deals each global batch out to the ranks by index",
        )
        assert self._schedule is not None, "setup() creates the schedule before the train dataloader"
        self._batch_sampler = ShardBatchSampler(global_batches, self.global_rank, self._schedule)
        return _with_batch_sampler(dataloader, self._batch_sampler, self._train_progress)

    def _train_progress(self) -> dict[str, int]:
        """The train loader's state in a checkpoint: the global batches trained on in the current epoch."""
        return {} if self._trained is None else {"epoch": self._trained[0], "done": self._trained[1]}

    # -- the training step ------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self._timer is not None and self._hook_state is not None and self._schedule is not None
        if self._batch_sampler is None:
            raise RuntimeError("strategy='balanced': no train DataLoader was prepared by the strategy")
        if self._steps == 0 and not isinstance(self.lightning_module.trainer.train_dataloader, DataLoader):
            raise TypeError("strategy='balanced' supports one train DataLoader (got several, combined)")
        if self._taken is None:  # once per batch: an optimizer like LBFGS calls the closure several times
            self._timer.finish()  # the previous step's backward is over
            self._taken = self._batch_sampler.take()
        self._last_batch = self._taken
        counts = self._last_batch[1]
        self._check_local_batch(args, kwargs, counts)
        if self._replan_every and self._steps > 0 and self._steps % self._replan_every == 0:
            self._replan()
        self._hook_state.coded.set_sample_counts(counts)
        self._timer.start(counts[self.global_rank])
        self._hook_state.before_last = self._compute_delay(counts[self.global_rank])
        self._step_counts = counts
        try:
            output = super().training_step(*args, **kwargs)
        finally:
            self._step_counts = None
        if self._emulate is not None and self._emulate.mode is EmulationMode.SLEEP:
            # After the forward, before the backward and its all-reduce.
            step = self.lightning_module.trainer.global_step
            self._emulate.sleep_batch(self.global_rank, step, counts[self.global_rank])
        self._steps += 1
        (epoch, index), _ = self._last_batch
        self._trained = (epoch, index + 1)
        return output

    def _compute_delay(self, samples: int) -> Callable[[], float] | None:
        """In compute mode, the sleep the last gradient bucket's hook makes before its all-reduce.

        The rank's compute is its forward and backward up to the moment its last bucket is ready
        (backward() itself also waits for the all-reduce, which is not compute); the emulated delay
        scales it, and sleeping there delays this rank's all-reduce as a slower device would.
        """
        emulate = self._emulate
        if emulate is None or emulate.mode is not EmulationMode.COMPUTE:
            return None
        rank, step, start = self.global_rank, self.lightning_module.trainer.global_step, time.perf_counter()
        cuda = self.root_device.type == "cuda"

        def delay() -> float:
            if cuda:
                torch.cuda.current_stream().synchronize()  # the host runs ahead of the GPU
            return emulate.sleep_batch(rank, step, samples, compute_seconds=time.perf_counter() - start)

        return delay

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._taken = None  # the next training_step takes this batch's counts from the sampler
        super().on_train_batch_start(batch, batch_idx)

    def _check_local_batch(self, args: tuple, kwargs: dict, counts: list[int]) -> None:
        batch = args[0] if args else kwargs.get("batch")
        try:
            size = extract_batch_size(batch)
        except Exception:  # no tensor to measure: nothing to check
            return
        if size != counts[self.global_rank]:
            raise RuntimeError(
                f"strategy='balanced': rank {self.global_rank} holds a batch of {size} samples but its share of "
                f"this global batch is {counts[self.global_rank]} (counts {counts}); was the train DataLoader "
                "replaced after the strategy prepared it?"
            )

    def _replan(self) -> None:
        """Exchange the ranks' measured profiles; switch counts together if it pays (a collective)."""
        assert self._timer is not None and self._schedule is not None and self._batch_sampler is not None
        mine = self._timer.profile()
        epoch, index = self._batch_sampler.next_position
        row = [epoch, index, 0.0, 0.0, 0.0] if mine is None else [epoch, index, mine.mean, mine.std, 1.0]
        local = torch.tensor(row, dtype=torch.float64, device=self.root_device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        # All ranks reach this point at the same step, right after the previous step's all-reduce.
        dist.all_gather(gathered, local)
        rows = torch.stack(gathered).cpu().tolist()
        if not all(r[4] for r in rows):
            return  # some rank has no measurement yet
        profiles = [WorkerProfile(0.0, r[2], r[3]) for r in rows]
        # The first batch that no rank has read yet: every rank can still give it the new counts.
        start: Position = max((int(r[0]), int(r[1])) for r in rows)
        sampler = self._batch_sampler.sampler
        total = sampler.batch_size * sampler.world_size
        old = self._schedule.counts(start, total)
        new = balanced_counts(total, profiles, self._gamma)

        def predicted(counts: list[int]) -> float:
            return max(p.expected_time(k) for p, k in zip(profiles, counts) if k > 0)

        if new != old and predicted(new) < (1.0 - self._replan_threshold) * predicted(old):
            self._schedule.switch(start, profiles)
            self._replans += 1

    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any | None = "mean") -> Any:
        """As DDP's, except a mean inside ``training_step`` is weighted by the ranks' sample counts."""
        counts = self._step_counts
        if (
            counts is None
            or not isinstance(tensor, torch.Tensor)
            or not tensor.is_floating_point()
            or group not in (None, dist.group.WORLD)
            or not _is_mean(reduce_op)
        ):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)
        tensor.mul_(counts[self.global_rank] / sum(counts))  # in place, like Lightning's own sync
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    # -- checkpoints and teardown -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The profiles in force and the number of re-splits, as plain values (checkpoint-safe)."""
        profiles = self.profiles
        return {
            "world_size": self.world_size,
            "profiles": None if profiles is None else [asdict(p) for p in profiles],
            "replans": self._replans,
            "trained": self._trained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s profiles (ignored, with a warning, for another world size)."""
        progress = state.get("trained")
        if progress is not None:  # a checkpoint saved before any new step still says where training is
            self._trained = (int(progress[0]), int(progress[1]))
        if state.get("world_size") != self.world_size:
            rank_zero_warn(
                f"strategy='balanced': the checkpoint's profiles are for {state.get('world_size')} ranks, this run "
                f"has {self.world_size}; starting from an even split"
            )
            return
        profiles = state.get("profiles")
        self._profiles = None if profiles is None else [WorkerProfile(**p) for p in profiles]
        self._schedule = None
        self._replans = int(state.get("replans", 0))

    @override
    def teardown(self) -> None:
        self._batch_sampler = None
        self._trained = None  # not in setup: a checkpoint is restored before it
        super().teardown()


def _is_mean(reduce_op: Any) -> bool:
    if isinstance(reduce_op, str):
        return reduce_op.lower() in ("mean", "avg")
    return reduce_op == dist.ReduceOp.AVG


def _with_batch_sampler(
    dataloader: DataLoader, batch_sampler: ShardBatchSampler, progress: Callable[[], dict[str, int]]
) -> DataLoader:
    """A DataLoader with ``dataloader``'s settings, reading batches from ``batch_sampler``, resumable."""
    workers = dataloader.num_workers
    kwargs: dict[str, Any] = {}
    if hasattr(dataloader, "in_order"):  # torch >= 2.6
        kwargs["in_order"] = dataloader.in_order
    return ResumableLoader(
        dataloader.dataset,
        progress=progress,
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=dataloader.collate_fn,
        pin_memory=dataloader.pin_memory,
        timeout=dataloader.timeout,
        worker_init_fn=dataloader.worker_init_fn,
        multiprocessing_context=dataloader.multiprocessing_context,
        generator=dataloader.generator,
        prefetch_factor=dataloader.prefetch_factor if workers > 0 else None,
        persistent_workers=dataloader.persistent_workers if workers > 0 else False,
        pin_memory_device=dataloader.pin_memory_device,
        **kwargs,
    )
