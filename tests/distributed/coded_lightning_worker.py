"""Worker for tests/test_lightning_coded.py: strategy="coded" with an unchanged LightningModule.

Under torchrun (3 ranks, gloo, ``64-true``, emulated speeds 1, 2, 4 and a 1.5 s stall of rank 1 at
step 2): a 100-sample data set with batch_size 8 per device gives DDP's global batches of 24, 24, 24,
24 and a ragged 6 per epoch (12 tasks: the ragged batch has 6 empty ones). Gradient clipping and a
per-step LR scheduler are on. Each rank computes the single-process reference itself (one process,
the same global batches from GlobalBatchSampler(world_size=3), a plain optimizer). Runs, in order:

1. fit 2 epochs with validation inside and a checkpoint after each epoch, then ``validate`` and ``test``;
2. a new Trainer resumes from the checkpoint of epoch 0 to 2 epochs;
3. fit 1 epoch with ``32-true`` and with ``bf16-mixed``;
4. settings refused at setup (unknown code, redundancy 0.5, accumulate_grad_batches=2, an iterable dataset);
5. a SIGTERM on rank 1 at step 3 stops every rank at the same step.

With ``--launcher`` (run by plain ``python``, no torchrun): Lightning's own launcher starts 2 ranks,
one epoch in ``64-true``, compared with the 2-rank reference.

Usage: ``torchrun --nproc-per-node 3 coded_lightning_worker.py OUT_DIR`` or
``python coded_lightning_worker.py OUT_DIR --launcher``; writes ``OUT_DIR/rank{r}.json``. The suite
runs the torchrun part through tests/distributed/lightning_worker.py, in one launch with the balanced checks.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, Dataset

import codedgrad.lightning  # noqa: F401  (registers strategy="coded")
from codedgrad.data import GlobalBatchSampler
from codedgrad.emulate import Heterogeneity
from codedgrad.lightning import CodedStrategy
from tests.distributed.lightning_data import Recording, Stream, make_data, make_net, quiet_trainer

N, EVAL_N, BATCH = 100, 24, 8
LR, MOMENTUM, CLIP, LR_STEP, LR_GAMMA = 0.1, 0.9, 0.5, 4, 0.5
STALL = (1, 2, 1.5)  # rank 1 stalls 1.5 s in its first task of engine step 2
# Ranks 0 and 2 spend 0.3 s on their first task of step 2, so that rank 1 is inside its first task
# (and stalls) before they could cover its share: with 1-2 ms tasks a rank 1 that came 20-40 ms late
# found step 2 decided and never stalled.
PACE = ((0, 2, 0.3), (2, 2, 0.3))
EMULATE = Heterogeneity(speeds=(1.0, 2.0, 4.0), base=0.002, jitter=0.2, seed=0, forced_stalls=(STALL, *PACE))
TIMEOUT = 60.0


class Module(pl.LightningModule):
    """An ordinary LightningModule: nothing in it knows about codedgrad (the hooks only record)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()
        self.before_backward: list[float] = []
        self.grad_norms: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        loss = nn.functional.mse_loss(out, y)
        self.log("train_loss", loss, sync_dist=True, prog_bar=True)
        self.log("train_mae", (out - y).abs().mean(), sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), sync_dist=True)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.before_backward.append(float(loss))

    def on_after_backward(self) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.cat([g.reshape(-1) for g in grads]).norm()) if grads else 0.0)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=LR_STEP, gamma=LR_GAMMA)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Recorder(Callback):
    """Per training step: the engine's report and the logged (synchronised) values."""

    def __init__(self, sigterm_at: int | None = None) -> None:
        self.reports: list[dict] = []
        self.starts: list[float] = []
        self.logged: list[float] = []
        self.logged_mae: list[float] = []  # a metric other than the loss, logged with sync_dist=True
        self.engine_at_start: dict | None = None
        self.sigterm_at = sigterm_at

    def on_train_start(self, trainer, pl_module) -> None:
        engine = trainer.strategy.engine
        self.engine_at_start = {"step": engine.step_index, "plan_version": engine.plan_version}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.time())
        if self.reports:  # the previous step's logged value is in callback_metrics by now
            self.logged.append(logged_loss(trainer))
            self.logged_mae.append(logged_loss(trainer, "train_mae"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        report = trainer.strategy.last_report
        self.reports.append(
            {
                "step": report.step,
                "ahead": report.ahead,
                "computed": report.computed,
                "used": report.used,
                "spare": report.spare,
                "plan_version": report.plan_version,
                "direct": report.direct,
                "buckets_overlapped": report.buckets_overlapped,
                "loss": report.loss,
                "output_loss": float(outputs["loss"]),
                "samples": len(batch),
                "start": self.starts[-1],
                "end": time.time(),
            }
        )
        if self.sigterm_at is not None and trainer.global_rank == 1 and trainer.global_step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_end(self, trainer, pl_module) -> None:
        self.logged.append(logged_loss(trainer))
        self.logged_mae.append(logged_loss(trainer, "train_mae"))


def logged_loss(trainer: pl.Trainer, key: str = "train_loss") -> float:
    """A logged training value (NaN if absent)."""
    value = trainer.callback_metrics.get(key)
    return float("nan") if value is None else float(value)


def strategy(**kwargs) -> CodedStrategy:
    # spare_work=True: the stall test is about spare work covering a stalled rank, so it does not rest
    # on what "auto" resolves to (on here, with sleep emulation).
    defaults = {"emulate": EMULATE, "timeout": TIMEOUT, "replan_every": 4, "spare_work": True}
    return CodedStrategy(**{**defaults, **kwargs})


def trainer_for(out_dir: Path, precision: str, epochs: int, callbacks: list, devices: int = 3, **kwargs) -> pl.Trainer:
    chosen = kwargs.pop("strategy", None) or strategy()
    return quiet_trainer(out_dir, chosen, devices, precision, epochs, callbacks, gradient_clip_val=CLIP, **kwargs)


def eval_loader(seed: int) -> DataLoader:
    return DataLoader(Recording(EVAL_N, seed), batch_size=4)


def reference(epochs: int, dtype: torch.dtype, world: int = 3) -> tuple[torch.Tensor, list[float]]:
    """One process over the same global batches: final parameters and per-step losses (and MAEs in MAES)."""
    data = Recording(N, 0)
    net = make_net().to(dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=LR_STEP, gamma=LR_GAMMA)
    sampler = GlobalBatchSampler(N, BATCH, world, shuffle=True, seed=0)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            x, y = data.x[batch].to(dtype), data.y[batch].to(dtype)
            out = net(x)
            loss = nn.functional.mse_loss(out, y)
            MAES.setdefault((epochs, str(dtype), world), []).append(float((out - y).abs().mean()))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss))
    return flat(net), losses


