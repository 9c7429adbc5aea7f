"""Accounting before the coded all-reduce (codedgrad.codes.accounting): the ranks' accumulators
against what the decided decoder uses, and the bitmask the runtime publishes them as."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codedgrad.codes import CodeError, RepetitionCode, make_code
from codedgrad.codes.accounting import check_accumulated, decode_results, encode_results
from codedgrad.codes.base import pack_bits
from codedgrad.codes.simulate import coded_sum, random_interleaving


def accumulators(code, commits) -> list[set[int]]:
    """What each rank's accumulator holds after these commits: the results whose commit was used."""
    held: list[set[int]] = [set() for _ in range(code.num_ranks)]
    for rank, result, used in commits:
        if used:
            held[rank].add(result)
    return held


CODES = [
    ("uncoded", 4, 12, 1.0),
    ("repetition", 4, 12, 1.5),
    ("repetition", 5, 17, 2.0),
    ("frc", 6, 12, 2.0),
    ("frc", 6, 18, 3.0),
    ("cyclic", 5, 10, 2.0),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CODES), st.integers(0, 2**31), st.booleans())
def test_what_the_runtime_accumulates_passes_and_decodes_exactly(case, seed, spare):
    name, n, k, omega = case
    code = make_code(name, n, k, omega)
    state, commits = random_interleaving(code, (), seed, spare_work=spare and name in ("uncoded", "repetition"))
    held = accumulators(code, commits)
    assert check_accumulated(code, state, held) is None
    # Through the bytes the runtime publishes, too.
    size = k if name in ("uncoded", "repetition") else n
    assert check_accumulated(code, state, [decode_results(encode_results(h, size), size) for h in held]) is None
    gradients = np.random.default_rng(seed).standard_normal((k, 3))
    np.testing.assert_allclose(coded_sum(code, state, commits, gradients), gradients.sum(axis=0), atol=1e-9)


def decided_repetition(num_ranks: int = 3, num_tasks: int = 9):
    code = RepetitionCode(num_ranks, num_tasks, 1.0)
    state = code.new_state()
    for j in range(num_tasks):
        state.commit(int(code.primary_of[j]), j)
    return code, state, [set(np.flatnonzero(code.primary_of == r).tolist()) for r in range(num_ranks)]


def test_repetition_discrepancies_are_named():
    code, state, held = decided_repetition()  # ranks hold {0, 1, 2}, {3, 4, 5}, {6, 7, 8}
    assert check_accumulated(code, state, held) is None
    assert check_accumulated(code, state, [{0, 1, 2}, {3, 4, 5}, {6, 8}]) == "task 7 is in no rank's accumulator"
    assert check_accumulated(code, state, [{0, 1, 2, 3}, {3, 4, 5}, {3, 6, 7, 8}]) == (
        "task 3 is accumulated by ranks 0, 1 and 2"
    )
    assert check_accumulated(code, state, [{0, 1, 2, 3}, {4, 5}, {6, 7, 8}]) is None  # any partition
    assert check_accumulated(code, state, [{0, 1, 2}, {3, 4, 5, 9}, {6, 7, 8}]) == (
        "rank 1 accumulated 9, not a result id in [0, 9)"
    )
    assert check_accumulated(code, state, [[0, 1, 2, 1], [3, 4, 5], [6, 7, 8]]) == "rank 0 accumulated result 1 twice"
    assert check_accumulated(code, state, held[:2]).startswith("got the accumulators of 2 ranks")
    # The first discrepancy: ranks' own entries first, then tasks in order.
    message = check_accumulated(code, state, [{0, 1}, {3, 4, 5, -1}, {6}])
    assert message == "rank 1 accumulated -1, not a result id in [0, 9)"
    assert check_accumulated(code, state, [{0, 1}, {3, 4, 5}, {6}]) == "task 2 is in no rank's accumulator"


def test_an_undecided_state_is_a_discrepancy():
    code = RepetitionCode(3, 9, 1.0)
    state = code.new_state()
    state.commit(0, 0)
    assert check_accumulated(code, state, [{0}, set(), set()]).startswith("the step is not decided: 8 of 9 tasks open")


