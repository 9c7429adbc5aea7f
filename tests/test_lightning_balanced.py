"""strategy="balanced": DDP with speed-proportional per-rank batch sizes and exact gradients.

The distributed checks share one torchrun launch (tests/distributed/balanced_worker.py: 3 ranks,
gloo, emulated speeds 1, 2, 4, global batches of 24 with a ragged 6 at each epoch's end; run with
test_lightning_coded.py's in one launch, the session's ``lightning_launch`` in conftest.py); the
pieces below the strategy (counts schedule, shard sampler, step timer, registry, arguments) are
checked without a process group.
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pytorch_lightning.strategies import StrategyRegistry
from torch.utils.data import DataLoader, DistributedSampler

import codedgrad.lightning
from codedgrad.data import GlobalBatchSampler, balanced_counts, shard
from codedgrad.lightning import BalancedStrategy
from codedgrad.lightning._timed_hook import TimedHookState
from codedgrad.lightning.sampling import CountsSchedule, ShardBatchSampler
from codedgrad.lightning.speed import StepTimer
from codedgrad.profile import WorkerProfile
from codedgrad.runtime import CodedHookState

NPROC = 3
FP64_TOLERANCE = 1e-10  # docs/design.md, "The step protocol"
STEPS_PER_EPOCH = 5  # 100 samples, 8 per device, 3 ranks: 24, 24, 24, 24, 6


@pytest.fixture(scope="module")
def results(lightning_launch, rank_results) -> list[dict]:
    return rank_results(lightning_launch / "balanced", NPROC)


# -- distributed ---------------------------------------------------------------------------------


@pytest.mark.distributed
def test_fit_equals_the_single_process_fit_over_the_same_global_batches(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["fit"]["max_abs_diff"] <= FP64_TOLERANCE, f"rank {rank}: {result['fit']['max_abs_diff']}"
    assert all(r["fit"]["parameters"] == results[0]["fit"]["parameters"] for r in results)  # bitwise


@pytest.mark.distributed
def test_counts_follow_speed_and_cover_every_global_batch(results: list[dict]) -> None:
    fit = results[0]["fit"]
    assert all(r["fit"]["counts"] == fit["counts"] for r in results)  # every rank agrees
    sizes = [len(b) for b in fit["reference_batches"]]
    assert [sum(c) for c in fit["counts"]] == sizes  # includes the ragged 6-sample batches
    assert sizes.count(6) == 2
    assert fit["counts"][0] == [8, 8, 8]  # even until measured
    assert fit["state"]["replans"] >= 1
    final = fit["counts"][-2]  # the last full batch
    assert final[0] < final[1] < final[2], f"speeds 1, 2, 4 but counts {final}"
    ragged = fit["counts"][-1]
    assert sum(ragged) == 6 and min(ragged) >= 1


@pytest.mark.distributed
def test_each_rank_loads_only_its_shard(results: list[dict]) -> None:
    fit = results[0]["fit"]
    for rank, result in enumerate(results):
        want = [
            i
            for batch, counts in zip(fit["reference_batches"], fit["counts"], strict=True)
            for i in shard(batch, counts, rank)
        ]
        assert result["fit"]["reads"] == want, f"rank {rank}"


@pytest.mark.distributed
def test_logged_loss_is_the_global_batch_mean(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["fit"]["logged_steps"] == 2 * STEPS_PER_EPOCH
        assert max(result["fit"]["logged_loss_diffs"]) <= FP64_TOLERANCE, f"rank {rank}"
        assert max(result["resume"]["logged_loss_diffs"]) <= FP64_TOLERANCE, f"rank {rank}"


@pytest.mark.distributed
def test_resume_restores_the_profiles_and_stays_exact(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        saved = [[p["shift"], p["mean"], p["std"]] for p in result["fit"]["state"]["profiles"]]
        assert result["resume"]["profiles_at_start"] == saved, f"rank {rank}"
        # The saved profiles decide the counts from the first resumed step on: no return to an even split.
        assert result["resume"]["counts"][0] == balanced_counts(24, [WorkerProfile(*p) for p in saved])
        assert len(result["resume"]["counts"]) == STEPS_PER_EPOCH  # only the third epoch
        assert result["resume"]["max_abs_diff"] <= FP64_TOLERANCE, f"rank {rank}"


@pytest.mark.distributed
def test_resume_from_a_mid_epoch_checkpoint_continues_with_the_next_batch_and_stays_exact(results: list[dict]) -> None:
    """A checkpoint after step 7 (the second epoch's batches 0 and 1 trained): the resumed fit starts
    at batch 2 of that epoch, not at its first batch again, and ends where an unbroken fit does."""
    for rank, result in enumerate(results):
        positions = result["resume_mid"]["positions"]
        assert positions[0] == [1, 2], f"rank {rank}: {positions[:3]}"
        assert result["resume_mid"]["saved_trained"] == [1, 2], f"rank {rank}"
        assert len(positions) == 3 * STEPS_PER_EPOCH - 7, f"rank {rank}"
        assert result["resume_mid"]["max_abs_diff"] <= FP64_TOLERANCE, f"rank {rank}"


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["val_loss", "test_loss"])
def test_validation_and_test_loops_after_fit(results: list[dict], name: str) -> None:
    for rank, result in enumerate(results):
        got, want = result["resume"][name], result["resume"]["eval_reference"][name]
        assert abs(got - want) <= FP64_TOLERANCE, f"rank {rank}: {got} vs {want}"
    assert len({r["resume"][name] for r in results}) == 1


@pytest.mark.distributed
def test_other_precisions(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["32-true"]["max_abs_diff"] <= 1e-5, f"rank {rank}"
        assert result["bf16-mixed"]["finite"]
        assert result["bf16-mixed"]["max_abs_diff"] <= 1e-2  # bf16 autocast against a float32 reference
    for precision in ("32-true", "bf16-mixed"):
        assert all(r[precision]["parameters"] == results[0][precision]["parameters"] for r in results)


@pytest.mark.distributed
def test_unsupported_settings_fail_at_setup_with_a_reason(results: list[dict]) -> None:
    for result in results:
        refused = result["refused"]
        assert refused["accumulation"].startswith("ValueError: accumulate_grad_batches:")
        assert refused["iterable"].startswith("TypeError: strategy='balanced' needs a map-style train dataset")


# -- no process group ----------------------------------------------------------------------------


def test_registered_by_name_on_import() -> None:
    assert StrategyRegistry["balanced"]["strategy"] is BalancedStrategy
    importlib.reload(codedgrad.lightning)  # registering again changes nothing and does not raise
    assert StrategyRegistry["balanced"]["strategy"].__name__ == "BalancedStrategy"
    assert "ddp" in StrategyRegistry and StrategyRegistry["ddp"]["strategy"] is not BalancedStrategy


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"replan_every": -1}, "replan_every"),
        ({"replan_every": 1.5}, "replan_every"),
        ({"replan_threshold": 1.0}, "replan_threshold"),
        ({"gamma": math.inf}, "gamma"),
        ({"profiles": [1.0]}, "profiles[0]"),
        ({"ddp_comm_hook": lambda state, bucket: None}, "ddp_comm_hook"),
        ({"model_averaging_period": 4}, "model_averaging_period"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(field) + ":"):
        BalancedStrategy(**kwargs)


def test_emulation_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODEDGRAD_EMULATE", '{"speeds": [1, 2], "base": 0.001}')
    assert BalancedStrategy()._emulate.speeds == (1.0, 2.0)
    monkeypatch.setenv("CODEDGRAD_EMULATE", '{"speeds": [1, 2]}')
    with pytest.raises(ValueError, match="CODEDGRAD_EMULATE: base: missing"):
        BalancedStrategy()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), b=st.integers(1, 6), w=st.integers(1, 4), drop_last=st.booleans())
def test_even_counts_give_each_rank_its_ddp_batches(n: int, b: int, w: int, drop_last: bool) -> None:
    # With equal profiles, every global batch splits evenly, so rank r's shard is DDP's batch.
    dataset = list(range(n))
    schedule = CountsSchedule(w)
    for rank in range(w):
        sampler = ShardBatchSampler(GlobalBatchSampler(n, b, w, seed=3, drop_last=drop_last), rank, schedule)
        sampler.set_epoch(2)
        ddp = DistributedSampler(dataset, num_replicas=w, rank=rank, seed=3)
        ddp.set_epoch(2)
        want = [batch.tolist() for batch in DataLoader(dataset, batch_size=b, sampler=ddp, drop_last=drop_last)]
        assert list(sampler) == want
        assert len(sampler) == len(want)


def profiles(*means: float) -> list[WorkerProfile]:
    return [WorkerProfile(0.0, m, 0.0) for m in means]


def test_schedule_switches_from_a_position_and_the_sampler_remembers_counts() -> None:
    schedule = CountsSchedule(2)
    sampler = ShardBatchSampler(GlobalBatchSampler(40, 5, 2, shuffle=False), 1, schedule)
    batches = iter(sampler)
    assert next(batches) == [1, 3, 5, 7, 9] and sampler.next_position == (0, 1)
    schedule.switch((0, 2), profiles(0.04, 0.01))  # rank 1 four times as fast, from batch 2 on
    assert next(batches) == [11, 13, 15, 17, 19]  # batch 1: still even
    assert next(batches) == [24, 26, 28, 21, 23, 25, 27, 29]  # batch 2: rank 1 takes 8 of 10
    assert sampler.take() == ((0, 0), [5, 5])
    assert sampler.take() == ((0, 1), [5, 5])
    assert sampler.take() == ((0, 2), [2, 8])
    with pytest.raises(RuntimeError, match="did not yield"):
        sampler.take()
    assert schedule.counts((0, 1), 10) == [5, 5] and schedule.counts((5, 0), 10) == [2, 8]
    assert schedule.latest_counts(20) == [4, 16]
    with pytest.raises(ValueError, match=r"^position:"):
        schedule.switch((0, 1), profiles(1, 1))
    sampler.set_epoch(1)
    next(iter(sampler))  # a new pass forgets what an abandoned pass read ahead
    assert sampler.take()[0] == (1, 0)


def test_step_timer_fits_per_sample_times_without_the_warm_up_step(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = TimedHookState(CodedHookState(coefficient=1.0))
    timer = StepTimer(hook)
    clock = iter([0.0, 1.0, 10.0, 10.4, 20.0, 20.4, 30.0, 30.4])  # start, ready, start, ready, ...
    monkeypatch.setattr("codedgrad.lightning.speed.time.perf_counter", lambda: next(clock))
    for samples in (4, 4, 4, 4):
        timer.start(samples)
        hook.ready_time = next(clock)
    timer.finish()
    assert timer.measurements == 3  # the first (warm-up) step is left out
    profile = timer.profile()
    assert profile is not None and profile.mean == pytest.approx(0.1) and profile.shift == 0.0
    assert StepTimer(hook).profile() is None


def test_a_step_without_a_ready_bucket_is_not_measured() -> None:
    timer = StepTimer(TimedHookState(CodedHookState(coefficient=1.0)))
    timer.start(3)
    timer.start(3)  # the hook never ran (no gradient): nothing recorded
    timer.finish()
    assert timer.measurements == 0


def test_timed_hook_keeps_ddps_annotations() -> None:
    import inspect

    import torch.distributed as dist

    from codedgrad.lightning._timed_hook import timed_coded_hook

    signature = inspect.signature(timed_coded_hook)
    assert signature.parameters["bucket"].annotation is dist.GradBucket
    assert signature.return_annotation == torch.futures.Future[torch.Tensor]
