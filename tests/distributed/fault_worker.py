"""Worker for tests/test_faults.py: one rank is killed (SIGKILL) at a chosen point of a coded step.

Launched without torchrun (an agent would tear the survivors down first): the test hosts one c10d
``TCPStore`` that every rank of every job connects to, as torchrun's agent store would be, and starts
the ranks with ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE`` and a ``TORCHELASTIC_RUN_ID`` of
their job. Several jobs run at once on that one Store: the engines get the raw shared Store
(``store=``), so only their namespace (the run id) keeps the jobs apart. Each job runs two engines
in turn (two models), each step checked against a single process computing the same global batch,
until engine A's step ``STEP``, where rank ``VICTIM`` kills itself at ``POINT``:

``task``        inside ``task_loss`` (its forward pass);
``commit``      right after a commit the decoder uses, before the result is accumulated;
``allreduce``   on the release thread, inside the coded all-reduce (the others are in it).

A survivor writes ``rank{r}.json`` (the error's type and message, when it was raised) and exits
with the error, as a user's script would; the victim writes ``killed.json`` just before dying.

Usage: ``python fault_worker.py OUT_DIR POINT VICTIM STEP``.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

import codedgrad.runtime.release as release
from codedgrad import CodedDataParallel
from codedgrad.emulate import Heterogeneity
from codedgrad.runtime.coordinator import StepChannel
from tests.distributed.engine_worker import grads, make_data, make_model, reference_grads, relative_error, task_loss_fn

TIMEOUT = 5.0  # the engine's (and the process groups') timeout: survivors must fail within it, plus a margin
TASKS = 12
LR = 0.05


def die(out_dir: Path, point: str, rank: int, step: int) -> None:
    (out_dir / "killed.json").write_text(json.dumps({"point": point, "rank": rank, "step": step, "time": time.time()}))
    os.kill(os.getpid(), signal.SIGKILL)


def inject(out_dir: Path, point: str, victim: int, rank: int, target: dict) -> None:
    """Arm the kill at ``point``: it fires when ``target["armed"]`` is set (engine A's step STEP)."""
    if rank != victim:
        return
    if point == "commit":
        original_commit = StepChannel.commit_all  # every commit goes through it (a task, or a chunk)

        def commit_then_die(self: StepChannel, results: Sequence[int]) -> bool:
            used = original_commit(self, results)
            if used and target["armed"]:
                die(out_dir, point, rank, self.step)  # the Store holds the commit; the accumulator never will
            return used

        StepChannel.commit_all = commit_then_die
    elif point == "allreduce":
        original_allreduce = release.coded_allreduce_

        def allreduce_then_die(tensor, coefficient, group=None):
            if target["armed"]:
                die(out_dir, point, rank, target["step"])
            return original_allreduce(tensor, coefficient, group)

        release.coded_allreduce_ = allreduce_then_die
    elif point != "task":
        raise SystemExit(f"unknown kill point {point!r}")


def main() -> None:
    out_dir, point, victim, kill_step = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    job = os.environ["TORCHELASTIC_RUN_ID"]
    # Start-up on a loaded machine may skew the ranks by seconds: the default group (used only to build the
    # engines) waits longer than the engines' timeout; the engines' release groups use TIMEOUT.
    startup = datetime.timedelta(seconds=60)
    shared = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=startup)
    # The process group's own keys in a namespace of the job (torchrun's agent store is per job); the
    # engines get the raw shared Store.
    dist.init_process_group("gloo", store=dist.PrefixStore(job, shared), rank=rank, world_size=world, timeout=startup)
    target = {"armed": False, "step": kill_step}
    inject(out_dir, point, victim, rank, target)
    emulate = Heterogeneity(speeds=(1.0, 2.0, 3.0)[:world], base=0.002, jitter=0.3, seed=1)
    result: dict = {"rank": rank, "errors": [], "steps": []}
    engines = {
        # Ω fixed: the kill points are the coded protocol's (commits, the arrival, the coded all-reduce).
        # No spare work: the victim's primaries that no backup holds are its alone, so the step waits
        # for it and it always reaches its kill point (with spare work a loaded machine sometimes let
        # the others decide step 3 before the victim began it, and nothing was killed).
        name: CodedDataParallel(
            make_model(torch.float64), redundancy=1.25, spare_work=False, emulate=emulate, timeout=TIMEOUT, store=shared
        )
        for name in ("A", "B")
    }
    references = {name: make_model(torch.float64) for name in engines}
    result["release_timeouts"] = [
        cdp._release_group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
        for cdp in engines.values()
    ]
    try:
        for step in range(kill_step + 1):
            for name, cdp in engines.items():
                if name == "B" and step == kill_step:
                    break
                x, y = make_data(TASKS, torch.float64, step + (1000 if name == "B" else 0))
                good = task_loss_fn(cdp.module, x, y)
                target["armed"] = name == "A" and step == kill_step

                def task_loss(j: int, good=good, armed=target["armed"]) -> torch.Tensor:
                    loss = good(j)  # the forward pass of task j
                    if point == "task" and armed and rank == victim:
                        die(out_dir, point, rank, kill_step)
                    return loss

                cdp.module.zero_grad(set_to_none=True)
                report = cdp.backward(task_loss, TASKS)
                want = reference_grads(references[name], TASKS, x, y)
                result["errors"].append(relative_error(grads(cdp.module), want))
                result["steps"].append([name, report.step])
                with torch.no_grad():  # the same SGD step on the engine's model and the single-process one
                    for model in (cdp.module, references[name]):
                        for p in model.parameters():
                            if p.grad is not None:
                                p -= LR * p.grad
    except Exception as error:
        result.update(type=type(error).__name__, message=str(error), time=time.time())
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
        raise
    result.update(type=None, message="", time=time.time())  # a survivor that did not fail: the test says so
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
