"""Coordination cost against the world size: commit latency, CAS retries and Store load at P = 4…32.

The sweep (each world size is one torchrun launch, under the machine-wide bench lock)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --ranks 4,8,16,32 --two-nodes 8

writes ``outputs/scale/<timestamp>/scale.json``, ``scale.png`` and ``table.md``. ``--two-nodes 8``
adds a launch of two torchrun agents on this machine (``--nnodes 2 --nproc-per-node 4``, c10d
rendezvous on localhost), so that the Store is reached through the rendezvous of a multi-node job.

Each launch runs up to three phases on the same ranks (emulated speeds ``1 + r % 4``, so each rank
commits at the same rate whatever P; K = ``--tasks-per-rank`` · P tasks, repetition code, Ω = 1.2):

* ``capacity``: 1, 2 and 4 ranks send ``get`` back to back; the most operations per second is the
  Store server's throughput on this machine (its clients share the cores: a lower bound).
* ``coord``: the coordination alone, each rank walks its queue, sleeps the
  emulated task time (:class:`~codedgrad.emulate.Heterogeneity`, sleep mode) in place of compute,
  commits every result through :class:`~codedgrad.runtime.StoreCoordinator` and waits for the
  decision; after it, three bare round trips (a ``check``) at a similar cadence give the Store's own
  latency for reference. ``--protocols cas,add`` alternates its steps with a race-free prototype
  (``_add_step``; reported as ``coord_add``), so that both see the same machine.
* ``engine``: :class:`~codedgrad.CodedDataParallel` on a tiny model with the same emulation, the
  plan fixed (no re-planning), step time measured over blocks of steps until the last rank is done.

Per phase: commit latency (median, p90, p99, mean), Store round trips and CAS retries per commit,
Store operations per second at the server (every rank counts the calls of its own Store clients
and the counts are summed; the engine's clients are wrapped after construction), commits per
second, commit time as a share of the ranks' step time, and the step time against the ideal bound
(pooled capacity, plus the all-reduce for the engine). Rank 0 samples ``/proc/stat`` during each
phase: with 32 processes on 2 cores, a busy machine measures the VM, not the protocol, so the CPU
idle share is reported with every row. Sleep emulation: the absolute task times are not real work.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

LOCK = "/tmp/codedgrad-bench.lock"
PHASES = ("capacity", "coord", "engine")


# ------------------------------------------------------------------------------------------ helpers
class CountingStore:
    """A Store client that counts its calls (duck-typed: every method is forwarded).

    One client serves one thread (as in the coordinator), so the count needs no lock. A clone
    counts on its own; :func:`total_ops` sums a rank's clients.
    """

    def __init__(self, inner, registry: list[CountingStore]) -> None:
        self._inner = inner
        self._registry = registry
        self.ops = 0
        registry.append(self)

    def clone(self) -> CountingStore:
        return CountingStore(self._inner.clone(), self._registry)

    def __getattr__(self, name: str):
        method = getattr(self._inner, name)
        if not callable(method):
            return method

        def counted(*args, **kwargs):
            self.ops += 1
            return method(*args, **kwargs)

        return counted


def total_ops(registry: list[CountingStore]) -> int:
    return sum(client.ops for client in registry)


class CpuMeter:
    """Samples the machine's CPU idle share from /proc/stat every ``interval`` seconds on a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._first = self._last = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = self._read()
            idle, total = now[0] - self._last[0], now[1] - self._last[1]
            if total > 0:
                self.samples.append(idle / total)
            self._last = now

    def __enter__(self) -> CpuMeter:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        end = self._read()
        idle, total = end[0] - self._first[0], end[1] - self._first[1]
        self.mean_idle = idle / total if total > 0 else float("nan")

    def summary(self) -> dict:
        samples = self.samples or [self.mean_idle]
        return {
            "idle_mean": self.mean_idle,
            "idle_p10": float(np.quantile(samples, 0.1)),
            "idle_min": float(min(samples)),
            "loadavg_1min": os.getloadavg()[0],
        }


def _pause(seconds: float) -> None:
    """Sleep, spinning only the last half millisecond (a task ends on time, not when the OS wakes us)."""
    end = time.perf_counter() + seconds
    if seconds > 1e-3:
        time.sleep(seconds - 5e-4)
    while time.perf_counter() < end:
        pass


