"""What both codedgrad strategies share: their state in Lightning checkpoints, their registry entry,
and a clean exit for the process group they start."""

from __future__ import annotations

import atexit
from typing import Any

import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from typing_extensions import override

__all__ = ["CodedgradStrategy", "destroy_at_exit"]


class CodedgradStrategy(DDPStrategy):
    """A DDP-based strategy of codedgrad: subclasses set the three class attributes below.

    Attributes:
        strategy_name: the name in Lightning's ``StrategyRegistry`` (``Trainer(strategy=...)``).
        description: the registry's description.
        checkpoint_key: where :meth:`checkpoint_state` is stored in a Lightning checkpoint.
    """

    strategy_name = "codedgrad"
    description = ""
    checkpoint_key = ""

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any] | None:
        """What goes into a checkpoint (None: nothing yet); :meth:`state_dict` by default."""
        return self.state_dict()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        state = self.checkpoint_state()
        if state is not None:
            checkpoint[self.checkpoint_key] = state
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        if self.checkpoint_key in checkpoint:
            self.load_state_dict(checkpoint[self.checkpoint_key])
        return checkpoint

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        # Not DDPStrategy's: that would register the "ddp" names for this class.
        if cls.strategy_name not in strategy_registry:
            strategy_registry.register(cls.strategy_name, cls, description=cls.description)


_DESTROY_REGISTERED = False


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def destroy_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, before its objects are torn down.

    A gloo group still alive at exit can abort the process under torchrun ("terminate called without
    an active exception", docs/design.md, "Facts about the stack"); Lightning registers the same
    clean-up for NCCL only (``lightning_fabric/utilities/distributed.py``, ``_init_dist_connection``).
    Not at teardown: a group destroyed and created again in the same torchrun job reads the first
    group's stale addresses from the agent's store and fails to connect, so a later
    ``trainer.validate`` or ``trainer.test`` in the same script could not start.
    """
    global _DESTROY_REGISTERED
    if not _DESTROY_REGISTERED:
        atexit.register(_destroy_process_group)
        _DESTROY_REGISTERED = True
