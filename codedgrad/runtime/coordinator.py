"""The step protocol on the c10d Store (DESIGN.md §3): commits, decision, arrival, clean-up.

Keys, all under one :class:`~torch.distributed.PrefixStore` namespace per engine and run:

``s{t}/state``
    The decoder state of step t, prefixed by a 6-byte header (commit sequence number, last
    committing rank). A commit is one ``compare_set`` from the rank's last known value to the new
    one; on a race the Store answers with the current value, the rank re-applies its commit to it
    and tries again. The header makes every successful transition unique, so a rank never mistakes
    another rank's identical-looking write for its own.
``s{t}/decided``
    Set by the commit that makes the step decodable; ranks whose queue ran dry ``wait`` on it.
``s{t}/arrived/{r}``
    Rank r has everything it needs for the coded all-reduce. Every rank waits for all of them
    before the collective, so a missing rank turns into a timeout naming it instead of a hang
    inside the collective.
``s{t}/gate``
    Seals the arrival once: the first rank to see everyone arrived writes ``go`` by
    compare-and-set, a rank that timed out or failed writes ``abandoned``; whichever comes first
    holds for all, so either every rank enters the collective or none does. A rank that abandons
    also sets the decision flag and its arrival key, so the others wake at once and find the gate.
``g/{n}/{name}/{r}``, ``g/{n}/{name}/gate``
    Rank r's contribution to this engine's n-th gather (configuration agreement, plan agreement,
    profile exchange), sealed like the arrival. Every rank runs the same sequence of gathers, so n
    agrees; a new n per attempt means a gather that failed (and is retried with the same name)
    never reads the keys of the failed attempt.

Waits (decision, arrival, gathers) run on a separate Store client (:meth:`Store.clone`): one
client serialises its operations, so a pending wait would otherwise hold up every other request
(DESIGN.md §4). With the no-wait release the waits run on the release thread while the compute
thread commits on the main client.

Keys of step t are deleted after its coded all-reduce: every rank has then passed every wait of
step t, because it had to enter the collective. A rank still computing a task of step t at that
point (no-wait release) knows the step is released and touches only the gate again, which is
therefore deleted at the next successful step's clean-up, together with the keys of failed steps.
"""

from __future__ import annotations

import struct
import time
from datetime import timedelta

import torch.distributed as dist

from codedgrad.codes.base import DecoderState, GradientCode

__all__ = ["CodedStepTimeout", "StoreCoordinator"]

_HEADER = struct.Struct("<IH")  # sequence number of the last successful commit, its rank


class CodedStepTimeout(TimeoutError):
    """A wait of the coded step ran past its timeout; the message names what was missing."""


