"""Faults: a rank killed (SIGKILL) at chosen points, and an exact resume under torchrun's restarts.

Two launches (docs/reliability.md has the fault model):

* **Kill points** (tests/distributed/fault_worker.py): three 3-rank jobs at once, started without
  torchrun so that no agent tears the survivors down, on one c10d ``TCPStore`` hosted here (as
  torchrun's agent hosts it) that all three share. In each job one rank kills itself at engine A's
  step 3: inside a task (rank 0: the Store is not on it), right after a used commit and before its
  accumulation (rank 2), inside the release's coded all-reduce (rank 1). Every survivor must exit
  non-zero within the engine's timeout plus a margin, with an error naming the dead rank and the step;
  every step before it exact; two engines per job and three jobs on one Store never mixed up.
* **Exact resume** (tests/distributed/resume_worker.py): ``torchrun --max-restarts 1`` of a
  Lightning fit with ``strategy="coded"`` and mid-epoch checkpoints; on attempt 0 rank 0 dies half-way
  through writing the checkpoint of step 6, and attempt 1 resumes from step 4's (mid-epoch) and ends
  with the parameters of a single process over the same batches, after exactly the planned optimizer
  steps. ``CODEDGRAD_RESUME_KILLS=task@3,save@6`` adds an attempt that first loses rank 1 inside a
  task (3 attempts). The same launch checks that codedgrad opens no listening socket of its own.
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
RESUME_KILLS = os.environ.get("CODEDGRAD_RESUME_KILLS", "save@6")  # "task@3,save@6": both, 3 attempts
PLANNED_STEPS = 10  # 2 epochs of 5 global batches (resume_worker.py)
CHECKPOINT_EVERY = 2


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
def launches(tmp_path_factory) -> dict[str, object]:
    """Both launches at once (they mostly wait on timeouts and start-up): each outcome, or its error."""
    resume_dir, kills = tmp_path_factory.mktemp("resume"), RESUME_KILLS.split(",")
    resume = start_resume(resume_dir, kills)
    outcomes: dict[str, object] = {}
    try:
        outcomes["faults"] = launch_jobs(tmp_path_factory.mktemp("faults"))
    except AssertionError as error:
        outcomes["faults"] = error
    try:
        outcomes["resumed"] = finish_resume(resume, resume_dir, kills)
    except AssertionError as error:
        outcomes["resumed"] = error
    return outcomes


def outcome_of(launches: dict[str, object], name: str) -> dict:
    outcome = launches[name]
    if isinstance(outcome, AssertionError):
        raise outcome
    return outcome  # type: ignore[return-value]


@pytest.fixture(scope="module")
def faults(launches) -> dict[str, dict]:
    return outcome_of(launches, "faults")


@pytest.fixture(scope="module")
def resumed(launches) -> dict:
    return outcome_of(launches, "resumed")


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


# -- exact resume under torchrun's restarts -------------------------------------------------------


def start_resume(out_dir: Path, kills: list[str]) -> subprocess.Popen:
    """Start torchrun with a restart per kill (see resume_worker.py); its output goes to ``out_dir/output.txt``."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--max-restarts={len(kills)}",
        f"--nproc-per-node={WORLD}",
        str(DISTRIBUTED_DIR / "resume_worker.py"),
        str(out_dir),
        ",".join(kills),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("CODEDGRAD_EMULATE", None)
    with open(out_dir / "output.txt", "w") as output:
        return subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish_resume(process: subprocess.Popen, out_dir: Path, kills: list[str]) -> dict:
    """Wait for :func:`start_resume`'s launch; the outcome of every attempt."""
    try:
        process.wait(timeout=HARD_TIMEOUT + 60 * len(kills))
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        process.wait(timeout=10)
        raise AssertionError(f"the resumed run hung\n{_tail((out_dir / 'output.txt').read_text())}") from None
    output = (out_dir / "output.txt").read_text()
    assert process.returncode == 0, f"torchrun exited with {process.returncode}\n{_tail(output)}"
    steps = {}
    for rank in range(WORLD):
        lines = (out_dir / f"steps.rank{rank}.jsonl").read_text().splitlines()
        steps[rank] = [json.loads(line) for line in lines]
    return {
        "kills": kills,
        "killed": [json.loads((out_dir / f"killed.attempt{a}.json").read_text()) for a in range(len(kills))],
        "ranks": [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)],
        "steps": steps,
        "leftovers": sorted(p.name for p in (out_dir / "ckpt").iterdir() if not p.name.endswith(".ckpt")),
    }


