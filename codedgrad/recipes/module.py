"""One LightningModule for every recipe: a model, a task-appropriate mean loss and a metric.

``training_step`` returns the batch's *mean* loss: a coded strategy calls it on each task's samples
and reweights the tasks by their sizes, which is exact only for a mean over independent samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RecipeModule"]

_KINDS = ("classification", "text", "regression")


class RecipeModule(pl.LightningModule):
    """A model trained with the mean loss of its data's kind.

    Args:
        model: the network.
        kind: ``"classification"`` (cross-entropy and accuracy), ``"text"`` (cross-entropy over
            every position and next-character accuracy) or ``"regression"`` (mean squared error).
        optim: ``name`` (``sgd`` or ``adam``), ``lr`` and optionally ``momentum``, ``weight_decay``.
    """

    def __init__(self, model: nn.Module, kind: str, optim: Mapping[str, Any] | None = None):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind: must be one of {', '.join(_KINDS)}, got {kind!r}")
        self.model, self.kind = model, kind
        self.optim = dict(optim or {"name": "sgd", "lr": 0.1})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss_and_metric(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        x, y = batch
        out = self.model(x)
        if self.kind == "regression":
            return F.mse_loss(out, y), None
        logits = out.reshape(-1, out.shape[-1])  # text: every position is one prediction
        target = y.reshape(-1)
        accuracy = (logits.detach().argmax(-1) == target).to(logits.dtype).mean()
        return F.cross_entropy(logits, target), accuracy

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, accuracy = self._loss_and_metric(batch)
        batch_size = len(batch[0])
        self.log("train/loss", loss, on_step=True, prog_bar=True, sync_dist=True, batch_size=batch_size)
        if accuracy is not None:
            self.log("train/acc", accuracy, on_step=True, sync_dist=True, batch_size=batch_size)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, accuracy = self._loss_and_metric(batch)
        batch_size = len(batch[0])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        if accuracy is not None:
            self.log("val/acc", accuracy, sync_dist=True, batch_size=batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        args = {k: v for k, v in self.optim.items() if k != "name"}
        name = self.optim.get("name", "sgd")
        if name == "sgd":
            return torch.optim.SGD(self.parameters(), **args)
        if name == "adam":
            return torch.optim.Adam(self.parameters(), **args)
        raise ValueError(f"optim.name: unknown optimizer {name!r} (known: sgd, adam)")
