"""codedgrad.data: DDP's global batches, tasks, on-demand and prefetched loading, per-rank shards."""

from __future__ import annotations

import threading
import time
from collections import Counter, namedtuple
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from codedgrad.data import GlobalBatchSampler, TaskData, balanced_counts, shard, split_tasks
from codedgrad.profile import WorkerProfile

# -- GlobalBatchSampler against torch's own DistributedSampler + DataLoader ---------------------------


def ddp_global_batches(
    n: int, b: int, w: int, shuffle: bool, seed: int, drop_last: bool, sampler_drop_last: bool, epoch: int
) -> list[list[int]]:
    """What W DDP ranks see at each step, concatenated in rank order, from torch's real classes."""
    dataset = list(range(n))
    per_rank = []
    for rank in range(w):
        sampler = DistributedSampler(
            dataset, num_replicas=w, rank=rank, shuffle=shuffle, seed=seed, drop_last=sampler_drop_last
        )
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=b, sampler=sampler, drop_last=drop_last)
        per_rank.append([batch.tolist() for batch in loader])
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1, "DDP ranks must run the same number of steps"
    return [[i for r in range(w) for i in per_rank[r][t]] for t in range(steps.pop())]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(0, 60),
    b=st.integers(1, 9),
    w=st.integers(1, 7),
    shuffle=st.booleans(),
    seed=st.integers(0, 3),
    drop_last=st.booleans(),
    sampler_drop_last=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_global_batches_are_ddps(
    n: int, b: int, w: int, shuffle: bool, seed: int, drop_last: bool, sampler_drop_last: bool, epoch: int
) -> None:
    sampler = GlobalBatchSampler(
        n, b, w, shuffle=shuffle, seed=seed, drop_last=drop_last, sampler_drop_last=sampler_drop_last
    )
    sampler.set_epoch(epoch)
    want = ddp_global_batches(n, b, w, shuffle, seed, drop_last, sampler_drop_last, epoch)
    got = list(sampler)
    assert got == want  # same samples, same order (rank 0's batch first), padding and ragged tail
    assert len(sampler) == len(want)
    assert sampler.batch_sizes() == [len(batch) for batch in want]


def test_global_batch_is_a_contiguous_block_of_the_epoch_order() -> None:
    sampler = GlobalBatchSampler(23, 3, 4, seed=5)  # 23 → padded to 24; 6 per rank; batches 3 + 3
    sampler.set_epoch(2)
    order = sampler.epoch_order()
    assert len(order) == 24 and order[23] == order[0]  # padding repeats the first samples
    for t, batch in enumerate(sampler):
        assert Counter(batch) == Counter(order[t * 12 : (t + 1) * 12])


