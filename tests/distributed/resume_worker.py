"""Worker for tests/test_faults.py: an exact resume of ``strategy="coded"`` under torchrun's restarts.

``torchrun --standalone --max-restarts R --nproc-per-node 3 resume_worker.py OUT_DIR KILLS``: the
fit of tests/distributed/coded_lightning_worker.py (fp64, 100 samples, global batches of 24, 24, 24,
24 and a ragged 6 per epoch, clipping and a per-step LR scheduler, emulated speeds 1, 2, 4) for 2
epochs (10 optimizer steps), with a checkpoint every 2 steps (``save_last=True``) and
``ckpt_path="last"`` on every attempt. ``KILLS`` says what kills a rank on each attempt, in order:

``save@S``  rank 0 dies (SIGKILL) half-way through writing the first checkpoint file at global step S;
``task@S``  rank 1 dies inside its first task of the step that starts at global step S.

Each rank appends every step it completes to ``steps.rank{r}.jsonl`` (which attempt, the global step
after it, the batch's position and whether it is the global batch a single process would take
there), so the test sees what every attempt did, the killed ones included. The last attempt also
checks codedgrad's listening sockets around the fit, around an engine on its own, and against a bare
``dist.new_group``, and writes ``rank{r}.json``.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

import codedgrad.lightning  # noqa: F401  (registers strategy="coded")
import codedgrad.lightning.checkpoint_io as checkpoint_io
from codedgrad import CodedDataParallel
from codedgrad.data import GlobalBatchSampler
from codedgrad.emulate import Heterogeneity
from codedgrad.lightning import CodedStrategy
from tests.distributed import coded_lightning_worker as fit_worker
from tests.distributed.lightning_data import Recording, quiet_trainer

EPOCHS, STEPS = 2, 10
EMULATE = Heterogeneity(speeds=(1.0, 2.0, 4.0), base=0.002, jitter=0.2, seed=0)
TIMEOUT = 10.0  # also how long survivors of a kill inside a step hold up the restart (docs/reliability.md)
MARKER = "resume-test/attempt-0-was-here"  # a key attempt 0 leaves in the default Store


def listening_sockets() -> list[int]:
    """Local ports of the TCP sockets this process listens on (/proc/net/tcp{,6} matched to its fds)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.append(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


class Module(fit_worker.Module):
    """The coded Lightning worker's module; on a ``task@S`` attempt rank 1 dies inside a task."""

    def __init__(self, kill_task_at: int | None) -> None:
        super().__init__()
        self.kill_task_at = kill_task_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.kill_task_at is not None and self.global_rank == 1 and self.trainer.global_step == self.kill_task_at:
            record_kill(Path(os.environ["RESUME_OUT"]), "task", self.trainer.global_step)
            os.kill(os.getpid(), signal.SIGKILL)
        return loss


def record_kill(out_dir: Path, point: str, step: int) -> None:
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    path = out_dir / f"killed.attempt{attempt}.json"
    path.write_text(json.dumps({"point": point, "rank": int(os.environ["RANK"]), "step": step, "time": time.time()}))


def kill_half_way_through_saving(out_dir: Path, step: int) -> None:
    """Rank 0 writes half of the first checkpoint file of global step ``step``, then dies."""
    original = checkpoint_io._write_durably

    def write_half_then_die(path: Path, data: memoryview) -> None:
        if f"step={step}" not in path.name:
            return original(path, data)
        with open(path, "wb") as file:
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
        record_kill(out_dir, "save", step)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint_io._write_durably = write_half_then_die


class StepLog(Callback):
    """Appends each completed step to ``steps.rank{r}.jsonl``; checks the Store namespace at the start."""

    def __init__(self, out_dir: Path, attempt: int) -> None:
        self.out_dir = out_dir
        self.attempt = attempt
        self.sampler = GlobalBatchSampler(fit_worker.N, fit_worker.BATCH, 3, shuffle=True, seed=0)
        self.sockets: dict[str, list[int]] = {}

    def write(self, trainer: pl.Trainer, entry: dict) -> None:
        with open(self.out_dir / f"steps.rank{trainer.global_rank}.jsonl", "a") as log:
            log.write(json.dumps({"attempt": self.attempt, **entry}) + "\n")

    def setup(self, trainer, pl_module, stage) -> None:
        self.sockets["process_group"] = listening_sockets()  # the default group exists, the engine not yet

    def on_train_start(self, trainer, pl_module) -> None:
        self.sockets["engine"] = listening_sockets()
        engine = trainer.strategy.engine
        store = dist.distributed_c10d._get_default_store()
        entry = {
            "start": trainer.global_step,
            "engine_step": engine.step_index,
            "stale_marker_seen": store.check([MARKER]),
        }
        if self.attempt == 0 and trainer.global_rank == 0:
            store.set(MARKER, "1")
            # A stale step key where a later attempt's engine will be: read, it would fail step 8.
            engine._coordinator.store.set("s8/gate", "abandoned by rank 9 (a stale key of attempt 0)")
            engine._coordinator.store.set("s8/decided", "abandoned")
        self.write(trainer, {"event": "start", **entry})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epoch, index = batch.position
        self.sampler.set_epoch(epoch)
        expected = list(self.sampler)[index]
        entry = {"global_step": trainer.global_step, "epoch": epoch, "index": index, "batch_idx": batch_idx}
        entry["expected_batch"] = batch.indices == expected
        entry["engine_step"] = trainer.strategy.last_report.step
        self.write(trainer, {"event": "step", **entry})


def engine_sockets() -> dict[str, list[int]]:
    """Listening sockets around a bare process group and around an engine on its own (a few steps, close)."""
    seen = {"before": listening_sockets()}
    group = dist.new_group(backend="gloo")
    seen["bare_group"] = listening_sockets()
    dist.destroy_process_group(group)
    del group  # its listener lives as long as the group object
    gc.collect()
    seen["bare_group_destroyed"] = listening_sockets()
    model = fit_worker.make_net().double()
    cdp = CodedDataParallel(model, timeout=30.0)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    for _ in range(3):
        cdp.backward(lambda j: torch.nn.functional.mse_loss(cdp.module(x[j : j + 1]), y[j : j + 1]), 12)
    seen["engine"] = listening_sockets()
    cdp.close()
    seen["engine_closed"] = listening_sockets()
    return seen


def main() -> None:
    out_dir, kills = Path(sys.argv[1]), [k for k in sys.argv[2].split(",") if k]
    os.environ["RESUME_OUT"] = str(out_dir)
    attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
    kill = kills[attempt] if attempt < len(kills) else None
    point, at = (kill.split("@")[0], int(kill.split("@")[1])) if kill else (None, None)
    if point == "save" and rank == 0:
        kill_half_way_through_saving(out_dir, at)
    log = StepLog(out_dir, attempt)
    checkpoint = ModelCheckpoint(dirpath=out_dir / "ckpt", every_n_train_steps=2, save_last=True)
    strategy = CodedStrategy(emulate=EMULATE, timeout=TIMEOUT, replan_every=4)
    trainer = quiet_trainer(
        out_dir, strategy, 3, "64-true", EPOCHS, [log, checkpoint], gradient_clip_val=fit_worker.CLIP
    )
    # In float64 already: a checkpoint is loaded before Lightning converts the module to "64-true", so a
    # float32 module would round the restored weights to float32.
    model = Module(kill_task_at=at if point == "task" else None).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train = DataLoader(Recording(fit_worker.N, 0), batch_size=fit_worker.BATCH, shuffle=True)
        trainer.fit(model, train, ckpt_path="last")
    want, _ = fit_worker.reference(EPOCHS, torch.float64)
    got = fit_worker.flat(model)
    result = {
        "rank": rank,
        "attempt": attempt,
        "global_step": trainer.global_step,
        "scheduler_steps": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "relative_error": float((got - want).norm() / want.norm()),
        "max_abs_diff": float((got - want).abs().max()),
        "parameters": got.tolist(),
        "not_resumable_warnings": [str(w.message) for w in caught if "not resumable" in str(w.message)],
        "fit_sockets": {**log.sockets, "after_fit": listening_sockets()},
        "engine_sockets": engine_sockets(),
        "master_port": int(os.environ["MASTER_PORT"]),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