def test_rank_level_discrepancies_are_named():
    code = make_code("frc", 4, 8, 2.0)  # two groups of two ranks, each covering the 8 tasks
    state = code.new_state()
    order = [r for group in code.groups for r in group]
    for r in order[:2]:  # the first group completes: decided
        state.commit(r, r)
    state.commit(order[2], order[2])  # too late: not used
    responders = set(state.responders)
    assert state.decided and responders == set(order[:2])
    held = [{r} if r in responders else set() for r in range(4)]
    assert check_accumulated(code, state, held) is None
    late = order[2]
    wrong = [set(h) for h in held]
    wrong[late] = {late}
    assert check_accumulated(code, state, wrong) == f"rank {late} accumulated result {late} but is not a responder"
    wrong = [set(h) for h in held]
    wrong[order[0]] = set()
    assert check_accumulated(code, state, wrong) == (
        f"rank {order[0]} is a responder but did not accumulate its result {order[0]}"
    )
    wrong = [set(h) for h in held]
    wrong[order[0]] = {order[0], order[1]}
    assert check_accumulated(code, state, wrong) == (
        f"rank {order[0]} accumulated result {order[1]}, which is not its own ({order[0]})"
    )


def test_cyclic_responders_hold_their_own_result():
    code = make_code("cyclic", 4, 8, 2.0)
    state = code.new_state()
    for r in (3, 1, 0):  # any n − s = 3 decode
        state.commit(r, r)
    assert state.decided
    assert check_accumulated(code, state, [{0}, {1}, set(), {3}]) is None
    assert check_accumulated(code, state, [{0}, {1}, {2}, {3}]) == "rank 2 accumulated result 2 but is not a responder"


def test_states_of_another_code_are_refused():
    code, state, held = decided_repetition()
    frc = make_code("frc", 3, 9, 3.0)
    with pytest.raises(CodeError, match="state"):
        check_accumulated(frc, state, held)
    with pytest.raises(CodeError, match="state"):
        check_accumulated(code, frc.new_state(), held)


@given(st.integers(1, 70).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1)))))
def test_results_round_trip_through_a_bitmask(case):
    num_results, results = case
    data = encode_results(results, num_results)
    assert len(data) == (num_results + 7) // 8
    assert data == pack_bits([j in results for j in range(num_results)])
    assert decode_results(data, num_results) == results


def test_malformed_results_are_refused():
    with pytest.raises(CodeError, match="twice"):
        encode_results([1, 2, 1], 4)
    with pytest.raises(CodeError, match="result id"):
        encode_results([4], 4)
    with pytest.raises(CodeError, match="result id"):
        encode_results([True], 4)
    with pytest.raises(CodeError, match="num_results"):
        encode_results([], 0)
    assert encode_results([np.int64(3)], 4) == bytes([0b00010000])
    assert decode_results(bytes(2), 9) == set()  # 9 results need 2 bytes, not 1 or 3
    with pytest.raises(CodeError, match="expected 2 bytes"):
        decode_results(bytes(3), 9)
    with pytest.raises(CodeError, match="padding"):
        decode_results(bytes([0, 1]), 9)
    with pytest.raises(CodeError, match="bytes"):
        decode_results("ab", 9)


def test_a_rank_without_work_holds_nothing():
    from codedgrad.profile import WorkerProfile

    late = WorkerProfile(100.0, 1.0, 0.0)  # its group's split gives it no task
    quick = WorkerProfile(0.0, 1.0, 0.0)
    code = make_code("frc", 4, 4, 2.0, [quick, quick, late, quick])
    assert code.queue(2) == []
    state = code.new_state()
    state.commit(0, 0)  # rank 0's block is its whole group's
    assert state.decided
    assert check_accumulated(code, state, [{0}, set(), set(), set()]) is None
    assert check_accumulated(code, state, [{0}, set(), {2}, set()]) == (
        "rank 2 has no result of its own but accumulated result 2"
    )