def test_epochs_differ_and_repeat() -> None:
    sampler = GlobalBatchSampler(50, 4, 2, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dataset_len": -1, "batch_size": 2, "world_size": 2}, "dataset_len"),
        ({"dataset_len": 10, "batch_size": 0, "world_size": 2}, "batch_size"),
        ({"dataset_len": 10, "batch_size": 2, "world_size": 0}, "world_size"),
        ({"dataset_len": 10, "batch_size": 2.0, "world_size": 2}, "batch_size"),
        ({"dataset_len": 10, "batch_size": 2, "world_size": 2, "seed": -1}, "seed"),
    ],
)
def test_sampler_arguments_are_checked(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        GlobalBatchSampler(**kwargs)
    with pytest.raises(ValueError, match=r"^epoch:"):
        GlobalBatchSampler(10, 2, 2).set_epoch(-1)


# -- split_tasks ------------------------------------------------------------------------------------


@given(n=st.integers(1, 500), data=st.data())
def test_split_tasks_covers_the_batch_with_near_equal_tasks(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, n))
    tasks = split_tasks(n, k)
    assert len(tasks) == k
    assert [i for r in tasks for i in r] == list(range(n))  # contiguous, in order, exactly once
    sizes = [len(r) for r in tasks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == sorted(sizes, reverse=True)  # the larger tasks first


def test_split_tasks_errors() -> None:
    with pytest.raises(ValueError, match=r"^num_tasks: 5 tasks cannot be cut from 4 samples"):
        split_tasks(4, 5)
    with pytest.raises(ValueError, match=r"^num_tasks:"):
        split_tasks(4, 0)
    with pytest.raises(ValueError, match=r"^num_samples:"):
        split_tasks(0, 1)


# -- TaskData ---------------------------------------------------------------------------------------


class Samples(Dataset):
    """Sample i is (features, label) = (tensor([i, -i]), i); records every read."""

    def __init__(self, n: int, delay: float = 0.0) -> None:
        self.n, self.delay = n, delay
        self.reads: list[tuple[int, str]] = []
        self.gate: threading.Event | None = None  # when set up, the prefetch thread's reads wait for it

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.gate is not None and threading.current_thread().name == "codedgrad-task-prefetch":
            assert self.gate.wait(10), "test gate never opened"
        if self.delay:
            time.sleep(self.delay)
        self.reads.append((i, threading.current_thread().name))
        return torch.tensor([float(i), -float(i)]), i


def test_task_loads_only_its_samples_once() -> None:
    dataset = Samples(100)
    batch = [10, 11, 12, 13, 14, 15, 16, 10]  # index 10 twice, as DDP padding can do
    with TaskData(dataset, batch, 3) as data:
        assert data.weights == [3, 3, 2] and data.num_tasks == 3 == len(data)
        x, y = data.task(1)
        assert y.tolist() == [13, 14, 15] and x[:, 0].tolist() == [13.0, 14.0, 15.0]
        assert data.loaded == Counter({13: 1, 14: 1, 15: 1})
        x_again, _ = data[1]
        assert torch.equal(x_again, x) and data.loaded == Counter({13: 1, 14: 1, 15: 1})  # cached
        assert data.task_indices(2) == [16, 10]
        data.task(2)
        assert data.loaded == Counter({13: 1, 14: 1, 15: 1, 16: 1, 10: 1})
        assert 11 not in data.loaded and 12 not in data.loaded  # task 0 was never computed here


def test_explicit_task_sizes_and_multi_task_batches() -> None:
    dataset = Samples(20)
    with TaskData(dataset, list(range(10)), [4, 1, 5]) as data:
        assert data.weights == [4, 1, 5]
        assert data.task_indices(1) == [4]
        _, y = data.batch([2, 0])  # one batch built from several tasks, in the order given
        assert y.tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3]
        assert sorted(data.loaded) == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match=r"^tasks: the task sizes sum to 9"):
        TaskData(dataset, list(range(10)), [4, 5])
    with pytest.raises(ValueError, match=r"^tasks\[1\]:"):
        TaskData(dataset, list(range(10)), [10, 0])


def test_prefetch_loads_in_the_background_in_order() -> None:
    dataset = Samples(50, delay=0.01)
    with TaskData(dataset, list(range(30)), 6) as data:
        data.prefetch([4, 1])
        deadline = time.monotonic() + 10
        while len(data.loaded) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert sorted(data.loaded) == list(range(5, 10)) + list(range(20, 25))
        assert [i for i, _ in dataset.reads] == list(range(20, 25)) + list(range(5, 10))  # queue order
        assert all(name == "codedgrad-task-prefetch" for _, name in dataset.reads)
        started = time.perf_counter()
        _, y = data.task(4)
        assert time.perf_counter() - started < 0.03  # already loaded: no wait (loading takes 50 ms)
        assert y.tolist() == [20, 21, 22, 23, 24]
        while data.prefetching and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not data.prefetching  # an idle TaskData holds no thread
        data.task(0)  # spare work: loaded on demand, in the caller's thread
        assert dataset.reads[-1][1] == threading.current_thread().name


def test_a_queued_task_is_loaded_by_the_caller_not_waited_for() -> None:
    dataset = Samples(40)
    dataset.gate = threading.Event()
    data = TaskData(dataset, list(range(40)), 4, timeout=10)
    data.prefetch([0, 3])  # the thread blocks reading task 0; task 3 waits in the queue
    _, y = data.task(3)  # taken out of the queue and read here, while the thread is still blocked
    assert y.tolist() == list(range(30, 40))
    assert [name for _, name in dataset.reads] == [threading.current_thread().name] * 10
    dataset.gate.set()
    data.task(0)
    data.close()
    counts = data.loaded
    assert all(counts[i] == 1 for i in list(range(10)) + list(range(30, 40))) and len(counts) == 20


def test_close_cancels_queued_work_and_stops_the_thread() -> None:
    dataset = Samples(100, delay=0.005)
    data = TaskData(dataset, list(range(100)), 10)
    data.prefetch(range(10))
    time.sleep(0.02)
    data.close()
    assert not data.prefetching
    assert len(data.loaded) < 100  # queued tasks were cancelled
    with pytest.raises(RuntimeError, match="after close"):
        data.prefetch([9])
    _, y = data.task(9)  # still loadable on demand after close
    assert y.tolist() == list(range(90, 100))


