"""WorkerProfile: validation, the profile file format, task-time sampling and robust fitting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codedgrad.profile import (
    ProfileError,
    WorkerProfile,
    fit_profile,
    load_profiles,
    profiles_from_dict,
    profiles_to_dict,
    save_profiles,
)

finite = st.floats(min_value=0.0, max_value=1e3, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shift": 0.0, "mean": 0.0, "std": 0.1}, "mean"),
        ({"shift": 0.0, "mean": -1.0, "std": 0.1}, "mean"),
        ({"shift": 0.0, "mean": 1.0, "std": -0.1}, "std"),
        ({"shift": -0.5, "mean": 1.0, "std": 0.1}, "shift"),
        ({"shift": 0.0, "mean": math.nan, "std": 0.1}, "mean"),
        ({"shift": math.inf, "mean": 1.0, "std": 0.1}, "shift"),
        ({"shift": 0.0, "mean": "1", "std": 0.1}, "mean"),
        ({"shift": 0.0, "mean": 1.0, "std": True}, "std"),
    ],
)
def test_invalid_profile_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ProfileError, match=rf"^{field}:"):
        WorkerProfile(**kwargs)


def test_profile_error_is_a_value_error() -> None:
    # The CLI and callers catch ValueError; a ProfileError must be one.
    assert issubclass(ProfileError, ValueError)


@given(shift=finite, mean=positive, std=finite, tasks=st.integers(min_value=0, max_value=10_000))
def test_moments_follow_the_model(shift: float, mean: float, std: float, tasks: int) -> None:
    p = WorkerProfile(shift, mean, std)
    assert p.expected_time(tasks) == pytest.approx(shift + tasks * mean)
    assert p.second_moment(tasks) == pytest.approx((shift + tasks * mean) ** 2 + tasks * std**2)
    assert p.cost(tasks, gamma=0.0) == pytest.approx(p.expected_time(tasks))
    assert p.rate == pytest.approx(1 / mean)


@given(
    st.lists(st.tuples(finite, positive, finite), min_size=1, max_size=6).map(
        lambda rows: [WorkerProfile(*row) for row in rows]
    )
)
def test_dict_round_trip(profiles: list[WorkerProfile]) -> None:
    document = json.loads(json.dumps(profiles_to_dict(profiles)))
    assert profiles_from_dict(document) == profiles


def test_file_round_trip(tmp_path) -> None:
    profiles = [WorkerProfile(0.0, 0.05, 0.05), WorkerProfile(0.01, 0.1, 0.02), WorkerProfile(0.2, 1.5, 3.0)]
    path = tmp_path / "profile.json"
    save_profiles(path, profiles)
    assert load_profiles(path) == profiles
    assert json.loads(path.read_text()) == {
        "workers": [{"shift": p.shift, "mean": p.mean, "std": p.std} for p in profiles]
    }


def test_shift_defaults_to_zero() -> None:
    (p,) = profiles_from_dict({"workers": [{"mean": 2, "std": 1}]})
    assert p == WorkerProfile(0.0, 2.0, 1.0)


@pytest.mark.parametrize(
    ("document", "field"),
    [
        ([], "profile"),
        ({"nodes": []}, "profile"),
        ({"workers": []}, "workers"),
        ({"workers": {"mean": 1}}, "workers"),
        ({"workers": [{"mean": 1, "std": 1}, 3]}, r"workers\[1\]"),
        ({"workers": [{"mean": 1, "std": 1}, {"mean": 1}]}, r"workers\[1\]\.std"),
        ({"workers": [{"std": 1}]}, r"workers\[0\]\.mean"),
        ({"workers": [{"mean": 1, "std": 1}, {"mean": 1, "std": 1}, {"mean": -2, "std": 1}]}, r"workers\[2\]\.mean"),
        ({"workers": [{"mean": 1, "std": 1, "speed": 2}]}, r"workers\[0\]\.speed"),
        ({"workers": [{"mean": 1, "std": 1, "shift": "x"}]}, r"workers\[0\]\.shift"),
    ],
)
def test_malformed_document_names_the_field(document: object, field: str) -> None:
    with pytest.raises(ProfileError, match=rf"^{field}"):
        profiles_from_dict(document)


def test_unreadable_or_non_json_file(tmp_path) -> None:
    with pytest.raises(ProfileError, match=r"^profile: cannot read"):
        load_profiles(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"workers": [')
    with pytest.raises(ProfileError, match=r"^profile: .* is not JSON"):
        load_profiles(broken)


@pytest.mark.parametrize(("mean", "std"), [(1.0, 0.0), (1.0, 0.4), (2.0, 2.0), (1.0, 3.0)])
def test_sampled_task_times_have_the_profile_moments(mean: float, std: float) -> None:
    # One regime each: constant, shifted exponential, exponential, gamma (std > mean).
    times = WorkerProfile(5.0, mean, std).sample_task_times(np.random.default_rng(1), 200_000)
    assert times.shape == (200_000,)
    assert np.all(times >= 0)  # the shift is not part of a task time
    assert times.mean() == pytest.approx(mean, rel=0.02)
    assert times.std() == pytest.approx(std, rel=0.03, abs=1e-12)


def _shifted_exponential(rng: np.random.Generator, n: int, floor: float, scale: float) -> np.ndarray:
    return floor + rng.exponential(scale, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("floor", "scale"), [(0.0, 1.0), (0.5, 0.5), (0.04, 0.01)])
def test_fit_recovers_clean_measurements(seed: int, floor: float, scale: float) -> None:
    times = _shifted_exponential(np.random.default_rng(seed), 20_000, floor, scale)
    fitted = fit_profile(times, shift=0.25)
    assert fitted.shift == 0.25
    assert fitted.mean == pytest.approx(floor + scale, rel=0.05)
    assert fitted.std == pytest.approx(scale, rel=0.1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("floor", "scale"), [(0.0, 1.0), (0.5, 0.5), (0.04, 0.01)])
def test_fit_is_robust_to_stalls(seed: int, floor: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    clean = _shifted_exponential(rng, 20_000, floor, scale)
    stalled = clean.copy()
    hit = rng.choice(clean.size, size=clean.size // 20, replace=False)  # 5 % of the tasks …
    stalled[hit] *= 10  # … take ten times as long
    # The contamination is large: a plain mean would move by far more than 10 %.
    assert stalled.mean() / clean.mean() - 1 > 0.3
    moved = fit_profile(stalled).mean / fit_profile(clean).mean - 1
    assert abs(moved) < 0.10


def test_fit_rejects_bad_measurements() -> None:
    for bad in ([], [1.0, math.nan], [1.0, -0.5], [[1.0, 2.0]]):
        with pytest.raises(ProfileError, match=r"^task_times:"):
            fit_profile(bad)


@settings(max_examples=50)
@given(st.lists(st.floats(min_value=0.0, max_value=1e3), min_size=1, max_size=200))
def test_fit_always_returns_a_valid_profile(times: list[float]) -> None:
    fitted = fit_profile(times)
    assert fitted.mean > 0 and fitted.std >= 0
    assert fitted.mean <= max(max(times), 1e-9) / math.log(2) + 1e-9 * max(times)  # never beyond the data's scale


# --- the cost model of a call: fixed + per sample -------------------------------------------------


def test_cost_model_fit_recovers_fixed_and_per_sample_despite_stalls() -> None:
    from codedgrad.profile import fit_cost_model

    rng = np.random.default_rng(0)
    samples = rng.choice([4, 8, 16, 32, 128], 200).astype(float)
    seconds = (0.0009 + 0.0001 * samples) * (1 + 0.03 * rng.standard_normal(200))
    seconds[:8] *= 10  # stalled calls
    cost = fit_cost_model(samples, seconds)
    assert cost.fixed == pytest.approx(0.0009, rel=0.1)
    assert cost.per_sample == pytest.approx(0.0001, rel=0.03)
    # fixed ≤ 10 % of a call from 9·fixed/per_sample ≈ 81 samples on
    assert cost.min_samples(0.1) == pytest.approx(81, rel=0.15)


def test_cost_model_noise_alone_does_not_make_calls_large() -> None:
    """Exponential jitter per task and no fixed cost: the lower confidence bound of the fixed part
    stays at 0 in nearly every fit, so chunks may shrink to one task."""
    from codedgrad.profile import fit_cost_model

    rng = np.random.default_rng(1)
    large = 0
    for _ in range(100):
        tasks = rng.choice([1, 2, 3, 6], 32)
        seconds = np.array([sum(0.01 * (0.5 + 0.5 * rng.exponential()) for _ in range(k)) for k in tasks])
        large += fit_cost_model(tasks * 3.0, seconds).min_samples(0.1) > 3.0
    assert large <= 3


def test_cost_model_edge_cases_and_errors() -> None:
    from codedgrad.profile import CostModel, fit_cost_model

    same = fit_cost_model([4.0, 4.0, 4.0], [0.01, 0.012, 0.011])  # one size: no fixed part can be told apart
    assert same.fixed == 0 and same.per_sample == pytest.approx(0.011 / 4)
    assert CostModel(0.0, 1.0).min_samples() == 0
    assert CostModel(1.0, 0.0).min_samples() == math.inf
    exact = fit_cost_model([1.0, 2.0, 4.0], [0.003, 0.005, 0.009])
    assert exact.fixed == pytest.approx(0.001) and exact.per_sample == pytest.approx(0.002)
    for samples, seconds, field in (([], [], "samples"), ([0.0], [1.0], "samples"), ([1.0], [-1.0], "seconds")):
        with pytest.raises(ProfileError, match=field):
            fit_cost_model(samples, seconds)
    with pytest.raises(ProfileError, match="fixed"):
        CostModel(-1.0, 1.0)
    with pytest.raises(ProfileError, match="overhead_share"):
        CostModel(1.0, 1.0).min_samples(1.5)
