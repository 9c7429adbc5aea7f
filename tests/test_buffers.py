"""FlatGradients and the direct step's BucketLauncher on their own (no process group)."""

from __future__ import annotations

import pytest
import torch

from codedgrad.runtime.buffers import FlatGradients
from codedgrad.runtime.direct import BucketLauncher


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_is_finite_finds_any_nan_or_infinity_and_is_not_fooled_by_an_overflowing_sum(dtype: torch.dtype) -> None:
    params = [torch.nn.Parameter(torch.zeros(3, 4, dtype=dtype)), torch.nn.Parameter(torch.zeros(5, dtype=dtype))]
    flat = FlatGradients(params, bucket_bytes=16)  # one bucket per parameter
    assert len(flat.buckets) == 2 and flat.is_finite()
    huge = torch.finfo(flat.buckets[1].dtype).max / 2  # finite elements whose sum overflows
    flat.views[1].fill_(huge)
    assert flat.is_finite()
    for bad in (float("nan"), float("inf"), -float("inf")):
        flat.views[1][2] = bad
        assert not flat.is_finite(), bad
        flat.views[1][2] = huge
    flat.loss.fill_(float("nan"))  # the loss rides in the first bucket
    assert not flat.is_finite()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_scaled_gradients_and_use_counts_go_straight_into_the_buffers(dtype: torch.dtype) -> None:
    """``add_scaled_`` adds scale times each gradient in the buffers' precision (float32 for bf16) and
    counts one use per parameter that had a gradient; ``add_`` (already scaled) counts alike."""
    params = [torch.nn.Parameter(torch.zeros(2, 3, dtype=dtype)) for _ in range(3)]
    flat = FlatGradients(params, bucket_bytes=16)
    grads = [torch.full((2, 3), 3.0, dtype=dtype), None, torch.full((2, 3), -1.0, dtype=dtype)]
    flat.add_scaled_(grads, 0.5)
    flat.add_scaled_([torch.ones(2, 3, dtype=dtype)] * 3, 0.25)  # every parameter: one operation
    flat.add_([None, torch.ones(2, 3, dtype=dtype), None])
    assert flat.views[0].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    assert [float(v[0, 0]) for v in flat.views] == [1.75, 1.25, -0.25]
    assert flat.uses.tolist() == [2.0, 2.0, 2.0]
    flat.count_uses([])  # nothing to count: no change
    assert flat.uses.tolist() == [2.0, 2.0, 2.0]


def test_a_direct_step_that_cannot_hook_every_parameter_leaves_no_hook_behind() -> None:
    """Arming the backward's hooks fails on a parameter frozen after the engine was built: the hooks
    already registered are removed, so no later backward adds into buffers the next step reuses."""
    params = [torch.nn.Parameter(torch.ones(3)) for _ in range(3)]
    flat = FlatGradients(params, bucket_bytes=8)  # one bucket per parameter
    launcher = BucketLauncher(flat, group=None)
    assert launcher.overlaps
    params[2].requires_grad_(False)
    with pytest.raises(RuntimeError):
        launcher.arm(0.5)
    assert all(not p._backward_hooks for p in params)
    torch.autograd.grad((params[0] * params[1]).sum(), params[:2])
    assert all(float(v.abs().sum()) == 0.0 for v in flat.views)
