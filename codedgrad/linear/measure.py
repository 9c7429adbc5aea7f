"""The model against a real run: measured profiles, measured streams, the simulator's prediction.

:func:`calibrate` times every worker's tasks on the running processes (calibration rounds, none
purged); :meth:`Calibration.profiles` fits them with :func:`codedgrad.profile.fit_profile`.
:func:`compare` then serves the same Poisson streams of coded jobs with the optimal split (from those
profiles) and the uniform split, for every redundancy and arrival rate, and puts each measured mean
in-order delay next to what :func:`codedgrad.sim.simulate_stream` predicts on the measured profiles
and next to :func:`codedgrad.plan.stream_lower_bound`. Ω = 1 is the uncoded baseline.

The stream is served in segments (each a stream of its own that starts empty), with calibrations
between them; the prediction simulates the same segment lengths, so a segment's empty start is in
the model too.
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

__all__ = ["ESTIMATORS", "Calibration", "Comparison", "calibrate", "compare", "random_inputs"]

ESTIMATORS = ("robust", "moments")
"""How :meth:`Calibration.profiles` fits the task times."""

CALIBRATION_STEPS = 1 << 30
"""Emulated steps of calibration rounds start here, far from the streams' (segment s: s·2²⁰ on)."""

_SEGMENT_STEPS = 1 << 20
# Measurements of the simulated length whose spread estimates a measured mean's sampling noise.
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

    def profiles(self, estimator: str = "robust") -> list[WorkerProfile]:
        """Each worker's profile, shifted by its median start latency.

        Args:
            estimator: ``robust``: :func:`~codedgrad.profile.fit_profile` (a low quantile plus the
                median excess over it, as for a shifted exponential: stalls barely move it, but other
                noise on top of the exponential part, such as scheduling delays on a busy machine,
                inflates its mean and std); ``moments``: the sample mean and standard deviation.
        """
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator: must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
        profiles = []
        for worker, (cycles, latency) in enumerate(zip(self.cycles, self.latencies)):
            if not cycles:
                raise ValueError(f"cycles: worker {worker} ran no calibration task")
            shift = max(0.0, float(np.median(latency)))
            if estimator == "robust":
                profiles.append(fit_profile(cycles, shift=shift))
            else:
                profiles.append(WorkerProfile(shift, float(np.mean(cycles)), float(np.std(cycles))))
        return profiles


def calibrate(
    runner: StreamRunner, operator: CodedMatrix, rounds: int, seconds: float, step_offset: int = CALIBRATION_STEPS
) -> Calibration:
    """Time the workers' tasks now (collective; every rank gets the same samples).

    Args:
        runner: the stream runner.
        operator: the coded matrix whose tasks are timed.
        rounds: calibration rounds.
        seconds: each worker's time budget per round.
        step_offset: emulated step of the first round: give repeated calibrations different offsets,
            or they time the same emulated draws again.
    """
    loads = plan.uniform_split(runner.workers, operator.code.coded)  # any loads summing to N: unused here
    outcome = runner.run(
        [operator], loads.tolist(), lambda master: master.calibrate(rounds, seconds), step_offset=step_offset
    )
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
        jobs: jobs measured per arrival rate and split (same length as ``arrival_rates``).
        segment_jobs: the jobs are served in streams (segments) of this many, each starting empty,
            with a calibration between segments.
        calibration_rounds, calibration_seconds: each calibration's rounds and per-round budget.
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
    segment_jobs: int = 50
    calibration_rounds: int = 4
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
        for name, count in [*(("jobs", c) for c in self.jobs), ("segment_jobs", self.segment_jobs)]:
            if isinstance(count, bool) or not isinstance(count, int) or count < 2:
                raise ValueError(f"{name}: must be integers >= 2, got {count!r}")
        for omega in self.redundancies:
            plan.total_slots(self.tasks, omega)  # PlanError naming tasks or redundancy


