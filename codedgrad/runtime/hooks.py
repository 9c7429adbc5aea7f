"""The coded all-reduce, as a function and as a standard DDP communication hook.

The coded all-reduce scales each rank's gradient by that rank's coefficient and SUMs across ranks.
With coefficient ``n_rank / Σ n`` (the rank's share of the global batch) and each rank's gradient
being that of the *mean* loss over its own samples, the sum is exactly the gradient of the mean
loss over the global batch, even when ranks have different batch sizes. Plain DDP averages by the
world size instead, which is only right when every rank has the same batch size. See
`docs/design.md, "The DDP hook" <../../docs/design.md#the-ddp-hook>`_.

The hook follows the conventions of ``torch/distributed/algorithms/ddp_comm_hooks/default_hooks.py``::

    from codedgrad.runtime import CodedHookState, coded_allreduce_hook

    ddp = DistributedDataParallel(model)
    ddp.register_comm_hook(CodedHookState(sample_counts=[32, 48, 80]), coded_allreduce_hook)
    loss = loss_fn(ddp(x_local), y_local)  # mean over this rank's samples
    loss.backward()                        # p.grad = gradient of the mean over all 160 samples

**Agreement check.** A rank's coefficient is only right if every rank uses the same
``sample_counts``; with different lists the sum is silently wrong. So every backward pass also
reduces one 16-byte tensor: each rank's digest of its weights, packed with its rank, and the
negated digest, both with MAX. It is launched with the first bucket (DDP launches buckets in index
order on every rank, whatever order their gradients become ready in) and read before the last
bucket's future resolves. Every rank gets the same largest and smallest digest, so either every
rank accepts the step or every rank raises the same ``ValueError`` (surfacing from ``backward()``)
naming a rank at each end; a rank whose counts did not change fails too. Ranks that use explicit
coefficients share one digest (their coefficients legitimately differ), so mixing the two ways on
different ranks fails as well.
"""

# No ``from __future__ import annotations`` here: DistributedDataParallel.register_comm_hook checks
# the hook's annotations with inspect.signature and rejects string annotations ("bucket annotation
# should be dist.GradBucket"); they must be the real objects. The parameter must also be named
# ``bucket``.

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["CodedHookState", "coded_allreduce_", "coded_allreduce_hook"]

# A check entry is ``digest << _RANK_BITS | rank``: MAX then yields the largest digest together with
# a rank holding it (and, on the negated digest, the smallest). 42 + 20 bits stay below int64's 63.
_RANK_BITS = 20
_DIGEST_BITS = 42
_RANK_MASK = (1 << _RANK_BITS) - 1


def _digest(kind: bytes, values: Sequence[float] = ()) -> int:
    """A 42-bit digest of the weights' kind and values (equal inputs give equal digests on any rank)."""
    packed = kind + struct.pack(f"<{len(values)}d", *values)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> (64 - _DIGEST_BITS)


_COEFFICIENT_DIGEST = _digest(b"explicit coefficient")


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


@dataclass
class _PendingCheck:
    """The agreement check of one backward pass, launched with its first bucket."""

    future: torch.futures.Future
    tensor: torch.Tensor  # [digest << 20 | rank, −digest << 20 | rank], MAX-reduced in place
    rank: int
    weights: str  # this rank's weights, for the error message
    local_error: ValueError | None  # this rank's own error (e.g. a count per rank missing), raised after the check


class CodedHookState:
    """State of :func:`coded_allreduce_hook`: the process group and this rank's coefficient.

    Give exactly one of:

    * ``sample_counts``: the number of samples each rank of ``process_group`` processes per step
      (length = the group's world size, indexed by group rank). This rank's coefficient is
      ``sample_counts[rank] / sum(sample_counts)``, which makes DDP produce the gradient of the mean
      loss over the global batch when each rank's loss is the mean over its own samples. This is the
      usual choice; use the same list on every rank (checked on every backward pass: see the module
      docstring).
    * ``coefficient``: this rank's multiplier, directly (finite; it may be negative, as decoding
      coefficients of gradient codes can be). Use it when the weights come from elsewhere, e.g. a
      decoder; the caller is responsible for the coefficients summing to what the loss needs.

    Tuning: nothing to tune beyond the weights; the hook adds one multiply per bucket and one
    16-byte all-reduce per backward pass (the agreement check) to DDP's all-reduce. To change batch
    sizes between steps, call :meth:`set_sample_counts` (or :meth:`set_coefficient`) on every rank
    before the backward pass of that step. The check runs on host tensors where the group has gloo
    (also ``"cpu:gloo,cuda:nccl"``); on an NCCL-only group it runs on the GPU and reading its verdict
    synchronises the host once per backward pass, at the last bucket.

    The group's world size and this rank's index are checked against ``sample_counts`` at
    construction when the process group is already initialised, otherwise on first use.

    Args:
        process_group: the group DDP reduces over; the default (world) group if None.
        coefficient: this rank's multiplier.
        sample_counts: per-rank sample counts (finite, ≥ 0, sum > 0).
    """

    __slots__ = ("_coefficient", "_digest", "_pending", "_sample_counts", "process_group")

    def __init__(
        self,
        process_group: dist.ProcessGroup | None = None,
        coefficient: float | None = None,
        sample_counts: Sequence[float] | None = None,
    ) -> None:
        self.process_group = process_group
        self._coefficient: float | None = None
        self._sample_counts: tuple[float, ...] | None = None
        self._digest = _COEFFICIENT_DIGEST
        self._pending: _PendingCheck | None = None
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
        self._digest = _COEFFICIENT_DIGEST

    def set_sample_counts(self, sample_counts: Sequence[float]) -> None:
        """Weight this rank by its share of ``sample_counts`` from now on (the same list on every rank)."""
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
        self._digest = _digest(b"sample counts", counts)  # once per change, not per step
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

    def _weights(self) -> str:
        if self._coefficient is not None:
            return f"coefficient={self._coefficient!r}"
        return f"sample_counts={[int(n) if n.is_integer() else n for n in self._sample_counts or ()]}"

    def __repr__(self) -> str:
        weights = (
            f"coefficient={self._coefficient!r}"
            if self._coefficient is not None
            else f"sample_counts={list(self._sample_counts or ())}"
        )
        return f"CodedHookState(process_group={self.process_group!r}, {weights})"


