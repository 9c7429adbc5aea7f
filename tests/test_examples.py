"""The README's engine example runs as written (examples/train_digits.py under torchrun, 2 ranks).

The coded engine and torch's DDP train on the same global batches of the real digits data, so
their losses agree to float32 rounding and they reach the same accuracy. The two launches run at
once (what is compared does not depend on time, and half of each launch is start-up).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO_ROOT, run_torchrun

pytestmark = pytest.mark.distributed

ENGINES = ("coded", "ddp")


def test_train_digits_coded_matches_ddp(tmp_path):
    def train(engine: str) -> dict:
        out = tmp_path / f"{engine}.json"
        args = ["--engine", engine, "--epochs", "2", "--json", out]
        run_torchrun(REPO_ROOT / "examples" / "train_digits.py", 2, args, timeout=180)
        return json.loads(out.read_text())

    with ThreadPoolExecutor(max_workers=len(ENGINES)) as pool:
        results = dict(zip(ENGINES, pool.map(train, ENGINES)))
    coded, ddp = results["coded"], results["ddp"]
    assert coded["world"] == ddp["world"] == 2
    for a, b in zip(coded["epochs"], ddp["epochs"]):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"], (coded["epochs"], ddp["epochs"])
    assert abs(coded["val_accuracy"] - ddp["val_accuracy"]) <= 0.01, (coded, ddp)
    assert coded["val_accuracy"] > 0.5  # it learns
