"""The re-planning policy alone, on synthetic windows: which plans it picks, and how often it switches.

    python benchmarks/bench_policy.py                      # the default grid of clusters and noise
    python benchmarks/bench_policy.py --spikes 0.1 --bias 0.2   # a harsher model of shared cores

No processes, no clocks: :class:`~codedgrad.runtime.policy.ReplanPolicy` is fed one
:class:`~codedgrad.runtime.policy.Measurement` per rank per exchange, as the engine's exchange
would gather them, and the step time of the plan it picks is computed from the true speeds. A
rank's true per-task time is ``overhead + (1 - overhead) / speed`` (per-task overhead that does not
scale with speed compresses measured ratios, as on real compute); each window reads it off by a
log-normal ``--wander`` and reports ``--error`` as its own error; with ``--spikes`` a rank's window
is 2x slow with that probability (the scheduler of shared cores), and with ``--bias`` a rank given
more than an even share reads faster (it runs the end of its step alone). Printed per cluster and
noise level, over ``--seeds`` runs of ``--exchanges`` exchanges: plan switches after the first
measured plan, the mean step time over the ideal bound (from exchange 5 on), and the most common
final splits. docs/benchmarks.md (2026-12-08, later) compares this policy with the one before it.
"""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter

import numpy as np

from codedgrad.plan import optimal_split
from codedgrad.profile import WorkerProfile
from codedgrad.runtime.policy import Measurement, ReplanPolicy

CLUSTERS = {
    "hetero4": (4.0, 2.0, 1.0, 1.0),
    "2x": (2.0, 2.0, 1.0, 1.0),
    "1.3x": (1.3, 1.0, 1.0, 1.0),
    "homogeneous": (1.0,) * 4,
    "homogeneous8": (1.0,) * 8,
}
NOISE = ((0.05, 0.1), (0.1, 0.2), (0.15, 0.3))  # (window wander, the error a window reports)


def split_of(profiles: tuple[WorkerProfile, ...], num_tasks: int) -> tuple[int, ...]:
    return tuple(int(n) for n in optimal_split(list(profiles), num_tasks, 1.0))


def run(
    speeds: tuple[float, ...], wander: float, error: float, args: argparse.Namespace, seed: int
) -> tuple[int, float, tuple[int, ...]]:
    """One run: (switches after the first measured plan, mean step / ideal from exchange 5, final split)."""
    rng = random.Random(seed)
    true = [args.overhead + (1.0 - args.overhead) / s for s in speeds]
    even_share = args.tasks / len(speeds)
    ideal = args.tasks / sum(1.0 / t for t in true)
    policy = ReplanPolicy(threshold=args.threshold)
    current = (WorkerProfile(0.0, 1.0, 0.1),) * len(speeds)  # an even guess, not in seconds
    measured, switches, ratios = False, 0, []
    for _ in range(args.exchanges):
        split = split_of(current, args.tasks)
        step = max(n * t for n, t in zip(split, true))
        ratios.append(step / ideal)
        windows = []
        for n, t in zip(split, true):
            seen = t * math.exp(rng.gauss(0.0, wander))
            seen *= 2.0 if rng.random() < args.spikes else 1.0
            seen *= (n / even_share) ** -args.bias if n else 1.0
            window_step = step * math.exp(rng.gauss(0.0, 0.03))
            windows.append(
                Measurement(WorkerProfile(0.0, seen, 0.1 * seen), window_step, 20, speed_error=error, step_error=0.03)
            )
        action, profiles = policy.decide(current, measured, args.tasks, windows)
        if action != "keep" and profiles is not None:
            switches += measured
            current, measured = profiles, True
    return switches, float(np.mean(ratios[5:])), split_of(current, args.tasks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=32, help="K")
    parser.add_argument("--threshold", type=float, default=0.1, help="ReplanPolicy's threshold")
    parser.add_argument("--overhead", type=float, default=0.3, help="per-task time that does not scale with speed")
    parser.add_argument("--spikes", type=float, default=0.0, help="probability of a rank's window being 2x slow")
    parser.add_argument("--bias", type=float, default=0.0, help="exponent of the bias of a larger share to read faster")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--exchanges", type=int, default=30)
    args = parser.parse_args()
    print(f"{'cluster':13s} {'wander':>6s} {'error':>5s} {'switches':>8s} {'step/ideal':>10s}  final splits (runs)")
    for name, speeds in CLUSTERS.items():
        for wander, error in NOISE:
            runs = [run(speeds, wander, error, args, seed) for seed in range(args.seeds)]
            finals = Counter(final for _, _, final in runs).most_common(2)
            print(
                f"{name:13s} {wander:6.2f} {error:5.2f} {np.mean([r[0] for r in runs]):8.2f} "
                f"{np.mean([r[1] for r in runs]):10.3f}  " + ", ".join(f"{list(s)} ({c})" for s, c in finals)
            )


if __name__ == "__main__":
    main()
