"""What both codedgrad strategies share: their state in Lightning checkpoints, atomic checkpoint files,
their registry entry, a process group that survives torchrun's restarts, and a clean exit for it."""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from typing_extensions import override

from codedgrad.lightning.checkpoint_io import AtomicCheckpointIO

__all__ = ["CodedgradStrategy", "attempt_store", "destroy_at_exit"]


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._checkpoint_io is None:  # the user's checkpoint_io (or Trainer plugin) wins
            self._checkpoint_io = AtomicCheckpointIO()

    @override
    def setup_distributed(self) -> None:
        # Under torchrun's agent store, create the process group on a namespace of this attempt (the
        # base class then finds it initialised and only sets its ranks).
        store = attempt_store(self._timeout) if not dist.is_initialized() else None
        if store is not None:
            self.set_world_ranks()
            dist.init_process_group(
                self._get_process_group_backend(),
                store=store,
                rank=self.global_rank,
                world_size=self.world_size,
                timeout=self._timeout,
                device_id=self.root_device if self.root_device.type != "cpu" else None,  # as DDPStrategy does
            )
        super().setup_distributed()

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


def attempt_store(timeout: Any) -> dist.Store | None:
    """A client of torchrun's Store in a namespace of this restart attempt; None where that is not safe.

    torchrun (``--max-restarts``) restarts the workers on the *same* Store, and ``init_process_group``
    over ``env://`` uses it without an attempt prefix (``torch/distributed/rendezvous.py``, torch
    2.13): a restarted gloo group then reads the dead attempt's addresses and fails to connect
    ("Connection refused") in most restarts, and every later Store key (codedgrad's step protocol
    included) could meet the previous attempt's. One ``PrefixStore`` per attempt keeps them apart.
    """
    # The restart count is the same on every worker only with one agent: a multi-node job's agents count
    # differently (a healthy node restarts for a waiting node without counting), so there torch's
    # behaviour is kept.
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or os.environ.get("GROUP_WORLD_SIZE") != "1":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout if timeout is not None else timedelta(minutes=30),
    )
    return dist.PrefixStore(f"codedgrad/attempt/{attempt}", client)


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
