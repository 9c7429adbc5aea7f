"""codedgrad: coded, heterogeneity-aware synchronous data parallelism with exact gradients.

The planner, simulators and codes need only numpy; the torch runtime is imported on first use, so
``codedgrad plan`` and ``codedgrad simulate`` start quickly.
"""

from codedgrad.profile import WorkerProfile

__all__ = ["CodedDataParallel", "CodedStepError", "StepReport", "WorkerProfile"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("CodedDataParallel", "CodedStepError", "StepReport"):
        from codedgrad import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'codedgrad' has no attribute {name!r}")
