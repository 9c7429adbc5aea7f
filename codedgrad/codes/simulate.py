"""Simulate training steps of a gradient code under the worker model (docs/design.md).

Each step, every rank starts at its profile's shift and works through its queue in order. A Work
takes the sum of its tasks' sampled times. Before starting a Work, the rank asks the decoder whether
it is still needed and skips it if not (purging); a Work already started runs to the end and is then
committed, used or not. The step ends when the decoder is decided (plus the all-reduce time).

The simulation is event driven (a heap of rank events in time order) and uses the codes' real
:class:`DecoderState` objects, so it exercises the decoders as the runtime would.

Common random numbers: rank r's time for task j in step t is one draw, whatever the code, so two
codes (or two backup orders) compared with the same seed see the same worker behaviour.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from codedgrad.codes import CodeError, DecoderState, GradientCode, make_code, spare
from codedgrad.profile import WorkerProfile

__all__ = ["Commit", "coded_sum", "compare_codes", "random_interleaving", "simulate_code", "task_times"]


def task_times(profiles: Sequence[WorkerProfile], tasks: int, steps: int, seed: int = 0) -> list[np.ndarray]:
    """Per rank, a ``steps × tasks`` array: rank r's time for task j in step t (without the shift).

    Each rank draws from its own stream (spawned from ``seed``), so a rank's draws do not depend on
    the number of ranks before it or on the code being simulated.
    """
    streams = np.random.SeedSequence(seed).spawn(len(profiles))
    return [p.sample_task_times(np.random.default_rng(s), (steps, tasks)) for p, s in zip(profiles, streams)]


def simulate_code(
    code: GradientCode,
    profiles: Sequence[WorkerProfile],
    steps: int = 500,
    seed: int = 0,
    allreduce_time: float = 0.0,
    spare_work: bool = False,
) -> np.ndarray:
    """Step times of ``code`` on workers described by ``profiles``.

    Args:
        code: the gradient code (its queues and decoder are used as is).
        profiles: one profile per rank (the simulated workers, not necessarily the planned ones).
        steps: number of steps to simulate.
        seed: random seed (common random numbers, see the module docstring).
        allreduce_time: added to every step (the coded all-reduce).
        spare_work: model the runtime's no-wait release: a rank whose queue ran dry asks
            :func:`codedgrad.codes.spare.spare_work` for work instead of idling.

    Returns:
        float64 array of ``steps`` step times.

    Raises:
        RuntimeError: a step cannot be decided even when every rank has finished its queue (a code
            bug: every code decodes when nobody straggles forever).
    """
    if len(profiles) != code.num_ranks:
        raise CodeError(f"profiles: need one per rank ({code.num_ranks}), got {len(profiles)}")
    if steps < 1:
        raise CodeError(f"steps: must be >= 1, got {steps}")
    queues = [code.queue(r) for r in range(code.num_ranks)]
    times = task_times(profiles, code.num_tasks, steps, seed)
    # durations[r][t, i]: how long rank r takes for the i-th Work of its queue in step t.
    durations = [
        np.stack([times[r][:, list(w.tasks)].sum(axis=1) for w in q], axis=1) if q else np.zeros((steps, 0))
        for r, q in enumerate(queues)
    ]
    sim = _StepSimulator(code, [[w.result for w in q] for q in queues], [p.shift for p in profiles], spare_work)
    out = np.empty(steps)
    for t in range(steps):
        spare_times = [times[r][t] for r in range(code.num_ranks)] if spare_work else None
        out[t] = sim.run(t, [d[t].tolist() for d in durations], spare_times) + allreduce_time
    return out


class _StepSimulator:
    """The event loop of one step. Events are ``(time, rank, result)``; result −1 means "start"."""

    def __init__(self, code: GradientCode, results: list[list[int]], shifts: list[float], spare: bool) -> None:
        self.code, self.results, self.shifts, self.spare = code, results, shifts, spare

    def run(self, step: int, durations: list[list[float]], spare_times: list[np.ndarray] | None) -> float:
        """The decision time of one step, given each rank's duration of each queued Work."""
        state = self.code.new_state()
        position = [0] * self.code.num_ranks  # next queue index of each rank
        events = [(shift, r, -1) for r, shift in enumerate(self.shifts)]
        heapq.heapify(events)
        while events:
            now, r, finished = heapq.heappop(events)
            if finished >= 0:
                state.commit(r, finished)
                if state.decided:
                    return now
            # Start the next Work that is still needed (purging skips the rest).
            queue, i = self.results[r], position[r]
            while i < len(queue) and not state.is_needed(r, queue[i]):
                i += 1
            if i < len(queue):
                heapq.heappush(events, (now + durations[r][i], r, queue[i]))
                position[r] = i + 1
                continue
            position[r] = i
            if spare_times is None:
                continue
            extra = spare.spare_work(state, r, elapsed=now)
            if extra is not None:
                heapq.heappush(events, (now + float(spare_times[r][list(extra.tasks)].sum()), r, extra.result))
            elif (retry := spare.next_spare_check(state, r, now)) is not None:
                heapq.heappush(events, (max(retry, now), r, -1))  # idle until then, then ask again
        raise RuntimeError(f"step {step}: every rank finished its queue but the step is not decided: {state.missing()}")


