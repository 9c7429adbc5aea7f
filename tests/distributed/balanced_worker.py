"""torchrun worker for tests/test_lightning_balanced.py: strategy="balanced", 3 ranks, gloo, many checks.

Emulated speeds 1, 2, 4 (per-sample delays). A 100-sample data set with batch_size 8 per device gives
DDP global batches of 24, 24, 24, 24 and a ragged 6 per epoch. Each rank also computes the
single-process reference itself: one process, the same global batches (GlobalBatchSampler with
world_size 3), batch size 24, the same initial parameters and optimizer.

Runs, in order, in one process group (created by the first Trainer, destroyed at exit):

1. fit, 2 epochs, 64-true, validation inside fit, a checkpoint at the end (``last.ckpt``);
2. fit resumed from that checkpoint to 3 epochs, then ``validate`` and ``test`` on the same trainer;
   and fit resumed to 3 epochs from a checkpoint of step 7 (mid-epoch, written during fit 1);
3. fit 1 epoch with 32-true and with bf16-mixed;
4. settings the strategy refuses (gradient accumulation, an iterable dataset).

Usage: ``torchrun --nproc-per-node 3 balanced_worker.py OUT_DIR``; writes ``OUT_DIR/rank{r}.json``.
The suite runs it through tests/distributed/lightning_worker.py, in one launch with the coded checks.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import codedgrad.lightning  # noqa: F401  (registers strategy="balanced")
from codedgrad.data import GlobalBatchSampler
from codedgrad.emulate import Heterogeneity
from codedgrad.lightning import BalancedStrategy
from tests.distributed.lightning_data import Recording, Stream, make_data, make_net, quiet_trainer

N, EVAL_N, BATCH, WORLD = 100, 24, 8, 3
MID_STEP = 7  # a checkpoint in the second epoch (5 global batches per epoch): its batch 2 comes next
LR, MOMENTUM = 0.1, 0.9
SPEEDS = (1.0, 2.0, 4.0)
EMULATE = Heterogeneity(speeds=SPEEDS, base=0.01, jitter=0.2, seed=0)  # 10 ms per sample at speed 1


class Module(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about codedgrad."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


class Recorder(Callback):
    """Per training step: the global batch's counts and the logged (synchronised) loss."""

    def __init__(self) -> None:
        self.counts: list[list[int]] = []
        self.positions: list[list[int]] = []
        self.logged: list[float] = []
        self.profiles_at_start: list | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        profiles = trainer.strategy.profiles
        self.profiles_at_start = None if profiles is None else [[p.shift, p.mean, p.std] for p in profiles]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.counts:  # the previous step's logged value is in callback_metrics by now
            self.logged.append(float(trainer.callback_metrics["train_loss"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        position, counts = trainer.strategy.last_batch
        self.positions.append(list(position))
        self.counts.append(list(counts))

    def on_train_end(self, trainer, pl_module) -> None:
        self.logged.append(float(trainer.callback_metrics["train_loss"]))


def trainer_for(out_dir: Path, precision: str, epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    strategy = BalancedStrategy(replan_every=3, replan_threshold=0.05, emulate=EMULATE, timeout=timedelta(seconds=60))
    return quiet_trainer(out_dir, strategy, WORLD, precision, epochs, callbacks, **kwargs)


def loaders(train: Dataset) -> tuple[DataLoader, DataLoader]:
    return DataLoader(train, batch_size=BATCH, shuffle=True), DataLoader(Recording(EVAL_N, 1), batch_size=4)


def reference(epochs: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[float], list[list[int]]]:
    """One process over the same global batches: final parameters, per-step losses, the batches."""
    data = Recording(N, 0)
    net = make_net().to(dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    sampler = GlobalBatchSampler(N, BATCH, WORLD, shuffle=True, seed=0)
    losses, batches = [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            x, y = data.x[batch].to(dtype), data.y[batch].to(dtype)
            loss = nn.functional.mse_loss(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            batches.append(batch)
    return flat(net), losses, batches


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def refused(out_dir: Path, make_trainer_kwargs: dict, train: Dataset | None = None) -> str | None:
    trainer = trainer_for(out_dir, "64-true", 1, [], **make_trainer_kwargs)
    loader = DataLoader(train if train is not None else Recording(N, 0), batch_size=BATCH)
    try:
        trainer.fit(Module(), loader)
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def main() -> None:
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging is noise here
    run(Path(sys.argv[1]))


def run(out_dir: Path) -> None:
    """Every check above, in one process group; this rank's results go to ``out_dir/rank{r}.json``."""
    rank = int(os.environ["RANK"])
    result: dict = {"rank": rank}

    # 1. fit 2 epochs in float64, with validation and a checkpoint.
    train = Recording(N, 0)
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=out_dir / "ckpt", save_last=True, save_top_k=0)
    mid = ModelCheckpoint(dirpath=out_dir / "mid", filename="mid", every_n_train_steps=MID_STEP, save_top_k=-1)
    trainer = trainer_for(out_dir, "64-true", 2, [recorder, checkpoint, mid], num_sanity_val_steps=2)
    model = Module()
    trainer.fit(model, *loaders(train))
    want, losses, batches = reference(2, torch.float64)
    result["fit"] = {
        "max_abs_diff": float((flat(model) - want).abs().max()),
        "parameters": flat(model).tolist(),
        "counts": recorder.counts,
        "positions": recorder.positions,
        "logged_loss_diffs": [abs(a - b) for a, b in zip(recorder.logged, losses)],
        "logged_steps": len(recorder.logged),
        "reads": train.reads,
        "reference_batches": batches,
        "state": trainer.strategy.state_dict(),
    }

    # 2. resume to 3 epochs from the checkpoint, then the validation and test loops.
    recorder2 = Recorder()
    trainer2 = trainer_for(out_dir, "64-true", 3, [recorder2])
    # Lightning restores the weights before the precision plugin converts the module: a float32
    # module would round the checkpoint's float64 weights (as it would with strategy="ddp").
    model2 = Module().double()
    trainer2.fit(model2, *loaders(Recording(N, 0)), ckpt_path=str(out_dir / "ckpt" / "last.ckpt"))
    want3, losses3, _ = reference(3, torch.float64)
    validated = trainer2.validate(model2, DataLoader(Recording(EVAL_N, 1), batch_size=4))
    tested = trainer2.test(model2, DataLoader(Recording(EVAL_N, 2), batch_size=4))
    eval_reference = {}
    net = make_net().double()
    torch.nn.utils.vector_to_parameters(want3, net.parameters())
    for name, seed in (("val_loss", 1), ("test_loss", 2)):
        x, y = make_data(EVAL_N, seed)
        eval_reference[name] = float(nn.functional.mse_loss(net(x.double()), y.double()))
    result["resume"] = {
        "max_abs_diff": float((flat(model2) - want3).abs().max()),
        "profiles_at_start": recorder2.profiles_at_start,
        "counts": recorder2.counts,
        "positions": recorder2.positions,
        "logged_loss_diffs": [abs(a - b) for a, b in zip(recorder2.logged, losses3[10:])],
        "val_loss": validated[0]["val_loss"],
        "test_loss": tested[0]["test_loss"],
        "eval_reference": eval_reference,
    }

    # 2b. resume to 3 epochs from the mid-epoch checkpoint: the same parameters as without a break.
    recorder_mid = Recorder()
    model_mid = Module().double()
    trainer_for(out_dir, "64-true", 3, [recorder_mid]).fit(
        model_mid, *loaders(Recording(N, 0)), ckpt_path=str(out_dir / "mid" / "mid.ckpt")
    )
    saved = torch.load(out_dir / "mid" / "mid.ckpt", map_location="cpu", weights_only=False)
    result["resume_mid"] = {
        "max_abs_diff": float((flat(model_mid) - want3).abs().max()),
        "positions": recorder_mid.positions,
        "saved_trained": list(saved["codedgrad_balanced"]["trained"]),  # also in the strategy's own state
    }

    # 3. other precisions, one epoch each.
    for precision, dtype in (("32-true", torch.float32), ("bf16-mixed", torch.float32)):
        model3 = Module()
        trainer_for(out_dir, precision, 1, []).fit(model3, *loaders(Recording(N, 0)))
        want1, _, _ = reference(1, dtype)
        result[precision] = {
            "max_abs_diff": float((flat(model3) - want1).abs().max()),
            "parameters": flat(model3).tolist(),
            "finite": bool(torch.isfinite(flat(model3)).all()),
        }

    # 4. settings the strategy refuses, on every rank, before any training step.
    result["refused"] = {
        "accumulation": refused(out_dir, {"accumulate_grad_batches": 2}),
        "iterable": refused(out_dir, {}, Stream()),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
