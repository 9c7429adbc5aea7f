"""The model against a real run: measured profiles, measured streams, the simulator's prediction.

:func:`calibrate` times every worker's tasks on the running processes (calibration rounds, none
purged); :meth:`Calibration.profiles` fits them with :func:`codedgrad.profile.fit_profile`.
:func:`compare` then serves the same Poisson stream of coded jobs with the optimal split (from those
profiles) and the uniform split, for every redundancy and arrival rate, and puts each measured mean
in-order delay next to what :func:`codedgrad.sim.simulate_stream` predicts on the measured profiles
and next to :func:`codedgrad.plan.stream_lower_bound`. Ω = 1 is the uncoded baseline.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from codedgrad import plan, sim
from codedgrad.linear import wire
from codedgrad.linear.mds import CodedMatrix, MDSCode
from codedgrad.linear.stream import SessionOutcome, StreamRunner
from codedgrad.linear.worker import INTERRUPTED, LATE
from codedgrad.profile import WorkerProfile, fit_profile

__all__ = ["Calibration", "Comparison", "calibrate", "compare", "random_inputs"]

# Simulated streams of the measured length whose spread estimates a measured mean's sampling noise.
_NOISE_RUNS = 40
# Service times kept per configuration for the success-rate plot.
_KEPT_SERVICE_TIMES = 4000


@dataclass(frozen=True)
class Calibration:
    """Per-worker samples from calibration rounds (seconds).

    Attributes:
        cycles: each worker's task durations: start to the next task's start (compute, emulated
            delay and the result's Store round trips).
        latencies: each worker's delay from a round's start (the previous round's decision, or its
            publication) to starting it.
    """

    cycles: list[list[float]]
    latencies: list[list[float]]

    @classmethod
    def from_outcome(cls, outcome: SessionOutcome) -> Calibration:
        """The samples of a session's calibration rounds."""
        rounds = {log.job: log for log in outcome.jobs if log.kind == wire.CALIBRATE}
        if not rounds:
            raise ValueError("outcome: the session ran no calibration rounds")
        cycles = [[c for j, c in zip(log.task_job, log.task_cycle) if j in rounds] for log in outcome.workers]
        latencies = [
            [s - rounds[j].start for j, s in zip(log.job, log.job_start) if j in rounds] for log in outcome.workers
        ]
        return cls(cycles, latencies)

    def __add__(self, other: Calibration) -> Calibration:
        """Pool two calibrations of the same workers (e.g. one before and one after a run)."""
        if len(other.cycles) != len(self.cycles):
            raise ValueError(f"other: has {len(other.cycles)} workers, this one {len(self.cycles)}")
        return Calibration(
            [a + b for a, b in zip(self.cycles, other.cycles)],
            [a + b for a, b in zip(self.latencies, other.latencies)],
        )

    def profiles(self) -> list[WorkerProfile]:
        """Each worker's profile: :func:`~codedgrad.profile.fit_profile` of its task times, shifted by
        its median start latency."""
        profiles = []
        for worker, (cycles, latency) in enumerate(zip(self.cycles, self.latencies)):
            if not cycles:
                raise ValueError(f"cycles: worker {worker} ran no calibration task")
            profiles.append(fit_profile(cycles, shift=max(0.0, float(np.median(latency)))))
        return profiles


def calibrate(runner: StreamRunner, operator: CodedMatrix, rounds: int, seconds: float) -> Calibration:
    """Time the workers' tasks now (collective; every rank gets the same samples).

    Args:
        runner: the stream runner.
        operator: the coded matrix whose tasks are timed.
        rounds: calibration rounds.
        seconds: each worker's time budget per round.
    """
    loads = plan.uniform_split(runner.workers, operator.code.coded)  # any loads summing to N: unused here
    outcome = runner.run([operator], loads.tolist(), lambda master: master.calibrate(rounds, seconds))
    shared: list[object] = [Calibration.from_outcome(outcome) if outcome is not None else None]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]  # type: ignore[return-value]


def random_inputs(columns: int, rows: int, jobs: int, seed: int) -> list[torch.Tensor]:
    """``jobs`` seeded float64 inputs: vectors of ``rows`` when ``columns == 1``, else rows × columns."""
    generator = torch.Generator().manual_seed(seed)
    shape = (rows,) if columns == 1 else (rows, columns)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(jobs)]


@dataclass(frozen=True)
class Comparison:
    """The grid :func:`compare` measures.

    Attributes:
        tasks: K.
        redundancies: Ω values (1 = uncoded).
        arrival_rates: λ values, jobs per second.
        jobs: stream length per arrival rate (same length as ``arrival_rates``).
        calibration_rounds, calibration_seconds: profile measurement before each redundancy.
        kind: MDS generator kind.
        gamma: the optimal split's weight of E[T²] (times in seconds).
        columns: input columns per job (1 = matrix-vector products).
        sim_jobs: jobs per simulated prediction.
        seed: arrivals, inputs and code seed.
    """

    tasks: int
    redundancies: Sequence[float]
    arrival_rates: Sequence[float]
    jobs: Sequence[int]
    calibration_rounds: int = 10
    calibration_seconds: float = 0.25
    kind: str = "orthogonal"
    gamma: float = 1.0
    columns: int = 1
    sim_jobs: int = 20_000
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.jobs) != len(self.arrival_rates):
            raise ValueError(f"jobs: need one stream length per arrival rate ({len(self.arrival_rates)})")
        for name in ("redundancies", "arrival_rates"):
            if not getattr(self, name):
                raise ValueError(f"{name}: need at least one value")
        for rate in self.arrival_rates:
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"arrival_rates: must be finite and > 0, got {rate!r}")
        for count in self.jobs:
            if isinstance(count, bool) or not isinstance(count, int) or count < 2:
                raise ValueError(f"jobs: must be integers >= 2, got {count!r}")
        for omega in self.redundancies:
            plan.total_slots(self.tasks, omega)  # PlanError naming tasks or redundancy


