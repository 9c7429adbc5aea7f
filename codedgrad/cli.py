"""The ``codedgrad`` command line (`docs/design.md, "Interfaces" <../docs/design.md#interfaces>`_).

``codedgrad plan``
    The optimal and uniform load splits of a job over the workers of a profile file, with each
    worker's expected finish time and cost, the predicted time to decode a step with the repetition
    code (simulated, seeded), and the lower bound on a job's time.
``codedgrad simulate``
    The mean in-order delay of a stream of jobs for several redundancies, with the optimal and the
    uniform split, against the ideal lower bound; optionally a plot. With ``--code NAME[,NAME…]``
    it compares gradient codes instead: the closed-loop training-step time of each code (its real
    queues and decoder, :mod:`codedgrad.codes.simulate`) against the capacity bound, so a user can
    pick a code before touching a GPU.

Workers come from ``--profile FILE`` (the profile file format, docs/design.md#interfaces) or from
``--preset NAME`` (:mod:`codedgrad.presets`), which also supplies the number of tasks, the arrival
rate, γ and the number of jobs; explicit flags override the preset. A preset's task times are
for its own number of tasks, so overriding ``--tasks`` changes the job size as well.

User errors print one line, ``codedgrad: error: <message>`` naming the field, and exit with status 2.
Options that do not apply to the chosen mode (``--plot``, ``--arrival-rate`` with ``--code``;
``--spare-work`` without it) are such errors rather than silently ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from codedgrad import plan, sim
from codedgrad.codes import CODE_NAMES, CodeError, make_code
from codedgrad.codes.simulate import compare_codes, simulate_code
from codedgrad.presets import PRESETS
from codedgrad.profile import ProfileError, WorkerProfile, load_profiles

__all__ = ["main"]

EXIT_USAGE = 2
DEFAULT_JOBS = 10_000
DEFAULT_CODE_STEPS = 500  # code comparison is an event simulation: fewer, costlier steps
DEFAULT_PLAN_STEPS = 500  # simulated steps behind plan's predicted step time (K = 1000: ~0.3 s each)
PREDICTION_CODE = "repetition"  # the runtime's default code


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage, so every error is one line."""

    def error(self, message: str) -> NoReturn:
        raise CliError(message)


@dataclass(frozen=True)
class _Setting:
    """The workers and workload after merging a preset with explicit flags."""

    profiles: list[WorkerProfile]
    tasks: int
    gamma: float
    arrival_rate: float | None
    jobs: int | None


def _redundancy_list(text: str) -> list[float]:
    """Parse ``1,1.05,1.1`` into floats, each finite and >= 1."""
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        raise CliError(f"redundancy: cannot read {text!r} as a comma-separated list of numbers") from None
    for value in values:
        if not (math.isfinite(value) and value >= 1):
            raise CliError(f"redundancy: must be finite and >= 1, got {value:g}")
    return values


def _setting(args: argparse.Namespace, max_redundancy: float) -> _Setting:
    """Merge ``--preset`` (if any) with the explicit flags; check what the library does not."""
    if args.profile is not None and args.preset is not None:
        raise CliError("profile: --profile and --preset are alternatives, give only one")
    if args.profile is None and args.preset is None:
        raise CliError("profile: give --profile FILE or --preset NAME")
    if args.preset is not None:
        preset = PRESETS[args.preset](max_redundancy)
        profiles, tasks, gamma = list(preset.profiles), preset.tasks, preset.gamma
        arrival_rate, jobs = preset.arrival_rate, preset.jobs
    else:
        profiles = load_profiles(args.profile)
        tasks, gamma, arrival_rate, jobs = None, 1.0, None, None
    tasks = args.tasks if args.tasks is not None else tasks
    if tasks is None:
        raise CliError("tasks: --tasks is required with --profile")
    gamma = args.gamma if args.gamma is not None else gamma
    if not (math.isfinite(gamma) and gamma >= 0):
        raise CliError(f"gamma: must be finite and >= 0, got {gamma:g}")
    if getattr(args, "arrival_rate", None) is not None:
        arrival_rate = args.arrival_rate
    if getattr(args, "jobs", None) is not None:
        jobs = args.jobs
    plan.total_slots(tasks, max_redundancy)  # raises PlanError naming tasks or redundancy
    return _Setting(profiles, tasks, gamma, arrival_rate, jobs)


def _number(value: float) -> str:
    """Compact, readable numbers for the tables (any scale)."""
    return f"{value:.5g}"


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise CliError(f"seed: must be >= 0, got {seed}")


