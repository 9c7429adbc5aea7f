"""Data for tasks: DDP's global batches, split into weighted tasks, loaded only where computed.

Three jobs, one per part of this module (docs/design.md, "Data"):

* :class:`GlobalBatchSampler` yields the world's t-th *global batch*: exactly the samples that
  ``world_size`` ranks, each running a ``DataLoader`` over a ``DistributedSampler``, see at their
  t-th step (same seed, same epoch order, padding and ragged last batch). Switching from DDP to
  codedgrad therefore changes speed, not the math.
* :func:`split_tasks` cuts a global batch into contiguous tasks whose sizes (the task *weights*)
  differ by at most one; :class:`TaskData` loads a task's samples only when the rank computes it,
  caches them, and prefetches the tasks a plan assigns in advance on a background thread.
* :func:`balanced_counts` and :func:`shard` give each rank a speed-proportional, contiguous share
  of a global batch (the ``balanced`` strategy: one batch per rank, unequal batch sizes).

Only map-style datasets are supported: any rank must be able to load any sample by index, which a
stream (``IterableDataset``) cannot offer. Materialise a stream into a list, or index its source.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, default_collate

from codedgrad.plan import optimal_split, split_statistics
from codedgrad.profile import WorkerProfile

__all__ = [
    "GlobalBatchSampler",
    "TaskData",
    "balanced_counts",
    "shard",
    "split_tasks",
]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


# -- global batches ------------------------------------------------------------------------------


class GlobalBatchSampler:
    """The global batches of a DDP job: what all ranks' ``DataLoader``\\ s see together at each step.

    Rank r of DDP runs ``DataLoader(dataset, batch_size, sampler=DistributedSampler(dataset,
    num_replicas=world_size, rank=r, shuffle=shuffle, seed=seed, drop_last=sampler_drop_last),
    drop_last=drop_last)``. The sampler permutes the indices with seed ``seed + epoch`` (or keeps
    them in order), pads the permutation to a multiple of ``world_size`` by repeating its first
    indices (or, with ``sampler_drop_last``, truncates it), and gives rank r positions
    r, r + W, r + 2W, …; the loader cuts that into batches of ``batch_size``, the last one ragged
    unless ``drop_last``. Every rank has the same number of samples, so all ranks' t-th batches
    have the same size.

    This sampler yields, for each step t, the concatenation of the ranks' t-th batches, **in rank
    order**: rank 0's batch, then rank 1's, and so on (within a rank, in its loader's order). As a
    multiset that is the contiguous block ``[t·b·W, (t+1)·b·W)`` of the padded epoch order.

    Args:
        dataset_len: number of samples in the (map-style) dataset.
        batch_size: the per-rank batch size b of the DDP job.
        world_size: the number of DDP ranks W.
        shuffle: as ``DistributedSampler(shuffle=...)``.
        seed: as ``DistributedSampler(seed=...)``; the epoch's order uses ``seed + epoch``.
        drop_last: as ``DataLoader(drop_last=...)``: drop each rank's ragged last batch.
        sampler_drop_last: as ``DistributedSampler(drop_last=...)``: truncate the order to a
            multiple of W instead of padding it.

    Example::

        sampler = GlobalBatchSampler(len(dataset), batch_size=32, world_size=4, seed=0)
        sampler.set_epoch(epoch)
        for global_batch in sampler:  # lists of up to 128 dataset indices
            ...
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        world_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        sampler_drop_last: bool = False,
    ) -> None:
        self._dataset_len = _check_int("dataset_len", dataset_len, 0)
        self._batch_size = _check_int("batch_size", batch_size, 1)
        self._world_size = _check_int("world_size", world_size, 1)
        self._seed = _check_int("seed", seed, 0)
        self._shuffle = bool(shuffle)
        self._drop_last = bool(drop_last)
        self._sampler_drop_last = bool(sampler_drop_last)
        self._epoch = 0
        n, w = self._dataset_len, self._world_size
        # The same arithmetic as torch.utils.data.DistributedSampler.__init__.
        if self._sampler_drop_last and n % w != 0:
            self._per_rank = math.ceil((n - w) / w)
        else:
            self._per_rank = math.ceil(n / w)

    @property
    def batch_size(self) -> int:
        """The per-rank batch size b."""
        return self._batch_size

    @property
    def world_size(self) -> int:
        """The number of DDP ranks W whose batches form a global batch."""
        return self._world_size

    @property
    def epoch(self) -> int:
        """The epoch whose order :meth:`__iter__` yields."""
        return self._epoch

    @property
    def samples_per_rank(self) -> int:
        """How many samples each DDP rank's sampler yields per epoch (``len(DistributedSampler)``)."""
        return self._per_rank

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order from the next :meth:`__iter__` on (as ``DistributedSampler.set_epoch``)."""
        self._epoch = _check_int("epoch", epoch, 0)

    def __len__(self) -> int:
        """The number of global batches per epoch (= the length of each DDP rank's loader)."""
        if self._drop_last:
            return self._per_rank // self._batch_size
        return math.ceil(self._per_rank / self._batch_size)

    def batch_sizes(self) -> list[int]:
        """The size of each global batch of an epoch (all ``b·W`` but a ragged last one)."""
        sizes = []
        for t in range(len(self)):
            sizes.append(min(self._batch_size, self._per_rank - t * self._batch_size) * self._world_size)
        return sizes

    def epoch_order(self) -> list[int]:
        """The padded (or truncated) permutation of this epoch, before it is dealt out to ranks."""
        n, total = self._dataset_len, self._per_rank * self._world_size
        if self._shuffle:
            generator = torch.Generator()
            generator.manual_seed(self._seed + self._epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        if total > n:  # pad by repeating the first indices, as often as needed
            order += (order * math.ceil((total - n) / n))[: total - n]
        return order[:total]

    def __iter__(self) -> Iterator[list[int]]:
        order, b, w = self.epoch_order(), self._batch_size, self._world_size
        for t in range(len(self)):
            rows = range(t * b, min((t + 1) * b, self._per_rank))  # positions within each rank's list
            yield [order[i * w + r] for r in range(w) for i in rows]

    def __repr__(self) -> str:
        return (
            f"GlobalBatchSampler(dataset_len={self._dataset_len}, batch_size={self._batch_size}, "
            f"world_size={self._world_size}, shuffle={self._shuffle}, seed={self._seed}, "
            f"drop_last={self._drop_last}, sampler_drop_last={self._sampler_drop_last}, epoch={self._epoch})"
        )


# -- tasks -----------------------------------------------------------------------------------------


def split_tasks(num_samples: int, num_tasks: int) -> list[range]:
    """Cut ``num_samples`` positions into ``num_tasks`` contiguous tasks, sizes differing by ≤ 1.

    The first ``num_samples % num_tasks`` tasks get one sample more. The sizes are the tasks'
    weights: a task's loss counts ``size / num_samples`` in the global batch's mean.

    Args:
        num_samples: positions to split (≥ 1), e.g. the length of a global batch.
        num_tasks: number of tasks K (1 ≤ K ≤ num_samples: a task has at least one sample).

    Returns:
        K ranges of positions, in order, covering ``range(num_samples)`` exactly once.
    """
    num_samples = _check_int("num_samples", num_samples, 1)
    num_tasks = _check_int("num_tasks", num_tasks, 1)
    if num_tasks > num_samples:
        raise ValueError(
            f"num_tasks: {num_tasks} tasks cannot be cut from {num_samples} samples (a task needs at least "
            f"one); use at most {num_samples} tasks or a larger batch"
        )
    small, extra = divmod(num_samples, num_tasks)
    ranges, start = [], 0
    for j in range(num_tasks):
        stop = start + small + (1 if j < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def _ranges_from_sizes(num_samples: int, sizes: Sequence[int]) -> list[range]:
    if isinstance(sizes, (str, bytes)) or len(sizes) == 0:
        raise ValueError(f"tasks: need a number of tasks or a non-empty list of task sizes, got {sizes!r}")
    ranges, start = [], 0
    for j, size in enumerate(sizes):
        size = _check_int(f"tasks[{j}]", size, 1)
        ranges.append(range(start, start + size))
        start += size
    if start != num_samples:
        raise ValueError(f"tasks: the task sizes sum to {start} but the batch has {num_samples} samples")
    return ranges


def _map_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a collated batch (dicts, lists, tuples, namedtuples)."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        mapped = {k: _map_tensors(v, fn) for k, v in data.items()}
        try:
            return type(data)(mapped)
        except TypeError:  # a mapping type that cannot be built from a dict (e.g. defaultdict)
            return mapped
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # namedtuple
        return type(data)(*(_map_tensors(v, fn) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_map_tensors(v, fn) for v in data)
    return data


def _check_map_style(dataset: object, who: str) -> None:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__"):
        raise TypeError(
            f"{who} needs a map-style dataset (with __getitem__ and __len__), got {type(dataset).__name__}: "
            "any rank must be able to load any sample of the global batch by its index, which a stream "
            "cannot offer. Materialise the stream (e.g. list(...)) or wrap its indexable source."
        )


class TaskData:
    """One step's global batch, split into tasks that are loaded only where they are computed.

    The batch is ``indices`` (dataset indices, e.g. one batch of :class:`GlobalBatchSampler`), cut
    into contiguous tasks. A task's samples are read from ``dataset`` when it is first needed
    (:meth:`task`, :meth:`batch`) or ahead of time on a background thread (:meth:`prefetch`: the
    plan is known before the step, so a rank prefetches its primaries and backups; spare work is
    loaded on demand). Each sample position is loaded at most once; :attr:`loaded` counts what was.

    The prefetch thread runs only while it has tasks queued and never outlives :meth:`close` (or
    the ``with`` block). Collated batches are cached on the CPU (pinned when ``pin_memory`` and CUDA
    is available) and moved to ``device`` on each call (non-blocking from pinned memory), so call
    :meth:`task` once per task per step.

    Args:
        dataset: a map-style dataset (``dataset[i]`` returns one sample).
        indices: the global batch, as dataset indices.
        tasks: the number of tasks K (sizes from :func:`split_tasks`), or the task sizes in order
            (each ≥ 1, summing to ``len(indices)``).
        collate_fn: turns a list of samples into a batch (``torch.utils.data.default_collate``).
        device: where :meth:`task` puts the batch's tensors (None: leave them where they are).
        pin_memory: pin collated batches (ignored without CUDA), for asynchronous copies.
        timeout: seconds to wait for a task the prefetch thread is loading.

    Raises:
        TypeError: ``dataset`` is an ``IterableDataset`` or not indexable.

    Example::

        with TaskData(dataset, global_batch, 16, device="cuda", pin_memory=True) as data:
            data.prefetch(my_tasks)                # in queue order
            report = engine.backward(lambda j: loss_fn(model, data[j]), data.weights)
    """

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int],
        tasks: int | Sequence[int],
        *,
        collate_fn: Callable[[list[Any]], Any] = default_collate,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
        timeout: float = 300.0,
    ) -> None:
        _check_map_style(dataset, "TaskData")
        self._dataset = dataset
        size = len(dataset) if hasattr(dataset, "__len__") else None
        self._indices = []
        for i, index in enumerate(indices):
            index = _check_int(f"indices[{i}]", index, 0)
            if size is not None and index >= size:
                raise ValueError(f"indices[{i}]: {index} is out of range for a dataset of {size} samples")
            self._indices.append(index)
        if isinstance(tasks, (int, np.integer)) and not isinstance(tasks, bool):
            if not self._indices:
                raise ValueError("indices: the global batch is empty")
            self._ranges = split_tasks(len(self._indices), int(tasks))
        else:
            self._ranges = _ranges_from_sizes(len(self._indices), tasks)
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout: must be a finite number of seconds > 0, got {timeout!r}")
        self._collate_fn = collate_fn
        self._device = None if device is None else torch.device(device)
        self._pin = bool(pin_memory) and torch.cuda.is_available()
        self._timeout = float(timeout)
        self._lock = threading.Lock()
        # One future per task, created by whoever first asks for it; its result is
        # (raw samples, collated batch). The queue holds prefetches not yet started.
        self._futures: dict[int, Future] = {}
        self._queue: deque[tuple[int, Future]] = deque()
        self._thread: threading.Thread | None = None
        self._loading: int | None = None  # the task the prefetch thread is reading, for messages
        self._loaded: Counter[int] = Counter()
        self._closed = False

    # -- what the engine needs ---------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        """K, the number of tasks."""
        return len(self._ranges)

    @property
    def weights(self) -> list[int]:
        """Each task's sample count, in task order: the weights of the tasks' mean losses."""
        return [len(r) for r in self._ranges]

    @property
    def indices(self) -> list[int]:
        """The global batch's dataset indices."""
        return list(self._indices)

    def task_indices(self, task: int) -> list[int]:
        """The dataset indices of ``task``'s samples."""
        return [self._indices[p] for p in self._ranges[self._check_task(task)]]

    @property
    def loaded(self) -> Counter[int]:
        """How often each dataset index was read so far (a copy; duplicates in the batch count twice)."""
        with self._lock:
            return Counter(self._loaded)

    @property
    def prefetching(self) -> bool:
        """Whether the prefetch thread is running (it exits as soon as its queue is empty)."""
        with self._lock:
            return self._thread is not None

    def task(self, task: int) -> Any:
        """Task ``task``'s collated batch on ``device``: loaded now, or taken from the prefetch.

        Raises:
            TimeoutError: the prefetch thread did not finish loading it within ``timeout`` seconds.
        """
        _, collated = self._result(self._check_task(task))
        return self._to_device(collated)

    def __getitem__(self, task: int) -> Any:
        return self.task(task)

    def __len__(self) -> int:
        return self.num_tasks

    def batch(self, tasks: Sequence[int]) -> Any:
        """One collated batch of several tasks' samples (in the order given), e.g. a chunk of tasks.

        Its mean loss weighs each task by its size, like the tasks' losses weighted by :attr:`weights`.
        """
        tasks = [self._check_task(j) for j in tasks]
        if not tasks:
            raise ValueError("tasks: need at least one task")
        if len(tasks) == 1:
            return self.task(tasks[0])
        samples: list[Any] = []
        for j in tasks:
            samples.extend(self._result(j)[0])
        collated = self._collate_fn(samples)
        return self._to_device(_map_tensors(collated, torch.Tensor.pin_memory) if self._pin else collated)

    def prefetch(self, tasks: Sequence[int]) -> None:
        """Load ``tasks`` in the background, in this order (tasks already loaded or queued are skipped).

        A task still waiting in the queue when :meth:`task` asks for it is loaded by the caller at
        once rather than waited for.
        """
        tasks = [self._check_task(j) for j in tasks]
        with self._lock:
            if self._closed:
                raise RuntimeError("TaskData: prefetch after close()")
            for j in tasks:
                if j not in self._futures:
                    future: Future = Future()
                    self._futures[j] = future
                    self._queue.append((j, future))
            if self._queue and self._thread is None:
                self._thread = threading.Thread(target=self._prefetch_loop, name="codedgrad-task-prefetch", daemon=True)
                self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Cancel queued prefetches and wait (≤ ``timeout`` s, default the constructor's) for the thread.

        Raises:
            TimeoutError: the prefetch thread is still reading a task after the timeout.
        """
        with self._lock:
            self._closed = True
            while self._queue:
                _, future = self._queue.popleft()
                future.cancel()
            thread = self._thread
        if thread is not None:
            thread.join(self._timeout if timeout is None else timeout)
            if thread.is_alive():
                raise TimeoutError(
                    f"TaskData.close: the prefetch thread is still loading task {self._loading} after "
                    f"{self._timeout if timeout is None else timeout:g} s (a dataset read that does not return?)"
                )

    def __enter__(self) -> TaskData:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TaskData(samples={len(self._indices)}, tasks={self.num_tasks}, device={self._device})"

    # -- loading ---------------------------------------------------------------------------------

    def _check_task(self, task: object) -> int:
        if isinstance(task, bool) or not isinstance(task, (int, np.integer)) or not 0 <= task < len(self._ranges):
            raise IndexError(f"task: must be an integer in [0, {len(self._ranges)}), got {task!r}")
        return int(task)

    def _load(self, task: int) -> tuple[list[Any], Any]:
        positions = self._ranges[task]
        samples = [self._dataset[self._indices[p]] for p in positions]
        with self._lock:
            self._loaded.update(self._indices[p] for p in positions)
        collated = self._collate_fn(samples)
        if self._pin:
            collated = _map_tensors(collated, torch.Tensor.pin_memory)
        return samples, collated

    def _run(self, task: int, future: Future) -> None:
        try:
            future.set_result(self._load(task))
        except BaseException as error:  # handed to whoever waits for the task
            future.set_exception(error)

    def _prefetch_loop(self) -> None:
        # Runs only while tasks are queued: an idle TaskData holds no thread.
        while True:
            with self._lock:
                if not self._queue:
                    self._thread = None
                    self._loading = None
                    return
                task, future = self._queue.popleft()
                self._loading = task
            if future.set_running_or_notify_cancel():
                self._run(task, future)

    def _result(self, task: int) -> tuple[list[Any], Any]:
        with self._lock:
            future = self._futures.get(task)
            steal = future is None or future.cancelled()  # never asked for, or cancelled by close()
            if steal:
                future = Future()
                self._futures[task] = future
            else:
                # Queued but not started: take it out of the queue and load it here, now.
                for k, (j, _) in enumerate(self._queue):
                    if j == task:
                        del self._queue[k]
                        steal = True
                        break
        if steal:
            future.set_running_or_notify_cancel()
            self._run(task, future)
        try:
            return future.result(timeout=self._timeout)
        except FutureTimeout:
            raise TimeoutError(
                f"TaskData: waited {self._timeout:g} s for the prefetch thread to load task {task} "
                f"({len(self._ranges[task])} samples)"
            ) from None

    def _to_device(self, collated: Any) -> Any:
        if self._device is None:
            return collated
        return _map_tensors(collated, lambda t: t.to(self._device, non_blocking=self._pin))


# -- one batch per rank (the balanced strategy) -------------------------------------------------------


def balanced_counts(batch_size_total: int, profiles: Sequence[WorkerProfile], gamma: float = 1.0) -> list[int]:
    """Split a global batch's samples across ranks by speed: one sample is one task of the planner.

    The split is :func:`codedgrad.plan.optimal_split` with ``tasks = batch_size_total`` (so each
    profile's ``mean`` is a per-sample time and ``shift`` a per-batch one). Every rank then gets at
    least one sample when there are enough (a rank with an empty batch could not run its forward):
    the missing samples are taken, one at a time, from the rank whose cost is highest (ties to the
    lower rank). Deterministic: every rank computes the same counts from the same profiles.

    Args:
        batch_size_total: samples in the global batch (≥ 1).
        profiles: one per rank, per-sample times.
        gamma: the planner's weight of the second moment.

    Returns:
        Per-rank sample counts summing to ``batch_size_total``.
    """
    total = _check_int("batch_size_total", batch_size_total, 1)
    counts = [int(c) for c in optimal_split(profiles, total, gamma=gamma)]
    while total >= len(counts) and 0 in counts:
        cost = split_statistics(profiles, counts, gamma).cost
        donor = max((p for p in range(len(counts)) if counts[p] >= 2), key=lambda p: (cost[p], -p))
        counts[donor] -= 1
        counts[counts.index(0)] += 1
    return counts


def shard(indices: Sequence[int], counts: Sequence[int], rank: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch: ranks take ``counts`` samples in rank order.

    Args:
        indices: the global batch.
        counts: per-rank sample counts (≥ 0) summing to ``len(indices)``.
        rank: which rank's share.
    """
    counts = [_check_int(f"counts[{r}]", c, 0) for r, c in enumerate(counts)]
    if sum(counts) != len(indices):
        raise ValueError(f"counts: sum to {sum(counts)} but the global batch has {len(indices)} samples")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < len(counts):
        raise ValueError(f"rank: must be an integer in [0, {len(counts)}), got {rank!r}")
    start = sum(counts[:rank])
    return list(indices[start : start + counts[rank]])
