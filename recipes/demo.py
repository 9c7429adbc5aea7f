"""``make demo``: the digits CNN on 4 EMULATED heterogeneous CPU ranks with ``ddp``, ``balanced`` and ``coded``.

Usage::

    python recipes/demo.py [--out outputs/demo] [--strategies ddp,balanced,coded] [--epochs 3] [-- OVERRIDES]

For each strategy, one after the other, the script launches::

    python -m torch.distributed.run --standalone --nproc-per-node 4 recipes/train.py \\
        strategy=<s> cluster=hetero4_stalls <demo overrides> <OVERRIDES> hydra.run.dir=<out>/<s>

with ``OMP_NUM_THREADS=1`` (its output goes to ``<out>/<s>/launch.log``), then reads the run's
``metrics.json`` and TensorBoard events (``perf/step_time``, ``perf/bound_ratio``, ``val/acc`` and its
wall times) and prints a side-by-side table: median step time, its ratio to the ideal bound (the
global batch's emulated work on the pooled capacity of all ranks), final validation accuracy and
training wall time, plus the speed-ups of ``coded`` over the others. It writes ``<out>/demo.json``
and ``<out>/accuracy.png`` (validation accuracy against training wall time, one line per strategy).
TensorBoard logs stay in ``<out>/<s>/tb`` (``tensorboard --logdir <out>``).

The cluster is EMULATED (``conf/cluster/hetero4_stalls.yaml``): the ranks are equal CPU processes that
sleep for the time a rank of speed 1, 1, 2 or 4 would take, with rare 10× stalls. A run that fails is
reported in the table with the tail of its output, the others still run, and the script exits with
status 1 at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from codedgrad.recipes.processes import descendants

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN = REPO_ROOT / "recipes" / "train.py"

STRATEGIES = ("ddp", "balanced", "coded")
CLUSTER = "hetero4_stalls"
EPOCHS = 3
NPROC = 4
# The demo's own choices, before the user's overrides (which win). The digits split gives 1437
# training samples: 22 steps of 4 × 16 per epoch. Validation twice an epoch, for the accuracy curve;
# per-step scalars every 2 steps (the median step time), per-rank gathers every 10, figures rarely.
DEMO_OVERRIDES = (
    "data.batch_size=16",
    "trainer.log_every_n_steps=2",
    "monitor.every_n_steps=10",
    "monitor.figure_every_n_steps=40",
    "+trainer.val_check_interval=0.5",
    "+trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "validate_at_end=false",  # the last epoch's validation is the final one: no duplicate point
)
TAIL_LINES = 25


@dataclass
class RunResult:
    """One strategy's launch and what its run directory says (NaN: not known)."""

    strategy: str
    run_dir: str
    returncode: int | None = None
    launch_seconds: float = math.nan
    median_step_time: float = math.nan
    median_bound_ratio: float = math.nan
    median_bound: float = math.nan
    final_val_acc: float = math.nan
    train_seconds: float = math.nan
    steps: float = math.nan
    accuracy_curve: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, step, val/acc)
    error: str = ""

    @property
    def ok(self) -> bool:
        """Whether the launch exited 0 and left a metrics file."""
        return self.returncode == 0 and not self.error


# -- launching ---------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    """Stop a launch that ran too long: SIGTERM to torchrun (it stops its workers), then SIGKILL to all.

    torchrun starts each worker in a session of its own, so the workers are found through /proc.
    """
    below = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
        pass
    for pid in [proc.pid, *below]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def train_command(strategy: str, run_dir: Path, nproc: int, cluster: str, overrides: Sequence[str]) -> list[str]:
    """The torchrun command line of one strategy's run."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        str(TRAIN),
        f"strategy={strategy}",
        f"cluster={cluster}",
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def launch(command: Sequence[str], run_dir: Path, timeout: float) -> tuple[int, float]:
    """Run ``command`` with ``OMP_NUM_THREADS=1``, output to ``run_dir/launch.log``; ``(exit status, seconds)``.

    ``run_dir`` is emptied first: TensorBoard would otherwise mix an earlier run's events in. A launch
    over ``timeout`` seconds is stopped and reported as exit status 124.
    """
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(run_dir / "launch.log", "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            returncode = 124
        except BaseException:  # Ctrl-C: leave no ranks behind
            _stop(proc)
            raise
    return returncode, time.perf_counter() - start


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} missing)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- reading a run directory -------------------------------------------------------------------------


