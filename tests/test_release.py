"""The release thread's schedule (:class:`codedgrad.runtime.release.StepRelease`), on one process.

The engine's release and the drop-slowest baseline's share it; here a stand-in supplies the
per-step work, so the order, the run-ahead, the stop at a failure and the shutdown are checked
without torchrun (the distributed tests check both users end to end).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from codedgrad.runtime.release import StepRelease
from codedgrad.runtime.step import StepPhase

WAIT = 10.0  # seconds any wait here may take on a busy machine before the test fails


@dataclass
class _Record:
    step: int
    ahead: bool = False
    phase: StepPhase = StepPhase.RUNNING
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class _Release(StepRelease[_Record]):
    """Serves a step by recording it; steps in ``fail`` end FAILED, steps in ``crash`` raise."""

    def __init__(self, first_step: int = 0, max_steps_ahead: int = 2, fail=(), crash=(), hold=None) -> None:
        super().__init__(first_step, max_steps_ahead, name="test-release")
        self.hold: dict[int, threading.Event] = dict(hold or {})  # step: an event to wait for after its end
        self.broken_store: set[int] = set()  # steps whose look-ahead raises
        self.claim_while_probing: set[int] = set()
        self.claimed: _Record | None = None
        self.served: list[tuple[int, bool]] = []
        self.begun: set[int] = set()  # steps "the other ranks began": _record_ahead finds them
        self.probed: set[int] = set()
        self.fail, self.crash = set(fail), set(crash)
        self.served_event = threading.Condition()
        self._start()

    def _serve(self, record: _Record) -> None:
        if record.step in self.crash:
            raise OSError(f"collective of step {record.step} broke")
        record.phase = StepPhase.FAILED if record.step in self.fail else StepPhase.REDUCED
        with self.served_event:
            self.served.append((record.step, record.ahead))
            self.served_event.notify_all()
        record.done.set()
        if record.step in self.hold:  # the thread is descheduled after the record ended, before it books it
            assert self.hold[record.step].wait(WAIT)

    def _record_ahead(self, step: int) -> _Record | None:
        self.probed.add(step)
        if step in self.broken_store:
            raise OSError("the Store is gone")
        if step in self.claim_while_probing:  # the compute thread claims while the probe is out
            self.left(step - 1)
            self.claimed = self.claim(step, lambda: _Record(step))
            return None
        return _Record(step, ahead=True) if step in self.begun else None

    def _serve_failed(self, record: _Record, error: BaseException) -> None:
        record.phase, record.error = StepPhase.FAILED, error
        record.done.set()

    def wait_count(self, count: int) -> None:
        with self.served_event:
            if not self.served_event.wait_for(lambda: len(self.served) >= count, WAIT):
                pytest.fail(f"waited {WAIT} s for {count} steps served; served: {self.served}")


def _done(record: _Record) -> _Record:
    assert record.done.wait(WAIT), f"waited {WAIT} s for step {record.step} to be served"
    return record


@pytest.fixture
def releases():
    made: list[_Release] = []

    def make(**kwargs) -> _Release:
        made.append(_Release(**kwargs))
        return made[-1]

    yield make
    for release in made:
        assert release.close(WAIT), "the release thread did not end within the wait"


def test_serves_claimed_steps_in_order_and_closes(releases) -> None:
    release = releases(first_step=3)
    for step in (3, 4, 5):
        record = _done(release.claim(step, lambda step=step: _Record(step)))
        assert record.phase is StepPhase.REDUCED
        release.left(step)
    assert release.served == [(3, False), (4, False), (5, False)]
    assert not release.holds_steps()
    assert release.close(WAIT) and not release.alive


def test_a_claim_before_the_thread_reaches_the_step_waits_its_turn(releases) -> None:
    """The compute thread of step 1 cannot be served before step 0: the order is the step order."""
    release = releases(max_steps_ahead=0)
    # Submit step 1 while step 0 is not there: nothing may be served (the thread waits for step 0).
    later = release.claim(1, lambda: _Record(1))
    assert not later.done.wait(0.2)
    _done(release.claim(0, lambda: _Record(0)))
    _done(later)
    assert release.served == [(0, False), (1, False)]


def test_runs_ahead_of_a_stalled_compute_thread_at_most_max_steps(releases) -> None:
    release = releases(max_steps_ahead=2)
    release.begun.update({1, 2, 3, 4})
    first = _done(release.claim(0, lambda: _Record(0)))  # the compute thread stays inside step 0
    release.wait_count(3)
    assert release.served == [(0, False), (1, True), (2, True)]
    assert release.holds_steps()
    time.sleep(0.2)  # time to look for step 3, were it allowed to
    assert 3 not in release.probed  # 2 steps beyond the compute thread's: it stops looking
    # The compute thread catches up: it gets the records served ahead, not new ones.
    release.left(0)
    for step in (1, 2):
        record = release.claim(step, lambda: pytest.fail("a step served ahead was made again"))
        assert record.ahead and record.phase is StepPhase.REDUCED
        if step == 1:
            release.left(step)
    # Stalled inside step 2 now: the window moved on, to steps 3 and 4.
    release.wait_count(5)
    assert release.served[3:] == [(3, True), (4, True)]
    assert first.phase is StepPhase.REDUCED
    release.left(2)
    assert not threading.Event().wait(0.2) and len(release.served) == 5  # left step 2: not past step 4


def test_a_step_claimed_right_after_the_last_one_ended_is_served(releases) -> None:
    """Between a record's end (which wakes the compute thread) and the thread booking it, the compute
    thread may leave the step, :meth:`skip_to` the next one and claim it: that step is still served.
    (It was skipped, and the engine's compute thread waited for it for ever: about one launch in seven
    of the engine's distributed tests hung so.)"""
    booked = threading.Event()
    release = releases(max_steps_ahead=0, hold={0: booked})
    _done(release.claim(0, lambda: _Record(0)))
    release.left(0)
    release.skip_to(1)  # the engine calls it before every claim (after direct steps it did not serve)
    second = release.claim(1, lambda: _Record(1))
    assert release.will_serve(1)
    booked.set()
    _done(second)
    assert release.served == [(0, False), (1, False)]
    assert not release.will_serve(1)


def test_wait_served_says_why_a_record_will_never_be_done(releases) -> None:
    release = releases(max_steps_ahead=0)
    assert release.wait_served(_done(release.claim(0, lambda: _Record(0)))) is None
    release.left(0)
    assert release.close(WAIT)
    orphan = release.claim(1, lambda: _Record(1))  # nobody will serve it
    assert not release.will_serve(1)
    assert release.wait_served(orphan) == "the release thread ended during step 1"


class _SlowProbes(_Release):
    probe_intervals = (60.0, 60.0)  # a claim missed while looking ahead would wait a minute


def test_a_claim_made_while_the_thread_looks_ahead_is_served_at_once() -> None:
    """The claim's notification comes while the thread is out looking for the next step on the Store
    (no one waits on the condition then): the thread must see the claim before it sleeps."""
    release = _SlowProbes(max_steps_ahead=2)
    release.claim_while_probing.add(1)
    try:
        _done(release.claim(0, lambda: _Record(0)))  # the compute thread stays inside step 0: look ahead
        deadline = time.monotonic() + WAIT
        while release.claimed is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert release.claimed is not None, "the thread never looked for step 1"
        _done(release.claimed)
        assert release.served == [(0, False), (1, False)]
    finally:
        assert release.close(WAIT)


def test_a_look_ahead_that_raises_stops_running_ahead_and_keeps_serving(releases) -> None:
    release = releases(max_steps_ahead=2)
    release.broken_store.add(1)
    with pytest.warns(RuntimeWarning, match="stops running ahead.*OSError: the Store is gone"):
        _done(release.claim(0, lambda: _Record(0)))
        deadline = time.monotonic() + WAIT
        while 1 not in release.probed and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)  # the warning is issued right after the probe
    assert 1 in release.probed and release.alive
    release.left(0)
    _done(release.claim(1, lambda: _Record(1)))
    assert release.served == [(0, False), (1, False)]


