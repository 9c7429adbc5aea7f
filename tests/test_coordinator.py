"""The Store protocol in one process: one TCPStore, one StoreCoordinator per pretend rank.

Each pretend rank talks to the Store through connections of its own, as a real rank would (one for
its compute thread, one for its wait client); threads stand in for ranks that must wait
concurrently. Every test works in a namespace of its own on one TCPStore server per module, and
the ranks' connections are opened once per module: in some sandboxes an occasional TCP connect
stalls for seconds, and a fresh server and fresh clients per test would open hundreds.
"""

from __future__ import annotations

import datetime
import itertools
import threading
import time
from collections.abc import Callable

import pytest
import torch.distributed as dist

from codedgrad.codes import make_code
from codedgrad.runtime.coordinator import (
    CodedStepTimeout,
    StepChannel,
    StepMismatchError,
    StoreCoordinator,
    weights_digest,
)

DIGEST = weights_digest([1.0, 1.0, 1.0, 1.0])
MAX_RANKS = 4
_STORE_TIMEOUT = datetime.timedelta(seconds=10)
_namespaces = itertools.count()


class Namespace(dist.PrefixStore):
    """A test's namespace on the module's server, seen through the server's own client."""

    def __init__(self, prefix: str, master: dist.TCPStore, connections: list[tuple[dist.Store, dist.Store]]) -> None:
        super().__init__(prefix, master)
        self.prefix = prefix
        self.connections = connections


class RankClient:
    """A pretend rank's compute client in a namespace; ``clone()`` gives its wait client.

    Both are that rank's own connections to the server (opened once per module, see above).
    """

    def __init__(self, prefix: str, compute: dist.Store, wait: dist.Store) -> None:
        self._store = dist.PrefixStore(prefix, compute)
        self._wait = dist.PrefixStore(prefix, wait)

    def clone(self) -> dist.Store:
        return self._wait

    def __getattr__(self, name: str):
        return getattr(self._store, name)


@pytest.fixture(scope="module")
def server():
    master = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=_STORE_TIMEOUT)

    def connect() -> dist.TCPStore:
        return dist.TCPStore("127.0.0.1", master.port, is_master=False, timeout=_STORE_TIMEOUT, wait_for_workers=False)

    connections = [(connect(), connect()) for _ in range(MAX_RANKS)]
    yield master, connections


@pytest.fixture
def master(server):
    """The server's client: its num_keys counts every key, of every test's namespace."""
    return server[0]


@pytest.fixture
def store(server) -> Namespace:
    master, connections = server
    return Namespace(f"test{next(_namespaces)}", master, connections)


def coordinators(store: Namespace, world: int, timeout: float = 5.0) -> list[StoreCoordinator]:
    """One coordinator per pretend rank, each on its own connections to the Store."""
    assert world <= MAX_RANKS
    return [
        StoreCoordinator(RankClient(store.prefix, *store.connections[rank]), rank, world, timeout)
        for rank in range(world)
    ]


def channels(ranks, step: int, code, version: int = 0, digest: bytes = DIGEST, wait: bool = False) -> list[StepChannel]:
    return [c.channel(step, code, version, digest, wait=wait) for c in ranks]


def run_threads(*targets: Callable[[], object], join: float = 10.0) -> list[tuple[str, object]]:
    """Run the targets concurrently; per target ("ok", return value) or ("error", the exception)."""
    outcomes: list[tuple[str, object]] = [("missing", None)] * len(targets)

    def call(i: int, target: Callable[[], object]) -> None:
        try:
            outcomes[i] = ("ok", target())
        except BaseException as error:  # the test asserts on it
            outcomes[i] = ("error", error)

    threads = [threading.Thread(target=call, args=(i, t), daemon=True) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=join)
    assert not any(t.is_alive() for t in threads), "a pretend rank is still waiting"
    return outcomes


def commit_queues(chans: list[StepChannel], code) -> list[list[int]]:
    """Every rank commits its whole queue (rank by rank); returns what each must accumulate."""
    accumulated: list[list[int]] = [[] for _ in chans]
    for channel in chans:
        for work in code.queue(channel.rank):
            if channel.commit(work.result):
                accumulated[channel.rank].append(work.result)
    return accumulated


