"""``run(cfg)``: build the data, model, strategy, emulation, monitor and Trainer from a config and fit.

The config is the one ``conf/train.yaml`` composes (see that file for every key); ``run`` does not
need Hydra, so tests and scripts can call it with a plain dict too.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger

from codedgrad.recipes.datamodules import build_datamodule
from codedgrad.recipes.emulation import EmulatedDelay, build_emulation, per_task
from codedgrad.recipes.models import build_model
from codedgrad.recipes.module import RecipeModule
from codedgrad.recipes.monitor import CodedMonitor
from codedgrad.recipes.strategies import build_strategy, emulation_unit, takes_emulation

__all__ = ["run"]

log = logging.getLogger(__name__)


def _devices(trainer_cfg: dict[str, Any]) -> tuple[Any, int, int]:
    """``(devices, num_nodes, world_size)``; under torchrun ``devices: auto`` means torchrun's ranks.

    Lightning's CPU accelerator reads ``auto`` as one device, which torchrun with more ranks rejects.
    """
    devices, num_nodes = trainer_cfg.get("devices", "auto"), int(trainer_cfg.get("num_nodes", 1))
    if devices == "auto" and "LOCAL_WORLD_SIZE" in os.environ:
        devices = int(os.environ["LOCAL_WORLD_SIZE"])
        num_nodes = int(os.environ["WORLD_SIZE"]) // devices
    if devices == "auto":
        return devices, num_nodes, num_nodes
    count = devices if isinstance(devices, int) else len(devices)
    return devices, num_nodes, count * num_nodes


def run(cfg: DictConfig | Mapping[str, Any], run_dir: str | Path = ".") -> dict[str, float]:
    """Train as ``cfg`` says, writing TensorBoard logs under ``run_dir/tb``; return the final metrics.

    Every rank calls this. The process group is destroyed before returning (if one was set up): plain
    DDP on gloo can otherwise abort at interpreter exit (docs/design.md, "Facts about the stack").

    Args:
        cfg: the composed ``conf/train.yaml``.
        run_dir: the run directory shared by all ranks.

    Returns:
        The trainer's last logged metrics (``train/loss``, ``val/acc``, ``perf/step_time``, …) as
        floats, and ``steps``; rank 0 also writes them to ``run_dir/metrics.json``.
    """
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # plain values for every constructor below
    run_dir = Path(run_dir)
    pl.seed_everything(cfg["seed"], workers=True)
    trainer_cfg = dict(cfg["trainer"])
    devices, num_nodes, world_size = _devices(trainer_cfg)
    trainer_cfg.update(devices=devices, num_nodes=num_nodes)

    het = build_emulation(cfg["cluster"], world_size)
    if het is not None:
        log.info("%s", het.describe())
    data = build_datamodule(cfg["data"], seed=cfg["seed"])
    module = RecipeModule(build_model(cfg["model"], data.describe()), data.kind, cfg.get("optim"))

    num_tasks = int(cfg["tasks_per_step"])
    global_batch = data.batch_size * world_size  # DDP's global batch, for every strategy
    name = cfg["strategy"]["name"]
    inside = takes_emulation(name)
    emulate = het
    if het is not None and inside and emulation_unit(name) == "task":
        emulate = per_task(het, global_batch / num_tasks)  # same mean work, one draw per task
    strategy = build_strategy(cfg["strategy"], emulate=emulate if inside else None)
    emulator = EmulatedDelay(het) if het is not None and not inside else None
    monitor_cfg = dict(cfg.get("monitor") or {})
    monitor_cfg.setdefault("every_n_steps", trainer_cfg.get("log_every_n_steps", 50))
    monitor = CodedMonitor(het, num_tasks, global_batch, emulator=emulator, **monitor_cfg)

    trainer = pl.Trainer(
        strategy=strategy,
        logger=TensorBoardLogger(save_dir=str(run_dir), name="tb", version="", default_hp_metric=False),
        callbacks=[monitor, *([emulator] if emulator else [])],  # monitor first: its clock spans the delay
        default_root_dir=str(run_dir),
        **trainer_cfg,
    )
    try:
        trainer.fit(module, datamodule=data)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("validate_at_end", True):
            trainer.validate(module, datamodule=data, verbose=False)  # replaces callback_metrics: merge
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        metrics["steps"] = float(trainer.global_step)
        log.info("final metrics: %s", json.dumps(metrics, sort_keys=True))
        if trainer.global_rank == 0:
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        return metrics
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
