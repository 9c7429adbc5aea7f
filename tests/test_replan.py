"""The re-planning policy on its own: deterministic, no processes, no clocks.

The policy must not let a steady cluster get slower: a first measurement always replaces the
starting guess; later switches need precise fits and a predicted gain over the threshold; a
switch whose measured step time turns out worse is reverted and the plan is held.
"""

from __future__ import annotations

import math

import pytest

from codedgrad.plan import optimal_split
from codedgrad.profile import CostModel, WorkerProfile
from codedgrad.runtime.policy import (
    FEW_SAMPLES_ERROR,
    Measurement,
    ReplanPolicy,
    cost_shape,
    harmonize,
    pool_equal_speeds,
)

GUESS = (WorkerProfile(0.0, 1.0, 1.0),) * 4
TRUE = (
    WorkerProfile(0.0, 0.020, 0.010),
    WorkerProfile(0.0, 0.020, 0.010),
    WorkerProfile(0.0, 0.010, 0.005),
    WorkerProfile(0.0, 0.005, 0.0025),
)


def shared(profiles, step_time=0.1, samples=100, speed_error=None, step_error=None):
    return [Measurement(p, step_time, samples, speed_error=speed_error, step_error=step_error) for p in profiles]


def test_the_first_measurement_replaces_the_guess():
    policy = ReplanPolicy(threshold=0.1)
    action, profiles = policy.decide(GUESS, False, 32, shared(TRUE, samples=8))
    assert action == "switch" and profiles == TRUE


def test_an_even_guess_stays_even_when_measured_differences_are_noise():
    # A homogeneous cluster measured under noise: uneven fits that a split could not gain 10 % from.
    policy = ReplanPolicy(threshold=0.1)
    noisy = tuple(WorkerProfile(0.001 * f, 0.010 * f, 0.002) for f in (1.05, 0.93, 1.0, 1.02))
    action, profiles = policy.decide(GUESS, False, 32, shared(noisy, samples=8))
    assert action == "switch" and len(set(profiles)) == 1  # one pooled profile: an even split
    assert profiles[0].mean == pytest.approx(0.0100) and profiles[0].shift == pytest.approx(0.0010)
    assert profiles[0].std == pytest.approx(0.002)
    # Wider differences measured precisely with a lower threshold pay for an uneven split: ranks 0 and 1
    # apart, ranks 2 and 3 (2 % apart) pooled (a first window is taken to be uncertain by 10 %).
    wider = tuple(WorkerProfile(0.001 * f, 0.010 * f, 0.002) for f in (1.5, 0.6, 1.0, 1.02))
    action, profiles = ReplanPolicy(threshold=0.003).decide(GUESS, False, 32, shared(wider, 8, speed_error=0.001))
    assert action == "switch" and profiles[:2] == wider[:2] and profiles[2] == profiles[3] != wider[2]
    # Measured with 5 % error, the window cannot tell the ranks apart: even, whatever the threshold.
    action, profiles = ReplanPolicy(threshold=0.003).decide(GUESS, False, 32, shared(noisy, 8, speed_error=0.05))
    assert action == "switch" and len(set(profiles)) == 1
    # However precise its own spread, one window's ranks 20 % apart may be its wander (FIRST_WINDOW_ERROR).
    apart = tuple(WorkerProfile(0.0, 0.010 * f, 0.002) for f in (1.0, 1.0, 1.2, 1.2))
    action, profiles = ReplanPolicy(threshold=0.05).decide(GUESS, False, 32, shared(apart, 8, speed_error=0.01))
    assert action == "switch" and len(set(profiles)) == 1


def test_ranks_the_window_cannot_tell_apart_share_a_pooled_profile():
    """Equal ranks measured with noise are pooled; a rank 4x slower stays apart even with 20 % error."""
    fast = [WorkerProfile(0.0, 0.010 * f, 0.002) for f in (1.0, 1.1, 0.95)]
    slow = WorkerProfile(0.0, 0.040, 0.008)
    out = pool_equal_speeds([Measurement(p, 0.1, 50, speed_error=0.2) for p in [*fast, slow]])
    assert out[0] == out[1] == out[2] != out[3] and out[3] == slow
    assert out[0].mean == pytest.approx(0.010 * (1.0 + 1.1 + 0.95) / 3)
    # Precise windows (errors at the 2 % floor): the rank 10 % slower is a group of its own, the two 5 %
    # apart (1.8 combined errors) are pooled.
    out = pool_equal_speeds([Measurement(p, 0.1, 50, speed_error=0.001) for p in [*fast, slow]])
    assert out[0] == out[2] != out[1] and len(set(out)) == 3


