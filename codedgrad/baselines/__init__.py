"""Baselines a user would pick instead of the coded step, with the same shape as the engine.

* :mod:`~codedgrad.baselines.drop_slowest`: :class:`DropSlowest`, synchronous SGD with backup workers
  (Chen et al.): the gradient of the first P − b ranks to finish, the b slowest dropped. Inexact.
* :mod:`~codedgrad.baselines.pulling`: :class:`DynamicPulling`, ranks pull fixed-size chunks of tasks
  from a shared counter until none are left, no plan. Exact.

Both are used like :class:`~codedgrad.CodedDataParallel`::

    baseline = DropSlowest(model, backups=1)            # or DynamicPulling(model, chunk=2)
    report = baseline.backward(batch_loss, tasks)       # batch_loss(task_ids) -> mean loss of those tasks
    optimizer.step()                                    # p.grad is the same on every rank

See docs/baselines.md for when each is the right choice and how they compare with the coded step.
"""

from codedgrad.baselines._common import BaselineReport, BaselineStepError
from codedgrad.baselines.drop_slowest import DropReport, DropSlowest
from codedgrad.baselines.pulling import DynamicPulling, PullReport, default_chunk

__all__ = [
    "BaselineReport",
    "BaselineStepError",
    "DropReport",
    "DropSlowest",
    "DynamicPulling",
    "PullReport",
    "default_chunk",
]
