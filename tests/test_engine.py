"""CodedDataParallel under torchrun with gloo: exactness, straggler tolerance, failures, Store hygiene.

Two launches (≈ 10–30 s each) check everything; see tests/distributed/engine_worker.py.
"""

from __future__ import annotations

import os

import pytest
from conftest import DISTRIBUTED_DIR, load_rank_results, run_torchrun

WORLD = 4
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def exact(tmp_path_factory):
    out = tmp_path_factory.mktemp("exact")
    run_torchrun(DISTRIBUTED_DIR / "engine_worker.py", WORLD, ["exact", out], timeout=240)
    results = load_rank_results(out, WORLD)
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
    return results


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    out = tmp_path_factory.mktemp("failures")
    run_torchrun(DISTRIBUTED_DIR / "engine_worker.py", 3, ["failures", out], timeout=120)
    results = load_rank_results(out, 3)
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
    return results


CODES_FP64 = [
    "repetition_1.25_sync",
    "frc_2_sync",
    "stall_sync",
    "repetition_1",
    "repetition_1.25",
    "repetition_2",
    "frc_2",
    "cyclic_2",
    "stall",
    "slow_repetition",
    "slow_cyclic",
]


@pytest.mark.parametrize("name", ["direct", "direct_sync"])
def test_a_plan_with_nothing_to_decide_runs_direct_and_exact(exact, name):
    """Ω = 1 and no spare work: once task times are measured every step runs direct,
    with task_loss and batch_loss, exact; a new K starts from a guess (coded steps, the release thread
    taking over after the direct steps it skipped) and turns direct again once measured. Direct steps
    do not pile up Store keys; a plan restored from a checkpoint runs its first step coded."""
    for rank, result in enumerate(exact):
        runs = result[name]
        for part in ("first", "batched", "other_k", "restored"):
            run = runs[part]
            assert run["max_error"] <= 1e-12 and run["identical"], (rank, part, run["max_error"])
            assert run["unused_grad_none"], (rank, part)
        # Coded until measured (8 task times per rank), then direct but for the first step under each
        # new plan (a re-plan may switch at any exchange); the same steps on every rank.
        for part in ("first", "batched", "other_k", "restored"):
            assert runs[part]["direct"] == exact[0][name][part]["direct"], (rank, part, runs[part]["direct"])
        for part in ("first", "other_k"):
            flags = runs[part]["direct"]
            assert flags[0] is False and any(flags[-4:]), (rank, part, flags)
        assert any(runs["batched"]["direct"]), (rank, runs["batched"]["direct"])
        counts = runs["key_counts"]  # over 24 steps, 12 exchanges: bounded, not growing with them
        assert max(counts) - min(counts) <= 2 * (WORLD + 1), (rank, counts)
        restored = runs["restored"]["direct"]
        assert restored[0] is False and any(restored), (rank, restored)
        # "direct" has four buckets: the three after the first go to the all-reduce during the backward
        # of a call that uses every parameter (an even task uses the branch); "direct_sync" has one.
        for part in ("first", "batched", "other_k", "restored"):
            run = runs[part]
            assert run["hooks_left"] == 0, (rank, part, run["hooks_left"])
            overlapped = [n for n, direct in zip(run["buckets_overlapped"], run["direct"]) if direct]
            assert set(overlapped) <= ({0, 3} if name == "direct" else {0}), (rank, part, overlapped)
        if name == "direct":
            assert 3 in runs["batched"]["buckets_overlapped"] + runs["other_k"]["buckets_overlapped"], rank


@pytest.mark.parametrize("name", CODES_FP64)
def test_float64_gradient_equals_single_process(exact, name):
    for rank, result in enumerate(exact):
        run = result[name]
        assert run["max_error"] <= 1e-10, f"rank {rank}: {name} relative error {run['max_error']:.3g}"
        assert run["identical"], f"rank {rank}: {name} gradients differ across ranks"
        assert run["unused_grad_none"], f"{name}: a parameter no task used got a gradient"


