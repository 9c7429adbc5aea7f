"""Ready-made scenarios for the CLI and the benchmarks.

``paper`` is the evaluation setting of Esfahanizadeh, Cohen & Médard, "Stream Iterative
Distributed Coded Computing for Learning Applications in Heterogeneous Systems" (INFOCOM 2022):
P = 5 workers, jobs of complexity Z = 50 000 split into K = 1000 tasks, Poisson arrivals of
λ = 0.01 jobs per time slot, γ = 1, and exponential task times. Worker p processes μ_p units of
complexity per slot, so one task (Z/K units) takes on average (Z/K)/μ_p slots. The rates are drawn
uniformly at random and scaled so that Σ μ_p = 4·Z·λ·Ω_max: the pooled capacity is four times the
work offered at the largest redundancy Ω_max, so an ideal scheduler keeps the queue at most a
quarter busy (a badly balanced split can still overload it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from codedgrad.profile import WorkerProfile

__all__ = ["PRESETS", "Preset", "paper_preset"]

PAPER_WORKERS = 5
PAPER_COMPLEXITY = 50_000  # Z, units of work per job
PAPER_TASKS = 1000  # K
PAPER_ARRIVAL_RATE = 0.01  # λ, jobs per slot
PAPER_GAMMA = 1.0
PAPER_JOBS = 10_000
PAPER_HEADROOM = 4.0  # Σ μ_p = PAPER_HEADROOM · Z · λ · Ω_max


@dataclass(frozen=True)
class Preset:
    """A scenario: the workers and the workload to plan or simulate.

    Attributes:
        profiles: one profile per worker.
        tasks: K, tasks per job.
        arrival_rate: λ, jobs per unit time (stream model).
        gamma: weight of the second moment in the planner's cost.
        jobs: number of jobs to simulate.
    """

    profiles: tuple[WorkerProfile, ...]
    tasks: int
    arrival_rate: float
    gamma: float
    jobs: int


def paper_preset(max_redundancy: float, seed: int = 0) -> Preset:
    """The paper's evaluation setting (see the module docstring).

    Args:
        max_redundancy: Ω_max, the largest redundancy that will be simulated; the worker rates are
            scaled to it so every redundancy up to Ω_max leaves the ideal queue stable.
        seed: seed of the random draw of the worker rates.

    Returns:
        The preset; its profiles have no shift and exponential task times (std = mean).
    """
    if isinstance(max_redundancy, bool) or not (
        isinstance(max_redundancy, (int, float, np.number)) and math.isfinite(max_redundancy) and max_redundancy >= 1
    ):
        raise ValueError(f"max_redundancy: must be finite and >= 1, got {max_redundancy!r}")
    rng = np.random.default_rng(seed)
    raw = 1.0 - rng.random(PAPER_WORKERS)  # uniform on (0, 1]: never a worker of rate zero
    rates = raw * (PAPER_HEADROOM * PAPER_COMPLEXITY * PAPER_ARRIVAL_RATE * max_redundancy / raw.sum())
    task_work = PAPER_COMPLEXITY / PAPER_TASKS
    profiles = tuple(WorkerProfile(shift=0.0, mean=task_work / mu, std=task_work / mu) for mu in rates)
    return Preset(
        profiles=profiles,
        tasks=PAPER_TASKS,
        arrival_rate=PAPER_ARRIVAL_RATE,
        gamma=PAPER_GAMMA,
        jobs=PAPER_JOBS,
    )


PRESETS: dict[str, Callable[..., Preset]] = {"paper": paper_preset}
