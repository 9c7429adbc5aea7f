"""Shared test helpers: launching distributed workers under torchrun and reading their results.

A distributed test launches torchrun once (≈ 8 s) and checks many things in that launch. Worker
scripts live in ``tests/distributed/``; each rank writes its results as JSON to
``out_dir/rank{r}.json`` (``out_dir`` given on the command line) and the pytest side asserts on
them, so a failure shows the numbers rather than a hung or crashed worker. Mark such tests with
``@pytest.mark.distributed``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import settings

from codedgrad.recipes.processes import descendants

# Property tests draw the same examples on every run, so a CI result can be reproduced exactly.
settings.register_profile("codedgrad", derandomize=True, database=None)
settings.load_profile("codedgrad")

REPO_ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTED_DIR = Path(__file__).resolve().parent / "distributed"

_TAIL_CHARS = 6000


def _tail(text: str | bytes | None) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text if len(text) <= _TAIL_CHARS else "…" + text[-_TAIL_CHARS:]


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its process group and every descendant (each worker's own session too)."""
    below = descendants(pid)  # before the kill: orphans are re-parented and lost from view
    try:
        os.killpg(pid, signal.SIGKILL)  # torchrun first, so that it cannot restart a worker
    except (ProcessLookupError, PermissionError):
        pass
    for child in below:
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run_torchrun(
    script: Path,
    nproc: int,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local ranks with torchrun (``--standalone``) and wait for it.

    Workers get ``OMP_NUM_THREADS=1`` (ranks share two cores; more threads only contend) and
    ``PYTHONUNBUFFERED=1`` (so a crash's last prints are not lost), plus ``env`` on top of the
    current environment.

    Args:
        script: the worker script.
        nproc: number of ranks.
        args: command-line arguments passed to every rank.
        env: extra environment variables.
        timeout: seconds before the whole launch (torchrun and its workers) is killed.

    Returns:
        The completed process, with text ``stdout`` and ``stderr``.

    Raises:
        AssertionError: on a non-zero exit or a timeout, with the tail of stdout and stderr.
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(script),
        *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    # Workers import codedgrad and the tests' helpers whether or not the package is installed.
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    if env:
        full_env.update(env)
    # torchrun starts each worker in a session of its own, so killing torchrun's process group would
    # leave the workers running (and holding the output pipes open): on a timeout, _kill_tree finds
    # them through /proc first.
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # something we could not find still holds the pipes
            process.kill()
            stdout, stderr = "", "(output lost: the launch's processes could not all be killed)"
        raise AssertionError(
            f"torchrun {script.name} (nproc={nproc}) timed out after {timeout:g} s\n"
            f"--- stdout (tail) ---\n{_tail(stdout)}\n--- stderr (tail) ---\n{_tail(stderr)}"
        ) from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} (nproc={nproc}) exited with {result.returncode}\n"
            f"--- stdout (tail) ---\n{_tail(stdout)}\n--- stderr (tail) ---\n{_tail(stderr)}"
        )
    return result


def load_rank_results(out_dir: Path, nproc: int) -> list[dict]:
    """Read ``out_dir/rank{r}.json`` for every rank; a missing file fails with the rank named."""
    results = []
    for rank in range(nproc):
        path = Path(out_dir) / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no results ({path} missing)"
        results.append(json.loads(path.read_text()))
    return results


# Session-scoped (they are stateless) so that module-scoped fixtures can launch torchrun once per module.
@pytest.fixture(scope="session")
def torchrun() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`run_torchrun`, as a fixture."""
    return run_torchrun


@pytest.fixture(scope="session")
def rank_results() -> Callable[[Path, int], list[dict]]:
    """:func:`load_rank_results`, as a fixture."""
    return load_rank_results


LIGHTNING_NPROC = 3  # tests/distributed/lightning_worker.py: both strategies' checks on 3 ranks


@pytest.fixture(scope="session")
def lightning_launch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One torchrun launch of both Lightning strategies' checks (tests/distributed/lightning_worker.py),
    shared by test_lightning_balanced.py and test_lightning_coded.py; the directory holding their
    ``balanced/`` and ``coded/`` results."""
    out_dir = tmp_path_factory.mktemp("lightning")
    run_torchrun(DISTRIBUTED_DIR / "lightning_worker.py", LIGHTNING_NPROC, [str(out_dir)], timeout=480)
    return out_dir