def test_a_rank_without_a_fit_keeps_the_plan():
    policy = ReplanPolicy()
    measurements = shared(TRUE)
    measurements[2] = Measurement(None, 0.1, 3)
    assert policy.decide(GUESS, False, 32, measurements) == ("keep", None)


def test_the_same_speeds_measured_again_keep_the_plan():
    policy = ReplanPolicy(threshold=0.1)
    noisy = tuple(WorkerProfile(0.0, p.mean * f, p.std) for p, f in zip(TRUE, (1.04, 0.97, 1.02, 0.99)))
    assert policy.decide(TRUE, True, 32, shared(noisy))[0] == "keep"


def test_few_samples_move_a_measured_plan_only_beyond_their_error():
    """A window of a few task times (30 % error) moves the plan for a fourfold change seen in two windows
    in a row (within twice its error, one window is not enough), not for noise."""
    reversed_speeds = TRUE[::-1]
    few = shared(reversed_speeds, samples=3, speed_error=FEW_SAMPLES_ERROR)
    policy = ReplanPolicy(threshold=0.1)
    assert policy.decide(TRUE, True, 32, few)[0] == "keep"
    assert policy.decide(TRUE, True, 32, few)[0] == "switch"
    wobbly = tuple(WorkerProfile(0.0, p.mean * f, p.std) for p, f in zip(TRUE, (1.3, 0.8, 1.25, 0.8)))
    few = shared(wobbly, samples=3, speed_error=FEW_SAMPLES_ERROR)
    assert ReplanPolicy(threshold=0.1).decide(TRUE, True, 32, few)[0] == "keep"


def test_a_rank_without_task_times_keeps_its_profile_while_the_others_move_the_plan():
    """A rank given no task in the window (or all purged) cannot hold up the others' news: the policy
    plans it with its current profile."""
    drifted = list(shared(TRUE[::-1], speed_error=0.05))
    drifted[3] = Measurement(None, 0.1, 0)
    action, profiles = ReplanPolicy(threshold=0.1).decide(TRUE, True, 32, drifted)
    assert action == "switch" and profiles[3] == TRUE[3] and profiles[0].mean == pytest.approx(TRUE[3].mean)


def test_a_switch_that_made_steps_slower_is_reverted_and_held():
    policy = ReplanPolicy(threshold=0.1, hold_exchanges=2)
    reversed_speeds = TRUE[::-1]
    action, new = policy.decide(TRUE, True, 32, shared(reversed_speeds, step_time=0.100))
    assert action == "switch"
    # The next window under the new plan measured 20 % slower: go back to the plan before.
    action, back = policy.decide(new, True, 32, shared(reversed_speeds, step_time=0.120))
    assert action == "revert" and back == TRUE
    # Held for two exchanges even though the prediction still favours the switch...
    assert policy.decide(TRUE, True, 32, shared(reversed_speeds))[0] == "keep"
    assert policy.decide(TRUE, True, 32, shared(reversed_speeds))[0] == "keep"
    # ...then the switch may be tried again.
    assert policy.decide(TRUE, True, 32, shared(reversed_speeds))[0] == "switch"


def test_a_slower_window_within_the_windows_noise_does_not_revert_a_switch():
    """Windows of a few jittery steps: a slowdown within two combined errors is noise, not the switch."""
    for error, expected in ((0.05, "keep"), (0.01, "revert")):
        policy = ReplanPolicy(threshold=0.1)
        action, new = policy.decide(TRUE, True, 32, shared(TRUE[::-1], step_time=0.100, step_error=error))
        assert action == "switch"
        # 12 % slower: beyond half the threshold; within 2 * sqrt(2) * 5 % = 14 %, not 2.8 %.
        later = shared(TRUE[::-1], step_time=0.112, step_error=error)
        assert policy.decide(new, True, 32, later)[0] == expected, error


def test_a_switch_that_paid_is_kept():
    policy = ReplanPolicy(threshold=0.1)
    action, new = policy.decide(TRUE, True, 32, shared(TRUE[::-1], step_time=0.100))
    assert action == "switch"
    assert policy.decide(new, True, 32, shared(TRUE[::-1], step_time=0.080))[0] == "keep"


