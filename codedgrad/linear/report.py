"""One table and one plot of a measured comparison (:func:`codedgrad.linear.measure.compare` rows)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codedgrad import sim

__all__ = ["markdown_table", "plot", "ratio_table"]


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}"


def _moments(row: dict) -> str:
    if "predicted_moments" not in row:
        return "- | -"
    return f"{_ms(row['predicted_moments'])} | {row['measured'] / row['predicted_moments']:.3f}"


def markdown_table(rows: Sequence[dict]) -> str:
    """Measured against predicted mean in-order delay (ms), one line per (λ, Ω, split)."""
    lines = [
        "| λ (jobs/s) | Ω | split | loads | measured delay | predicted | measured / predicted | "
        "± sampling (1 sd) | predicted from sample moments | measured / that | lower bound | "
        "service: measured | predicted | late / cut / skipped tasks |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = r["measured"] / r["predicted"]
        lines.append(
            f"| {r['arrival_rate']:g} | {r['redundancy']:g} | {r['split']} | {r['loads']} | "
            f"{_ms(r['measured'])} ± {_ms(r['measured_stderr'])} | {_ms(r['predicted'])} | **{ratio:.3f}** | "
            f"{r['predicted_spread'] / r['predicted']:.1%} | {_moments(r)} | {_ms(r['lower_bound'])} | "
            f"{_ms(r['measured_service'])} | "
            f"{_ms(r['predicted_service'])} | {r['tasks_late']} / {r['tasks_interrupted']} / {r['tasks_skipped']} |"
        )
    return "\n".join(lines)


def ratio_table(rows: Sequence[dict]) -> str:
    """Uniform / optimal mean delay per (λ, Ω), measured and predicted."""
    by_key = {(r["arrival_rate"], r["redundancy"], r["split"]): r for r in rows}
    lines = ["| λ (jobs/s) | Ω | uniform / optimal, measured | predicted |", "|---|---|---|---|"]
    for (rate, omega, split), r in by_key.items():
        if split != "optimal" or (rate, omega, "uniform") not in by_key:
            continue
        u = by_key[(rate, omega, "uniform")]
        measured, predicted = u["measured"] / r["measured"], u["predicted"] / r["predicted"]
        lines.append(f"| {rate:g} | {omega:g} | **{measured:.2f}** | {predicted:.2f} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict], path: str) -> None:
    """Two panels: mean delay against Ω (measured points, predicted lines, lower bound), and the
    success rate against a deadline at the first arrival rate (measured solid, predicted dotted)."""
    # Figure without pyplot: no global state and no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    delay_ax, success_ax = fig.subplots(1, 2)
    rates = sorted({r["arrival_rate"] for r in rows})
    for i, rate in enumerate(rates):
        colour = f"C{i % 10}"
        for split, marker, style in (("optimal", "o", "-"), ("uniform", "s", "--")):
            chosen = sorted((r for r in rows if r["arrival_rate"] == rate and r["split"] == split), key=_omega)
            omegas = [r["redundancy"] for r in chosen]
            delay_ax.errorbar(
                omegas,
                [1e3 * r["measured"] for r in chosen],
                yerr=[1e3 * r["measured_stderr"] for r in chosen],
                fmt=marker,
                color=colour,
                label=f"λ = {rate:g}: {split}, measured",
            )
            delay_ax.plot(omegas, [1e3 * r["predicted"] for r in chosen], style, color=colour, alpha=0.6)
        bound = [r["lower_bound"] for r in rows if r["arrival_rate"] == rate]
        delay_ax.axhline(1e3 * float(np.mean(bound)), color=colour, linestyle=":", linewidth=1)
    delay_ax.set_xlabel("redundancy Ω")
    delay_ax.set_ylabel("mean in-order delay (ms)")
    delay_ax.set_title("Measured (points) and predicted (lines); lower bound dotted")
    delay_ax.legend(fontsize="small")

    first = [r for r in rows if r["arrival_rate"] == rates[0]]
    top = max(float(np.quantile(r["service_times"], 0.99)) for r in first)
    deadlines = np.linspace(0.0, top, 300)
    for i, r in enumerate(sorted(first, key=lambda r: (r["split"], _omega(r)))):
        colour = f"C{i % 10}"
        label = f"{r['split']}, Ω = {r['redundancy']:g}"
        measured = sim.success_rate(r["service_times"], deadlines)
        predicted = sim.success_rate(r["predicted_service_times"], deadlines)
        success_ax.plot(1e3 * deadlines, measured, "-", color=colour, label=label)
        success_ax.plot(1e3 * deadlines, predicted, ":", color=colour)
    success_ax.set_xlabel("deadline (ms)")
    success_ax.set_ylabel("share of jobs with service time ≤ deadline")
    success_ax.set_ylim(-0.02, 1.02)
    success_ax.set_title(f"Success rate at λ = {rates[0]:g} (measured solid, predicted dotted)")
    success_ax.legend(fontsize="small")
    fig.savefig(path, dpi=90)


def _omega(row: dict) -> float:
    return row["redundancy"]
