"""The soak (recipes/soak.py, docs/soak.md): one short launch of 3 ranks, and the judge on made-up logs.

The launch soaks 80 steps (about 4 s) with faults frequent enough that several steps of each kind
fail, and checks every few steps; the run itself exits non-zero on any wrong result, so the assertions here
read its report back and check that each kind of event really happened and was counted.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO_ROOT, run_torchrun

from codedgrad.recipes.soak import (
    CheckSettings,
    FaultSettings,
    Outcome,
    SoakConfig,
    StepLog,
    injected_fault,
    judge_window,
    parse_duration,
    store_key_bound,
)

WORLD = 3
SHORT_SOAK = [
    "max_steps=80",  # about 4 s here; the duration is only a cap on a loaded machine
    "duration=60",
    "emulate.speeds=[1,2,4]",
    "emulate.change_speeds=[4,2,1]",
    "emulate.base=0.01",
    "emulate.stall_prob=0.02",
    "emulate.stall_factor=20",
    "emulate.change_step=30",
    "drift.every=20",
    "faults.exception_prob=0.02",
    "faults.nonfinite_prob=0.02",
    "checks.check_every=4",
    "checks.verify_every=3",
    "checks.sample_every=0.5",
    "checks.warmup=1.5",
    "checks.hang_seconds=30",
    "engine.timeout=10",
]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("soak")
    run_torchrun(REPO_ROOT / "recipes" / "soak.py", WORLD, [*SHORT_SOAK, f"hydra.run.dir={out}"], timeout=240)
    return json.loads((out / "soak.json").read_text())


@pytest.mark.distributed
def test_a_short_soak_recovers_every_injected_fault_and_stays_exact_and_bounded(report):
    assert report["verdict"] == "PASS", report["verdict"]
    assert report["hangs"] == 0 and report["wrong"] == 0 and report["lost_steps"] == 0, report["problems"]
    assert report["failed_other"] == 0
    failed = report["failed_and_recovered"]
    assert failed["exception"] >= 1 and failed["nonfinite"] >= 1, failed  # both kinds happened
    assert report["steps"] == report["steps_ok"] + sum(failed.values()) == 80, report["steps"]
    assert report["steps_ok"] >= 5
    assert report["checksums"]["compared"] >= 5 and report["checksums"]["mismatches"] == 0
    verified = report["verified"]
    assert verified["steps"] >= 2 and verified["max_rel_error"] <= 1e-10, verified
    keys = report["store_keys"]
    assert keys["max"] <= keys["bound"], keys
    assert keys["after_close"] == keys["before_engine"] + keys["torch_group_keys"], keys  # the engine left none
    for rank in report["ranks"]:
        resources = rank["resources"]
        assert resources["samples_after_warmup"] >= 2, resources
        for kind in ("threads", "os_threads"):
            assert resources[kind]["min_after_warmup"] == resources[kind]["max_after_warmup"], resources
    assert len(report["samples"]) == WORLD and all(len(s) >= 3 for s in report["samples"])


def _log(step: int, outcome: Outcome = Outcome.OK, injected=(), late=False, loss="0x1.0p+0") -> StepLog:
    return StepLog(step, outcome.value, [k.value for k in injected], late, loss if outcome is Outcome.OK else "")


def test_the_judge_passes_explained_failures_and_names_every_wrong_result():
    fine = [
        [_log(10), _log(11, Outcome.EXCEPTION), _log(12, Outcome.NONFINITE), _log(13)],
        [_log(10), _log(11, Outcome.EXCEPTION, [Outcome.EXCEPTION]), _log(12, Outcome.NONFINITE, [Outcome.NONFINITE]),
         _log(13, injected=[Outcome.EXCEPTION], late=True)],
    ]  # fmt: skip
    verdict = judge_window(fine, ["d", "d"], 10)
    assert not verdict.problems and verdict.steps == 4 and verdict.ok == 2 and verdict.late_errors == 1
    assert verdict.failed == {"exception": 1, "nonfinite": 1, "other": 0}

    wrong = [
        [_log(10), _log(11, Outcome.EXCEPTION), _log(12, Outcome.OTHER), _log(13, loss="0x1.0p+1"), _log(14)],
        [_log(10, Outcome.EXCEPTION, [Outcome.EXCEPTION]), _log(11, Outcome.EXCEPTION), _log(12, Outcome.OTHER),
         _log(13), _log(14, injected=[Outcome.EXCEPTION])],
    ]  # fmt: skip
    verdict = judge_window(wrong, ["d", "e"], 10)
    text = "\n".join(verdict.problems)
    assert verdict.checksum_mismatches == 1 and "parameters differ" in text
    assert "step 10: ranks disagree" in text
    assert "step 11: failed on every rank as 'exception' with no such fault injected" in text
    assert "step 12: failed on every rank as 'other'" in text
    assert "step 13: ranks decoded different losses" in text
    assert "step 14: rank 1's task raised, yet the step completed without a late error" in text
    assert verdict.lost_steps == 2 and len(verdict.problems) == 6

    missing = judge_window([[_log(10), _log(11)], [_log(10), _log(12)]], ["d", "d"], 10)
    assert missing.lost_steps == 1 and "a step lost" in missing.problems[0]


def test_faults_are_a_pure_function_with_the_configured_rates():
    faults = FaultSettings(exception_prob=0.1, nonfinite_prob=0.05)
    calls = [(step, rank, task) for step in range(100) for rank in range(4) for task in range(8)]
    draws = [injected_fault(0, step, rank, task, faults) for step, rank, task in calls]
    assert draws == [injected_fault(0, step, rank, task, faults) for step, rank, task in calls]  # replayable
    assert math.isclose(draws.count(Outcome.EXCEPTION) / len(draws), 0.1, abs_tol=0.02)
    assert math.isclose(draws.count(Outcome.NONFINITE) / len(draws), 0.05, abs_tol=0.015)
    assert store_key_bound(10, 4, 4, 0) == 10 + 7 * 6 + 3 * 5 + 2


def test_settings_fail_early_naming_the_field():
    assert parse_duration("30m") == 1800 and parse_duration("90s") == 90 and parse_duration(2.5) == 2.5
    assert parse_duration("1.5h") == 5400
    for bad in ("soon", "-3", 0, True):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match=r"checks\.check_every"):
        CheckSettings(check_every=0)
    with pytest.raises(ValueError, match="faults: exception_prob"):
        FaultSettings(exception_prob=0.7, nonfinite_prob=0.5)
    with pytest.raises(ValueError, match="nonsense: unknown setting"):
        SoakConfig.from_dict({"nonsense": 1})
    with pytest.raises(ValueError, match=r"checks: .*unexpected keyword"):
        SoakConfig.from_dict({"checks": {"every": 3}})
    assert SoakConfig.from_dict({"duration": "2m"}).duration == 120