def test_every_rank_decides_the_same_from_the_same_bytes():
    payloads = [m.to_json().encode() for m in shared(TRUE)]
    decisions = []
    for _ in range(3):  # three ranks, each parsing the same gathered bytes
        policy = ReplanPolicy()
        decisions.append(policy.decide(GUESS, False, 32, [Measurement.from_json(p) for p in payloads]))
    assert decisions[0] == decisions[1] == decisions[2]


def test_a_slower_window_after_the_speeds_changed_is_not_blamed_on_the_switch():
    """The cluster itself changed (the fits moved): comparing step times across it says nothing."""
    policy = ReplanPolicy(threshold=0.1)
    action, new = policy.decide(TRUE, True, 32, shared(TRUE[::-1], step_time=0.100))
    assert action == "switch"
    slowed = tuple(WorkerProfile(0.0, p.mean * 2, p.std) for p in TRUE[::-1])  # every rank twice as slow
    assert policy.decide(new, True, 32, shared(slowed, step_time=0.200))[0] != "revert"


def test_guided_self_scheduling_chunk_sizes() -> None:
    from codedgrad.runtime.compute import chunk_size

    sizes, left = [], 20
    while left:
        sizes.append(chunk_size(left))
        left -= sizes[-1]
    assert sizes == [10, 5, 3, 1, 1]  # half of what is open, shrinking towards the end
    sizes, left = [], 20
    while left:
        sizes.append(chunk_size(left, min_tasks=4))
        left -= sizes[-1]
    assert sizes == [10, 5, 4, 1]  # never below the cost model's floor, except for what is left
    with pytest.raises(ValueError, match="open_tasks"):
        chunk_size(0)


def test_measurement_carries_the_cost_model_and_old_bytes_still_parse() -> None:
    from codedgrad.profile import CostModel

    m = Measurement(WorkerProfile(0.0, 1.0, 0.5), 2.0, 20, CostModel(0.001, 0.0001, 0.0002))
    assert Measurement.from_json(m.to_json()) == m
    old = '{"profile": null, "step_time": null, "samples": 0}'
    assert Measurement.from_json(old).cost is None


def test_chunked_calls_give_profiles_independent_of_chunk_sizes() -> None:
    """With chunks, a rank's profile is the cost model's per-task part (mean) and its fixed part
    per step (shift): two ranks of one speed, one running large chunks and one small, get the same
    mean, where seconds / tasks would make the large-chunk rank look faster."""
    from codedgrad.runtime.config import EngineConfig
    from codedgrad.runtime.replan import Planner

    fixed, per_task = 0.004, 0.001
    means = []
    for sizes in ((8, 4, 2, 1, 1), (2, 2, 1, 1, 1, 1)):
        planner = Planner(None, EngineConfig(), rank=0, world_size=2)  # type: ignore[arg-type]
        planner.step_ended(None)  # past the warm-up step
        for _ in range(8):
            for n in sizes:
                planner.record_task(n, 3.0 * n, fixed + per_task * n)
            planner.step_ended(0.1)
        profile = planner._measure().profile
        assert profile is not None
        # the calls of an even share under halving chunks: log2(K/P) + 1, here 1 (no plan yet)
        assert profile.shift == pytest.approx(fixed, rel=1e-6)
        means.append(profile.mean)
    assert means == pytest.approx([per_task, per_task], rel=1e-6)
    # One task per call (task_loss): the times as they are, no shift.
    planner = Planner(None, EngineConfig(), rank=0, world_size=2)  # type: ignore[arg-type]
    planner.step_ended(None)
    for _ in range(10):
        planner.record_task(1, 3.0, fixed + per_task)
    profile = planner._measure().profile
    assert profile is not None and profile.shift == 0 and profile.mean == pytest.approx(fixed + per_task)


