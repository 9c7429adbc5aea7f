"""Runtime: the coded step over torch.distributed, the coded all-reduce and its DDP hook (DESIGN.md §3).

* :mod:`~codedgrad.runtime.engine`: :class:`CodedDataParallel`, the coded step as a sequence of phases;
* :mod:`~codedgrad.runtime.coordinator`: the step protocol on the c10d Store (commits, decision, arrival);
* :mod:`~codedgrad.runtime.buffers`: flat per-(device, dtype) gradient buffers for one collective per bucket;
* :mod:`~codedgrad.runtime.hooks`: the coded all-reduce, also as a standard DDP communication hook.
"""

from codedgrad.runtime.coordinator import CodedStepTimeout
from codedgrad.runtime.engine import CodedDataParallel, ConfigurationError, StepReport
from codedgrad.runtime.hooks import CodedHookState, coded_allreduce_, coded_allreduce_hook

__all__ = [
    "CodedDataParallel",
    "CodedHookState",
    "CodedStepTimeout",
    "ConfigurationError",
    "StepReport",
    "coded_allreduce_",
    "coded_allreduce_hook",
]
