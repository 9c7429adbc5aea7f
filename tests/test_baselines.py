"""The baselines DynamicPulling (exact) and DropSlowest (backup workers, inexact).

One torchrun launch (tests/distributed/baselines_worker.py, 3 ranks, gloo, fp64, emulated speeds
1, 2, 4 in sleep mode) checks both against single-process gradients, the dropping of a stalled
rank, parameters across ranks, bad arguments and failures; the helpers that need no process group
are checked here directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from codedgrad.baselines import default_chunk
from codedgrad.baselines._common import task_weights, uniform_shares

WORKER = Path(__file__).parent / "distributed" / "baselines_worker.py"
NPROC = 3
NUM_TASKS = 9  # must match the worker
STALL = 1.0  # rank 1's forced stall in DropSlowest's step 2 (must match the worker)
CHECKED = (0, 1, 5, 6)  # DropSlowest steps with exact_check=True (must match the worker)
FP64_TOLERANCE = 1e-10  # docs/design.md#invariants


@pytest.fixture(scope="module")
def results(torchrun, rank_results, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("baselines")
    torchrun(WORKER, NPROC, [str(out_dir)], timeout=180)
    loaded = rank_results(out_dir, NPROC)
    for rank, result in enumerate(loaded):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
    return loaded


# -- DynamicPulling ------------------------------------------------------------------------------


@pytest.mark.distributed
def test_pulling_gives_the_global_batch_gradient(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        errors = result["pulling"]["errors"]
        assert len(errors) == 4
        assert max(errors) <= FP64_TOLERANCE, f"rank {rank}: relative errors {errors}"


@pytest.mark.distributed
def test_pulling_computes_every_task_exactly_once(results: list[dict]) -> None:
    steps = len(results[0]["pulling"]["computed"])
    for step in range(steps):
        pulled = [task for result in results for task in result["pulling"]["computed"][step]]
        assert sorted(pulled) == list(range(NUM_TASKS)), f"step {step}: {pulled}"
        owners = [result["pulling"]["owners"][step] for result in results]
        assert all(o == owners[0] for o in owners), f"step {step}: ranks report different owners {owners}"
        for rank, result in enumerate(results):
            assert [j for j, r in enumerate(owners[0]) if r == rank] == sorted(result["pulling"]["computed"][step])
            # One pull per chunk of 1 task, plus the one that found the counter past K.
            assert result["pulling"]["pulls"][step] == len(result["pulling"]["computed"][step]) + 1
    assert results[0]["pulling"]["chunk"] == 1


@pytest.mark.distributed
def test_pulling_follows_the_ranks_speeds(results: list[dict]) -> None:
    # Speeds 1, 2, 4: once every rank is running (step 0 is skewed by start-up), the fastest rank pulls more.
    done = [sum(len(c) for c in result["pulling"]["computed"][1:]) for result in results]
    assert done[2] > done[0], f"tasks computed per rank over steps 1-3: {done}"


# -- DropSlowest ---------------------------------------------------------------------------------


@pytest.mark.distributed
def test_drop_slowest_drops_exactly_the_backups(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for step, entry in enumerate(result["drop"]["steps"]):
            assert len(entry["contributors"]) == NPROC - 1, f"rank {rank}, step {step}: {entry}"
            assert sorted(entry["contributors"] + entry["dropped"]) == list(range(NPROC))
            assert entry["loss_finite"]
    for step in range(len(results[0]["drop"]["steps"])):
        seen = {tuple(result["drop"]["steps"][step]["contributors"]) for result in results}
        assert len(seen) == 1, f"step {step}: ranks disagree on the contributors {seen}"


@pytest.mark.distributed
def test_drop_slowest_does_not_wait_for_a_stalled_rank(results: list[dict]) -> None:
    stalled = results[1]["drop"]["steps"]
    for step in (2, 3, 4):  # the stall step, and the steps the others run while rank 1 still sleeps
        assert 1 not in stalled[step]["contributors"], f"step {step}: {stalled[step]}"
        assert all(1 in result["drop"]["steps"][step]["dropped"] for result in results)
    assert stalled[2]["computed"] == [3, 4, 5]  # it began step 2 and finished its batch late ...
    assert stalled[3]["ahead"] and stalled[3]["computed"] == []  # ... then applied step 3 without computing it
    for rank in (0, 2):  # waiting for rank 1 would take at least STALL; the steps take tens of ms
        steps = results[rank]["drop"]["steps"]
        assert steps[2]["wall"] < STALL / 3, f"rank {rank}: step 2 took {steps[2]['wall']:.3f} s"
        waited = sum(steps[step]["wall"] for step in (2, 3, 4))
        assert waited < 0.8 * STALL, f"rank {rank} spent {waited:.3f} s in steps 2-4 (rank 1 stalled {STALL} s)"


@pytest.mark.distributed
def test_drop_slowest_gradient_is_exact_over_what_it_used(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for step, entry in enumerate(result["drop"]["steps"]):
            assert entry["error_used"] <= FP64_TOLERANCE, f"rank {rank}, step {step}: {entry}"
            used = [j for r in entry["contributors"] for j in range(3 * r, 3 * r + 3)]
            assert entry["tasks_used"] == used
            # ... and not the global batch's gradient: the check below can fail.
            assert entry["error_full_here"] > 1e-3


@pytest.mark.distributed
def test_drop_slowest_reports_the_relative_error_against_the_exact_gradient(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        for step, entry in enumerate(result["drop"]["steps"]):
            if step not in CHECKED:
                assert entry["relative_error"] is None
                continue
            expected = entry["error_full_here"]
            assert entry["relative_error"] == pytest.approx(expected, rel=1e-8), f"rank {rank}, step {step}"


@pytest.mark.distributed
@pytest.mark.parametrize("part", ["pulling", "drop"])
def test_parameters_stay_identical_on_every_rank(results: list[dict], part: str) -> None:
    hashes = [result[part]["hashes"] for result in results]
    assert len(hashes[0]) >= 4
    assert all(h == hashes[0] for h in hashes), f"{part}: parameters differ across ranks"
    assert len(set(hashes[0])) == len(hashes[0])  # and they did move at every step


# -- bad arguments and failures ------------------------------------------------------------------


@pytest.mark.distributed
def test_bad_arguments_fail_on_every_rank(results: list[dict]) -> None:
    for result in results:
        failures = result["failures"]
        assert "ConfigurationError" in failures["backups_too_many"] and "backups" in failures["backups_too_many"]
        # Only rank 1 passed chunk=0: every rank fails, naming rank 1.
        assert "rank 1: chunk: must be an integer >= 1" in failures["chunk_on_one_rank"], failures
        assert "the emulation describes 2 ranks but the job has 3" in failures["world_mismatch"]
        assert "ValueError: tasks: 2 tasks for 3 ranks" in failures["pulling_too_few_tasks"]
        assert "ValueError: tasks[2]" in failures["pulling_bad_weight"]
        assert "rank 1's share (tasks 3..4) has weight 0" in failures["drop_empty_share"]


@pytest.mark.distributed
def test_a_failing_loss_fails_the_step_on_every_rank(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        failures = result["failures"]
        for key in ("pulling_loss_raises", "drop_loss_raises"):
            assert failures[key].startswith("BaselineStepError"), f"rank {rank}: {failures[key]}"
            assert "rank 2: RuntimeError: no such sample" in failures[key]
        assert "ranks passed different tasks" in failures["pulling_other_tasks"], failures["pulling_other_tasks"]
        # ... and the ranks stay in step: the next step succeeds.
        assert failures["pulling_after_failure"] <= FP64_TOLERANCE
        assert failures["drop_after_failure"] == NPROC - 1


@pytest.mark.distributed
def test_no_store_key_is_left_after_close(results: list[dict]) -> None:
    assert all(result["failures"]["keys_left"] == [] for result in results)


# -- helpers (no process group) ------------------------------------------------------------------


def test_task_weights_and_shares() -> None:
    assert task_weights(4, 2) == (1.0, 1.0, 1.0, 1.0)
    assert task_weights([2, 0, 3], 3) == (2.0, 0.0, 3.0)
    with pytest.raises(ValueError, match="3 tasks for 4 ranks"):
        task_weights(3, 4)
    with pytest.raises(ValueError, match="sum to 0"):
        task_weights([0, 0], 2)
    with pytest.raises(ValueError, match=r"tasks\[1\]"):
        task_weights([1, float("nan")], 2)
    with pytest.raises(TypeError):
        task_weights(True, 1)
    assert [list(s) for s in uniform_shares(7, 3)] == [[0, 1, 2], [3, 4], [5, 6]]
    assert default_chunk(64, 4) == 4 and default_chunk(3, 4) == 1
