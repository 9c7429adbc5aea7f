"""The engine's configuration: one typed, validated object that every rank must agree on.

:class:`EngineConfig` holds every setting of :class:`~codedgrad.runtime.engine.CodedDataParallel`
that changes what a step computes or when it waits. It is validated in ``__post_init__`` (each error
names the field) and then *agreed*: every rank publishes its configuration, its validation error if
any, and the shapes of its parameters and buffers through the Store, and every rank raises the same
:class:`ConfigurationError` when one rank is wrong or two ranks differ, before any collective. The
message names the first field that differs and each rank's value, not a hash.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import nn

from codedgrad.codes import CODE_NAMES
from codedgrad.emulate import Heterogeneity
from codedgrad.profile import WorkerProfile, profiles_to_dict
from codedgrad.runtime.coordinator import StoreCoordinator

__all__ = ["AUTO", "AUTO_START", "MAX_TIMEOUT", "NONFINITE_POLICIES", "ConfigurationError", "EngineConfig", "agree"]

#: ``redundancy=AUTO``: the planner chooses Ω from the measured profiles (:func:`codedgrad.plan.choose_redundancy`)
#: at every plan, starting from :data:`AUTO_START` until the ranks' task times are measured.
AUTO = "auto"
AUTO_START = 1.25

#: What a step does when the decoded gradient is not finite: ``"raise"`` (every rank raises
#: :class:`~codedgrad.runtime.step.NonFiniteGradientError`, the parameters' gradients untouched) or
#: ``"keep"`` (write it, e.g. for a ``GradScaler``, which then skips the step on every rank).
NONFINITE_POLICIES = ("raise", "keep")

#: The longest ``timeout``: the Store's waits and the process group take it as a ``timedelta``
#: (at most about 2.7 million years); a week is far beyond any step.
MAX_TIMEOUT = 7 * 24 * 3600.0


class ConfigurationError(ValueError):
    """The ranks' configurations are invalid or disagree; raised on every rank, before any collective."""


