"""The coded all-reduce, as a function and as a standard DDP communication hook (DESIGN.md §3).

The coded all-reduce scales each rank's gradient by that rank's coefficient and SUMs across ranks.
With coefficient ``n_rank / Σ n`` (the rank's share of the global batch) and each rank's gradient
being that of the *mean* loss over its own samples, the sum is exactly the gradient of the mean
loss over the global batch, even when ranks have different batch sizes. Plain DDP averages by the
world size instead, which is only right when every rank has the same batch size.

The hook follows the conventions of ``torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py``::

    from codedgrad.runtime import CodedHookState, coded_allreduce_hook

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(CodedHookState(sample_counts=[32, 48, 80]), coded_allreduce_hook)
    loss = loss_fn(ddp(x_local), y_local)  # mean over this rank's samples
    loss.backward()                        # p.grad = gradient of the mean over all 160 samples
"""

# No ``from __future__ import annotations`` here: DistributedDataParallel.register_comm_hook checks
# the hook's annotations with inspect.signature and rejects string annotations ("bucket annotation
# should be dist.GradBucket"); they must be the real objects. The parameter must also be named
# ``bucket``.

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["CodedHookState", "coded_allreduce_", "coded_allreduce_hook"]


def _check_coefficient(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return value


def _scale_(tensor: torch.Tensor, coefficient: float) -> None:
    # A coefficient of 0 means "this rank's result is not used": zero the buffer rather than
    # multiply, so a NaN/inf in an unused result cannot leak into the sum (0 · inf = NaN).
    if coefficient == 0.0:
        tensor.zero_()
    elif coefficient != 1.0:
        tensor.mul_(coefficient)


def coded_allreduce_(tensor: torch.Tensor, coefficient: float, group: dist.ProcessGroup | None = None) -> None:
    """In place: ``tensor ← Σ_ranks coefficient_rank · tensor_rank`` over ``group`` (blocking).

    Args:
        tensor: this rank's contribution; overwritten with the sum on every rank.
        coefficient: this rank's multiplier (finite; decoding coefficients of gradient codes may be
            negative, and 0 drops this rank's contribution, whatever it holds).
        group: process group; the default (world) group if None.
    """
    coefficient = _check_coefficient("coefficient", coefficient)
    _scale_(tensor, coefficient)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


class CodedHookState:
    """State of :func:`coded_allreduce_hook`: the process group and this rank's coefficient.

    Give exactly one of:

    * ``sample_counts``: the number of samples each rank of ``process_group`` processes per step
      (length = the group's world size, indexed by group rank). This rank's coefficient is
      ``sample_counts[rank] / sum(sample_counts)``, which makes DDP produce the gradient of the mean
      loss over the global batch when each rank's loss is the mean over its own samples. This is the
      usual choice; use the same list on every rank.
    * ``coefficient``: this rank's multiplier, directly (finite; it may be negative, as decoding
      coefficients of gradient codes can be). Use it when the weights come from elsewhere, e.g. a
      decoder; the caller is responsible for the coefficients summing to what the loss needs.

    Tuning: nothing to tune beyond the weights; the hook adds one multiply per bucket to DDP's
    all-reduce. To change batch sizes between steps, call :meth:`set_sample_counts` (or
    :meth:`set_coefficient`) on every rank before the backward pass of that step.

    The group's world size and this rank's index are checked against ``sample_counts`` at
    construction when the process group is already initialised, otherwise on first use.

    Args:
        process_group: the group DDP reduces over; the default (world) group if None.
        coefficient: this rank's multiplier.
        sample_counts: per-rank sample counts (finite, ≥ 0, sum > 0).
    """

    __slots__ = ("_coefficient", "_sample_counts", "process_group")

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        coefficient: float | None = None,
        sample_counts: Sequence[float] | None = None,
    ) -> None:
        self.process_group = process_group
        self._coefficient: float | None = None
        self._sample_counts: tuple[float, ...] | None = None
        if (coefficient is None) == (sample_counts is None):
            raise ValueError("coefficient, sample_counts: give exactly one of them")
        if coefficient is not None:
            self.set_coefficient(coefficient)
        else:
            assert sample_counts is not None
            self.set_sample_counts(sample_counts)

    def set_coefficient(self, coefficient: float) -> None:
        """Use ``coefficient`` as this rank's multiplier from now on."""
        self._coefficient = _check_coefficient("coefficient", coefficient)
        self._sample_counts = None

    def set_sample_counts(self, sample_counts: Sequence[float]) -> None:
        """Weight this rank by its share of ``sample_counts`` from now on."""
        if isinstance(sample_counts, (str, bytes)) or not isinstance(sample_counts, (Sequence, np.ndarray)):
            raise ValueError(f"sample_counts: must be a list of per-rank counts, got {sample_counts!r}")
        counts = tuple(_check_coefficient(f"sample_counts[{i}]", n) for i, n in enumerate(sample_counts))
        if not counts:
            raise ValueError("sample_counts: need one count per rank, got an empty list")
        for i, n in enumerate(counts):
            if n < 0:
                raise ValueError(f"sample_counts[{i}]: must be >= 0, got {n!r}")
        if not sum(counts) > 0:
            raise ValueError(f"sample_counts: must sum to > 0, got {list(counts)}")
        self._sample_counts = counts
        self._coefficient = None
        if dist.is_available() and dist.is_initialized():
            self._check_group_size()

    @property
    def sample_counts(self) -> tuple[float, ...] | None:
        """The per-rank sample counts, or None when an explicit coefficient is used."""
        return self._sample_counts

    @property
    def coefficient(self) -> float:
        """This rank's multiplier (resolved from ``sample_counts`` with this rank's group rank)."""
        if self._coefficient is not None:
            return self._coefficient
        assert self._sample_counts is not None
        self._check_group_size()
        rank = dist.get_rank(self.process_group)
        return self._sample_counts[rank] / sum(self._sample_counts)

    def _check_group_size(self) -> None:
        assert self._sample_counts is not None
        world_size = dist.get_world_size(self.process_group)
        if len(self._sample_counts) != world_size:
            raise ValueError(
                f"sample_counts: has {len(self._sample_counts)} entries but the process group has "
                f"{world_size} ranks; give one count per rank"
            )

    def __repr__(self) -> str:
        weights = (
            f"coefficient={self._coefficient!r}"
            if self._coefficient is not None
            else f"sample_counts={list(self._sample_counts or ())}"
        )
        return f"CodedHookState(process_group={self.process_group!r}, {weights})"


def coded_allreduce_hook(state: CodedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: scale the bucket by this rank's coefficient and SUM all-reduce it.

    Register with ``ddp_model.register_comm_hook(CodedHookState(...), coded_allreduce_hook)``.
    Unlike DDP's default (divide by the world size, then sum), the result is the coefficient-
    weighted sum, e.g. the exact global-batch gradient with unequal per-rank batch sizes.

    Args:
        state: the process group and this rank's coefficient.
        bucket: the flattened gradients of one DDP bucket.

    Returns:
        A future resolving to the reduced bucket buffer (DDP copies it back into the gradients).
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    tensor = bucket.buffer()
    _scale_(tensor, state.coefficient)
    # all_reduce's future resolves to a list of tensors; DDP expects the tensor itself.
    return dist.all_reduce(tensor, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])
