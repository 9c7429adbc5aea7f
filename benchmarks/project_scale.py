"""Project the coded step's commit cost to 128–1024 ranks with the model of ``codedgrad.codes.commit_cost``.

    .venv/bin/python benchmarks/project_scale.py                      # the fitted constants (FITTED)
    .venv/bin/python benchmarks/project_scale.py --fit outputs/scale/<timestamp>/scale.json

With ``--fit``, the model is first fitted to a sweep of ``bench_scale.py`` (its coordination-only
rows: each rank's mean task time from the emulation, the mean commit latency, the Store operations
per commit; the server's time per operation from the capacity phase, ``1 / most gets per second``),
and the fit is printed next to the measurements, with the constants to put into ``FITTED``. Only
the small world sizes are fitted (``--fit-ranks``, default 4 and 8): at 16 and 32 processes on 2
cores the round trip measures the VM's scheduling, which a real cluster (cores for its ranks) does
not have; the printout shows how the retry model does there at the round trip actually measured.

Then, for a homogeneous cluster committing once per task, it prints the share of a rank's time
spent committing for P = 128 … 1024 and task sizes 10 ms … 1 s, and per task size the smallest world
size at which that share passes 1 %, for today's protocol (``cas``) and for the race-free one of
docs/scale.md (``counters``), and writes ``projection.json`` and ``projection.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

from codedgrad.codes.commit_cost import (
    FITTED,
    CommitCostModel,
    CommitProtocol,
    commit_latency,
    crossing_world_size,
    expected_round_trips,
    fit_commit_model,
)

WORLD_SIZES = (128, 256, 512, 1024)
TASK_SECONDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def _gaps(row: dict) -> list[float]:
    """Each rank's mean task time in a bench_scale launch (speeds 1 + r % 4, no stalls)."""
    return [row["base_s"] / (1.0 + r % 4) for r in range(row["world_size"])]