def run_step(ranks: list[StoreCoordinator], step: int, code, done: bool = True) -> None:
    """One successful step on every pretend rank: begin, commit the queues, arrive together, step_done."""
    chans = channels(ranks, step, code)
    for channel in chans:
        channel.begin()
    accumulated = commit_queues(chans, code)
    decided = [c.refresh() for c in chans]
    assert all(d.decided for d in decided)
    outcomes = run_threads(*(lambda c=c: c.arrive_and_wait(decided[c.rank], accumulated[c.rank]) for c in chans))
    assert [kind for kind, _ in outcomes] == ["ok"] * len(ranks), outcomes
    if done:
        for c in ranks:
            c.step_done(step)


# ----------------------------------------------------------------- begin: one plan, one set of weights


def test_weights_digest_is_8_bytes_and_tells_weights_apart():
    assert len(DIGEST) == 8
    assert weights_digest([1, 1, 1, 1]) == DIGEST  # ints and floats of the same value agree
    assert weights_digest([1.0, 1.0, 1.0, 2.0]) != DIGEST
    assert weights_digest([1.0, 1.0, 1.0]) != DIGEST


def test_the_first_begin_creates_the_state_and_later_ones_read_it(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    a, b = coordinators(store, 2)
    assert a.step_exists(0) is None
    first = a.channel(0, code, 3, DIGEST, wait=False)
    assert not first.begin().decided and first.sequence == 0
    assert a.step_exists(0) == (3, DIGEST)
    assert b.step_exists(0) == (3, DIGEST)
    assert first.commit(0) is True and first.sequence == 1
    late = b.channel(0, code, 3, DIGEST, wait=False)
    state = late.begin()  # reads rank 0's state, commit included, instead of starting over
    assert late.sequence == 1 and not state.is_needed(1, 0) and state.is_needed(1, 1)
    assert a.step_exists(1) is None


def test_begin_refuses_another_plan_version(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    a, b = coordinators(store, 2)
    a.channel(0, code, 1, DIGEST, wait=False).begin()
    with pytest.raises(StepMismatchError, match=r"rank 1 began step 0 with plan version different from rank 0's"):
        b.channel(0, code, 2, DIGEST, wait=False).begin()
    # The state is rank 0's, untouched by the refused begin.
    assert b.step_exists(0) == (1, DIGEST)


def test_begin_refuses_other_task_weights(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    a, b = coordinators(store, 2)
    a.channel(5, code, 1, DIGEST, wait=False).begin()
    other = weights_digest([1.0, 1.0, 1.0, 0.5])
    with pytest.raises(StepMismatchError, match=rf"step 5 with task weights different.*{other.hex()} against"):
        b.channel(5, code, 1, other, wait=False).begin()


# ----------------------------------------------------------------- commits


def test_first_commit_is_used_and_a_racing_identical_state_is_not_mistaken(store):
    code = make_code("repetition", 2, 4, redundancy=2.0)
    a, b = channels(coordinators(store, 2), 0, code)
    a.begin()
    b.begin()
    # Both ranks hold the same view and commit the same task: the resulting decoder bytes are
    # identical, only the header tells the two writes apart.
    assert a.commit(3) is True
    assert b.commit(3) is False
    assert b.commit_round_trips == 1  # one lost race, then the task was covered: no second write
    assert b.sequence == 1  # b's view was refreshed by the failed race
    assert b.commit(2) is True
    assert b.commit_round_trips == 2  # one round trip when nobody committed in between
    assert a.refresh().is_needed(0, 2) is False
    assert a.sequence == 2


def test_a_race_on_different_tasks_keeps_both_commits(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    a, b = channels(coordinators(store, 2), 0, code)
    a.begin()
    b.begin()
    assert a.commit(0) is True
    assert b.commit(2) is True  # b's compare-and-set fails once, then re-applies on a's state
    assert b.commit_round_trips == 2
    assert a.refresh().open_tasks() == [1, 3]


def test_commits_after_the_decision_are_not_used(store):
    code = make_code("frc", 4, 4, redundancy=2)
    chans = channels(coordinators(store, 4), 0, code)
    for c in chans:
        c.begin()
    # Ranks 0 and 1 compute the same tasks: both are used while the step is open (0 and 1 alone do
    # not decode); rank 3's result, committed after rank 2's decided the step, is not.
    assert commit_queues(chans, code) == [[0], [1], [2], []]
    assert chans[3].refresh().responders == (0, 1, 2)
    trips = chans[3].commit_round_trips
    assert chans[3].commit(3) is False and chans[3].commit_round_trips == trips  # known decided: no round trip


def test_commit_after_the_keys_were_deleted_fails_loudly(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    ranks = coordinators(store, 2)
    a, _ = channels(ranks, 0, code)
    a.begin()
    ranks[0].step_done(0)
    with pytest.raises(RuntimeError, match="the Store lost the state of step 0"):
        a.commit(0)


# ----------------------------------------------------------------- waiting for the decision


def test_decision_sets_the_flag_and_wakes_a_waiter_on_the_wait_client(store):
    code = make_code("repetition", 2, 2, redundancy=1.0)
    ranks = coordinators(store, 2)
    assert all(c.has_wait_client for c in ranks)
    a = ranks[0].channel(0, code, 0, DIGEST, wait=False)
    b = ranks[1].channel(0, code, 0, DIGEST, wait=True)
    assert b.client is ranks[1].wait_store and a.client is ranks[0].store
    a.begin()
    b.begin()
    woke = []
    waiter = threading.Thread(target=lambda: woke.append(b.wait_decided().decided))
    waiter.start()
    assert a.commit(0) and a.commit(1)
    waiter.join(timeout=5)
    assert woke == [True]


def test_undecided_step_times_out_naming_what_is_missing(store):
    code = make_code("repetition", 3, 6, redundancy=1.0)
    chans = channels(coordinators(store, 3, timeout=0.3), 0, code)
    for c in chans:
        c.begin()
    for work in code.queue(0):
        chans[0].commit(work.result)
    start = time.monotonic()
    with pytest.raises(
        CodedStepTimeout,
        match=r"rank 0 waited 0.3 s without progress for step 0 to be decided; "
        r"still missing: 4 of 6 tasks open: rank 1's 2-3, rank 2's 4-5",
    ):
        chans[0].wait_decided()
    assert 0.3 <= time.monotonic() - start < 2.0


def test_frc_waits_for_a_rank_and_names_it(store):
    code = make_code("frc", 2, 4, redundancy=1)
    a, _ = channels(coordinators(store, 2, timeout=0.3), 0, code)
    a.begin()
    a.commit(code.queue(0)[0].result)
    with pytest.raises(CodedStepTimeout, match=r"frc: no exact cover.*responders \[0\].*ranks \[1\]"):
        a.wait_decided()


def test_a_wait_outlasts_its_timeout_while_other_ranks_keep_committing(store):
    code = make_code("repetition", 2, 12, redundancy=1.0)
    waiting, working = channels(coordinators(store, 2, timeout=0.3), 0, code)
    waiting.begin()
    working.begin()
    for work in code.queue(0):
        waiting.commit(work.result)

    def work_slowly():
        for work in code.queue(1):  # 6 tasks, 0.12 s apart: ≈ 0.7 s, more than twice the timeout
            time.sleep(0.12)
            assert working.commit(work.result)

    start = time.monotonic()
    worker = threading.Thread(target=work_slowly)
    worker.start()
    try:
        assert waiting.wait_decided().decided
    finally:
        worker.join(timeout=5)
    assert time.monotonic() - start > 0.6


def test_a_wait_outlasts_its_timeout_while_this_rank_is_busy_then_times_out(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    a, _ = channels(coordinators(store, 2, timeout=0.3), 0, code)
    a.begin()
    start = time.monotonic()
    busy_until = start + 0.9  # three timeouts of own work, without a single commit
    with pytest.raises(CodedStepTimeout, match=r"without progress for step 0.*4 of 4 tasks open"):
        a.wait_decided(busy=lambda: time.monotonic() < busy_until)
    elapsed = time.monotonic() - start
    # About a timeout after the last time it saw busy() (it looks every timeout/2).
    assert 0.9 + 0.3 / 2 - 0.05 <= elapsed < 3.0, elapsed


def test_a_busy_wait_ends_when_the_step_is_decided(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    waiting, deciding = channels(coordinators(store, 2, timeout=0.3), 0, code)
    waiting.begin()
    deciding.begin()
    busy = threading.Event()
    busy.set()

    def decide_late():
        time.sleep(0.8)
        for task in range(4):
            deciding.commit(task)

    worker = threading.Thread(target=decide_late)
    start = time.monotonic()
    worker.start()
    try:
        assert waiting.wait_decided(busy=busy.is_set).decided
    finally:
        worker.join(timeout=5)
    assert time.monotonic() - start >= 0.8


def test_a_decided_state_is_found_without_its_flag(store):
    # The decider crashed between its commit and the flag: the waiter must still see the decision.
    code = make_code("repetition", 2, 2, redundancy=1.0)
    a, b = channels(coordinators(store, 2, timeout=0.3), 0, code)
    a.begin()
    b.begin()
    assert a.commit(0) and a.commit(1)
    store.delete_key("s0/decided")
    start = time.monotonic()
    assert b.wait_decided().decided
    assert time.monotonic() - start < 0.3


def test_an_abandoned_step_wakes_the_decision_waiter_at_once(store):
    code = make_code("repetition", 2, 4, redundancy=1.0)
    ranks = coordinators(store, 2, timeout=5.0)
    a = ranks[0].channel(0, code, 0, DIGEST, wait=False)
    b = ranks[1].channel(0, code, 0, DIGEST, wait=True)
    a.begin()
    b.begin()
    a.commit(0)

    def abandon_soon():
        time.sleep(0.2)
        assert a.abandon("ValueError: a bad batch") is True

    start = time.monotonic()
    thread = threading.Thread(target=abandon_soon)
    thread.start()
    try:
        with pytest.raises(CodedStepTimeout, match=r"step 0 was abandoned by rank 0 \(ValueError: a bad batch\)"):
            b.wait_decided()
    finally:
        thread.join(timeout=5)
    assert time.monotonic() - start < 2.0  # woken by the flag, not by the 5 s timeout


def test_poll_decided_sees_the_flag_or_gives_up_in_time(store):
    code = make_code("repetition", 2, 2, redundancy=1.0)
    a, b = channels(coordinators(store, 2), 0, code)
    a.begin()
    b.begin()
    start = time.monotonic()
    assert b.poll_decided(0.05) is False
    assert 0.05 <= time.monotonic() - start < 0.5
    assert a.commit(0) and a.commit(1)  # decides the step and sets the flag
    assert b.poll_decided(5.0) is True


# ----------------------------------------------------------------- arrival and the accounts


@pytest.mark.parametrize(
    ("name", "world", "tasks", "redundancy"),
    [("repetition", 3, 6, 1.0), ("repetition", 3, 6, 2.0), ("frc", 4, 4, 2), ("uncoded", 2, 4, 1.0)],
)
def test_matching_accounts_pass_on_every_rank(store, name, world, tasks, redundancy):
    code = make_code(name, world, tasks, redundancy=redundancy)
    ranks = coordinators(store, world)
    run_step(ranks, 0, code, done=False)
    assert store.get("s0/gate") == b"go"


def arrive_everywhere(chans, decided, accumulated) -> list[tuple[str, object]]:
    return run_threads(*(lambda c=c: c.arrive_and_wait(decided, accumulated[c.rank]) for c in chans))


def prepared_step(store, name, world, tasks, timeout=5.0):
    code = make_code(name, world, tasks, redundancy=1.0)
    chans = channels(coordinators(store, world, timeout=timeout), 0, code)
    for c in chans:
        c.begin()
    accumulated = commit_queues(chans, code)
    decided = chans[0].refresh()
    assert decided.decided
    return chans, decided, accumulated


def assert_refused_everywhere(outcomes, message: str) -> None:
    assert [kind for kind, _ in outcomes] == ["error"] * len(outcomes), outcomes  # nobody got through
    for _, error in outcomes:
        assert isinstance(error, StepMismatchError), repr(error)
        assert message in str(error), str(error)


def test_a_committed_task_missing_from_every_accumulator_fails_every_rank(store):
    chans, decided, accumulated = prepared_step(store, "repetition", 3, 6)
    accumulated[1].remove(3)  # committed, never added (an exception between commit and accumulation)
    outcomes = arrive_everywhere(chans, decided, accumulated)
    assert_refused_everywhere(outcomes, "task 3 is in no rank's accumulator")
    assert store.get("s0/gate").startswith(b"abandoned: ")


def test_a_task_in_two_accumulators_fails_every_rank(store):
    chans, decided, accumulated = prepared_step(store, "repetition", 3, 6)
    accumulated[0].append(2)  # rank 1's task, added on rank 0 as well
    outcomes = arrive_everywhere(chans, decided, accumulated)
    assert_refused_everywhere(outcomes, "task 2 is accumulated by ranks 0 and 1")


def test_a_rank_level_result_of_a_non_responder_fails_every_rank(store):
    code = make_code("frc", 4, 4, redundancy=2)
    chans = channels(coordinators(store, 4), 0, code)
    for c in chans:
        c.begin()
    accumulated = commit_queues([chans[0], chans[2], chans[1], chans[3]], code)
    assert accumulated == [[0], [], [2], []]
    accumulated[1] = [1]  # rank 1's commit came after the decision: it must not be in the sum
    outcomes = arrive_everywhere(chans, chans[0].refresh(), accumulated)
    assert_refused_everywhere(outcomes, "rank 1 accumulated result 1 but is not a responder")


def test_arrival_timeout_names_the_absent_rank_and_fails_the_latecomer(store):
    chans, decided, accumulated = prepared_step(store, "repetition", 3, 3, timeout=0.5)
    start = time.monotonic()
    outcomes = arrive_everywhere(chans[:2], decided, accumulated)
    assert time.monotonic() - start < 3.0
    assert [kind for kind, _ in outcomes] == ["error", "error"], outcomes
    for _, error in outcomes:
        assert isinstance(error, CodedStepTimeout), repr(error)
        assert "ranks [2] at step 0 to reach the coded all-reduce" in str(error)
    with pytest.raises(CodedStepTimeout, match=r"rank 2 arrived at step 0 .* but it was abandoned by rank"):
        chans[2].arrive_and_wait(decided, accumulated[2])


def test_an_abandon_during_the_arrival_wakes_every_waiting_rank(store):
    chans, decided, accumulated = prepared_step(store, "repetition", 3, 6, timeout=5.0)

    def abandon_soon():
        time.sleep(0.2)
        return chans[2].abandon("KeyboardInterrupt: ")

    start = time.monotonic()
    outcomes = run_threads(
        *(lambda c=c: c.arrive_and_wait(decided, accumulated[c.rank]) for c in chans[:2]), abandon_soon
    )
    assert time.monotonic() - start < 2.0  # not the 5 s timeout
    assert outcomes[2] == ("ok", True)
    for kind, error in outcomes[:2]:
        assert kind == "error" and isinstance(error, CodedStepTimeout), repr(error)
        assert "but it was abandoned by rank 2 (KeyboardInterrupt: )" in str(error)


def test_a_failure_after_the_gate_is_go_does_not_abandon_the_step(store):
    # Every rank passed the gate (and will enter the collective): a late failure of one rank's
    # compute thread must not seal the gate as abandoned, nor wake anyone.
    code = make_code("repetition", 2, 4, redundancy=1.0)
    ranks = coordinators(store, 2)
    run_step(ranks, 0, code, done=False)
    late = ranks[1].channel(0, code, 0, DIGEST, wait=False)
    assert late.abandon("ValueError: late") is False
    assert store.get("s0/gate") == b"go"
    assert store.get("s0/decided") == b"1"


# ----------------------------------------------------------------- gathers


def test_gather_returns_every_rank_in_order(store):
    ranks = coordinators(store, 3)
    outcomes = run_threads(*(lambda c=c: c.gather("x", bytes([c.rank])) for c in ranks))
    assert outcomes == [("ok", [b"\x00", b"\x01", b"\x02"])] * 3


def test_a_failed_gather_retried_under_the_same_name_reads_only_the_new_values(master, store):
    ranks = coordinators(store, 2, timeout=0.3)
    before = master.num_keys()
    with pytest.raises(CodedStepTimeout, match=r"ranks \[1\] to publish 'plan'"):
        ranks[0].gather("plan", b"old 0")  # rank 1 is late ...
    with pytest.raises(CodedStepTimeout, match="abandoned by rank 0"):
        ranks[1].gather("plan", b"old 1")  # ... and finds the gather sealed as failed
    outcomes = run_threads(*(lambda c=c: c.gather("plan", b"new %d" % c.rank) for c in ranks))
    assert outcomes == [("ok", [b"new 0", b"new 1"])] * 2
    assert master.num_keys() > before
    # Both attempts' keys go when the next step is done.
    run_step(ranks, 0, make_code("repetition", 2, 4, redundancy=1.0))
    assert master.num_keys() == before


# ----------------------------------------------------------------- clean-up


def test_done_steps_leave_no_keys(master, store):
    code = make_code("repetition", 2, 4, redundancy=1.5)
    ranks = coordinators(store, 2)
    before = master.num_keys()
    for step in range(20):
        run_step(ranks, step, code, done=False)
        assert master.num_keys() > before
        for c in ranks:
            c.step_done(step)
        assert master.num_keys() == before, step
        assert ranks[0].step_exists(step) is None


def two_ranks_in_step_0(master, store):
    """Two pretend ranks (0.3 s timeout) that began step 0 of a repetition code, and the Store's key
    count from before the step: ``(code, ranks, keys_before, channel_0, channel_1)``."""
    code = make_code("repetition", 2, 4, redundancy=1.0)
    ranks = coordinators(store, 2, timeout=0.3)
    before = master.num_keys()
    a, b = channels(ranks, 0, code)
    a.begin()
    b.begin()
    return code, ranks, before, a, b


def test_a_failed_steps_keys_go_when_the_next_step_is_done(master, store):
    code, ranks, before, a, b = two_ranks_in_step_0(master, store)
    a.commit(code.queue(0)[0].result)
    assert a.abandon("ValueError: a bad batch") is True
    with pytest.raises(CodedStepTimeout, match="step 0 was abandoned by rank 0"):
        b.wait_decided()
    for c in ranks:
        c.step_failed(0)
    assert master.num_keys() > before  # deferred: a latecomer must still find the gate sealed
    assert ranks[1].step_exists(0) == (0, DIGEST)
    run_step(ranks, 1, code)
    assert master.num_keys() == before
    assert ranks[1].step_exists(0) is None


def test_a_rank_that_closes_after_a_failed_step_leaves_its_arrival_to_the_others(master, store):
    """A rank that abandoned a step and closed at once must not delete its arrival while another
    rank still reads every arrival (it would block on the missing key, past every timeout)."""
    _, ranks, before, a, b = two_ranks_in_step_0(master, store)
    assert a.abandon("StepMismatchError: other task weights") is True
    ranks[0].step_failed(0)
    ranks[0].close()
    assert ranks[1].store.check(["s0/arrived/0"])  # still there for rank 1
    with pytest.raises(CodedStepTimeout, match="abandoned by rank 0"):
        b.arrive_and_wait(b.refresh(), [])
    ranks[1].step_failed(0)
    ranks[1].close()
    assert master.num_keys() == before  # the last rank to close deleted them


def test_after_every_rank_closes_the_namespace_is_empty(master, store):
    code = make_code("repetition", 3, 6, redundancy=1.5)
    before = master.num_keys()
    ranks = coordinators(store, 3, timeout=0.3)
    outcomes = run_threads(*(lambda c=c: c.gather("config", b"%d" % c.rank) for c in ranks))
    assert [kind for kind, _ in outcomes] == ["ok"] * 3
    run_step(ranks, 0, code)
    # Step 1 fails on every rank (rank 1 never arrives), then a profile exchange, then the end.
    chans = channels(ranks, 1, code)
    for c in chans:
        c.begin()
    accumulated = commit_queues(chans, code)
    decided = chans[0].refresh()
    outcomes = run_threads(*(lambda c=c: c.arrive_and_wait(decided, accumulated[c.rank]) for c in chans[::2]))
    assert all(isinstance(error, CodedStepTimeout) for _, error in outcomes), outcomes
    with pytest.raises(CodedStepTimeout):
        chans[1].arrive_and_wait(decided, accumulated[1])
    for c in ranks:
        c.step_failed(1)
    outcomes = run_threads(*(lambda c=c: c.gather("profiles", b"p") for c in ranks))
    assert [kind for kind, _ in outcomes] == ["ok"] * 3
    for c in ranks[:2]:
        c.close()
        assert master.num_keys() > before  # the shared keys wait for the last rank
    ranks[2].close()
    assert master.num_keys() == before


def test_a_result_accumulated_twice_fails_every_rank_at_once(store):
    chans, decided, accumulated = prepared_step(store, "repetition", 3, 6, timeout=0.5)
    accumulated[0].append(accumulated[0][0])  # added to rank 0's accumulator twice
    start = time.monotonic()
    outcomes = arrive_everywhere(chans, decided, accumulated)
    assert_refused_everywhere(outcomes, "rank 0: results: result 0 appears twice")
    assert time.monotonic() - start < 0.3  # refused on the accounts, not by a timeout


def test_an_arrival_whose_bitmask_looks_like_text_is_read_as_results(store):
    """Bitmasks are raw bytes: rank 0's tasks {2, 7} of 8 encode as b"!" (0x21), which once collided
    with a marker for an unreadable arrival and refused a good step."""
    chans, decided, accumulated = prepared_step(store, "repetition", 2, 8)
    everything = sorted(set(accumulated[0]) | set(accumulated[1]))
    accumulated = [[2, 7], [t for t in everything if t not in (2, 7)]]
    outcomes = arrive_everywhere(chans, decided, accumulated)
    assert [kind for kind, _ in outcomes] == ["ok", "ok"], outcomes


# ----------------------------------------------------------------- chunk commits (all or none)


def _hash_channels(world: int, code) -> list[StepChannel]:
    store = dist.HashStore()
    coordinators = [StoreCoordinator(store, r, world, timeout=5.0) for r in range(world)]
    chans = [c.channel(0, code, 0, DIGEST, wait=False) for c in coordinators]
    for c in chans:
        c.begin()
    return chans


def test_a_chunk_commits_all_its_results_in_one_compare_and_set():
    code = make_code("repetition", 2, 8, redundancy=1.5)
    a, b = _hash_channels(2, code)
    assert a.commit_all((0, 1, 2)) is True
    assert a.commit_round_trips == 1 and a.sequence == 1
    assert b.refresh().open_tasks() == [3, 4, 5, 6, 7]
    assert b.commit_all((4, 5, 6, 7)) is True
    assert b.commit(3) is True and b.state.decided


def test_a_chunk_overlapping_a_committed_backup_commits_nothing():
    code = make_code("repetition", 2, 8, redundancy=1.5)
    a, b = _hash_channels(2, code)
    assert b.commit(2) is True  # a backup of one of a's primaries
    trips = a.commit_round_trips
    assert a.commit_all((0, 1, 2, 3)) is False  # the chunk's gradient cannot be split: none of it is used
    assert a.commit_round_trips == trips + 1  # one lost race, then found covered: no write
    assert a.refresh().open_tasks() == [0, 1, 3, 4, 5, 6, 7]  # the others stay open for a retry
    assert a.commit_all((0, 1, 3)) is True
    with pytest.raises(ValueError, match="at least one"):
        a.commit_all(())


def test_a_chunk_after_the_decision_is_not_used():
    code = make_code("repetition", 2, 4, redundancy=1.0)
    a, b = _hash_channels(2, code)
    assert a.commit_all((0, 1)) and b.commit_all((2, 3))
    assert a.refresh().decided
    assert a.commit_all((0, 1)) is False
