"""The step protocol on the c10d Store: commits, decision, arrival, gathers and clean-up.

Keys, all under one :class:`~torch.distributed.PrefixStore` namespace per engine:

``s{t}/state``
    The decoder state of step t behind a header: commit sequence number, last committing rank, the
    plan version and a digest of the step's task weights. The first rank to begin the step creates
    it; a rank that finds another plan or other weights there refuses the step (ranks must never
    run one step on different plans). A commit is one ``compare_set`` from the rank's last known
    value to the new one; on a race the Store answers with the current value, the rank re-applies
    its commit to it and tries again. The header makes every transition unique, so a rank never
    mistakes another rank's identical-looking write for its own.
``s{t}/decided``
    Set by the commit that makes the step decodable (or by a rank that abandons the step).
``s{t}/arrived/{r}``
    Rank r is ready for the coded all-reduce; the value (``R`` + a bitmask) lists the results in
    its accumulator. Every
    rank waits for all of them and checks that the accumulators hold exactly what the decoder uses
    (:func:`codedgrad.codes.accounting.check_accumulated`) before the collective: a result that was
    committed but never accumulated (an exception or Ctrl-C in between) fails the step on every
    rank instead of being silently left out.
``s{t}/gate``
    Seals the arrival once: ``go`` by compare-and-set when every rank arrived and the check passed,
    ``abandoned …`` by a rank that failed, timed out or found the accumulators wrong. Whichever
    comes first holds for all, so either every rank enters the collective or none does.
``g/{n}/{name}/{r}``, ``g/{n}/{name}/gate``
    Rank r's contribution to this engine's n-th gather (configuration and plan agreement, profile
    exchange), sealed like the arrival. Every rank runs the same sequence of gathers, so n agrees.
``closed``
    Counts the ranks that closed the engine; the last one deletes the shared keys left.

Each thread talks to the Store through its own client (one client serialises its operations): the
compute thread commits on ``store``, the release thread waits on a clone. A :class:`StepChannel` is
one thread's view of one step.

Clean-up: a step's keys are deleted right after its coded all-reduce, when every rank has passed
every wait of the step (each had to enter the collective). Keys of failed steps and of gathers are
deleted after the next successful step, when every rank has left them behind, or at :meth:`close`.
"""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch.distributed as dist

from codedgrad.codes.accounting import check_accumulated, decode_results, encode_results
from codedgrad.codes.base import CodeError, DecoderState, GradientCode, RankLevelCode
from codedgrad.runtime.step import CodedStepError

__all__ = [
    "CodedStepTimeout",
    "StepChannel",
    "StepMismatchError",
    "StoreCoordinator",
    "StoreStateError",
    "wait_all",
    "weights_digest",
]

# sequence number of the last commit, its rank, the plan version, the task weights' digest
_HEADER = struct.Struct("<IHI8s")
_LAST_SEQUENCE = 2**32 - 1  # the header's sequence number is an unsigned 32-bit field
_ANY_STEP = -(2**62)  # a deferred key's "last needed at" that any later success is past


class CodedStepTimeout(CodedStepError, TimeoutError):
    """A rank stalled, died or abandoned the step: a wait ran past its timeout or found the step
    abandoned. The message names the rank and what was missing (or the abandoning rank's error)."""


class StepMismatchError(CodedStepError):
    """Ranks began one step with different plans or task weights; the step fails on every rank."""


class StoreStateError(StepMismatchError):
    """A step's key in the Store cannot be read (truncated, corrupted, deleted or from another plan).

    The message names the key and the step. Like a mismatch, the step fails rather than letting a
    rank commit, accumulate or skip results on a state it cannot trust.
    """