class StoreCoordinator:
    """One rank's view of the coded step protocol, kept in a c10d Store.

    Args:
        store: the Store for commits and gets (e.g. a PrefixStore over torchrun's TCPStore).
        rank: this rank.
        world_size: number of ranks.
        timeout: seconds any single wait may take before :class:`CodedStepTimeout`.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        try:
            self._wait_store = store.clone()
        except (RuntimeError, NotImplementedError):  # e.g. a FileStore or HashStore: share the client
            self._wait_store = store
        self.has_wait_client = self._wait_store is not store
        self._code: GradientCode | None = None
        self._step = -1
        self._value = b""  # last known value of s{step}/state (header + decoder bytes)
        # Keys every rank may still read until the next step finishes (then all ranks are past them):
        # the last gate, failed steps' keys, gathers' keys.
        self._deferred: list[str] = []
        self._gathers = 0  # gathers run so far: numbers each gather's keys
        self.commit_round_trips = 0  # Store round trips of all commits so far (for reports and benchmarks)

    # ----------------------------------------------------------------- one step's decoder state
    def begin(self, step: int, code: GradientCode) -> DecoderState:
        """Start step ``step`` under ``code``: create its state if nobody has yet, and read it."""
        self._code, self._step = code, step
        initial = _HEADER.pack(0, self.rank) + code.new_state().to_bytes()
        self._value = self.store.compare_set(self._key("state"), b"", initial)  # create-or-read
        return self.state

    @property
    def state(self) -> DecoderState:
        """The decoder state as of this rank's last Store round trip (a fresh object: callers may commit to it)."""
        assert self._code is not None, "begin() first"
        return self._code.state_from_bytes(self._value[_HEADER.size :])

    def refresh(self) -> DecoderState:
        """Read the current state (one round trip)."""
        self._value = self.store.get(self._key("state"))
        return self.state

    def commit(self, result: int) -> bool:
        """Commit ``result`` of this rank; True if the rank must add it to its accumulator.

        One round trip when no other rank committed since this rank last looked, one more per race.
        """
        while True:
            state = self.state
            if not state.commit(self.rank, result):
                return False  # covered or decided already: commits only add, so this is final
            sequence, _ = _HEADER.unpack_from(self._value)
            desired = _HEADER.pack(sequence + 1, self.rank) + state.to_bytes()
            current = self.store.compare_set(self._key("state"), self._value, desired)
            self.commit_round_trips += 1
            if current == self._value:  # c10d answers a missing key with the expected value
                raise RuntimeError(f"codedgrad: the Store lost the state of step {self._step} (deleted or reset)")
            self._value = current
            if current == desired:
                if state.decided:  # a set is sent without waiting for the reply: not a round trip
                    self.store.set(self._key("decided"), b"1")
                return True

    def wait_decided(self) -> DecoderState:
        """Block until the step is decided and return the decided state, or raise :class:`CodedStepTimeout`.

        Uses only the wait client and leaves this rank's view alone, so a release thread can call
        it while the compute thread commits.
        """
        try:
            self._wait_store.wait([self._key("decided")], timedelta(seconds=self.timeout))
        except dist.DistStoreError:
            state = self._read_on_wait_client()
            if state.decided:  # decided, but the decider's flag never came (it crashed in between)
                return state
            raise CodedStepTimeout(
                f"codedgrad: rank {self.rank} waited {self.timeout:g} s for step {self._step} to be decided; "
                f"still missing: {state.missing()}"
            ) from None
        state = self._read_on_wait_client()
        if not state.decided:  # woken by a rank that abandoned the step
            gate = self._wait_store.get(self._key("gate")).decode()
            raise CodedStepTimeout(f"codedgrad: rank {self.rank}: step {self._step} was {gate}")
        return state

    def poll_decided(self, seconds: float) -> bool:
        """Whether the decision flag (also set by an abandoning rank) appears within ``seconds``.

        Polls with ``check`` on the main client, every millisecond at first and backing off to
        every 10 ms, so that a long idle spell costs about 100 requests a second: ``Store.wait``
        with a short timeout would be one request, but c10d logs a warning for every wait that
        times out. Meant for the synchronous step, where no other thread uses the client.
        """
        deadline = time.perf_counter() + seconds
        interval = 0.001
        while not self.store.check([self._key("decided")]):
            left = deadline - time.perf_counter()
            if left <= 0:
                return False
            time.sleep(min(left, interval))
            interval = min(2 * interval, 0.01)
        return True

    def _read_on_wait_client(self) -> DecoderState:
        assert self._code is not None, "begin() first"
        return self._code.state_from_bytes(self._wait_store.get(self._key("state"))[_HEADER.size :])

    # ----------------------------------------------------------------- arrival before the collective
    def arrive_and_wait(self) -> None:
        """Announce this rank is ready for the coded all-reduce and wait until every rank is.

        Uses only the wait client (see :meth:`wait_decided`).
        """
        self._wait_store.set(self._key(f"arrived/{self.rank}"), b"1")
        keys = [self._key(f"arrived/{r}") for r in range(self.world_size)]
        self._wait_all(keys, self._key("gate"), f"at step {self._step} to reach the coded all-reduce")

    def abandon(self, reason: str) -> bool:
        """Seal this step's gate as abandoned (this rank failed); False if every rank had already gone on.

        Then wake the others at once instead of letting them run into their timeouts: their
        decision wait gets its flag, their arrival wait this rank's key, and both then find the gate.
        """
        message = f"abandoned by rank {self.rank} ({reason})"[:500].encode()
        if self.store.compare_set(self._key("gate"), b"", message) == b"go":
            return False
        self.store.set(self._key("decided"), b"abandoned")
        self.store.set(self._key(f"arrived/{self.rank}"), b"abandoned")
        return True

    def finish(self) -> None:
        """Delete this step's keys once the collective is done (every rank is past every wait).

        The gate stays until the next step finishes: a rank whose release reduced this step while
        its compute thread was still in a task may fail in that task afterwards, and must then find
        ``go`` at the gate (the step completed) rather than an empty key it would seal as abandoned.
        Every rank has left this step once the next one finishes, because that needs all of them.
        Keys deferred before (the previous gate, failed steps, gathers) are deleted now.
        """
        for key in self._deferred:
            self.store.delete_key(key)
        self._deferred = []
        self.store.delete_key(self._key(f"arrived/{self.rank}"))
        if self.rank == 0:
            for what in ("state", "decided"):
                self.store.delete_key(self._key(what))
            self._deferred.append(self._key("gate"))

    def leave_failed(self) -> None:
        """This rank leaves the step without finishing it (abandoned, or its collective failed).

        Its keys are deleted when the next step finishes: every rank has left this one by then.
        """
        self._deferred.append(self._key(f"arrived/{self.rank}"))
        if self.rank == 0:
            self._deferred.extend(self._key(what) for what in ("state", "decided", "gate"))

    # ----------------------------------------------------------------- gathers
    def gather(self, name: str, value: bytes) -> list[bytes]:
        """Every rank's ``value`` for ``name``, in rank order (waits for all, with the timeout).

        Its keys stay until the next :meth:`finish`, successful or not: a rank that comes late to a
        failed gather must still find its gate sealed.
        """
        prefix = f"g/{self._gathers}/{name}"
        self._gathers += 1
        self._deferred.append(f"{prefix}/{self.rank}")
        if self.rank == 0:
            self._deferred.append(f"{prefix}/gate")
        self.store.set(f"{prefix}/{self.rank}", value)
        keys = [f"{prefix}/{r}" for r in range(self.world_size)]
        self._wait_all(keys, f"{prefix}/gate", f"to publish {name!r}")
        return list(self.store.multi_get(keys))

    def _wait_all(self, keys: list[str], gate: str, what: str) -> None:
        """Wait for every key, then seal the outcome at ``gate``: all ranks go on, or all fail.

        A plain wait is not enough: a rank that times out raises, and a rank arriving a moment later
        would find every key present and enter the collective alone. The first compare-and-set on
        the gate decides for everyone, whichever happened first.
        """
        client = self._wait_store
        try:
            client.wait(keys, timedelta(seconds=self.timeout))
            outcome = client.compare_set(gate, b"", b"go")
        except dist.DistStoreError:
            absent = [r for r, key in enumerate(keys) if not client.check([key])]
            outcome = client.compare_set(gate, b"", f"abandoned by rank {self.rank}".encode())
            if outcome == b"go":  # everyone did arrive, just after this rank's wait ran out
                return
            raise CodedStepTimeout(
                f"codedgrad: rank {self.rank} waited {self.timeout:g} s for ranks {absent or 'that came too late'} "
                f"{what} (stalled, crashed, or running a different number of steps)"
            ) from None
        if outcome != b"go":
            raise CodedStepTimeout(f"codedgrad: rank {self.rank} arrived {what}, but it was {outcome.decode()}")

    def _key(self, what: str) -> str:
        return f"s{self._step}/{what}"
