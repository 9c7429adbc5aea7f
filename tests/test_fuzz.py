"""Fuzzing (hypothesis): every input ends in a clear error or a correct result.

Targets: profiles and their files, the planner, the codes and their decoder states, the engine
configuration, the Lightning strategies' constructors, the command line, emulation settings, and
the step protocol's Store keys when they are corrupted, truncated or random. A "clear error" is the
module's own error class (a ``ValueError`` or the engine's step errors) whose message names the
field, key or step; never ``struct.error``, ``IndexError``, ``OverflowError`` or a hang, and never a
decoded sum that differs from the sum of all tasks.

``make test`` runs a few cases per target (derandomized, tests/conftest.py); a long run::

    CODEDGRAD_FUZZ_EXAMPLES=2000 OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_fuzz.py \\
        -q -p no:cacheprovider --hypothesis-show-statistics

Regression tests for the bugs fuzzing found are plain tests at the end of each section.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import re
import struct
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch.distributed as dist
from hypothesis import event, given
from hypothesis import strategies as st

from codedgrad import plan
from codedgrad.cli import main as cli_main
from codedgrad.codes import CodeError, NotDecodable, RankLevelCode, Work, make_code
from codedgrad.codes.accounting import check_accumulated, decode_results, encode_results
from codedgrad.emulate import EmulationError, Heterogeneity
from codedgrad.profile import (
    ProfileError,
    WorkerProfile,
    fit_profile,
    load_profiles,
    profiles_from_dict,
    profiles_to_dict,
)
from codedgrad.runtime.config import ConfigurationError, EngineConfig, agree
from codedgrad.runtime.coordinator import (
    CodedStepTimeout,
    StepMismatchError,
    StoreCoordinator,
    StoreStateError,
    weights_digest,
)
from tests import fuzz_strategies as fs

_WORKDIR = Path(tempfile.mkdtemp(prefix="codedgrad-fuzz-"))


def _field_named(message: str, names) -> bool:
    """Whether ``message`` starts with one of ``names`` (``field:``, ``field[2]``, ``field.sub``)."""
    return any(message.startswith(name) and message[len(name) : len(name) + 1] in (":", "[", ".") for name in names)


# ================================================================================== profiles


@fs.fuzz_settings(60)
@given(fs.profile_document)
def test_profile_documents_parse_or_name_the_field(document):
    try:
        profiles = profiles_from_dict(document)
    except ProfileError as error:
        event("refused")
        assert _field_named(str(error), ("profile", "workers")), error
        return
    assert profiles and all(isinstance(p, WorkerProfile) for p in profiles)
    assert all(math.isfinite(v) for p in profiles for v in (p.shift, p.mean, p.std))
    assert profiles_from_dict(json.loads(json.dumps(profiles_to_dict(profiles)))) == profiles


@fs.fuzz_settings(40)
@given(fs.profile_file_bytes())
def test_profile_files_load_or_raise_profile_error(content):
    path = _WORKDIR / "profile.json"
    path.write_bytes(content)
    try:
        profiles = load_profiles(path)
    except ProfileError as error:
        event("refused")
        assert str(error).startswith(("profile:", "workers")), error
        return
    assert profiles and all(isinstance(p, WorkerProfile) for p in profiles)


@fs.fuzz_settings(40)
@given(st.one_of(st.lists(fs.any_number(), max_size=60), st.lists(st.floats(0, 1e3), min_size=1, max_size=80)))
def test_fit_profile_fits_or_names_task_times(times):
    try:
        profile = fit_profile(times)
    except ProfileError as error:
        event("refused")
        assert str(error).startswith("task_times:"), error
        return
    largest = max(float(np.max(times)), 1e-9)
    assert 0 < profile.mean <= 3 * largest and 0 <= profile.std <= 3 * largest  # floor + median excess / ln 2


def test_profile_file_that_is_not_text_is_a_profile_error():
    path = _WORKDIR / "binary-profile.json"
    path.write_bytes(b'{"workers": [\xff\xfe]}')
    with pytest.raises(ProfileError, match=r"profile: .* is not UTF-8 text"):
        load_profiles(path)


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "-huge"])
def test_profile_with_an_integer_too_large_for_a_float_is_a_profile_error(value):
    with pytest.raises(ProfileError, match="mean: must be finite"):
        profiles_from_dict({"workers": [{"mean": value, "std": 1.0}]})


def test_fit_profile_of_huge_times_names_task_times():
    with pytest.raises(ProfileError, match="task_times:"):
        fit_profile([0.0, 1.5e308, 1.5e308])


# ================================================================================== the planner


def _max_cost(profiles, loads, gamma):
    return max(p.cost(int(k), gamma) for p, k in zip(profiles, loads) if k > 0)


@fs.fuzz_settings(60)
@given(
    st.lists(fs.moderate_profile, min_size=1, max_size=6),
    st.one_of(st.integers(1, 40), st.integers(-2, 0), fs.garbage),
    st.one_of(st.floats(1.0, 3.0), fs.nasty_floats, st.just(1.0)),
    st.one_of(st.floats(0.0, 4.0), st.just(0.0), fs.nasty_floats),
    st.one_of(st.none(), st.integers(-1, 40), fs.nasty_floats, st.floats(0, 40), fs.huge_ints),
)
def test_optimal_split_is_optimal_or_a_plan_error(profiles, tasks, redundancy, gamma, capacity):
    try:
        loads = plan.optimal_split(profiles, tasks, redundancy, gamma, capacity)
    except plan.PlanError as error:
        event("refused")
        assert _field_named(str(error), ("tasks", "redundancy", "gamma", "capacity", "total", "profiles")), error
        return
    total = round(tasks * redundancy)
    assert loads.dtype == np.int64 and loads.shape == (len(profiles),)
    assert loads.min() >= 0 and int(loads.sum()) == total
    cap = total if capacity is None else int(capacity)
    assert loads.max() <= cap
    # The largest cost is the total-th smallest of all marginal values f_p(k), k = 1 … cap.
    values = sorted(p.cost(k, gamma) for p in profiles for k in range(1, min(cap, total) + 1))
    assert _max_cost(profiles, loads, gamma) == pytest.approx(values[total - 1], rel=1e-9)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an overflow on the way is a wrong split in disguise
@fs.fuzz_settings(40)
@given(
    st.lists(fs.valid_profile, min_size=1, max_size=6),
    st.integers(1, 200),
    st.floats(1.0, 4.0),
    st.one_of(st.just(1.0), st.floats(0.0, 1e6), st.sampled_from([1e100, 1e300])),
)
def test_optimal_split_of_extreme_profiles_sums_exactly_or_refuses(profiles, tasks, redundancy, gamma):
    try:
        loads = plan.optimal_split(profiles, tasks, redundancy, gamma, capacity=tasks)
    except plan.PlanError as error:
        event("refused")
        assert _field_named(str(error), ("gamma", "profiles", "capacity")), error
        return
    assert loads.min() >= 0 and loads.max() <= tasks and int(loads.sum()) == round(tasks * redundancy)


def test_a_cost_that_overflows_is_a_plan_error_naming_gamma():
    with pytest.raises(plan.PlanError, match=r"^gamma: the cost .* overflows"):
        plan.optimal_split([WorkerProfile(0.0, 1.0, 0.0)], 1, 1.0, gamma=1e308)
    with pytest.raises(CodeError, match=r"^gamma: the cost .* overflows"):
        make_code("repetition", 2, 4, 1.5, gamma=1e308)


@fs.fuzz_settings(15)
@given(
    st.lists(fs.moderate_profile, min_size=1, max_size=4),
    st.integers(1, 16),
    st.one_of(st.lists(st.floats(1.0, 2.0), min_size=1, max_size=3), st.lists(fs.nasty_floats, max_size=2)),
    st.one_of(st.floats(0, 0.2), fs.nasty_floats),
)
def test_choose_redundancy_picks_a_candidate_or_a_plan_error(profiles, tasks, candidates, tolerance):
    try:
        omega = plan.choose_redundancy(profiles, tasks, candidates, tolerance, jobs=20)
    except plan.PlanError as error:
        event("refused")
        assert _field_named(str(error), ("candidates", "tolerance", "redundancy", "tasks")), error
        return
    assert omega in candidates


@fs.fuzz_settings(60)
@given(
    fs.anything(st.integers(-2, 64)),
    fs.anything(fs.any_number(-1, 1e4)),
    fs.anything(fs.any_number(-1, 10)),
    st.one_of(st.just(0.0), fs.anything(fs.any_number(-1, 1))),
    st.one_of(st.none(), fs.anything(st.integers(-2, 500))),
)
def test_propose_num_tasks_is_in_range_or_a_plan_error(world, compute, overhead, commit, max_tasks):
    try:
        tasks = plan.propose_num_tasks(world, compute, overhead, commit, max_tasks)
    except plan.PlanError as error:
        event("refused")
        assert _field_named(
            str(error), ("world_size", "step_compute_seconds", "task_overhead_seconds", "commit_seconds", "max_tasks")
        ), error
        return
    assert type(tasks) is int and tasks >= world
    if max_tasks is not None:
        assert tasks <= max_tasks


@pytest.mark.parametrize("capacity", [float("nan"), float("inf"), 2.5, -1, True])
def test_optimal_split_refuses_a_capacity_that_is_not_a_count(capacity):
    with pytest.raises(plan.PlanError, match="capacity:"):
        plan.optimal_split([WorkerProfile(0, 1, 1)] * 3, 6, 1.0, capacity=capacity)


def test_optimal_split_with_a_capacity_beyond_the_slots_is_uncapped():
    profiles = [WorkerProfile(0, 1, 1), WorkerProfile(0, 2, 1)]
    expected = plan.optimal_split(profiles, 6)
    for capacity in (2**63, 10**400):
        np.testing.assert_array_equal(plan.optimal_split(profiles, 6, capacity=capacity), expected)


@pytest.mark.parametrize(
    ("tasks", "redundancy"), [(1, 1e308), (10**400, 1.0), (2**60, 1.5)], ids=["omega", "k", "k*omega"]
)
def test_more_slots_than_the_planner_counts_is_a_plan_error_not_a_hang(tasks, redundancy):
    with pytest.raises(plan.PlanError, match=r"^redundancy: .* more than the planner counts"):
        plan.optimal_split([WorkerProfile(0, 1, 1)], tasks, redundancy)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((2.5, 1.0, 0.1), "world_size"),
        ((True, 1.0, 0.1), "world_size"),
        ((4, 1e308, 1e-308), "task_overhead_seconds"),
        ((4, 1.0, 0.1, float("nan")), "commit_seconds"),
        ((4, 1.0, 0.1, -1.0), "commit_seconds"),
        ((4, 1.0, 0.1, 0.0, 2), "max_tasks"),
        ((4, 1.0, 0.1, 0.0, 7.5), "max_tasks"),
    ],
)
def test_propose_num_tasks_names_the_bad_argument(args, field):
    with pytest.raises(plan.PlanError, match=f"^{field}:"):
        plan.propose_num_tasks(*args)


def test_propose_num_tasks_with_a_huge_ratio_is_capped_not_an_overflow():
    assert plan.propose_num_tasks(4, 1e300, 1e-10, max_tasks=64) == 64


# ================================================================================== codes


@pytest.mark.filterwarnings("error::RuntimeWarning")
@fs.fuzz_settings(80)
@given(fs.code_arguments(), st.integers(0, 2**32 - 1))
def test_codes_build_or_name_the_argument_and_any_commits_decode_exactly(arguments, seed):
    try:
        code = make_code(**arguments)
    except CodeError as error:
        event("refused")
        assert _field_named(str(error), ("name", "num_ranks", "num_tasks", "redundancy", "profiles", "gamma")), error
        return
    rng = np.random.default_rng(seed)
    ranks, tasks = code.num_ranks, code.num_tasks
    queues = [code.queue(r) for r in range(ranks)]
    for queue in queues:
        for work in queue:
            assert all(0 <= j < tasks for j in work.tasks) and len(set(work.tasks)) == len(work.tasks)
    gradients = rng.integers(-1000, 1000, size=(tasks, 3)).astype(np.float64)

    # Ranks work through their queues in a random interleaving; some stop early (stragglers); with
    # repetition an idle rank sometimes commits any open task (spare work). Every state goes
    # through its bytes, as through the Store.
    stops = [len(q) if rng.random() < 0.7 else int(rng.integers(0, len(q) + 1)) for q in queues]
    spare = [int(rng.integers(0, 3)) if stops[r] == len(queues[r]) and not isinstance(code, RankLevelCode) else 0
             for r in range(ranks)]  # fmt: skip
    position = [0] * ranks
    stored = code.new_state().to_bytes()
    accumulators = np.zeros((ranks, 3))
    accumulated: list[list[int]] = [[] for _ in range(ranks)]
    while True:
        active = [r for r in range(ranks) if position[r] < stops[r] or spare[r] > 0]
        if not active:
            break
        rank = int(rng.choice(active))
        if position[rank] < stops[rank]:
            work = queues[rank][position[rank]]
            position[rank] += 1
        else:  # its queue ran dry: spare work, any task still open
            spare[rank] -= 1
            open_tasks = [j for j in range(tasks) if code.state_from_bytes(stored).is_needed(rank, j)]
            if not open_tasks:
                continue
            j = int(rng.choice(open_tasks))
            work = Work(j, (j,), (1.0,))
        state = code.state_from_bytes(stored)
        if not state.is_needed(rank, work.result):
            continue
        if state.commit(rank, work.result):
            accumulated[rank].append(work.result)
            accumulators[rank] += sum(c * gradients[j] for j, c in zip(work.tasks, work.coefficients))
        stored = state.to_bytes()
        assert code.state_from_bytes(stored).to_bytes() == stored

    state = code.state_from_bytes(stored)
    stragglers = [r for r in range(ranks) if stops[r] < len(queues[r])]
    event(f"{code.name}: {'decided' if state.decided else 'not decided'}")
    if not state.decided:
        assert stragglers and not code.tolerates(stragglers), state.missing()
        with pytest.raises(NotDecodable):
            state.decoding()
        return
    assert check_accumulated(code, state, accumulated) is None
    decoding = state.decoding()
    total = decoding.rank_coefficients @ accumulators
    scale = max(1.0, decoding.condition_number) * np.abs(gradients).sum()
    np.testing.assert_allclose(total, gradients.sum(axis=0), rtol=0, atol=1e-9 * scale)


FUZZ_CODES = [("repetition", 3, 7, 1.5), ("uncoded", 2, 5, 1.0), ("frc", 4, 9, 2.0), ("cyclic", 3, 6, 2.0)]


@fs.fuzz_settings(60)
@given(st.sampled_from(FUZZ_CODES), st.binary(max_size=4))
def test_decoder_states_from_random_bytes_are_canonical_or_a_code_error(case, data):
    name, ranks, tasks, omega = case
    code = make_code(name, ranks, tasks, omega)
    try:
        state = code.state_from_bytes(data)
    except CodeError as error:
        event("refused")
        assert str(error).startswith("data:"), error
        return
    assert state.to_bytes() == data  # one state, one serialisation (compare-and-set compares bytes)


# ================================================================================== EngineConfig

_ENGINE_NAMES = [
    "redundancy", "gamma", "code", "profiles", "emulate", "timeout", "replan_every", "replan_threshold",
    "warmup_steps", "spare_work", "no_wait", "broadcast_buffers", "bucket_cap_mb", "max_steps_ahead",
    "nonfinite", "value_slots",
]  # fmt: skip
_EMULATIONS = st.one_of(
    st.none(), st.just(Heterogeneity(speeds=[1.0, 2.0], base=0.01)), st.just({"speeds": [1], "base": 1}), fs.garbage
)


@fs.fuzz_settings(100)
@given(fs.some_fields({**fs.ENGINE_FIELDS, "emulate": _EMULATIONS}), st.integers(1, 5))
def test_engine_config_is_valid_or_names_the_field(kwargs, world):
    try:
        config = EngineConfig(**kwargs)
    except ConfigurationError as error:
        event("refused")
        assert _field_named(str(error), _ENGINE_NAMES), error
        return
    assert config.code in ("repetition", "uncoded", "frc", "cyclic")
    assert config.redundancy == "auto" or (isinstance(config.redundancy, float) and config.redundancy >= 1)
    assert isinstance(config.timeout, float) and 0 < config.timeout and datetime.timedelta(seconds=config.timeout)
    json.dumps(config.to_dict(), allow_nan=False)  # what the ranks publish to agree on it
    try:
        config.check_world(world)
    except ConfigurationError as error:
        event("refused")
        assert _field_named(str(error), _ENGINE_NAMES), error


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"profiles": 5}, "profiles"),
        ({"profiles": 10**400}, "profiles"),
        ({"redundancy": 10**400}, "redundancy"),
        ({"gamma": -(10**400)}, "gamma"),
        ({"timeout": 1e300}, "timeout"),
        ({"replan_threshold": 10**400}, "replan_threshold"),
    ],
)
def test_engine_config_regressions(kwargs, field):
    with pytest.raises(ConfigurationError, match=f"^{field}:"):
        EngineConfig(**kwargs)


@fs.fuzz_settings(40)
@given(st.data())
def test_a_corrupted_agreement_entry_is_a_configuration_error(data):
    values = {"code": "repetition", "redundancy": 1.25, "shapes": [[2, 3], [3]]}
    good = json.dumps({"values": values, "error": None}, sort_keys=True).encode()
    bad = data.draw(
        st.one_of(
            corrupted(good),
            st.fixed_dictionaries({"values": fs.json_value, "error": fs.json_value}).map(
                lambda d: json.dumps(d, default=repr).encode()
            ),
            fs.json_value.map(lambda d: json.dumps(d, default=repr).encode()),
        )
    )
    store = _store()
    store.set("g/0/config/1", bad)  # rank 1's entry of this engine's first gather
    try:
        agree(StoreCoordinator(store, 0, 2, TIMEOUT), "config", values, None)
    except ConfigurationError as error:
        event("refused")
        assert "rank 1" in str(error) or "ranks disagree" in str(error), error
        return
    entry = json.loads(bad)
    assert not entry["error"] and all(entry["values"].get(k) == v for k, v in values.items())


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (b"\xff{", "not JSON"),
        (b'{"values": {"code": "repetition"}}', "not {"),
        (b'{"values": [], "error": null}', "not {"),
    ],
    ids=["bytes", "no-error-key", "values-not-a-dict"],
)
def test_an_unreadable_agreement_entry_names_the_rank(entry, problem):
    store = _store()
    store.set("g/0/config/1", entry)
    with pytest.raises(ConfigurationError, match=re.escape(f"rank 1's 'config' in the Store is {problem}")):
        agree(StoreCoordinator(store, 0, 2, TIMEOUT), "config", {"code": "repetition"}, None)


# ================================================================================== Lightning strategies

_CODED_FIELDS = {
    "num_tasks": st.one_of(st.none(), st.integers(-1, 64), fs.garbage),
    "redundancy": fs.ENGINE_FIELDS["redundancy"],
    "code": fs.ENGINE_FIELDS["code"],
    "gamma": fs.ENGINE_FIELDS["gamma"],
    "profiles": fs.ENGINE_FIELDS["profiles"],
    "emulate": _EMULATIONS,
    "timeout": fs.ENGINE_FIELDS["timeout"],
    "replan_every": fs.ENGINE_FIELDS["replan_every"],
    "replan_threshold": fs.ENGINE_FIELDS["replan_threshold"],
    "spare_work": fs.ENGINE_FIELDS["spare_work"],
    "max_steps_ahead": fs.ENGINE_FIELDS["max_steps_ahead"],
    "find_unused_parameters": st.booleans(),
}
_BALANCED_FIELDS = {
    "profiles": fs.ENGINE_FIELDS["profiles"],
    "replan_every": fs.ENGINE_FIELDS["replan_every"],
    "replan_threshold": fs.ENGINE_FIELDS["replan_threshold"],
    "gamma": fs.ENGINE_FIELDS["gamma"],
    "emulate": _EMULATIONS,
    "ddp_comm_hook": st.sampled_from([None, print]),
}


@fs.fuzz_settings(20)
@given(st.sampled_from(["coded", "balanced"]), st.data())
def test_strategy_constructors_accept_or_name_the_argument(which, data):
    from codedgrad.lightning import BalancedStrategy, CodedStrategy

    cls, fields = (CodedStrategy, _CODED_FIELDS) if which == "coded" else (BalancedStrategy, _BALANCED_FIELDS)
    kwargs = data.draw(fs.some_fields(fields))
    with mock.patch.dict(os.environ, {"CODEDGRAD_EMULATE": ""}):
        try:
            strategy = cls(**kwargs)
        except ValueError as error:
            event("refused")
            assert _field_named(str(error), list(fields)), error
            return
    assert strategy.strategy_name == which


def test_balanced_strategy_refuses_an_emulation_that_is_not_one():
    from codedgrad.lightning import BalancedStrategy

    with pytest.raises(ValueError, match=r"^emulate:"):
        BalancedStrategy(emulate={"speeds": [1], "base": 1})


@pytest.mark.parametrize("profiles", [5, "ab"])
def test_balanced_strategy_names_profiles_that_are_not_a_list(profiles):
    from codedgrad.lightning import BalancedStrategy

    with pytest.raises(ValueError, match=r"^profiles"):
        BalancedStrategy(profiles=profiles)


def test_coded_strategy_names_a_timeout_too_long_for_the_store():
    from codedgrad.lightning import CodedStrategy

    with mock.patch.dict(os.environ, {"CODEDGRAD_EMULATE": ""}), pytest.raises(ValueError, match=r"^timeout:"):
        CodedStrategy(timeout=1e300)


# ================================================================================== the command line


@st.composite
def cli_arguments(draw: st.DrawFn) -> list[str]:
    """An argument list built from the CLI's real options, values valid or not; work kept small."""
    command = draw(st.sampled_from(["plan", "simulate", "simulate", "plan", "bogus", "--help", None]))
    options: list[list[str]] = []
    profile = draw(st.sampled_from(["file", "file", "missing", "directory", None]))
    if profile == "file":
        path = _WORKDIR / f"cli-{draw(st.integers(0, 3))}.json"
        if draw(st.booleans()):
            content = json.dumps(profiles_to_dict(draw(st.lists(fs.moderate_profile, min_size=1, max_size=5)))).encode()
        else:
            content = draw(fs.profile_file_bytes())
        path.write_bytes(content)
        options.append(["--profile", str(path)])
    elif profile == "missing":
        options.append(["--profile", str(_WORKDIR / "no-such-profile.json")])
    elif profile == "directory":
        options.append(["--profile", str(_WORKDIR)])
    flags = {
        "--preset": st.sampled_from(["paper", "Paper", ""]),
        "--tasks": fs.NUMBER_TEXT,
        "--gamma": fs.NUMBER_TEXT,
        "--redundancy": fs.REDUNDANCY_TEXT,
        "--steps": fs.NUMBER_TEXT,
        "--seed": fs.NUMBER_TEXT,
        "--arrival-rate": st.one_of(fs.NUMBER_TEXT, st.sampled_from(["0.001", "0.01", "0.05"])),
        "--jobs": fs.NUMBER_TEXT,
        "--plot": st.sampled_from(["delay.nope", str(_WORKDIR / "missing-dir" / "delay.png")]),
        "--code": fs.CODE_TEXT.map(",".join),
    }
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=6, unique=True)):
        options.append([flag, draw(flags[flag])] if draw(st.integers(0, 9)) else [flag])
    for flag in draw(st.lists(st.sampled_from(["--json", "--spare-work", "--bogus", "-x", "--help"]), max_size=2)):
        options.append([flag])
    options = draw(st.permutations(options))
    argv = ([command] if command else []) + [token for option in options for token in option]
    # Cap the work: K <= 40 (a preset's own K is 1000), few simulated steps and jobs.
    if "--tasks" not in argv:
        argv += ["--tasks", "12"]
    if command == "plan" and "--steps" not in argv:
        argv += ["--steps", "20"]
    if command == "simulate" and "--jobs" not in argv:
        argv += ["--jobs", "30"]
    return argv


