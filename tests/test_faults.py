"""Faults: a rank killed (SIGKILL) at chosen points, and an exact resume under torchrun's restarts.

Two launches (docs/reliability.md has the fault model):

* **Kill points** (tests/distributed/fault_worker.py): three 3-rank jobs at once, started without
  torchrun so that no agent tears the survivors down, on one c10d ``TCPStore`` hosted here (as
  torchrun's agent hosts it) that all three share. In each job one rank kills itself at engine A's
  step 3: inside a task (rank 0: the Store is not on it), right after a used commit and before its
  accumulation (rank 2), inside the release's coded all-reduce (rank 1). Every survivor must exit
  non-zero within the engine's timeout plus a margin, with an error naming the dead rank and the step;
  every step before it exact; two engines per job and three jobs on one Store never mixed up.
* **Exact resume** (tests/distributed/resume_worker.py): ``torchrun --max-restarts 2`` of a
  Lightning fit with ``strategy="coded"`` and mid-epoch checkpoints; attempt 0 loses rank 1 inside a
  task, attempt 1 loses rank 0 half-way through writing a checkpoint; attempt 2 ends with the
  parameters of a single process over the same batches, after exactly the planned optimizer steps.
  The same launch checks that codedgrad opens no listening socket of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import DISTRIBUTED_DIR, REPO_ROOT, _kill_tree, _tail

pytestmark = pytest.mark.distributed

WORLD = 3
KILL_STEP = 3
ENGINE_TIMEOUT = 5.0  # fault_worker.TIMEOUT
MARGIN = 15.0  # a loaded 2-core machine: process start-up and exit are not the engine's
POINTS = {"task": 0, "commit": 2, "allreduce": 1}  # kill point -> the rank that dies
HARD_TIMEOUT = 120.0  # no launch may hang: every process is killed after this


def launch_jobs(out_dir: Path) -> dict[str, dict]:
    """Run one 3-rank job per kill point at once on a shared Store; return each job's outcome."""
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(store.port)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("CODEDGRAD_EMULATE", None)
    worker = str(DISTRIBUTED_DIR / "fault_worker.py")
    processes: dict[tuple[str, int], subprocess.Popen] = {}
    for point, victim in POINTS.items():
        job_dir = out_dir / point
        job_dir.mkdir()
        for rank in range(WORLD):
            rank_env = dict(env, RANK=str(rank), WORLD_SIZE=str(WORLD), TORCHELASTIC_RUN_ID=f"faults-{point}")
            with open(job_dir / f"output{rank}.txt", "w") as output:
                processes[point, rank] = subprocess.Popen(
                    [sys.executable, worker, str(job_dir), point, str(victim), str(KILL_STEP)],
                    cwd=REPO_ROOT,
                    env=rank_env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
    # Poll, so that each process's exit time is known (a survivor must also *exit* in time).
    deadline = time.monotonic() + HARD_TIMEOUT
    ended: dict[tuple[str, int], float] = {}
    while len(ended) < len(processes) and time.monotonic() < deadline:
        for key, process in processes.items():
            if key not in ended and process.poll() is not None:
                ended[key] = time.time()
        time.sleep(0.05)
    hung = [key for key in processes if key not in ended]
    for key in hung:
        _kill_tree(processes[key].pid)
        processes[key].wait(timeout=10)
    outcomes: dict[str, dict] = {}
    for point in POINTS:
        job_dir = out_dir / point
        outcomes[point] = {
            "returncode": {rank: processes[point, rank].returncode for rank in range(WORLD)},
            "ended": {rank: ended.get((point, rank)) for rank in range(WORLD)},
            "output": {rank: _tail((job_dir / f"output{rank}.txt").read_text()) for rank in range(WORLD)},
        }
    assert not hung, f"hung (killed after {HARD_TIMEOUT:g} s): {hung}\n" + "\n".join(
        f"--- {p} rank {r} ---\n{outcomes[p]['output'][r]}" for p, r in hung
    )
    for point in POINTS:
        job_dir = out_dir / point
        killed = job_dir / "killed.json"
        assert killed.exists(), f"{point}: the victim never reached its kill point\n{outcomes[point]['output']}"
        outcomes[point]["killed"] = json.loads(killed.read_text())
        outcomes[point]["ranks"] = {
            rank: json.loads((job_dir / f"rank{rank}.json").read_text())
            for rank in range(WORLD)
            if (job_dir / f"rank{rank}.json").exists()
        }
    return outcomes


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict[str, dict]:
    return launch_jobs(tmp_path_factory.mktemp("faults"))


def names_rank(message: str, rank: int) -> bool:
    """Whether ``message`` names ``rank`` as the one missing (its tasks, or it in a list of ranks)."""
    return bool(re.search(rf"rank {rank}'s|ranks \[([0-9, ]*\b)?{rank}\b|rank {rank} (is|was|did)", message))


@pytest.mark.parametrize("point", list(POINTS))
def test_a_killed_rank_fails_the_others_in_time_naming_it_and_the_step(faults: dict, point: str) -> None:
    outcome, victim = faults[point], POINTS[point]
    killed = outcome["killed"]
    assert killed["rank"] == victim and killed["step"] == KILL_STEP, killed
    assert outcome["returncode"][victim] == -9, outcome["returncode"]
    for rank in range(WORLD):
        if rank == victim:
            continue
        survivor = outcome["ranks"].get(rank)
        assert survivor is not None, f"{point}: rank {rank} wrote nothing\n{outcome['output'][rank]}"
        assert survivor["type"] is not None, f"{point}: rank {rank} did not fail: {survivor}"
        assert outcome["returncode"][rank] not in (0, None), (point, rank, outcome["returncode"])
        message = survivor["message"]
        assert f"step {KILL_STEP}" in message, (point, rank, message)
        assert names_rank(message, victim), (point, rank, message)
        failed_after = survivor["time"] - killed["time"]  # the engine's part: its timeout, and a little
        assert failed_after <= ENGINE_TIMEOUT + 3.0, (point, rank, failed_after, message)
        exited_after = outcome["ended"][rank] - killed["time"]  # with the interpreter's exit
        assert exited_after <= ENGINE_TIMEOUT + MARGIN, (point, rank, exited_after)
        # Every step before the kill was exact, on both engines.
        assert len(survivor["errors"]) == 2 * KILL_STEP, survivor["steps"]
        assert max(survivor["errors"]) <= 1e-10, survivor["errors"]
        # The release's process group waits for the engine's timeout, not torch's 30 minutes.
        assert survivor["release_timeouts"] == [ENGINE_TIMEOUT] * 2, survivor["release_timeouts"]
