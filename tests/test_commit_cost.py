"""The commit cost model (codedgrad.codes.commit_cost): pure arithmetic, no processes."""

from __future__ import annotations

import math

import pytest

from codedgrad.codes.commit_cost import (
    FITTED,
    CommitCostModel,
    CommitProtocol,
    commit_latency,
    crossing_world_size,
    expected_round_trips,
    fit_commit_model,
    project,
)

MODEL = CommitCostModel(round_trip=3e-4, service=3e-5, other_ops_per_commit=0.3)


def test_one_rank_commits_in_one_round_trip_on_an_idle_server():
    estimate = commit_latency(CommitCostModel(2e-4, 0.0), 1, 0.1)
    assert estimate.round_trips == pytest.approx(1.0)
    assert estimate.latency == pytest.approx(2e-4)
    assert estimate.share == pytest.approx(2e-4 / (0.1 + 2e-4))
    assert estimate.commits_per_second == pytest.approx(1 / (0.1 + 2e-4))


def test_many_ranks_with_long_tasks_pay_the_stale_first_attempt():
    # Others commit many times during one task: the first attempt fails almost surely, the retry
    # almost never (λ · rtt is small), so two round trips.
    trips = expected_round_trips(64, 1.0, 1e-4)
    assert trips == pytest.approx(2.0, abs=0.02)


def test_retries_match_the_closed_form_for_a_homogeneous_world():
    p, gap, rtt = 16, 0.05, 5e-4
    trips = expected_round_trips(p, gap, rtt)
    # Solve λ = P / (gap + rtt · trips(λ)) by hand, by iteration (it converges here).
    total = p / gap
    for _ in range(200):
        others = total * (p - 1) / p
        expected = 1 + (1 - math.exp(-others * gap)) / math.exp(-others * rtt)
        total = p / (gap + rtt * expected)
    assert trips == pytest.approx(expected, rel=1e-6)


def test_cost_grows_with_the_world_and_falls_with_the_task_size():
    shares = [commit_latency(MODEL, p, 0.05).share for p in (4, 16, 64, 256)]
    assert shares == sorted(shares) and shares[-1] > 2 * shares[0]
    by_task = [commit_latency(MODEL, 64, t).share for t in (0.01, 0.1, 1.0)]
    assert by_task == sorted(by_task, reverse=True)


def test_an_overloaded_server_slows_the_ranks_instead_of_diverging():
    estimate = commit_latency(MODEL, 1024, 0.01)
    assert 0.9 < estimate.server_load < 1.0  # closed system: the load settles below 1
    assert estimate.share > 0.5 and math.isfinite(estimate.latency)
    assert estimate.commits_per_second < 1.0 / MODEL.service  # never more than the server serves


def test_fit_recovers_the_parameters_it_was_given():
    gaps = {p: [0.1 / (1 + r % 4) for r in range(p)] for p in (4, 8, 16, 32)}
    observations = []
    for p, g in gaps.items():
        estimate = commit_latency(MODEL, p, g)
        observations.append((g, estimate.latency, estimate.round_trips + MODEL.other_ops_per_commit))
    fitted = fit_commit_model(observations, service=MODEL.service)
    assert fitted.round_trip == pytest.approx(MODEL.round_trip, rel=1e-4)
    assert fitted.other_ops_per_commit == pytest.approx(MODEL.other_ops_per_commit, rel=1e-3)


def test_crossing_is_the_first_world_size_above_the_share():
    crossing = crossing_world_size(MODEL, 0.1, 0.01)
    assert crossing is not None and crossing > 1
    assert commit_latency(MODEL, crossing, 0.1).share > 0.01
    assert commit_latency(MODEL, crossing - 1, 0.1).share <= 0.01
    assert crossing_world_size(MODEL, 0.001, 0.01) == 1  # one round trip is already more than 1 %
    assert crossing_world_size(CommitCostModel(1e-6, 0.0), 10.0, 0.01, largest=64) is None


def test_projection_and_fitted_constants():
    grid = project(FITTED, [128, 1024], [0.01, 1.0])
    assert set(grid) == {0.01, 1.0} and all(len(row) == 2 for row in grid.values())
    assert grid[1.0][0].share < grid[0.01][0].share


@pytest.mark.parametrize(
    "call",
    [
        lambda: CommitCostModel(0.0, 1e-5),
        lambda: CommitCostModel(1e-4, -1.0),
        lambda: commit_latency(MODEL, 0, 0.1),
        lambda: commit_latency(MODEL, 3, [0.1, 0.1]),
        lambda: commit_latency(MODEL, 2, [0.1, float("nan")]),
        lambda: crossing_world_size(MODEL, 0.1, 1.5),
        lambda: fit_commit_model([]),
    ],
)
def test_bad_input_fails_early(call):
    with pytest.raises(ValueError):
        call()


def test_race_free_counters_cost_two_round_trips_until_the_server_saturates():
    counters = CommitCostModel(MODEL.round_trip, MODEL.service, MODEL.other_ops_per_commit, CommitProtocol.COUNTERS)
    quiet = commit_latency(counters, 256, 0.2)
    assert quiet.round_trips == 2.0 and quiet.latency == pytest.approx(2 * quiet.round_trip)
    # Where the one CAS'd key has passed its cliff, the counters are still at two round trips.
    assert commit_latency(MODEL, 512, 0.1).share > 10 * commit_latency(counters, 512, 0.1).share
    with pytest.raises(ValueError, match="protocol"):
        CommitCostModel(1e-4, 1e-5, 0.0, "cas")