def summarise(strategy: str, run_dir: Path, returncode: int | None = 0, launch_seconds: float = math.nan) -> RunResult:
    """Read ``run_dir``'s ``metrics.json`` and TensorBoard events into a :class:`RunResult`.

    Training wall time runs from the fit's start (the ``emulation`` text the monitor writes in
    ``on_fit_start``; else the first step's start) to the last validation; the accuracy curve's
    times are measured from the same start.
    """
    result = RunResult(strategy, str(run_dir), returncode, launch_seconds)
    if returncode != 0:
        reason = "timed out" if returncode == 124 else f"exit status {returncode}"
        result.error = f"{reason}; last lines of {run_dir / 'launch.log'}:\n{_tail(run_dir / 'launch.log')}"
        return result
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        result.error = f"no {metrics_file}; last lines of its launch.log:\n{_tail(run_dir / 'launch.log')}"
        return result
    metrics = json.loads(metrics_file.read_text())
    result.final_val_acc = float(metrics.get("val/acc", math.nan))
    result.steps = float(metrics.get("steps", math.nan))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # slow import

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0, "images": 1})
    events.Reload()
    tags = events.Tags()
    scalars, tensors = set(tags.get("scalars", ())), set(tags.get("tensors", ()))

    def series(tag: str) -> list[Any]:
        return list(events.Scalars(tag)) if tag in scalars else []

    step_times, ratios, bounds = series("perf/step_time"), series("perf/bound_ratio"), series("perf/bound")
    if step_times:
        result.median_step_time = statistics.median(e.value for e in step_times)
    if ratios:
        result.median_bound_ratio = statistics.median(e.value for e in ratios)
    if bounds:
        result.median_bound = statistics.median(e.value for e in bounds)
    text = "emulation/text_summary"
    if text in tensors and events.Tensors(text):
        start = events.Tensors(text)[0].wall_time
    elif step_times:
        start = step_times[0].wall_time - step_times[0].value
    else:
        start = math.nan
    accuracy = series("val/acc")
    result.accuracy_curve = [(e.wall_time - start, int(e.step), float(e.value)) for e in accuracy]
    if accuracy:
        result.train_seconds = accuracy[-1].wall_time - start
        if math.isnan(result.final_val_acc):
            result.final_val_acc = float(accuracy[-1].value)
    return result


# -- reporting ---------------------------------------------------------------------------------------


def speedups(results: Sequence[RunResult]) -> dict[str, dict[str, float]]:
    """``coded``'s speed-ups over each other successful strategy: median step time and training wall time."""
    by_name = {r.strategy: r for r in results if r.ok}
    coded = by_name.get("coded")
    if coded is None:
        return {}
    return {
        f"coded vs {name}": {
            "step_time": other.median_step_time / coded.median_step_time,
            "wall_time": other.train_seconds / coded.train_seconds,
        }
        for name, other in by_name.items()
        if name != "coded"
    }


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:{spec}}{suffix}"