def _read_header(value: bytes, key: str, step: int) -> tuple[int, int, int, bytes]:
    """(sequence, rank, plan version, digest) of a ``s{t}/state`` value, or :class:`StoreStateError`."""
    if len(value) < _HEADER.size:
        raise StoreStateError(
            f"codedgrad: the Store's {key} of step {step} is {len(value)} bytes, shorter than its "
            f"{_HEADER.size}-byte header (truncated or corrupted)"
        )
    header = _HEADER.unpack_from(value)
    if header[0] == _LAST_SEQUENCE:  # no step commits 2³² times: the next commit could not be written
        raise StoreStateError(
            f"codedgrad: the Store's {key} of step {step} has sequence number {header[0]} (corrupted)"
        )
    return header


def weights_digest(weights: Sequence[float]) -> bytes:
    """8 bytes that differ when the task weights differ (compared byte for byte across ranks)."""
    return hashlib.sha256(repr(tuple(float(w) for w in weights)).encode()).digest()[:8]


class StoreCoordinator:
    """One rank's access to the step protocol of one engine.

    Args:
        store: the engine's namespace (a PrefixStore over torchrun's TCPStore), used by the compute thread.
        rank: this rank.
        world_size: number of ranks.
        timeout: seconds a wait may go on without progress from another rank.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float, steps_behind: int = 0) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout
        self.steps_behind = steps_behind
        try:
            self.wait_store = store.clone()
        except (RuntimeError, NotImplementedError):  # e.g. a FileStore or HashStore: share the client
            self.wait_store = store
        self.has_wait_client = self.wait_store is not store
        self._lock = threading.Lock()  # the deferred lists are used by both threads
        # (step after which every rank is past the key, key): this rank's keys, deleted by this rank,
        # and keys of all ranks, deleted by rank 0 (or the last rank to close).
        self._own_deferred: list[tuple[int, str]] = []
        self._shared_deferred: list[tuple[int, str]] = []
        self._gathers = 0

    def channel(self, step: int, code: GradientCode, plan_version: int, digest: bytes, wait: bool) -> StepChannel:
        """A view of step ``step`` on the compute thread's client, or on the wait client if ``wait``."""
        return StepChannel(self, step, code, plan_version, digest, self.wait_store if wait else self.store)

    def step_exists(self, step: int) -> tuple[int, bytes] | None:
        """(plan version, weights digest) of step ``step`` if some rank began it (wait client), else None."""
        key = f"s{step}/state"
        if not self.wait_store.check([key]):
            return None
        value = self.wait_store.get(key)
        _, _, version, digest = _read_header(value, key, step)
        return version, digest

    # ----------------------------------------------------------------- clean-up
    def step_done(self, step: int) -> None:
        """Step ``step`` was reduced on every rank: delete its keys, and deferred keys every rank is past.

        A rank's compute thread may be up to ``steps_behind`` steps behind the step its release
        reduces (the release completes steps ahead of a stalled compute thread), so a key last
        used by the compute threads at step s is deleted once a step later than s + steps_behind is done.
        """
        # Each rank's compute thread has at least claimed step - steps_behind (and so passed the
        # gathers before it); without a release running ahead, it is in this very step.
        horizon = step - self.steps_behind - 1 if self.steps_behind else step
        keys = [*self._take_deferred(horizon), f"s{step}/arrived/{self.rank}"]
        if self.rank == 0:
            keys += [f"s{step}/{what}" for what in ("state", "decided", "gate")]
        for key in keys:
            self.wait_store.delete_key(key)

    def direct_step_done(self, step: int) -> None:
        """A direct step (it has no keys of its own) completed on every rank: delete the deferred keys
        (gathers, agreements) every rank is past. Every rank's compute thread is in this step (each
        direct step ends in an all-reduce of every rank), so no Store round trip when there are none."""
        for key in self._take_deferred(step):
            self.store.delete_key(key)

    def _take_deferred(self, horizon: int) -> list[str]:
        """The deferred keys last needed at or before ``horizon`` that this rank deletes (rank 0: shared ones too)."""
        with self._lock:
            own = [key for when, key in self._own_deferred if when <= horizon]
            shared = [key for when, key in self._shared_deferred if when <= horizon]
            self._own_deferred = [(w, k) for w, k in self._own_deferred if w > horizon]
            self._shared_deferred = [(w, k) for w, k in self._shared_deferred if w > horizon]
        return own + shared if self.rank == 0 else own

    def defer_until_close(self, key: str) -> None:
        """A key of all ranks that lives as long as the engine (deleted by the last rank to close)."""
        with self._lock:
            self._shared_deferred.append((-_ANY_STEP, key))

    def step_failed(self, step: int) -> None:
        """This rank left step ``step`` without reducing it: its keys go at the next success.

        Nobody touches a failed step's keys after leaving it (a release never runs ahead of a
        failure, and a compute thread still in a task of it finds the step failed locally). But
        the other ranks may not have left it yet: one that abandoned at once and then closed its
        engine must not delete its arrival while another rank still reads every arrival (it would
        block on the missing key). So the arrivals are shared keys too: deleted by rank 0 at the
        next success, when every rank is past the step, or by the last rank to close.
        """
        with self._lock:
            keys = [f"s{step}/{what}" for what in ("state", "decided", "gate")]
            keys += [f"s{step}/arrived/{r}" for r in range(self.world_size)]
            self._shared_deferred.extend((_ANY_STEP, key) for key in keys)

    def close(self) -> None:
        """Delete this rank's keys; the last rank to close also deletes the shared ones."""
        with self._lock:
            own, shared = self._own_deferred, self._shared_deferred
            self._own_deferred, self._shared_deferred = [], []
        for _, key in own:
            self.store.delete_key(key)
        if self.store.add("closed", 1) == self.world_size:
            for key in [*(k for _, k in shared), "closed"]:
                self.store.delete_key(key)

    # ----------------------------------------------------------------- gathers
    def publish(self, name: str, value: bytes, collect_at: int) -> str:
        """Publish this rank's ``value`` for the next gather named ``name``; :meth:`collect` reads all.

        Publishing does not wait: a rank can publish at one step and collect at ``collect_at``, so
        that an exchange never waits for a rank that is still inside an earlier step. The gather's
        keys (every rank's, so that a rank that closes early cannot delete what a lagging rank still
        reads) are deleted once every rank is past ``collect_at``, collected or not.
        """
        prefix = f"g/{self._gathers}/{name}"
        self._gathers += 1
        with self._lock:
            self._shared_deferred.extend((collect_at, f"{prefix}/{r}") for r in range(self.world_size))
            self._shared_deferred.append((collect_at, f"{prefix}/gate"))
        self.store.set(f"{prefix}/{self.rank}", value)
        return prefix

    def collect(self, prefix: str) -> list[bytes]:
        """Every rank's value of the gather :meth:`publish` started, in rank order (waits with the timeout).

        A rank that comes late to a failed gather still finds its gate sealed.
        """
        keys = [f"{prefix}/{r}" for r in range(self.world_size)]
        name = prefix.split("/", 2)[2]
        return wait_all(self.store, keys, f"{prefix}/gate", self.timeout, self.rank, f"to publish {name!r}")

    def gather(self, name: str, value: bytes, step: int = 0) -> list[bytes]:
        """Every rank's ``value`` for ``name``, in rank order: :meth:`publish` and :meth:`collect` at once."""
        return self.collect(self.publish(name, value, step))


