"""Which ranks share a compute device: the test behind ``spare_work="auto"``.

Spare work (an idle rank computing another rank's open tasks) buys time only with capacity that
would otherwise sit idle. When ranks share a device (several ranks on one GPU, or more CPU threads
than cores on a host) a helper's compute is taken from the rank it helps: the benchmark of the
alternatives measured spare work making the coded step 1.3-1.5x slower there (docs/benchmarks.md).
So ``"auto"`` turns spare work on only when every rank has its device to itself.

Each rank describes its *seat* (host, device, threads, cores); the seats are exchanged through the
Store once, at construction, and every rank reaches the same verdict from the same list.
"""

from __future__ import annotations

import json
import os
import socket
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

__all__ = ["DeviceSeat", "shared_devices"]


@dataclass(frozen=True)
class DeviceSeat:
    """Where one rank computes.

    Attributes:
        host: the machine's name.
        device: ``"cpu"``, or a GPU's identity (its UUID where torch reports one, else ``cuda:<index>``
            with ``CUDA_VISIBLE_DEVICES``, so two ranks that see different GPUs as index 0 differ).
        threads: torch's intra-op threads of this rank (what it runs on a CPU at once).
        cores: the CPUs this process may run on.
    """

    host: str
    device: str
    threads: int
    cores: int

    @classmethod
    def here(cls, device: torch.device) -> DeviceSeat:
        """This process's seat for a model on ``device``."""
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # not Linux
            cores = os.cpu_count() or 1
        name = "cpu"
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            name = f"cuda:{uuid}" if uuid is not None else f"cuda:{index}@{visible}"
        return cls(socket.gethostname(), name, torch.get_num_threads(), cores)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceSeat:
        values = json.loads(data.decode())
        return cls(str(values["host"]), str(values["device"]), int(values["threads"]), int(values["cores"]))


def shared_devices(seats: Sequence[DeviceSeat]) -> list[str]:
    """What ranks share, one line per shared device (empty when every rank has its own).

    A GPU is shared when two ranks on one host name the same device; a host's CPUs are shared when
    its CPU ranks run more threads in all than the cores one of them may use.

    >>> cpu = DeviceSeat("a", "cpu", threads=1, cores=2)
    >>> shared_devices([cpu, cpu])
    []
    >>> shared_devices([cpu, cpu, cpu])
    ['host a: ranks 0, 1, 2 run 3 threads on 2 cores']
    """
    by_device: dict[tuple[str, str], list[int]] = defaultdict(list)
    for rank, seat in enumerate(seats):
        by_device[seat.host, seat.device].append(rank)
    problems = []
    for (host, device), ranks in by_device.items():
        if device == "cpu":
            threads = sum(seats[r].threads for r in ranks)
            cores = max(seats[r].cores for r in ranks)
            if threads > cores:
                listed = ", ".join(map(str, ranks))
                problems.append(f"host {host}: ranks {listed} run {threads} threads on {cores} cores")
        elif len(ranks) > 1:
            problems.append(f"host {host}: ranks {', '.join(map(str, ranks))} share {device}")
    return problems
