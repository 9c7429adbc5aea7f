"""The coded all-reduce DDP hook: exact global-batch gradients with unequal per-rank batch sizes.

The distributed checks share one torchrun launch (tests/distributed/ddp_hook_worker.py, 3 ranks,
gloo, batch sizes 2/5/9), including the hook's check that every rank uses the same sample counts;
the argument checks of CodedHookState need no process group.
"""

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from codedgrad.runtime import CodedHookState, coded_allreduce_, coded_allreduce_hook

WORKER = Path(__file__).parent / "distributed" / "ddp_hook_worker.py"
BATCH_SIZES = (2, 5, 9)  # must match the worker
NPROC = len(BATCH_SIZES)
PARAMETERS = 51  # the worker model's parameter count
FP64_TOLERANCE = 1e-10  # docs/design.md#invariants


@pytest.fixture(scope="module")
def results(torchrun, rank_results, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp_hook")
    torchrun(WORKER, NPROC, [str(out_dir)], timeout=180)
    return rank_results(out_dir, NPROC)


# -- distributed ---------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("setup", ["counts", "coefficient"])
def test_coded_hook_gives_the_global_batch_gradient(results: list[dict], setup: str) -> None:
    for rank, result in enumerate(results):
        errors = result[setup]["exact_errors"]
        assert len(errors) >= 3, "several steps are needed to cover DDP's bucket rebuild"
        assert max(errors) <= FP64_TOLERANCE, f"rank {rank} ({setup}): relative gradient errors {errors}"


@pytest.mark.distributed
def test_sample_counts_resolve_to_each_ranks_share(results: list[dict]) -> None:
    total = sum(BATCH_SIZES)
    assert [r["counts_coefficient"] for r in results] == [n / total for n in BATCH_SIZES]


@pytest.mark.distributed
@pytest.mark.parametrize("setup", ["counts", "coefficient"])
def test_hook_sees_every_gradient_across_bucket_rebuilds(results: list[dict], setup: str) -> None:
    for rank, result in enumerate(results):
        steps = result[setup]["bucket_numels"]
        # The hook ran on every step and its buckets covered all parameters exactly once.
        assert all(sum(numels) == PARAMETERS for numels in steps), f"rank {rank}: {steps}"
        # The tiny bucket cap gives several buckets once DDP has rebuilt them after step 0.
        assert len(steps[-1]) > 1, f"rank {rank}: expected several buckets, got {steps}"


@pytest.mark.distributed
def test_plain_ddp_is_wrong_with_unequal_batches(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        plain = result["plain"]
        # Plain DDP averages the ranks' mean-loss gradients: far from the global-batch gradient ...
        assert min(plain["exact_errors"]) > 0.05, f"rank {rank}: {plain['exact_errors']}"
        # ... and exactly the unweighted average, which shows the harness measures what it claims.
        assert max(plain["average_errors"]) <= FP64_TOLERANCE, f"rank {rank}: {plain['average_errors']}"
        assert plain["trajectory_error"] > 1e-3


@pytest.mark.distributed
@pytest.mark.parametrize("setup", ["counts", "coefficient", "plain"])
def test_parameters_stay_bitwise_identical_across_ranks(results: list[dict], setup: str) -> None:
    assert all(r[setup]["identical_across_ranks"] for r in results)
    assert len({r[setup]["parameter_sha256"] for r in results}) == 1


@pytest.mark.distributed
@pytest.mark.parametrize("setup", ["counts", "coefficient"])
def test_sgd_follows_the_single_process_trajectory(results: list[dict], setup: str) -> None:
    for rank, result in enumerate(results):
        assert result[setup]["trajectory_error"] <= FP64_TOLERANCE, f"rank {rank}"


@pytest.mark.distributed
def test_coded_allreduce_function(results: list[dict]) -> None:
    for result in results:
        # Σ_r (r + 1)(r − 1) over r = 0, 1, 2: a negative coefficient is applied as given.
        assert result["allreduce"]["weighted_sum"] == [2.0] * 5
        # Rank 0 holds NaN with coefficient 0: dropped, not propagated.
        assert result["allreduce"]["nan_dropped"] == [1.5] * 5


@pytest.mark.distributed
def test_sample_counts_length_checked_lazily_and_eagerly(results: list[dict]) -> None:
    for result in results:
        for key in ("lazy_error", "eager_error"):
            message = result[key]
            assert message is not None, f"{key}: a 2-entry sample_counts on 3 ranks was accepted"
            assert message.startswith("sample_counts:") and "3 ranks" in message


@pytest.mark.distributed
@pytest.mark.parametrize("setup", ["counts", "coefficient"])
def test_ddp_launches_bucket_zero_first_and_the_last_bucket_last(results: list[dict], setup: str) -> None:
    # The agreement check is launched with bucket 0 and read at the last bucket: both must hold on
    # every rank and every step, before DDP's bucket rebuild (one bucket) and after it (several).
    for rank, result in enumerate(results):
        for step, launches in enumerate(result[setup]["bucket_launches"]):
            assert [index for index, _ in launches] == list(range(len(launches))), (rank, step, launches)
            assert [last for _, last in launches] == [False] * (len(launches) - 1) + [True], (rank, step, launches)


DISAGREEMENTS = {
    "differ": "rank 2 passes other sample counts",
    "mixed": "rank 0 uses an explicit coefficient, the others sample counts",
    "wrong_length": "rank 2's sample counts have 2 entries on 3 ranks",
}


def _common_part(message: str) -> str:
    return message.split("(this rank")[0]


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", sorted(DISAGREEMENTS))
def test_disagreeing_weights_fail_on_every_rank(results: list[dict], scenario: str) -> None:
    errors = [r["agreement"][scenario]["errors"] for r in results]
    for rank, per_step in enumerate(errors):
        assert per_step[0] is not None, f"{DISAGREEMENTS[scenario]}: rank {rank} got no error (a wrong gradient)"
        assert per_step[0].startswith("sample_counts: the ranks' hook weights disagree"), per_step[0]
        assert f"(this rank, {rank}, has " in per_step[0]
    # Every rank raises the same error, naming a rank at each end of the digests.
    assert len({_common_part(per_step[0]) for per_step in errors}) == 1, errors
    assert re.search(r"rank \d has digest [0-9a-f]+, rank \d has digest [0-9a-f]+", errors[0][0])


@pytest.mark.distributed
def test_disagreement_names_the_odd_rank_and_its_counts(results: list[dict]) -> None:
    messages = [r["agreement"]["differ"]["errors"][0] for r in results]
    assert "rank 2 has digest" in messages[0]
    assert messages[2].endswith("(this rank, 2, has sample_counts=[2, 5, 10])")
    assert messages[0].endswith("(this rank, 0, has sample_counts=[2, 5, 9])")


@pytest.mark.distributed
def test_a_change_on_one_rank_fails_every_rank_at_that_step(results: list[dict]) -> None:
    # Ranks 0 and 2 did not change their counts at step 3; they must still fail there.
    for rank, result in enumerate(results):
        scenario = result["agreement"]["one_changes"]
        assert scenario["errors"][:3] == [None, None, None], f"rank {rank}: {scenario['errors']}"
        assert max(scenario["exact_errors"]) <= FP64_TOLERANCE
        assert len(scenario["errors"]) == 4 and scenario["errors"][3] is not None, f"rank {rank}: {scenario['errors']}"
        assert "rank 1 has digest" in scenario["errors"][3]
    assert len({_common_part(r["agreement"]["one_changes"]["errors"][3]) for r in results}) == 1


@pytest.mark.distributed
def test_counts_changed_on_every_rank_stay_exact(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        scenario = result["agreement"]["all_change"]
        assert scenario["errors"] == [None] * 4, f"rank {rank}: {scenario['errors']}"
        assert max(scenario["exact_errors"]) <= FP64_TOLERANCE, f"rank {rank}: {scenario['exact_errors']}"


@pytest.mark.distributed
def test_gradients_ready_in_different_orders_on_different_ranks(results: list[dict]) -> None:
    scenarios = [r["agreement"]["branches"] for r in results]
    # The set-up is real: after the first step the ranks' gradients become ready in different orders ...
    assert scenarios[0]["ready_order"][-1] != scenarios[1]["ready_order"][-1]
    for rank, scenario in enumerate(scenarios):
        # ... yet DDP launches the buckets in index order, so the check is aligned and the gradient exact.
        assert scenario["errors"] == [None] * len(scenario["errors"]) and len(scenario["errors"]) >= 3
        assert max(scenario["exact_errors"]) <= FP64_TOLERANCE, f"rank {rank}: {scenario['exact_errors']}"
        for launches in scenario["bucket_launches"]:
            assert [index for index, _ in launches] == list(range(len(launches)))
        assert len(scenario["bucket_launches"][-1]) > 1, "expected several buckets after the rebuild"


# -- no process group ----------------------------------------------------------------------------


def test_hook_signature_is_accepted_by_ddp() -> None:
    # DDP's register_comm_hook compares these annotations with the real objects (strings fail)
    # and looks the bucket parameter up by name.
    signature = inspect.signature(coded_allreduce_hook)
    assert signature.parameters["bucket"].annotation is dist.GradBucket
    assert signature.return_annotation == torch.futures.Future[torch.Tensor]


def test_explicit_coefficient_needs_no_process_group() -> None:
    state = CodedHookState(coefficient=0.25)
    assert state.coefficient == 0.25 and state.sample_counts is None
    assert CodedHookState(coefficient=-1.5).coefficient == -1.5  # decoding coefficients may be negative
    state.set_coefficient(0)
    assert state.coefficient == 0.0


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="checks the lazy path")
def test_sample_counts_accepted_before_the_process_group_exists() -> None:
    state = CodedHookState(sample_counts=[2, 5, 9])
    assert state.sample_counts == (2.0, 5.0, 9.0)
    assert "sample_counts=[2.0, 5.0, 9.0]" in repr(state)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "coefficient, sample_counts"),
        ({"coefficient": 1.0, "sample_counts": [1, 1]}, "coefficient, sample_counts"),
        ({"coefficient": math.nan}, "coefficient"),
        ({"coefficient": math.inf}, "coefficient"),
        ({"coefficient": True}, "coefficient"),
        ({"coefficient": "0.5"}, "coefficient"),
        ({"sample_counts": []}, "sample_counts"),
        ({"sample_counts": "259"}, "sample_counts"),
        ({"sample_counts": 16}, "sample_counts"),
        ({"sample_counts": [0, 0, 0]}, "sample_counts"),
        ({"sample_counts": [2, -5, 9]}, "sample_counts[1]"),
        ({"sample_counts": [math.nan, 5, 9]}, "sample_counts[0]"),
        ({"sample_counts": [2, 5, math.inf]}, "sample_counts[2]"),
        ({"sample_counts": [2, None, 9]}, "sample_counts[1]"),
    ],
)
def test_invalid_state_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        CodedHookState(**kwargs)


def test_coded_allreduce_rejects_a_non_finite_coefficient_before_communicating() -> None:
    tensor = torch.ones(3)
    with pytest.raises(ValueError, match=r"^coefficient:"):
        coded_allreduce_(tensor, math.nan)
    assert torch.equal(tensor, torch.ones(3))  # untouched