def test_float32_and_bfloat16(exact):
    for result in exact:
        assert result["repetition_1.25_float32"]["max_error"] <= 1e-5
        assert result["repetition_1.25_float32"]["identical"]
        # bf16 rounds the forward pass itself (8 bits of mantissa): the reference is bf16 too, and the
        # coded sum is accumulated in float32, so only the per-task rounding differs.
        assert result["repetition_1.25_bfloat16"]["max_error"] <= 1e-2
        assert result["repetition_1.25_bfloat16"]["identical"]


def test_every_task_used_exactly_once(exact):
    """For task-level repetition the used results of all ranks add up to K on every step."""
    for name, tasks in [
        ("repetition_1", 12),
        ("repetition_1.25", 12),
        ("repetition_2", 12),
        ("repetition_1.25_sync", 12),
        ("stall", 16),
        ("stall_sync", 16),
    ]:
        per_step = [sum(r[name]["used"][s] for r in exact) for s in range(len(exact[0][name]["used"]))]
        assert per_step == [tasks] * len(per_step), f"{name}: used per step {per_step}"


def test_stalled_rank_is_not_waited_for(exact):
    """Rank 1 stalls 2 s on its first task of step 1: the others cover the rest of its queue.

    The stalled rank computes at most the task it was stuck in, and the others decide the step
    without it, so nobody waits for it beyond that in-flight task.
    """
    for name in ("stall", "stall_sync"):
        stalled = exact[1][name]
        assert stalled["computed"][1] <= 1, stalled  # 0 if it started the step after the others decided it
        for rank in (0, 2, 3):  # the others decided the step long before the 2 s stall ended
            assert exact[rank][name]["time_to_decision"][1] < 1.0, exact[rank][name]
    # With the no-wait release they do not even wait for the stalled task: step 1 ends long before it.
    for rank in (0, 2, 3):
        assert exact[rank]["stall"]["step_time"][1] < 1.0, exact[rank]["stall"]


def test_a_stall_is_covered_once_task_times_are_measured(exact):
    """Rank 1 stalls 2 s at step 7, after the plan's task times were measured: the others no longer
    help at once, but do once it is late beyond its noise, so nobody waits for the stall."""
    for name in ("stall_timed", "stall_timed_sync"):
        assert all(r[name]["measured"] for r in exact), name
        assert exact[1][name]["computed"][7] <= 1, exact[1][name]
        for rank in (0, 2, 3):
            assert exact[rank][name]["time_to_decision"][7] < 1.0, exact[rank][name]
        assert sum(exact[rank][name]["spare"][7] for rank in (0, 2, 3)) > 0, name  # they did cover it


def test_auto_redundant_work_is_off_where_ranks_share_cores(exact):
    """spare_work="auto" and redundancy="auto": off (Ω = 1) when the ranks' threads outnumber the cores
    (this test's 4 ranks with one thread each on a machine of fewer than 4 cores), on otherwise, and on
    with sleep emulation (a sleep takes nothing from the others); every rank resolves the same."""
    shared = 4 > len(os.sched_getaffinity(0))  # OMP_NUM_THREADS=1: one thread per rank
    for result in exact:
        for name in ("none", "compute", "sleep"):
            entry = result[f"spare_auto_{name}"]
            assert entry["spare_work"] is (name == "sleep" or not shared), (name, entry)
            assert entry["redundancy"] == ("auto" if name == "sleep" or not shared else 1.0), (name, entry)
            assert bool(entry["shared"]) is shared, (name, entry)
        if shared:
            assert "run 4 threads on" in result["spare_auto_none"]["shared"][0]
    assert len({tuple(r["spare_auto_none"]["shared"]) for r in exact}) == 1


def test_slow_rank_does_less(exact):
    slow = exact[WORLD - 1]["slow_repetition"]
    fast = exact[0]["slow_repetition"]
    assert sum(slow["used"]) < sum(fast["used"])


def test_sgd_parameters_identical_and_exact(exact):
    for result in exact:
        assert result["sgd"]["identical"]
        assert result["sgd"]["error"] <= 1e-10


def test_store_keys_bounded(exact):
    for result in exact:
        counts = result["store_keys"]
        assert counts["199"] == counts["9"], counts  # a leak of one key per step would add 190