def test_no_run_ahead_without_max_steps_ahead(releases) -> None:
    release = releases(max_steps_ahead=0)
    release.begun.update({1, 2})
    _done(release.claim(0, lambda: _Record(0)))
    assert not release.claim(2, lambda: _Record(2)).done.wait(0.2)  # step 1 not served, so not 2
    assert release.probed == set() and release.served == [(0, False)]


def test_never_runs_past_a_failed_step(releases) -> None:
    release = releases(max_steps_ahead=3, fail={0})
    release.begun.update({1, 2})
    assert _done(release.claim(0, lambda: _Record(0))).phase is StepPhase.FAILED
    assert not threading.Event().wait(0.2) and release.served == [(0, False)]
    assert release.probed == set()  # the compute thread decides what comes after a failure
    release.left(0)
    assert _done(release.claim(1, lambda: _Record(1))).phase is StepPhase.REDUCED
    assert release.served[:2] == [(0, False), (1, False)]  # (then step 2 ahead: step 1 succeeded)


def test_a_step_whose_serving_raised_fails_and_ends_the_thread(releases) -> None:
    release = releases(crash={1})
    _done(release.claim(0, lambda: _Record(0)))
    release.left(0)
    broken = _done(release.claim(1, lambda: _Record(1)))
    assert broken.phase is StepPhase.FAILED
    assert isinstance(broken.error, OSError) and "step 1" in str(broken.error)
    release.left(1)
    assert release.close(WAIT) and not release.alive  # the compute thread sees it ended
    assert not release.claim(2, lambda: _Record(2)).done.wait(0.1)


def test_close_waits_for_the_step_being_served() -> None:
    serving, gate = threading.Event(), threading.Event()

    class Slow(_Release):
        def _serve(self, record: _Record) -> None:
            serving.set()
            assert gate.wait(WAIT), "the test never opened the gate"
            super()._serve(record)

    release = Slow()
    record = release.claim(0, lambda: _Record(0))
    assert serving.wait(WAIT), f"waited {WAIT} s for the thread to serve step 0"
    assert not release.close(0.1)  # still serving step 0
    gate.set()
    assert release.close(WAIT) and _done(record).phase is StepPhase.REDUCED