@fs.fuzz_settings(60)
@given(cli_arguments())
def test_cli_exits_0_or_2_with_one_line(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli_main(argv)  # any exception but SystemExit (handled inside main) fails the test
    event(f"exit {status}")
    if status == 0:
        assert out.getvalue().strip(), argv
        return
    assert status == 2, (argv, status, err.getvalue())
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("codedgrad: error: "), (argv, err.getvalue())


def test_cli_profile_file_that_is_not_text_exits_2():
    path = _WORKDIR / "cli-binary.json"
    path.write_bytes(b"\xff\xfe\x00")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["plan", "--profile", str(path), "--tasks", "4"]) == 2
    assert err.getvalue().startswith("codedgrad: error: profile:")


@pytest.mark.parametrize("tasks", ["1e400", "9" * 400])
def test_cli_huge_numbers_exit_2(tasks):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert cli_main(["plan", "--preset", "paper", "--gamma", tasks, "--steps", "2"]) == 2
    assert err.getvalue().startswith("codedgrad: error: ")


# ================================================================================== emulation settings

_EMULATION_NAMES = [*fs.EMULATION_FIELDS, "expected a JSON object", "not valid JSON"]


@fs.fuzz_settings(80)
@given(st.one_of(fs.emulation_dict(), fs.json_value))
def test_emulation_settings_round_trip_or_name_the_field(data):
    try:
        emulation = Heterogeneity.from_dict(data)
    except EmulationError as error:
        event("refused")
        message = str(error)
        assert _field_named(message, _EMULATION_NAMES) or message.startswith("expected") or "unknown field" in message
        return
    assert Heterogeneity.from_json(emulation.to_json()) == emulation
    assert emulation.task_delay(0, 0, 0) >= 0


