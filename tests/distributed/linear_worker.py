"""Worker for tests/test_linear_stream.py: the coded linear stream on 1 master + 4 workers, many checks per launch.

Every rank runs the same scenarios in order and writes what it saw to ``out_dir/rank{r}.json``;
the pytest side asserts. Emulated speeds 1, 1, 2, 4 with short tasks (5 ms at speed 1).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from codedgrad import plan
from codedgrad.emulate import Heterogeneity
from codedgrad.linear import CodedMatrix, MDSCode, StreamRunner
from codedgrad.linear.measure import Comparison, calibrate, compare, random_inputs
from codedgrad.linear.solve import coded_least_squares, direct_solution, gradient_descent, load_regression

SPEEDS = [1.0, 1.0, 2.0, 4.0]
TASKS = 8


class FaultyMatrix(CodedMatrix):
    """Coded task 3 (rank 2's first) fails from its third call on: a worker that breaks mid-stream."""

    def task(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if dist.get_rank() == 2 and index == 3 and getattr(self, "calls", 0) >= 2:
            raise RuntimeError("injected failure")
        if dist.get_rank() == 2 and index == 3:
            self.calls = getattr(self, "calls", 0) + 1
        return super().task(index, x)


def _error(call) -> str | None:
    try:
        call()
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


def scenario(rank: int) -> dict:
    results: dict = {}
    results["bad_emulate"] = _error(lambda: StreamRunner(emulate=Heterogeneity(speeds=[1.0, 2.0], base=0.01)))
    het = Heterogeneity(speeds=SPEEDS, base=0.005, jitter=0.5, seed=1)
    runner = StreamRunner(emulate=het, timeout=20)
    store = dist.distributed_c10d._get_default_store()
    digits, _ = load_regression("digits", standardize=False, intercept=False)
    code = MDSCode.for_redundancy(TASKS, 1.5, seed=0)
    operator = CodedMatrix(digits, code)
    results["bad_loads"] = _error(lambda: runner.run([operator], [1, 1, 1, 1], lambda m: None))

    # Profiles measured on the running processes: the speed-4 worker is the fastest.
    calibration = calibrate(runner, operator, rounds=3, seconds=0.05)
    profiles = calibration.profiles()
    results["profiles"] = [[p.shift, p.mean, p.std] for p in profiles]
    results["calibration_samples"] = [len(c) for c in calibration.cycles]

    # A Poisson stream with the optimal split of those profiles, each job checked against A·x.
    keys_before = store.num_keys()
    loads = plan.optimal_split(profiles, TASKS, 1.5).tolist()
    inputs = random_inputs(1, digits.shape[1], 40, seed=0)
    outcome = runner.run([operator], loads, lambda m: m.stream(inputs, 20.0, seed=0, reference=digits))
    results["keys_left"] = store.num_keys() - keys_before
    if outcome is not None:
        r = outcome.value.result
        outcomes = np.concatenate([np.asarray(w.task_outcome) for w in outcome.workers])
        results["stream"] = {
            "loads": loads,
            "jobs": len(r.delays),
            "max_decode_error": float(outcome.value.decode_error.max()),
            "starts_after_arrivals": bool(np.all(r.starts >= r.arrivals)),
            "in_order": bool(np.all(r.starts[1:] >= r.ends[:-1] - 1e-9)),
            "ends_after_starts": bool(np.all(r.ends > r.starts)),
            "delays_are_ends_minus_arrivals": bool(np.allclose(r.delays, r.ends - r.arrivals)),
            "mean_delay": r.mean_delay,
            "interrupted": int(np.sum(outcomes == 2)),
            "skipped": int(sum(sum(w.job_skipped) for w in outcome.workers)),
            "used": int(np.sum(outcomes == 0)),
            "session_jobs": len(outcome.jobs),
        }

    # The model against the run, in miniature: both splits, two segments, predictions on measured profiles.
    small = Comparison(
        tasks=TASKS,
        redundancies=[1.25],
        arrival_rates=[20.0],
        jobs=[16],
        segment_jobs=8,
        calibration_rounds=1,
        calibration_seconds=0.03,
        sim_jobs=400,
    )
    rows = compare(runner, digits, small)
    if rows is not None:
        keep = ("split", "loads", "jobs", "segments", "measured", "predicted", "predicted_moments", "max_decode_error")
        results["compare"] = [{key: row[key] for key in keep} for row in rows]

    # Least squares: CG to the direct solution, and gradient descent step for step with one process.
    a, b = load_regression("diabetes")
    ls_code = MDSCode.for_redundancy(TASKS, 1.25, seed=0)
    ops = [CodedMatrix(a, ls_code), CodedMatrix(a.T.contiguous(), ls_code)]
    ls_loads = plan.optimal_split(het.profiles(), TASKS, 1.25).tolist()
    step = 1.0 / float(torch.linalg.matrix_norm(a, 2)) ** 2

    def solve(master):
        cg = coded_least_squares(master, b, "cg", tol=1e-13, max_iterations=100)
        gd = coded_least_squares(master, b, "gd", tol=0.0, max_iterations=5, step=step)
        matrix_product = master.apply(torch.eye(a.shape[1], dtype=torch.float64)[:, :3])
        return cg, gd, matrix_product

    outcome = runner.run(ops, ls_loads, solve)
    if outcome is not None:
        cg, gd, product = outcome.value
        direct = direct_solution(a, b)
        reference_gd = gradient_descent(a, b, step, 5)
        results["cg"] = {
            "iterations": cg.iterations,
            "jobs": cg.jobs,
            "converged": cg.converged,
            "error": float(torch.linalg.norm(cg.solution - direct) / torch.linalg.norm(direct)),
        }
        results["gd_error"] = float(torch.linalg.norm(gd.solution - reference_gd) / torch.linalg.norm(reference_gd))
        results["matrix_product_error"] = float(torch.max(torch.abs(product - a[:, :3])))

    # Failures: the master's function raises; then a worker fails mid-stream. The runner survives both.
    def master_fails(master):
        master.apply(inputs[0])
        raise ValueError("master gave up")

    results["master_failure"] = _error(lambda: runner.run([operator], loads, master_fails))
    faulty = FaultyMatrix(digits, code)
    uniform = plan.uniform_split(4, TASKS, 1.5).tolist()
    results["worker_failure"] = _error(lambda: runner.run([faulty], uniform, lambda m: m.stream(inputs, 50.0)))
    after = runner.run([operator], loads, lambda m: m.apply(inputs[1]))
    if after is not None:
        results["after_failures_error"] = float(torch.linalg.norm(after.value - digits @ inputs[1]))
    results["keys_at_end"] = store.num_keys() - keys_before
    return results


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    try:
        results = scenario(rank)
    except Exception:
        results = {"crash": traceback.format_exc()}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    sys.stdout.flush()
    # A failed session may leave a thread blocked on the Store: leave without a collective.
    os._exit(0)


if __name__ == "__main__":
    main()