class StepChannel:
    """One thread's view of one step in the Store: begin, commit, wait for the decision, arrive.

    Not thread-safe: each thread uses its own channel (and its own Store client).
    """

    def __init__(
        self,
        coordinator: StoreCoordinator,
        step: int,
        code: GradientCode,
        plan_version: int,
        digest: bytes,
        client: dist.Store,
    ) -> None:
        self.step = step
        self.code = code
        self.plan_version = plan_version
        self.digest = digest
        self.rank = coordinator.rank
        self.world_size = coordinator.world_size
        self.timeout = coordinator.timeout
        self.client = client
        self._value = b""
        self.commit_round_trips = 0

    def _key(self, what: str) -> str:
        return f"s{self.step}/{what}"

    # ----------------------------------------------------------------- the decoder state
    def begin(self) -> DecoderState:
        """Create the step's state if nobody has, read it, and check it is the same plan and weights."""
        initial = _HEADER.pack(0, self.rank, self.plan_version, self.digest) + self.code.new_state().to_bytes()
        self._value = self.client.compare_set(self._key("state"), b"", initial)  # create-or-read
        _, creator, version, digest = _read_header(self._value, self._key("state"), self.step)
        if (version, digest) != (self.plan_version, self.digest):
            what = "plan version" if version != self.plan_version else "task weights"
            raise StepMismatchError(
                f"codedgrad: rank {self.rank} began step {self.step} with {what} different from rank {creator}'s "
                f"(plan v{self.plan_version} against v{version}; weights {self.digest.hex()} against "
                f"{digest.hex()}): every rank must pass the same tasks to backward()"
            )
        return self.state

    @property
    def state(self) -> DecoderState:
        """The decoder state as of this channel's last round trip (a fresh object).

        Raises :class:`StoreStateError` when the value is not a state of this step's plan: a header
        cut short, another plan version or digest than :meth:`begin` agreed on, or state bytes the
        code cannot read. Every commit parses the value through here first.
        """
        key = self._key("state")
        _, _, version, digest = _read_header(self._value, key, self.step)
        if (version, digest) != (self.plan_version, self.digest):
            raise StoreStateError(
                f"codedgrad: rank {self.rank}: the Store's {key} of step {self.step} changed plan during the step "
                f"(v{version}, weights {digest.hex()}; began with v{self.plan_version}, {self.digest.hex()}): "
                "corrupted or overwritten"
            )
        try:
            return self.code.state_from_bytes(self._value[_HEADER.size :])
        except CodeError as error:
            raise StoreStateError(
                f"codedgrad: rank {self.rank}: the Store's {key} of step {self.step} is not a {self.code.name} "
                f"decoder state ({error})"
            ) from None

    @property
    def sequence(self) -> int:
        return _read_header(self._value, self._key("state"), self.step)[0] if self._value else -1

    def refresh(self) -> DecoderState:
        """Read the current state (two round trips: a deleted key fails at once instead of blocking)."""
        key = self._key("state")
        if not self.client.check([key]):
            raise StoreStateError(f"codedgrad: rank {self.rank}: the Store's {key} of step {self.step} is gone")
        self._value = self.client.get(key)
        return self.state

    def commit(self, result: int) -> bool:
        """Commit ``result`` of this rank; True if the rank must add it to its accumulator.

        One round trip when no other rank committed since this channel last looked, one more per race.
        """
        return self.commit_all((result,))

    def commit_all(self, results: Sequence[int]) -> bool:
        """Commit the results of one chunk at once, all or none; True if the rank must add the chunk.

        A chunk's gradient is one sum that cannot be split afterwards, so it is used only if every
        one of its results is still needed: then one compare-and-set records them all. If another
        rank covered one of them meanwhile (a backup), or the step is decided, nothing is
        committed and False is returned; the caller recomputes what is still open. Commits only
        add, so a False is final. One round trip when no other rank committed since this channel
        last looked, one more per race.
        """
        if not results:
            raise ValueError("codedgrad: commit_all needs at least one result")
        while True:
            state = self.state
            if not all(state.commit(self.rank, result) for result in results):
                return False  # covered or decided already: commits only add, so this is final
            sequence, _, version, digest = _HEADER.unpack_from(self._value)
            desired = _HEADER.pack(sequence + 1, self.rank, version, digest) + state.to_bytes()
            current = self.client.compare_set(self._key("state"), self._value, desired)
            self.commit_round_trips += 1
            if current == self._value:  # c10d answers a missing key with the expected value
                raise StoreStateError(f"codedgrad: the Store lost the state of step {self.step} ({self._key('state')})")
            self._value = current
            if current == desired:
                if state.decided:
                    self.client.set(self._key("decided"), b"1")
                return True

    # ----------------------------------------------------------------- waiting for the decision
    def wait_decided(self, busy: Callable[[], bool] = lambda: False) -> DecoderState:
        """Block until the step is decided; return the decided state.

        ``timeout`` bounds the time without progress from the others, not the step's length: while
        ``busy()`` (this rank is computing its own work of the step) or while other ranks keep
        committing, the wait goes on. Raises :class:`CodedStepTimeout` naming what is missing, or
        when a rank abandoned the step.
        """
        slice_ = max(self.timeout / 2, 0.05)
        last_sequence, last_progress = self.sequence, time.monotonic()
        while True:
            try:
                self.client.wait([self._key("decided")], timedelta(seconds=slice_))
                break
            except dist.DistStoreError:
                state = self.refresh()
                if state.decided:  # decided, but the decider's flag never came (it failed in between)
                    return state
                now = time.monotonic()
                if self.sequence != last_sequence or busy():
                    last_sequence, last_progress = self.sequence, now
                elif now - last_progress >= self.timeout:
                    raise CodedStepTimeout(
                        f"codedgrad: rank {self.rank} waited {self.timeout:g} s without progress for step "
                        f"{self.step} to be decided; still missing: {state.missing()}"
                    ) from None
        state = self.refresh()
        if not state.decided:  # woken by a rank that abandoned the step
            gate = self._key("gate")
            if not self.client.check([gate]):  # an abandoning rank seals the gate before the flag
                raise StoreStateError(
                    f"codedgrad: rank {self.rank}: the Store's {self._key('decided')} of step {self.step} is set "
                    f"but the state is not decided and {gate} is empty (corrupted or overwritten)"
                )
            text = self.client.get(gate).decode(errors="replace")
            raise CodedStepTimeout(f"codedgrad: rank {self.rank}: step {self.step} was {text}")
        return state

    def poll_decided(self, seconds: float) -> bool:
        """Whether the decision flag appears within ``seconds`` (polled with ``check``, backing off
        from 1 to 10 ms: c10d logs a warning for every ``wait`` that times out)."""
        deadline = time.monotonic() + seconds
        interval = 0.001
        while not self.client.check([self._key("decided")]):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, interval))
            interval = min(2 * interval, 0.01)
        return True

    # ----------------------------------------------------------------- arrival before the collective
    def arrive_and_wait(self, decided: DecoderState, accumulated: Sequence[int]) -> None:
        """Publish the results in this rank's accumulator, wait for every rank, check the accounts.

        Raises :class:`CodedStepTimeout` (a rank missing, or the step abandoned) or, when the
        accumulators do not hold exactly what the decoder uses, :class:`StepMismatchError`; in
        both cases on every rank, and none enters the collective.
        """
        num_results = self.world_size if isinstance(self.code, RankLevelCode) else self.code.num_tasks
        # "R" + the results' bitmask, or "E" + why this rank could not list them (e.g. a result
        # accumulated twice): every rank must hear it. An abandoning rank writes "abandoned".
        try:
            arrival = b"R" + encode_results(accumulated, num_results)
        except CodeError as error:
            arrival = b"E" + f"rank {self.rank}: {error}".encode()
        self.client.set(self._key(f"arrived/{self.rank}"), arrival)
        keys = [self._key(f"arrived/{r}") for r in range(self.world_size)]

        def audit(values: list[bytes]) -> str | None:
            sets = []
            for r, value in enumerate(values):
                kind, body = value[:1], value[1:]
                if kind == b"E":
                    return body.decode(errors="replace")
                try:
                    if kind != b"R":
                        raise CodeError("not an arrival")
                    sets.append(decode_results(body, num_results))
                except CodeError:
                    return f"rank {r}'s arrival could not be read (it abandoned the step)"
            return check_accumulated(self.code, decided, sets)

        wait_all(
            self.client, keys, self._key("gate"), self.timeout, self.rank,
            f"at step {self.step} to reach the coded all-reduce", audit,
        )  # fmt: skip

    def abandon(self, reason: str) -> bool:
        """Seal this step's gate as abandoned; False if every rank had already gone on (``go``).

        Then wake the others at once: their decision wait gets its flag, their arrival wait this
        rank's key, and both then find the gate.
        """
        message = f"abandoned by rank {self.rank} ({reason})"[:500].encode()
        if self.client.compare_set(self._key("gate"), b"", message) == b"go":
            return False
        self.client.set(self._key("decided"), b"abandoned")
        self.client.set(self._key(f"arrived/{self.rank}"), b"abandoned")
        return True


