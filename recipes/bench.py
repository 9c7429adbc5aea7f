"""``make bench``: the alternatives to plain DDP on real models, EMULATED clusters, strategies interleaved.

    OMP_NUM_THREADS=1 flock /tmp/codedgrad-bench.lock \\
        torchrun --standalone --nproc-per-node 4 recipes/bench.py [overrides]

One torchrun run. For each workload (the digits CNN, the character transformer) the ranks first
measure their real forward+backward time for a few batch sizes and one gradient all-reduce; then,
for each cluster profile (``conf/cluster/*.yaml`` in compute mode: a rank of speed s takes s_max/s
times its measured compute, times seeded noise), every strategy runs a warm-up (with an exactness
check against a single process on the same global batch) and then blocks of steps, interleaved
A B C A B C, so that the shared machine's drift hits every strategy alike. Reported per workload ×
profile × strategy: median and p90 step time, the ratio to the ideal bound (pooled capacity with each
rank at its best batch size, plus one all-reduce), speed-ups over ``ddp`` and ``balanced``. Then, on
digits, time to a target validation accuracy for ``ddp``/``balanced``/``coded`` (training interleaved
the same way). Writes ``bench.json``, ``bench.png`` and ``accuracy.png`` under
``outputs/bench/<timestamp>/``. See docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from codedgrad.recipes.bench import (
    EXACT,
    STRATEGIES,
    CostCurve,
    StepInfo,
    Workload,
    balanced_counts,
    build_strategy,
    build_workload,
    code_provenance,
    ideal_bound,
    load_cluster,
    measure_allreduce,
    measure_compute,
    predicted_step,
    reference_gradient,
    relative_error,
    unit_factors,
)
from codedgrad.recipes.emulation import build_emulation

CONF = Path(__file__).resolve().parent.parent / "conf"


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(f"[bench] {message}", flush=True)


def gather(value: Any) -> list[Any]:
    """``value`` from every rank (a collective)."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def global_max(values: list[float]) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def emulation(cfg: DictConfig, name: str, base: float, change_step: int):
    """The profile ``name`` of ``cfg.profiles`` as a compute-mode emulation for this job."""
    spec = dict(cfg.profiles[name])
    cluster = load_cluster(spec.pop("cluster"), CONF)
    cluster.update(spec)
    cluster.update(mode="compute", base=base)  # base: a task's real compute, the planner's prior only
    if cluster.get("change_step") is not None:
        cluster["change_step"] = change_step  # within the run: the middle of the measured steps
    het = build_emulation(cluster, dist.get_world_size())
    assert het is not None, f"profiles.{name}: the cluster is disabled"
    return het


def engine_report(infos: list[StepInfo]) -> dict[str, float]:
    """This rank's means over its measured steps of what the engine's reports say (empty for DDP)."""
    rows = [i.report for i in infos if i.report is not None]
    out: dict[str, float] = {}
    if rows:
        fields = (
            "computed", "used", "spare", "purged", "time_to_decision", "time_waited", "emulated_seconds",
            "allreduce_time", "release_lag", "commit_exposed",
        )  # fmt: skip
        out = {f: float(np.mean([_count(getattr(r, f, math.nan)) for r in rows])) for f in fields}
        tasks = [t for r in rows for t in getattr(r, "task_seconds", [])]
        out["task_seconds"] = float(np.mean(tasks)) if tasks else math.nan
        out["calls"] = float(np.mean([len(getattr(r, "task_seconds", ())) for r in rows]))
        if all(hasattr(r, "plan_version") for r in rows):  # the engines': how often the plan moved
            out["direct"] = float(np.mean([bool(getattr(r, "direct", False)) for r in rows]))
            versions = [r.plan_version for r in rows]
            out["plan_switches"] = float(sum(a != b for a, b in itertools.pairwise(versions)))
    for key in {k for i in infos for k in i.extra}:
        out[key] = float(np.mean([i.extra.get(key, math.nan) for i in infos]))
    return out


def _count(value: Any) -> float:
    """A report field as a number: a tuple of tasks (the baselines' ``computed``) counts its length."""
    return float(len(value)) if isinstance(value, tuple) else float(value)