def launch_resume(out_dir: Path, kills: list[str]) -> dict:
    return finish_resume(start_resume(out_dir, kills), out_dir, kills)


def test_a_restarted_run_ends_with_the_uninterrupted_parameters(resumed: dict) -> None:
    last_attempt = len(resumed["kills"])
    for rank, result in enumerate(resumed["ranks"]):
        assert result["attempt"] == last_attempt, result["attempt"]
        assert result["relative_error"] <= 1e-12, (rank, result["relative_error"])  # vs one process, same batches
        assert result["global_step"] == PLANNED_STEPS and result["scheduler_steps"] == PLANNED_STEPS, result
        assert result["not_resumable_warnings"] == [], result["not_resumable_warnings"]  # mid-epoch: resumable
    assert all(r["parameters"] == resumed["ranks"][0]["parameters"] for r in resumed["ranks"])  # bitwise


def test_each_attempt_resumes_from_the_last_complete_checkpoint_and_no_step_is_lost_or_repeated(resumed) -> None:
    for point, killed in zip((k.split("@")[0] for k in resumed["kills"]), resumed["killed"]):
        assert killed["point"] == point, killed
    for rank, entries in resumed["steps"].items():
        starts = [e for e in entries if e["event"] == "start"]
        assert [s["attempt"] for s in starts] == list(range(len(resumed["kills"]) + 1)), starts
        assert starts[0]["start"] == 0
        for attempt, start in enumerate(starts):
            steps = [e for e in entries if e["event"] == "step" and e["attempt"] == attempt]
            assert start["engine_step"] == start["start"], start  # the engine's state came with the checkpoint
            if attempt > 0:  # nothing of an earlier attempt in this one's Store (attempt 0 writes the marker)
                assert not start["stale_marker_seen"], start
            # The steps of an attempt follow on from where it started, each on the global batch a single
            # process takes at that step (mid-epoch resumes skip the batches already trained on).
            assert [e["global_step"] for e in steps] == list(range(start["start"] + 1, start["start"] + 1 + len(steps)))
            assert all(e["expected_batch"] for e in steps), steps
            assert all(e["engine_step"] == e["global_step"] - 1 for e in steps), steps
            if attempt > 0:
                # A restart begins at the last checkpoint the dead attempt completed: the last multiple of
                # CHECKPOINT_EVERY it finished, or the one before when it died writing that one.
                previous = [
                    e["global_step"]
                    for other in resumed["steps"].values()
                    for e in other
                    if e["event"] == "step" and e["attempt"] == attempt - 1
                ]
                killed = resumed["killed"][attempt - 1]
                completed = max((s for s in previous if s % CHECKPOINT_EVERY == 0), default=0)
                if killed["point"] == "save":
                    completed = killed["step"] - CHECKPOINT_EVERY
                assert start["start"] == completed, (rank, attempt, start, previous, killed)
                assert start["start"] % 5 != 0, start  # mid-epoch (5 batches per epoch): the strong case
        last = [e["global_step"] for e in entries if e["event"] == "step" and e["attempt"] == len(starts) - 1]
        assert last[-1] == PLANNED_STEPS, last
    assert resumed["leftovers"] == [], resumed["leftovers"]  # a killed writer's temporary file was cleared