def test_emulation_settings_with_a_key_that_is_not_text_name_it():
    with pytest.raises(EmulationError, match="unknown field"):
        Heterogeneity.from_dict({"speeds": [1.0], "base": 0.1, 7: 1, "": None})


@pytest.mark.parametrize("field", ["speeds", "base"])
def test_emulation_settings_with_an_integer_beyond_any_float_name_the_field(field):
    data = {"speeds": [1.0], "base": 0.1}
    data[field] = [10**400] if field == "speeds" else 10**400
    with pytest.raises(EmulationError, match=f"^{field}"):
        Heterogeneity.from_json(json.dumps(data))


@fs.fuzz_settings(40)
@given(st.one_of(st.text(max_size=40), fs.emulation_dict().map(lambda d: json.dumps(d, default=repr))))
def test_emulation_json_parses_or_names_the_problem(text):
    try:
        Heterogeneity.from_json(text, source="CODEDGRAD_EMULATE")
    except EmulationError as error:
        event("refused")
        assert str(error).startswith("CODEDGRAD_EMULATE: "), error


# ================================================================================== the Store protocol

VERSION = 3
DIGEST = weights_digest([1.0] * 8)
HEADER = struct.Struct("<IHI8s")
TIMEOUT = 0.2  # seconds: every wait below must end within a few of these
STEP_ERRORS = (StoreStateError, StepMismatchError, CodedStepTimeout)
STORE_CODES = [("repetition", 3, 7, 1.5), ("uncoded", 2, 4, 1.0), ("frc", 4, 8, 2.0), ("cyclic", 3, 6, 2.0)]