def test_bad_configuration_fails_on_every_rank(failures):
    for rank, result in enumerate(failures):
        assert result["bad_redundancy"]["type"] == "ConfigurationError"
        assert "rank 1: redundancy" in result["bad_redundancy"]["message"]
        assert result["mismatch"]["type"] == "ConfigurationError"
        assert "disagree on redundancy" in result["mismatch"]["message"]
        assert result["world_size"]["type"] == "ConfigurationError"
        assert "emulate.speeds" in result["world_size"]["message"]
        assert result["too_few_tasks"]["type"] == "ConfigurationError"
        assert "num_tasks" in result["too_few_tasks"]["message"]
        assert result["different_tasks"]["type"] == "ConfigurationError"
        assert "disagree on num_tasks" in result["different_tasks"]["message"]
        assert result["group_ok"], f"rank {rank}: the process group was left unusable"
        # After the error, the same engine agrees afresh (not on the failed attempt's keys) and is exact.
        assert result["retry_after_error"]["max_error"] <= 1e-10, result["retry_after_error"]
        assert result["retry_after_error"]["identical"]


def test_silent_rank_times_out_with_its_name(failures):
    for rank in (0, 1):
        for case, wait in (("timeout_arrival", "to reach the coded all-reduce"), ("timeout_decision", "to be decided")):
            outcome = failures[rank][case]
            assert outcome["type"] == "CodedStepTimeout", (case, outcome)
            assert wait in outcome["message"] and "ranks [2]" in outcome["message"], (case, outcome["message"])
            assert outcome["seconds"] < 5.9, (case, outcome)  # the 2 s timeout, not the end of the 6 s hang
    # The silent rank itself fails too when it comes back, instead of entering a collective alone.
    assert failures[2]["timeout_arrival"]["type"] == "CodedStepTimeout"
    assert "but it was abandoned by rank" in failures[2]["timeout_arrival"]["message"]
    assert failures[2]["timeout_decision"]["type"] == "CodedStepTimeout"


def test_replanning_follows_measured_speeds(exact):
    """Homogeneous start, re-plan from measured task times, all ranks switching at the same step."""
    versions = [r["replan"]["versions"] for r in exact]
    assert all(v == versions[0] for v in versions), versions  # same plan on the same step everywhere
    assert versions[0][0] == 0 and versions[0][-1] >= 2, versions[0]  # warm-up re-plan, then the change
    for result in exact:
        assert result["replan"]["max_error"] <= 1e-10
        assert result["replan"]["new_k_error"] <= 1e-10
        # Spare work judges task times against the clock only while they are measured for this K.
        assert result["replan"]["measured_before_k_change"] and not result["replan"]["measured_after_k_change"]
    # Before the change speeds are 1, 1, 2, 4: measured means fall and primaries rise with rank. This
    # is the first measured plan, from the warm-up's window, where ranks measured less than ~28 %
    # apart are pooled (policy.FIRST_WINDOW_ERROR) until the next exchange tells them apart: with
    # jitter 0.3, a speed-1 rank's window at -13 % and a speed-2 rank's at +23 % (seen) share one
    # profile, in about one run in seven. So a slower rank may tie with a faster one, never pass it.
    mid = exact[0]["replan"]["means_mid"]
    assert mid[3] < mid[2] <= min(mid[0], mid[1]), mid
    primaries_mid = [r["replan"]["primaries_mid"] for r in exact]
    assert primaries_mid[3] > primaries_mid[2] >= max(primaries_mid[0], primaries_mid[1]), primaries_mid
    assert sum(primaries_mid[2:]) > sum(primaries_mid[:2]), primaries_mid  # the measured speeds, not even
    # After the change (4, 2, 1, 1) the order flips. Neighbours may again share a profile: per-task
    # overhead that does not scale with speed puts the speed-4 and speed-2 ranks' means only ~1.6x
    # apart, which a window that wanders by up to MAX_WINDOW_NOISE rightly pools. The windows after it
    # accumulate (SpeedEstimate) and tell them apart (12 of 12 engines; before, [6, 6, 2, 2] stayed in
    # about one suite run in ten), but the check allows the tie the policy may still hold.
    end = exact[0]["replan"]["means_end"]
    assert end[0] <= end[1] <= min(end[2], end[3]) and end[0] < min(end[2], end[3]), end
    primaries_end = [r["replan"]["primaries_end"] for r in exact]
    assert primaries_end[0] >= primaries_end[1] >= max(primaries_end[2], primaries_end[3]), primaries_end
    assert primaries_end[0] > max(primaries_end[2], primaries_end[3]), primaries_end
    assert sum(primaries_end[:2]) > sum(primaries_end[2:]), primaries_end