def compare_codes(
    profiles: Sequence[WorkerProfile],
    tasks: int,
    redundancy: float,
    codes: Sequence[str] = ("uncoded", "repetition", "frc", "cyclic"),
    steps: int = 500,
    seed: int = 0,
    gamma: float = 1.0,
    allreduce_time: float = 0.0,
    spare_work: bool = False,
) -> list[dict]:
    """Simulated step-time statistics of several codes on the same workers (same random numbers).

    Every code is planned for and simulated on ``profiles``. "uncoded" always runs at Ω = 1. The
    other arguments are those of :func:`simulate_code`.

    Returns:
        One dict per code, in order: ``{"code", "redundancy", "mean", "median", "p95", "skipped"}``;
        ``skipped`` is None, or the reason the code cannot be built for these arguments (then the
        statistics are None).
    """
    rows = []
    for name in codes:
        omega = 1.0 if name == "uncoded" else float(redundancy)
        row: dict = {"code": name, "redundancy": omega, "mean": None, "median": None, "p95": None, "skipped": None}
        try:
            code = make_code(name, len(profiles), tasks, omega, profiles, gamma)
        except CodeError as error:
            row["skipped"] = str(error)
            rows.append(row)
            continue
        step = simulate_code(code, profiles, steps, seed, allreduce_time, spare_work)
        row.update(mean=float(step.mean()), median=float(np.median(step)), p95=float(np.quantile(step, 0.95)))
        rows.append(row)
    return rows


class Commit(NamedTuple):
    """One commit of :func:`random_interleaving`: ``rank`` committed ``result``; ``used`` is the answer."""

    rank: int
    result: int
    used: bool


def random_interleaving(
    code: GradientCode, stragglers: Iterable[int] = (), seed: int = 0, spare_work: bool = False
) -> tuple[DecoderState, list[Commit]]:
    """Drive a code's decoder with one random interleaving of the ranks' work, without a time model.

    Ranks in ``stragglers`` never commit. Every other rank works through its queue as the runtime
    does: it skips Work the decoder no longer needs, starts the next one, and commits it later; at
    each point a random rank makes its next move (start or commit), so results race, and commits of
    Work started before someone else covered it (or before the decision) happen too. No Work is
    started once the step is decided; Work already in flight is still committed. With
    ``spare_work`` a rank whose queue ran dry asks for spare work (:func:`codedgrad.codes.spare.spare_work`,
    without a clock), as the runtime does.
    For tests of decoders under arbitrary orders (the timed counterpart is :func:`simulate_code`).

    Returns:
        The final decoder state and the commits in order.
    """
    rng = np.random.default_rng(seed)
    lost = set(stragglers)
    queues = {r: [w.result for w in code.queue(r)] for r in range(code.num_ranks) if r not in lost}
    position = dict.fromkeys(queues, 0)
    in_flight: dict[int, int] = {}
    idle: set[int] = set()  # ranks with nothing left to start
    state = code.new_state()
    commits: list[Commit] = []
    while True:
        # A rank can move if it has Work in flight, or (before the decision) Work left to start.
        movable = [r for r in queues if r in in_flight or (not state.decided and r not in idle)]
        if not movable:
            return state, commits
        r = movable[int(rng.integers(len(movable)))]
        if r in in_flight:
            result = in_flight.pop(r)
            commits.append(Commit(r, result, state.commit(r, result)))
            continue
        queue, i = queues[r], position[r]
        while i < len(queue) and not state.is_needed(r, queue[i]):
            i += 1
        if i < len(queue):
            in_flight[r] = queue[i]
            i += 1
        else:
            extra = spare.spare_work(state, r) if spare_work else None
            if extra is None:
                idle.add(r)
            else:
                in_flight[r] = extra.result
        position[r] = i


def coded_sum(code: GradientCode, state: DecoderState, commits: Iterable[Commit], gradients: np.ndarray) -> np.ndarray:
    """What the coded all-reduce computes from these commits, in float64 (a numpy model of the runtime).

    Each rank's accumulator is the sum of its used results, a result being ``Σ_i c_i · g_{tasks[i]}``
    (its Work's coefficients); the accumulators are scaled by the decoding's rank coefficients and
    summed. With a correct code this equals ``gradients.sum(axis=0)``.

    Args:
        code: the code the commits were made under.
        state: the decided decoder state after the commits.
        commits: the commits, e.g. from :func:`random_interleaving`.
        gradients: ``num_tasks × d`` array, row j the gradient of task j.

    Raises:
        NotDecodable: the state is not decided.
    """
    decoding = state.decoding()
    # Result ids are unique within a code, so any rank's copy of a result (also one done as spare
    # work outside the rank's own queue) has the same tasks and coefficients.
    works = {w.result: w for r in range(code.num_ranks) for w in code.queue(r)}
    accumulators = np.zeros((code.num_ranks, *gradients.shape[1:]))
    for rank, result, used in commits:
        if used:
            work = works[result]
            accumulators[rank] += np.tensordot(np.array(work.coefficients), gradients[list(work.tasks)], axes=1)
    return np.tensordot(decoding.rank_coefficients, accumulators, axes=1)
