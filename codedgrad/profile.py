"""Worker profiles: the speed model the planner optimises, its file format and its fitting.

A worker p doing κ tasks takes ``T_p = c_p + X_1 + … + X_κ``: a fixed *shift* ``c_p`` (start-up,
launch, waiting for data) plus κ independent task times of *mean* ``m_p`` and standard deviation
*std* ``σ_p`` (docs/design.md#the-model). The profile file format (docs/design.md#interfaces) is::

    {"workers": [{"shift": 0.0, "mean": 0.05, "std": 0.05}, ...]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ProfileError",
    "WorkerProfile",
    "fit_profile",
    "load_profiles",
    "profiles_from_dict",
    "profiles_to_dict",
    "save_profiles",
]


class ProfileError(ValueError):
    """A profile or profile file is malformed; the message names the offending field."""


@dataclass(frozen=True)
class WorkerProfile:
    """How long one worker takes for κ tasks: ``shift + X_1 + … + X_κ``, each X of ``mean`` ± ``std``.

    Args:
        shift: fixed time per job, independent of the number of tasks (≥ 0).
        mean: mean time of one task (> 0).
        std: standard deviation of one task's time (≥ 0). ``std == mean`` models exponential tasks.
    """

    shift: float
    mean: float
    std: float

    def __post_init__(self) -> None:
        for name in ("shift", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ProfileError(f"{name}: must be a number, got {value!r}")
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float (e.g. from a JSON file)
                number = math.inf
            if not math.isfinite(number):
                raise ProfileError(f"{name}: must be finite, got {value!r}"[:200])
            object.__setattr__(self, name, number)
        if self.mean <= 0:
            raise ProfileError(f"mean: must be > 0, got {self.mean!r}")
        if self.std < 0:
            raise ProfileError(f"std: must be >= 0, got {self.std!r}")
        if self.shift < 0:
            raise ProfileError(f"shift: must be >= 0, got {self.shift!r}")

    @property
    def rate(self) -> float:
        """Tasks per unit time in steady state (1 / mean)."""
        return 1.0 / self.mean

    def expected_time(self, tasks: float) -> float:
        """E[T] for ``tasks`` tasks: ``shift + tasks·mean``."""
        return self.shift + tasks * self.mean

    def second_moment(self, tasks: float) -> float:
        """E[T²] for ``tasks`` tasks: ``(shift + tasks·mean)² + tasks·std²``."""
        return self.expected_time(tasks) ** 2 + tasks * self.std**2

    def cost(self, tasks: float, gamma: float = 1.0) -> float:
        """The planner's cost ``E[T] + γ·E[T²]`` of giving this worker ``tasks`` tasks."""
        return self.expected_time(tasks) + gamma * self.second_moment(tasks)

    def sample_task_times(self, rng: np.random.Generator, size: int | tuple[int, ...]) -> np.ndarray:
        """Draw task times (without the shift) with this profile's mean and std.

        The model fixes only two moments, so the simulators pick the distribution:

        * ``std == 0``: every task takes ``mean``;
        * ``std <= mean``: shifted exponential, ``(mean − std) + Exp(std)``; ``std == mean`` is the
          paper's exponential task time, and this is also what :mod:`codedgrad.emulate` produces;
        * ``std > mean``: gamma with shape ``(mean/std)²`` and scale ``std²/mean`` (a shifted
          exponential would need a negative floor).
        """
        if self.std == 0:
            return np.full(size, self.mean)
        if self.std <= self.mean:
            return (self.mean - self.std) + rng.exponential(self.std, size)
        return rng.gamma((self.mean / self.std) ** 2, self.std**2 / self.mean, size)


def profiles_from_dict(data: object) -> list[WorkerProfile]:
    """Parse the profile file's JSON document; errors name the field, e.g. ``workers[2].mean``."""
    if not isinstance(data, dict) or "workers" not in data:
        raise ProfileError('profile: expected an object with a "workers" list')
    workers = data["workers"]
    if not isinstance(workers, list) or not workers:
        raise ProfileError("workers: must be a non-empty list")
    profiles = []
    for i, entry in enumerate(workers):
        if not isinstance(entry, dict):
            raise ProfileError(f"workers[{i}]: must be an object with mean and std")
        unknown = set(entry) - {"shift", "mean", "std"}
        if unknown:
            raise ProfileError(f"workers[{i}].{sorted(unknown)[0]}: unknown field")
        for required in ("mean", "std"):
            if required not in entry:
                raise ProfileError(f"workers[{i}].{required}: missing")
        try:
            profiles.append(WorkerProfile(entry.get("shift", 0.0), entry["mean"], entry["std"]))
        except ProfileError as error:
            raise ProfileError(f"workers[{i}].{error}") from None
    return profiles


def profiles_to_dict(profiles: Sequence[WorkerProfile]) -> dict:
    """The JSON document of the profile file format."""
    return {"workers": [asdict(p) for p in profiles]}


def load_profiles(path: str | Path) -> list[WorkerProfile]:
    """Read a profile file (docs/design.md#interfaces)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ProfileError(f"profile: cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"profile: {path} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProfileError(f"profile: {path} is not JSON ({error.msg} at line {error.lineno})") from None
    return profiles_from_dict(data)


def save_profiles(path: str | Path, profiles: Sequence[WorkerProfile]) -> None:
    """Write a profile file (docs/design.md#interfaces)."""
    Path(path).write_text(json.dumps(profiles_to_dict(profiles), indent=2) + "\n")


def fit_profile(task_times: Sequence[float] | np.ndarray, shift: float = 0.0) -> WorkerProfile:
    """Fit a profile to measured per-task times, robustly: stragglers must not move it much.

    Task times are modelled as shifted-exponential-like: a floor plus a non-negative jitter. The
    mean is estimated as ``floor + scale`` where the floor is a low quantile and the jitter scale is
    the median excess over it divided by ln 2 (the median of an exponential is ln 2 times its mean).
    Both are order statistics, so a few per cent of stalls (tasks ten times longer) barely move them,
    whereas a plain sample mean would follow the stalls. The std is the jitter scale, as for a
    shifted exponential. ``shift`` is the per-job fixed time, measured separately by the caller.

    Args:
        task_times: per-task durations of one worker (at least one, all finite and ≥ 0).
        shift: the worker's per-job fixed time, if known.
    """
    try:
        times = np.asarray(task_times, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise ProfileError("task_times: must be a list of numbers") from None
    if times.ndim != 1 or times.size == 0:
        raise ProfileError("task_times: need at least one measurement")
    if not np.all(np.isfinite(times)) or np.any(times < 0):
        raise ProfileError("task_times: must be finite and >= 0")
    floor = float(np.quantile(times, 0.02)) if times.size >= 50 else float(times.min())
    excess = times - floor
    scale = float(np.median(excess)) / math.log(2.0)
    mean = floor + scale
    if mean <= 0:  # all measurements zero (a timer too coarse): keep the profile valid
        mean = max(float(times.max()), 1e-9)
    if not math.isfinite(mean):  # times near the largest float: their spread overflows
        raise ProfileError(f"task_times: too large to fit (largest {float(times.max()):g})")
    return WorkerProfile(shift=shift, mean=mean, std=scale)
