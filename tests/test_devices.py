"""Which ranks share a compute device (the test behind ``spare_work="auto"``), without processes."""

from __future__ import annotations

import pytest
import torch

from codedgrad.runtime.devices import DeviceSeat, SeatError, shared_devices


def cpu(host: str = "a", threads: int = 1, cores: int = 4) -> DeviceSeat:
    return DeviceSeat(host, "cpu", threads, tuple(range(cores)))


def test_cpu_ranks_share_a_host_when_their_threads_outnumber_its_cores():
    assert shared_devices([cpu(), cpu(), cpu(), cpu()]) == []  # 4 threads on 4 cores
    assert shared_devices([cpu(threads=2), cpu(threads=2), cpu()]) == ["host a: ranks 0, 1, 2 run 5 threads on 4 cores"]
    # The same ranks spread over two hosts share nothing.
    assert shared_devices([cpu("a", 2), cpu("a", 2), cpu("b", 2), cpu("b", 2)]) == []


def test_gpus_are_shared_only_by_ranks_on_one_host_naming_the_same_device():
    gpu = [DeviceSeat(host, f"cuda:GPU-{i}", 1, (0,)) for host, i in (("a", 1), ("a", 2), ("b", 1))]
    assert shared_devices(gpu) == []
    both = [*gpu, DeviceSeat("a", "cuda:GPU-2", 1, (0,))]
    assert shared_devices(both) == ["host a: ranks 1, 3 share cuda:GPU-2"]
    # GPU ranks' CPU threads do not count against the host's cores.
    assert shared_devices([DeviceSeat("a", f"cuda:GPU-{i}", 8, (0, 1)) for i in range(4)]) == []


def test_a_seat_travels_as_bytes_and_describes_this_process():
    seat = DeviceSeat.here(torch.device("cpu"))
    assert seat.device == "cpu" and seat.threads == torch.get_num_threads() and len(seat.cpus) >= 1
    assert DeviceSeat.from_bytes(seat.to_bytes()) == seat
    for bad in (b"", b"{}", b'{"host": "a"}', b"\xff", b'{"host": "a", "device": "cpu", "threads": 1, "cpus": 3}'):
        with pytest.raises(SeatError, match="not a device seat"):
            DeviceSeat.from_bytes(bad)


def test_ranks_pinned_to_their_own_cores_share_nothing():
    # Two ranks each pinned to one core (taskset, Slurm's binding): 2 threads on 2 cores together.
    assert shared_devices([DeviceSeat("a", "cpu", 1, (0,)), DeviceSeat("a", "cpu", 1, (1,))]) == []
    # Both pinned to the same core: shared.
    pinned = [DeviceSeat("a", "cpu", 1, (3,))] * 2
    assert shared_devices(pinned) == ["host a: ranks 0, 1 run 2 threads on 1 cores"]
