"""Runtime: the coded step over torch.distributed, the coded all-reduce and its DDP hook.

* :mod:`~codedgrad.runtime.engine`: :class:`CodedDataParallel`, the module face that composes the rest;
* :mod:`~codedgrad.runtime.config`: :class:`EngineConfig`, validated and agreed by every rank;
* :mod:`~codedgrad.runtime.replan`: plans agreed by fingerprint, and this rank's measurements;
* :mod:`~codedgrad.runtime.policy`: whether an exchange of every rank's measurements switches plans;
* :mod:`~codedgrad.runtime.coordinator`: the step protocol on the c10d Store (commits, decision, arrival);
* :mod:`~codedgrad.runtime.step`: one step in flight, its phase and its :class:`StepReport`;
* :mod:`~codedgrad.runtime.compute`: the compute thread's tasks of a step (queue, spare work, commits);
* :mod:`~codedgrad.runtime.release`: the reduction of a decided step and the release thread;
* :mod:`~codedgrad.runtime.buffers`: flat per-(device, dtype) gradient buffers for one collective per bucket;
* :mod:`~codedgrad.runtime.hooks`: the coded all-reduce, also as a standard DDP communication hook.
"""

from codedgrad.runtime.config import ConfigurationError, EngineConfig
from codedgrad.runtime.coordinator import CodedStepTimeout, StepMismatchError, StoreStateError
from codedgrad.runtime.engine import CodedDataParallel
from codedgrad.runtime.hooks import CodedHookState, coded_allreduce_, coded_allreduce_hook
from codedgrad.runtime.release import CollectiveFailed
from codedgrad.runtime.step import CodedStepError, NonFiniteGradientError, StepPhase, StepReport

__all__ = [
    "CodedDataParallel",
    "CodedHookState",
    "CodedStepError",
    "CodedStepTimeout",
    "CollectiveFailed",
    "ConfigurationError",
    "EngineConfig",
    "NonFiniteGradientError",
    "StepMismatchError",
    "StepPhase",
    "StepReport",
    "StoreStateError",
    "coded_allreduce_",
    "coded_allreduce_hook",
]