def _latency_summary(latencies: np.ndarray, round_trips: int) -> dict:
    ms = latencies * 1e3
    return {
        "commits": int(ms.size),
        "commit_median_ms": float(np.median(ms)),
        "commit_p90_ms": float(np.quantile(ms, 0.9)),
        "commit_p99_ms": float(np.quantile(ms, 0.99)),
        "commit_mean_ms": float(np.mean(ms)),
        "round_trips_per_commit": round_trips / ms.size,
        "retries_per_commit": round_trips / ms.size - 1.0,
    }


# ------------------------------------------------------------------------------------------ phases
def _cas_step(coordinator, step: int, code, digest: bytes, rank: int, emulate, record: dict) -> None:
    """Today's protocol: one compare-and-set of the step's one state key per commit, retried on a race."""
    channel = coordinator.channel(step, code, 0, digest, wait=False)
    channel.begin()
    for index, work in enumerate(code.queue(rank)):
        state = channel.state
        if state.decided:
            break
        if not state.is_needed(rank, work.result):
            continue
        task_start = time.perf_counter()
        _pause(emulate.task_delay(rank, step, index))
        before = time.perf_counter()
        channel.commit(work.result)
        after = time.perf_counter()
        record["latencies"].append(after - before)
        record["busy"] += after - task_start
    channel.wait_decided()
    record["round_trips"] += channel.commit_round_trips


def _add_step(store, step: int, code, rank: int, emulate, record: dict) -> None:
    """A prototype without the single key's races (not the engine's protocol): a commit is ``add`` on
    the task's own counter (1: the first result, the one used) and, for a first result, ``add`` on the
    step's count of covered tasks; the commit that brings it to K decides. Two round trips, never a
    retry. A backup is skipped when its task's counter exists (one ``check``)."""
    num_tasks, covered = code.num_tasks, 0
    for index, work in enumerate(code.queue(rank)):
        if covered >= num_tasks:
            break
        (task,) = work.tasks
        if code.primary_of[task] != rank and store.check([f"a{step}/t{task}"]):
            continue
        task_start = time.perf_counter()
        _pause(emulate.task_delay(rank, step, index))
        before = time.perf_counter()
        trips = 1
        if store.add(f"a{step}/t{task}", 1) == 1:
            covered = store.add(f"a{step}/covered", 1)
            trips += 1
            if covered == num_tasks:
                store.set(f"a{step}/decided", b"1")
        after = time.perf_counter()
        record["latencies"].append(after - before)
        record["busy"] += after - task_start
        record["round_trips"] += trips
    store.wait([f"a{step}/decided"], datetime.timedelta(seconds=120))