def run_profile(cfg: DictConfig, workload: Workload, curve: CostCurve, allreduce: float, name: str) -> dict:
    """Every strategy on one cluster profile: warm-up with exactness checks, then interleaved blocks."""
    K = workload.num_tasks
    measured = cfg.rounds * cfg.block
    het = emulation(cfg, name, curve(1), cfg.warmup + measured // 2)
    factors = unit_factors(het)
    counts = balanced_counts(curve, factors, K)
    strategies = {}
    for s in cfg.strategies:  # the same order on every rank: the constructors are collective
        module = copy.deepcopy(workload.model)
        strategies[s] = build_strategy(s, module, het, K, counts, OmegaConf.to_container(cfg.engine))
    errors: dict[str, list[float]] = {s: [] for s in strategies}
    for step in range(cfg.warmup):  # first plans, re-plans from measurements, exactness checks
        loss_for = workload.loss_for(step)
        for s, strategy in strategies.items():
            check = step >= cfg.warmup - cfg.exact_checks
            reference = reference_gradient(strategy.module, loss_for, K) if check else None
            strategy.module.zero_grad(set_to_none=True)
            strategy.backward(loss_for)
            if reference is not None:
                errors[s].append(relative_error(strategy.module, reference))
    step_times: dict[str, list[float]] = {s: [] for s in strategies}
    reports: dict[str, list[StepInfo]] = {s: [] for s in strategies}
    probes: list[tuple[float, ...]] = []
    allreduces: list[float] = []
    for r in range(cfg.rounds):
        for s, strategy in strategies.items():
            dist.barrier()
            start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the ranks of one machine
            ends = []
            for i in range(cfg.block):
                step = cfg.warmup + r * cfg.block + i
                strategy.module.zero_grad(set_to_none=True)
                info = strategy.backward(workload.loss_for(step))
                ends.append(time.perf_counter())
                reports[s].append(info)
            # A step ends when its last rank is done: per-step times from the latest rank's end times.
            marks = global_max([start, *ends])
            step_times[s].extend(np.diff(marks).tolist())
        # The ideal bound's inputs, measured in the same round: the machine's load then is the strategies'.
        probes.append(measure_compute(workload.model, workload, curve.sizes, repeats=1).seconds)
        allreduces.append(measure_allreduce(workload.model, repeats=3))
    for strategy in strategies.values():
        strategy.close()
    worst = {s: max(global_max([max(e) if e else math.nan])) if e else math.nan for s, e in errors.items()}
    per_rank = gather({s: engine_report(reports[s]) for s in strategies})
    # Every rank's probes of every round: the median is the compute curve under the run's load.
    seen = np.array([row for rows in gather(probes) for row in rows])
    during = CostCurve(curve.sizes, tuple(float(v) for v in np.median(seen, axis=0)))
    allreduce_during = float(np.median([a for rows in gather(allreduces) for a in rows]))
    steps = range(cfg.warmup, cfg.warmup + measured)
    ideal = float(np.mean([ideal_bound(during, unit_factors(het, i), K, allreduce_during) for i in steps]))
    before = float(np.mean([ideal_bound(curve, unit_factors(het, i), K, allreduce) for i in steps]))
    result: dict[str, Any] = {
        "emulation": het.describe(),
        "ideal_seconds": ideal,
        "ideal_seconds_warmup_curve": before,
        "compute_curve_during": {"sizes": during.sizes, "seconds": during.seconds},
        "allreduce_seconds_during": allreduce_during,
        "best_batch_tasks": during.best_throughput()[0],
        "balanced_counts": counts,
        "balanced_predicted_seconds": predicted_step(curve, factors, counts, allreduce),
        "strategies": {},
    }
    medians = {s: float(np.median(t)) for s, t in step_times.items()}
    for s, times in step_times.items():
        entry = {
            "median_seconds": medians[s],
            "p90_seconds": float(np.quantile(times, 0.9)),
            "ratio_to_ideal": medians[s] / ideal,
            "speedup_over_ddp": medians["ddp"] / medians[s] if "ddp" in medians else math.nan,
            "speedup_over_balanced": medians["balanced"] / medians[s] if "balanced" in medians else math.nan,
            "step_seconds": times,
            "exact": s in EXACT,
            "gradient_relative_error": worst[s],
            "per_rank": [rank_info[s] for rank_info in per_rank],
        }
        result["strategies"][s] = entry
    return result


def time_to_accuracy(cfg: DictConfig, workload: Workload, curve: CostCurve) -> dict:
    """Train ``cfg.accuracy.strategies`` from the same start, interleaved in blocks; accuracy against wall time."""
    acc = cfg.accuracy
    K = workload.num_tasks
    het = emulation(cfg, acc.profile, curve(1), 10**9)
    counts = balanced_counts(curve, unit_factors(het), K)
    strategies, optimizers = {}, {}
    for s in acc.strategies:
        module = copy.deepcopy(workload.model)
        strategies[s] = build_strategy(s, module, het, K, counts, OmegaConf.to_container(cfg.engine))
        optimizers[s] = torch.optim.SGD(module.parameters(), lr=acc.lr, momentum=acc.momentum)
    wall = dict.fromkeys(strategies, 0.0)
    curves: dict[str, list[tuple[float, int, float]]] = {s: [] for s in strategies}
    reached: dict[str, float | None] = dict.fromkeys(strategies, None)
    steps = 0
    while steps < acc.max_steps:
        for s, strategy in strategies.items():
            dist.barrier()
            start = time.perf_counter()
            for i in range(acc.block):
                optimizers[s].zero_grad(set_to_none=True)
                strategy.backward(workload.loss_for(steps + i))
                optimizers[s].step()
            wall[s] += global_max([time.perf_counter() - start])[0]
            accuracy = workload.accuracy(strategy.module)
            curves[s].append((wall[s], steps + acc.block, accuracy))
            if reached[s] is None and accuracy >= acc.target:
                reached[s] = wall[s]
        steps += acc.block
        done = [all(v is not None for v in reached.values())]
        dist.broadcast_object_list(done, src=0)  # rank 0's accuracies decide, for every rank alike
        if done[0]:
            break
    for strategy in strategies.values():
        strategy.close()
    return {
        "profile": acc.profile,
        "emulation": het.describe(),
        "target": acc.target,
        "seconds_to_target": reached,
        "curves": curves,
        "steps": steps,
        "balanced_counts": counts,
    }


def table(results: dict) -> str:
    lines = []
    head = f"{'strategy':<13}{'median ms':>10}{'p90 ms':>9}{'/ideal':>8}{'x ddp':>7}{'x bal':>7}{'grad err':>10}"
    for wname, w in results["workloads"].items():
        for pname, p in w["profiles"].items():
            lines.append(
                f"\n{wname} / {pname}: ideal {p['ideal_seconds'] * 1e3:.1f} ms, balanced counts "
                f"{p['balanced_counts']} (predicted {p['balanced_predicted_seconds'] * 1e3:.1f} ms)"
            )
            lines.append(head)
            for s, e in p["strategies"].items():
                lines.append(
                    f"{s:<13}{e['median_seconds'] * 1e3:>10.1f}{e['p90_seconds'] * 1e3:>9.1f}"
                    f"{e['ratio_to_ideal']:>8.2f}{e['speedup_over_ddp']:>7.2f}{e['speedup_over_balanced']:>7.2f}"
                    f"{e['gradient_relative_error']:>10.1e}"
                )
    if results.get("accuracy"):
        a = results["accuracy"]
        lines.append(f"\ntime to {a['target']:.0%} validation accuracy ({a['profile']}):")
        for s, t in a["seconds_to_target"].items():
            lines.append(f"  {s:<10}" + ("not reached" if t is None else f"{t:.1f} s"))
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    workloads = results["workloads"]
    fig = Figure(figsize=(6 * max(1, len(workloads)), 4.5))
    axes = fig.subplots(1, max(1, len(workloads)), squeeze=False)[0]
    for ax, (wname, w) in zip(axes, workloads.items()):
        profiles = list(w["profiles"])
        strategies = list(next(iter(w["profiles"].values()))["strategies"]) if profiles else []
        width = 0.8 / max(1, len(strategies))
        for i, s in enumerate(strategies):
            ratios = [w["profiles"][p]["strategies"][s]["ratio_to_ideal"] for p in profiles]
            ax.bar(np.arange(len(profiles)) + i * width, ratios, width, label=s)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(profiles)) + 0.4 - width / 2, profiles)
        ax.set_ylabel("median step time / ideal bound")
        ax.set_title(f"{wname}: EMULATED clusters (compute mode)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=120)
    if results.get("accuracy"):
        a = results["accuracy"]
        fig = Figure(figsize=(7.5, 4.5))
        ax = fig.subplots()
        for s, points in a["curves"].items():
            ax.plot([0, *(p[0] for p in points)], [math.nan, *(p[2] for p in points)], marker=".", label=s)
        ax.axhline(a["target"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("training wall time (s, interleaved blocks)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"digits CNN, EMULATED {a['profile']} (compute mode)", fontsize=10)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=120)


def finite(value: Any) -> Any:
    """NaN and infinities as None, so that the JSON is strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=cfg.engine.timeout))
    world = dist.get_world_size()
    unknown = [s for s in cfg.strategies if s not in STRATEGIES]
    if unknown:  # before any collective or measurement
        raise SystemExit(f"strategies: unknown {', '.join(unknown)} (known: {', '.join(STRATEGIES)})")
    stamp = [datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")]
    dist.broadcast_object_list(stamp, src=0)
    out = Path(cfg.out_dir) / stamp[0]
    log(f"{world} ranks, strategies {list(cfg.strategies)}, profiles {list(cfg.run_profiles)}; EMULATED clusters")
    code = code_provenance() if dist.get_rank() == 0 else {}  # git runs once, where the results are written
    if code:
        log(f"codedgrad from {code['package']} at {code['commit']}{' with changes' if code['dirty'] else ''}")
        here = Path(__file__).resolve().parent.parent
        if not Path(code["package"]).is_relative_to(here):
            log(f"codedgrad is not this script's ({here}): set PYTHONPATH={here} to measure this tree's code")
    started = time.perf_counter()
    results: dict[str, Any] = {
        "world_size": world,
        "code": code,
        "config": OmegaConf.to_container(cfg),
        "workloads": {},
    }
    for wname in cfg.run_workloads:
        workload = build_workload(cfg.workloads[wname], seed=cfg.seed)
        sizes = sorted({min(n, workload.num_tasks) for n in cfg.sizes})
        mine = measure_compute(workload.model, workload, sizes, cfg.repeats)
        everyone = gather(mine.seconds)
        # Identical processes on one machine: the ranks' median is the compute curve (its noise halved).
        curve = CostCurve(mine.sizes, tuple(float(v) for v in np.median(np.array(everyone), axis=0)))
        allreduce = measure_allreduce(workload.model)
        log(
            f"{wname}: K={workload.num_tasks} tasks of {workload.samples_per_task} samples; compute per batch "
            + ", ".join(f"{n}: {s * 1e3:.2f} ms" for n, s in zip(curve.sizes, curve.seconds))
            + f"; all-reduce {allreduce * 1e3:.2f} ms"
        )
        entry: dict[str, Any] = {
            "num_tasks": workload.num_tasks,
            "samples_per_task": workload.samples_per_task,
            "compute_curve": {"sizes": curve.sizes, "seconds": curve.seconds, "per_rank": everyone},
            "allreduce_seconds": allreduce,
            "profiles": {},
        }
        for pname in cfg.run_profiles:
            entry["profiles"][pname] = run_profile(cfg, workload, curve, allreduce, pname)
            p = entry["profiles"][pname]
            log(
                f"{wname} / {pname}: " + ", ".join(f"{s} {e['ratio_to_ideal']:.2f}" for s, e in p["strategies"].items())
            )
        results["workloads"][wname] = entry
    if cfg.accuracy.enabled:
        spec = OmegaConf.to_container(cfg.workloads[cfg.accuracy.workload])
        spec.update(num_tasks=cfg.accuracy.num_tasks, samples_per_task=cfg.accuracy.samples_per_task)
        workload = build_workload(spec, seed=cfg.seed)
        # Its batches differ from the step benchmark's: balanced's counts come from their own measurement.
        sizes = sorted({min(n, workload.num_tasks) for n in cfg.sizes})
        mine = measure_compute(workload.model, workload, sizes, cfg.repeats)
        curve = CostCurve(mine.sizes, tuple(float(v) for v in np.median(np.array(gather(mine.seconds)), axis=0)))
        results["accuracy"] = time_to_accuracy(cfg, workload, curve)
    results["total_seconds"] = time.perf_counter() - started
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(finite(results), indent=1) + "\n")
        plot(results, out)
        print(table(results))
        print("\n[bench] EMULATED heterogeneity on one shared CPU machine: read the ratios, not the times.")
        print(f"[bench] wrote {out / 'bench.json'}, {out / 'bench.png'}; total {results['total_seconds']:.0f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
