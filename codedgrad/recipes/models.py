"""Small models for the recipes: an MLP, a CNN for 8×8 digits and a character-level transformer.

None uses BatchNorm (its batch statistics couple the samples of a batch, so the mean loss is no longer
a mean of independent per-task losses and coded steps would not be exact) and dropout is off by
default (unseeded per-rank randomness breaks exactness too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["MLP", "CharTransformer", "DigitsCNN", "build_model"]


class MLP(nn.Module):
    """A fully connected network on flattened inputs.

    Args:
        in_features: size of one flattened input.
        out_features: classes (classification) or targets (regression).
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer (0 keeps steps exact).
    """

    def __init__(self, in_features: int, out_features: int, hidden: tuple[int, ...] = (64, 64), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions and a linear head for 1×8×8 images.

    Args:
        num_classes: output classes.
        channels: channels of the two convolutions.
        dropout: dropout before the head (0 keeps steps exact).
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32), dropout: float = 0.0):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8×8 -> 4×4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c2 * 4 * 4, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (B, 8, 8): add the channel
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class CharTransformer(nn.Module):
    """A causal transformer encoder predicting the next character at every position.

    Args:
        vocab_size: number of distinct characters.
        seq_len: maximum sequence length (size of the learned position table).
        d_model: embedding width.
        heads: attention heads.
        layers: encoder layers.
        ff: width of the feed-forward block.
        dropout: dropout inside the layers (0 keeps steps exact).
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        ff: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.zeros(seq_len, d_model))
        nn.init.normal_(self.position, std=1.0 / math.sqrt(d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=dropout, batch_first=True)
        # enable_nested_tensor only matters with padding masks; off, it also avoids a warning.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        h = self.embed(tokens) + self.position[:length]
        return self.head(self.encoder(h, mask=mask.to(h.dtype), is_causal=True))


def build_model(cfg: Mapping[str, Any], data: Mapping[str, Any]) -> nn.Module:
    """Build the model named ``cfg["name"]`` for a data set described by ``data``.

    Args:
        cfg: the ``model`` config group (``name`` plus the model's keyword arguments).
        data: the data module's :meth:`describe` (``kind``, ``input_shape``, ``num_outputs``, …).

    Raises:
        ValueError: an unknown model, or a model that does not fit the data (e.g. a CNN on text).
    """
    args = {k: v for k, v in cfg.items() if k != "name"}
    for key in ("hidden", "channels"):
        if key in args:
            args[key] = tuple(args[key])
    name, kind = cfg["name"], data["kind"]
    if name == "mlp":
        if kind == "text":
            raise ValueError("model=mlp: needs vector inputs; use model=transformer for data=text")
        return MLP(math.prod(data["input_shape"]), data["num_outputs"], **args)
    if name == "cnn":
        if tuple(data["input_shape"]) != (8, 8):
            raise ValueError(f"model=cnn: expects 8×8 images (data=digits), got inputs of shape {data['input_shape']}")
        return DigitsCNN(data["num_outputs"], **args)
    if name == "transformer":
        if kind != "text":
            raise ValueError(f"model=transformer: expects character sequences (data=text), got data of kind {kind!r}")
        return CharTransformer(data["num_outputs"], data["input_shape"][0], **args)
    raise ValueError(f"model.name: unknown model {name!r} (known: mlp, cnn, transformer)")
