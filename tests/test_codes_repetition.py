"""Task-level repetition with backups: queue invariants, the decoder under any commit order (also
with spare work), and the backup order. The spare-work policy itself: test_codes_spare.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codedgrad.codes import CodeError, NotDecodable, RepetitionCode, make_code
from codedgrad.codes.simulate import coded_sum, random_interleaving, simulate_code
from codedgrad.plan import optimal_split, total_slots
from codedgrad.profile import WorkerProfile

# Six ranks, speeds 4× apart: two fast and steady, one medium, one medium but straggling (std 3× its
# mean), one slow straggler, one slow and steady.
STRAGGLING = [
    WorkerProfile(0.0, 0.25, 0.02),
    WorkerProfile(0.0, 0.25, 0.02),
    WorkerProfile(0.0, 0.5, 0.05),
    WorkerProfile(0.0, 0.5, 1.5),
    WorkerProfile(0.0, 1.0, 3.0),
    WorkerProfile(0.0, 1.0, 0.1),
]


def profiles_strategy(n: int):
    profile = st.builds(
        WorkerProfile,
        shift=st.sampled_from([0.0, 0.0, 0.3, 2.0]),
        mean=st.floats(0.1, 2.0),
        std=st.floats(0.0, 3.0),
    )
    return st.lists(profile, min_size=n, max_size=n)


@st.composite
def plans(draw):
    """A random repetition code (ranks, tasks, redundancy, profiles, gamma, backup order)."""
    n = draw(st.integers(1, 7))
    k = draw(st.integers(n, 30))
    omega = draw(st.floats(1.0, float(min(n, 3))))
    profiles = draw(st.one_of(st.none(), profiles_strategy(n)))
    gamma = draw(st.sampled_from([0.0, 0.5, 1.0, 4.0]))
    order = draw(st.sampled_from(["risk", "risk", "tail", "task"]))
    return RepetitionCode(n, k, omega, profiles, gamma, order)


def check_queue_invariants(code: RepetitionCode) -> None:
    k = code.num_tasks
    assert code.primaries.sum() == k
    assert sum(len(code.queue(r)) for r in range(code.num_ranks)) == total_slots(k, code.redundancy)
    start = 0
    for r in range(code.num_ranks):
        queue = code.queue(r)
        tasks = [w.tasks[0] for w in queue]
        assert all(w.tasks == (w.result,) and w.coefficients == (1.0,) for w in queue)
        primaries = tasks[: code.primaries[r]]
        assert primaries == list(range(start, start + code.primaries[r]))  # contiguous, in rank order
        start += code.primaries[r]
        assert len(set(tasks)) == len(tasks)  # no task twice on a rank
        for j in tasks[code.primaries[r] :]:
            assert code.primary_of[j] != r  # never a backup on the task's own primary
        assert tasks[code.primaries[r] :] == code.backups[r]
    assert start == k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_queue_invariants(code):
    check_queue_invariants(code)
    # Backups are spread: a task j with c backups was passed over for a (c+1)-th only when every rank
    # not holding it was full, so any other task's backups beyond c + 1 sit on ranks holding j.
    holders = [code.holders(j) for j in range(code.num_tasks)]
    for i, j in itertools.product(range(code.num_tasks), repeat=2):
        assert len(set(holders[i][1:]) - set(holders[j])) <= len(holders[j]) - 1 + 1, (i, j)


def test_queue_invariants_spread_on_a_fixed_example():
    code = RepetitionCode(6, 60, 1.5, STRAGGLING)
    check_queue_invariants(code)
    copies = [len(code.holders(j)) - 1 for j in range(60)]
    assert sorted(set(copies)) == [0, 1]  # 30 backups, 60 tasks: nobody backed up twice
    code = RepetitionCode(6, 60, 2.5, STRAGGLING)
    copies = [len(code.holders(j)) - 1 for j in range(60)]
    assert sorted(set(copies)) == [1, 2]  # 90 backups: everybody once, then 30 a second time


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans(), st.integers(0, 2**31), st.data())
def test_decoder_under_random_interleavings(code, seed, data):
    stragglers = set(data.draw(st.lists(st.integers(0, code.num_ranks - 1), max_size=2)))
    state, commits = random_interleaving(code, stragglers, seed)
    # Replay the same commits on a fresh state, checking every intermediate state.
    replay = code.new_state()
    covered: set[int] = set()
    for rank, result, used in commits:
        before = code.state_from_bytes(replay.to_bytes())  # what another rank would rebuild
        assert before.to_bytes() == replay.to_bytes() and before.decided == replay.decided
        assert [before.is_needed(rank, j) for j in range(code.num_tasks)] == [
            replay.is_needed(rank, j) for j in range(code.num_tasks)
        ]
        answer = replay.commit(rank, result)
        assert answer == used == (result not in covered)
        assert before.commit(rank, result) == answer and before.to_bytes() == replay.to_bytes()
        covered.add(result)
        assert replay.decided == (len(covered) == code.num_tasks)  # decided exactly when all covered
    assert replay.to_bytes() == state.to_bytes()
    used_tasks = [result for _, result, used in commits if used]
    assert len(used_tasks) == len(set(used_tasks))  # each task used at most once ...
    assert state.decided == code.tolerates(stragglers)
    if state.decided:
        assert sorted(used_tasks) == list(range(code.num_tasks))  # ... and exactly once when decided
        assert state.decoding().rank_coefficients.tolist() == [1.0] * code.num_ranks
    else:
        with pytest.raises(NotDecodable):
            state.decoding()


REPETITION_CASES = [
    # (n, K, Ω, heterogeneous profiles?)
    (3, 7, 1.5, False),
    (4, 4, 3.0, False),
    (5, 12, 1.4, True),
    (6, 18, 2.0, True),
    (7, 15, 1.0, True),
    (8, 20, 1.25, True),
    (8, 30, 1.6, True),
]


@pytest.mark.parametrize(("n", "k", "omega", "heterogeneous"), REPETITION_CASES)
def test_every_straggler_set_decodes_exactly_or_is_refused(n, k, omega, heterogeneous):
    rng = np.random.default_rng(n)
    profiles = (
        [WorkerProfile(0.0, m, m * rng.uniform(0, 2)) for m in rng.uniform(0.25, 1, n)] if heterogeneous else None
    )
    code = make_code("repetition", n, k, omega, profiles)
    gradients = rng.standard_normal((k, 3))
    truth = gradients.sum(axis=0)
    for size in range(n + 1):
        for stragglers in itertools.combinations(range(n), size):
            claim = code.tolerates(stragglers)
            # The claim, computed independently: every task has a holder outside the stragglers.
            queues = [{w.result for w in code.queue(r)} for r in range(n) if r not in stragglers]
            assert claim == (set().union(*queues) == set(range(k)))
            for seed in range(3):
                state, commits = random_interleaving(code, set(stragglers), seed)
                assert state.decided == claim
                if claim:
                    error = np.linalg.norm(coded_sum(code, state, commits, gradients) - truth) / np.linalg.norm(truth)
                    assert error <= 1e-10
                # With spare work (the runtime's no-wait release) any live rank finishes the step.
                state, commits = random_interleaving(code, set(stragglers), seed, spare_work=True)
                assert state.decided == (size < n)
                if state.decided:
                    error = np.linalg.norm(coded_sum(code, state, commits, gradients) - truth) / np.linalg.norm(truth)
                    assert error <= 1e-10


def test_backups_follow_the_risk_order():
    code = RepetitionCode(6, 120, 1.1, STRAGGLING)
    order = {j: i for i, j in enumerate(code._priority())}
    for backups in code.backups:
        assert [order[j] for j in backups] == sorted(order[j] for j in backups)  # most needed first
    first_copies = sorted((j for b in code.backups for j in b), key=order.get)
    risk = code.risk[first_copies]
    assert np.all(np.diff(risk) <= 0)
    # The riskiest task is the last primary of the straggling slow rank, and it is the first backup
    # of some rank; steady ranks whose expected finish is well before the makespan get no backups.
    riskiest = int(np.argmax(code.risk))
    assert code.primary_of[riskiest] == 4 and riskiest == int(np.flatnonzero(code.primary_of == 4)[-1])
    assert any(b and b[0] == riskiest for b in code.backups)
    backed_up = {j for b in code.backups for j in b}
    assert not backed_up & set(np.flatnonzero(code.primary_of == 0))


def test_risk_order_beats_naive_orders_in_simulation():
    """Same primaries, same number of backups per rank, same random numbers: only the order differs."""
    steps = 1500
    times = {
        order: simulate_code(RepetitionCode(6, 120, 1.1, STRAGGLING, backup_order=order), STRAGGLING, steps).mean()
        for order in ("risk", "tail", "task")
    }
    assert times["risk"] < 0.90 * times["task"], times
    assert times["risk"] < 0.97 * times["tail"], times


def test_homogeneous_backups_interleave_the_tails():
    code = RepetitionCode(4, 40, 1.1)  # 4 backups: the last task of each rank
    firsts = sorted(j for b in code.backups for j in b)
    assert firsts == [9, 19, 29, 39]


def test_tolerates_and_missing():
    code = RepetitionCode(3, 9, 1.0)
    assert code.tolerates([])
    assert not code.tolerates([1])
    state = code.new_state()
    for j in (0, 1, 2, 3, 5, 6, 7):
        state.commit(0, j)
    assert state.missing() == "2 of 9 tasks open: rank 1's 4, rank 2's 8"
    code = RepetitionCode(3, 9, 2.0, [WorkerProfile(0, 1, 1)] * 3)
    assert all(code.tolerates([r]) for r in range(3))
    assert code.tolerates([])


def test_state_bytes_are_a_bitmask_and_malformed_ones_are_rejected():
    code = RepetitionCode(4, 20, 1.25)
    state = code.new_state()
    assert state.to_bytes() == bytes(3)
    state.commit(0, 0)
    state.commit(3, 19)
    assert state.to_bytes() == bytes([0b10000000, 0, 0b00010000])
    with pytest.raises(CodeError, match="bytes"):
        code.state_from_bytes(bytes(2))
    with pytest.raises(CodeError, match="padding"):
        code.state_from_bytes(bytes([0, 0, 1]))
    with pytest.raises(CodeError, match="result"):
        state.commit(1, 20)


def test_bad_arguments():
    with pytest.raises(CodeError, match="backup_order"):
        RepetitionCode(2, 4, 1.5, backup_order="random")
    with pytest.raises(CodeError, match="redundancy"):
        RepetitionCode(2, 4, 2.5)
    with pytest.raises(CodeError, match="profiles"):
        RepetitionCode(2, 4, 1.5, [WorkerProfile(0, 1, 1)])


def test_primaries_are_the_optimal_split():
    code = RepetitionCode(6, 120, 1.25, STRAGGLING, gamma=0.5)
    np.testing.assert_array_equal(code.primaries, optimal_split(STRAGGLING, 120, 1.0, 0.5))
    totals = [len(code.queue(r)) for r in range(6)]
    np.testing.assert_array_equal(totals, optimal_split(STRAGGLING, 120, 1.25, 0.5, capacity=120))


def test_expected_excess_is_the_normal_partial_expectation():
    from scipy.integrate import quad
    from scipy.stats import norm

    from codedgrad.codes.repetition import _expected_excess

    mean = np.array([0.0, 1.0, 3.0, -2.0, 2.5, 2.5, 2.0])
    std = np.array([1.0, 0.5, 2.0, 0.3, 0.0, 1e-300, 0.0])
    got = _expected_excess(mean, std, 2.0)
    for m, s, value in zip(mean, std, got):
        if s == 0 or s < 1e-100:  # (nearly) deterministic: F = m
            assert value == max(m - 2.0, 0.0)
        else:  # integrate (x − 2)·pdf(x) over x > 2 numerically
            expected, _ = quad(lambda x, m=m, s=s: (x - 2.0) * norm.pdf(x, m, s), 2.0, np.inf)
            assert value == pytest.approx(expected, rel=1e-8, abs=1e-12)


def _matching_size(tasks: list[int], slot_ranks: list[int], primary_of: np.ndarray) -> int:
    """Largest number of ``tasks`` that fit one each into the slots (slot s on rank slot_ranks[s],
    never on the task's primary), by scipy's bipartite matching: an oracle independent of _place."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    if not tasks or not slot_ranks:
        return 0
    edges = np.array([[primary_of[j] != p for p in slot_ranks] for j in tasks], dtype=np.int8)
    matched = maximum_bipartite_matching(csr_matrix(edges), perm_type="column")
    return int(np.count_nonzero(matched >= 0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_first_backups_go_to_the_riskiest_tasks_any_arrangement_can_place(code):
    """Round 1 gives a first copy to the tasks the greedy over the priority order would pick with an
    exact matching at every step: a task is passed over only when, with the riskier tasks already
    placed, no arrangement of the slots can also place it (the transversal-matroid greedy)."""
    slot_ranks = [r for r, b in enumerate(code.backups) for _ in b]
    chosen: list[int] = []
    for j in code._priority():
        if len(chosen) == len(slot_ranks):
            break
        if _matching_size([*chosen, j], slot_ranks, code.primary_of) == len(chosen) + 1:
            chosen.append(j)
    # A task passed over in round 1 stays passed over (the ranks that could take it are full for
    # good), so the tasks with at least one copy are exactly round 1's.
    assert {j for b in code.backups for j in b} == set(chosen)
