"""Which ranks share a compute device: the test behind ``spare_work="auto"``.

Spare work (an idle rank computing another rank's open tasks) buys time only with capacity that
would otherwise sit idle. When ranks share a device (several ranks on one GPU, or more CPU threads
than cores on a host) a helper's compute is taken from the rank it helps: the benchmark of the
alternatives measured spare work making the coded step 1.3-1.5x slower there (docs/benchmarks.md).
So ``"auto"`` turns spare work on only when every rank has its device to itself.

Each rank describes its *seat* (host, device, threads, CPUs); the seats are exchanged through the
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

__all__ = ["DeviceSeat", "SeatError", "shared_devices"]


class SeatError(ValueError):
    """A rank's published seat is not one (corrupted Store data, or another codedgrad version)."""


@dataclass(frozen=True)
class DeviceSeat:
    """Where one rank computes.

    Attributes:
        host: the machine's name.
        device: ``"cpu"``, or an accelerator's identity: a GPU's UUID where torch reports one, else
            ``<type>:<physical index>`` (a CUDA index mapped through ``CUDA_VISIBLE_DEVICES``, so two
            ranks that see different GPUs as index 0 differ, and the same GPU listed in different
            orders is one).
        threads: torch's intra-op threads of this rank (what it runs on a CPU at once).
        cpus: the CPUs this process may run on (its affinity set).
    """

    host: str
    device: str
    threads: int
    cpus: tuple[int, ...]

    @classmethod
    def here(cls, device: torch.device) -> DeviceSeat:
        """This process's seat for a model on ``device``."""
        try:
            cpus = tuple(sorted(os.sched_getaffinity(0)))
        except (AttributeError, OSError):  # not Linux: every CPU of the machine
            cpus = tuple(range(os.cpu_count() or 1))
        name = "cpu"
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            physical = visible[index] if index < len(visible) else str(index)
            name = f"cuda:{uuid}" if uuid is not None else f"cuda:{physical}"
        elif device.type != "cpu":  # another accelerator (xpu, mps, hpu, ...): by type and index
            name = f"{device.type}:{device.index if device.index is not None else 0}"
        return cls(socket.gethostname(), name, torch.get_num_threads(), cpus)

    def to_bytes(self) -> bytes:
        """The seat as the JSON bytes a rank publishes through the Store."""
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceSeat:
        """A seat from :meth:`to_bytes`'s bytes; :class:`SeatError` if they are not one."""
        try:
            values = json.loads(data.decode())
            return cls(
                str(values["host"]),
                str(values["device"]),
                int(values["threads"]),
                tuple(int(c) for c in values["cpus"]),
            )
        except (UnicodeDecodeError, ValueError, TypeError, KeyError, RecursionError) as error:
            raise SeatError(f"not a device seat ({type(error).__name__}: {error})"[:200]) from None


def shared_devices(seats: Sequence[DeviceSeat]) -> list[str]:
    """What ranks share, one line per shared device (empty when every rank has its own).

    A GPU (or other accelerator) is shared when two ranks on one host name the same device; a
    host's CPUs are shared when its CPU ranks run more threads in all than the CPUs their affinity
    sets cover together (ranks pinned to different cores share nothing). A CPU quota set by a
    container (cgroup ``cpu.max``) is not seen.

    >>> cpu = DeviceSeat("a", "cpu", threads=1, cpus=(0, 1))
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
            cores = len(set().union(*(seats[r].cpus for r in ranks)))
            if threads > cores:
                listed = ", ".join(map(str, ranks))
                problems.append(f"host {host}: ranks {listed} run {threads} threads on {cores} cores")
        elif len(ranks) > 1:
            problems.append(f"host {host}: ranks {', '.join(map(str, ranks))} share {device}")
    return problems
