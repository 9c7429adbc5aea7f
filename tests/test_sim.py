"""The simulators: one job's service time, the in-order stream, closed-loop training, success rates."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codedgrad import plan, sim
from codedgrad.profile import WorkerProfile

EXPONENTIAL = [WorkerProfile(0.0, m, m) for m in (1.0, 0.5, 2.0, 0.25)]  # heterogeneous, paper-like


def reference_service_time(profiles, split, tasks) -> float:
    """Deterministic tasks (std = 0): list every slot's finish time and take the K-th smallest."""
    finish = sorted(p.shift + i * p.mean for p, k in zip(profiles, split) for i in range(1, k + 1))
    return finish[tasks - 1]


def reference_lindley(arrivals, service) -> np.ndarray:
    """The in-order queue, one job at a time."""
    ends, previous = [], -math.inf
    for a, s in zip(arrivals, service):
        previous = max(a, previous) + s
        ends.append(previous)
    return np.array(ends)


# --- one job -------------------------------------------------------------------------------------


def test_service_time_is_the_kth_result_across_workers() -> None:
    profiles = [WorkerProfile(1.0, 2.0, 0.0), WorkerProfile(0.0, 3.0, 0.0)]
    # Worker 0 yields results at 3, 5, 7; worker 1 at 3, 6. The 4th result exists at 6.
    times = sim.service_times(profiles, [3, 2], 4, jobs=5, rng=np.random.default_rng(0))
    assert times.tolist() == [6.0] * 5
    assert sim.service_times(profiles, [3, 2], 5, 1, np.random.default_rng(0))[0] == 7.0
    assert sim.service_times(profiles, [3, 2], 1, 1, np.random.default_rng(0))[0] == 3.0


@settings(max_examples=60)
@given(
    rows=st.lists(st.tuples(st.floats(0, 5), st.floats(0.01, 5), st.integers(0, 6)), min_size=1, max_size=4).filter(
        lambda rows: sum(k for *_, k in rows) >= 1
    ),
    fraction=st.floats(0.0, 1.0),
    chunk_floats=st.integers(1, 50),
)
def test_deterministic_service_time_matches_a_plain_reference(rows, fraction, chunk_floats) -> None:
    profiles = [WorkerProfile(c, m, 0.0) for c, m, _ in rows]
    split = [k for *_, k in rows]
    tasks = max(1, round(fraction * sum(split)))
    times = sim.service_times(profiles, split, tasks, 7, np.random.default_rng(0), chunk_floats=chunk_floats)
    assert times.shape == (7,)
    assert times == pytest.approx(reference_service_time(profiles, split, tasks), rel=1e-12)


def test_service_time_moments_for_known_distributions() -> None:
    rng = np.random.default_rng(7)
    n = 100_000
    # One worker, K exponential tasks plus a shift: a shifted Gamma(K, m); extra slots never help it.
    one = [WorkerProfile(2.0, 0.5, 0.5)]
    times = sim.service_times(one, [15], 10, n, rng)
    assert times.mean() == pytest.approx(2.0 + 10 * 0.5, rel=0.01)
    assert times.var() == pytest.approx(10 * 0.5**2, rel=0.03)
    # One slot each on exponential workers, K = 1: the first result, the minimum of exponentials.
    rates = [1 / p.mean for p in EXPONENTIAL]
    times = sim.service_times(EXPONENTIAL, [1, 1, 1, 1], 1, n, rng)
    assert times.mean() == pytest.approx(1 / sum(rates), rel=0.02)
    # … and K = P: all of them, the maximum (the mean of a max of independent exponentials,
    # by inclusion–exclusion over subsets).
    expected_max = sum(
        (-1) ** (len(subset) + 1) / sum(rates[i] for i in subset)
        for size in range(1, 5)
        for subset in itertools.combinations(range(4), size)
    )
    times = sim.service_times(EXPONENTIAL, [1, 1, 1, 1], 4, n, rng)
    assert times.mean() == pytest.approx(expected_max, rel=0.02)


