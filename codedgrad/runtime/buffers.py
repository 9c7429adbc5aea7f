"""Flat gradient buffers: one contiguous tensor per (device, dtype), one view per parameter.

The coded all-reduce must be one SUM collective per bucket, not one per parameter, so a rank
accumulates its used results directly into flat buffers whose slices are shaped like the
parameters. The first bucket carries a few more elements, the step's weighted loss and other
logged scalars: the global batch's value is linear in the tasks' values just like the gradient, so
it is decoded by the same collective at no extra cost. Low-precision parameters (bf16, fp16)
accumulate in float32: a step sums up to K task gradients, and rounding each partial sum to 8 bits
of mantissa would lose the exactness the decoder guarantees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["FlatGradients"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class FlatGradients:
    """Gradients of ``params`` packed into flat buffers of at most ``bucket_bytes`` each.

    Args:
        params: the parameters whose gradients are accumulated (all must require grad).
        bucket_bytes: largest size of one buffer (a single larger parameter gets a buffer of its
            own; a parameter never straddles two).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        bucket_bytes: int = 25 * 2**20,
        value_slots: int = 0,
        agreement_slots: int = 0,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise ValueError("params: need at least one parameter that requires grad")
        self.views: list[torch.Tensor] = []
        specs: list[list] = []  # per bucket: [device, dtype, elements so far]
        open_bucket: dict[tuple[torch.device, torch.dtype], int] = {}  # (device, dtype) -> bucket being filled
        layout: list[tuple[int, int]] = []  # per parameter: (bucket index, offset)
        for p in self.params:
            device, dtype = p.device, _accumulate_dtype(p.dtype)
            index = open_bucket.get((device, dtype))
            if index is None or (specs[index][2] > 0 and specs[index][2] + p.numel() > bucket_bytes // dtype.itemsize):
                index = open_bucket[(device, dtype)] = len(specs)
                specs.append([device, dtype, 0])
            layout.append((index, specs[index][2]))
            specs[index][2] += p.numel()
        extra = 1 + 2 * value_slots + agreement_slots + len(self.params)
        # the loss, (Σ weight·value, Σ weight) per value slot, the direct step's agreement, a use count per parameter
        specs[0][2] += extra
        self.buckets = [torch.zeros(size, device=device, dtype=dtype) for device, dtype, size in specs]
        for p, (index, offset) in zip(self.params, layout):
            self.views.append(self.buckets[index][offset : offset + p.numel()].view_as(p))
        tail = self.buckets[0][self.buckets[0].numel() - extra :]
        self.loss = tail[:1]  # a view: the weighted sum of the tasks' losses
        self.values = tail[1 : 1 + 2 * value_slots].view(value_slots, 2)  # logged scalars, decoded like the loss
        end = 1 + 2 * value_slots + agreement_slots
        self.agreement = tail[1 + 2 * value_slots : end]  # zero but in a direct step (runtime/direct.py)
        # How many results gave each parameter a gradient; summed by the all-reduce, so every rank knows
        # which parameters no task used anywhere (their p.grad is left alone, as DDP does).
        self.uses = tail[end:]
        self.dtypes = [view.dtype for view in self.views]  # accumulation dtype of each parameter
        self.bucket_of = [index for index, _ in layout]  # the bucket of each parameter

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.buckets)

    def zero_(self) -> None:
        for bucket in self.buckets:
            bucket.zero_()

    def add_(
        self,
        grads: Sequence[torch.Tensor | None],
        loss: torch.Tensor | float = 0.0,
        values: dict[int, tuple[float, float]] | None = None,
        scale: float = 1.0,
    ) -> None:
        """Add ``scale`` times one gradient per parameter (None adds nothing, see :meth:`add_scaled_`), a
        loss, and (Σ weight·value, Σ weight) per slot (both already scaled)."""
        self.add_scaled_(grads, scale)
        self.loss.add_(loss)
        for slot, (weighted, weight) in (values or {}).items():
            self.values[slot, 0] += weighted
            self.values[slot, 1] += weight

    def add_scaled_(self, grads: Sequence[torch.Tensor | None], scale: float) -> None:
        """Add ``scale`` times one gradient per parameter (None adds nothing), in the buffers' precision.

        One pass, straight into the buffers: no scaled copy of the gradient is made first.
        """
        used = [i for i, grad in enumerate(grads) if grad is not None]
        for i in used:
            self.add_one_(i, grads[i], scale)  # type: ignore[arg-type]
        self.count_uses(used)

    def add_one_(self, index: int, grad: torch.Tensor, scale: float) -> None:
        """Add ``scale · grad`` to parameter ``index``'s slice (its use is counted by the caller)."""
        view = self.views[index]
        # Scale in the accumulator's precision: bf16(w / W) would bias every gradient.
        view.add_(grad.to(view.dtype), alpha=scale)

    def count_uses(self, indices: Sequence[int]) -> None:
        """Count one more result that gave each parameter in ``indices`` (their positions) a gradient."""
        if len(indices) == len(self.params):
            self.uses.add_(1)  # one operation, not one per parameter
        elif indices:
            self.uses.index_add_(
                0, torch.tensor(indices, device=self.uses.device), torch.ones_like(self.uses[: len(indices)])
            )

    def is_finite(self) -> bool:
        """Whether every element (gradients and loss) is finite."""
        return all(_all_finite(bucket) for bucket in self.buckets)

    def write_to_params(self) -> None:
        """Set every ``p.grad`` to its slice of the buffers, in the parameter's own dtype.

        A parameter that no result used (after the all-reduce: on no rank) keeps its ``p.grad``: an
        optimizer then skips it, as with DDP, instead of applying weight decay or momentum to a zero.
        """
        used = self.uses.tolist()
        for p, view, count in zip(self.params, self.views, used):
            if count == 0:
                continue
            grad = view if view.dtype == p.dtype else view.to(p.dtype)
            if p.grad is None:
                p.grad = grad.clone()
            else:
                p.grad.copy_(grad)


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element of ``tensor`` is finite, in one pass without a mask in the common case.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum proves every element
    finite. Only a sum that is not (a non-finite element, or finite ones overflowing) pays for the
    exact elementwise check. ``isfinite(t).all()`` cost 24 ms of a 166 ms step on a 6.3 M-parameter
    model (4 ranks, one CPU thread each); alone in one process, 10 ms against the sum's 0.4 ms.
    """
    if bool(torch.isfinite(tensor.sum())):
        return True
    return bool(torch.isfinite(tensor).all())
