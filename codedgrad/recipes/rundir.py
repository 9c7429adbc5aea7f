"""One Hydra run directory for all ranks of a job, and a log file per rank.

Under torchrun every rank runs ``@hydra.main`` itself, so Hydra's default run directory (a timestamp
taken by each process) would differ between ranks that start a second apart. The configs use three
OmegaConf resolvers registered here instead (``recipes/train.py`` calls :func:`register_resolvers`
before Hydra composes the config):

* ``${codedgrad_run_name:}``: the same name on every rank of a torchrun job: the start time of the
  torchrun agent (the workers' common parent) and the rendezvous id (``TORCHELASTIC_RUN_ID``, a fresh
  UUID for single-node torchrun). Outside torchrun: this process's start time. Lightning's own launcher
  (``python recipes/train.py trainer.devices=N``) starts its extra ranks with ``hydra.run.dir`` set to
  rank 0's directory and ``hydra.output_subdir=null``, so they never evaluate this resolver.
* ``${codedgrad_rank:}``: the global rank (``RANK``; Lightning's launched ranks have only
  ``LOCAL_RANK``/``NODE_RANK``), for ``rank{r}.log``.
* ``${codedgrad_hydra_subdir:}``: ``.hydra`` on rank 0 and None elsewhere, so only rank 0 writes the
  composed config (``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml``) and ranks never
  overwrite each other's files.

Several nodes of one job that share a file system should pass ``hydra.run.dir=…`` explicitly (their
agents start at different times); torchrun passes the same arguments to every rank.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["hydra_subdir", "rank_label", "register_resolvers", "run_name"]

_FORMAT = "%Y-%m-%d_%H-%M-%S"
_PROCESS_START = dt.datetime.now()


def _process_start(pid: int) -> dt.datetime | None:
    """When process ``pid`` started, from /proc (None where that cannot be read)."""
    try:
        start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return dt.datetime.fromtimestamp(boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def run_name() -> str:
    """A run directory name that every local rank of one torchrun job computes identically."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:  # not under torchrun
        return _PROCESS_START.strftime(_FORMAT)
    agent_start = _process_start(os.getppid())
    # "none" is torchrun's id for a static multi-node rendezvous: the agent's pid tells jobs apart.
    suffix = run_id[:8] if run_id != "none" else f"agent{os.getppid()}"
    return f"{agent_start.strftime(_FORMAT)}_{suffix}" if agent_start else f"torchrun_{suffix}"


def rank_label() -> str:
    """This process's global rank as text (``RANK``, else Lightning's ``LOCAL_RANK`` on node 0)."""
    if "RANK" in os.environ:
        return os.environ["RANK"]
    node, local = os.environ.get("NODE_RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    return local if node == "0" else f"{node}-{local}"  # without the devices per node, keep both


def hydra_subdir() -> str | None:
    """``.hydra`` on rank 0 (it alone saves the composed config), None on the other ranks."""
    return ".hydra" if rank_label() == "0" else None


def register_resolvers() -> None:
    """Register the resolvers above with OmegaConf (again: a no-op)."""
    for name, function in (
        ("codedgrad_run_name", run_name),
        ("codedgrad_rank", rank_label),
        ("codedgrad_hydra_subdir", hydra_subdir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
