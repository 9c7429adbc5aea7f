"""``benchmarks/bench_scale.py`` end to end: one small launch, its JSON and table (no performance claim).

The sweep itself (4 to 32 ranks) takes minutes and is run by hand (docs/scale.md). Here one launch
of two torchrun agents with one rank each (``--two-nodes 2``: the c10d rendezvous path of the
multi-node run, the cheapest launch that has it) runs the capacity and coordination phases for two
short steps, and the fields the projection reads must be there and sane.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BENCH = REPO_ROOT / "benchmarks" / "bench_scale.py"


@pytest.mark.distributed
def test_bench_scale_writes_its_measurements(tmp_path: Path) -> None:
    command = [
        sys.executable, str(BENCH), "--ranks", "", "--two-nodes", "2", "--phases", "capacity,coord",
        "--capacity-seconds", "0.05", "--steps", "2", "--warmup", "0", "--base", "0.02",
        "--no-lock", "--no-plot", "--launch-timeout", "100", "--out", str(tmp_path),
    ]  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"bench_scale.py did not finish in 120 s:\n{stdout[-3000:]}{stderr[-3000:]}")
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]

    (row,) = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert (row["world_size"], row["nodes"], row["tasks"]) == (2, 2, 16)
    coord = row["coord"]
    assert coord["commits"] > 0 and coord["steps"] == 2
    assert coord["round_trips_per_commit"] >= 1.0
    assert coord["retries_per_commit"] == pytest.approx(coord["round_trips_per_commit"] - 1)
    assert 0 < coord["commit_median_ms"] <= coord["commit_p90_ms"] <= coord["commit_p99_ms"]
    assert coord["store_ops"] >= coord["commits"]  # every commit is at least one compare_set
    assert coord["store_ops_per_second"] > 0 and coord["commits_per_second"] > 0
    assert 0 < coord["commit_share"] < 1 and 0 < coord["commit_share_of_busy"] < 1
    assert coord["ideal_s"] > 0 and coord["ratio_to_ideal"] > 0.5
    assert 0 <= coord["cpu"]["idle_mean"] <= 1 and coord["cpu"]["ranks_cores"] > 0
    levels = row["capacity"]["levels"]
    assert [level["clients"] for level in levels] == [1, 2]
    assert all(level["ops_per_second"] > 0 for level in levels)
    assert "| 2 | 2 |" in (tmp_path / "table.md").read_text()