def test_an_exception_in_one_rank_fails_that_step_everywhere_and_training_goes_on(failures):
    """Rank 1's task_loss raises at step 1 before the step can be decided: every rank fails step 1,
    steps 2 and 3 succeed, and the gradients stay identical across ranks."""
    for rank, result in enumerate(failures):
        for name in ("task_error", "task_error_sync"):
            outcomes = result[name]["outcomes"]
            assert outcomes[0] == outcomes[2] == outcomes[3] == "ok", (name, rank, outcomes)
            expected = "ValueError" if rank == 1 else "CodedStepTimeout"
            assert outcomes[1] == expected, (name, rank, outcomes)
            assert all(result[name]["identical"]), (name, rank, result[name])
            assert result[name]["step"] == 4, (name, rank, result[name])
            # The failed step's keys went with the next successful step's clean-up.
            assert result[name]["new_keys"] == 0, (name, rank, result[name])


def test_a_direct_step_fails_everywhere_on_one_ranks_error_or_other_weights(failures):
    """A plan with nothing to decide runs direct (the all-reduce is the agreement): rank 1's task error
    fails that step on every rank at once, naming rank 1; rank 0's other task weights are refused on
    every rank; the steps after either are exact and identical everywhere."""
    for rank, result in enumerate(failures):
        run = result["direct_task_error"]
        assert run["warm_direct"], (rank, run)
        outcomes = run["outcomes"]
        assert outcomes[0] == outcomes[2] == outcomes[3] == "ok", (rank, outcomes)
        assert outcomes[1] == ("ValueError" if rank == 1 else "CodedStepTimeout"), (rank, outcomes)
        assert all(run["identical"]) and run["step"] == 14, (rank, run)
        mismatch = result["direct_mismatch"]
        assert mismatch["type"] == "StepMismatchError", (rank, mismatch)
        assert ("ranks [0]" if rank != 0 else "ranks [1, 2]") in mismatch["message"], mismatch
        after = mismatch["after"]
        assert after["direct"] == [True, True] and after["max_error"] <= 1e-12 and after["identical"], after


def test_a_backward_error_after_buckets_went_to_the_all_reduce_fails_the_step_everywhere(failures):
    """Rank 1's backward raises after its last layers' buckets were launched from the backward's hooks:
    its remaining buckets still go out (with a failed status), so every rank fails the step at once
    instead of hanging; the hooks are gone, and the next steps are direct, overlapped and exact."""
    for rank, result in enumerate(failures):
        run = result["direct_backward_error"]
        assert run["warm_direct"], (rank, run)
        assert run["outcomes"] == ["ok", "ValueError" if rank == 1 else "CodedStepTimeout", "ok", "ok"], (rank, run)
        assert all(run["identical"]) and run["hooks_left"] == 0, (rank, run)
        assert run["buckets_overlapped"][2:] == [3, 3], (rank, run)
        after = run["after"]
        assert after["direct"] == [True, True] and after["max_error"] <= 1e-12 and after["identical"], after
        assert after["buckets_overlapped"] == [3, 3] and after["hooks_left"] == 0, after


def test_an_exception_after_the_decision_completes_the_step_on_every_rank(failures):
    """The same error after the others had decided and reduced step 1 without rank 1's task: every
    rank goes on with the exact step, and rank 1 reports the error instead of raising it alone."""
    for rank, result in enumerate(failures):
        late = result["late_task_error"]
        assert late["outcomes"] == ["ok"] * 4, (rank, late)
        assert all(late["identical"]) and late["step"] == 4 and late["new_keys"] == 0, (rank, late)
        assert late["buffer"] == [0.0] * 3, late  # rank 0's buffer, broadcast after every step
        error, warned = late["late_errors"][1]
        if rank == 1:
            assert error == "ValueError: a bad batch", late
            assert len(warned) == 1 and "a bad batch" in warned[0] and "step 1" in warned[0], warned
        else:
            assert error is None and warned == [], late
        for step in (0, 2, 3):
            assert late["late_errors"][step] == [None, []], (rank, step, late)
