"""Trainer settings the codedgrad strategies cannot honour, refused (or warned about) at setup.

Both strategies weight each step's gradient by the global batch they computed; a per-step
collective or a per-rank clock would undo what the coded strategy removes (the per-step barrier),
and gradient accumulation would mix batches the weights do not describe.
"""

from __future__ import annotations

from typing import Any

from pytorch_lightning.callbacks import GradientAccumulationScheduler, ModelCheckpoint, Timer
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

__all__ = ["check_accumulation", "check_clock_triggers"]


def check_accumulation(trainer: Any, strategy: str) -> None:
    """Refuse gradient accumulation, also the kind a callback switches on later.

    Raises:
        ValueError: ``accumulate_grad_batches`` > 1 or a ``GradientAccumulationScheduler``.
    """
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            f"accumulate_grad_batches: strategy={strategy!r} does not support gradient accumulation (got "
            f"{trainer.accumulate_grad_batches}); raise the batch size instead: one step covers the whole global batch"
        )
    if any(isinstance(c, GradientAccumulationScheduler) for c in trainer.callbacks):
        raise ValueError(
            f"GradientAccumulationScheduler: strategy={strategy!r} does not support gradient accumulation; "
            "remove the callback and raise the batch size instead"
        )


def check_clock_triggers(trainer: Any, strategy: str) -> None:
    """Refuse validation on a per-rank clock; warn about clock-based stops and saves.

    Without a per-step barrier ranks cross a time threshold at different steps: a time-based
    ``val_check_interval`` would send one rank into validation while the others train (a hang), and
    ``max_time`` or a time-based ``ModelCheckpoint`` broadcast a decision every step.

    Raises:
        ValueError: a time-based ``val_check_interval``.
    """
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        raise ValueError(
            f"val_check_interval: strategy={strategy!r} has no per-step barrier, so ranks would reach a time "
            "threshold at different steps; give val_check_interval in batches or a fraction of the epoch"
        )
    clocked = [type(c).__name__ for c in trainer.callbacks if isinstance(c, Timer)]
    clocked += [
        "ModelCheckpoint(train_time_interval=…)"
        for c in trainer.callbacks
        if isinstance(c, ModelCheckpoint) and getattr(c, "_train_time_interval", None) is not None
    ]
    if clocked:
        rank_zero_warn(
            f"strategy={strategy!r}: {', '.join(clocked)} (max_time or a time-based checkpoint) broadcasts its "
            "decision at every step, which brings back a per-step barrier; a step count avoids it"
        )
