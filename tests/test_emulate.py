"""Heterogeneity emulation: deterministic, order-independent delays with the advertised statistics."""

import dataclasses
import datetime
import gc
import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codedgrad.emulate import ENV_VARIABLE, EmulationError, EmulationMode, Heterogeneity
from codedgrad.profile import WorkerProfile


def delays(het: Heterogeneity, rank: int, count: int, first_step: int = 0, per_step: int = 10) -> np.ndarray:
    """``count`` delays of ``rank``: ``per_step`` task indices on each of consecutive steps."""
    return np.array(
        [het.task_delay(rank, first_step + i // per_step, i % per_step) for i in range(count)], dtype=np.float64
    )


# -- determinism ---------------------------------------------------------------------------------


def test_delays_are_a_pure_function_of_rank_step_and_index() -> None:
    het = Heterogeneity(speeds=[1.0, 0.5, 2.0], base=0.01, stall_prob=0.1, seed=7)
    again = Heterogeneity(speeds=[1.0, 0.5, 2.0], base=0.01, stall_prob=0.1, seed=7)
    grid = [(r, s, i) for r in range(3) for s in range(4) for i in range(5)]
    first = [het.task_delay(*key) for key in grid]
    assert first == [again.task_delay(*key) for key in grid]
    assert first == [het.task_delay(*key) for key in grid]  # repeated calls: no hidden state
    assert len(set(first)) == len(first)  # every task gets its own draw


def test_delays_do_not_depend_on_call_order() -> None:
    het = Heterogeneity(speeds=[1.0, 3.0], base=0.02, stall_prob=0.2, seed=3)
    grid = [(r, s, i) for r in range(2) for s in range(5) for i in range(6)]
    in_order = {key: het.task_delay(*key) for key in grid}
    shuffled = list(grid)
    np.random.default_rng(0).shuffle(shuffled)
    fresh = Heterogeneity(speeds=[1.0, 3.0], base=0.02, stall_prob=0.2, seed=3)
    assert {key: fresh.task_delay(*key) for key in shuffled} == in_order


def test_a_ranks_delays_do_not_depend_on_the_other_ranks() -> None:
    # Other ranks' speeds (and their number) change nothing for rank 0: streams are per rank.
    a = Heterogeneity(speeds=[1.0, 2.0, 3.0], base=0.01, stall_prob=0.1, seed=5)
    b = Heterogeneity(speeds=[1.0, 0.1], base=0.01, stall_prob=0.1, seed=5)
    assert delays(a, 0, 50).tolist() == delays(b, 0, 50).tolist()


def test_seed_changes_the_delays() -> None:
    a = Heterogeneity(speeds=[1.0], base=0.01, seed=0)
    b = Heterogeneity(speeds=[1.0], base=0.01, seed=1)
    assert not np.array_equal(delays(a, 0, 20), delays(b, 0, 20))


# -- statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("jitter", "stall_prob"),
    [(0.5, 0.0), (1.0, 0.0), (0.5, 0.05), (0.2, 0.02)],
)
def test_delays_match_the_profiles(jitter: float, stall_prob: float) -> None:
    het = Heterogeneity(speeds=[1.0, 0.25], base=0.01, jitter=jitter, stall_prob=stall_prob, seed=11)
    count = 8000
    for rank, profile in enumerate(het.profiles()):
        sample = delays(het, rank, count)
        # Mean within 5 standard errors.
        assert abs(sample.mean() - profile.mean) < 5 * profile.std / math.sqrt(count), rank
        # Variance within 5 standard errors, the standard error estimated from the sample's 4th moment.
        centred = sample - sample.mean()
        variance = float(np.mean(centred**2))
        variance_se = math.sqrt((np.mean(centred**4) - variance**2) / count)
        assert abs(variance - profile.std**2) < 5 * variance_se, rank


def test_profiles_closed_form() -> None:
    het = Heterogeneity(speeds=[2.0, 0.5], base=0.01, jitter=0.5, stall_prob=0.1, stall_factor=10.0)
    fast, slow = het.profiles()
    assert isinstance(fast, WorkerProfile) and fast.shift == 0.0
    mean = 0.005
    assert fast.mean == pytest.approx(0.9 * mean + 0.1 * 10 * mean)
    second_moment = 0.9 * (mean**2 + (0.5 * mean) ** 2) + 0.1 * (10 * mean) ** 2
    assert fast.std == pytest.approx(math.sqrt(second_moment - fast.mean**2))
    assert slow.mean == pytest.approx(4 * fast.mean) and slow.std == pytest.approx(4 * fast.std)
    # Exponential tasks (jitter 1) without stalls: std == mean, as the planner's model expects.
    exponential = Heterogeneity(speeds=[1.0], base=0.01, jitter=1.0).profiles()[0]
    assert exponential.std == pytest.approx(exponential.mean)


def test_constant_delays_without_jitter_or_stalls() -> None:
    het = Heterogeneity(speeds=[1.0, 4.0], base=0.02, jitter=0.0)
    assert set(delays(het, 0, 30).tolist()) == {0.02}
    assert set(delays(het, 1, 30).tolist()) == {0.005}
    assert [p.std for p in het.profiles()] == [0.0, 0.0]


def test_stall_frequency_and_length() -> None:
    het = Heterogeneity(speeds=[1.0], base=0.01, jitter=0.0, stall_prob=0.1, stall_factor=7.0, seed=2)
    count = 5000
    sample = delays(het, 0, count)
    assert set(np.round(sample, 12).tolist()) == {0.01, 0.07}  # a stall takes exactly stall_factor × mean
    frequency = float(np.mean(sample > 0.05))
    assert abs(frequency - 0.1) < 5 * math.sqrt(0.1 * 0.9 / count)


def test_no_stalls_when_stall_prob_is_zero_and_always_when_one() -> None:
    never = Heterogeneity(speeds=[1.0], base=0.01, jitter=1.0, stall_prob=0.0)
    assert delays(never, 0, 500).max() < 0.01 * 10  # an Exp(0.01) above 0.1 is a 1-in-22000 event
    always = Heterogeneity(speeds=[1.0], base=0.01, stall_prob=1.0, stall_factor=3.0)
    assert np.allclose(delays(always, 0, 50), 0.03)


@settings(max_examples=40, deadline=None)
@given(
    speed=st.floats(0.01, 100.0),
    base=st.floats(1e-4, 1.0),
    jitter=st.floats(0.0, 1.0),
    stall_prob=st.floats(0.0, 1.0),
    stall_factor=st.floats(1.0, 50.0),
    seed=st.integers(0, 2**32),
    step=st.integers(0, 10**6),
    index=st.integers(0, 1000),
)
def test_delay_is_at_least_the_fixed_part(
    speed: float, base: float, jitter: float, stall_prob: float, stall_factor: float, seed: int, step: int, index: int
) -> None:
    het = Heterogeneity([speed], base, jitter, stall_prob, stall_factor, seed)
    delay = het.task_delay(0, step, index)
    mean = base / speed
    assert math.isfinite(delay)
    assert delay >= min(1.0 - jitter, stall_factor) * mean * (1 - 1e-12)


# -- speed change and forced stalls --------------------------------------------------------------


def test_speed_change_from_change_step_on() -> None:
    het = Heterogeneity(speeds=[1.0, 2.0], base=0.01, jitter=0.0, change_step=5, change_speeds=[0.5, 2.0])
    assert [het.task_delay(0, step, 0) for step in range(8)] == [0.01] * 5 + [0.02] * 3
    assert [het.task_delay(1, step, 3) for step in range(8)] == [0.005] * 8
    assert het.speeds_at(4) == (1.0, 2.0) and het.speeds_at(5) == (0.5, 2.0)
    assert het.mean_task_time(0, 4) == 0.01 and het.mean_task_time(0, 5) == 0.02
    assert het.profiles()[0].mean == 0.01  # profiles describe the speeds before the change


def test_speed_change_keeps_the_random_stream() -> None:
    # Only the scale changes: the same draws, stretched by the speed ratio.
    steady = Heterogeneity(speeds=[1.0], base=0.01)
    changed = Heterogeneity(speeds=[1.0], base=0.01, change_step=3, change_speeds=[0.25])
    assert changed.task_delay(0, 2, 1) == steady.task_delay(0, 2, 1)
    assert changed.task_delay(0, 3, 1) == pytest.approx(4 * steady.task_delay(0, 3, 1))


def test_forced_stall_delays_only_that_ranks_first_task_of_that_step() -> None:
    plain = Heterogeneity(speeds=[1.0, 1.0], base=0.01, seed=4)
    forced = dataclasses.replace(plain, forced_stalls=((1, 3, 2.0), (1, 3, 0.5), (0, 6, 1.0)))
    assert forced.task_delay(1, 3, 0) == pytest.approx(plain.task_delay(1, 3, 0) + 2.5)  # stalls add up
    assert forced.task_delay(0, 6, 0) == pytest.approx(plain.task_delay(0, 6, 0) + 1.0)
    for key in [(1, 3, 1), (0, 3, 0), (1, 2, 0), (1, 4, 0), (0, 6, 1)]:
        assert forced.task_delay(*key) == plain.task_delay(*key), key
    assert forced.profiles() == plain.profiles()  # one-off events, not part of the rate


def test_sleep_sleeps_for_the_delay_and_returns_it() -> None:
    het = Heterogeneity(speeds=[1.0], base=0.03, jitter=0.2, forced_stalls=((0, 1, 0.05),))
    start = time.perf_counter()
    slept = het.sleep(0, 1, 0)
    elapsed = time.perf_counter() - start
    assert slept == het.task_delay(0, 1, 0)
    assert slept >= 0.05 + 0.8 * 0.03
    assert elapsed >= slept * 0.99


def test_batch_delay_is_the_sum_of_the_task_delays() -> None:
    het = Heterogeneity(speeds=[1.0, 0.5], base=0.01, stall_prob=0.2, seed=9, forced_stalls=((1, 2, 0.3),))
    for rank, step, count, first in [(0, 0, 5, 0), (1, 2, 4, 0), (1, 2, 3, 1), (0, 7, 1, 6)]:
        expected = sum(het.task_delay(rank, step, first + i) for i in range(count))
        assert het.batch_delay(rank, step, count, first) == pytest.approx(expected, rel=1e-15)
    # The forced stall is on index 0 only: in a batch from index 0, not in one from index 1.
    assert het.batch_delay(1, 2, 2) >= 0.3 > het.batch_delay(1, 2, 2, first=1)
    assert het.batch_delay(0, 3, 0) == 0.0


def test_sleep_batch_sleeps_once_for_the_whole_batch() -> None:
    het = Heterogeneity(speeds=[2.0], base=0.02, jitter=0.0)
    start = time.perf_counter()
    slept = het.sleep_batch(0, 4, 3)
    elapsed = time.perf_counter() - start
    assert slept == pytest.approx(3 * 0.01) and elapsed >= slept * 0.99
    assert het.sleep_batch(0, 4, 0) == 0.0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0, 0, -1), "count"),
        ((0, 0, 1.5), "count"),
        ((0, 0, 2, -1), "first"),
        ((2, 0, 1), "rank"),
        ((0, -1, 1), "step"),
    ],
)
def test_batch_delay_checks_its_arguments(args: tuple, field: str) -> None:
    het = Heterogeneity(**VALID)
    with pytest.raises(EmulationError, match=f"^{field}:"):
        het.batch_delay(*args)


