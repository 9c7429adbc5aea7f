"""FlatGradients on its own (no process group): the non-finite check the engine applies to every step."""

from __future__ import annotations

import pytest
import torch

from codedgrad.runtime.buffers import FlatGradients


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