def _predicted_step_times(s: _Setting, redundancy: float, steps: int, seed: int) -> dict:
    """Mean time to decode a step with the repetition code, simulated on the workers (seeded).

    The step is decoded when every task has a result (primaries and backups race; purging skips
    what is already done). The same random task times serve every variant (common random numbers):
    the optimal split, the uniform split (primaries and backups placed as for identical workers) and
    the optimal split with spare work (the runtime's default: idle ranks cover others' open tasks).

    Returns:
        ``{"code", "steps", "seed", "optimal", "optimal_stderr", "uniform", "uniform_stderr",
        "spare_work", "spare_work_stderr", "skipped"}``; with ``skipped`` (why no code can be built,
        e.g. fewer tasks than workers) the times are None.
    """
    document: dict = {"code": PREDICTION_CODE, "steps": steps, "seed": seed, "skipped": None}
    try:
        optimal = make_code(PREDICTION_CODE, len(s.profiles), s.tasks, redundancy, s.profiles, s.gamma)
        uniform = make_code(PREDICTION_CODE, len(s.profiles), s.tasks, redundancy, None, s.gamma)
    except CodeError as error:
        document["skipped"] = str(error)
        for key in ("optimal", "uniform", "spare_work"):
            document[key] = document[f"{key}_stderr"] = None
        return document
    for key, code, spare in (("optimal", optimal, False), ("uniform", uniform, False), ("spare_work", optimal, True)):
        times = simulate_code(code, s.profiles, steps=steps, seed=seed, spare_work=spare)
        document[key] = float(times.mean())
        document[f"{key}_stderr"] = float(times.std(ddof=1) / math.sqrt(steps)) if steps > 1 else math.nan
    return document


def _plus_minus(value: float, stderr: float) -> str:
    return _number(value) if not math.isfinite(stderr) else f"{_number(value)} ± {stderr:.2g}"


def _plan(args: argparse.Namespace) -> int:
    redundancy = args.redundancy
    if not (math.isfinite(redundancy) and redundancy >= 1):
        raise CliError(f"redundancy: must be finite and >= 1, got {redundancy:g}")
    if args.steps < 1:
        raise CliError(f"steps: must be >= 1, got {args.steps}")
    _check_seed(args.seed)
    s = _setting(args, redundancy)
    optimal = plan.optimal_split(s.profiles, s.tasks, redundancy, s.gamma)
    uniform = plan.uniform_split(s.profiles, s.tasks, redundancy)
    opt_stats = plan.split_statistics(s.profiles, optimal, s.gamma)
    uni_stats = plan.split_statistics(s.profiles, uniform, s.gamma)
    job_bound = plan.capacity_time(s.profiles, s.tasks)
    stream_bound = None if s.arrival_rate is None else plan.stream_lower_bound(s.profiles, s.tasks, s.arrival_rate)
    predicted = _predicted_step_times(s, redundancy, args.steps, args.seed)

    if args.json:
        document = {
            "tasks": s.tasks,
            "redundancy": redundancy,
            "gamma": s.gamma,
            "slots": int(optimal.sum()),
            "split": optimal.tolist(),
            "uniform": uniform.tolist(),
            "expected_finish": opt_stats.mean_finish.tolist(),
            "worker_cost": opt_stats.cost.tolist(),
            "cost": opt_stats.max_cost,
            "uniform_cost": uni_stats.max_cost,
            "lower_bound": job_bound,
            "step_time": predicted,
        }
        if stream_bound is not None:
            document["arrival_rate"] = s.arrival_rate
            document["stream_lower_bound"] = stream_bound
        print(json.dumps(document))
        return 0

    print(
        f"{len(s.profiles)} workers, K = {s.tasks} tasks, redundancy Ω = {redundancy:g} "
        f"({int(optimal.sum())} slots), γ = {s.gamma:g}"
    )
    header = ["worker", "shift", "mean", "std", "optimal", "uniform", "E[finish]", "cost", "E[finish] unif"]
    rows = [
        [
            str(p),
            *(_number(value) for value in (w.shift, w.mean, w.std)),
            str(optimal[p]),
            str(uniform[p]),
            *(_number(value) for value in (opt_stats.mean_finish[p], opt_stats.cost[p], uni_stats.mean_finish[p])),
        ]
        for p, w in enumerate(s.profiles)
    ]
    rows.append(["total", "", "", "", str(optimal.sum()), str(uniform.sum()), "", "", ""])
    _print_table(header, rows)
    print("E[finish] and cost are for the optimal split. cost = E[T] + γ·E[T²] of a worker's whole load")
    print("(its share of the K·Ω slots, backups included): what the split equalises, not a time. It grows")
    print("with Ω (more slots) while a step ends sooner: compare the predicted step times instead.")
    print(
        f"largest cost (the split's objective): optimal split {_number(opt_stats.max_cost)}, "
        f"uniform split {_number(uni_stats.max_cost)}"
    )
    if predicted["skipped"] is not None:
        print(f"predicted step time: not available ({predicted['skipped']})")
    else:
        print(
            f"predicted mean time to decode a step (every task has a result), {PREDICTION_CODE} code at "
            f"Ω = {redundancy:g}, {args.steps} simulated steps, seed {args.seed}:"
        )
        print(
            f"  optimal split {_plus_minus(predicted['optimal'], predicted['optimal_stderr'])}, "
            f"uniform split {_plus_minus(predicted['uniform'], predicted['uniform_stderr'])}, "
            f"optimal split with spare work (the runtime's default) "
            f"{_plus_minus(predicted['spare_work'], predicted['spare_work_stderr'])}"
        )
    print(f"lower bound on one job's time (all capacity pooled, no waste): {_number(job_bound)}")
    if stream_bound is not None:
        print(f"lower bound on the mean delay of a stream at λ = {s.arrival_rate:g}: {_number(stream_bound)}")
    return 0


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)).rstrip())


