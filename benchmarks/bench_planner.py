"""Planner and simulator speed: `python benchmarks/bench_planner.py [--profile]`.

Two figures, each with its target:

* ``optimal_split`` for 1024 heterogeneous workers (median over many repeats): < 5 ms, so a plan
  can be recomputed between training steps;
* the paper preset (``codedgrad.presets``) with 10 000 jobs at one redundancy, optimal split,
  ``simulate_stream``: < 2 s, so ``codedgrad simulate --preset paper`` answers interactively.

``--profile`` also prints where ``optimal_split``'s time goes (cProfile, top functions).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import numpy as np

from codedgrad import plan, sim
from codedgrad.presets import paper_preset
from codedgrad.profile import WorkerProfile

SPLIT_TARGET_MS = 5.0
STREAM_TARGET_S = 2.0


def heterogeneous_profiles(workers: int, seed: int = 0) -> list[WorkerProfile]:
    """Random workers: speeds over a 10× range, some shift, jitter between none and exponential."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.005, 0.05, workers)
    return [
        WorkerProfile(shift=float(shift), mean=float(mean), std=float(mean * jitter))
        for shift, mean, jitter in zip(rng.uniform(0.0, 0.02, workers), means, rng.uniform(0.0, 1.0, workers))
    ]


def bench_split(workers: int = 1024, tasks: int = 16_384, redundancy: float = 1.1, repeats: int = 300) -> float:
    """Median wall time of one ``optimal_split`` call, in milliseconds."""
    profiles = heterogeneous_profiles(workers)
    plan.optimal_split(profiles, tasks, redundancy)  # warm-up: first-call imports and caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        plan.optimal_split(profiles, tasks, redundancy)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_paper_stream(redundancy: float = 1.05, jobs: int = 10_000, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of planning and simulating the paper preset, in seconds."""
    preset = paper_preset(redundancy)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        split = plan.optimal_split(preset.profiles, preset.tasks, redundancy, preset.gamma)
        sim.simulate_stream(preset.profiles, split, preset.tasks, preset.arrival_rate, jobs=jobs, seed=0)
        times.append(time.perf_counter() - start)
    return min(times)


def profile_split(workers: int = 1024, tasks: int = 16_384, redundancy: float = 1.1, calls: int = 200) -> None:
    """Print the functions ``optimal_split`` spends its time in."""
    profiles = heterogeneous_profiles(workers)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        plan.optimal_split(profiles, tasks, redundancy)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="store_true", help="also profile optimal_split")
    args = parser.parse_args()

    split_ms = bench_split()
    verdict = "ok" if split_ms < SPLIT_TARGET_MS else "MISSED"
    print(
        f"optimal_split, 1024 workers, K = 16384, Ω = 1.1: median {split_ms:.2f} ms "
        f"(target < {SPLIT_TARGET_MS:g} ms) {verdict}"
    )
    stream_s = bench_paper_stream()
    verdict = "ok" if stream_s < STREAM_TARGET_S else "MISSED"
    print(
        f"paper preset, 10000 jobs, Ω = 1.05, optimal split, simulate_stream: {stream_s:.2f} s "
        f"(target < {STREAM_TARGET_S:g} s) {verdict}"
    )
    if args.profile:
        profile_split()


if __name__ == "__main__":
    main()