def test_a_rank_of_one_task_calls_is_split_like_the_chunked_ranks():
    """A slow rank given a task or two runs one-task calls: its per-call time includes the fixed cost
    that chunked ranks spread. harmonize splits it with their fixed share, so ranks compare alike."""
    # Chunked ranks: 1 ms fixed per call, 1 ms per task of 10 samples (a one-task call is half fixed cost).
    chunked = Measurement(WorkerProfile(4.0e-3, 1.0e-3, 0.5e-3), 0.1, 100, CostModel(1.0e-3, 1.0e-4), task_weight=10)
    # A rank 4x slower, measured in whole one-task calls: 8 ms each.
    whole = Measurement(WorkerProfile(0.0, 8.0e-3, 2.0e-3), 0.1, 20, CostModel(0.0, 8.0e-4), True, 10)
    out = harmonize([chunked, chunked, chunked, whole], num_tasks=32)
    for fast in out[:3]:  # re-derived from the shared shape: the same as their own consistent fits
        assert fast.profile.mean == pytest.approx(1.0e-3) and fast.profile.shift == pytest.approx(4.0e-3)
    slow = out[3].profile
    assert slow.mean == pytest.approx(4.0e-3) and slow.std == pytest.approx(2.0e-3)  # 4x the per-task part
    assert slow.shift == pytest.approx(4.0e-3 * (math.log2(8) + 1))  # 4x the fixed part, per even share
    assert not out[3].whole_calls
    # Through the policy: the slow rank is planned 4x slower per task, not 8x.
    action, profiles = ReplanPolicy().decide(GUESS, False, 32, [chunked, chunked, chunked, whole])
    assert action == "switch" and profiles[3].mean == pytest.approx(4 * profiles[0].mean)
    # Without a chunked rank (every rank one task per call) nothing changes, and the flags travel as JSON.
    assert harmonize([whole, whole], 8) == [whole, whole]
    assert Measurement.from_json(whole.to_json()) == whole


def test_a_direct_plan_charges_one_call_of_fixed_cost_and_gives_slow_ranks_their_share():
    """A direct step runs a rank's share as one call; guided self-scheduling as log2(K/P) + 1. Charging
    a direct plan the coded step's calls took tasks from every slow rank (speeds 1, 1, 2, 4 with a
    call's fixed cost at two tasks' worth: the fastest rank got 24 of 32 tasks, the slowest none)."""
    from codedgrad.plan import optimal_split

    def rank(per_task: float) -> Measurement:  # fixed cost 2 tasks' worth, per call
        cost = CostModel(2.0 * per_task, per_task / 10)
        return Measurement(WorkerProfile(0.0, per_task, 0.1 * per_task), 0.1, 64, cost, task_weight=10)

    shared = [rank(4e-3), rank(4e-3), rank(2e-3), rank(1e-3)]
    coded, direct = harmonize(shared, 32), harmonize(shared, 32, direct=True)
    for c, d in zip(coded, direct):
        assert d.profile.mean == pytest.approx(c.profile.mean)
        assert d.profile.shift == pytest.approx(2.0 * d.profile.mean)  # one call
        assert c.profile.shift == pytest.approx(2.0 * c.profile.mean * (math.log2(8) + 1))  # 4 calls
    split = optimal_split([m.profile for m in direct], 32, 1.0, 1.0)
    assert min(split[:2]) >= 2 and split[3] <= 18, split
    assert optimal_split([m.profile for m in coded], 32, 1.0, 1.0)[3] >= 24  # what the coded charge gives


def test_ranks_of_one_speed_look_alike_whatever_their_fits_split():
    """Ranks as fast as each other whose calls had nearly one size: each rank's own split into fixed
    and per-task parts is noise (here 0 and 5 ms fixed), but the time of an even share, where they
    measured, is the same. harmonize plans them alike, so no re-plan chases the noise."""
    weight, share = 32.0, 8  # K = 32 on 4 ranks, 32 samples per task
    even_share = 10.0e-3  # seconds for 8 tasks in one call, on every rank
    fits = [CostModel(0.0, even_share / (share * weight)), CostModel(5.0e-3, 5.0e-3 / (share * weight))]
    shared = [
        Measurement(WorkerProfile(0.0, 1.0e-3, 0.2e-3), 0.02, 64, fits[r % 2], task_weight=weight) for r in range(4)
    ]
    out = harmonize(shared, num_tasks=32)
    assert len({m.profile for m in out}) == 1
    policy = ReplanPolicy()
    assert policy.decide(GUESS, False, 32, shared) == ("switch", tuple(m.profile for m in out))