def _simulate(args: argparse.Namespace) -> int:
    redundancies = _redundancy_list(args.redundancy)
    _check_mode_options(args)
    s = _setting(args, max(redundancies))
    if args.code is not None:
        return _simulate_codes(args, s, redundancies)
    if s.arrival_rate is None:
        raise CliError("arrival_rate: --arrival-rate is required with --profile")
    jobs = DEFAULT_JOBS if s.jobs is None else s.jobs
    if jobs < 1:
        raise CliError(f"jobs: must be >= 1, got {jobs}")
    _check_seed(args.seed)
    if args.plot is not None:
        _check_plot_path(args.plot)  # before a long simulation, not after it
    lower_bound = plan.stream_lower_bound(s.profiles, s.tasks, s.arrival_rate)  # PlanError at/above capacity

    results = []
    runs = []  # (redundancy, optimal StreamResult, uniform StreamResult) for the plot
    for omega in redundancies:
        optimal = plan.optimal_split(s.profiles, s.tasks, omega, s.gamma)
        uniform = plan.uniform_split(s.profiles, s.tasks, omega)
        # The same seed for both splits: the same arrival times, a fairer comparison.
        opt = sim.simulate_stream(s.profiles, optimal, s.tasks, s.arrival_rate, jobs=jobs, seed=args.seed)
        uni = sim.simulate_stream(s.profiles, uniform, s.tasks, s.arrival_rate, jobs=jobs, seed=args.seed)
        runs.append((omega, opt, uni))
        results.append(
            {
                "redundancy": omega,
                "optimal": opt.mean_delay,
                "uniform": uni.mean_delay,
                "optimal_stable": opt.stable,
                "uniform_stable": uni.stable,
                "optimal_utilisation": opt.utilisation,
                "uniform_utilisation": uni.utilisation,
                "optimal_split": optimal.tolist(),
                "uniform_split": uniform.tolist(),
            }
        )

    if args.plot is not None:
        _plot(args.plot, runs, lower_bound)

    if args.json:
        document = {
            "lower_bound": lower_bound,
            "tasks": s.tasks,
            "arrival_rate": s.arrival_rate,
            "gamma": s.gamma,
            "jobs": jobs,
            "seed": args.seed,
            "results": results,
        }
        print(json.dumps(document))
        return 0

    print(
        f"{len(s.profiles)} workers, K = {s.tasks} tasks, λ = {s.arrival_rate:g} jobs per unit time, "
        f"{jobs} jobs, seed {args.seed}, γ = {s.gamma:g}"
    )
    print(
        f"mean in-order delay; lower bound = ideal pooled capacity, M/D/1 (Pollaczek–Khinchine): {_number(lower_bound)}"
    )
    header = ["redundancy", "optimal", "uniform", "lower bound", "optimal/bound", "uniform/optimal"]
    rows = []
    for r in results:
        rows.append(
            [
                f"{r['redundancy']:g}",
                _delay(r["optimal"], r["optimal_stable"]),
                _delay(r["uniform"], r["uniform_stable"]),
                _number(lower_bound),
                f"{r['optimal'] / lower_bound:.3f}",
                f"{r['uniform'] / r['optimal']:.3f}",
            ]
        )
    _print_table(header, rows)
    if not all(r["optimal_stable"] and r["uniform_stable"] for r in results):
        print("UNSTABLE: utilisation >= 1, the queue grows without bound; its mean delay grows with --jobs")
    if args.plot is not None:
        print(f"plot written to {args.plot}")
    return 0