def _store() -> dist.Store:
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=1))  # a get of a missing key fails instead of hanging
    return store


@st.composite
def corrupted(draw: st.DrawFn, value: bytes) -> bytes:
    """``value`` truncated, with bits flipped, bytes appended, a header field changed, or random."""
    kind = draw(st.sampled_from(["truncate", "flip", "append", "header", "random", "empty"]))
    if kind == "truncate":
        return value[: draw(st.integers(0, max(len(value) - 1, 0)))]
    if kind == "flip" and value:
        data = bytearray(value)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "append":
        return value + draw(st.binary(min_size=1, max_size=4))
    if kind == "header" and len(value) >= HEADER.size:
        sequence, rank, version, digest = HEADER.unpack_from(value)
        field = draw(st.sampled_from(["sequence", "rank", "version", "digest"]))
        sequence = draw(st.integers(0, 2**32 - 1)) if field == "sequence" else sequence
        rank = draw(st.integers(0, 2**16 - 1)) if field == "rank" else rank
        version = draw(st.integers(0, 2**32 - 1)) if field == "version" else version
        digest = draw(st.binary(min_size=8, max_size=8)) if field == "digest" else digest
        return HEADER.pack(sequence, rank, version, digest) + value[HEADER.size :]
    if kind == "empty":
        return b""
    return draw(st.binary(max_size=HEADER.size + 4))


