"""The ``codedgrad`` command line: tables, JSON documents, the plot and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codedgrad import cli, plan
from codedgrad.codes import make_code
from codedgrad.codes.simulate import simulate_code
from codedgrad.presets import paper_preset
from codedgrad.profile import WorkerProfile, save_profiles

PROFILES = [WorkerProfile(0.0, 1.0, 1.0), WorkerProfile(0.5, 0.5, 0.2), WorkerProfile(0.0, 2.0, 2.0)]


@pytest.fixture
def profile_file(tmp_path: Path) -> Path:
    path = tmp_path / "workers.json"
    save_profiles(path, PROFILES)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --- plan ----------------------------------------------------------------------------------------


def test_plan_json(capsys, profile_file) -> None:
    status, out, err = run(capsys, "plan", "--profile", profile_file, "--tasks", 40, "--redundancy", 1.25, "--json")
    assert status == 0 and err == ""
    document = json.loads(out)
    expected = plan.optimal_split(PROFILES, 40, 1.25)
    assert document["split"] == expected.tolist()
    assert sum(document["split"]) == 50
    assert document["uniform"] == plan.uniform_split(PROFILES, 40, 1.25).tolist()
    assert document["cost"] == pytest.approx(plan.split_statistics(PROFILES, expected).max_cost)
    assert document["cost"] < document["uniform_cost"]
    assert document["lower_bound"] == pytest.approx(plan.capacity_time(PROFILES, 40))
    assert len(document["expected_finish"]) == len(PROFILES)


def test_plan_gamma_changes_the_split(capsys, profile_file) -> None:
    splits = []
    for gamma in ("0", "5"):
        status, out, _ = run(capsys, "plan", "--profile", profile_file, "--tasks", 40, "--gamma", gamma, "--json")
        assert status == 0
        splits.append(json.loads(out)["split"])
    assert splits[0] == plan.optimal_split(PROFILES, 40, gamma=0.0).tolist()
    assert splits[1] == plan.optimal_split(PROFILES, 40, gamma=5.0).tolist()


def test_plan_table(capsys, profile_file) -> None:
    status, out, err = run(capsys, "plan", "--profile", profile_file, "--tasks", 40, "--redundancy", 1.25)
    assert status == 0 and err == ""
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["worker"])
    for column in ("shift", "mean", "std", "optimal", "uniform", "E[finish]", "cost"):
        assert column in header
    split = plan.optimal_split(PROFILES, 40, 1.25)
    uniform = plan.uniform_split(PROFILES, 40, 1.25)
    rows = lines[lines.index(header) + 1 : lines.index(header) + 1 + len(PROFILES)]
    for p, row in enumerate(rows):
        cells = row.split()
        assert cells[0] == str(p)
        assert [int(cells[4]), int(cells[5])] == [split[p], uniform[p]]
    assert "lower bound" in out


def test_plan_with_the_paper_preset(capsys) -> None:
    status, out, _ = run(capsys, "plan", "--preset", "paper", "--redundancy", 1.05, "--json")
    assert status == 0
    document = json.loads(out)
    preset = paper_preset(1.05)
    assert document["split"] == plan.optimal_split(preset.profiles, preset.tasks, 1.05, preset.gamma).tolist()
    assert document["stream_lower_bound"] == pytest.approx(
        plan.stream_lower_bound(preset.profiles, preset.tasks, preset.arrival_rate)
    )
    # An explicit flag overrides the preset.
    status, out, _ = run(capsys, "plan", "--preset", "paper", "--tasks", 100, "--json")
    assert status == 0 and sum(json.loads(out)["split"]) == 100


def test_plan_predicts_the_step_time_and_redundancy_shortens_it(capsys, profile_file) -> None:
    documents = {}
    for omega in (1.0, 1.25):
        status, out, _ = run(capsys, "plan", "--profile", profile_file, "--tasks", 40, "--redundancy", omega, "--json")
        assert status == 0
        documents[omega] = json.loads(out)
    # The split's objective grows with Ω (more slots) ...
    assert documents[1.25]["cost"] > documents[1.0]["cost"]
    # ... while the predicted time to decode a step falls: what the user cares about.
    one, more = documents[1.0]["step_time"], documents[1.25]["step_time"]
    assert more["optimal"] < one["optimal"]
    assert one["code"] == "repetition" and one["steps"] == cli.DEFAULT_PLAN_STEPS and one["seed"] == 0
    # It is the code simulator's mean on these workers (seeded), not a formula of the cost.
    expected = simulate_code(make_code("repetition", 3, 40, 1.25, PROFILES), PROFILES, steps=500, seed=0)
    assert more["optimal"] == pytest.approx(float(expected.mean()))
    assert 0 < more["optimal_stderr"] < 0.05 * more["optimal"]
    assert more["uniform"] > more["optimal"] >= more["spare_work"] >= 0.95 * documents[1.25]["lower_bound"]


def test_plan_table_explains_the_cost_and_shows_the_step_time(capsys, profile_file) -> None:
    status, out, _ = run(capsys, "plan", "--profile", profile_file, "--tasks", 40, "--redundancy", 1.25)
    assert status == 0
    assert "not a time" in out and "backups included" in out
    line = next(line for line in out.splitlines() if line.startswith("predicted mean time to decode a step"))
    assert "repetition code at Ω = 1.25" in line and "500 simulated steps, seed 0" in line
    values = out.splitlines()[out.splitlines().index(line) + 1]
    assert values.strip().startswith("optimal split ") and "uniform split" in values and "spare work" in values


def test_plan_step_time_is_seeded(capsys, profile_file) -> None:
    argv = ["plan", "--profile", profile_file, "--tasks", 40, "--redundancy", 1.1, "--steps", 50, "--json"]
    first = json.loads(run(capsys, *argv)[1])["step_time"]
    assert json.loads(run(capsys, *argv)[1])["step_time"] == first
    other = json.loads(run(capsys, *argv, "--seed", 1)[1])["step_time"]
    assert other["optimal"] != first["optimal"] and other["seed"] == 1 and first["steps"] == 50


def test_plan_without_a_code_for_fewer_tasks_than_workers(capsys, profile_file) -> None:
    status, out, _ = run(capsys, "plan", "--profile", profile_file, "--tasks", 2)
    assert status == 0
    assert "predicted step time: not available (num_tasks" in out


# --- simulate ------------------------------------------------------------------------------------


def test_simulate_json(capsys, profile_file) -> None:
    argv = ["simulate", "--profile", profile_file, "--tasks", 30, "--redundancy", "1,1.1,1.3"]
    argv += ["--arrival-rate", 0.02, "--jobs", 800, "--seed", 3, "--json"]
    status, out, err = run(capsys, *argv)
    assert status == 0 and err == ""
    document = json.loads(out)
    assert document["lower_bound"] == pytest.approx(plan.stream_lower_bound(PROFILES, 30, 0.02))
    assert [r["redundancy"] for r in document["results"]] == [1.0, 1.1, 1.3]
    for r in document["results"]:
        assert {"optimal", "uniform", "optimal_stable", "uniform_stable"} <= set(r)
        assert r["optimal"] >= 0.9 * document["lower_bound"]
        assert r["optimal"] < r["uniform"]
        assert sum(r["optimal_split"]) == round(30 * r["redundancy"])
    # Reproducible: the same command prints the same document.
    assert run(capsys, *argv)[1] == out


def test_simulate_table_marks_an_unstable_queue(capsys, profile_file) -> None:
    # Without redundancy the uniform split waits for the slow worker and cannot keep up at this rate;
    # the optimal split can, and with Ω = 1.5 the uniform one no longer needs the slow worker either.
    rate = 0.6 / plan.capacity_time(PROFILES, 30)
    argv = ["simulate", "--profile", profile_file, "--tasks", 30, "--redundancy", "1,1.5"]
    status, out, err = run(capsys, *argv, "--arrival-rate", rate, "--jobs", 1000)
    assert status == 0 and err == ""
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:1] == ["redundancy"])
    for column in ("optimal", "uniform", "lower bound", "optimal/bound", "uniform/optimal"):
        assert column in header
    rows = {
        line.split()[0]: line.split() for line in lines[lines.index(header) + 1 :] if line.split()[0] in ("1", "1.5")
    }
    assert rows["1"][3] == "UNSTABLE"  # redundancy, optimal, uniform delay, its mark
    assert "UNSTABLE" not in rows["1.5"]
    assert "utilisation >= 1" in out


def test_simulate_with_the_paper_preset_reproduces_the_finding(capsys) -> None:
    argv = ["simulate", "--preset", "paper", "--redundancy", "1.05,1.1", "--jobs", 1500, "--json"]
    status, out, _ = run(capsys, *argv)
    assert status == 0
    document = json.loads(out)
    assert document["tasks"] == 1000 and document["arrival_rate"] == 0.01 and document["jobs"] == 1500
    for r in document["results"]:
        assert r["optimal_stable"]
        assert r["optimal"] < 1.1 * document["lower_bound"]  # close to the ideal …
        assert r["uniform"] > 1.5 * r["optimal"]  # … and far below the uniform split


def test_simulate_plot_writes_a_png(capsys, profile_file, tmp_path) -> None:
    target = tmp_path / "delays.png"
    argv = ["simulate", "--profile", profile_file, "--tasks", 20, "--redundancy", "1,1.2"]
    status, out, _ = run(capsys, *argv, "--arrival-rate", 0.02, "--jobs", 200, "--plot", target)
    assert status == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 10_000  # two panels were drawn, not an empty canvas
    assert str(target) in out


# --- errors --------------------------------------------------------------------------------------


def _write(path: Path, document: object) -> str:
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


BAD_INPUTS = [
    # (argv after the command, the field the message must start with)
    (["plan", "--profile", "{bad_mean}", "--tasks", "10"], "workers[1].mean"),
    (["plan", "--profile", "{missing_std}", "--tasks", "10"], "workers[0].std"),
    (["plan", "--profile", "{not_json}", "--tasks", "10"], "profile"),
    (["plan", "--profile", "{nowhere}", "--tasks", "10"], "profile"),
    (["plan", "--profile", "{good}", "--tasks", "0"], "tasks"),
    (["plan", "--profile", "{good}", "--tasks", "ten"], "argument --tasks"),
    (["plan", "--profile", "{good}"], "tasks"),
    (["plan", "--profile", "{good}", "--tasks", "10", "--redundancy", "0.9"], "redundancy"),
    (["plan", "--profile", "{good}", "--tasks", "10", "--gamma", "-1"], "gamma"),
    (["plan", "--tasks", "10"], "profile"),
    (["plan", "--profile", "{good}", "--preset", "paper"], "profile"),
    (["plan", "--preset", "nope"], "argument --preset"),
    (
        ["simulate", "--profile", "{good}", "--tasks", "10", "--redundancy", "1,x", "--arrival-rate", "0.01"],
        "redundancy",
    ),
    (
        ["simulate", "--profile", "{good}", "--tasks", "10", "--redundancy", "1,0.5", "--arrival-rate", "0.01"],
        "redundancy",
    ),
    (
        ["simulate", "--profile", "{good}", "--tasks", "10", "--redundancy", "1", "--arrival-rate", "100"],
        "arrival_rate",
    ),
    (["simulate", "--profile", "{good}", "--tasks", "10", "--redundancy", "1", "--arrival-rate", "-1"], "arrival_rate"),
    (["simulate", "--profile", "{good}", "--tasks", "10", "--redundancy", "1"], "arrival_rate"),
    (
        [
            "simulate",
            "--profile",
            "{good}",
            "--tasks",
            "10",
            "--redundancy",
            "1",
            "--arrival-rate",
            "0.01",
            "--jobs",
            "0",
        ],
        "jobs",
    ),
    (["simulate", "--redundancy", "1", "--arrival-rate", "0.01"], "profile"),
    (["plan", "--profile", "{good}", "--tasks", "10", "--steps", "0"], "steps"),
    (["plan", "--profile", "{good}", "--tasks", "10", "--seed", "-1"], "seed"),
    # Options the chosen mode would ignore are rejected, naming the option.
    (
        [
            "simulate",
            "--profile",
            "{good}",
            "--tasks",
            "10",
            "--redundancy",
            "1",
            "--code",
            "uncoded",
            "--plot",
            "{png}",
        ],
        "plot",
    ),
    (
        [
            "simulate",
            "--profile",
            "{good}",
            "--tasks",
            "10",
            "--redundancy",
            "1",
            "--arrival-rate",
            "0.01",
            "--spare-work",
        ],
        "spare_work",
    ),
    (
        [
            "simulate",
            "--profile",
            "{good}",
            "--tasks",
            "10",
            "--redundancy",
            "1",
            "--code",
            "uncoded",
            "--arrival-rate",
            "0.01",
        ],
        "arrival_rate",
    ),
    (
        [
            "simulate",
            "--profile",
            "{good}",
            "--tasks",
            "10",
            "--redundancy",
            "1",
            "--arrival-rate",
            "0.01",
            "--plot",
            "{txt2}",
        ],
        "plot",
    ),
    ([], "the following arguments are required"),
]


@pytest.mark.parametrize(("argv", "field"), BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_field(capsys, tmp_path, argv, field) -> None:
    files = {  # the {placeholders} in argv
        "bad_mean": _write(tmp_path / "bad_mean.json", {"workers": [{"mean": 1, "std": 1}, {"mean": -1, "std": 1}]}),
        "missing_std": _write(tmp_path / "missing_std.json", {"workers": [{"mean": 1}]}),
        "not_json": _write(tmp_path / "not_json.json", "{workers"),
        "nowhere": str(tmp_path / "missing.json"),
        "good": _write(tmp_path / "good.json", {"workers": [{"mean": 1, "std": 1}, {"mean": 2, "std": 2}]}),
        "png": str(tmp_path / "out.png"),
        "txt2": str(tmp_path / "out.txt2"),
    }
    status, out, err = run(capsys, *(files[a[1:-1]] if a.startswith("{") else a for a in argv))
    assert status == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"codedgrad: error: {field}"), lines[0]
    assert not any(tmp_path.glob("out.*")), "a rejected command wrote its plot"


def test_plot_with_an_unsupported_format_names_the_option_and_the_formats(capsys, tmp_path) -> None:
    target = tmp_path / "out.txt2"
    profile = _write(tmp_path / "good.json", {"workers": [{"mean": 1, "std": 1}]})
    argv = ["simulate", "--profile", profile, "--tasks", 10, "--redundancy", 1, "--arrival-rate", 0.01]
    status, _, err = run(capsys, *argv, "--plot", target)
    assert status == 2
    assert err.startswith(f"codedgrad: error: plot: cannot write {str(target)!r}: format 'txt2' is not supported")
    assert ".png" in err and ".pdf" in err


def test_jobs_help_gives_both_defaults(capsys) -> None:
    assert cli.main(["simulate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    help_text = text[text.index("--jobs J") :]
    assert f"default {cli.DEFAULT_JOBS}" in help_text and f"(default {cli.DEFAULT_CODE_STEPS})" in help_text
    assert cli.DEFAULT_CODE_STEPS == 500


def test_uncoded_row_notes_the_redundancy_it_ignores(capsys, profile_file) -> None:
    argv = ["simulate", "--profile", profile_file, "--tasks", 12, "--redundancy", 1.25, "--code", "uncoded"]
    status, out, _ = run(capsys, *argv, "--jobs", 50, "--json")
    assert status == 0
    (row,) = json.loads(out)["codes"]
    assert row["redundancy"] == 1.0 and row["mean"] is not None
    assert row["note"] == "no redundancy: runs at Ω = 1, also for the Ω = 1.25 asked"
    status, out, _ = run(capsys, *argv, "--jobs", 50)
    assert status == 0
    assert out.splitlines()[-1].split()[:2] == ["uncoded", "1"] and out.rstrip().endswith("1.25 asked")
    # Asked for Ω = 1 only, there is nothing to note.
    argv[argv.index(1.25)] = 1
    assert json.loads(run(capsys, *argv, "--jobs", 50, "--json")[1])["codes"][0]["note"] is None


def test_help_exits_zero(capsys) -> None:
    assert cli.main(["simulate", "--help"]) == 0
    assert "--arrival-rate" in capsys.readouterr().out


def test_installed_console_script(profile_file) -> None:
    script = Path(sys.executable).parent / "codedgrad"
    if not script.exists():
        pytest.skip("the codedgrad console script is not installed next to this interpreter")
    argv = [str(script), "plan", "--profile", str(profile_file), "--tasks", "40", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["split"] == plan.optimal_split(PROFILES, 40).tolist()
    bad = subprocess.run(
        [str(script), "plan", "--tasks", "40"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["codedgrad: error: profile: give --profile FILE or --preset NAME"]
    assert np.isfinite(json.loads(done.stdout)["lower_bound"])


def test_simulate_codes_compares_codes_on_the_same_workers(capsys, profile_file) -> None:
    code, out, _ = run(
        capsys,
        "simulate",
        "--profile",
        str(profile_file),
        "--tasks",
        "12",
        "--redundancy",
        "1.25,2",
        "--code",
        "uncoded,repetition,cyclic",
        "--jobs",
        "300",
        "--json",
    )
    assert code == 0
    document = json.loads(out)
    rows = {(r["code"], r["redundancy"]): r for r in document["codes"]}
    assert set(rows) == {("uncoded", 1.0), ("repetition", 1.25), ("repetition", 2.0), ("cyclic", 1.25), ("cyclic", 2.0)}
    assert rows[("cyclic", 1.25)]["skipped"] and "integer" in rows[("cyclic", 1.25)]["skipped"]
    for key in [("uncoded", 1.0), ("repetition", 1.25), ("repetition", 2.0), ("cyclic", 2.0)]:
        assert rows[key]["mean"] >= document["lower_bound"]
    # Backups shorten the step on noisy workers (same random numbers for every code).
    assert rows[("repetition", 2.0)]["mean"] < rows[("uncoded", 1.0)]["mean"]


def test_simulate_codes_rejects_an_unknown_code(capsys, profile_file) -> None:
    code, _, err = run(
        capsys, "simulate", "--profile", str(profile_file), "--tasks", "12", "--redundancy", "2", "--code", "mds"
    )
    assert code == 2 and err.count("\n") == 1 and "code: unknown code 'mds'" in err