def test_chunking_does_not_change_the_distribution() -> None:
    profiles, split = EXPONENTIAL, [3, 6, 2, 9]
    small = sim.service_times(profiles, split, 16, 40_000, np.random.default_rng(1), chunk_floats=50)
    large = sim.service_times(profiles, split, 16, 40_000, np.random.default_rng(2))
    error = math.hypot(small.std() / math.sqrt(small.size), large.std() / math.sqrt(large.size))
    assert abs(small.mean() - large.mean()) < 4 * error


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"split": [1, 1]}, "split"),  # shape mismatch: three workers
        ({"split": [1, 0, 1], "tasks": 3}, "split"),  # fewer slots than tasks
        ({"split": [1, -1, 3]}, "split"),
        ({"split": [1.5, 0, 1]}, "split"),
        ({"tasks": 0}, "tasks"),
        ({"jobs": 0}, "jobs"),
        ({"profiles": []}, "profiles"),
        ({"profiles": [WorkerProfile(0, 1, 1), "fast", WorkerProfile(0, 1, 1)]}, r"profiles\[1\]"),
    ],
)
def test_service_times_rejects_bad_arguments_by_name(kwargs, field) -> None:
    args = {"profiles": EXPONENTIAL[:3], "split": [1, 1, 1], "tasks": 2, "jobs": 3, "rng": np.random.default_rng(0)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}:"):
        sim.service_times(**args)


def test_whole_float_loads_are_accepted() -> None:
    rng = np.random.default_rng(0)
    assert sim.service_times(EXPONENTIAL[:2], np.array([2.0, 1.0]), 3, 2, rng).shape == (2,)


# --- the stream ----------------------------------------------------------------------------------


def test_stream_follows_the_in_order_queue() -> None:
    result = sim.simulate_stream(EXPONENTIAL, [10, 20, 5, 40], 70, arrival_rate=0.03, jobs=3000, seed=5)
    np.testing.assert_allclose(result.ends, reference_lindley(result.arrivals, result.service_times), rtol=1e-12)
    assert np.all(result.starts >= result.arrivals)
    assert np.all(result.starts[1:] >= result.ends[:-1] - 1e-9 * result.ends[:-1])
    np.testing.assert_allclose(result.ends - result.starts, result.service_times, rtol=1e-9)
    np.testing.assert_allclose(result.delays, result.ends - result.arrivals)
    assert np.all(np.diff(result.arrivals) > 0)
    # Poisson arrivals: exponential gaps of mean 1/λ.
    assert np.diff(result.arrivals).mean() == pytest.approx(1 / 0.03, rel=0.06)
    assert result.utilisation == pytest.approx(0.03 * result.service_times.mean())
    assert result.stable == (result.utilisation < 1)
    with pytest.raises(ValueError, match="read-only"):
        result.delays[0] = 0.0


def test_same_seed_same_result_other_seed_other_result() -> None:
    args = (EXPONENTIAL, [10, 20, 5, 40], 60, 0.03)
    first = sim.simulate_stream(*args, jobs=500, seed=11)
    again = sim.simulate_stream(*args, jobs=500, seed=11)
    other = sim.simulate_stream(*args, jobs=500, seed=12)
    for name in ("arrivals", "starts", "ends", "service_times", "delays"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.delays, other.delays)
    # Splits compared with one seed see the same arrivals (common random numbers).
    uniform = sim.simulate_stream(EXPONENTIAL, [19, 19, 19, 18], 60, 0.03, jobs=500, seed=11)
    np.testing.assert_array_equal(first.arrivals, uniform.arrivals)


