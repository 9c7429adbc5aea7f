"""The spare-work policy (codedgrad.codes.spare): which open task an idle rank takes, and when."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codedgrad.codes import CodeError, RepetitionCode, make_code
from codedgrad.codes.spare import next_spare_check, spare_work
from codedgrad.profile import WorkerProfile


def test_spare_work_takes_from_the_tail_of_the_rank_most_behind():
    code = RepetitionCode(3, 30, 1.0, [WorkerProfile(0, 1, 0), WorkerProfile(0, 1, 0), WorkerProfile(0, 3, 0)])
    state = code.new_state()
    slow = np.flatnonzero(code.primary_of == 2)
    for j in range(slow[0] - 1):  # ranks 0 and 1 are done but for one task
        state.commit(0, j)
    work = spare_work(state, 0)
    assert work.tasks == (work.result,) and work.result == slow[-1]  # the slow rank is most behind
    assert spare_work(state, 1).result != work.result  # two idle ranks: different tasks
    assert spare_work(state, 1).result in slow[len(slow) // 2 :]  # from the back half
    for j in range(30):
        state.commit(1, j)
    assert spare_work(state, 0) is None


def test_timed_spare_work_helps_only_when_it_can_end_the_step_sooner():
    # Three identical, quiet ranks (tasks of exactly 1 s), 4 primaries each.
    code = RepetitionCode(3, 12, 1.0, [WorkerProfile(0, 1, 0)] * 3)
    state = code.new_state()
    for j in range(8):  # ranks 0 and 1 are done; rank 2 has done none of its tasks 8-11
        state.commit(0, j)
    # Early on, rank 2 has about 4 s left: a helper needing 1 s pays off.
    assert spare_work(state, 0, elapsed=0.5).result == 11
    for j in (8, 9, 10):
        state.commit(2, j)
    # At 3.9 s, on schedule, rank 2 is 0.9 s into its last task: it will finish before a helper.
    assert spare_work(state, 0, elapsed=3.9) is None
    assert spare_work(state, 0) is not None  # without a clock: whatever is open
    # Ask again once rank 2 is late by more than half a task (quiet: no noise to allow for).
    retry = next_spare_check(state, 0, elapsed=3.9)
    assert retry == pytest.approx(4.5)
    assert spare_work(state, 0, elapsed=retry).result == 11  # overdue: perhaps stalled, so help
    # A noisy owner (exponential tasks): its task in flight has, memoryless, a mean task left.
    noisy = RepetitionCode(2, 6, 1.0, [WorkerProfile(0, 0.5, 0.0), WorkerProfile(0, 2.0, 2.0)])
    assert list(noisy.primaries) == [5, 1]  # rank 1 owns task 5
    state = noisy.new_state()
    for j in range(5):
        state.commit(0, j)
    assert spare_work(state, 0, elapsed=2.5).result == 5  # 2 s expected left against a 0.5 s task
    assert spare_work(state, 0, elapsed=3.9).result == 5  # still 2 s: memoryless (not yet overdue)
    state.commit(1, 5)
    assert spare_work(state, 0, elapsed=3.0) is None and next_spare_check(state, 0, 3.0) is None  # decided


def test_owners_in_chunks_are_helped_only_once_overdue():
    # The same quiet ranks, but owners commit chunks all or none: rank 2's 4 open tasks may all be in
    # one chunk in flight, and a copy of one would void it, so no help while it is on schedule.
    code = RepetitionCode(3, 12, 1.0, [WorkerProfile(0, 1, 0)] * 3)
    state = code.new_state()
    for j in range(8):
        state.commit(0, j)
    assert spare_work(state, 0, elapsed=0.5) is not None  # single tasks: worth helping early
    assert spare_work(state, 0, elapsed=0.5, owners_in_chunks=True) is None
    assert spare_work(state, 0, owners_in_chunks=True) is not None  # no clock yet: whatever is open
    retry = next_spare_check(state, 0, elapsed=0.5)
    assert retry == pytest.approx(4.5)  # overdue after its 4 tasks and half a task
    assert spare_work(state, 0, elapsed=retry - 0.01, owners_in_chunks=True) is None
    assert spare_work(state, 0, elapsed=retry, owners_in_chunks=True).result in (10, 11)


@pytest.mark.parametrize("name", ["frc", "cyclic"])
def test_rank_level_codes_have_no_spare_work(name):
    code = make_code(name, 4, 8, 2.0)
    state = code.new_state()
    state.commit(0, 0)
    for rank in range(4):
        assert spare_work(state, rank) is None and spare_work(state, rank, elapsed=100.0) is None
        assert next_spare_check(state, rank, 0.0) is None


def test_a_rank_out_of_range_is_refused():
    state = RepetitionCode(3, 9, 1.0).new_state()
    with pytest.raises(CodeError, match="rank"):
        spare_work(state, 3)
    with pytest.raises(CodeError, match="rank"):
        next_spare_check(state, -1, 0.0)


@st.composite
def open_states(draw):
    """A repetition code with some tasks covered, and an idle rank."""
    n = draw(st.integers(1, 6))
    k = draw(st.integers(n, 30))
    profiles = draw(
        st.lists(
            st.builds(
                WorkerProfile,
                shift=st.sampled_from([0.0, 0.5]),
                mean=st.floats(0.1, 2.0),
                std=st.floats(0.0, 3.0),
            ),
            min_size=n,
            max_size=n,
        )
    )
    code = RepetitionCode(n, k, draw(st.floats(1.0, float(min(n, 2)))), profiles)
    state = code.new_state()
    for j in draw(st.sets(st.integers(0, k - 1))):
        state.commit(0, j)
    return code, state, draw(st.integers(0, n - 1))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(open_states(), st.floats(0.0, 100.0))
def test_spare_work_offers_an_open_task_and_keeps_its_promise(case, elapsed):
    code, state, rank = case
    before = state.to_bytes()
    open_tasks = [j for j in range(code.num_tasks) if state.is_needed(rank, j)]
    offered = spare_work(state, rank)
    timed = spare_work(state, rank, elapsed=elapsed)
    retry = next_spare_check(state, rank, elapsed)
    assert state.to_bytes() == before  # a policy: it reads the state, never changes it
    if state.decided:
        assert offered is None and timed is None and retry is None
        return
    assert offered is not None and offered.result in open_tasks and offered.tasks == (offered.result,)
    assert timed is None or timed.result in open_tasks
    # Some owner with open tasks becomes overdue at `retry`; asking then finds work.
    assert retry is not None
    assert spare_work(state, rank, elapsed=retry) is not None
    assert spare_work(state, rank, elapsed=max(retry, elapsed)) is not None