def compare(
    runner: StreamRunner,
    matrix: torch.Tensor,
    setting: Comparison,
    progress: Callable[[str], None] | None = None,
) -> list[dict] | None:
    """Measure the grid of ``setting`` and predict every point (collective).

    For each arrival rate and redundancy, in segments of ``segment_jobs`` jobs: calibrate, then serve
    one segment with the optimal split (chosen from the first calibration, as a split must be fixed
    before a run) and the same segment with the uniform split (same arrivals, inputs and emulated
    task times), calibrate again, and so on. The calibrations are pooled into the profiles the
    simulator predicts from, so the profiles describe the machine over the same minutes as the
    runs: other load on a shared machine drifts, and a calibration minutes away would not match.

    Returns:
        On the master one JSON-ready dict per (λ, Ω, split); None on the workers.
    """
    say = progress or (lambda _: None)
    rows: list[dict] | None = [] if runner.is_master else None
    rounds, budget = setting.calibration_rounds, setting.calibration_seconds
    for rate, jobs in zip(setting.arrival_rates, setting.jobs):
        lengths = _segments(jobs, setting.segment_jobs)
        for omega in setting.redundancies:
            code = MDSCode.for_redundancy(setting.tasks, omega, setting.kind, setting.seed)
            operator = CodedMatrix(matrix, code)
            began = time.monotonic()
            calibrations = [calibrate(runner, operator, rounds, budget, CALIBRATION_STEPS)]
            first = calibrations[0].profiles()
            say(f"λ = {rate:g}, Ω = {omega:g}: {len(lengths)} segments; first calibration {_brief(first)}")
            splits = {
                "optimal": plan.optimal_split(first, setting.tasks, omega, setting.gamma),
                "uniform": plan.uniform_split(runner.workers, setting.tasks, omega),
            }
            records: dict[str, list] = {name: [] for name in splits}
            for segment, length in enumerate(lengths):
                inputs = random_inputs(setting.columns, matrix.shape[1], length, setting.seed + segment)
                for name, loads in splits.items():
                    outcome = runner.run(
                        [operator],
                        loads.tolist(),
                        lambda master, xs=inputs, lam=rate, s=setting.seed + segment: master.stream(
                            xs, lam, s, reference=matrix
                        ),
                        step_offset=segment * _SEGMENT_STEPS,
                    )
                    if outcome is not None:
                        records[name].append(outcome)
                offset = CALIBRATION_STEPS + (segment + 1) * rounds
                calibrations.append(calibrate(runner, operator, rounds, budget, offset))
            if rows is None:
                continue
            pooled = sum(calibrations[1:], calibrations[0])
            profiles, moments = pooled.profiles(), pooled.profiles("moments")
            say(f"λ = {rate:g}, Ω = {omega:g}: pooled profiles {_brief(profiles)}; {time.monotonic() - began:.0f} s")
            say(f"λ = {rate:g}, Ω = {omega:g}: pooled sample moments {_brief(moments)}")
            for name, loads in splits.items():
                row = _row(records[name], profiles, setting, rate, omega, name, loads, code, lengths)
                by_moments, _ = _predict(moments, loads, setting.tasks, rate, lengths, setting)
                row["predicted_moments"] = float(by_moments.delays.mean())
                row["profiles_moments"] = [[p.shift, p.mean, p.std] for p in moments]
                row["profiles_first"] = [[p.shift, p.mean, p.std] for p in first]
                row["calibration_tasks"] = [len(c) for c in pooled.cycles]
                rows.append(row)
                say(
                    f"λ = {rate:g}, Ω = {omega:g}, {name} {loads.tolist()}: measured {row['measured']:.4f} s, "
                    f"predicted {row['predicted']:.4f} s ({row['measured'] / row['predicted'] - 1:+.1%}, "
                    f"sampling ±{row['predicted_spread'] / row['predicted']:.1%}); from sample moments "
                    f"{row['predicted_moments']:.4f} s ({row['measured'] / row['predicted_moments'] - 1:+.1%})"
                )
    return rows