def _initial(code, creator: int = 1) -> bytes:
    return HEADER.pack(0, creator, VERSION, DIGEST) + code.new_state().to_bytes()


def _timed(action):
    """Run ``action``; return (result or exception, seconds)."""
    begin = time.monotonic()
    try:
        outcome = action()
    except Exception as error:  # classified by the caller
        outcome = error
    return outcome, time.monotonic() - begin


@fs.fuzz_settings(60)
@given(st.sampled_from(STORE_CODES), st.data())
def test_a_corrupted_state_at_begin_is_refused_by_name(case, data):
    name, ranks, tasks, omega = case
    code = make_code(name, ranks, tasks, omega)
    bad = data.draw(corrupted(_initial(code)))
    store = _store()
    store.set("s0/state", bad)
    coordinator = StoreCoordinator(store, 0, ranks, TIMEOUT)
    channel = coordinator.channel(0, code, VERSION, DIGEST, wait=False)
    outcome, seconds = _timed(channel.begin)
    assert seconds < 1.0
    if isinstance(outcome, Exception):
        assert isinstance(outcome, STEP_ERRORS), repr(outcome)
        assert "step 0" in str(outcome), outcome
        if isinstance(outcome, StoreStateError):
            assert "s0/state" in str(outcome), outcome
        return
    # Accepted (a well-formed state of this plan, or an empty value, which compare-and-set treats as
    # no state and replaces): what the rank goes on with is the Store's state, and the probe agrees.
    value = store.get("s0/state")
    assert bad in (b"", value)
    assert HEADER.unpack_from(value)[2:] == (VERSION, DIGEST)
    assert outcome.to_bytes() == value[HEADER.size :]
    assert coordinator.step_exists(0) == (VERSION, DIGEST)
    result = code.queue(0)[0].result
    committed, seconds = _timed(lambda: channel.commit(result))
    assert seconds < 1.0
    assert not isinstance(committed, Exception) or isinstance(committed, STEP_ERRORS), repr(committed)


