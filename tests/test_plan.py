"""The planner: the real and integer optimal splits, the uniform split and the lower bounds."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from codedgrad import plan
from codedgrad.plan import PlanError
from codedgrad.profile import WorkerProfile

shifts = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)
means = st.floats(min_value=1e-3, max_value=5.0, allow_nan=False)
stds = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)
gammas = st.sampled_from([0.0, 0.1, 1.0, 3.0])
redundancies = st.sampled_from([1.0, 1.05, 1.25, 1.5, 2.0])


def profile_lists(min_size: int = 1, max_size: int = 8) -> st.SearchStrategy[list[WorkerProfile]]:
    return st.lists(st.builds(WorkerProfile, shifts, means, stds), min_size=min_size, max_size=max_size)


def max_busy_cost(profiles: list[WorkerProfile], split, gamma: float) -> float:
    """The objective, computed from the profile's own cost (independently of plan's coefficients)."""
    return max(p.cost(int(k), gamma) for p, k in zip(profiles, split) if k > 0)


@settings(max_examples=150)
@given(profiles=profile_lists(), tasks=st.integers(1, 5000), redundancy=redundancies, gamma=gammas)
def test_split_sums_exactly_to_slots(profiles, tasks, redundancy, gamma) -> None:
    split = plan.optimal_split(profiles, tasks, redundancy, gamma)
    assert split.dtype == np.int64 and split.shape == (len(profiles),)
    assert np.all(split >= 0)
    assert split.sum() == round(tasks * redundancy)


@settings(max_examples=200)
@given(profiles=profile_lists(), total=st.floats(1.0, 1e4), gamma=gammas)
def test_real_split_equalises_the_costs_of_the_workers_it_uses(profiles, total, gamma) -> None:
    load, level = plan.real_split(profiles, total, gamma)
    assert load.sum() == pytest.approx(total, rel=1e-9)
    assert np.all(load >= 0)
    for p, k in zip(profiles, load):
        constant = p.cost(0, gamma)  # the cost of a worker given no task: shift + γ·shift²
        if k > 0:
            assert p.cost(k, gamma) == pytest.approx(level, rel=1e-9)
        if constant > level:
            assert k == 0


def test_real_split_leaves_out_a_worker_whose_shift_is_above_the_level() -> None:
    fast = WorkerProfile(0.0, 0.01, 0.01)
    late = WorkerProfile(100.0, 0.01, 0.01)  # would finish its first task long after the others finished all
    load, level = plan.real_split([fast, late, fast], 100, gamma=1.0)
    assert load[1] == 0
    assert late.cost(0) > level
    assert load[0] == pytest.approx(50) and load[2] == pytest.approx(50)


def _brute_force_min_max_cost(profiles, total, gamma, capacity) -> float:
    cap = total if capacity is None else capacity
    best = math.inf
    for head in itertools.product(range(min(total, cap) + 1), repeat=len(profiles) - 1):
        last = total - sum(head)
        if 0 <= last <= cap:
            best = min(best, max_busy_cost(profiles, (*head, last), gamma))
    return best


@settings(max_examples=150, deadline=None)
@given(
    profiles=profile_lists(min_size=1, max_size=4),
    tasks=st.integers(1, 12),
    redundancy=redundancies,
    gamma=gammas,
    capped=st.booleans(),
)
def test_integer_split_is_optimal_against_brute_force(profiles, tasks, redundancy, gamma, capped) -> None:
    total = round(tasks * redundancy)
    capacity = tasks if capped else None  # a worker never holds the same task twice
    assume(capacity is None or capacity * len(profiles) >= total)
    split = plan.optimal_split(profiles, tasks, redundancy, gamma, capacity=capacity)
    assert split.sum() == total
    if capacity is not None:
        assert split.max() <= capacity
    best = _brute_force_min_max_cost(profiles, total, gamma, capacity)
    assert max_busy_cost(profiles, split, gamma) <= best * (1 + 1e-9)


@settings(max_examples=150)
@given(
    others=profile_lists(min_size=0, max_size=5),
    slow=st.builds(WorkerProfile, shifts, means, stds),
    speedup=st.floats(min_value=1.001, max_value=10.0),
    std_ratio=st.floats(min_value=0.0, max_value=1.0),
    position=st.integers(0, 5),
    tasks=st.integers(1, 3000),
    redundancy=redundancies,
    gamma=gammas,
)
def test_a_faster_worker_never_gets_fewer_tasks(
    others, slow, speedup, std_ratio, position, tasks, redundancy, gamma
) -> None:
    fast = WorkerProfile(slow.shift, slow.mean / speedup, slow.std * std_ratio)  # same shift, faster, steadier
    profiles = list(others)
    profiles.insert(min(position, len(profiles)), fast)
    profiles.insert(0 if position % 2 else len(profiles), slow)  # slow before or after the fast one
    split = plan.optimal_split(profiles, tasks, redundancy, gamma)
    assert split[profiles.index(fast)] >= split[profiles.index(slow)]


def test_heterogeneous_split_follows_speed() -> None:
    profiles = [WorkerProfile(0.0, m, m) for m in (1.0, 0.5, 0.25)]
    split = plan.optimal_split(profiles, 700, gamma=0.0)
    # With γ = 0 and no shifts the loads are proportional to speed: 100, 200, 400.
    assert split.tolist() == [100, 200, 400]


@given(workers=st.integers(1, 50), tasks=st.integers(1, 5000), redundancy=redundancies)
def test_uniform_split_is_even(workers, tasks, redundancy) -> None:
    split = plan.uniform_split(workers, tasks, redundancy)
    assert split.sum() == round(tasks * redundancy)
    assert split.max() - split.min() <= 1


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: plan.optimal_split([WorkerProfile(0, 1, 1)], 0), "tasks"),
        (lambda: plan.optimal_split([WorkerProfile(0, 1, 1)], 10, redundancy=0.9), "redundancy"),
        (lambda: plan.optimal_split([WorkerProfile(0, 1, 1)], 10, gamma=-1.0), "gamma"),
        (lambda: plan.optimal_split([], 10), "profiles"),
        (lambda: plan.optimal_split([WorkerProfile(0, 1, 1)] * 2, 10, capacity=4), "capacity"),
        (lambda: plan.uniform_split(0, 10), "workers"),
        (lambda: plan.stream_lower_bound([WorkerProfile(0, 1, 1)], 10, 0.0), "arrival_rate"),
        (lambda: plan.training_step_lower_bound([WorkerProfile(0, 1, 1)], 10, -1.0), "allreduce_time"),
    ],
)
def test_invalid_arguments_name_the_argument(call, field) -> None:
    with pytest.raises(PlanError, match=rf"^{field}:"):
        call()


@given(profiles=profile_lists(), tasks=st.integers(1, 5000))
def test_capacity_time_pools_the_workers(profiles, tasks) -> None:
    t = plan.capacity_time(profiles, tasks)
    pooled = sum(max(0.0, t - p.shift) / p.mean for p in profiles)
    assert pooled == pytest.approx(tasks, rel=1e-9)
    if all(p.shift == 0 for p in profiles):
        assert t == pytest.approx(tasks / sum(1 / p.mean for p in profiles), rel=1e-12)


def test_stream_lower_bound_is_pollaczek_khinchine_and_refuses_overload() -> None:
    profiles = [WorkerProfile(0.0, 2.0, 2.0), WorkerProfile(0.0, 2.0, 0.0)]
    service = 10 / (1 / 2 + 1 / 2)
    assert plan.stream_lower_bound(profiles, 10, 0.05) == pytest.approx(0.05 * service**2 / (2 * 0.5) + service)
    with pytest.raises(PlanError, match=r"^arrival_rate: .*capacity"):
        plan.stream_lower_bound(profiles, 10, 1 / service)
    assert plan.training_step_lower_bound(profiles, 10, 0.5) == pytest.approx(service + 0.5)


def test_split_statistics_report_the_model() -> None:
    profiles = [WorkerProfile(1.0, 2.0, 3.0), WorkerProfile(0.0, 1.0, 0.0)]
    stats = plan.split_statistics(profiles, [4, 0], gamma=0.5)
    assert stats.mean_finish.tolist() == [9.0, 0.0]
    assert stats.std_finish.tolist() == [6.0, 0.0]
    assert stats.cost[0] == pytest.approx(profiles[0].cost(4, 0.5))
    assert stats.max_cost == pytest.approx(profiles[0].cost(4, 0.5))
    with pytest.raises(PlanError, match=r"^split:"):
        plan.split_statistics(profiles, [1, 2, 3])


def test_choose_redundancy_prefers_the_least_redundant_near_best() -> None:
    # Exponential stragglers: a little redundancy pays off against none.
    profiles = [WorkerProfile(0.0, m, m) for m in (1.0, 1.0, 2.0, 4.0)]
    candidates = (1.0, 1.1, 1.3)
    chosen = plan.choose_redundancy(profiles, 40, candidates, tolerance=0.02, jobs=400, seed=3)
    assert chosen in candidates
    # Re-derive the rule from the simulator: the chosen one is within 2 % of the best, no smaller one is.
    from codedgrad import sim

    delays = {
        omega: sim.simulate_training(
            profiles, plan.optimal_split(profiles, 40, omega), 40, steps=400, seed=3
        ).mean_step_time
        for omega in candidates
    }
    best = min(delays.values())
    assert delays[chosen] <= best * 1.02
    assert all(delays[omega] > best * 1.02 for omega in candidates if omega < chosen)
    assert chosen > 1.0  # redundancy helps here
    with pytest.raises(PlanError, match=r"^candidates:"):
        plan.choose_redundancy(profiles, 40, candidates=())


def test_propose_num_tasks_balances_overhead_against_tail():
    from codedgrad.plan import propose_num_tasks

    # K* = sqrt(W·P/o): 1 s of compute, 4 ranks, 1 ms per task -> 63 tasks.
    assert propose_num_tasks(4, 1.0, 1e-3) == 63
    # Cheaper tasks allow finer splits; the commit rule (a task >= 50 commits) caps them.
    assert propose_num_tasks(4, 1.0, 1e-5) > propose_num_tasks(4, 1.0, 1e-3)
    assert propose_num_tasks(4, 1.0, 1e-5, commit_seconds=1e-3) == 20
    # Never fewer tasks than ranks, never more than allowed.
    assert propose_num_tasks(8, 1e-3, 1.0) == 8
    assert propose_num_tasks(4, 1.0, 1e-6, max_tasks=32) == 32
    with pytest.raises(PlanError, match="task_overhead_seconds"):
        propose_num_tasks(4, 1.0, 0.0)


def test_real_split_when_every_worker_must_be_full() -> None:
    # workers × capacity = total, or a single worker: θ is the top of the bracket (no sign change to find).
    profiles = [WorkerProfile(0.0, m, m) for m in (0.1, 0.3, 0.7)]
    load, level = plan.real_split(profiles, 30, gamma=1.0, capacity=10)
    np.testing.assert_allclose(load, [10, 10, 10])
    assert level == pytest.approx(max(p.cost(10) for p in profiles))
    load, level = plan.real_split(profiles[1:2], 7, gamma=0.5)
    assert load.tolist() == pytest.approx([7]) and level == pytest.approx(profiles[1].cost(7, 0.5))
    assert plan.optimal_split(profiles, 10, redundancy=3.0, capacity=10).tolist() == [10, 10, 10]


@pytest.mark.parametrize("total", [-1.0, math.inf, math.nan])
def test_real_split_rejects_a_bad_total(total) -> None:
    with pytest.raises(PlanError, match=r"^total:"):
        plan.real_split([WorkerProfile(0, 1, 1)], total)


def test_fixed_cost_per_call_favours_more_tasks_when_chunked_and_less_redundancy() -> None:
    from codedgrad.plan import choose_redundancy, propose_num_tasks

    fine = propose_num_tasks(4, 1.0, 0.001)
    chunked = propose_num_tasks(4, 1.0, 0.001, chunked=True)
    assert fine == 63 and chunked > 5 * fine  # primaries pay the overhead a few times, not K/P times
    assert propose_num_tasks(4, 1.0, 0.001, chunked=True, redundancy=1.2) < chunked  # backups pay it each
    assert propose_num_tasks(4, 1.0, 0.001, chunked=True, max_tasks=100) == 100
    profiles = [WorkerProfile(0.0, 0.08 / s, 0.04 / s) for s in (1, 1, 2, 4)]
    candidates = (1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
    free = choose_redundancy(profiles, 64, candidates, jobs=300)
    costly = choose_redundancy(profiles, 64, candidates, jobs=300, task_overhead=0.01)
    assert costly < free  # each backup costs a call's fixed part more
    with pytest.raises(PlanError, match="task_overhead"):
        choose_redundancy(profiles, 64, candidates, jobs=10, task_overhead=-1.0)