def test_prefetch_thread_failure_reaches_the_caller() -> None:
    class Broken(Samples):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            if i == 7:
                raise KeyError("sample 7 is corrupt")
            return super().__getitem__(i)

    with TaskData(Broken(10), list(range(10)), 2) as data:
        data.prefetch([1])
        with pytest.raises(KeyError, match="sample 7 is corrupt"):
            data.task(1)
        assert data.task(0)[1].tolist() == [0, 1, 2, 3, 4]


def test_waiting_for_a_stuck_prefetch_times_out_with_the_task_named() -> None:
    dataset = Samples(10)
    dataset.gate = threading.Event()
    data = TaskData(dataset, list(range(10)), 2, timeout=0.2)
    data.prefetch([1])
    time.sleep(0.05)
    with pytest.raises(TimeoutError, match="task 1 "):
        data.task(1)
    with pytest.raises(TimeoutError, match="still loading task 1"):
        data.close(timeout=0.05)
    dataset.gate.set()
    data.close()


Pair = namedtuple("Pair", ["x", "meta"])


def test_collate_fn_device_and_structures() -> None:
    def collate(samples: Sequence[tuple[torch.Tensor, int]]) -> dict:
        return {"pair": Pair(torch.stack([s[0] for s in samples]), [s[1] for s in samples]), "n": len(samples)}

    with TaskData(Samples(10), list(range(6)), 2, collate_fn=collate, device="cpu", pin_memory=True) as data:
        out = data.task(1)
        assert isinstance(out["pair"], Pair) and out["pair"].meta == [3, 4, 5] and out["n"] == 3
        assert out["pair"].x.device.type == "cpu"
        assert data.batch([0, 1])["n"] == 6


def test_iterable_datasets_are_refused_with_advice() -> None:
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(10))

    with pytest.raises(TypeError, match=r"map-style dataset.*Materialise"):
        TaskData(Stream(), [0, 1], 1)


def test_task_data_argument_errors() -> None:
    dataset = Samples(5)
    with pytest.raises(ValueError, match=r"^indices\[1\]: 5 is out of range"):
        TaskData(dataset, [0, 5], 1)
    with pytest.raises(ValueError, match=r"^indices\[0\]:"):
        TaskData(dataset, [-1], 1)
    with pytest.raises(ValueError, match=r"^num_tasks:"):
        TaskData(dataset, [0, 1], 3)
    with TaskData(dataset, [0, 1], 2) as data:
        with pytest.raises(IndexError, match=r"^task: must be an integer in \[0, 2\)"):
            data.task(2)
        with pytest.raises(IndexError):
            data.prefetch([True])


# -- balanced counts and shards ---------------------------------------------------------------------


def profiles_for(speeds: Sequence[float], per_sample: float = 0.01) -> list[WorkerProfile]:
    return [WorkerProfile(0.0, per_sample / s, 0.2 * per_sample / s) for s in speeds]


def test_balanced_counts_follow_speed() -> None:
    counts = balanced_counts(70, profiles_for([1, 2, 4]))
    assert sum(counts) == 70 and counts[0] < counts[1] < counts[2]
    assert counts == [10, 20, 40]
    assert balanced_counts(6, profiles_for([1, 1, 1])) == [2, 2, 2]


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 300),
    speeds=st.lists(st.floats(0.01, 100), min_size=1, max_size=8),
)
def test_balanced_counts_sum_and_give_every_rank_a_sample(total: int, speeds: list[float]) -> None:
    profiles = profiles_for(speeds)
    counts = balanced_counts(total, profiles)
    assert sum(counts) == total and min(counts) >= 0
    if total >= len(speeds):
        assert min(counts) >= 1
    assert counts == balanced_counts(total, profiles)  # deterministic


@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=6))
def test_shards_partition_the_batch_in_rank_order(counts: list[int]) -> None:
    batch = list(range(100, 100 + sum(counts)))
    shards = [shard(batch, counts, r) for r in range(len(counts))]
    assert [len(s) for s in shards] == counts
    assert [i for s in shards for i in s] == batch


def test_shard_errors() -> None:
    with pytest.raises(ValueError, match=r"^counts: sum to 3"):
        shard([1, 2], [1, 2], 0)
    with pytest.raises(ValueError, match=r"^rank:"):
        shard([1, 2], [1, 1], 2)
    with pytest.raises(ValueError, match=r"^counts\[0\]:"):
        shard([1, 2], [-1, 3], 0)