@fs.fuzz_settings(20)
@given(st.sampled_from(STORE_CODES), st.sampled_from(["commit", "refresh", "wait", "probe"]), st.data())
def test_a_state_corrupted_during_the_step_is_refused_by_name(case, operation, data):
    name, ranks, tasks, omega = case
    code = make_code(name, ranks, tasks, omega)
    store = _store()
    coordinator = StoreCoordinator(store, 0, ranks, TIMEOUT)
    channel = coordinator.channel(0, code, VERSION, DIGEST, wait=False)
    channel.begin()
    if data.draw(st.booleans()):  # another rank commits first
        other = StoreCoordinator(store, 1, ranks, TIMEOUT).channel(0, code, VERSION, DIGEST, wait=False)
        other.begin()
        other.commit(code.queue(1)[0].result)
    current = store.get("s0/state")
    if data.draw(st.integers(0, 7)) == 0:
        store.delete_key("s0/state")
    else:
        store.set("s0/state", data.draw(corrupted(current)))
    actions = {
        "commit": lambda: channel.commit(code.queue(0)[0].result),
        "refresh": channel.refresh,
        "wait": channel.wait_decided,
        "probe": lambda: coordinator.step_exists(0),
    }
    outcome, seconds = _timed(actions[operation])
    assert seconds < 4 * TIMEOUT + 1.5, f"{operation} took {seconds:.2f} s"
    if isinstance(outcome, Exception):
        assert isinstance(outcome, STEP_ERRORS), repr(outcome)
        assert "step 0" in str(outcome), outcome
        return
    if operation in ("commit", "refresh", "wait"):  # what the rank went on with is a state of this plan
        value = store.get("s0/state")
        assert HEADER.unpack_from(value)[2:] == (VERSION, DIGEST)
        code.state_from_bytes(value[HEADER.size :])


