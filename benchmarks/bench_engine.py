"""Coded step vs. its baselines under emulated heterogeneity, strategies interleaved in one run.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/bench_engine.py

Four ranks with emulated speeds 1, 1, 2, 4 (mean task time ``base / speed``, half of it exponential
jitter, 1 % of tasks stalled 10×), K = 64 tasks per step; about four minutes. Each round runs a
block of steps of every strategy (A B C A B C …), so drift of the machine hits all of them alike:

* ``uniform``: K/P tasks per rank, no redundancy (the split plain DDP uses), in the coded engine;
* ``optimal``: the optimal split from the emulated profiles, no redundancy;
* ``coded``: repetition with backups, Ω chosen by the planner, plus spare work once a queue is dry;
  the loss is given as ``batch_loss``, so each rank runs its primaries in shrinking chunks with
  commits overlapped (docs/design.md, "The step protocol");
* ``coded_fine`` (with ``--strategies``): the same engine with ``task_loss``, one task per call and
  synchronous commits (the behaviour before chunking), for a before/after in one run;
* ``ddp`` (with ``--strategies``): torch's DistributedDataParallel itself, each rank running its
  K/P tasks as one batch with the same emulated delay (``Heterogeneity.sleep_batch``), exact
  through the coded hook's sample counts. ``--speeds 1,1,1,1 --jitter 0 --stall-prob 0 --strategies ddp,coded`` measures
  what the coded step costs on a homogeneous, quiet cluster.

Reported: median step time (per block: until the last rank is done, over the block length; with
the interquartile range over blocks) per strategy, each as a ratio to the
ideal bound (pooled capacity ``K / Σ 1/m_p`` plus the measured all-reduce), the speed-ups of coded
over the baselines, and the commit latency (median, p99) over all ranks. This is emulation on a
CPU: the ratios are the result, the absolute times are not (docs/design.md#how-we-measure).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from codedgrad import CodedDataParallel, StepReport
from codedgrad.emulate import Heterogeneity
from codedgrad.plan import capacity_time, choose_redundancy
from codedgrad.profile import WorkerProfile
from codedgrad.runtime import CodedHookState, coded_allreduce_hook

STRATEGIES = ("ddp", "uniform", "optimal", "coded_fine", "coded")


class PlainDDP:
    """The baseline a user has today: DDP over a uniform split, each rank's tasks as one batch.

    ``backward`` mirrors :meth:`CodedDataParallel.backward` for the benchmark loop: it runs this
    rank's contiguous share of the K tasks in one forward/backward, with the emulated delay of that
    many tasks (:meth:`Heterogeneity.sleep_batch`, the sum of the per-task delays the coded engine
    sleeps, in one sleep), and DDP's all-reduce (through the coded hook's sample counts, so that
    the gradient is the exact global-batch mean even when K is not a multiple of the world size).
    """

    def __init__(self, module: nn.Module, emulate: Heterogeneity, num_tasks: int, rank: int, world: int) -> None:
        self.module = module
        self._ddp = DistributedDataParallel(module)
        shares = [num_tasks // world + (r < num_tasks % world) for r in range(world)]
        self._ddp.register_comm_hook(CodedHookState(sample_counts=shares), coded_allreduce_hook)
        self._first, self._count = sum(shares[:rank]), shares[rank]
        self._emulate, self._rank, self._step = emulate, rank, 0

    def backward(self, batch_loss, num_tasks: int) -> StepReport:
        """``batch_loss(first, count)``: mean loss over tasks ``first .. first + count - 1``."""
        start = time.perf_counter()
        loss = batch_loss(self._ddp, self._first, self._count)
        self._emulate.sleep_batch(self._rank, self._step, self._count)
        loss.backward()
        report = StepReport(step=self._step, rank=self._rank, plan_version=0, num_tasks=num_tasks)
        report.step_time = report.time_to_decision = time.perf_counter() - start
        self._step += 1
        return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=64)
    # 80 ms for a speed-1 rank makes the fastest rank's task (20 ms) last about 50 commits on this
    # machine, the task size docs/design.md#facts-about-the-stack asks for; shorter tasks measure the commit.
    parser.add_argument("--base", type=float, default=0.08, help="mean task time of a speed-1 rank (s)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--block", type=int, default=4, help="consecutive steps of one strategy per round")
    parser.add_argument("--stall-prob", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=11, help="steps per strategy before measuring")
    parser.add_argument("--redundancy", type=float, help="coded Ω (default: codedgrad.plan.choose_redundancy)")
    parser.add_argument("--speeds", help="emulated speed per rank, comma-separated (default 1,1,2,4 on 4 ranks)")
    parser.add_argument("--jitter", type=float, default=0.5, help="exponential share of each task's mean time")
    parser.add_argument(
        "--strategies", default="uniform,optimal,coded", help=f"comma-separated, from {', '.join(STRATEGIES)}"
    )
    parser.add_argument(
        "--width", type=int, default=32, help="hidden width of the MLP (larger: more real compute per sample)"
    )
    parser.add_argument("--samples", type=int, default=4, help="samples per task")
    parser.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: 16-wide input MLP; cnn: a digits-sized CNN (8x8 images), for real compute per sample",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.speeds:
        speeds = [float(v) for v in args.speeds.split(",")]
        if len(speeds) != world:
            parser.error(f"--speeds: {len(speeds)} speeds for {world} ranks")
    else:
        speeds = [1.0, 1.0, 2.0, 4.0][:world] if world <= 4 else [1.0 + r % 4 for r in range(world)]
    chosen = args.strategies.split(",")
    if not set(chosen) <= set(STRATEGIES) or "coded" not in chosen:
        parser.error(f"--strategies: choose from {', '.join(STRATEGIES)}, including coded")
    emulate = Heterogeneity(speeds=speeds, base=args.base, jitter=args.jitter, stall_prob=args.stall_prob, seed=0)
    profiles = emulate.profiles()
    omega = args.redundancy or choose_redundancy(profiles, args.tasks, candidates=(1.0, 1.05, 1.1, 1.15, 1.2, 1.3))

    torch.manual_seed(0)
    n = args.samples
    if args.model == "cnn":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 64, args.width), nn.ReLU(), nn.Linear(args.width, 1),
        )  # fmt: skip
        x = torch.randn(args.tasks * n, 1, 8, 8)
    else:
        model = nn.Sequential(nn.Linear(16, args.width), nn.ReLU(), nn.Linear(args.width, 1))
        x = torch.randn(args.tasks * n, 16)
    y = torch.randn(args.tasks * n, 1)

    def task_loss_for(module: nn.Module):
        return lambda j: ((module(x[n * j : n * j + n]) - y[n * j : n * j + n]) ** 2).mean()

    def tasks_loss_for(module: nn.Module):  # batch_loss(ids): the mean over those tasks' samples
        def loss(ids: list[int]) -> torch.Tensor:
            rows = torch.cat([torch.arange(n * j, n * j + n) for j in ids])
            return ((module(x[rows]) - y[rows]) ** 2).mean()

        return loss

    def batch_loss(module: nn.Module, first: int, count: int) -> torch.Tensor:  # = mean of the task losses
        rows = slice(n * first, n * (first + count))
        return ((module(x[rows]) - y[rows]) ** 2).mean()

    homogeneous = [WorkerProfile(0.0, 1.0, 0.0)] * world
    replan = dict(replan_every=5, replan_threshold=0.03)
    # The baselines are static splits: no backups and no spare work. "optimal" and "coded" start
    # from the emulated profiles and re-plan from measured task times during the warm-up, which
    # also teaches them the per-task overhead (autograd, commit) the emulated profiles lack.
    strategies = {
        "uniform": dict(code="uncoded", redundancy=1.0, profiles=homogeneous, spare_work=False, replan_every=0),
        "optimal": dict(code="uncoded", redundancy=1.0, profiles=profiles, spare_work=False, **replan),
        # Spare work on explicitly, as on one device per rank, whatever "auto" resolves to (sleeps
        # take no compute, so it steals nothing here even with ranks sharing cores).
        "coded_fine": dict(code="repetition", redundancy=omega, profiles=profiles, spare_work=True, **replan),
        "coded": dict(code="repetition", redundancy=omega, profiles=profiles, spare_work=True, **replan),
    }
    engines = {}
    for name in STRATEGIES:  # in a fixed order: every rank builds the same engines, collectively
        if name == "ddp" and name in chosen:
            engines[name] = PlainDDP(copy.deepcopy(model), emulate, args.tasks, rank, world)
        elif name in chosen:
            engines[name] = CodedDataParallel(copy.deepcopy(model), emulate=emulate, timeout=60, **strategies[name])

    def step(name: str) -> StepReport:
        engine = engines[name]
        if name == "ddp":
            return engine.backward(batch_loss, args.tasks)
        if name == "coded":
            return engine.backward(tasks=args.tasks, batch_loss=tasks_loss_for(engine.module))
        return engine.backward(task_loss_for(engine.module), args.tasks)

    for _ in range(args.warmup):  # first plan, first collective, and re-plans from measurements
        for name in engines:
            step(name)
    # A strategy's step time is measured as throughput: a block of consecutive steps, from a common
    # start (barrier) until the *last* rank has finished the block, divided by the block length. The
    # no-wait release lets ranks run ahead of one another inside a block; taking the last rank's
    # finish keeps that honest.
    times: dict[str, list[float]] = {name: [] for name in engines}
    decision: dict[str, list[float]] = {name: [] for name in engines}
    allreduce, commits, task_seconds, round_trips = [], [], [], 0
    coded_commit, coded_exposed, chunks = 0.0, 0.0, []  # coded: commit time, the part the compute thread waited for
    release_lag: list[float] = []  # coded: from the decision to the end of the coded all-reduce
    for _ in range(args.rounds):
        for name in engines:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.block):
                report = step(name)
                decision[name].append(report.time_to_decision)
                if name != "ddp":  # DDP's all-reduce overlaps its backward; it is not timed apart
                    allreduce.append(report.allreduce_time)
                if name == "coded":
                    release_lag.append(report.release_lag)
                    coded_commit += sum(report.commit_seconds)
                    coded_exposed += report.commit_exposed
                    chunks.append(len(report.chunk_sizes))
                commits.extend(report.commit_seconds)
                round_trips += report.commit_round_trips
                task_seconds.extend(report.task_seconds)
            block = torch.tensor([(time.perf_counter() - start) / args.block])
            dist.all_reduce(block, op=dist.ReduceOp.MAX)
            times[name].append(float(block))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (commits, float(np.mean(task_seconds)), round_trips))
    lags: list = [None] * world
    dist.all_gather_object(lags, release_lag)
    overlap: list = [None] * world
    dist.all_gather_object(overlap, (coded_commit, coded_exposed, float(np.mean(chunks)) if chunks else 0.0))
    if rank == 0:
        all_commits = np.array([c for per_rank, *_ in everyone for c in per_rank])
        ideal = capacity_time(profiles, args.tasks) + float(np.median(allreduce))
        # The same bound with the per-task times the ranks really achieved here (emulated delay plus
        # forward/backward, commit and the scheduling of 4 ranks on few cores), for every strategy.
        achieved = [WorkerProfile(0.0, mean, 0.0) for _, mean, _ in everyone]
        ideal_achieved = capacity_time(achieved, args.tasks) + float(np.median(allreduce))
        summary = {
            "world_size": world,
            "speeds": speeds,
            "tasks": args.tasks,
            "redundancy": omega,
            "emulation": emulate.describe(),
            "ideal_seconds": ideal,
            "ideal_achieved_seconds": ideal_achieved,
            "mean_task_seconds": [mean for _, mean, _ in everyone],
            "strategies": {
                name: {
                    "median_seconds": float(np.median(t)),
                    "iqr_seconds": [float(np.quantile(t, 0.25)), float(np.quantile(t, 0.75))],
                    "ratio_to_ideal": float(np.median(t)) / ideal,
                    "ratio_to_ideal_achieved": float(np.median(t)) / ideal_achieved,
                    "median_decision_seconds": float(np.median(decision[name])),
                    "plan_version": getattr(engines[name], "plan_version", None),
                }
                for name, t in times.items()
            },
            # How many times faster coded is than each other strategy (median step over median step).
            "over_coded": {
                name: float(np.median(t) / np.median(times["coded"])) for name, t in times.items() if name != "coded"
            },
            "commit_median_ms": float(np.median(all_commits) * 1e3),
            "commit_p99_ms": float(np.quantile(all_commits, 0.99) * 1e3),
            "commit_round_trips": sum(trips for *_, trips in everyone) / all_commits.size,
            # From the decision to the end of the coded all-reduce, per rank and step, over the coded step.
            "release_lag_median_ms": float(np.median([lag for per_rank in lags for lag in per_rank]) * 1e3),
            "coded_commit_hidden_share": 1.0
            - sum(e for _, e, _ in overlap) / max(sum(c for c, _, _ in overlap), 1e-12),
            "coded_results_per_step": [c for *_, c in overlap],
            "release_lag_share": float(
                np.median([lag for per_rank in lags for lag in per_rank]) / np.median(times["coded"])
            ),
        }
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"{world} ranks, speeds {speeds}, K = {args.tasks}, coded Ω = {omega} ({emulate.describe()})")
            print(f"ideal bound (emulated capacity + measured all-reduce): {ideal * 1e3:.1f} ms")
            achieved_ms = ", ".join(f"{m * 1e3:.2f}" for _, m, _ in everyone)
            print(f"ideal bound with achieved per-task times ({achieved_ms} ms): {ideal_achieved * 1e3:.1f} ms")
            print(f"{'strategy':<10}{'median ms':>11}{'IQR ms':>17}{'/ ideal':>9}{'/ achieved':>12}{'decided ms':>12}")
            for name, entry in summary["strategies"].items():
                lo, hi = entry["iqr_seconds"]
                iqr = f"{lo * 1e3:.1f}–{hi * 1e3:.1f}"
                print(
                    f"{name:<10}{entry['median_seconds'] * 1e3:>11.1f}{iqr:>17}{entry['ratio_to_ideal']:>9.2f}"
                    f"{entry['ratio_to_ideal_achieved']:>12.2f}{entry['median_decision_seconds'] * 1e3:>12.1f}"
                )
            print(f"all-reduce (median over strategies): {np.median(allreduce) * 1e3:.2f} ms")
            print("   ".join(f"{name} / coded = {ratio:.2f}" for name, ratio in summary["over_coded"].items()))
            print(
                f"commit: median {summary['commit_median_ms']:.3f} ms, p99 {summary['commit_p99_ms']:.3f} ms, "
                f"{summary['commit_round_trips']:.2f} Store round trips, over {all_commits.size} commits of "
                f"{world} contending ranks"
            )
            print(
                f"coded: commit time hidden behind compute {summary['coded_commit_hidden_share'] * 100:.0f} %, "
                f"results (chunks + singles) per step per rank "
                + ", ".join(f"{c:.1f}" for c in summary["coded_results_per_step"])
            )
            print(
                f"release lag (decision to the end of the coded all-reduce): median "
                f"{summary['release_lag_median_ms']:.2f} ms = {summary['release_lag_share'] * 100:.2f} % "
                "of the coded step"
            )
    for engine in engines.values():
        if isinstance(engine, CodedDataParallel):
            engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