def compare(
    runner: StreamRunner,
    matrix: torch.Tensor,
    setting: Comparison,
    progress: Callable[[str], None] | None = None,
) -> list[dict] | None:
    """Measure the grid of ``setting`` and predict every point (collective).

    For each arrival rate and redundancy: calibrate, run the stream with the optimal split of the
    measured profiles and with the uniform split (same arrivals, inputs and emulated task times),
    calibrate again, and simulate both runs on the profiles of the pooled calibrations. The split
    is chosen from the first calibration alone (it must be fixed before the run).

    Returns:
        On the master one JSON-ready dict per (λ, Ω, split); None on the workers.
    """
    say = progress or (lambda _: None)
    rows = [] if runner.is_master else None
    for rate, jobs in zip(setting.arrival_rates, setting.jobs):
        inputs = random_inputs(setting.columns, matrix.shape[1], jobs, setting.seed)
        for omega in setting.redundancies:
            code = MDSCode.for_redundancy(setting.tasks, omega, setting.kind, setting.seed)
            operator = CodedMatrix(matrix, code)
            # Calibrate before and after the two runs and pool both: the profiles then describe the
            # machine over the same minutes as the runs (other load on a shared machine drifts).
            began = time.monotonic()
            before = calibrate(runner, operator, setting.calibration_rounds, setting.calibration_seconds)
            profiles = before.profiles()
            say(f"λ = {rate:g}, Ω = {omega:g}: calibrated in {time.monotonic() - began:.1f} s: {_brief(profiles)}")
            splits = {
                "optimal": plan.optimal_split(profiles, setting.tasks, omega, setting.gamma),
                "uniform": plan.uniform_split(runner.workers, setting.tasks, omega),
            }
            outcomes = {}
            for name, loads in splits.items():
                began = time.monotonic()
                outcomes[name] = runner.run(
                    [operator],
                    loads.tolist(),
                    lambda master, xs=inputs, lam=rate: master.stream(xs, lam, setting.seed, reference=matrix),
                )
                say(f"λ = {rate:g}, Ω = {omega:g}, {name} {loads.tolist()}: ran in {time.monotonic() - began:.0f} s")
            after = calibrate(runner, operator, setting.calibration_rounds, setting.calibration_seconds)
            if rows is None:
                continue
            pooled = (before + after).profiles()
            say(f"λ = {rate:g}, Ω = {omega:g}: after the runs {_brief(after.profiles())}; pooled {_brief(pooled)}")
            for name, loads in splits.items():
                row = _row(outcomes[name], pooled, setting, rate, omega, name, loads, code)
                row["profiles_before"] = [[p.shift, p.mean, p.std] for p in profiles]
                rows.append(row)
                say(
                    f"λ = {rate:g}, Ω = {omega:g}, {name}: measured {row['measured']:.4f} s, predicted "
                    f"{row['predicted']:.4f} s ({row['measured'] / row['predicted'] - 1:+.1%})"
                )
    return rows


def _row(
    outcome: SessionOutcome,
    profiles: list[WorkerProfile],
    setting: Comparison,
    rate: float,
    omega: float,
    split: str,
    loads: np.ndarray,
    code: MDSCode,
) -> dict:
    record = outcome.value
    measured = record.result
    jobs = len(measured.delays)
    predicted = sim.simulate_stream(profiles, loads, setting.tasks, rate, jobs=setting.sim_jobs, seed=setting.seed)
    # The spread of J-job means under the model: how far a measurement of this length may fall by chance.
    means = [
        sim.simulate_stream(profiles, loads, setting.tasks, rate, jobs=jobs, seed=setting.seed + 1 + i).mean_delay
        for i in range(_NOISE_RUNS)
    ]
    try:
        bound = plan.stream_lower_bound(profiles, setting.tasks, rate)
    except plan.PlanError:  # at or above the pooled capacity: no finite bound
        bound = math.inf
    outcomes = np.concatenate([np.asarray(log.task_outcome, dtype=np.int64) for log in outcome.workers])
    skipped = sum(sum(log.job_skipped) for log in outcome.workers)
    return {
        "arrival_rate": rate,
        "redundancy": omega,
        "split": split,
        "loads": loads.tolist(),
        "jobs": jobs,
        "measured": measured.mean_delay,
        "measured_stderr": measured.delay_standard_error,
        "predicted": predicted.mean_delay,
        "predicted_spread": float(np.std(means)),
        "lower_bound": bound,
        "measured_service": measured.mean_service_time,
        "predicted_service": predicted.mean_service_time,
        "utilisation": measured.utilisation,
        "predicted_stable": predicted.stable,
        "max_decode_error": float(record.decode_error.max()),
        "publish_lag": float(np.nanmean(record.publish_lag)),
        "tasks_run": int(outcomes.size),
        "tasks_late": int(np.sum(outcomes == LATE)),
        "tasks_interrupted": int(np.sum(outcomes == INTERRUPTED)),
        "tasks_skipped": int(skipped),
        "condition_worst": code.condition_report(max_sets=2000, seed=setting.seed).worst,
        "profiles": [[p.shift, p.mean, p.std] for p in profiles],
        "service_times": measured.service_times.tolist(),
        "predicted_service_times": predicted.service_times[:_KEPT_SERVICE_TIMES].tolist(),
    }


def _brief(profiles: list[WorkerProfile]) -> str:
    return ", ".join(f"{1e3 * p.mean:.1f}±{1e3 * p.std:.1f} ms (+{1e3 * p.shift:.1f})" for p in profiles)