def _number(name: str, value: object) -> float:
    problem = ConfigurationError(f"{name}: must be a finite number, got {value!r}"[:200])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise problem
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise problem from None
    if not math.isfinite(number):
        raise problem
    return number


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the coded step (see :class:`~codedgrad.runtime.engine.CodedDataParallel` for each).

    Attributes:
        redundancy: ``"auto"`` (default: chosen by the planner from measured profiles; 1 for
            ``uncoded``) or Ω ≥ 1 (repetition); an integer s + 1 for ``frc`` and ``cyclic``.
        gamma: weight of the second moment in the planner's cost (≥ 0).
        code: one of :data:`codedgrad.codes.CODE_NAMES`.
        profiles: a starting :class:`WorkerProfile` per rank, or None (homogeneous, then measured).
        emulate: emulated heterogeneity (tests and benchmarks), or None.
        timeout: seconds a rank may wait without progress from the others (> 0).
        replan_every: steps between profile exchanges (0: never re-plan).
        replan_threshold: share by which the predicted step time must improve to switch plans.
        warmup_steps: steps measured before the first profile exchange when no profiles are given.
        spare_work: let an idle rank compute other ranks' open tasks when that can end the step sooner;
            ``"auto"``: only when no two ranks share a compute device (:mod:`~codedgrad.runtime.devices`).
        no_wait: reduce on the release thread as soon as a step is decided.
        broadcast_buffers: give every rank rank 0's module buffers after every step.
        bucket_cap_mb: largest flat gradient bucket of the coded all-reduce.
        max_steps_ahead: how many steps the release may complete for a rank whose compute thread is
            still inside an earlier step (no-wait release only); each costs one gradient buffer.
        nonfinite: one of :data:`NONFINITE_POLICIES`.
        value_slots: how many named scalars besides the loss ``task_loss`` may return per task
            (decoded with the gradient, e.g. a logged metric; see ``CodedDataParallel.value_slot``).
    """

    redundancy: float | str = AUTO
    gamma: float = 1.0
    code: str = "repetition"
    profiles: tuple[WorkerProfile, ...] | None = None
    emulate: Heterogeneity | None = None
    timeout: float = 300.0
    replan_every: int = 50
    replan_threshold: float = 0.1
    warmup_steps: int = 3
    spare_work: bool | str = AUTO
    no_wait: bool = True
    broadcast_buffers: bool = True
    bucket_cap_mb: float = 25.0
    max_steps_ahead: int = 4
    nonfinite: str = "raise"
    value_slots: int = 16

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.code not in CODE_NAMES:
            raise ConfigurationError(f"code: must be one of {', '.join(CODE_NAMES)}, got {self.code!r}")
        if isinstance(self.redundancy, str):
            if self.redundancy != AUTO:
                raise ConfigurationError(f"redundancy: must be a number >= 1 or {AUTO!r}, got {self.redundancy!r}")
            if self.code == "uncoded":  # nothing to choose: no redundancy
                set_(self, "redundancy", 1.0)
            elif self.code != "repetition":
                raise ConfigurationError(
                    f"redundancy: {AUTO!r} is for the repetition code; {self.code!r} needs an integer s + 1 "
                    "(each partition computed s + 1 times, any s ranks may straggle), e.g. redundancy=2"
                )
            self._check_rest()
            return
        redundancy = _number("redundancy", self.redundancy)
        if redundancy < 1:
            raise ConfigurationError(f"redundancy: must be >= 1, got {redundancy:g}")
        if self.code in ("frc", "cyclic") and redundancy != int(redundancy):
            raise ConfigurationError(
                f"redundancy: {self.code!r} replicates each partition s + 1 times, so it must be an integer, "
                f"got {redundancy:g}"
            )
        if self.code == "uncoded" and redundancy != 1:
            raise ConfigurationError(f"redundancy: 'uncoded' has none (Ω = 1), got {redundancy:g}; use 'repetition'")
        set_(self, "redundancy", redundancy)
        self._check_rest()

    def _check_rest(self) -> None:
        set_ = object.__setattr__
        gamma = _number("gamma", self.gamma)
        if gamma < 0:
            raise ConfigurationError(f"gamma: must be >= 0, got {gamma:g}")
        set_(self, "gamma", gamma)
        if self.profiles is not None:
            try:
                profiles = tuple(self.profiles)
            except TypeError:
                message = f"profiles: expected a list of WorkerProfile, got {self.profiles!r}"[:200]
                raise ConfigurationError(message) from None
            for i, p in enumerate(profiles):
                if not isinstance(p, WorkerProfile):
                    raise ConfigurationError(f"profiles[{i}]: expected a WorkerProfile, got {type(p).__name__}")
            set_(self, "profiles", profiles)
        if self.emulate is not None and not isinstance(self.emulate, Heterogeneity):
            raise ConfigurationError(f"emulate: expected a Heterogeneity, got {type(self.emulate).__name__}")
        timeout = _number("timeout", self.timeout)
        if not 0 < timeout <= MAX_TIMEOUT:
            raise ConfigurationError(f"timeout: must be in (0, {MAX_TIMEOUT:g}] seconds, got {timeout:g}")
        set_(self, "timeout", timeout)
        _integer("replan_every", self.replan_every, 0)
        threshold = _number("replan_threshold", self.replan_threshold)
        if not 0 <= threshold < 1:
            raise ConfigurationError(f"replan_threshold: must be in [0, 1), got {threshold:g}")
        set_(self, "replan_threshold", threshold)
        _integer("warmup_steps", self.warmup_steps, 1)
        if not (isinstance(self.spare_work, bool) or (isinstance(self.spare_work, str) and self.spare_work == AUTO)):
            raise ConfigurationError(f"spare_work: must be True, False or {AUTO!r}, got {self.spare_work!r}")
        for name in ("no_wait", "broadcast_buffers"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(f"{name}: must be True or False, got {getattr(self, name)!r}")
        cap = _number("bucket_cap_mb", self.bucket_cap_mb)
        if cap <= 0:
            raise ConfigurationError(f"bucket_cap_mb: must be > 0, got {cap:g}")
        set_(self, "bucket_cap_mb", cap)
        _integer("max_steps_ahead", self.max_steps_ahead, 0)
        _integer("value_slots", self.value_slots, 0)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ConfigurationError(
                f"nonfinite: must be one of {', '.join(NONFINITE_POLICIES)}, got {self.nonfinite!r}"
            )

    def check_world(self, world_size: int) -> None:
        """Raise :class:`ConfigurationError` if per-rank settings do not match ``world_size`` ranks."""
        if self.profiles is not None and len(self.profiles) != world_size:
            raise ConfigurationError(f"profiles: {len(self.profiles)} profiles for a world of {world_size} ranks")
        if self.emulate is not None and self.emulate.world_size != world_size:
            raise ConfigurationError(
                f"emulate.speeds: {self.emulate.world_size} speeds for a world of {world_size} ranks"
            )
        if self.code in ("frc", "cyclic") and float(self.redundancy) > world_size:
            raise ConfigurationError(
                f"redundancy: {self.code!r} needs s + 1 <= world size ({world_size}), got {self.redundancy:g}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values of every field (profiles and emulation as their file/JSON forms)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["profiles"] = profiles_to_dict(self.profiles) if self.profiles is not None else None
        values["emulate"] = self.emulate.to_dict() if self.emulate is not None else None
        return values


def describe_module(module: nn.Module) -> dict[str, Any]:
    """What every rank's module must match: trainable parameters and buffers, by name, shape and dtype."""
    return {
        "parameters": [[name, list(p.shape), str(p.dtype), p.requires_grad] for name, p in module.named_parameters()],
        "buffers": [[name, list(b.shape), str(b.dtype)] for name, b in module.named_buffers()],
    }