def wait_all(
    client: dist.Store,
    keys: list[str],
    gate: str,
    timeout: float,
    rank: int,
    what: str,
    audit: Callable[[list[bytes]], str | None] | None = None,
) -> list[bytes]:
    """Wait for every key, then seal the outcome at ``gate``: all ranks go on, or all fail.

    A plain wait is not enough: a rank that times out raises, and a rank arriving a moment later
    would find every key present and enter the collective alone. The first compare-and-set on the
    gate decides for everyone. ``audit`` (the same function on every rank, of the same values)
    may refuse the outcome with a message.
    """
    try:
        client.wait(keys, timedelta(seconds=timeout))
    except dist.DistStoreError:
        absent = [r for r, key in enumerate(keys) if not client.check([key])]
        outcome = client.compare_set(gate, b"", f"abandoned by rank {rank}".encode())
        if outcome == b"go":  # everyone did arrive, just after this rank's wait ran out
            try:  # bounded: the keys may be gone if the others finished long ago
                client.wait(keys, timedelta(seconds=timeout))
            except dist.DistStoreError:
                raise CodedStepTimeout(
                    f"codedgrad: rank {rank} came {timeout:g} s too late {what}: the other ranks went on without it"
                ) from None
            values = list(client.multi_get(keys))
            _check_go(gate, audit(values) if audit is not None else None, rank, what)
            return values
        raise CodedStepTimeout(
            f"codedgrad: rank {rank} waited {timeout:g} s for ranks {absent or 'that came too late'} "
            f"{what} (stalled, crashed, or running a different number of steps)"
        ) from None
    values = list(client.multi_get(keys))
    problem = audit(values) if audit is not None else None
    proposal = b"go" if problem is None else f"abandoned: {problem}"[:500].encode()
    outcome = client.compare_set(gate, b"", proposal)
    if outcome != b"go":
        text = outcome.decode(errors="replace")
        if text.startswith("abandoned: "):  # the accounts did not add up (the same verdict on every rank)
            raise StepMismatchError(f"codedgrad: rank {rank}: step refused {what}: {text[11:]}")
        raise CodedStepTimeout(f"codedgrad: rank {rank} arrived {what}, but it was {text}")
    _check_go(gate, problem, rank, what)
    return values


def _check_go(gate: str, problem: str | None, rank: int, what: str) -> None:
    """Refuse a ``go`` at ``gate`` when this rank's own audit of the keys found ``problem``.

    Every rank audits the same values, so a ``go`` sealed by another rank means its audit passed;
    when this rank's fails, the Store's keys differed between the reads (corrupted or overwritten),
    and entering the collective could apply a gradient that is not the exact sum.
    """
    if problem is not None:
        raise StoreStateError(
            f"codedgrad: rank {rank}: the Store's {gate} says go {what}, but this rank's check of the same "
            f"keys refuses: {problem} (corrupted or overwritten keys)"
        )
