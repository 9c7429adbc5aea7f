"""strategy="coded": an unchanged LightningModule trained with coded steps and exact gradients.

The distributed checks share one torchrun launch (tests/distributed/coded_lightning_worker.py: 3
ranks, gloo, ``64-true``, emulated speeds 1, 2, 4 with a 1.5 s stall of rank 1 at step 2, global
batches of 24 with a ragged 6 at each epoch's end, gradient clipping and a per-step LR scheduler;
in one launch with test_lightning_balanced.py's, the session's ``lightning_launch`` in conftest.py)
and one plain ``python`` run through Lightning's own launcher (2 ranks). The arguments and the
registry are checked without a process group.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from pytorch_lightning.strategies import StrategyRegistry

import codedgrad.lightning
from codedgrad.lightning import CodedStrategy
from codedgrad.lightning.coded import _aggregate
from tests.conftest import REPO_ROOT, load_rank_results

WORKER = Path(__file__).parent / "distributed" / "coded_lightning_worker.py"
NPROC = 3
FP64_TOLERANCE = 1e-10  # docs/design.md, "Invariants"
STEPS_PER_EPOCH = 5  # 100 samples, 8 per device, 3 ranks: 24, 24, 24, 24, 6
SAMPLES_PER_EPOCH = 102  # DistributedSampler pads 100 to a multiple of 3


@pytest.fixture(scope="module")
def results(lightning_launch, rank_results) -> list[dict]:
    return rank_results(lightning_launch / "coded", NPROC)


def finite_pairs(logged: list[float], reference: list[float]) -> list[tuple[float, float]]:
    assert len(logged) == len(reference)
    return [(a, b) for a, b in zip(logged, reference) if not math.isnan(a)]


# -- distributed ---------------------------------------------------------------------------------


@pytest.mark.distributed
def test_fit_equals_the_single_process_fit_over_the_same_global_batches(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["fit"]["max_abs_diff"] <= FP64_TOLERANCE, f"rank {rank}: {result['fit']['max_abs_diff']}"
    assert all(r["fit"]["parameters"] == results[0]["fit"]["parameters"] for r in results)  # bitwise
    reports = results[0]["fit"]["reports"]
    assert [r["samples"] for r in reports] == [24, 24, 24, 24, 6] * 2  # the ragged last batch of each epoch
    assert [r["step"] for r in reports] == list(range(2 * STEPS_PER_EPOCH))


@pytest.mark.distributed
def test_logged_loss_and_hooks_see_the_global_batch(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        fit = result["fit"]
        pairs = finite_pairs(fit["logged"], fit["reference_losses"])
        assert len(pairs) >= len(fit["reference_losses"]) - 1, f"rank {rank}: {fit['logged']}"
        assert max(abs(a - b) for a, b in pairs) <= FP64_TOLERANCE, f"rank {rank}"
        decoded = [r["loss"] for r in fit["reports"]]
        for got, want in zip(decoded, fit["reference_losses"], strict=True):
            assert abs(got - want) <= FP64_TOLERANCE, f"rank {rank}: decoded loss {got} vs {want}"
        assert [r["output_loss"] for r in fit["reports"]] == decoded  # training_step's returned loss
        assert fit["before_backward"] == decoded  # on_before_backward gets the decoded loss
        assert len(fit["grad_norms"]) == len(decoded) and min(fit["grad_norms"]) > 0  # on_after_backward
        # A metric other than the loss, logged with sync_dist=True: decoded with the gradient, so every
        # rank logs the global batch's value at every step (ranks with nothing computed included).
        assert len(fit["logged_mae"]) == len(fit["reference_maes"])
        for got, want in zip(fit["logged_mae"], fit["reference_maes"]):
            assert abs(got - want) <= FP64_TOLERANCE, f"rank {rank}: logged train_mae {got} vs {want}"
        resumed = finite_pairs(result["resume"]["logged"], result["resume"]["reference_losses"])
        assert max(abs(a - b) for a, b in resumed) <= FP64_TOLERANCE, f"rank {rank}"


@pytest.mark.distributed
def test_a_stalled_rank_does_not_hold_the_others_at_the_next_step_start(results: list[dict]) -> None:
    # Rank 1 stalls 1.5 s in step 2; the others finish step 2 without it and start step 3 at once (with
    # Lightning's per-step broadcast they would wait at step 3's start until rank 1 got there).
    stalled = results[1]["fit"]["reports"][2]
    stalled_end = stalled["end"]
    assert stalled_end - stalled["start"] >= 1.4, stalled  # the premise: rank 1 did stall in step 2
    for rank in (0, 2):
        start = results[rank]["fit"]["reports"][3]["start"]
        # With a barrier, start >= stalled_end; half a second of margin keeps a loaded machine from flaking.
        assert start < stalled_end - 0.5, f"rank {rank} started step 3 at {start}, rank 1 ended step 2 at {stalled_end}"
    assert results[1]["fit"]["reports"][2]["used"] == 0  # its stalled work was not needed


@pytest.mark.distributed
def test_each_rank_loads_only_its_tasks(results: list[dict]) -> None:
    total = 2 * SAMPLES_PER_EPOCH
    reads = [r["fit"]["reads"] for r in results]
    for rank, result in enumerate(results):
        assert Counter(reads[rank]) == Counter({int(k): v for k, v in result["fit"]["loaded"].items()})
        assert len(reads[rank]) < 0.8 * total, f"rank {rank} read {len(reads[rank])} of {total} samples"
    assert sum(len(r) for r in reads) >= total  # every sample of every global batch was read somewhere
    assert sum(len(r) for r in reads) < 2 * total  # far from every rank reading the whole batch (3×)


@pytest.mark.distributed
def test_resume_from_a_checkpoint_restores_the_engine_and_stays_exact(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        resume = result["resume"]
        assert result["checkpoint"]["step"] == STEPS_PER_EPOCH  # the engine's state is in the checkpoint
        assert resume["engine_at_start"]["step"] == STEPS_PER_EPOCH  # ... and restored before the first step
        assert [r["step"] for r in resume["reports"]] == list(range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH))
        assert resume["reports"][0]["plan_version"] == result["checkpoint"]["version"]
        assert resume["max_abs_diff"] <= FP64_TOLERANCE, f"rank {rank}: {resume['max_abs_diff']}"
        # Ends where the uninterrupted run does (up to rounding: other ranks' results may decide a step).
        assert max(abs(a - b) for a, b in zip(resume["parameters"], result["fit"]["parameters"])) <= FP64_TOLERANCE
    assert all(r["resume"]["parameters"] == results[0]["resume"]["parameters"] for r in results)  # bitwise


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["val_loss", "test_loss"])
def test_validation_and_test_loops(results: list[dict], name: str) -> None:
    for rank, result in enumerate(results):
        got, want = result["eval"][name], result["eval"][f"{name}_reference"]
        assert abs(got - want) <= FP64_TOLERANCE, f"rank {rank}: {got} vs {want}"


@pytest.mark.distributed
def test_other_precisions(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["32-true"]["max_abs_diff"] <= 1e-5, f"rank {rank}"
        assert result["bf16-mixed"]["finite"]
        assert result["bf16-mixed"]["max_abs_diff"] <= 1e-2  # bf16 autocast against a float32 reference
    for precision in ("32-true", "bf16-mixed"):
        assert all(r[precision]["parameters"] == results[0][precision]["parameters"] for r in results)


@pytest.mark.distributed
def test_direct_steps_reduce_buckets_during_the_backward_and_stay_exact(results: list[dict]) -> None:
    """Ω = 1, no spare work, buckets of one or two parameters: once measured the steps run direct, the
    two buckets after the first go to the all-reduce during the backward (on a rank that computes
    something: a plan may give a rank measured as slow no task), and 4 epochs end at the
    single-process parameters."""
    overlapped = set()
    for rank, result in enumerate(results):
        run = result["direct_overlapped"]
        assert run["max_abs_diff"] <= FP64_TOLERANCE, (rank, run["max_abs_diff"])
        direct = [r["buckets_overlapped"] for r in run["reports"] if r["direct"]]
        assert direct and set(direct) <= {0, 2}, (
            rank,
            [(r["direct"], r["buckets_overlapped"]) for r in run["reports"]],
        )
        overlapped |= set(direct)
    assert 2 in overlapped
    assert all(r["direct_overlapped"]["parameters"] == results[0]["direct_overlapped"]["parameters"] for r in results)


@pytest.mark.distributed
def test_bad_settings_fail_at_setup_with_one_message_on_every_rank(results: list[dict]) -> None:
    for result in results:
        refused = result["refused"]
        assert refused == results[0]["refused"]  # the same message on every rank
        assert refused["code"].startswith("ConfigurationError: code: must be one of repetition")
        assert refused["redundancy"] == "ConfigurationError: redundancy: must be >= 1, got 0.5"
        assert refused["accumulation"].startswith("ValueError: accumulate_grad_batches:")
        assert refused["iterable"].startswith("TypeError: strategy='coded' needs a map-style train dataset")


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(results: list[dict]) -> None:
    # Rank 1 gets SIGTERM after step 3 (global_step 3); it proposes step 3 + max_steps_ahead (1) + 2.
    for rank, result in enumerate(results):
        assert result["sigterm"] == {"stopped": True, "global_step": 6, "stop_step": 6}, f"rank {rank}"


@pytest.mark.distributed
def test_plain_python_with_lightnings_launcher(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("CODEDGRAD_EMULATE", None)
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), "--launcher"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = load_rank_results(tmp_path, 2)
    for rank, result in enumerate(results):
        assert result["world_size"] == 2
        assert result["max_abs_diff"] <= FP64_TOLERANCE, f"rank {rank}"
        pairs = finite_pairs(result["logged"], result["reference_losses"])
        assert max(abs(a - b) for a, b in pairs) <= FP64_TOLERANCE
    assert results[0]["parameters"] == results[1]["parameters"]


# -- no process group ----------------------------------------------------------------------------


def test_registered_by_name_on_import() -> None:
    assert StrategyRegistry["coded"]["strategy"] is CodedStrategy
    importlib.reload(codedgrad.lightning)  # registering again changes nothing and does not raise
    assert StrategyRegistry["coded"]["strategy"].__name__ == "CodedStrategy"
    assert StrategyRegistry["balanced"]["strategy"].__name__ == "BalancedStrategy"
    assert StrategyRegistry["ddp"]["strategy"].__name__ == "DDPStrategy"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"code": "nope"}, "code"),
        ({"redundancy": 0.5}, "redundancy"),
        ({"redundancy": 1.5, "code": "cyclic"}, "redundancy"),
        ({"gamma": -1.0}, "gamma"),
        ({"timeout": 0}, "timeout"),
        ({"num_tasks": 0}, "num_tasks"),
        ({"num_tasks": 2.5}, "num_tasks"),
        ({"max_steps_ahead": -1}, "max_steps_ahead"),
        ({"bucket_cap_mb": 0}, "bucket_cap_mb"),
        ({"find_unused_parameters": True}, "find_unused_parameters"),
        ({"ddp_comm_hook": lambda state, bucket: None}, "ddp_comm_hook"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match="^" + field + ":"):
        CodedStrategy(**kwargs)


def test_defaults_and_emulation_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CODEDGRAD_EMULATE", raising=False)
    strategy = CodedStrategy()
    assert strategy.engine is None and strategy.last_report is None and strategy.split is None
    assert strategy._config.redundancy == "auto" and strategy._config.emulate is None  # Ω from measured profiles
    monkeypatch.setenv("CODEDGRAD_EMULATE", '{"speeds": [1, 2], "base": 0.001}')
    assert CodedStrategy()._config.emulate.speeds == (1.0, 2.0)
    monkeypatch.setenv("CODEDGRAD_EMULATE", '{"speeds": [1, 2]}')
    with pytest.raises(ValueError, match="CODEDGRAD_EMULATE: base: missing"):
        CodedStrategy()


def test_values_that_are_not_decoded_are_aggregated_per_rank() -> None:
    import torch

    values = [(torch.tensor(1.0), 3.0), (torch.tensor(4.0), 1.0)]
    mean, weight = _aggregate(values, "mean")
    assert float(mean) == pytest.approx(1.75) and weight == 4.0
    assert float(_aggregate(values, "sum")[0]) == 5.0
    assert float(_aggregate(values, torch.max)[0]) == 4.0
    assert float(_aggregate(values, "min")[0]) == 1.0