def agree(coordinator: StoreCoordinator, name: str, values: dict[str, Any], error: str | None, step: int = 0) -> None:
    """Publish ``values`` and ``error``; raise the same :class:`ConfigurationError` on every rank
    when any rank has an error or two ranks' values differ.

    Each field that differs is named with every rank's value (long lists: the first element that
    differs), so a user sees ``rank 0: redundancy=1.25, rank 1: redundancy=1.5`` rather than hashes.
    """
    payload = json.dumps({"values": values, "error": error}, sort_keys=True, default=_jsonable).encode()
    everyone = [_read_entry(r, name, value) for r, value in enumerate(coordinator.gather(name, payload, step))]
    ranks_by_error: dict[str, list[int]] = {}
    for r, entry in enumerate(everyone):
        if entry["error"]:
            ranks_by_error.setdefault(entry["error"], []).append(r)
    problems = [f"{_ranks(ranks)}: {message}" for message, ranks in ranks_by_error.items()]
    if not problems:  # values of a rank with an error may be partial; compare only valid ones
        for key in values:
            per_rank = [entry["values"].get(key) for entry in everyone]
            if any(v != per_rank[0] for v in per_rank):
                problems.append(f"ranks disagree on {key}: {_first_difference(key, per_rank)}")
    if problems:
        raise ConfigurationError("codedgrad: " + "; ".join(problems))


def _read_entry(rank: int, name: str, value: bytes) -> dict[str, Any]:
    """One rank's published ``{"values": {...}, "error": str | None}``, or ConfigurationError.

    Every rank reads the same bytes, so a corrupted entry fails the agreement on every rank alike.
    """
    try:
        entry = json.loads(value.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        problem = f"not JSON ({error})"
    else:
        well_formed = (
            isinstance(entry, dict)
            and isinstance(entry.get("values"), dict)
            and "error" in entry
            and (entry["error"] is None or isinstance(entry["error"], str))
        )
        if well_formed:
            return entry
        problem = 'not {"values": {...}, "error": ...}'
    raise ConfigurationError(
        f"codedgrad: rank {rank}'s {name!r} in the Store is {problem[:200]} (corrupted, or another codedgrad version)"
    )


def _first_difference(key: str, per_rank: Sequence[Any]) -> str:
    """``rank 0: key[3]=[8, 5], rank 1: key[3]=[8, 6]``: the first differing element of long lists."""
    where = key
    values = list(per_rank)
    while all(isinstance(v, list) for v in values) and values:
        lengths = {len(v) for v in values}
        shortest = min(lengths)
        index = next((i for i in range(shortest) if any(v[i] != values[0][i] for v in values)), None)
        if index is None:
            break  # equal up to the shortest: the lengths differ
        where, values = f"{where}[{index}]", [v[index] for v in values]
    if all(isinstance(v, dict) for v in values) and values:
        keys = sorted(set().union(*values), key=str)
        sub = next((k for k in keys if any(v.get(k) != values[0].get(k) for v in values)), None)
        if sub is not None:
            return _first_difference(f"{where}.{sub}", [v.get(sub) for v in values])
    shown = [json.dumps(v) if not isinstance(v, list) or len(v) <= 8 else f"<{len(v)} entries>" for v in values]
    return ", ".join(f"rank {r}: {where}={text}" for r, text in enumerate(shown))


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _jsonable(value: object) -> object:
    if isinstance(value, WorkerProfile):
        return asdict(value)
    return str(value)