def test_mm1_mean_delay() -> None:
    # P = 1, K = 1, Ω = 1, exponential tasks: an M/M/1 queue, mean delay 1/(μ − λ).
    mu, lam = 1.0, 0.5
    result = sim.simulate_stream([WorkerProfile(0.0, 1 / mu, 1 / mu)], [1], 1, lam, jobs=1_000_000, seed=0)
    expected = 1 / (mu - lam)
    assert 4 * result.delay_standard_error < 0.02 * expected  # enough jobs for the 2 % check to mean something
    assert result.mean_delay == pytest.approx(expected, rel=0.02)
    assert result.mean_service_time == pytest.approx(1 / mu, rel=0.01)


def test_md1_delay_meets_the_lower_bound() -> None:
    # One worker with constant task times is exactly the ideal of the lower bound: an M/D/1 queue.
    profiles = [WorkerProfile(0.0, 0.02, 0.0)]
    bound = plan.stream_lower_bound(profiles, 50, 0.6)
    result = sim.simulate_stream(profiles, [50], 50, 0.6, jobs=200_000, seed=1)
    assert result.mean_delay == pytest.approx(bound, rel=4 * result.delay_standard_error / bound + 1e-3)


workers = st.lists(
    st.builds(
        lambda shift, mean, jitter: WorkerProfile(shift, mean, mean * jitter),
        st.floats(0.0, 2.0),
        st.floats(0.05, 2.0),
        st.floats(0.0, 1.0),  # std <= mean: the shifted exponential of the design (see the note below)
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=100, deadline=None)
@given(
    profiles=workers,
    tasks=st.integers(1, 40),
    load=st.floats(0.2, 0.8),
    seed=st.integers(0, 1000),
)
def test_stream_lower_bound_is_below_the_simulated_mean_delay(profiles, tasks, load, seed) -> None:
    # The bound is on the expected delay, so compare it with the sample mean plus its standard error.
    # Without redundancy only: with Ω > 1 the first of two copies of a task can beat the pooled
    # capacity (one task, Ω = 1.5, an exponential and a deterministic worker: E[min] < the bound).
    # (For std > mean the task times are gamma, and a K-th order statistic over many redundant slots
    # can beat the pooled-capacity time: the bound is stated for std <= mean.) It is tight for one
    # worker with deterministic tasks (M/D/1), where a run that starts with an empty queue is biased
    # low by its warm-up: 2 % of slack covers that at 20 000 jobs and loads up to 0.8.
    arrival_rate = load / plan.capacity_time(profiles, tasks)
    bound = plan.stream_lower_bound(profiles, tasks, arrival_rate)
    split = plan.optimal_split(profiles, tasks, 1.0)
    result = sim.simulate_stream(profiles, split, tasks, arrival_rate, jobs=20_000, seed=seed)
    assert bound <= result.mean_delay * 1.02 + 4 * result.delay_standard_error


def test_optimal_split_beats_uniform_on_heterogeneous_workers() -> None:
    tasks, arrival_rate = 100, 0.03
    for redundancy in (1.0, 1.1, 1.3):
        optimal = plan.optimal_split(EXPONENTIAL, tasks, redundancy)
        uniform = plan.uniform_split(EXPONENTIAL, tasks, redundancy)
        opt = sim.simulate_stream(EXPONENTIAL, optimal, tasks, arrival_rate, jobs=5000, seed=2)
        uni = sim.simulate_stream(EXPONENTIAL, uniform, tasks, arrival_rate, jobs=5000, seed=2)
        margin = 4 * math.hypot(opt.delay_standard_error, uni.delay_standard_error)
        assert opt.mean_delay + margin < uni.mean_delay
        assert opt.mean_delay >= plan.stream_lower_bound(EXPONENTIAL, tasks, arrival_rate) - margin


def test_overloaded_queue_is_reported_unstable() -> None:
    # Uniform split on the slowest worker's pace: service ≈ 25·2 = 50 per job, arrivals every 25.
    result = sim.simulate_stream(EXPONENTIAL, [25, 25, 25, 25], 100, 0.04, jobs=2000, seed=0)
    assert result.utilisation > 1 and not result.stable
    half = result.delays.size // 2
    assert result.delays[half:].mean() > 2 * result.delays[:half].mean()  # the backlog keeps growing


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arrival_rate": 0.0}, "arrival_rate"),
        ({"arrival_rate": math.inf}, "arrival_rate"),
        ({"jobs": 0}, "jobs"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_simulate_stream_rejects_bad_arguments_by_name(kwargs, field) -> None:
    args = {"profiles": EXPONENTIAL, "split": [1, 1, 1, 1], "tasks": 4, "arrival_rate": 0.1, "jobs": 10, "seed": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"^{field}:"):
        sim.simulate_stream(**args)


# --- closed-loop training ------------------------------------------------------------------------


def test_training_steps_add_the_allreduce_to_the_service_time() -> None:
    split = plan.optimal_split(EXPONENTIAL, 80, 1.1)
    result = sim.simulate_training(EXPONENTIAL, split, 80, steps=3000, allreduce_time=0.25, seed=4)
    np.testing.assert_allclose(result.step_times, result.service_times + 0.25)
    assert result.mean_step_time == pytest.approx(result.service_times.mean() + 0.25)
    np.testing.assert_allclose(result.ends, np.cumsum(result.step_times))
    bound = plan.training_step_lower_bound(EXPONENTIAL, 80, 0.25)
    assert bound <= result.mean_step_time + 4 * result.step_time_standard_error
    # Same seed and split: the same service times as the stream model.
    stream = sim.simulate_stream(EXPONENTIAL, split, 80, 0.01, jobs=3000, seed=4)
    np.testing.assert_array_equal(stream.service_times, result.service_times)
    with pytest.raises(ValueError, match=r"^allreduce_time:"):
        sim.simulate_training(EXPONENTIAL, split, 80, allreduce_time=-1.0)
    with pytest.raises(ValueError, match=r"^steps:"):
        sim.simulate_training(EXPONENTIAL, split, 80, steps=0)


def test_deterministic_training_meets_its_bound() -> None:
    profiles = [WorkerProfile(0.0, m, 0.0) for m in (1.0, 0.5, 0.25)]
    split = plan.optimal_split(profiles, 70, gamma=0.0)  # 10, 20, 40: everyone finishes at 10
    result = sim.simulate_training(profiles, split, 70, steps=5, allreduce_time=1.0)
    assert result.step_times.tolist() == [11.0] * 5
    assert result.mean_step_time == plan.training_step_lower_bound(profiles, 70, 1.0)


# --- success rate --------------------------------------------------------------------------------


@given(
    times=st.lists(st.floats(0, 1e6), min_size=1, max_size=100),
    deadlines=st.lists(st.floats(-10, 1e6), min_size=1, max_size=30),
)
def test_success_rate_is_a_monotone_share(times, deadlines) -> None:
    deadlines = sorted(deadlines)
    rate = sim.success_rate(times, deadlines)
    assert rate.shape == (len(deadlines),)
    assert np.all((rate >= 0) & (rate <= 1))
    assert np.all(np.diff(rate) >= 0)
    for d, r in zip(deadlines, rate):
        assert r == sum(t <= d for t in times) / len(times)


def test_success_rate_of_a_simulation() -> None:
    result = sim.simulate_stream(EXPONENTIAL, [10, 20, 5, 40], 60, 0.03, jobs=2000, seed=0)
    assert sim.success_rate(result.service_times, 0.0) == 0.0
    assert sim.success_rate(result.service_times, result.service_times.max()) == 1.0
    median = np.median(result.service_times)
    assert sim.success_rate(result.service_times, median) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match=r"^service_times:"):
        sim.success_rate([], [1.0])
    with pytest.raises(ValueError, match=r"^deadlines:"):
        sim.success_rate([1.0], [math.nan])