def test_a_rank_that_slowed_down_is_measured_at_its_new_speed_at_once():
    """The cost model is fitted to the newest 256 calls, which a rank's earlier speed outvotes; the
    typical call's time a measurement publishes follows the window (its calls against the model)."""
    from codedgrad.runtime.config import EngineConfig
    from codedgrad.runtime.replan import Planner

    fixed, per_task = 0.004, 0.001
    planner = Planner(None, EngineConfig(), rank=0, world_size=2)  # type: ignore[arg-type]
    planner.step_ended(None)  # past the warm-up step
    for _ in range(40):  # 200 calls at the old speed
        for n in (8, 4, 2, 1, 1):
            planner.record_task(n, 3.0 * n, fixed + per_task * n)
        planner.step_ended(0.1)
    planner._windows.append([])  # an exchange: a new window
    for _ in range(4):  # 20 calls three times slower
        for n in (8, 4, 2, 1, 1):
            planner.record_task(n, 3.0 * n, 3 * (fixed + per_task * n))
        planner.step_ended(0.3)
    measured = planner._measure()
    assert measured.call_tasks == pytest.approx((64 + 16 + 4 + 1 + 1) / 16)  # the average task's call size
    typical = fixed + per_task * measured.call_tasks
    assert measured.cost.seconds(3.0 * measured.call_tasks) == pytest.approx(typical, rel=0.05)  # the old speed
    assert measured.call_seconds == pytest.approx(3 * typical, rel=0.05)
    # ...and so does its per-task profile: the model's per-task part at the window's level.
    assert measured.profile.mean == pytest.approx(3 * per_task, rel=0.05)
    assert measured.shape_known  # calls of 1 to 8 tasks
    # Calls of one size, and one odd call among them, do not show the shape.
    planner = Planner(None, EngineConfig(), rank=0, world_size=2)  # type: ignore[arg-type]
    planner.step_ended(None)
    for step in range(30):
        for _ in range(8):
            planner.record_task(8, 24.0, fixed + per_task * 8)
        if step == 10:
            planner.record_task(4, 12.0, fixed + per_task * 4)  # e.g. an epoch's smaller last batch
        planner.step_ended(0.1)
    assert not planner._measure().shape_known
    assert Measurement.from_json(measured.to_json()) == measured


def test_speeds_that_wander_between_windows_count_as_noise():
    """Each window alone looks precise (0.1 % errors), but the ranks' speeds move by about 20 % from one
    window to the next: the policy takes that as the windows' noise and keeps an equal cluster even."""
    policy = ReplanPolicy(threshold=0.05)
    first = tuple(WorkerProfile(0.0, 0.010 * f, 0.001) for f in (1.0, 1.2, 0.85, 1.0))
    second = tuple(WorkerProfile(0.0, 0.010 * f, 0.001) for f in (1.2, 0.95, 1.0, 0.8))
    action, profiles = policy.decide(GUESS, False, 32, shared(first, speed_error=0.001))
    assert action == "switch" and len(set(profiles)) > 1  # the first window alone: told apart
    action, profiles = policy.decide(profiles, True, 32, shared(second, speed_error=0.001))
    assert action == "keep" or len(set(profiles)) == 1, (action, profiles)
    # A rank that really slows down (4x) while the others hold still is not noise.
    policy = ReplanPolicy(threshold=0.05)
    steady = tuple(WorkerProfile(0.0, 0.010, 0.001) for _ in range(4))
    policy.decide(GUESS, False, 32, shared(steady, speed_error=0.01))
    slowed = (*steady[:3], WorkerProfile(0.0, 0.040, 0.004))
    action, profiles = policy.decide(steady, True, 32, shared(slowed, speed_error=0.01))
    assert action == "switch" and profiles[3].mean == pytest.approx(0.040) and len(set(profiles[:3])) == 1


def test_redundancy_defaults_to_auto_and_says_what_the_rank_level_codes_need():
    """The engine's default is the planner's choice (as the Lightning strategy's); "uncoded" has nothing
    to choose, and frc/cyclic need an integer s + 1, which the error says."""
    from codedgrad.runtime.config import AUTO, ConfigurationError, EngineConfig

    assert EngineConfig().redundancy == AUTO
    assert EngineConfig(code="uncoded").redundancy == 1.0
    for code in ("frc", "cyclic"):
        with pytest.raises(ConfigurationError, match=r"^redundancy: .*integer s \+ 1.*redundancy=2"):
            EngineConfig(code=code)
        assert EngineConfig(code=code, redundancy=2).redundancy == 2.0