def run_coordination(args, rank: int, world: int, emulate, code) -> dict[str, dict] | None:
    """The coordination alone, for each protocol in ``--protocols`` (steps interleaved A B A B …).

    Rank 0 returns a summary per protocol (``coord`` for today's, ``coord_add`` for the prototype);
    the other ranks None.
    """
    import torch.distributed as dist

    from codedgrad.plan import capacity_time
    from codedgrad.runtime.coordinator import StoreCoordinator, weights_digest

    registry: list[CountingStore] = []
    base_store = dist.PrefixStore("bench_scale", dist.distributed_c10d._get_default_store())
    store = CountingStore(base_store, registry)
    coordinator = StoreCoordinator(store, rank, world, timeout=120)
    digest = weights_digest([1.0] * code.num_tasks)
    protocols = args.protocols.split(",")
    records = {
        name: {"latencies": [], "bare": [], "decided_at": [], "round_trips": 0, "ops": 0, "busy": 0.0}
        for name in protocols
    }
    meter = CpuMeter() if rank == 0 else None
    for step in range((args.warmup + args.steps) * len(protocols)):
        name = protocols[step % len(protocols)]
        measured = step >= args.warmup * len(protocols)
        if step == args.warmup * len(protocols):
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            if meter is not None:
                meter.__enter__()
        scratch = {"latencies": [], "round_trips": 0, "busy": 0.0}
        dist.barrier()
        ops_before = total_ops(registry)
        start = time.perf_counter()
        if name == "cas":
            _cas_step(coordinator, step, code, digest, rank, emulate, scratch)
        else:
            _add_step(store, step, code, rank, emulate, scratch)
        elapsed = time.perf_counter() - start
        ops = total_ops(registry) - ops_before
        bare = []
        for _ in range(3):  # the Store's own round trip, at a similar cadence, after the step
            _pause(0.005)
            before = time.perf_counter()
            base_store.check(["bench_scale_reference"])
            bare.append(time.perf_counter() - before)
        if measured:
            record = records[name]
            record["latencies"] += scratch["latencies"]
            record["round_trips"] += scratch["round_trips"]
            record["busy"] += scratch["busy"]
            record["decided_at"].append(elapsed)
            record["ops"] += ops
            record["bare"] += bare
        dist.barrier()  # everyone is past every wait of the step
        if name == "cas":
            coordinator.step_done(step)
        elif rank == 0:  # off the measured window: the prototype leaves K + 2 keys per step
            for key in [f"a{step}/t{j}" for j in range(code.num_tasks)] + [f"a{step}/covered", f"a{step}/decided"]:
                base_store.delete_key(key)
    if meter is not None:
        meter.__exit__()
    own_cores = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (records, own_cores))
    if rank != 0:
        return None
    ideal = capacity_time(emulate.profiles(), code.num_tasks)
    cpu = {**meter.summary(), "ranks_cores": sum(cores for _, cores in everyone)}
    summaries = {}
    for name in protocols:
        rs = [r[name] for r, _ in everyone]
        all_latencies = np.array([x for r in rs for x in r["latencies"]])
        # A step lasts until the last rank saw the decision; the server's load is every rank's calls in it.
        step_seconds = np.max(np.array([r["decided_at"] for r in rs]), axis=0)
        bare_ms = np.array([x for r in rs for x in r["bare"]]) * 1e3
        summary = _latency_summary(all_latencies, sum(r["round_trips"] for r in rs))
        if name == "add":  # its second round trip (the covered count) is no retry: it never retries
            summary["retries_per_commit"] = 0.0
        total_seconds = float(step_seconds.sum())
        summary.update(
            {
                "protocol": name,
                "steps": args.steps,
                "get_median_ms": float(np.median(bare_ms)),
                "get_p99_ms": float(np.quantile(bare_ms, 0.99)),
                "store_ops": int(sum(r["ops"] for r in rs)),
                "store_ops_per_second": sum(r["ops"] for r in rs) / total_seconds,
                "commits_per_second": all_latencies.size / total_seconds,
                # Of the ranks' time in the steps, the share spent committing.
                "commit_share": float(all_latencies.sum() / (world * total_seconds)),
                # Of the time ranks were doing their own work (task + commit), the share spent committing.
                "commit_share_of_busy": float(all_latencies.sum() / sum(r["busy"] for r in rs)),
                "step_median_s": float(np.median(step_seconds)),
                "ideal_s": ideal,
                "ratio_to_ideal": float(np.median(step_seconds)) / ideal,
                "cpu": cpu,
            }
        )
        summaries["coord" if name == "cas" else f"coord_{name}"] = summary
    return summaries


def run_capacity(args, rank: int, world: int) -> dict | None:
    """The Store server's throughput: 1, 2 and 4 ranks (as many as there are) sending ``get`` back to back."""
    import torch.distributed as dist

    store = dist.PrefixStore("bench_scale_capacity", dist.distributed_c10d._get_default_store())
    if rank == 0:
        store.set("key", bytes(64))
    rows = []
    for clients in [c for c in (1, 2, 4) if c <= world]:
        dist.barrier()
        count, start = 0, time.perf_counter()
        if rank < clients:
            while time.perf_counter() - start < args.capacity_seconds:
                store.get("key")
                count += 1
        elapsed = time.perf_counter() - start
        counts: list = [None] * world
        dist.all_gather_object(counts, (count, elapsed))
        if rank == 0:
            ops = sum(c for c, _ in counts[:clients]) / max(e for _, e in counts[:clients])
            rows.append({"clients": clients, "ops_per_second": ops, "round_trip_ms": 1e3 * clients / ops})
    dist.barrier()
    if rank != 0:
        return None
    return {"levels": rows, "max_ops_per_second": max(r["ops_per_second"] for r in rows)}


