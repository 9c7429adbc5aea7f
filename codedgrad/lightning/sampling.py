"""One rank's shard of DDP's global batches, with per-rank counts that may change between batches.

The ``balanced`` strategy gives every rank one batch per step, of a size proportional to its speed.
:class:`CountsSchedule` says which profiles (and so which per-rank counts) apply from which batch
on; :class:`ShardBatchSampler` is the ``batch_sampler`` of a rank's ``DataLoader``: it yields this
rank's contiguous share of each global batch and remembers the counts of every batch it yielded,
so the training step weights the gradient by the counts of the batch it actually holds, however
far the loader has read ahead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset

from codedgrad.data import GlobalBatchSampler, balanced_counts, shard
from codedgrad.profile import WorkerProfile

__all__ = ["CountsSchedule", "ResumableLoader", "ShardBatchSampler", "global_batches_of"]


def global_batches_of(dataloader: object, world_size: int, rank: int, strategy: str, why: str) -> GlobalBatchSampler:
    """DDP's global batches of the train ``dataloader`` Lightning prepared for ``rank`` of ``world_size``.

    Lightning has put in a ``DistributedSampler`` (the user's shuffle, its seed, drop_last); the
    global batches are what every rank's loader would read together, in rank order.

    Args:
        dataloader: the train loader as Lightning passes it to ``process_dataloader``.
        world_size: the number of ranks.
        rank: this rank.
        strategy: the strategy's name, for messages.
        why: why it needs map-style data, for messages.

    Raises:
        TypeError: not a DataLoader, an iterable dataset, or a custom sampler or batch sampler.
        ValueError: the DistributedSampler is for another rank or world size.
    """
    if not isinstance(dataloader, DataLoader):
        raise TypeError(f"strategy={strategy!r} needs a torch DataLoader for training, got {type(dataloader).__name__}")
    if isinstance(dataloader.dataset, IterableDataset):
        raise TypeError(
            f"strategy={strategy!r} needs a map-style train dataset: {why}. Materialise the stream into a list "
            "or index its source, or use strategy='ddp'"
        )
    sampler, batch_sampler = dataloader.sampler, dataloader.batch_sampler
    if type(sampler) is not DistributedSampler or type(batch_sampler) is not BatchSampler:
        raise TypeError(
            f"strategy={strategy!r} builds DDP's global batches itself: it needs a train DataLoader with "
            "batch_size and shuffle (no custom sampler or batch_sampler) and Trainer(use_distributed_sampler=True); "
            f"got sampler={type(sampler).__name__}, batch_sampler={type(batch_sampler).__name__}"
        )
    if sampler.num_replicas != world_size or sampler.rank != rank:
        raise ValueError(
            f"sampler: the train DataLoader's DistributedSampler is for rank {sampler.rank} of "
            f"{sampler.num_replicas}, but this is rank {rank} of {world_size}"
        )
    global_batches = GlobalBatchSampler(
        len(dataloader.dataset),  # type: ignore[arg-type]
        dataloader.batch_size,  # type: ignore[arg-type]
        world_size,
        shuffle=sampler.shuffle,
        seed=sampler.seed,
        drop_last=dataloader.drop_last,
        sampler_drop_last=sampler.drop_last,
    )
    global_batches.set_epoch(sampler.epoch)
    return global_batches


Position = tuple[int, int]
"""(epoch, index of the global batch within the epoch): batches in the order they are yielded."""


class CountsSchedule:
    """Which rank profiles decide the per-rank counts of each global batch.

    Every rank holds the same schedule (the strategy only changes it with values all ranks agreed
    on), so every rank computes the same counts for a batch without communicating.

    Args:
        world_size: the number of ranks.
        profiles: per-sample profiles of the ranks to start with; None splits evenly (as DDP does).
        gamma: the planner's weight of the second moment.
    """

    def __init__(self, world_size: int, profiles: Sequence[WorkerProfile] | None = None, gamma: float = 1.0) -> None:
        if profiles is not None and len(profiles) != world_size:
            raise ValueError(f"profiles: need one profile per rank ({world_size}), got {len(profiles)}")
        self._world_size = world_size
        self._gamma = gamma
        even = [WorkerProfile(0.0, 1.0, 0.0)] * world_size
        self._entries: list[tuple[Position, tuple[WorkerProfile, ...]]] = [((0, 0), tuple(profiles or even))]
        self._cache: dict[tuple[int, int], list[int]] = {}

    @property
    def current(self) -> tuple[WorkerProfile, ...]:
        """The profiles of the latest entry (what a checkpoint stores)."""
        return self._entries[-1][1]

    def profiles_at(self, position: Position) -> tuple[WorkerProfile, ...]:
        """The profiles in force for the batch at ``position``."""
        return self._entries[self._entry(position)][1]

    def counts(self, position: Position, total: int) -> list[int]:
        """Per-rank sample counts of the ``total``-sample global batch at ``position``."""
        key = (self._entry(position), total)
        if key not in self._cache:
            self._cache[key] = balanced_counts(total, self._entries[key[0]][1], self._gamma)
        return list(self._cache[key])

    def latest_counts(self, total: int) -> list[int]:
        """Per-rank counts of a ``total``-sample global batch under the latest profiles."""
        return self.counts(self._entries[-1][0], total)

    def _entry(self, position: Position) -> int:
        for k in range(len(self._entries) - 1, 0, -1):
            if position >= self._entries[k][0]:
                return k
        return 0

    def switch(self, position: Position, profiles: Sequence[WorkerProfile]) -> None:
        """Use ``profiles`` for the batches from ``position`` on (not before the latest entry)."""
        if len(profiles) != self._world_size:
            raise ValueError(f"profiles: need one profile per rank ({self._world_size}), got {len(profiles)}")
        if position < self._entries[-1][0]:
            raise ValueError(f"position: {position} is before the latest switch at {self._entries[-1][0]}")
        self._entries.append((position, tuple(profiles)))


class ShardBatchSampler:
    """A ``batch_sampler`` yielding rank ``rank``'s share of each global batch of ``global_batches``.

    The shares are contiguous slices of the global batch in rank order, sized by ``schedule``.
    Lightning calls ``set_epoch`` on ``batch_sampler.sampler``, which is ``global_batches``.

    Args:
        global_batches: DDP's global batches.
        rank: this rank.
        schedule: the per-rank counts of each batch.
    """

    def __init__(self, global_batches: GlobalBatchSampler, rank: int, schedule: CountsSchedule) -> None:
        self.sampler = global_batches
        self._rank = rank
        self._schedule = schedule
        self._next: Position = (global_batches.epoch, 0)
        # Counts of the batches yielded but not yet taken by a training step, oldest first.
        self._pending: deque[tuple[Position, list[int]]] = deque()
        self._resume: Position | None = None  # (epoch, batches already trained in it)

    @property
    def next_position(self) -> Position:
        """The position of the next batch this sampler will yield (later switches apply from here)."""
        return self._next

    def set_epoch(self, epoch: int) -> None:
        """Forward to the global batches (Lightning calls it on ``batch_sampler.sampler`` too)."""
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
        # A new pass starts: batches read ahead by an abandoned pass will never be trained on.
        self._pending.clear()
        self._next = (epoch, skip)
        for t, batch in enumerate(self.sampler):
            if t < skip:  # trained before the checkpoint this run resumed from
                continue
            counts = self._schedule.counts((epoch, t), len(batch))
            self._pending.append(((epoch, t), counts))
            self._next = (epoch, t + 1)
            yield shard(batch, counts, self._rank)

    def take(self) -> tuple[Position, list[int]]:
        """The position and per-rank counts of the oldest batch yielded and not taken yet.

        Raises:
            RuntimeError: no batch is pending (the loader was not read through this sampler).
        """
        if not self._pending:
            raise RuntimeError(
                "strategy='balanced': a training step got a batch that its sampler did not yield; the "
                "train DataLoader must be the one the strategy prepared (one train DataLoader, map-style)"
            )
        return self._pending.popleft()


class ResumableLoader(DataLoader):
    """A train DataLoader that resumes mid-epoch (Lightning's stateful loader interface).

    ``state_dict`` says how many global batches of which epoch the strategy has trained on (not how
    many were read ahead); ``load_state_dict`` makes the next pass of its ``batch_sampler`` over
    that epoch skip them (``batch_sampler.resume_at``). Without it Lightning would start a resumed
    epoch from its first batch again.

    Args:
        progress: the strategy's ``{"epoch": e, "done": n}`` (empty before its first step).
        *args, **kwargs: :class:`~torch.utils.data.DataLoader`'s.
    """

    def __init__(self, *args: Any, progress: Callable[[], dict[str, int]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        return self._progress()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "epoch" in state and "done" in state:
            self.batch_sampler.resume_at(int(state["epoch"]), int(state["done"]))  # type: ignore[union-attr]