def _segments(jobs: int, length: int) -> list[int]:
    """Split ``jobs`` into segments of about ``length`` (the remainder spread over them)."""
    count = max(1, round(jobs / length))
    return [jobs // count + (1 if i < jobs % count else 0) for i in range(count)]


def _predict(
    profiles: list[WorkerProfile], loads: np.ndarray, tasks: int, rate: float, lengths: list[int], setting: Comparison
) -> tuple[sim.StreamResult, list[float]]:
    """Simulated streams with the measured segment structure (each segment starts empty).

    Returns one long concatenation of simulated segments (about ``setting.sim_jobs`` jobs) and the
    mean delays of :data:`_NOISE_RUNS` further simulated measurements of the same lengths.
    """
    length = round(float(np.mean(lengths)))

    def segment(seed: int, jobs: int) -> sim.StreamResult:
        return sim.simulate_stream(profiles, loads, tasks, rate, jobs=jobs, seed=seed)

    many = [segment(setting.seed + 10_000 + i, length) for i in range(max(1, setting.sim_jobs // length))]
    joined = sim.StreamResult(
        arrival_rate=rate,
        arrivals=np.concatenate([r.arrivals for r in many]),
        starts=np.concatenate([r.starts for r in many]),
        ends=np.concatenate([r.ends for r in many]),
        service_times=np.concatenate([r.service_times for r in many]),
        delays=np.concatenate([r.delays for r in many]),
    )
    noise = []
    for run in range(_NOISE_RUNS):
        delays = [segment(setting.seed + 1_000_000 + run * len(lengths) + i, n).delays for i, n in enumerate(lengths)]
        noise.append(float(np.concatenate(delays).mean()))
    return joined, noise


def _row(
    outcomes: list[SessionOutcome],
    profiles: list[WorkerProfile],
    setting: Comparison,
    rate: float,
    omega: float,
    split: str,
    loads: np.ndarray,
    code: MDSCode,
    lengths: list[int],
) -> dict:
    results = [outcome.value.result for outcome in outcomes]
    delays = np.concatenate([r.delays for r in results])
    service = np.concatenate([r.service_times for r in results])
    predicted, noise = _predict(profiles, loads, setting.tasks, rate, lengths, setting)
    try:
        bound = plan.stream_lower_bound(profiles, setting.tasks, rate)
    except plan.PlanError:  # at or above the pooled capacity: no finite bound
        bound = math.inf
    workers = [log for outcome in outcomes for log in outcome.workers]
    task_outcomes = np.concatenate([np.asarray(log.task_outcome, dtype=np.int64) for log in workers])
    segment_means = [float(r.delays.mean()) for r in results]
    return {
        "arrival_rate": rate,
        "redundancy": omega,
        "split": split,
        "loads": loads.tolist(),
        "jobs": int(delays.size),
        "segments": lengths,
        "measured": float(delays.mean()),
        # Segments are independent (each starts empty): the spread of their means gives the error.
        "measured_stderr": float(np.std(segment_means, ddof=1) / math.sqrt(len(segment_means)))
        if len(segment_means) > 1
        else math.nan,
        "predicted": float(predicted.delays.mean()),
        "predicted_spread": float(np.std(noise)),
        "lower_bound": bound,
        "measured_service": float(service.mean()),
        "predicted_service": float(predicted.service_times.mean()),
        "utilisation": rate * float(service.mean()),
        "max_decode_error": float(max(outcome.value.decode_error.max() for outcome in outcomes)),
        "publish_lag": float(np.nanmean(np.concatenate([outcome.value.publish_lag for outcome in outcomes]))),
        "tasks_run": int(task_outcomes.size),
        "tasks_late": int(np.sum(task_outcomes == LATE)),
        "tasks_interrupted": int(np.sum(task_outcomes == INTERRUPTED)),
        "tasks_skipped": int(sum(sum(log.job_skipped) for log in workers)),
        "condition_worst": code.condition_report(max_sets=2000, seed=setting.seed).worst,
        "profiles": [[p.shift, p.mean, p.std] for p in profiles],
        "service_times": service.tolist(),
        "predicted_service_times": predicted.service_times[:_KEPT_SERVICE_TIMES].tolist(),
    }


def _brief(profiles: list[WorkerProfile]) -> str:
    return ", ".join(f"{1e3 * p.mean:.1f}±{1e3 * p.std:.1f} ms (+{1e3 * p.shift:.1f})" for p in profiles)