# -- world size, description, serialisation -----------------------------------------------------


def test_world_size_and_check() -> None:
    het = Heterogeneity(speeds=[1.0, 1.0, 0.5], base=0.01)
    assert het.world_size == 3
    het.check_world_size(3)
    with pytest.raises(EmulationError, match=r"^speeds: .*3 ranks.*has 4"):
        het.check_world_size(4)


def test_describe_says_it_is_emulation() -> None:
    het = Heterogeneity(speeds=[1.0, 0.5], base=0.01, change_step=2, change_speeds=[1, 1], forced_stalls=[(0, 1, 2)])
    text = het.describe()
    assert text.startswith("EMULATED") and "[1.0, 0.5]" in text and "from step 2" in text and "forced_stalls" in text


def test_values_are_normalised_and_frozen() -> None:
    het = Heterogeneity(speeds=np.array([1, 2]), base=1, seed=np.int64(3), forced_stalls=[[0, 1, 2]])
    assert het.speeds == (1.0, 2.0) and isinstance(het.base, float) and type(het.seed) is int
    assert het.forced_stalls == ((0, 1, 2.0),)
    assert hash(het) == hash(Heterogeneity(speeds=(1.0, 2.0), base=1.0, seed=3, forced_stalls=((0, 1, 2.0),)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        het.base = 2.0  # type: ignore[misc]


def test_json_round_trip() -> None:
    het = Heterogeneity(
        speeds=[1.0, 0.5],
        base=0.004,
        jitter=0.3,
        stall_prob=0.02,
        stall_factor=8.0,
        seed=9,
        change_step=10,
        change_speeds=[0.5, 1.0],
        forced_stalls=[(1, 5, 2.0)],
    )
    assert Heterogeneity.from_json(het.to_json()) == het
    assert json.loads(het.to_json())["forced_stalls"] == [[1, 5, 2.0]]
    minimal = Heterogeneity.from_json('{"speeds": [1, 2], "base": 0.01}')
    assert minimal == Heterogeneity(speeds=[1.0, 2.0], base=0.01)


def test_env_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    het = Heterogeneity(speeds=[1.0, 0.5], base=0.01, stall_prob=0.01, forced_stalls=[(1, 2, 1.5)])
    monkeypatch.setenv(ENV_VARIABLE, het.to_json())
    assert ENV_VARIABLE == "CODEDGRAD_EMULATE"
    assert Heterogeneity.from_env() == het
    monkeypatch.setenv("MY_EMULATION", het.to_json())
    assert Heterogeneity.from_env("MY_EMULATION") == het
    monkeypatch.setenv(ENV_VARIABLE, "  ")
    assert Heterogeneity.from_env() is None
    monkeypatch.delenv(ENV_VARIABLE)
    assert Heterogeneity.from_env() is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("{speeds: [1]}", r"^CODEDGRAD_EMULATE: not valid JSON"),
        ("[1, 2]", r"^CODEDGRAD_EMULATE: expected a JSON object"),
        ('{"speeds": [1, -1], "base": 0.01}', r"^CODEDGRAD_EMULATE: speeds\[1\]: must be > 0"),
        ('{"speeds": [1], "base": "fast"}', r"^CODEDGRAD_EMULATE: base: must be a number"),
        ('{"speeds": [1], "base": 0.01, "jiter": 0.5}', r"^CODEDGRAD_EMULATE: jiter: unknown field"),
        ('{"speeds": [1]}', r"^CODEDGRAD_EMULATE: base: missing"),
        ('{"base": 0.01}', r"^CODEDGRAD_EMULATE: speeds: missing"),
        ('{"speeds": [1], "base": 0.01, "forced_stalls": [[3, 0, 1]]}', r"^CODEDGRAD_EMULATE: forced_stalls\[0\].rank"),
    ],
)
def test_malformed_env_names_variable_and_field(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv(ENV_VARIABLE, value)
    with pytest.raises(ValueError, match=message):
        Heterogeneity.from_env()


# -- validation ----------------------------------------------------------------------------------

VALID = {"speeds": [1.0, 0.5], "base": 0.01}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"speeds": []}, "speeds"),
        ({"speeds": 1.0}, "speeds"),
        ({"speeds": "12"}, "speeds"),
        ({"speeds": [1.0, 0.0]}, "speeds[1]"),
        ({"speeds": [-1.0, 1.0]}, "speeds[0]"),
        ({"speeds": [1.0, math.inf]}, "speeds[1]"),
        ({"speeds": [math.nan, 1.0]}, "speeds[0]"),
        ({"speeds": [True, 1.0]}, "speeds[0]"),
        ({"base": 0.0}, "base"),
        ({"base": -0.01}, "base"),
        ({"base": math.inf}, "base"),
        ({"base": None}, "base"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": math.nan}, "jitter"),
        ({"stall_prob": -0.01}, "stall_prob"),
        ({"stall_prob": 1.01}, "stall_prob"),
        ({"stall_factor": 0.5}, "stall_factor"),
        ({"stall_factor": math.inf}, "stall_factor"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"change_step": 3}, "change_speeds"),
        ({"change_speeds": [1.0, 1.0]}, "change_step"),
        ({"change_step": -1, "change_speeds": [1.0, 1.0]}, "change_step"),
        ({"change_step": 2.0, "change_speeds": [1.0, 1.0]}, "change_step"),
        ({"change_step": 2, "change_speeds": [1.0]}, "change_speeds"),
        ({"change_step": 2, "change_speeds": [1.0, 0.0]}, "change_speeds[1]"),
        ({"forced_stalls": 5}, "forced_stalls"),
        ({"forced_stalls": [(0, 1)]}, "forced_stalls[0]"),
        ({"forced_stalls": [(0, 1, 1.0), (2, 1, 1.0)]}, "forced_stalls[1].rank"),
        ({"forced_stalls": [(-1, 1, 1.0)]}, "forced_stalls[0].rank"),
        ({"forced_stalls": [(0, -1, 1.0)]}, "forced_stalls[0].step"),
        ({"forced_stalls": [(0, 1, -1.0)]}, "forced_stalls[0].seconds"),
        ({"forced_stalls": [(0, 1, math.nan)]}, "forced_stalls[0].seconds"),
        ({"mode": "fast"}, "mode"),
        ({"mode": None}, "mode"),
    ],
)
def test_every_validation_error_names_its_field(changes: dict, field: str) -> None:
    with pytest.raises(EmulationError) as info:
        Heterogeneity(**{**VALID, **changes})
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("args", "field"),
    [((2, 0, 0), "rank"), ((-1, 0, 0), "rank"), ((0, -1, 0), "step"), ((0, 0, -1), "index"), ((0, 0.5, 0), "step")],
)
def test_task_delay_checks_its_arguments(args: tuple, field: str) -> None:
    het = Heterogeneity(**VALID)
    with pytest.raises(EmulationError, match=f"^{field}:"):
        het.task_delay(*args)


