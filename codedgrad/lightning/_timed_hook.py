"""The coded all-reduce hook, noting when this rank's last gradient bucket became ready.

The time from the start of a training step to its last bucket's hook call is this rank's compute
(forward, backward and any emulated delay) without the wait for other ranks: DDP calls the hook as
soon as a bucket's gradients are ready, and the all-reduces run asynchronously.

``before_last``, when set, runs in the last bucket's hook before its time is noted and its all-reduce
starts: compute-mode emulation (codedgrad.emulate) sleeps there, in proportion to the compute so far.
"""

# No ``from __future__ import annotations``: DistributedDataParallel.register_comm_hook compares the
# hook's annotations with the real objects and rejects strings (docs/design.md, "Facts about the stack").

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from codedgrad.runtime import CodedHookState, coded_allreduce_hook

__all__ = ["TimedHookState", "timed_coded_hook"]


class TimedHookState:
    """State of :func:`timed_coded_hook`: the coded hook's state and the last bucket's ready time.

    Args:
        coded: the weights of the coded all-reduce (per-rank sample counts).
        cuda: record CUDA events instead of host clock readings (the host runs ahead of the GPU).
    """

    __slots__ = ("before_last", "coded", "cuda", "ready_event", "ready_time")

    def __init__(self, coded: CodedHookState, cuda: bool = False) -> None:
        self.coded = coded
        self.cuda = cuda
        self.ready_time: float | None = None
        self.ready_event: torch.cuda.Event | None = None
        self.before_last: Callable[[], object] | None = None


def timed_coded_hook(state: TimedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """:func:`codedgrad.runtime.coded_allreduce_hook`, after noting the time the bucket was ready."""
    if state.before_last is not None and bucket.is_last():
        before_last, state.before_last = state.before_last, None  # once per step
        before_last()
    if state.cuda:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        state.ready_event = event
    else:
        state.ready_time = time.perf_counter()
    return coded_allreduce_hook(state.coded, bucket)
