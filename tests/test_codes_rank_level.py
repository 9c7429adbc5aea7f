"""Rank-level gradient codes (fractional repetition, cyclic MDS) and the code factory.

The central test is exhaustive: for every set of stragglers on up to 8 ranks, several commit orders
of the others, decoding must give the exact sum of the task gradients whenever the code claims to
tolerate that set, and must refuse (not guess) otherwise.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from codedgrad.codes import (
    CodeError,
    CyclicMDSCode,
    FractionalRepetitionCode,
    NotDecodable,
    make_code,
)
from codedgrad.codes.base import pack_bits, unpack_bits
from codedgrad.codes.cyclic import best_seed, cyclic_mds_matrix
from codedgrad.codes.fractional import speed_groups
from codedgrad.codes.simulate import coded_sum, random_interleaving
from codedgrad.profile import WorkerProfile


def hetero(n: int, seed: int = 1) -> list[WorkerProfile]:
    """n workers whose speeds differ up to 4× (some noisy, one with a start-up shift)."""
    rng = np.random.default_rng(seed)
    means = rng.uniform(0.25, 1.0, n)
    return [WorkerProfile(0.5 if r == n - 1 else 0.0, m, m * rng.uniform(0, 2)) for r, m in enumerate(means)]


def assert_exact_or_refuses(code, stragglers, orders: int = 3, dim: int = 4) -> None:
    """The exhaustive check for one straggler set, over ``orders`` random commit orders."""
    claim = code.tolerates(stragglers)
    rng = np.random.default_rng(len(stragglers))
    gradients = rng.standard_normal((code.num_tasks, dim))
    truth = gradients.sum(axis=0)
    for seed in range(orders):
        state, commits = random_interleaving(code, stragglers, seed)
        assert not any(c.rank in stragglers for c in commits)
        if state.decided:
            total = coded_sum(code, state, commits, gradients)
            error = np.linalg.norm(total - truth) / np.linalg.norm(truth)
            assert error <= 1e-10, (code.name, stragglers, seed, error)
        else:
            assert not claim, f"{code.name} claims to tolerate {stragglers} but did not decide"
            with pytest.raises(NotDecodable):
                state.decoding()
        # Our codes' claims are exact: when every other rank has committed, the state is decided
        # exactly when the code said it would be.
        assert state.decided == claim, (code.name, stragglers, seed)
        # What the Store holds rebuilds the same state.
        rebuilt = code.state_from_bytes(state.to_bytes())
        assert rebuilt.decided == state.decided and rebuilt.to_bytes() == state.to_bytes()
        if state.decided:
            np.testing.assert_array_equal(rebuilt.decoding().rank_coefficients, state.decoding().rank_coefficients)


RANK_LEVEL_CASES = [
    # (name, n, K, Ω, heterogeneous profiles?)
    ("frc", 3, 9, 2, False),
    ("frc", 5, 20, 2, True),
    ("frc", 6, 13, 3, True),
    ("frc", 7, 7, 1, True),
    ("frc", 8, 24, 4, True),
    ("frc", 8, 40, 2, True),
    ("cyclic", 3, 3, 2, False),
    ("cyclic", 4, 9, 1, False),
    ("cyclic", 5, 12, 3, False),
    ("cyclic", 6, 13, 2, True),
    ("cyclic", 7, 21, 4, False),
    ("cyclic", 8, 11, 3, False),
    ("cyclic", 8, 16, 2, True),
]


@pytest.mark.parametrize(("name", "n", "k", "omega", "heterogeneous"), RANK_LEVEL_CASES)
def test_every_straggler_set_decodes_exactly_or_is_refused(name, n, k, omega, heterogeneous):
    code = make_code(name, n, k, omega, hetero(n) if heterogeneous else None)
    s = int(omega) - 1
    claimed = 0
    for size in range(n + 1):
        for stragglers in itertools.combinations(range(n), size):
            if size <= s:  # the guarantee of both constructions
                assert code.tolerates(stragglers), (name, stragglers)
            claimed += code.tolerates(stragglers)
            assert_exact_or_refuses(code, set(stragglers))
    assert claimed < 2**n  # the all-stragglers set at least is refused


def test_frc_groups_balance_speed_and_each_group_covers_all_tasks():
    profiles = [WorkerProfile(0, m, m) for m in (0.25, 0.25, 0.5, 0.5, 1.0, 1.0, 1.0)]
    code = FractionalRepetitionCode(7, 30, 3, profiles)
    assert sorted(r for g in code.groups for r in g) == list(range(7))
    speeds = [sum(profiles[r].rate for r in g) for g in code.groups]
    assert max(speeds) - min(speeds) <= max(p.rate for p in profiles)  # greedy LPT bound
    for group in code.groups:
        blocks = sorted(code.blocks[r] for r in group)
        assert blocks[0][0] == 0 and blocks[-1][1] == 30
        assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))  # contiguous, no overlap
    # Faster ranks inside a group get larger blocks.
    for group in code.groups:
        sizes = {r: code.blocks[r][1] - code.blocks[r][0] for r in group}
        for a, b in itertools.combinations(group, 2):
            if profiles[a].mean < profiles[b].mean:
                assert sizes[a] >= sizes[b]


def test_speed_groups_are_deterministic_and_never_empty():
    profiles = hetero(9, seed=3)
    assert speed_groups(profiles, 4) == speed_groups(list(profiles), 4)
    assert all(speed_groups(profiles, 4))
    with pytest.raises(CodeError, match="redundancy"):
        speed_groups(profiles[:2], 3)


def test_frc_decodes_from_a_cover_that_mixes_groups():
    code = FractionalRepetitionCode(4, 12, 2)  # identical ranks: groups {0, 2} and {1, 3}
    assert code.groups == [[0, 2], [1, 3]]
    assert code.blocks == [(0, 6), (0, 6), (6, 12), (6, 12)]
    state = code.new_state()
    assert state.commit(0, 0) and not state.decided
    assert state.commit(3, 3)  # the second half from the other group completes a cover
    assert state.decided
    np.testing.assert_array_equal(state.decoding().rank_coefficients, [1, 0, 0, 1])


def test_frc_commits_after_the_decision_are_not_used_and_change_nothing():
    code = FractionalRepetitionCode(4, 8, 2)  # homogeneous: groups {0, 2} and {1, 3} or similar
    group = code.groups[0]
    state = code.new_state()
    for r in group:
        assert state.is_needed(r, r)
        assert state.commit(r, r)
    assert state.decided
    frozen = state.to_bytes()
    other = next(r for r in range(4) if r not in group)
    assert not state.is_needed(other, other)
    assert not state.commit(other, other)
    assert state.to_bytes() == frozen
    assert state.decoding().rank_coefficients[other] == 0
    assert "decided" in state.missing()


def test_frc_missing_names_the_groups_and_ranks_still_out():
    code = FractionalRepetitionCode(4, 8, 2)
    state = code.new_state()
    state.commit(code.groups[0][0], code.groups[0][0])
    text = state.missing()
    assert "group 0" in text and "group 1" in text and str(code.groups[1][0]) in text
    with pytest.raises(NotDecodable, match="no exact cover"):
        state.decoding()


def test_cyclic_matrix_has_cyclic_support_and_spans_ones_from_any_n_minus_s_rows():
    n, s = 7, 3
    b = cyclic_mds_matrix(n, s, seed=5)
    for i in range(n):
        support = {(i + t) % n for t in range(s + 1)}
        assert set(np.flatnonzero(b[i])) <= support
        assert b[i, i] == 1
    for rows in itertools.combinations(range(n), n - s):
        a, *_ = np.linalg.lstsq(b[list(rows)].T, np.ones(n), rcond=None)
        np.testing.assert_allclose(a @ b[list(rows)], np.ones(n), atol=1e-9)
    # Different seeds give different constructions; the same seed the same one (all ranks agree).
    assert not np.allclose(b, cyclic_mds_matrix(n, s, seed=6))
    np.testing.assert_array_equal(b, cyclic_mds_matrix(n, s, seed=5))


def test_cyclic_work_covers_s_plus_one_partitions_with_the_matrix_coefficients():
    code = CyclicMDSCode(5, 12, 3)  # partitions of sizes 3, 3, 2, 2, 2
    assert list(code.bounds) == [0, 3, 6, 8, 10, 12]
    (work,) = code.queue(4)
    assert work.result == 4
    assert work.tasks == (10, 11, 0, 1, 2, 3, 4, 5)
    assert work.coefficients[:2] == (code.matrix[4, 4],) * 2
    assert work.coefficients[2:5] == (code.matrix[4, 0],) * 3
    assert work.coefficients[5:] == (code.matrix[4, 1],) * 3


def test_cyclic_reports_condition_number_and_refuses_too_few_responders():
    code = CyclicMDSCode(6, 12, 3)  # s = 2: any 4 decode
    state = code.new_state()
    for r in (0, 2, 4):
        assert state.commit(r, r)
    assert not state.decided
    with pytest.raises(NotDecodable, match="any 4 of 6"):
        state.decoding()
    assert state.commit(5, 5)
    decoding = state.decoding()
    assert decoding.condition_number == pytest.approx(code.condition_number([0, 2, 4, 5]))
    assert 1.0 <= decoding.condition_number < 1e6
    assert decoding.rank_coefficients[1] == decoding.rank_coefficients[3] == 0
    assert not state.commit(1, 1)
    assert code.worst_condition_number() >= decoding.condition_number
    assert CyclicMDSCode(4, 4, 1).worst_condition_number() == pytest.approx(1.0)  # s = 0: B = I


def test_best_seed_is_no_worse_than_seed_zero():
    seed = best_seed(8, 3, tries=6)
    assert 0 <= seed < 6
    chosen = CyclicMDSCode(8, 16, 3, seed=seed).worst_condition_number()
    assert chosen <= CyclicMDSCode(8, 16, 3, seed=0).worst_condition_number()
    assert all(chosen <= CyclicMDSCode(8, 8, 3, seed=k).worst_condition_number() for k in range(6))


def test_rank_level_states_round_trip_and_reject_malformed_bytes():
    code = make_code("cyclic", 10, 20, 3)
    state = code.new_state()
    state.commit(9, 9)
    state.commit(3, 3)
    data = state.to_bytes()
    assert len(data) == 2
    assert code.state_from_bytes(data).responders == (3, 9)
    with pytest.raises(CodeError, match="bytes"):
        code.state_from_bytes(data + b"\0")
    with pytest.raises(CodeError, match="padding"):
        code.state_from_bytes(bytes([data[0], data[1] | 1]))
    with pytest.raises(CodeError, match="result"):
        state.commit(2, 3)
    with pytest.raises(CodeError, match="rank"):
        state.is_needed(10, 10)


def test_bit_helpers_round_trip():
    flags = [True, False, False, True, True, False, False, False, True]
    assert unpack_bits(pack_bits(flags), 9).tolist() == flags
    assert pack_bits(bytearray([1, 0, 1])) == pack_bits([True, False, True]) == bytes([0b10100000])


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (("lt", 4, 8), "name"),
        (("repetition", 4, 3), "num_tasks"),
        (("repetition", 0, 3), "num_ranks"),
        (("repetition", 4, 8, 0.9), "redundancy"),
        (("repetition", 4, 8, 4.5), "redundancy"),
        (("uncoded", 4, 8, 1.5), "redundancy"),
        (("frc", 4, 8, 1.5), "redundancy"),
        (("cyclic", 4, 8, 2.5), "redundancy"),
        (("frc", 4, 8, 5), "redundancy"),
        (("cyclic", 4, 8, 5), "redundancy"),
        (("repetition", 4, 8, 1.0, [WorkerProfile(0, 1, 1)] * 3), "profiles"),
        (("frc", 4, 8, 2.0, [WorkerProfile(0, 1, 1)] * 5), "profiles"),
        (("repetition", 4, 8, 1.0, None, -1.0), "gamma"),
    ],
)
def test_make_code_names_the_bad_argument(args, argument):
    with pytest.raises(CodeError, match=f"^{argument}"):
        make_code(*args)


def test_make_code_builds_each_code():
    profiles = hetero(4)
    assert make_code("repetition", 4, 8, 1.5, profiles).name == "repetition"
    uncoded = make_code("uncoded", 4, 8, 1, profiles)
    assert uncoded.name == "uncoded" and sum(len(uncoded.queue(r)) for r in range(4)) == 8
    assert isinstance(make_code("frc", 4, 8, 2, profiles), FractionalRepetitionCode)
    assert isinstance(make_code("cyclic", 4, 8, 2, profiles), CyclicMDSCode)
    assert make_code("repetition", np.int64(4), np.int64(8)).num_tasks == 8