# -- compute mode ------------------------------------------------------------------------------

COMPUTE = {"speeds": [1.0, 2.0, 4.0], "base": 0.001, "mode": "compute"}


def test_sleep_mode_ignores_the_measured_compute() -> None:
    het = Heterogeneity(speeds=[1.0, 0.5], base=0.01, stall_prob=0.1, seed=3)
    assert het.mode is EmulationMode.SLEEP
    for key in [(0, 0, 0), (1, 4, 2), (1, 9, 7)]:
        assert het.task_delay(*key, compute_seconds=0.5) == het.task_delay(*key)
    assert het.batch_delay(1, 2, 5, 1, compute_seconds=3.0) == het.batch_delay(1, 2, 5, 1)


def test_compute_mode_scales_the_measured_compute_by_the_slowdown() -> None:
    het = Heterogeneity(**{**COMPUTE, "jitter": 0.0})
    assert het.reference_speed == 4.0 and [het.slowdown(r) for r in range(3)] == [4.0, 2.0, 1.0]
    # Without noise a task of compute c takes c·s_ref/s: the delay is the rest.
    assert [het.task_delay(r, 0, 0, compute_seconds=0.01) for r in range(3)] == pytest.approx([0.03, 0.01, 0.0])
    assert het.task_delay(0, 0, 0) == 0.0  # nothing measured, nothing to scale
    assert het.mean_task_time(0) == pytest.approx(0.004)  # base is a unit's expected real compute


