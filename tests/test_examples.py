"""The README's engine example runs as written (examples/train_digits.py under torchrun, 2 ranks).

The coded engine and torch's DDP train on the same global batches of the real digits data, so
their losses agree to float32 rounding and they reach the same accuracy.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.distributed


def test_train_digits_coded_matches_ddp(tmp_path):
    results = {}
    for engine in ("coded", "ddp"):
        out = tmp_path / f"{engine}.json"
        args = ["--engine", engine, "--epochs", "2", "--json", out]
        run_torchrun(REPO_ROOT / "examples" / "train_digits.py", 2, args, timeout=180)
        results[engine] = json.loads(out.read_text())
    coded, ddp = results["coded"], results["ddp"]
    assert coded["world"] == ddp["world"] == 2
    for a, b in zip(coded["epochs"], ddp["epochs"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"], (coded["epochs"], ddp["epochs"])
    assert abs(coded["val_accuracy"] - ddp["val_accuracy"]) <= 0.01, (coded, ddp)
    assert coded["val_accuracy"] > 0.5  # it learns
