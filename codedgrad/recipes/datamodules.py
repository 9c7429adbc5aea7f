"""LightningDataModules for the recipes; nothing is downloaded.

* ``digits``: scikit-learn's handwritten digits (1797 8×8 images, shipped inside the package);
* ``text``: characters of the Python standard library's own source files (present on every machine),
  cut into fixed-length sequences for next-character prediction;
* ``regression``: a generated linear regression set with Gaussian noise.

Every split and every generated value comes from ``seed``, so all ranks (and reruns) see the same
data. Train loaders drop the last short batch: a coded step splits a batch into equal tasks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsData", "RegressionData", "TextData", "build_datamodule", "stdlib_dir", "stdlib_files"]


def stdlib_dir() -> Path:
    """The directory of the standard library's pure-Python modules (where ``os.py`` lives)."""
    return Path(os.__file__).resolve().parent


def stdlib_files(names: Sequence[str] | None = None, num_files: int = 8) -> list[Path]:
    """The standard-library source files the text data reads, in a deterministic order.

    Args:
        names: file names relative to :func:`stdlib_dir`; None takes the first ``num_files`` ``*.py``
            files in sorted order.
        num_files: how many files to take when ``names`` is None.

    Raises:
        FileNotFoundError: a named file is missing, or the directory holds no ``.py`` file.
    """
    root = stdlib_dir()
    if names is not None:
        paths = [root / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"data.files: not in the standard library: {', '.join(missing)}")
        return paths
    paths = sorted(p for p in root.glob("*.py") if p.is_file())
    if not paths:
        raise FileNotFoundError(f"data: no .py files in the standard library directory {root}")
    return paths[:num_files]


class _TensorData(pl.LightningDataModule):
    """Shared loaders over in-memory tensors, split into train and validation by a seeded permutation."""

    kind = ""

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size: must be >= 1, got {batch_size}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"data.val_fraction: must be in [0, 1), got {val_fraction}")
        self.batch_size, self.val_fraction, self.seed = batch_size, val_fraction, seed

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @cached_property
    def _split(self) -> tuple[TensorDataset, TensorDataset]:
        x, y = self._tensors()
        order = torch.from_numpy(np.random.default_rng(self.seed).permutation(len(x)))
        n_val = round(self.val_fraction * len(x))
        val, train = order[:n_val], order[n_val:]
        return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])

    @property
    def train_set(self) -> TensorDataset:
        return self._split[0]

    @property
    def val_set(self) -> TensorDataset:
        return self._split[1]

    def describe(self) -> dict[str, Any]:
        """What a model needs to know: ``kind``, ``input_shape`` (one sample) and ``num_outputs``."""
        x, _ = self.train_set[0]
        return {"kind": self.kind, "input_shape": tuple(x.shape), "num_outputs": self._num_outputs()}

    def _num_outputs(self) -> int:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        # A fixed generator: the single-process shuffle does not depend on other uses of the global RNG
        # (under DDP Lightning swaps in a DistributedSampler, seeded by itself).
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class DigitsData(_TensorData):
    """scikit-learn's 8×8 handwritten digits, pixels scaled to [0, 1]; targets are class indices."""

    kind = "classification"

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.datasets import load_digits  # imported here: only this data set needs it

        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32)
        return x, torch.tensor(digits.target, dtype=torch.long)

    def _num_outputs(self) -> int:
        return 10


class TextData(_TensorData):
    """Next-character prediction on standard-library source code.

    Args:
        seq_len: characters per input sequence (targets are the same characters shifted by one).
        files: file names relative to :func:`stdlib_dir`, or None for the first ``num_files`` sorted.
        num_files: files to read when ``files`` is None.
        max_chars: the text is cut to this many characters.
        batch_size, val_fraction, seed: as for every data module.
    """

    kind = "text"

    def __init__(
        self,
        seq_len: int = 64,
        files: Sequence[str] | None = None,
        num_files: int = 8,
        max_chars: int = 200_000,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if seq_len < 1:
            raise ValueError(f"data.seq_len: must be >= 1, got {seq_len}")
        self.seq_len, self.max_chars = seq_len, max_chars
        self.files = stdlib_files(list(files) if files is not None else None, num_files)

    @cached_property
    def text(self) -> str:
        """The concatenated source text (files joined in order, cut to ``max_chars``)."""
        parts = [p.read_text(encoding="utf-8", errors="replace") for p in self.files]
        return "\n".join(parts)[: self.max_chars]

    @cached_property
    def vocab(self) -> list[str]:
        """The sorted distinct characters of :attr:`text`; a character's index is its token."""
        return sorted(set(self.text))

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = {c: i for i, c in enumerate(self.vocab)}
        tokens = torch.tensor([index[c] for c in self.text], dtype=torch.long)
        n = (len(tokens) - 1) // self.seq_len
        if n < 2:
            raise ValueError(f"data: {len(tokens)} characters give fewer than 2 sequences of {self.seq_len}")
        x = tokens[: n * self.seq_len].view(n, self.seq_len)
        y = tokens[1 : n * self.seq_len + 1].view(n, self.seq_len)
        return x, y

    def _num_outputs(self) -> int:
        return len(self.vocab)


class RegressionData(_TensorData):
    """A generated linear regression set: ``y = x·w + noise``, with x and w standard normal.

    Args:
        num_samples: samples generated.
        num_features: features per sample.
        noise: standard deviation of the additive Gaussian noise.
        batch_size, val_fraction, seed: as for every data module.
    """

    kind = "regression"

    def __init__(self, num_samples: int = 2048, num_features: int = 16, noise: float = 0.1, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_samples, self.num_features, self.noise = num_samples, num_features, noise

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, 1])  # a stream of its own, apart from the split's
        x = rng.standard_normal((self.num_samples, self.num_features))
        w = rng.standard_normal((self.num_features, 1))
        y = x @ w + self.noise * rng.standard_normal((self.num_samples, 1))
        return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)

    def _num_outputs(self) -> int:
        return 1


_DATA = {"digits": DigitsData, "text": TextData, "regression": RegressionData}


def build_datamodule(cfg: Mapping[str, Any], seed: int = 0) -> _TensorData:
    """Build the data module named ``cfg["name"]``; the other keys are its keyword arguments.

    Args:
        cfg: the ``data`` config group.
        seed: used unless the group sets its own ``seed``.
    """
    args = {k: v for k, v in cfg.items() if k != "name"}
    args.setdefault("seed", seed)
    try:
        cls = _DATA[cfg["name"]]
    except KeyError:
        raise ValueError(f"data.name: unknown data set {cfg['name']!r} (known: {', '.join(_DATA)})") from None
    return cls(**args)
