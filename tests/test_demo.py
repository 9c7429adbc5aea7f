"""``recipes/demo.py`` (``make demo``): the launch, the summary read back from a run directory, the
table, ``demo.json`` and ``accuracy.png``, and how a failed run is reported.

The full demo (three 4-rank launches) takes minutes, too long for a test. One test runs the script
end to end with a single short launch (``--strategies ddp``, 2 ranks, 6 steps, two validations:
about 15-40 s on 2 shared cores); the failure path replaces the launch with a stub, so it starts
no processes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO_ROOT

DEMO = REPO_ROOT / "recipes" / "demo.py"
# 6 steps, validation after steps 3 and 6 on 2 batches: two points on the accuracy curve.
TINY = ["trainer.max_steps=6", "trainer.val_check_interval=3", "+trainer.limit_val_batches=2"]


def _demo() -> ModuleType:
    """``recipes/demo.py`` as a module (``recipes`` is not a package)."""
    spec = importlib.util.spec_from_file_location("codedgrad_demo", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.distributed
def test_demo_end_to_end_with_one_short_launch(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    command = [sys.executable, str(DEMO), "--out", str(out), "--strategies", "ddp", "--nproc", "2", "--epochs", "1"]
    result = subprocess.run([*command, "--", *TINY], cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    log = out / "ddp" / "launch.log"
    assert result.returncode == 0, (
        result.stdout[-3000:] + result.stderr[-3000:] + (log.read_text() if log.exists() else "")
    )
    assert "EMULATED" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("| ddp")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].endswith(" ms") and float(cells[1][:-3]) > 0  # median step time
    assert cells[2].endswith("×") and float(cells[2][:-1]) > 0  # step / ideal bound
    assert 0 <= float(cells[3]) <= 1  # final val acc
    assert cells[4].endswith(" s") and float(cells[4][:-2]) > 0  # training wall time

    report = json.loads((out / "demo.json").read_text())
    assert report["emulated"] is True and report["nproc"] == 2 and report["cluster"] == "hetero4_stalls"
    (run,) = report["runs"]
    assert run["ok"] and run["returncode"] == 0 and run["steps"] == 6
    for key in ("median_step_time", "median_bound_ratio", "median_bound", "train_seconds", "launch_seconds"):
        assert isinstance(run[key], float) and run[key] > 0, key
    assert 0 <= run["final_val_acc"] <= 1
    assert [point[1] for point in run["accuracy_curve"]] == [2, 5]  # global step of each validation
    assert run["accuracy_curve"][-1][0] == pytest.approx(run["train_seconds"])
    assert run["accuracy_curve"][-1][2] == pytest.approx(run["final_val_acc"])
    assert report["speedups"] == {}  # no coded run
    assert _is_png(out / "accuracy.png")
    assert any((out / "ddp" / "tb").glob("events.out.tfevents.*"))


def test_a_failed_run_is_reported_and_the_exit_status_is_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = _demo()
    launched: list[list[str]] = []

    def fake_launch(command: list[str], run_dir: Path, timeout: float) -> tuple[int, float]:
        launched.append(command)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "launch.log").write_text("starting\nTraceback (most recent call last):\nValueError: boom\n")
        return 1, 0.5

    monkeypatch.setattr(demo, "launch", fake_launch)
    out = tmp_path / "demo"
    status = demo.main(["--out", str(out), "--strategies", "ddp,coded", "--epochs", "2", "--", "seed=3"])
    assert status == 1
    printed = capsys.readouterr().out
    assert "FAILED (exit 1)" in printed and "ValueError: boom" in printed and "coded FAILED" in printed
    assert [c[6] for c in launched] == [str(demo.TRAIN)] * 2  # after python -m torch.distributed.run …
    assert all("trainer.max_epochs=2" in c and c[-2] == "seed=3" for c in launched)  # user overrides last
    assert launched[0][-1] == f"hydra.run.dir={out.resolve() / 'ddp'}"
    report = json.loads((out / "demo.json").read_text())  # strict JSON: NaN written as null
    assert [r["ok"] for r in report["runs"]] == [False, False]
    assert report["runs"][1]["median_step_time"] is None and "boom" in report["runs"][1]["error"]
    assert _is_png(out / "accuracy.png")


def test_summary_table_and_speedups() -> None:
    demo = _demo()
    runs = [
        demo.RunResult("ddp", "d", 0, 30.0, 0.2, 2.0, 0.1, 0.96, 20.0, 66.0),
        demo.RunResult("balanced", "b", 0, 25.0, 0.15, 1.5, 0.1, 0.96, 15.0, 66.0),
        demo.RunResult("coded", "c", 0, 24.0, 0.1, 1.0, 0.1, 0.96, 10.0, 66.0),
    ]
    ups = demo.speedups(runs)
    assert ups["coded vs ddp"] == {"step_time": pytest.approx(2.0), "wall_time": pytest.approx(2.0)}
    assert ups["coded vs balanced"] == {"step_time": pytest.approx(1.5), "wall_time": pytest.approx(1.5)}
    text = demo.table(runs)
    assert "| coded    |" in text and "100.0 ms" in text and "1.00×" in text and "10.0 s" in text
    assert "speed-up coded vs ddp: 2.00× median step time, 2.00× wall time" in text
    assert demo._finite({"a": [math.nan, 1.0]}) == {"a": [None, 1.0]}