MAES: dict[tuple, list[float]] = {}  # reference per-step mean absolute errors, by reference() arguments


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


def refused(out_dir: Path, make_strategy: dict | None = None, train: Dataset | None = None, **kwargs) -> str | None:
    try:
        trainer = trainer_for(out_dir, "64-true", 1, [], strategy=strategy(**(make_strategy or {})), **kwargs)
        trainer.fit(Module(), DataLoader(train if train is not None else Recording(N, 0), batch_size=BATCH))
    except (ValueError, TypeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def fit_summary(model: Module, recorder: Recorder, want: torch.Tensor, losses: list[float], first: int = 0) -> dict:
    return {
        "max_abs_diff": float((flat(model) - want).abs().max()),
        "parameters": flat(model).tolist(),
        "reports": recorder.reports,
        "logged": recorder.logged,
        "reference_losses": losses[first:],
        "before_backward": model.before_backward,
        "grad_norms": model.grad_norms,
        "engine_at_start": recorder.engine_at_start,
    }


def main_torchrun(out_dir: Path) -> None:
    rank = int(os.environ["RANK"])
    result: dict = {"rank": rank}

    # 1. fit 2 epochs, validation inside, a checkpoint after each epoch; then validate and test.
    train = Recording(N, 0)
    recorder = Recorder()
    checkpoint = ModelCheckpoint(dirpath=out_dir / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = trainer_for(out_dir, "64-true", 2, [recorder, checkpoint], num_sanity_val_steps=2)
    model = Module()
    trainer.fit(model, DataLoader(train, batch_size=BATCH, shuffle=True), eval_loader(1))
    want, losses = reference(2, torch.float64)
    result["fit"] = fit_summary(model, recorder, want, losses)
    result["fit"]["logged_mae"] = recorder.logged_mae
    result["fit"]["reference_maes"] = MAES[(2, str(torch.float64), 3)]
    result["fit"]["reads"] = train.reads
    result["fit"]["loaded"] = {str(k): v for k, v in trainer.strategy.loaded.items()}
    result["fit"]["split"] = trainer.strategy.split  # None after teardown
    net = make_net().double()
    torch.nn.utils.vector_to_parameters(want, net.parameters())
    validated = trainer.validate(model, eval_loader(1))
    tested = trainer.test(model, eval_loader(2))
    result["eval"] = {"val_loss": validated[0]["val_loss"], "test_loss": tested[0]["test_loss"]}
    for name, seed in (("val_loss", 1), ("test_loss", 2)):
        x, y = make_data(EVAL_N, seed)
        result["eval"][f"{name}_reference"] = float(nn.functional.mse_loss(net(x.double()), y.double()))
    saved = torch.load(out_dir / "ckpt" / "epoch=0.ckpt", weights_only=False)["codedgrad_coded"]
    result["checkpoint"] = {"step": saved["engine"]["step"], "version": saved["engine"]["planner"]["version"]}

    # 2. a new Trainer resumes from epoch 0's checkpoint to 2 epochs.
    recorder2 = Recorder()
    model2 = Module().double()  # the checkpoint's float64 weights are loaded before the precision conversion
    trainer2 = trainer_for(out_dir, "64-true", 2, [recorder2])
    trainer2.fit(
        model2, DataLoader(Recording(N, 0), batch_size=BATCH, shuffle=True), ckpt_path=out_dir / "ckpt" / "epoch=0.ckpt"
    )
    result["resume"] = fit_summary(model2, recorder2, want, losses, first=5)

    # 3. other precisions, one epoch each.
    for precision in ("32-true", "bf16-mixed"):
        model3 = Module()
        trainer_for(out_dir, precision, 1, []).fit(model3, DataLoader(Recording(N, 0), batch_size=BATCH, shuffle=True))
        want1, _ = reference(1, torch.float32)
        result[precision] = {
            "max_abs_diff": float((flat(model3) - want1).abs().max()),
            "parameters": flat(model3).tolist(),
            "finite": bool(torch.isfinite(flat(model3)).all()),
        }

    # 3b. a plan with nothing to decide (Ω = 1, no spare work) and gradient buckets of one or two
    # parameters: once measured, steps run direct, their buckets reduced during the last chunk's backward.
    recorder3 = Recorder()
    direct = strategy(redundancy=1.0, spare_work=False, replan_every=2, max_steps_ahead=1, bucket_cap_mb=1e-4)
    model3 = Module()
    trainer_for(out_dir, "64-true", 4, [recorder3], strategy=direct).fit(
        model3, DataLoader(Recording(N, 0), batch_size=BATCH, shuffle=True)
    )
    want4, losses4 = reference(4, torch.float64)
    result["direct_overlapped"] = fit_summary(model3, recorder3, want4, losses4)

    # 4. settings refused on every rank at setup.
    result["refused"] = {
        "code": refused(out_dir, {"code": "nope"}),
        "redundancy": refused(out_dir, {"redundancy": 0.5}),
        "accumulation": refused(out_dir, accumulate_grad_batches=2),
        "iterable": refused(out_dir, train=Stream()),
    }

    # 5. SIGTERM on rank 1 after step 3: every rank stops at the start of step 3 + max_steps_ahead + 2.
    recorder5 = Recorder(sigterm_at=3)
    trainer5 = trainer_for(out_dir, "64-true", 4, [recorder5], strategy=strategy(max_steps_ahead=1))
    try:
        trainer5.fit(Module(), DataLoader(Recording(N, 0), batch_size=BATCH, shuffle=True))
        stopped = False
    except SIGTERMException:
        stopped = True
    result["sigterm"] = {
        "stopped": stopped,
        "global_step": trainer5.global_step,
        "stop_step": trainer5.strategy.stop_step,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


def main_launcher(out_dir: Path) -> None:
    recorder = Recorder()
    model = Module()
    trainer = trainer_for(out_dir, "64-true", 1, [recorder], devices=2, strategy="coded")
    trainer.fit(model, DataLoader(Recording(N, 0), batch_size=BATCH, shuffle=True))
    want, losses = reference(1, torch.float64, world=2)
    result = {"rank": trainer.global_rank, "world_size": trainer.world_size}
    result.update(fit_summary(model, recorder, want, losses))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main() -> None:
    warnings.filterwarnings("ignore")  # Lightning's advice on workers and logging is noise here
    out_dir = Path(sys.argv[1])
    if "--launcher" in sys.argv:
        main_launcher(out_dir)
    else:
        main_torchrun(out_dir)


if __name__ == "__main__":
    main()
