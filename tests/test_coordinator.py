"""The Store protocol in one process: several StoreCoordinators, one per pretend rank, one TCPStore."""

from __future__ import annotations

import datetime
import socket
import threading

import pytest
import torch.distributed as dist

from codedgrad.codes import make_code
from codedgrad.runtime.coordinator import CodedStepTimeout, StoreCoordinator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def store():
    master = dist.TCPStore("127.0.0.1", free_port(), 1, True, timeout=datetime.timedelta(seconds=10))
    yield dist.PrefixStore("test", master)


def coordinators(store, world: int, timeout: float = 5.0) -> list[StoreCoordinator]:
    return [StoreCoordinator(store, rank, world, timeout) for rank in range(world)]


def test_first_commit_is_used_and_a_racing_identical_state_is_not_mistaken(store):
    code = make_code("repetition", 2, 4, redundancy=2.0)
    a, b = coordinators(store, 2)
    a.begin(0, code)
    b.begin(0, code)
    # Both ranks hold the same view and commit the same task: the resulting decoder bytes are
    # identical, only the header tells the two writes apart.
    assert a.commit(3) is True
    assert b.commit(3) is False
    assert b.commit(2) is True  # b's view was refreshed by the failed race
    assert a.refresh().is_needed(0, 2) is False


def test_decision_sets_the_flag_and_wakes_a_waiter(store):
    code = make_code("repetition", 2, 2, redundancy=1.0)
    a, b = coordinators(store, 2)
    a.begin(0, code)
    b.begin(0, code)
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(b.wait_decided().decided))
    waiter.start()
    assert a.commit(0) and a.commit(1)
    waiter.join(timeout=5)
    assert woke == [True]


def test_undecided_step_times_out_naming_what_is_missing(store):
    code = make_code("repetition", 3, 6, redundancy=1.0)
    ranks = coordinators(store, 3, timeout=0.3)
    for c in ranks:
        c.begin(0, code)
    for work in code.queue(0):
        ranks[0].commit(work.result)
    with pytest.raises(CodedStepTimeout, match=r"step 0 to be decided; still missing: 4 of 6 tasks open: rank 1's 2-3"):
        ranks[0].wait_decided()


def test_frc_waits_for_a_rank_and_names_it(store):
    code = make_code("frc", 2, 4, redundancy=1)
    ranks = coordinators(store, 2, timeout=0.3)
    ranks[0].begin(0, code)
    ranks[0].commit(code.queue(0)[0].result)
    with pytest.raises(CodedStepTimeout, match=r"frc: no exact cover.*ranks \[1\]"):
        ranks[0].wait_decided()


def test_arrival_timeout_names_the_absent_rank_and_fails_the_latecomer(store):
    code = make_code("repetition", 3, 3, redundancy=1.0)
    ranks = coordinators(store, 3, timeout=1.0)  # long enough that both waiting ranks are there
    for c in ranks:
        c.begin(0, code)
    errors = []

    def arrive(c):
        try:
            c.arrive_and_wait()
        except CodedStepTimeout as error:
            errors.append(str(error))

    threads = [threading.Thread(target=arrive, args=(c,)) for c in ranks[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert len(errors) == 2 and all("ranks [2]" in e for e in errors), errors
    with pytest.raises(CodedStepTimeout, match="but it was abandoned by rank"):
        ranks[2].arrive_and_wait()


def run_step(ranks: list[StoreCoordinator], step: int, code) -> None:
    """One step on every pretend rank: begin, commit the whole queue, arrive together."""
    for c in ranks:
        c.begin(step, code)
    for c in ranks:
        for work in code.queue(c.rank):
            c.commit(work.result)
    threads = [threading.Thread(target=c.arrive_and_wait) for c in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)


def test_finished_steps_leave_only_the_last_gate(store):
    code = make_code("repetition", 2, 4, redundancy=1.5)
    ranks = coordinators(store, 2)
    before = store.num_keys()
    for step in range(20):
        run_step(ranks, step, code)
        for c in ranks:
            c.finish()
        # The last finished step's gate stays until the next step finishes (see the next test).
        assert store.num_keys() == before + 1


def test_a_late_failure_finds_the_finished_step_completed(store):
    # Rank 1's release reduced step 0 while its compute thread was still in a task; every rank
    # finished step 0. When that task then fails, abandoning must report "already completed"
    # instead of sealing a deleted gate as abandoned (which would leave keys and fail rank 1 alone).
    code = make_code("repetition", 2, 4, redundancy=1.0)
    ranks = coordinators(store, 2)
    before = store.num_keys()
    run_step(ranks, 0, code)
    ranks[0].finish()
    assert ranks[1].abandon("ValueError: late") is False
    ranks[1].finish()
    run_step(ranks, 1, code)
    for c in ranks:
        c.finish()
    assert store.num_keys() == before + 1


def test_a_failed_steps_keys_go_when_the_next_step_finishes(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    ranks = coordinators(store, 2, timeout=0.3)
    before = store.num_keys()
    for c in ranks:
        c.begin(0, code)
    ranks[0].commit(code.queue(0)[0].result)
    assert ranks[0].abandon("ValueError: a bad batch") is True
    with pytest.raises(CodedStepTimeout, match="step 0 was abandoned by rank 0"):
        ranks[1].wait_decided()
    for c in ranks:
        c.leave_failed()
    assert store.num_keys() > before + 1
    run_step(ranks, 1, code)
    for c in ranks:
        c.finish()
    assert store.num_keys() == before + 1


def test_gather_returns_every_rank_in_order(store):
    ranks = coordinators(store, 3)
    out = {}
    threads = [
        threading.Thread(target=lambda c=c: out.__setitem__(c.rank, c.gather("x", bytes([c.rank])))) for c in ranks
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert all(out[r] == [b"\x00", b"\x01", b"\x02"] for r in range(3))


def test_a_failed_gather_retried_under_the_same_name_reads_only_the_new_values(store):
    ranks = coordinators(store, 2, timeout=0.3)
    before = store.num_keys()
    with pytest.raises(CodedStepTimeout, match=r"ranks \[1\] to publish 'plan'"):
        ranks[0].gather("plan", b"old 0")  # rank 1 is late ...
    with pytest.raises(CodedStepTimeout, match="abandoned by rank 0"):
        ranks[1].gather("plan", b"old 1")  # ... and finds the gather sealed as failed
    out = {}
    threads = [
        threading.Thread(target=lambda c=c: out.__setitem__(c.rank, c.gather("plan", b"new %d" % c.rank)))
        for c in ranks
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=5)
    assert out == {0: [b"new 0", b"new 1"], 1: [b"new 0", b"new 1"]}
    # Both attempts' keys go when the next step finishes; only that step's gate stays.
    run_step(ranks, 0, make_code("repetition", 2, 4, redundancy=1.0))
    for c in ranks:
        c.finish()
    assert store.num_keys() == before + 1


def test_poll_decided_sees_the_flag_or_gives_up_in_time(store):
    code = make_code("repetition", 2, 2, redundancy=1.0)
    a, b = coordinators(store, 2)
    a.begin(0, code)
    b.begin(0, code)
    assert b.poll_decided(0.05) is False
    assert a.commit(0) and a.commit(1)  # decides the step and sets the flag
    assert b.poll_decided(5.0) is True
