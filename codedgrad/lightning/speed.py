"""Measuring one rank's compute speed per sample, step by step, for re-splitting a global batch.

A step's compute time runs from the start of its training step to the moment its last gradient
bucket is ready (noted by the comm hook, :mod:`codedgrad.lightning._timed_hook`): forward, backward
and any emulated delay, but not the wait for the other ranks in the all-reduce. Dividing by the
step's sample count gives per-sample times, fitted robustly (:func:`codedgrad.profile.fit_profile`)
so that a stall or the first, warming-up step barely moves the profile.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
import torch

from codedgrad.lightning._timed_hook import TimedHookState
from codedgrad.profile import WorkerProfile, fit_profile

__all__ = ["StepTimer"]


class StepTimer:
    """This rank's per-step compute times, and the per-sample profile they imply.

    Call :meth:`start` at the start of each training step and :meth:`finish` once that step's
    backward is over (at the latest, at the start of the next step); the very first step is left
    out (DDP builds its buckets and caches warm up).

    Args:
        hook_state: the comm hook's state, which notes when the last bucket was ready.
        window: how many recent steps the profile is fitted to.
    """

    def __init__(self, hook_state: TimedHookState, window: int = 64) -> None:
        self._hook = hook_state
        self._times: deque[float] = deque(maxlen=window)
        self._samples: deque[int] = deque(maxlen=window)
        self._started: float | torch.cuda.Event | None = None
        self._count = 0
        self._steps_seen = 0

    def start(self, samples: int) -> None:
        """A training step over ``samples`` samples starts now."""
        self.finish()
        self._hook.ready_time = None
        self._hook.ready_event = None
        if self._hook.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._started = event
        else:
            self._started = time.perf_counter()
        self._count = samples

    def finish(self) -> None:
        """Record the step started last, if its last bucket was seen (a step without one is dropped)."""
        started, self._started = self._started, None
        if started is None:
            return
        self._steps_seen += 1
        if self._steps_seen == 1:
            return  # the warm-up step
        if isinstance(started, torch.cuda.Event):
            if self._hook.ready_event is None:
                return
            self._hook.ready_event.synchronize()
            seconds = started.elapsed_time(self._hook.ready_event) / 1000.0
        else:
            if self._hook.ready_time is None:
                return
            seconds = self._hook.ready_time - started
        if seconds > 0 and self._count > 0:
            self._times.append(seconds)
            self._samples.append(self._count)

    @property
    def measurements(self) -> int:
        """How many steps the profile would be fitted to."""
        return len(self._times)

    def profile(self) -> WorkerProfile | None:
        """The per-sample profile of the recent steps (shift 0), or None before any measurement.

        The step-to-step spread of per-sample times shrinks like 1/√n over an n-sample batch; the
        std is scaled back by √n so that it describes one sample, as the planner expects.
        """
        if not self._times:
            return None
        samples = np.asarray(self._samples, dtype=np.float64)
        fitted = fit_profile(np.asarray(self._times) / samples)
        return WorkerProfile(0.0, fitted.mean, fitted.std * math.sqrt(float(np.median(samples))))