def test_a_rank_planned_with_no_task_is_pooled_now_and_then_to_be_measured_again():
    """A direct plan has no spare work, so a rank given no task is never measured. Its error doubles
    with every exchange without task times, until it is pooled with the faster ranks and gets tasks."""
    policy = ReplanPolicy(threshold=0.1)
    fast = WorkerProfile(0.0, 0.010, 0.001)
    current = (fast, fast, fast, WorkerProfile(0.0, 0.040, 0.004))  # [11, 11, 10, 0] of 32 tasks
    window = [*shared((fast,) * 3, speed_error=0.01), Measurement(None, 0.1, 0)]
    outcomes = [policy.decide(current, True, 32, window) for _ in range(3)]
    assert outcomes[0] == ("keep", None)
    switched = [profiles for action, profiles in outcomes if action == "switch"]
    assert switched and len(set(switched[0])) == 1  # pooled: every rank gets tasks again


def test_a_guess_waits_for_task_times_but_not_for_ever():
    """A rank the guess gives one task per step may never gather 8 task times in the windows a fit may
    use: after MAX_WINDOWS exchanges of waiting the guess is replaced with what there is."""
    from codedgrad.runtime.policy import MAX_WINDOWS

    policy = ReplanPolicy(threshold=0.1)
    window = [*shared(TRUE[:3], samples=20, speed_error=0.02), Measurement(TRUE[3], 0.1, 3, speed_error=0.3)]
    for _ in range(MAX_WINDOWS):
        assert policy.decide(GUESS, False, 32, window) == ("keep", None)
    action, profiles = policy.decide(GUESS, False, 32, window)
    assert action == "switch" and profiles[0] == TRUE[0] and profiles[3].mean < profiles[0].mean
    # A rank with no task time at all is planned like the others, then measured under the new plan.
    policy = ReplanPolicy(threshold=0.1)
    window[3] = Measurement(None, 0.1, 0)
    for _ in range(MAX_WINDOWS):
        assert policy.decide(GUESS, False, 32, window)[0] == "keep"
    action, profiles = policy.decide(GUESS, False, 32, window)
    assert action == "switch" and profiles[3] is not None


def test_a_change_within_twice_the_error_must_show_in_two_windows_in_a_row():
    """On shared cores the scheduler slows one rank or another by up to 2x for a window: a change less
    than twice beyond the error moves the plan only when the same rank shows it again, the same way."""
    policy = ReplanPolicy(threshold=0.05)
    even = (WorkerProfile(0.0, 0.010, 0.001),) * 4
    policy.decide(GUESS, False, 32, shared(even, speed_error=0.01))

    def window(slow_rank: int) -> list[Measurement]:
        return shared(
            [WorkerProfile(0.0, 0.016 if r == slow_rank else 0.010, 0.001) for r in range(4)], speed_error=0.1
        )  # 1.6x: beyond two combined errors of 10 %, within four

    assert policy.decide(even, True, 32, window(3)) == ("keep", None)  # rank 3 slower for one window
    assert policy.decide(even, True, 32, window(1)) == ("keep", None)  # then rank 1: wander
    action, profiles = policy.decide(even, True, 32, window(1))  # rank 1 again: a change
    assert action == "switch" and profiles[1].mean == pytest.approx(0.016) and len(set(profiles)) == 2


def test_evidence_accumulates_so_that_ranks_one_window_cannot_tell_apart_are_told_apart_later():
    """hetero4 under a direct plan: a window is 3-4 calls per rank (20 % error), and the speed-4 and
    speed-2 ranks measure only 1.6x apart (per-task overhead): the first window rightly pools them.
    The windows after it say the same, and together they are precise enough to tell them apart."""
    measured = tuple(WorkerProfile(0.0, m, 0.1 * m) for m in (0.010, 0.016, 0.032, 0.032))
    policy = ReplanPolicy(threshold=0.1)
    action, first = policy.decide(GUESS, False, 32, shared(measured, speed_error=0.2))
    assert action == "switch" and first[0] == first[1] != first[2]  # one window: pooled
    current, splits = first, []
    for _ in range(4):
        action, profiles = policy.decide(current, True, 32, shared(measured, speed_error=0.2))
        current = profiles if profiles is not None else current
        splits.append(tuple(optimal_split(list(current), 32, 1.0)))
    assert current[0].mean < current[1].mean < current[2].mean  # told apart: the fastest rank leads
    assert splits[-1][0] > splits[-1][1] > splits[-1][2]
    assert all(split == splits[-1] for split in splits[-2:])  # and then held


