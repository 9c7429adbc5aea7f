"""Data, a small net and a quiet Trainer shared by the Lightning strategy workers (balanced and coded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import Dataset, IterableDataset

FEATURES = 4


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=generator)
    return x, torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=generator)


class Recording(Dataset):
    """A map-style data set that records every index it is asked for."""

    def __init__(self, n: int, seed: int) -> None:
        self.x, self.y = make_data(n, seed)
        self.reads: list[int] = []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads.append(int(i))
        return self.x[i], self.y[i]


class Stream(IterableDataset):
    """An iterable data set, which both strategies refuse for training."""

    def __iter__(self):
        x, y = make_data(8, 0)
        return iter(zip(x, y))


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, 1))


def quiet_trainer(out_dir: Path, strategy: Any, devices: int, precision: str, epochs: int, callbacks: list, **kwargs):
    """A CPU Trainer without logger, progress bar or summary; checkpoints only with a ModelCheckpoint."""
    return pl.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=devices,
        precision=precision,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=str(out_dir),
        **kwargs,
    )