def _play_step(code, rng, corruption, bad_value, store):
    """All ranks of one step in one process: commits in a random interleaving, then the arrival on
    threads. ``corruption`` names what the test corrupts and when. Returns per rank the outcome of
    its arrival (None: went on to the all-reduce, an exception, or "liar") and the views."""
    ranks, tasks = code.num_ranks, code.num_tasks
    coordinators = [StoreCoordinator(store, r, ranks, TIMEOUT) for r in range(ranks)]
    channels = [c.channel(0, code, VERSION, DIGEST, wait=False) for c in coordinators]
    failed: dict[int, Exception] = {}
    for r, channel in enumerate(channels):
        try:
            channel.begin()
        except STEP_ERRORS as error:
            failed[r] = error
    order = [r for r in range(ranks) for _ in code.queue(r)]
    rng.shuffle(order)
    position = [0] * ranks
    accumulated: list[list[int]] = [[] for _ in range(ranks)]
    kind, at = corruption
    for i, r in enumerate(order):
        if i == at and kind in ("state", "decided", "delete"):
            if kind == "state":
                store.set("s0/state", bad_value(store.get("s0/state")))
            elif kind == "decided":
                store.set("s0/decided", bad_value(b"1"))
            else:
                store.delete_key("s0/state")
        if r in failed:
            continue
        work = code.queue(r)[position[r]]
        position[r] += 1
        try:
            if channels[r].state.is_needed(r, work.result) and channels[r].commit(work.result):
                accumulated[r].append(work.result)
        except STEP_ERRORS as error:
            failed[r] = error
            channels[r].abandon(str(error))
    views = {}
    for r, channel in enumerate(channels):
        if r in failed:
            continue
        try:
            state = channel.refresh()
            if not state.decided:
                raise CodedStepTimeout(f"step 0 not decided ({state.missing()})")  # what the wait would say
            views[r] = channel.wait_decided()
        except STEP_ERRORS as error:
            failed[r] = error
            channel.abandon(str(error))
    if kind == "gate":
        store.set("s0/gate", bad_value(b"go"))
    liar = ranks - 1 if kind == "arrival" else None
    outcomes: dict[int, object] = dict(failed)
    results = [set(a) for a in accumulated]
    num_results = ranks if isinstance(code, RankLevelCode) else tasks

    def arrive(r: int) -> None:
        try:
            channels[r].arrive_and_wait(views[r], accumulated[r])
            outcomes[r] = None
        except Exception as error:  # classified below
            outcomes[r] = error

    if liar is not None and liar in views:
        store.set(f"s0/arrived/{liar}", bad_value(b"R" + encode_results(results[liar], num_results)))
        outcomes[liar] = "liar"
    threads = [threading.Thread(target=arrive, args=(r,)) for r in views if r != liar]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=4 * TIMEOUT + 5)
        assert not thread.is_alive(), "an arrival outlived its timeout"
    return outcomes, views, results


