"""Train a recipe: ``python recipes/train.py [overrides]`` or under torchrun, one process per rank.

Examples::

    python recipes/train.py                                     # 1 process, cnn on digits, ddp
    python recipes/train.py trainer.devices=2                   # 2 ranks via Lightning's launcher
    torchrun --standalone --nproc-per-node 4 recipes/train.py strategy=coded cluster=hetero4

All ranks share one run directory (``outputs/train/<time>_<torchrun id>``, see
``codedgrad/recipes/rundir.py``) with ``rank{r}.log`` per rank, ``.hydra/`` from rank 0, TensorBoard
logs in ``tb/`` and ``metrics.json``.
"""

from __future__ import annotations

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from codedgrad.recipes.rundir import register_resolvers

register_resolvers()  # before Hydra composes the config: hydra.run.dir and the log file name use them


def _route_lightning_logs() -> None:
    """Send Lightning's log records to the root logger, whose handlers Hydra set up (rank file, console).

    Lightning adds its own console handler when imported before logging is configured, and stops
    propagation: its messages would miss ``rank{r}.log`` and appear twice if propagated as well.
    """
    for name in ("pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Fit, then return the final training loss (for Hydra sweepers)."""
    from codedgrad.recipes.train import run  # after Hydra set up logging: Lightning's logger sees its handlers

    _route_lightning_logs()
    metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    return metrics.get("train/loss", float("nan"))


if __name__ == "__main__":
    main()