def fit(path: Path, fit_ranks: list[int], service: float | None) -> tuple[CommitCostModel, list[dict]]:
    rows = json.loads(path.read_text())["rows"]
    rows = [r for r in rows if "coord" in r]
    chosen = [r for r in rows if r["world_size"] in fit_ranks and r["nodes"] == 1]
    if not chosen:
        raise SystemExit(f"{path}: no single-node coordination row with P in {fit_ranks} to fit")
    capacity = [r["capacity"]["max_ops_per_second"] for r in rows if "capacity" in r]
    if service is None and capacity:
        service = 1.0 / max(capacity)
    observations = [
        (_gaps(r), r["coord"]["commit_mean_ms"] / 1e3, r["coord"]["store_ops"] / r["coord"]["commits"]) for r in chosen
    ]
    model = fit_commit_model(observations, service=service)
    report = []
    for r in rows:
        c, gaps = r["coord"], _gaps(r)
        est = commit_latency(model, r["world_size"], gaps)
        measured_rtt = c["commit_mean_ms"] / 1e3 / c["round_trips_per_commit"]
        report.append(
            {
                "world_size": r["world_size"],
                "nodes": r["nodes"],
                "fitted_on": r in chosen,
                "cpu_idle": c["cpu"]["idle_mean"],
                "latency_ms": c["commit_mean_ms"],
                "model_latency_ms": est.latency * 1e3,
                "round_trips": c["round_trips_per_commit"],
                "model_round_trips": est.round_trips,
                # The retry model alone at the round trip this launch really had (latency / attempts).
                "round_trips_at_measured_rtt": expected_round_trips(r["world_size"], gaps, measured_rtt),
                "measured_rtt_ms": measured_rtt * 1e3,
                "share_of_busy": c.get("commit_share_of_busy"),
                "model_share": est.share,
            }
        )
    return model, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fit", type=Path, help="a bench_scale.py scale.json to fit the model to")
    parser.add_argument(
        "--fit-ranks", default="4,8", help="world sizes to fit on (those whose round trip the VM does not inflate)"
    )
    parser.add_argument(
        "--service", type=float, help="the server's seconds per operation (default: from the sweep's capacity phase)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: next to --fit, else outputs/scale)")
    parser.add_argument("--share", type=float, default=0.01, help="the cost share whose crossing is reported")
    args = parser.parse_args()
    model, report = FITTED, []
    if args.fit:
        model, report = fit(args.fit, [int(p) for p in args.fit_ranks.split(",")], args.service)
        print(f"fitted: {model}")
        print(f"{'P':>4}{'nodes':>6}{'fit':>5}{'idle':>6}{'lat ms':>9}{'model':>8}{'trips':>7}{'model':>7}"
              f"{'@rtt':>7}{'rtt ms':>8}")  # fmt: skip
        for r in report:
            print(
                f"{r['world_size']:>4}{r['nodes']:>6}{'yes' if r['fitted_on'] else 'no':>5}{r['cpu_idle']:>6.0%}"
                f"{r['latency_ms']:>9.3f}{r['model_latency_ms']:>8.3f}{r['round_trips']:>7.2f}"
                f"{r['model_round_trips']:>7.2f}{r['round_trips_at_measured_rtt']:>7.2f}{r['measured_rtt_ms']:>8.3f}"
            )
    out = args.out or (args.fit.parent if args.fit else Path("outputs/scale"))
    out.mkdir(parents=True, exist_ok=True)
    models = {protocol: dataclasses.replace(model, protocol=protocol) for protocol in CommitProtocol}
    result: dict = {"model": {**vars(model), "protocol": model.protocol.value}, "fit": report, "share": args.share}
    crossings_by_protocol = {}
    for protocol, variant in models.items():
        grid = {t: {p: commit_latency(variant, p, t) for p in WORLD_SIZES} for t in TASK_SECONDS}
        crossings = {t: crossing_world_size(variant, t, args.share) for t in TASK_SECONDS}
        crossings_by_protocol[protocol] = crossings
        print(f"\nprotocol {protocol.value}: share of a rank's time spent committing (homogeneous cluster, "
              f"one commit per task); first P above {args.share:.0%}")  # fmt: skip
        header = "".join(f"{f'P={p}':>10}" for p in WORLD_SIZES)
        print(f"{'task':>8}{header}{'> ' + format(args.share, '.0%'):>10}")
        for t in TASK_SECONDS:
            cells = "".join(f"{grid[t][p].share:>10.2%}" for p in WORLD_SIZES)
            crossing = crossings[t]
            print(f"{t * 1e3:>6g}ms{cells}{'never' if crossing is None else crossing:>10}")
        result[protocol.value] = {
            "crossings": {str(t): c for t, c in crossings.items()},
            "grid": {
                str(t): {
                    str(p): {k: (v if math.isfinite(v) else None) for k, v in vars(e).items()} for p, e in row.items()
                }
                for t, row in grid.items()
            },
        }
    (out / "projection.json").write_text(json.dumps(result, indent=2))
    plot(models, report, crossings_by_protocol, args.share, out / "projection.png")
    print(f"wrote {out}/projection.json, projection.png")


def plot(models: dict, report: list[dict], crossings: dict, share: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({round(2 ** (e / 4)) for e in range(4, 41)})  # 2 … 1024
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (protocol, model), style in zip(models.items(), ("-", "--")):
        for t, colour in zip(TASK_SECONDS, colours):
            label = f"task {t * 1e3:g} ms" if protocol is CommitProtocol.CAS else None
            shares = [100 * commit_latency(model, p, t).share for p in sizes]
            left.plot(sizes, shares, style, color=colour, label=label)
        ts = list(TASK_SECONDS)
        ys = [crossings[protocol][t] if crossings[protocol][t] is not None else float("nan") for t in ts]
        right.plot([t * 1e3 for t in ts], ys, "o" + style, label=f"{protocol.value}")
    measured = [r for r in report if r["share_of_busy"] is not None and r["nodes"] == 1]
    if measured:
        left.plot([r["world_size"] for r in measured], [100 * r["share_of_busy"] for r in measured], "k*",
                  markersize=10, label="measured (tasks 25–100 ms, 2-core VM)")  # fmt: skip
    left.axhline(100 * share, color="red", linewidth=0.8, label=f"{share:.0%}")
    left.set(xscale="log", yscale="log", xlabel="ranks P", ylabel="commit share of the ranks' time (%)")
    left.set_xscale("log", base=2)
    left.set_title("projected commit cost: solid CAS on one key (today), dashed race-free counters")
    left.title.set_fontsize(9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.set(xscale="log", yscale="log", xlabel="task time (ms)", ylabel=f"first P with share > {share:.0%}")
    right.set_title(f"where coordination passes {share:.0%} of a step")
    right.legend()
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
