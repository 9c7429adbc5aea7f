"""Coded linear jobs on real processes: rank 0 is the master, every other rank a worker.

Examples::

    # coded least squares on scikit-learn's diabetes data, against the single-process solution
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 5 recipes/stream.py
    # the measured stream against the simulator: 2 arrival rates × 3 redundancies × optimal/uniform
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 5 recipes/stream.py mode=measure

All ranks share one run directory (``outputs/stream/<torchrun run id>``) with ``rank{r}.log`` per
rank; rank 0 writes ``solve.json``, or ``comparison.json``, ``comparison.md`` and ``comparison.png``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from codedgrad import plan
from codedgrad.emulate import Heterogeneity
from codedgrad.linear import CodedMatrix, MDSCode, StreamRunner
from codedgrad.linear.measure import Comparison, calibrate, compare
from codedgrad.linear.report import markdown_table, plot, ratio_table
from codedgrad.linear.solve import coded_least_squares, direct_solution, gradient_descent, load_regression

log = logging.getLogger("codedgrad.stream")

EXACT = 1e-8  # relative agreement with the single-process solution the recipe must reach


def _solve(cfg: DictConfig, runner: StreamRunner, out: Path) -> bool:
    a, b = load_regression(cfg.solve.data)
    code = MDSCode.for_redundancy(cfg.tasks, cfg.solve.redundancy, cfg.kind, cfg.seed)
    operators = [CodedMatrix(a, code), CodedMatrix(a.T.contiguous(), code)]
    if cfg.solve.split == "optimal":
        profiles = calibrate(runner, operators[0], cfg.calibration.rounds, cfg.calibration.seconds).profiles()
        loads = plan.optimal_split(profiles, cfg.tasks, cfg.solve.redundancy)
        if runner.is_master:
            log.info("measured profiles %s -> optimal split %s", profiles, loads.tolist())
    elif cfg.solve.split == "uniform":
        loads = plan.uniform_split(runner.workers, cfg.tasks, cfg.solve.redundancy)
    else:
        raise ValueError(f"solve.split: must be optimal or uniform, got {cfg.solve.split!r}")
    # Gradient descent converges for steps below 2/‖A‖₂²; 1/‖A‖₂² is the classic safe choice.
    step = 1.0 / float(torch.linalg.matrix_norm(a, 2)) ** 2
    outcome = runner.run(
        operators,
        loads.tolist(),
        lambda master: coded_least_squares(
            master, b, cfg.solve.method, cfg.solve.tol, cfg.solve.max_iterations, step=step
        ),
    )
    if outcome is None:
        return True
    result = outcome.value
    direct = direct_solution(a, b)
    if cfg.solve.method == "cg":
        reference, against = direct, "single-process least squares (scipy.linalg.lstsq)"
    else:
        reference, against = gradient_descent(a, b, step, result.iterations), "the same descent in one process"
    error = float(torch.linalg.norm(result.solution - reference) / torch.linalg.norm(reference))
    delays = [job.end - job.start for job in outcome.jobs]
    summary = {
        "data": cfg.solve.data,
        "shape": list(a.shape),
        "method": cfg.solve.method,
        "redundancy": cfg.solve.redundancy,
        "loads": loads.tolist(),
        "iterations": result.iterations,
        "jobs": result.jobs,
        "converged": result.converged,
        "relative_error": error,
        "against": against,
        "error_to_lstsq": float(torch.linalg.norm(result.solution - direct) / torch.linalg.norm(direct)),
        "mean_job_seconds": sum(delays) / len(delays),
        "gradient_norms": result.gradient_norms,
        "solution": result.solution.tolist(),
        "emulation": runner.emulate.describe() if runner.emulate else None,
    }
    (out / "solve.json").write_text(json.dumps(summary, indent=1) + "\n")
    log.info(
        "%s on %s %s: %d iterations, %d coded jobs (%.1f ms each), relative error %.2e against %s",
        cfg.solve.method,
        cfg.solve.data,
        tuple(a.shape),
        result.iterations,
        result.jobs,
        1e3 * summary["mean_job_seconds"],
        error,
        against,
    )
    return error <= EXACT


def _measure(cfg: DictConfig, runner: StreamRunner, out: Path) -> bool:
    a, _ = load_regression(cfg.measure.data, standardize=False, intercept=False)
    setting = Comparison(
        tasks=cfg.tasks,
        redundancies=list(cfg.measure.redundancies),
        arrival_rates=list(cfg.measure.arrival_rates),
        jobs=list(cfg.measure.jobs),
        segment_jobs=cfg.measure.segment_jobs,
        calibration_rounds=cfg.calibration.rounds,
        calibration_seconds=cfg.calibration.seconds,
        kind=cfg.kind,
        gamma=cfg.measure.gamma,
        columns=cfg.measure.columns,
        sim_jobs=cfg.measure.sim_jobs,
        seed=cfg.seed,
    )
    rows = compare(runner, a, setting, progress=log.info if runner.is_master else None)
    if rows is None:
        return True
    (out / "comparison.json").write_text(json.dumps({"setting": OmegaConf.to_container(cfg), "rows": rows}) + "\n")
    tables = f"{markdown_table(rows)}\n\n{ratio_table(rows)}\n"
    (out / "comparison.md").write_text(tables)
    plot(rows, str(out / "comparison.png"))
    log.info("measured against predicted mean in-order delay (ms):\n%s", tables)
    log.info("written: %s, %s, %s", out / "comparison.json", out / "comparison.md", out / "comparison.png")
    return True


@hydra.main(version_base="1.3", config_path="../conf", config_name="stream")
def main(cfg: DictConfig) -> None:
    """Run ``cfg.mode`` (``solve`` or ``measure``) on every rank; exit 1 if the solve is not exact."""
    if "RANK" not in os.environ:
        log.error("run me under torchrun with at least 2 ranks (a master and a worker)")
        sys.exit(2)
    out = Path(HydraConfig.get().runtime.output_dir)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.timeout + 30))
    try:
        emulate = None if cfg.emulate is None else Heterogeneity.from_dict(OmegaConf.to_container(cfg.emulate))
        runner = StreamRunner(emulate=emulate, timeout=cfg.timeout)
        if emulate is not None and runner.is_master:
            log.info(emulate.describe())
        modes = {"solve": _solve, "measure": _measure}
        if cfg.mode not in modes:
            raise ValueError(f"mode: must be solve or measure, got {cfg.mode!r}")
        ok = modes[cfg.mode](cfg, runner, out)
    finally:
        # gloo under torchrun can abort at interpreter exit unless the group is destroyed
        # (docs/design.md, "Facts about the stack").
        dist.destroy_process_group()
    if not ok:
        log.error("the coded solution is not within %g of the single-process one", EXACT)
        sys.exit(1)


if __name__ == "__main__":
    main()