def _check_mode_options(args: argparse.Namespace) -> None:
    """Reject options that the chosen mode of ``simulate`` would otherwise ignore."""
    if args.code is not None:
        if args.plot is not None:
            raise CliError("plot: --plot draws the stream simulation's delays; it cannot be used with --code")
        if args.arrival_rate is not None:
            raise CliError(
                "arrival_rate: --code simulates closed-loop training steps (each starts when the previous "
                "ends), which have no arrival rate; drop --arrival-rate or --code"
            )
    elif args.spare_work:
        raise CliError("spare_work: --spare-work applies to the code comparison only; add --code NAME[,NAME…]")


def _check_plot_path(path: str) -> None:
    """Reject a file name whose extension matplotlib cannot write, naming the option."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = path.rpartition(".")[2].lower() if "." in path.rpartition("/")[2] else ""
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in supported:
        raise CliError(
            f"plot: cannot write {path!r}: format {suffix!r} is not supported (use .{', .'.join(sorted(supported))})"
        )


def _simulate_codes(args: argparse.Namespace, s: _Setting, redundancies: list[float]) -> int:
    """Training-step time of each named code at each redundancy, on common random numbers."""
    names = [name.strip() for name in args.code.split(",")]
    for name in names:
        if name not in CODE_NAMES:
            raise CliError(f"code: unknown code {name!r}; choose from {', '.join(CODE_NAMES)}")
    steps = args.jobs if args.jobs is not None else DEFAULT_CODE_STEPS  # a preset's job count is for streams
    if steps < 1:
        raise CliError(f"jobs: must be >= 1, got {steps}")
    _check_seed(args.seed)
    bound = plan.training_step_lower_bound(s.profiles, s.tasks)
    # "uncoded" has no redundancy and always runs at Ω = 1: its row says which Ωs it stands for,
    # as the other codes' rows say why they were skipped.
    uncoded_for = [omega for omega in redundancies if omega != 1.0]
    rows, seen = [], set()
    for omega in redundancies:
        for row in compare_codes(
            s.profiles,
            s.tasks,
            omega,
            codes=names,
            steps=steps,
            seed=args.seed,
            gamma=s.gamma,
            spare_work=args.spare_work,
        ):
            key = (row["code"], row["redundancy"])
            if key not in seen:  # "uncoded" runs at Ω = 1 whatever was asked: list it once
                seen.add(key)
                row["note"] = None
                if row["code"] == "uncoded" and uncoded_for:
                    asked = ", ".join(f"{omega:g}" for omega in uncoded_for)
                    row["note"] = f"no redundancy: runs at Ω = 1, also for the Ω = {asked} asked"
                rows.append(row)
    if args.json:
        print(
            json.dumps(
                {"lower_bound": bound, "steps": steps, "seed": args.seed, "spare_work": args.spare_work, "codes": rows}
            )
        )
        return 0
    print(
        f"{len(s.profiles)} workers, K = {s.tasks} tasks, {steps} training steps, seed {args.seed}, γ = {s.gamma:g}"
        + (", idle ranks take spare work" if args.spare_work else "")
    )
    print(f"step time under the worker model; lower bound = pooled capacity: {_number(bound)}")
    table = []
    for row in rows:
        if row["skipped"] is not None:
            table.append([row["code"], f"{row['redundancy']:g}", "-", "-", "-", "-", row["skipped"]])
            continue
        table.append(
            [
                row["code"],
                f"{row['redundancy']:g}",
                _number(row["mean"]),
                _number(row["median"]),
                _number(row["p95"]),
                f"{row['mean'] / bound:.3f}",
                row["note"] or "",
            ]
        )
    _print_table(["code", "redundancy", "mean", "median", "p95", "mean/bound", "note"], table)
    return 0


def _delay(value: float, stable: bool) -> str:
    return _number(value) if stable else f"{_number(value)} UNSTABLE"


def _plot(path: str, runs: list[tuple[float, sim.StreamResult, sim.StreamResult]], lower_bound: float) -> None:
    """Two panels: mean delay against redundancy, and success rate against deadline."""
    # Figure without pyplot: no global state and no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    omegas = [omega for omega, _, _ in runs]
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    delay_ax, success_ax = fig.subplots(1, 2)
    delay_ax.plot(omegas, [opt.mean_delay for _, opt, _ in runs], "o-", label="optimal split")
    delay_ax.plot(omegas, [uni.mean_delay for _, _, uni in runs], "s--", label="uniform split")
    delay_ax.axhline(lower_bound, color="black", linestyle=":", label="lower bound")
    delay_ax.set_yscale("log")
    for axis_formatter in (delay_ax.yaxis.set_major_formatter, delay_ax.yaxis.set_minor_formatter):
        axis_formatter(ScalarFormatter())  # plain numbers (30, 40, 60) rather than 3×10¹ on a log axis
    delay_ax.set_xlabel("redundancy Ω")
    delay_ax.set_ylabel("mean in-order delay")
    delay_ax.set_title("Mean delay")
    delay_ax.legend()

    # Deadlines up to the 99th percentile of the slowest run, so every curve reaches ~1.
    top = max(float(np.quantile(result.service_times, 0.99)) for _, opt, uni in runs for result in (opt, uni))
    deadlines = np.linspace(0.0, top, 400)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for (omega, opt, uni), colour in zip(runs, colours):
        for result, style, split in ((opt, "-", "optimal"), (uni, "--", "uniform")):
            rate = sim.success_rate(result.service_times, deadlines)
            success_ax.plot(deadlines, rate, style, color=colour, label=f"{split}, Ω = {omega:g}")
    success_ax.set_xlabel("deadline d")
    success_ax.set_ylabel("share of jobs with service time ≤ d")
    success_ax.set_ylim(-0.02, 1.02)
    success_ax.set_title("Success rate")
    success_ax.legend(fontsize="small")
    try:
        fig.savefig(path, dpi=110)
    except OSError as error:
        raise CliError(f"plot: cannot write {path}: {error.strerror or error}") from None
    except ValueError as error:  # e.g. a format matplotlib cannot write: name the option, not only the library's text
        raise CliError(f"plot: cannot write {path}: {error}") from None


def _parser() -> _Parser:
    parser = _Parser(prog="codedgrad", description="Plan and simulate coded, heterogeneity-aware data parallelism.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--profile", metavar="FILE", help='worker profiles: {"workers": [{"shift", "mean", "std"}, …]}'
        )
        sub.add_argument("--preset", choices=sorted(PRESETS), help="a ready-made scenario instead of --profile")
        sub.add_argument("--tasks", type=int, metavar="K", help="tasks per job (supplied by a preset)")
        sub.add_argument("--gamma", type=float, metavar="G", help="weight of E[T²] in the cost (default 1)")
        sub.add_argument("--json", action="store_true", help="print JSON instead of a table")

    plan_cmd = commands.add_parser("plan", help="optimal and uniform load split of one job")
    common(plan_cmd)
    plan_cmd.add_argument("--redundancy", type=float, default=1.0, metavar="R", help="Ω >= 1 (default 1)")
    plan_cmd.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_PLAN_STEPS,
        metavar="N",
        help=f"simulated steps behind the predicted step time (default {DEFAULT_PLAN_STEPS})",
    )
    plan_cmd.add_argument("--seed", type=int, default=0, metavar="S", help="seed of that simulation (default 0)")
    plan_cmd.set_defaults(run=_plan)

    simulate_cmd = commands.add_parser("simulate", help="mean delay of a stream of jobs against redundancy")
    common(simulate_cmd)
    simulate_cmd.add_argument("--redundancy", required=True, metavar="R1,R2,…", help="redundancies to simulate")
    simulate_cmd.add_argument(
        "--arrival-rate", type=float, metavar="L", help="λ, jobs per unit time (stream simulation; not with --code)"
    )
    simulate_cmd.add_argument(
        "--jobs",
        type=int,
        metavar="J",
        help=f"jobs per stream simulation (default {DEFAULT_JOBS}, or the preset's); with --code, training "
        f"steps per code (default {DEFAULT_CODE_STEPS})",
    )
    simulate_cmd.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    simulate_cmd.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw delay and success-rate panels (stream simulation; not with --code)",
    )
    simulate_cmd.add_argument(
        "--code",
        metavar="NAME[,NAME…]",
        help=f"compare gradient codes' training-step times instead ({', '.join(CODE_NAMES)})",
    )
    simulate_cmd.add_argument(
        "--spare-work",
        action="store_true",
        help="with --code: idle ranks cover others' open tasks (the runtime's default)",
    )
    simulate_cmd.set_defaults(run=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``codedgrad`` command line.

    Args:
        argv: the arguments after the program name (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on a user error (one line on stderr).
    """
    try:
        args = _parser().parse_args(argv)
        return args.run(args)
    except (CliError, ProfileError, plan.PlanError, ValueError) as error:
        message = " ".join(str(error).split())  # one line, whatever the library's message looks like
        print(f"codedgrad: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # --help and --version exit through argparse
        return exit_.code if isinstance(exit_.code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