def test_codedgrad_opens_no_listening_socket_of_its_own(resumed: dict) -> None:
    """Only torch.distributed's gloo groups listen (one port per group); none is left after close()."""
    for rank, result in enumerate(resumed["ranks"]):
        fit, engine = result["fit_sockets"], result["engine_sockets"]
        per_group = len(engine["bare_group"]) - len(engine["before"])  # a bare dist.new_group on the same ranks
        assert per_group >= 1 and set(engine["bare_group_destroyed"]) == set(engine["before"]), engine
        # The engine's only listener is its release's process group; the fit's engine likewise.
        assert len(engine["engine"]) - len(engine["before"]) == per_group, engine
        assert len(fit["engine"]) - len(fit["process_group"]) == per_group, fit
        assert engine["engine_closed"] == engine["before"] and fit["after_fit"] == fit["process_group"], (engine, fit)
        every = {port for ports in (*fit.values(), *engine.values()) for port in ports}
        assert result["master_port"] not in every, rank  # torchrun's Store is the agent's, not a worker's


# -- no process group ------------------------------------------------------------------------------


def test_an_atomic_save_leaves_the_old_checkpoint_whole_when_the_writer_fails(tmp_path: Path, monkeypatch) -> None:
    import torch

    import codedgrad.lightning.checkpoint_io as checkpoint_io

    io = checkpoint_io.AtomicCheckpointIO()
    target = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.arange(1000.0)}, target)
    stale = target.with_name(".last.ckpt.tmp-999999")  # what a writer killed half-way leaves
    stale.write_bytes(b"half a checkpoint")
    assert Path(stale).suffix != ".ckpt"  # Lightning's ckpt_path="last" looks for "last*.ckpt" only

    def write_half_then_fail(path: Path, data: memoryview) -> None:
        path.write_bytes(bytes(data[: len(data) // 2]))
        raise OSError("disk full (injected)")

    monkeypatch.setattr(checkpoint_io, "_write_durably", write_half_then_fail)
    with pytest.raises(OSError, match="injected"):
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, target)
    assert io.load_checkpoint(target)["step"] == 1  # the previous checkpoint, whole
    assert sorted(p.name for p in target.parent.iterdir()) == [stale.name, "last.ckpt"]  # its own temp removed
    monkeypatch.undo()
    io.save_checkpoint({"step": 3}, target)
    assert io.load_checkpoint(target)["step"] == 3
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # the killed writer's leftover is gone


def test_both_strategies_save_atomically_unless_given_a_checkpoint_io() -> None:
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    from codedgrad.lightning import BalancedStrategy, CodedStrategy
    from codedgrad.lightning.checkpoint_io import AtomicCheckpointIO

    for strategy in (CodedStrategy, BalancedStrategy):
        assert type(strategy().checkpoint_io) is AtomicCheckpointIO
        own = TorchCheckpointIO()
        assert strategy(checkpoint_io=own).checkpoint_io is own


def test_each_torchrun_attempt_gets_its_own_store_namespace(monkeypatch) -> None:
    from codedgrad.lightning.base import attempt_store

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert attempt_store(None) is None  # not under torchrun's agent store: torch's own rendezvous
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert attempt_store(None) is None  # several agents count restarts differently: no attempt prefix
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = attempt_store(None)
    first.set("default_pg/0//cpu/rank_1", "an address of attempt 0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    second = attempt_store(None)
    assert not second.check(["default_pg/0//cpu/rank_1"])  # attempt 1 cannot read attempt 0's keys
    assert first.check(["default_pg/0//cpu/rank_1"])


def test_a_mid_epoch_resume_skips_the_global_batches_already_trained() -> None:
    from codedgrad.data import GlobalBatchSampler
    from codedgrad.lightning.coded import _GlobalBatches

    batches = _GlobalBatches(GlobalBatchSampler(100, 8, 3, shuffle=True, seed=0))
    batches.set_epoch(1)
    full = list(batches)
    batches.resume_at(1, 2)
    assert list(batches) == full[2:] and list(batches.positions) == [(1, t) for t in range(2, len(full))]
    assert list(batches) == full  # once only: the next pass over the epoch is whole
    batches.resume_at(0, 3)
    assert list(batches) == full  # a resume point of another epoch does not apply