def _check_device(group: dist.ProcessGroup, bucket_device: torch.device) -> torch.device:
    """Where the check's tensor lives: on the host when the group can reduce host tensors (gloo)."""
    # A host tensor keeps the verdict off the GPU: no device synchronisation to read it. NCCL (and
    # backends we do not know) reduce tensors on the bucket's device, which they support by construction.
    backend = str(dist.get_backend(group))
    return torch.device("cpu") if "gloo" in backend else bucket_device


def _launch_check(
    state: CodedHookState, group: dist.ProcessGroup, device: torch.device, local_error: ValueError | None
) -> _PendingCheck:
    """Start the agreement check of this backward pass (asynchronous, 2 × int64, MAX)."""
    rank = dist.get_rank(group)
    device = _check_device(group, device)
    # Every rank issues this collective, whatever its weights, so the collective sequences stay
    # aligned; a rank with an unusable state still takes part and fails after it with the others.
    low = rank & _RANK_MASK
    entries = [(state._digest << _RANK_BITS) | low, -(state._digest << _RANK_BITS) + low]
    tensor = torch.tensor(entries, dtype=torch.int64, device=device)
    future = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group, async_op=True).get_future()
    return _PendingCheck(future, tensor, rank, state._weights(), local_error)


def _verify(check: _PendingCheck) -> None:
    """Raise on every rank alike when the ranks' weights differ (the check's MAX is the same everywhere)."""
    check.future.wait()
    high, low = check.tensor.tolist()
    high_rank, low_rank = high & _RANK_MASK, low & _RANK_MASK
    high_digest, low_digest = high >> _RANK_BITS, -((low - low_rank) >> _RANK_BITS)
    if high_digest != low_digest:
        raise ValueError(
            f"sample_counts: the ranks' hook weights disagree (rank {high_rank} has digest {high_digest:011x}, "
            f"rank {low_rank} has digest {low_digest:011x}); every rank must call set_sample_counts with the "
            f"same list before the backward pass (this rank, {check.rank}, has {check.weights})"
        )
    if check.local_error is not None:
        raise check.local_error


def coded_allreduce_hook(state: CodedHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: scale the bucket by this rank's coefficient and SUM all-reduce it.

    Register with ``ddp_model.register_comm_hook(CodedHookState(...), coded_allreduce_hook)``.
    Unlike DDP's default (divide by the world size, then sum), the result is the coefficient-
    weighted sum, e.g. the exact global-batch gradient with unequal per-rank batch sizes. The
    ranks' weights are checked for agreement on every backward pass (see the module docstring).

    Args:
        state: the process group and this rank's coefficient.
        bucket: the flattened gradients of one DDP bucket.

    Returns:
        A future resolving to the reduced bucket buffer (DDP copies it back into the gradients); for
        the last bucket it fails, on every rank, when the ranks' weights disagree.
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    tensor = bucket.buffer()
    try:
        coefficient, local_error = state.coefficient, None
    except ValueError as error:
        # Raising here would leave the other ranks waiting in the collective: reduce zeros instead
        # and raise after the agreement check, which fails on every rank (the digests differ, or
        # every rank has the same error).
        coefficient, local_error = 0.0, error
    if bucket.index() == 0:  # DDP launches bucket 0 first on every rank, before and after its rebuild
        state._pending = _launch_check(state, group, tensor.device, local_error)
    _scale_(tensor, coefficient)
    future = dist.all_reduce(tensor, group=group, async_op=True).get_future()
    if not bucket.is_last():
        # all_reduce's future resolves to a list of tensors; DDP expects the tensor itself.
        return future.then(lambda fut: fut.value()[0])
    check, state._pending = state._pending, None

    def verified(fut: torch.futures.Future) -> torch.Tensor:
        if check is not None:
            _verify(check)
        return fut.value()[0]

    # Verified at the last bucket rather than the first: on CUDA, reading the verdict synchronises
    # the host, and by then the whole backward pass has been queued.
    return future.then(verified)
