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
    "CostModel",
    "ProfileError",
    "WorkerProfile",
    "fit_cost_model",
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


@dataclass(frozen=True)
class CostModel:
    """One rank's compute time of a micro-batch: ``fixed + per_sample · samples``.

    Real forward/backward passes cost less per sample in larger micro-batches: ``fixed`` is what
    every call pays whatever its size (kernel launches, Python, the optimizer-free autograd
    bookkeeping), ``per_sample`` what each sample adds. A task-sized call pays ``fixed`` once per
    task; a chunk of several tasks pays it once per chunk.

    Args:
        fixed: seconds per call (≥ 0).
        per_sample: seconds per sample, or per unit of task weight (≥ 0).
        fixed_stderr: the standard error of ``fixed`` from the fit (0: exact). Chunk sizes use
            ``fixed − 2·fixed_stderr``, so that noise alone (e.g. exponential jitter) does not
            make chunks large.
    """

    fixed: float
    per_sample: float
    fixed_stderr: float = 0.0

    def __post_init__(self) -> None:
        for name in ("fixed", "per_sample", "fixed_stderr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ProfileError(f"{name}: must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ProfileError(f"{name}: must be finite and >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def seconds(self, samples: float) -> float:
        """Predicted compute seconds of one call on ``samples`` samples."""
        return self.fixed + self.per_sample * samples

    def min_samples(self, overhead_share: float = 0.1) -> float:
        """The fewest samples a call needs for ``fixed`` to be at most ``overhead_share`` of its time.

        ``fixed / (fixed + per_sample · n) ≤ s``  ⇔  ``n ≥ fixed · (1 − s) / (s · per_sample)``;
        0 without a fixed part, infinite when samples cost nothing (every call is all overhead). The
        fixed part is taken at its lower confidence bound ``fixed − 2·fixed_stderr``: calls are
        made larger only for a fixed cost the measurements really show.
        """
        if not 0 < overhead_share < 1:
            raise ProfileError(f"overhead_share: must be in (0, 1), got {overhead_share!r}")
        fixed = max(0.0, self.fixed - 2.0 * self.fixed_stderr)
        if fixed == 0:
            return 0.0
        if self.per_sample == 0:
            return math.inf
        return fixed * (1 - overhead_share) / (overhead_share * self.per_sample)


def fit_cost_model(samples: Sequence[float] | np.ndarray, seconds: Sequence[float] | np.ndarray) -> CostModel:
    """Fit ``seconds ≈ fixed + per_sample · samples`` robustly (stalls must not move it much).

    An iteratively reweighted least-squares fit with Tukey's biweight: a measurement whose residual
    is more than 4.685 robust standard deviations (1.4826 · the median absolute residual) away gets
    no weight, so a few per cent of stalled calls (ten times longer) are ignored, while on clean
    data it is the ordinary least-squares line. With a single distinct size the two parts cannot be
    told apart: the fit is then all per-sample (``fixed = 0``), the conservative reading for
    chunking (no reason to make calls larger). Both parts are clipped at 0 (a negative intercept
    from noise means "no measurable fixed part").

    Args:
        samples: the size of each call (samples, or the tasks' summed weight), > 0.
        seconds: its measured compute time (finite, ≥ 0).
    """
    x = np.asarray(samples, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size == 0:
        raise ProfileError("samples, seconds: need two equally long non-empty lists")
    if not (np.all(np.isfinite(x)) and np.all(x > 0)):
        raise ProfileError("samples: must be finite and > 0")
    if not (np.all(np.isfinite(y)) and np.all(y >= 0)):
        raise ProfileError("seconds: must be finite and >= 0")
    if np.ptp(x) == 0:
        return CostModel(0.0, float(np.median(y / x)))
    weights = np.ones_like(x)
    coef = (0.0, 0.0)
    for _ in range(20):
        previous, coef = coef, _weighted_line(x, y, weights)
        if _same_line(previous, coef, float(x.mean())):
            break  # converged: the weights would not move the line any further
        residual = y - (coef[0] + coef[1] * x)
        scale = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
        if scale <= 1e-12 * max(float(np.abs(y).max()), 1e-300):
            break  # an exact fit: nothing left to down-weight
        u = residual / (4.685 * scale)
        new = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
        if np.count_nonzero(new) < 2 or np.allclose(new, weights):
            break
        weights = new
    fixed, per_sample = float(coef[0]), float(coef[1])
    if per_sample < 0:  # noise on sizes too close together: all of it per sample
        return CostModel(0.0, float(np.median(y / x)))
    if fixed < 0:  # refit through the origin with the same weights
        per_sample = float(np.sum(weights * x * y) / max(np.sum(weights * x * x), 1e-300))
        return CostModel(0.0, per_sample)
    # The intercept's standard error of the weighted fit: σ² (XᵀWX)⁻¹ at [0, 0] = σ² Σwx² / det.
    residual = y - (coef[0] + coef[1] * x)
    dof = float(np.sum(weights)) - 2.0
    stderr = math.inf
    if dof > 0:
        sigma2 = float(np.sum(weights * residual**2)) / dof
        sw, sx, sxx = float(np.sum(weights)), float(weights @ x), float(weights @ (x * x))
        det = sw * sxx - sx * sx
        if det > 0:
            stderr = math.sqrt(max(0.0, sigma2 * sxx / det))
    return CostModel(fixed, per_sample, fixed_stderr=stderr if math.isfinite(stderr) else fixed)


def _same_line(a: tuple[float, float], b: tuple[float, float], x: float) -> bool:
    """Whether two lines agree to 1e-4 relative at ``x`` and in slope: an IRLS fit has converged far
    below its own noise (the biweight converges linearly: to 1e-7 took ~16 refits)."""
    at_a, at_b = a[0] + a[1] * x, b[0] + b[1] * x
    return abs(at_a - at_b) <= 1e-4 * abs(at_b) and abs(a[1] - b[1]) <= 1e-4 * abs(b[1])


def _weighted_line(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """``(intercept, slope)`` of the weighted least-squares line through ``(x, y)``: the normal equations
    of two unknowns in closed form (a refit runs every few calls on the compute thread; a general
    solver took ~4 ms a fit). Centred on the weighted mean of ``x``, which keeps it well conditioned."""
    total = float(np.sum(weights))
    if total <= 0:
        return 0.0, 0.0
    mean_x, mean_y = float(weights @ x) / total, float(weights @ y) / total
    dx = x - mean_x
    spread = float(weights @ (dx * dx))
    if spread <= 0:  # every weighted call of one size: the line through their mean and the origin
        return 0.0, mean_y / mean_x if mean_x > 0 else 0.0
    slope = float(weights @ (dx * (y - mean_y))) / spread
    return mean_y - slope * mean_x, slope
