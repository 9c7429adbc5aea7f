"""What both baselines share: task weights, the agreed configuration, a Store namespace, the report.

Both baselines run on the default process group (the world) and its c10d Store, like
:class:`~codedgrad.CodedDataParallel`; each instance gets a namespace of its own in the Store (the
n-th baseline of a kind built on every rank shares one), so several can run side by side (the
benchmark interleaves them).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from codedgrad.emulate import EmulationError, Heterogeneity
from codedgrad.runtime.config import ConfigurationError, agree
from codedgrad.runtime.coordinator import StoreCoordinator

__all__ = ["BaselineReport", "BaselineStepError", "BatchLoss"]

BatchLoss = Callable[[list[int]], Any]
"""``batch_loss(task_ids)``: the mean loss (a scalar tensor) over the union of those tasks' samples;
it may also return ``(loss, values)``, of which only the loss is used."""

_instances: dict[str, itertools.count] = {}


class BaselineStepError(RuntimeError):
    """A baseline's step failed on every rank (a rank's loss raised, its tasks were bad, or a wait
    timed out); the message names the rank and what happened. The ranks stay in step: a loop that
    catches it can go on."""


@dataclass
class BaselineReport:
    """What one rank saw of one step of a baseline.

    Attributes:
        step: the step index (0-based, counted by the baseline).
        rank: this rank.
        step_time: seconds from the ``backward`` call until ``p.grad`` was set (an exact check, see
            :class:`~codedgrad.baselines.DropSlowest`, excluded).
        loss: the weighted mean loss over the tasks the gradient used (reduced with the gradient).
        contributors: the ranks whose work is in the gradient.
        tasks_used: the tasks whose samples are in the gradient, in order.
        computed: the tasks this rank computed in this step (its work may not all be used).
    """

    step: int
    rank: int
    step_time: float = 0.0
    loss: float = math.nan
    contributors: tuple[int, ...] = ()
    tasks_used: tuple[int, ...] = ()
    computed: tuple[int, ...] = field(default=())


def task_weights(tasks: int | Sequence[float], world_size: int) -> tuple[float, ...]:
    """``tasks`` (K, or one weight per task) as one weight per task, validated; at least one task per rank.

    Raises:
        TypeError / ValueError: naming the bad entry.
    """
    if isinstance(tasks, bool):
        raise TypeError(f"tasks: must be a number of tasks or a list of task weights, got {tasks!r}")
    if isinstance(tasks, int):
        weights = (1.0,) * tasks
    else:
        try:
            weights = tuple(float(w) for w in tasks)
        except (TypeError, ValueError):
            raise TypeError(f"tasks: must be a number of tasks or a list of task weights, got {tasks!r}") from None
        for j, w in enumerate(weights):
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"tasks[{j}]: a task weight must be finite and >= 0, got {w}")
    if len(weights) < world_size:
        raise ValueError(f"tasks: {len(weights)} tasks for {world_size} ranks; give at least one task per rank")
    if not math.fsum(weights) > 0:
        raise ValueError("tasks: the task weights sum to 0")
    return weights


def uniform_shares(num_tasks: int, world_size: int) -> list[range]:
    """Each rank's contiguous share of K tasks, as plain DDP splits them (sizes differ by at most one)."""
    counts = [num_tasks // world_size + (r < num_tasks % world_size) for r in range(world_size)]
    starts = [sum(counts[:r]) for r in range(world_size)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


_MAX_TIMEOUT = 7 * 24 * 3600.0  # the Store and the process group take timeouts as a timedelta


def check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, Real) or not 0 < timeout <= _MAX_TIMEOUT:
        raise ConfigurationError(f"timeout: must be a number of seconds in (0, {_MAX_TIMEOUT:g}], got {timeout!r}")
    return float(timeout)


def usable_timeout(timeout: object) -> float:
    """``timeout`` if valid, else 300 s: the agreement itself must wait with some timeout before it can
    report the bad value on every rank."""
    try:
        return check_timeout(timeout)
    except ConfigurationError:
        return 300.0


def open_namespace(kind: str, timeout: float) -> tuple[dist.PrefixStore, StoreCoordinator, int, int]:
    """This instance's Store namespace, a coordinator for agreeing on settings, rank and world size.

    Raises:
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_initialized():
        raise RuntimeError(f"{kind}: needs torch.distributed; call init_process_group first")
    rank, world = dist.get_rank(), dist.get_world_size()
    name = next(_instances.setdefault(kind, itertools.count()))
    store = dist.PrefixStore(f"codedgrad-baselines/{kind}/{name}", dist.distributed_c10d._get_default_store())
    return store, StoreCoordinator(dist.PrefixStore("agree", store), rank, world, timeout), rank, world


def agree_on_settings(
    coordinator: StoreCoordinator, kind: str, module: nn.Module, check: Callable[[], dict[str, Any]]
) -> None:
    """Run ``check()`` (local validation returning the settings) and agree on its result through the Store.

    A bad setting on one rank, or ranks that disagree, raise the same :class:`ConfigurationError`
    on every rank, naming the rank and the field, before any collective.
    """
    error, values = None, {}
    try:
        values = check()
        if not any(p.requires_grad for p in module.parameters()):
            raise ConfigurationError("module: has no parameter that requires grad (nothing to train)")
        values["parameters"] = [list(p.shape) for p in module.parameters() if p.requires_grad]
    except (ConfigurationError, EmulationError) as exc:
        error = str(exc)
    try:
        agree(coordinator, "config", values, error)
    except ConfigurationError as exc:
        coordinator.close()  # every rank fails here: the last one deletes the agreement's keys
        raise ConfigurationError(f"{kind}: {exc}") from None


def resolve_emulation(emulate: Heterogeneity | None, world_size: int) -> Heterogeneity | None:
    """``emulate``, or the one in ``CODEDGRAD_EMULATE``; checked against the world size."""
    if emulate is None:
        emulate = Heterogeneity.from_env()
    elif not isinstance(emulate, Heterogeneity):
        raise ConfigurationError(f"emulate: must be a Heterogeneity or None, got {type(emulate).__name__}")
    if emulate is not None:
        emulate.check_world_size(world_size)
    return emulate


def broadcast_module(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (one collective per tensor, at construction)."""
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=0)


def loss_of(result: Any, task_ids: list[int]) -> torch.Tensor:
    """The loss tensor ``batch_loss`` returned (its first element when it returned a tuple), checked."""
    loss = result[0] if isinstance(result, tuple) else result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"batch_loss({task_ids}) must return a scalar tensor, got {type(loss).__name__}")
    return loss.reshape(())


def emulated_sleep(
    emulate: Heterogeneity | None, rank: int, step: int, count: int, first: int, compute_seconds: float
) -> float:
    """After a batch of ``count`` tasks (this rank's ``first``-th onwards), which took ``compute_seconds``
    of real compute: sleep its emulated delay (see :meth:`Heterogeneity.sleep_batch`; sleep mode
    ignores the measured compute, compute mode scales it)."""
    if emulate is None or count == 0:
        return 0.0
    return emulate.sleep_batch(rank, step, count, first, compute_seconds=compute_seconds)