@fs.fuzz_settings(40)
@given(
    st.sampled_from(STORE_CODES),
    st.integers(0, 2**32 - 1),
    st.sampled_from(["none", "state", "decided", "delete", "gate", "arrival"]),
    st.integers(0, 12),
    st.data(),
)
def test_a_step_with_corrupted_keys_fails_by_name_or_decodes_exactly(case, seed, kind, at, data):
    name, ranks, tasks, omega = case
    code = make_code(name, ranks, tasks, omega)
    rng = np.random.default_rng(seed)
    store = _store()

    def bad_value(value: bytes) -> bytes:
        return data.draw(corrupted(value))

    outcomes, views, results = _play_step(code, rng, (kind, at), bad_value, store)
    for r, outcome in outcomes.items():
        if isinstance(outcome, Exception):
            assert isinstance(outcome, STEP_ERRORS), f"rank {r}: {outcome!r}"
            assert "step 0" in str(outcome) or "abandoned" in str(outcome), f"rank {r}: {outcome}"
    went_on = [r for r, outcome in outcomes.items() if outcome is None]
    event(f"corrupted {kind}: {'went on' if went_on else 'failed'}")
    if not went_on:
        return
    if kind != "gate":  # all or none enter the collective (unless the test forged the gate itself)
        assert all(outcomes[r] in (None, "liar") for r in range(ranks)), outcomes
    # Whoever went on holds exactly what its decoder uses, and the coded all-reduce (each rank
    # scales its accumulator by its own view's coefficient) gives the sum of all tasks.
    gradients = np.random.default_rng(seed + 1).integers(-100, 100, size=(tasks, 2)).astype(float)
    total = np.zeros(2)
    for r in range(ranks):
        view = views.get(r, views[went_on[0]])
        assert check_accumulated(code, view, results) is None
        coefficient = view.decoding().rank_coefficients[r]
        for result in results[r]:
            work = next(w for w in code.queue(r) if w.result == result)
            total += coefficient * sum(c * gradients[j] for j, c in zip(work.tasks, work.coefficients))
    np.testing.assert_allclose(total, gradients.sum(axis=0), atol=1e-6)


def test_truncated_state_header_is_a_store_state_error_naming_key_and_step():
    code = make_code("repetition", 2, 4, 1.0)
    store = _store()
    store.set("s5/state", b"\x01\x02")
    coordinator = StoreCoordinator(store, 0, 2, TIMEOUT)
    with pytest.raises(StoreStateError, match=r"s5/state.*step 5|step 5.*s5/state"):
        coordinator.channel(5, code, VERSION, DIGEST, wait=False).begin()
    with pytest.raises(StoreStateError, match="s5/state"):
        coordinator.step_exists(5)
    assert issubclass(StoreStateError, StepMismatchError)


def test_a_state_whose_sequence_number_cannot_grow_is_a_store_state_error():
    code = make_code("repetition", 2, 4, 1.0)
    store = _store()
    store.set("s0/state", HEADER.pack(2**32 - 1, 1, VERSION, DIGEST) + code.new_state().to_bytes())
    with pytest.raises(StoreStateError, match="s0/state of step 0 has sequence number"):
        StoreCoordinator(store, 0, 2, TIMEOUT).channel(0, code, VERSION, DIGEST, wait=False).begin()


def test_state_bytes_that_do_not_decode_are_a_store_state_error():
    code = make_code("repetition", 2, 4, 1.0)
    store = _store()
    store.set("s0/state", HEADER.pack(0, 1, VERSION, DIGEST) + b"\xff")  # padding bits set
    with pytest.raises(StoreStateError, match="s0/state"):
        StoreCoordinator(store, 0, 2, TIMEOUT).channel(0, code, VERSION, DIGEST, wait=False).begin()


def test_state_whose_plan_changed_during_the_step_is_refused_before_a_commit():
    code = make_code("repetition", 2, 4, 1.0)
    store = _store()
    channel = StoreCoordinator(store, 0, 2, TIMEOUT).channel(0, code, VERSION, DIGEST, wait=False)
    channel.begin()
    store.set("s0/state", HEADER.pack(1, 1, VERSION + 1, DIGEST) + code.new_state().to_bytes())
    with pytest.raises(StoreStateError, match="s0/state"):
        channel.commit(0)
    assert store.get("s0/state")[HEADER.size :] == code.new_state().to_bytes()  # nothing committed on it


def test_deleted_state_is_a_store_state_error_not_a_hang():
    code = make_code("repetition", 2, 4, 1.0)
    store = _store()
    channel = StoreCoordinator(store, 0, 2, TIMEOUT).channel(0, code, VERSION, DIGEST, wait=False)
    channel.begin()
    store.delete_key("s0/state")
    begin = time.monotonic()
    with pytest.raises(StoreStateError, match="s0/state"):
        channel.refresh()
    assert time.monotonic() - begin < 0.5


def test_decided_flag_without_a_decision_or_gate_is_a_store_state_error():
    code = make_code("repetition", 2, 4, 1.0)
    store = _store()
    channel = StoreCoordinator(store, 0, 2, TIMEOUT).channel(0, code, VERSION, DIGEST, wait=False)
    channel.begin()
    store.set("s0/decided", b"\xff")
    with pytest.raises(StoreStateError, match="s0/gate"):
        channel.wait_decided()


def test_a_gate_saying_go_does_not_let_refused_accounts_through():
    code = make_code("uncoded", 2, 4, 1.0)
    store = _store()
    channels = [StoreCoordinator(store, r, 2, TIMEOUT).channel(0, code, VERSION, DIGEST, wait=False) for r in (0, 1)]
    for channel in channels:
        channel.begin()
    for r, channel in enumerate(channels):
        for work in code.queue(r):
            channel.commit(work.result)
    decided = channels[0].refresh()
    store.set("s0/arrived/1", b"R" + encode_results([], 4))  # rank 1 says it holds nothing
    store.set("s0/gate", b"go")  # … and a forged (or stale) gate says go
    with pytest.raises(StoreStateError, match="s0/gate"):
        channels[0].arrive_and_wait(decided, [w.result for w in code.queue(0)])
    assert decode_results(encode_results([1], 4), 4) == {1}