def test_compute_mode_draws_the_same_noise_and_stalls_as_sleep_mode() -> None:
    sleep = Heterogeneity(speeds=[1.0, 4.0], base=0.01, stall_prob=0.2, seed=5)
    compute = dataclasses.replace(sleep, mode="compute")
    for step in range(6):
        for index in range(4):
            # Rank 0 (speed 1, slowdown 4): sleep mode's delay / its mean is the noise in both modes.
            noise = sleep.task_delay(0, step, index) / sleep.mean_task_time(0)
            emulated = 0.02 + compute.task_delay(0, step, index, compute_seconds=0.02)
            assert emulated == pytest.approx(max(0.02, 0.02 * 4.0 * noise))


def test_compute_mode_never_runs_faster_than_the_real_compute() -> None:
    het = Heterogeneity(speeds=[1.0], base=0.01, jitter=1.0, mode="compute")
    values = [het.task_delay(0, 0, i, compute_seconds=0.01) for i in range(200)]
    assert min(values) == 0.0 and all(v >= 0.0 for v in values)  # clipped, never negative


def test_compute_mode_profiles_match_the_delays() -> None:
    het = Heterogeneity(speeds=[1.0, 1.5, 3.0], base=0.002, jitter=0.5, stall_prob=0.03, seed=1, mode="compute")
    count = 8000
    for rank, profile in enumerate(het.profiles()):
        # A unit whose real compute is base takes base + its delay.
        sample = het.base + np.array([het.task_delay(rank, i // 10, i % 10, het.base) for i in range(count)])
        assert abs(sample.mean() - profile.mean) < 5 * profile.std / math.sqrt(count), rank
        assert abs(sample.std() - profile.std) < 0.1 * profile.std, rank
    assert het.profiles()[2].mean > het.base  # the fastest rank: clipped noise has a mean above 1


def test_compute_mode_batch_delay_shares_the_compute_over_the_tasks() -> None:
    het = Heterogeneity(**{**COMPUTE, "stall_prob": 0.2, "seed": 4, "forced_stalls": [(0, 2, 0.5)]})
    for rank, step, count, first in [(0, 2, 5, 0), (1, 3, 4, 2), (2, 1, 3, 0)]:
        expected = sum(het.task_delay(rank, step, first + i, compute_seconds=0.02 / count) for i in range(count))
        assert het.batch_delay(rank, step, count, first, compute_seconds=0.02) == pytest.approx(expected)
    assert het.batch_delay(0, 2, 3, compute_seconds=0.0) == pytest.approx(0.5)  # the forced stall stays
    assert het.batch_delay(0, 2, 0, compute_seconds=1.0) == 0.0


def test_compute_mode_reference_speed_spans_a_speed_change() -> None:
    het = Heterogeneity(
        speeds=[1.0, 2.0], base=0.01, jitter=0.0, change_step=3, change_speeds=[1.0, 1.0], mode="compute"
    )
    assert het.reference_speed == 2.0
    assert het.task_delay(1, 2, 0, compute_seconds=0.01) == 0.0
    assert het.task_delay(1, 3, 0, compute_seconds=0.01) == pytest.approx(0.01)  # rank 1 halved its speed
    assert het.profiles(step=3)[1].mean == pytest.approx(2 * het.profiles()[1].mean) == pytest.approx(0.02)


def test_compute_mode_sleeps_and_serialises() -> None:
    het = Heterogeneity(speeds=[1.0, 2.0], base=0.01, jitter=0.0, mode=EmulationMode.COMPUTE)
    start = time.perf_counter()
    slept = het.sleep_batch(0, 0, 2, compute_seconds=0.02)
    assert slept == pytest.approx(0.02) and time.perf_counter() - start >= 0.99 * slept
    assert het.sleep(1, 0, 0, compute_seconds=0.02) == 0.0
    assert json.loads(het.to_json())["mode"] == "compute"
    assert Heterogeneity.from_json(het.to_json()) == het and Heterogeneity.from_dict(het.to_dict()).mode == "compute"
    assert "mode=compute" in het.describe() and "mode=" not in dataclasses.replace(het, mode="sleep").describe()


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, "1", None])
def test_compute_seconds_is_checked(value: object) -> None:
    het = Heterogeneity(**COMPUTE)
    with pytest.raises(EmulationError, match=r"^compute_seconds:"):
        het.task_delay(0, 0, 0, compute_seconds=value)  # type: ignore[arg-type]
    with pytest.raises(EmulationError, match=r"^compute_seconds:"):
        het.batch_delay(0, 0, 2, compute_seconds=value)  # type: ignore[arg-type]


def test_compute_mode_sleeps_in_the_last_buckets_hook_before_its_all_reduce(tmp_path) -> None:
    """The recipes' DDP delay (EmulatedDelay) and balanced's timed hook sleep once, in the last bucket."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    # A timeout bounds every gloo operation of this in-process group (the default is 30 minutes).
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1, timeout=timeout)
    try:
        _check_last_bucket_sleeps()
    finally:
        # The DDP modules (their reducers hold the group) go before the group does: a reducer left to
        # the garbage collector, freed later in another test, once hung a fresh clone's run.
        gc.collect()
        dist.destroy_process_group()


def _check_last_bucket_sleeps() -> None:
    from types import SimpleNamespace

    import torch
    from torch.nn.parallel import DistributedDataParallel

    from codedgrad.lightning._timed_hook import TimedHookState, timed_coded_hook
    from codedgrad.recipes.emulation import EmulatedDelay
    from codedgrad.runtime import CodedHookState

    het = Heterogeneity(speeds=[1.0, 4.0], base=0.01, jitter=0.0, mode="compute")  # rank 0: 4× its compute
    torch.manual_seed(0)
    ddp = DistributedDataParallel(torch.nn.Linear(64, 64), bucket_cap_mb=0.001)  # several buckets
    single = Heterogeneity(speeds=[1.0], base=0.01, jitter=0.0, mode="compute")
    delay = EmulatedDelay(dataclasses.replace(single, change_step=0, change_speeds=[0.25]))
    trainer = SimpleNamespace(strategy=SimpleNamespace(model=ddp), global_rank=0, global_step=0)
    delay.on_fit_start(trainer, None)  # type: ignore[arg-type]
    batch = (torch.randn(8, 64), torch.randn(8, 64))
    delay.on_train_batch_start(trainer, SimpleNamespace(device=torch.device("cpu")), batch, 0)  # type: ignore[arg-type]
    start = time.perf_counter()
    delay.on_before_backward(trainer, None, None)  # type: ignore[arg-type]  # compute mode: no sleep here
    assert delay.last_sample_seconds == []
    ((ddp(batch[0]) - batch[1]) ** 2).mean().backward()
    elapsed = time.perf_counter() - start
    assert len(delay.last_sample_seconds) == 8 and sum(delay.last_sample_seconds) > 0
    assert elapsed >= sum(delay.last_sample_seconds)  # slept 3× the compute, inside backward()

    calls = []
    other = DistributedDataParallel(torch.nn.Linear(64, 64), bucket_cap_mb=0.001)
    state = TimedHookState(CodedHookState(sample_counts=[1]))
    other.register_comm_hook(state, timed_coded_hook)
    state.before_last = lambda: calls.append(het.sleep(0, 0, 0, compute_seconds=0.001))
    other(batch[0]).sum().backward()
    assert calls == [pytest.approx(0.003)] and state.before_last is None and state.ready_time is not None
    other(batch[0]).sum().backward()
    assert len(calls) == 1  # once per step: the strategy sets it again for the next one