def table(results: Sequence[RunResult]) -> str:
    """The side-by-side table, the speed-ups and the failures' output tails, as text."""
    header = ("strategy", "median step time", "step / ideal bound", "final val acc", "wall time (training)")
    rows = []
    for r in results:
        if r.ok:
            rows.append(
                (
                    r.strategy,
                    _fmt(r.median_step_time * 1000, ".1f", " ms"),
                    _fmt(r.median_bound_ratio, ".2f", "×"),
                    _fmt(r.final_val_acc, ".3f"),
                    _fmt(r.train_seconds, ".1f", " s"),
                )
            )
        else:
            status = "timed out" if r.returncode == 124 else f"exit {r.returncode}"
            rows.append((r.strategy, f"FAILED ({status})", "-", "-", "-"))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(row) for row in rows)]
    bound = next((r.median_bound for r in results if r.ok and not math.isnan(r.median_bound)), math.nan)
    out.append(f"ideal bound (emulated work on pooled capacity): {_fmt(bound * 1000, '.1f', ' ms')} per step")
    for name, ratio in speedups(results).items():
        out.append(f"speed-up {name}: {ratio['step_time']:.2f}× median step time, {ratio['wall_time']:.2f}× wall time")
    for r in results:
        if not r.ok:
            out += ["", f"{r.strategy} FAILED: {r.error}"]
    return "\n".join(out)


def plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Validation accuracy against training wall time, one line per strategy that ran."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for r in results:
        if r.ok and r.accuracy_curve:
            seconds = [0.0, *(c[0] for c in r.accuracy_curve)]
            accuracy = [math.nan, *(c[2] for c in r.accuracy_curve)]
            ax.plot(seconds, accuracy, marker="o", label=f"{r.strategy} ({r.final_val_acc:.3f})")
        elif not r.ok:
            ax.plot([], [], linestyle="none", label=f"{r.strategy}: FAILED")
    ax.set_xlabel("training wall time (s, from the fit's start)")
    ax.set_ylabel("validation accuracy")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None, so that the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# -- main --------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options; everything after ``--`` is passed to ``recipes/train.py`` as Hydra overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/demo"), help="output directory (default outputs/demo)"
    )
    parser.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated (default ddp,balanced,coded)"
    )
    parser.add_argument("--epochs", type=int, default=EPOCHS, help=f"training epochs (default {EPOCHS})")
    parser.add_argument("--cluster", default=CLUSTER, help=f"cluster config (default {CLUSTER})")
    parser.add_argument("--nproc", type=int, default=NPROC, help=f"emulated ranks (default {NPROC})")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch before it is stopped")
    args = parser.parse_args(argv)
    args.overrides = extra
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not args.strategies:
        parser.error("--strategies: none given")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; return 0 when every strategy's run succeeded, else 1."""
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    overrides = [*DEMO_OVERRIDES, f"trainer.max_epochs={args.epochs}", *args.overrides]
    print(
        f"[demo] digits CNN, {args.nproc} EMULATED heterogeneous CPU ranks (cluster={args.cluster}), "
        f"strategies {', '.join(args.strategies)}; overrides: {' '.join(overrides)}",
        flush=True,
    )
    started = time.perf_counter()
    results = []
    for strategy in args.strategies:
        run_dir = out / strategy
        command = train_command(strategy, run_dir, args.nproc, args.cluster, overrides)
        print(f"[demo] {strategy}: training ({run_dir / 'launch.log'}) …", end=" ", flush=True)
        returncode, seconds = launch(command, run_dir, args.timeout)
        result = summarise(strategy, run_dir, returncode, seconds)
        state = "ok" if result.ok else "FAILED"
        print(f"{state}, {seconds:.0f} s with launch overhead", flush=True)
        results.append(result)

    title = (
        f"Digits CNN on {args.nproc} CPU ranks, EMULATED heterogeneity ({args.cluster}):\n"
        "validation accuracy against training wall time"
    )
    plot(results, out / "accuracy.png", title)
    report = {
        "cluster": args.cluster,
        "nproc": args.nproc,
        "epochs": args.epochs,
        "overrides": overrides,
        "emulated": True,
        "total_seconds": time.perf_counter() - started,
        "runs": [{**asdict(r), "ok": r.ok} for r in results],
        "speedups": speedups(results),
    }
    (out / "demo.json").write_text(json.dumps(_finite(report), indent=2) + "\n")
    print()
    print(table(results))
    print(f"\n[demo] wrote {out / 'demo.json'}, {out / 'accuracy.png'}; TensorBoard: tensorboard --logdir {out}")
    print(f"[demo] total {report['total_seconds']:.0f} s", flush=True)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