def test_a_homogeneous_cluster_whose_windows_wander_stays_even():
    """Equal ranks whose windows wander by ±12 % in turn: the estimates converge on one speed, and the
    plan stays even for many exchanges (no wander is mistaken for a change as the errors shrink)."""
    policy = ReplanPolicy(threshold=0.1)
    even = (WorkerProfile(0.0, 0.010, 0.001),) * 4
    policy.decide(GUESS, False, 32, shared(even, speed_error=0.1))
    factors = (1.12, 0.9, 1.0, 0.95)
    for exchange in range(30):
        turn = factors[exchange % 4 :] + factors[: exchange % 4]
        window = [WorkerProfile(0.0, 0.010 * f, 0.001) for f in turn]
        assert policy.decide(even, True, 32, shared(window, speed_error=0.1)) == ("keep", None), exchange


def test_ranks_are_compared_in_the_time_of_a_share_not_in_their_per_task_mean():
    """A window fits another cost shape (more of a call fixed, a lower per-task mean) at the same speed:
    no rank changed, so the plan stays, and a rank that did change is told apart in the new shape."""
    policy = ReplanPolicy(threshold=0.05)
    even = (WorkerProfile(0.0, 0.010, 0.001),) * 4
    policy.decide(GUESS, False, 32, shared(even, speed_error=0.01))
    reshaped = WorkerProfile(0.032, 0.006, 0.001)  # 0.032 + 8 x 0.006 = 8 x 0.010: the same share time
    assert policy.decide(even, True, 32, shared((reshaped,) * 4, speed_error=0.01)) == ("keep", None)
    slowed = WorkerProfile(0.128, 0.024, 0.004)  # four times slower, in the new shape
    action, profiles = policy.decide(even, True, 32, shared((reshaped,) * 3 + (slowed,), speed_error=0.01))
    assert action == "switch" and profiles[3] == slowed
    assert profiles[0].shift == pytest.approx(0.032) and profiles[0].mean == pytest.approx(0.006)  # one shape


def test_ranks_are_read_at_their_own_call_size_with_a_shape_remembered_from_spread_calls():
    """Under a direct plan every rank runs calls of one size, whose fit reads no fixed cost; a rank given
    one task per call is then mostly fixed cost and looked twice as slow as an equal rank running eight.
    The shape (γ) comes from calls of spread sizes and is kept while the windows cannot show it."""
    per_task, gamma = 1.0e-3, 1.5  # true cost of a call of n tasks: per_task · (γ + n)

    def rank(n: float, known: bool) -> Measurement:
        cost = CostModel(gamma * per_task, per_task / 10) if known else CostModel(0.0, per_task * (gamma + n) / n / 10)
        seconds = per_task * (gamma + n)
        profile = WorkerProfile(0.0, seconds / n, 0.1 * seconds / n)
        return Measurement(
            profile, 0.1, 64, cost, task_weight=10, call_tasks=n, call_seconds=seconds, shape_known=known
        )

    spread = [rank(8, True), rank(1, True), rank(8, True), rank(8, True)]
    assert cost_shape(spread) == pytest.approx(gamma)
    one_size = [rank(8, False), rank(1, False), rank(8, False), rank(8, False)]
    assert cost_shape(one_size) is None and cost_shape(one_size, previous=gamma) == gamma
    for window in (spread, one_size):
        out = harmonize(window, 32, direct=True, gamma=gamma)
        assert [m.profile.mean for m in out] == pytest.approx([per_task] * 4)  # equal ranks read equal
    # What a one-size fit alone reads (γ = 0): the rank of one-task calls 2.2x slower per task.
    alone = harmonize(one_size, 32, direct=True, gamma=0.0)
    assert alone[1].profile.mean / alone[0].profile.mean == pytest.approx(2.5 / (9.5 / 8))
    # Through the policy: a window of spread calls, then one of one-size calls; the plan stays even.
    policy = ReplanPolicy(threshold=0.05, direct=True)
    action, profiles = policy.decide(GUESS, False, 32, spread)
    assert action == "switch" and len(set(profiles)) == 1
    assert policy.decide(profiles, True, 32, one_size) == ("keep", None)
    # The shape survives a checkpoint: a restored run under a direct plan could not learn it again.
    restored = ReplanPolicy(threshold=0.05, direct=True)
    restored.load_state_dict(policy.state_dict())
    assert restored.decide(profiles, True, 32, one_size) == ("keep", None)
    assert ReplanPolicy(threshold=0.05, direct=True).decide(profiles, True, 32, one_size)[0] == "switch"