def run_engine(args, rank: int, world: int, emulate, omega: float) -> dict | None:
    """The full engine on a tiny model; rank 0 returns the summary, the others None."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from codedgrad import CodedDataParallel
    from codedgrad.plan import capacity_time

    num_tasks = args.tasks_per_rank * world
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    x, y = torch.randn(num_tasks * 4, 16), torch.randn(num_tasks * 4, 1)

    def task_loss(j: int) -> torch.Tensor:
        return ((model(x[4 * j : 4 * j + 4]) - y[4 * j : 4 * j + 4]) ** 2).mean()

    cdp = CodedDataParallel(
        model, redundancy=omega, code="repetition", profiles=emulate.profiles(), emulate=emulate,
        timeout=120, replan_every=0,
    )  # fmt: skip
    # Count the engine's Store calls: wrap its two clients (compute thread, release thread). The
    # coordinator reads them at every step, so wrapping after construction catches every step's calls.
    registry: list[CountingStore] = []
    coordinator = cdp._coordinator
    coordinator.store = CountingStore(coordinator.store, registry)
    coordinator.wait_store = CountingStore(coordinator.wait_store, registry)
    for _ in range(args.warmup):
        cdp.backward(task_loss, num_tasks)
    meter = CpuMeter() if rank == 0 else None
    commits: list[float] = []
    step_times: list[float] = []
    allreduce: list[float] = []
    blocks: list[float] = []
    round_trips = ops = 0
    if meter is not None:
        meter.__enter__()
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(max(1, args.steps // args.block)):
        dist.barrier()
        ops_before = total_ops(registry)
        start = time.perf_counter()
        for _ in range(args.block):
            report = cdp.backward(task_loss, num_tasks)
            commits.extend(report.commit_seconds)
            round_trips += report.commit_round_trips
            step_times.append(report.step_time)
            allreduce.append(report.allreduce_time)
        block = torch.tensor([(time.perf_counter() - start) / args.block])
        ops += total_ops(registry) - ops_before
        dist.all_reduce(block, op=dist.ReduceOp.MAX)
        blocks.append(float(block))
    if meter is not None:
        meter.__exit__()
    own_cores = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (commits, round_trips, ops, sum(step_times), allreduce, own_cores))
    cdp.close()
    if rank != 0:
        return None
    all_commits = np.array([c for r in everyone for c in r[0]])
    total_seconds = sum(blocks) * args.block
    ideal = capacity_time(emulate.profiles(), num_tasks) + float(np.median([a for r in everyone for a in r[4]]))
    summary = _latency_summary(all_commits, sum(r[1] for r in everyone))
    summary.update(
        {
            "steps": len(blocks) * args.block,
            "store_ops": int(sum(r[2] for r in everyone)),
            "store_ops_per_second": sum(r[2] for r in everyone) / total_seconds,
            "commits_per_second": all_commits.size / total_seconds,
            "commit_share": float(all_commits.sum() / sum(r[3] for r in everyone)),
            "step_median_s": float(np.median(blocks)),
            "allreduce_median_ms": float(np.median([a for r in everyone for a in r[4]]) * 1e3),
            "ideal_s": ideal,
            "ratio_to_ideal": float(np.median(blocks)) / ideal,
            "plan_version": cdp.plan_version,
            "cpu": {**meter.summary(), "ranks_cores": sum(r[5] for r in everyone)},
        }
    )
    return summary


def worker(args) -> None:
    """One rank of one launch: both phases, then rank 0 writes the launch's JSON."""
    import torch.distributed as dist

    from codedgrad.codes import make_code
    from codedgrad.emulate import Heterogeneity

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    speeds = [1.0 + r % 4 for r in range(world)]
    emulate = Heterogeneity(speeds=speeds, base=args.base, jitter=0.5, stall_prob=0.0, seed=0)
    code = make_code("repetition", world, args.tasks_per_rank * world, args.redundancy, emulate.profiles())
    result = {
        "world_size": world,
        "nodes": int(os.environ.get("GROUP_WORLD_SIZE", "1")),
        "tasks": code.num_tasks,
        "redundancy": args.redundancy,
        "base_s": args.base,
        "emulation": emulate.describe(),
    }
    for phase in args.phases.split(","):
        started = time.perf_counter()
        if phase == "capacity":
            result[phase] = run_capacity(args, rank, world)
        elif phase == "coord":
            summaries = run_coordination(args, rank, world, emulate, code)
            if rank == 0:
                wall = time.perf_counter() - started
                for key, summary in summaries.items():
                    result[key] = {**summary, "wall_s": wall}
                    print(f"P={world} {key}: {json.dumps(summary)}", flush=True)
            continue
        else:
            result[phase] = run_engine(args, rank, world, emulate, args.redundancy)
        if rank == 0:
            result[phase]["wall_s"] = time.perf_counter() - started
            print(f"P={world} {phase}: {json.dumps(result[phase])}", flush=True)
    if rank == 0:
        Path(args.worker).write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args, world: int, nodes: int, out: Path) -> dict:
    """One torchrun launch (``nodes`` agents on this machine); its JSON."""
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    passed = [
        "--worker", str(out), "--phases", args.phases, "--base", str(args.base), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--block", str(args.block), "--tasks-per-rank", str(args.tasks_per_rank),
        "--redundancy", str(args.redundancy), "--capacity-seconds", str(args.capacity_seconds),
        "--protocols", args.protocols,
    ]  # fmt: skip
    script = str(Path(__file__).resolve())
    if nodes == 1:
        commands = [[torchrun, "--standalone", "--nproc-per-node", str(world), script, *passed]]
    else:
        endpoint = f"localhost:{_free_port()}"
        rdzv = ["--nnodes", str(nodes), "--nproc-per-node", str(world // nodes), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", endpoint, "--rdzv-id", f"scale{os.getpid()}"]  # fmt: skip
        commands = [[torchrun, *rdzv, script, *passed] for _ in range(nodes)]
    shell = " & ".join(" ".join(c) for c in commands) + " & wait"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    started = time.perf_counter()
    # A session of its own, so that a launch that runs past the timeout is ended with all its ranks.
    process = subprocess.Popen(
        shell, shell=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=args.launch_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise RuntimeError(f"launch P={world} nodes={nodes}: no result within {args.launch_timeout:g} s") from None
    if process.returncode != 0 or not out.exists():
        raise RuntimeError(f"launch P={world} nodes={nodes} failed (rc {process.returncode}):\n{stderr[-4000:]}")
    result = json.loads(out.read_text())
    result["launch"] = " ".join(commands[0]) + (f"  (x{nodes} agents)" if nodes > 1 else "")
    result["launch_wall_s"] = time.perf_counter() - started
    return result


SERIES = ("coord", "coord_add", "engine")  # the measured series a launch can have, in table order


def table(rows: list[dict], phases: list[str]) -> str:
    lines = []
    for phase in [key for key in SERIES if key in rows[0]]:
        lines.append(f"\n{phase}\n")
        lines.append(
            "| P | nodes | commits | mean ms | median ms | p90 ms | p99 ms | round trips | retries | get ms"
            " | Store ops/s | commits/s | commit share | step ms | / ideal | CPU idle | ranks' cores |"
        )
        lines.append("|" + "---|" * 17)
        for row in rows:
            s = row[phase]
            get = f"{s['get_median_ms']:.3f}" if "get_median_ms" in s else "–"
            lines.append(
                f"| {row['world_size']} | {row['nodes']} | {s['commits']} | {s['commit_mean_ms']:.3f} | "
                f"{s['commit_median_ms']:.3f} | "
                f"{s['commit_p90_ms']:.3f} | {s['commit_p99_ms']:.3f} | {s['round_trips_per_commit']:.2f} | "
                f"{s['retries_per_commit']:.2f} | {get} | {s['store_ops_per_second']:.0f} | "
                f"{s['commits_per_second']:.0f} | {s['commit_share'] * 100:.2f} % | {s['step_median_s'] * 1e3:.0f} | "
                f"{s['ratio_to_ideal']:.2f} | {s['cpu']['idle_mean'] * 100:.0f} % | {s['cpu']['ranks_cores']:.2f} |"
            )
    if "capacity" in phases and all("capacity" in row for row in rows):
        lines.append("\nStore capacity (ranks sending `get` back to back; ops/s with 1, 2, 4 of them)\n")
        for row in rows:
            levels = ", ".join(f"{lv['ops_per_second']:.0f}" for lv in row["capacity"]["levels"])
            lines.append(f"- P = {row['world_size']} ({row['nodes']} node(s)): {levels}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], phases: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    single = [r for r in rows if r["nodes"] == 1]
    two = [r for r in rows if r["nodes"] > 1]
    for phase, marker in zip([key for key in SERIES if key in rows[0]], "osd"):
        ps = [r["world_size"] for r in single]

        def get(key: str, phase: str = phase) -> list[float]:
            return [r[phase][key] for r in single]

        for key, style in (("commit_median_ms", "-"), ("commit_p90_ms", "--"), ("commit_p99_ms", ":")):
            axes[0].plot(ps, get(key), style, marker=marker, label=f"{phase} {key.split('_')[1]}")
        if phase == "coord":  # the reference round trip, measured with the coordination
            axes[0].plot(ps, get("get_median_ms"), "-", color="grey", marker="x", label="bare get median")
        axes[1].plot(ps, get("retries_per_commit"), marker=marker, label=phase)
        axes[2].plot(ps, get("store_ops_per_second"), marker=marker, label=phase)
        axes[3].plot(ps, [100 * v for v in get("commit_share")], marker=marker, label=phase)
        for r in two:
            for ax, key, scale in ((axes[1], "retries_per_commit", 1), (axes[2], "store_ops_per_second", 1),
                                   (axes[3], "commit_share", 100)):  # fmt: skip
                ax.plot([r["world_size"]], [scale * r[phase][key]], marker="*", markersize=12, linestyle="none",
                        label=f"{phase}, 2 nodes")  # fmt: skip
    axes[3].axhline(2.0, color="red", linewidth=0.8, label="target 2 %")
    titles = ("commit latency (ms)", "CAS retries per commit", "Store ops per second", "commit share of step (%)")
    axes[0].set_yscale("log")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks P")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("codedgrad coordination vs world size (sleep emulation, 2-core VM)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="4,8,16,32", help="world sizes, one standalone launch each")
    parser.add_argument("--two-nodes", default="8", help="world sizes launched as two agents (empty: none)")
    parser.add_argument("--capacity-seconds", type=float, default=0.5, help="per level of the capacity phase")
    parser.add_argument("--phases", default="capacity,coord,engine", help=f"comma-separated, from {', '.join(PHASES)}")
    parser.add_argument(
        "--protocols", default="cas", help="coord phase: cas (today's), add (prototype), or both: cas,add"
    )
    parser.add_argument("--base", type=float, default=0.1, help="mean emulated task time of a speed-1 rank (s)")
    parser.add_argument("--tasks-per-rank", type=int, default=8, help="K / P")
    parser.add_argument("--redundancy", type=float, default=1.2)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per phase")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--block", type=int, default=4, help="engine: steps per timed block")
    parser.add_argument("--out", help="output folder (default outputs/scale/<timestamp>)")
    parser.add_argument("--no-lock", action="store_true", help="do not take the bench lock (tests)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--launch-timeout", type=float, default=900)
    parser.add_argument("--replot", type=Path, help="only redraw table.md and scale.png from this scale.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # set by the driver: run as a rank, write here
    args = parser.parse_args()
    phases = args.phases.split(",")
    if not phases or not set(phases) <= set(PHASES):
        parser.error(f"--phases: choose from {', '.join(PHASES)}")
    if args.base <= 0 or args.tasks_per_rank < 1 or args.steps < 1 or args.warmup < 0 or args.block < 1:
        parser.error("--base, --tasks-per-rank, --steps and --block must be positive, --warmup >= 0")
    if args.worker:
        worker(args)
        return
    if args.replot:
        saved = json.loads(args.replot.read_text())
        (args.replot.parent / "table.md").write_text(f"`{saved['command']}`\n{table(saved['rows'], phases)}")
        plot(saved["rows"], phases, args.replot.parent / "scale.png")
        print(table(saved["rows"], phases))
        return
    ranks = [int(p) for p in args.ranks.split(",") if p]
    two = [int(p) for p in args.two_nodes.split(",") if p]
    if any(p < 2 for p in ranks + two) or any(p % 2 for p in two):
        parser.error("world sizes must be >= 2 (and even for --two-nodes)")
    out_dir = Path(args.out or f"outputs/scale/{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with contextlib.ExitStack() as stack:
        if not args.no_lock:  # `flock /tmp/codedgrad-bench.lock` for the whole sweep (its wait is not timed)
            lock = stack.enter_context(open(LOCK, "a"))
            print(f"waiting for {LOCK}…", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        for world, nodes in [(p, 1) for p in ranks] + [(p, 2) for p in two]:
            print(f"launching P={world} on {nodes} agent(s)…", flush=True)
            rows.append(launch(args, world, nodes, out_dir / f"P{world}_n{nodes}.json"))
    command = "OMP_NUM_THREADS=1 " + " ".join([Path(sys.executable).name, *sys.argv])
    (out_dir / "scale.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
    text = table(rows, phases)
    (out_dir / "table.md").write_text(f"`{command}`\n{text}")
    if not args.no_plot:
        plot(rows, phases, out_dir / "scale.png")
    print(text)
    print(f"wrote {out_dir}/scale.json, table.md" + ("" if args.no_plot else ", scale.png"))


if __name__ == "__main__":
    main()
