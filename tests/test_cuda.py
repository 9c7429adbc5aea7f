"""CodedDataParallel on CUDA tensors: exactness with and without the no-wait release.

Skipped (not passed) on machines without a GPU, such as CI; run it where one is lent:
``OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_cuda.py`` (with a CUDA build of torch).
``CODEDGRAD_TEST_DEVICE=cpu`` runs the same checks on CPU tensors, to try the test without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DISTRIBUTED_DIR, load_rank_results, run_torchrun

pytestmark = [
    pytest.mark.distributed,
    # CODEDGRAD_TEST_DEVICE=cpu dry-runs the same checks without a GPU (the worker reads it).
    pytest.mark.skipif(
        not torch.cuda.is_available() and "CODEDGRAD_TEST_DEVICE" not in os.environ, reason="needs a CUDA device"
    ),
]


TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "bfloat16": 1e-2}  # relative, as on the CPU


def test_cuda_gradients_equal_single_process(tmp_path):
    run_torchrun(DISTRIBUTED_DIR / "cuda_worker.py", 3, [tmp_path], timeout=300)
    results = load_rank_results(tmp_path, 3)
    for rank, result in enumerate(results):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
        runs = {f"{mode}_{dtype}" for mode in ("no_wait", "sync") for dtype in TOLERANCE}
        assert set(result) == runs | {"cyclic_float64", "ddp_hook_float64", "direct_overlapped_float64"}
        for name, run in result.items():
            assert run["max_error"] <= TOLERANCE[name.rsplit("_", 1)[1]], (rank, name, run)
            assert run["identical"] and run["on_device"] and run["release_as_asked"], (rank, name, run)
            if not name.startswith("cyclic"):  # cyclic with s = 1 decodes from any two of the three ranks
                assert run["used"] > 0, (rank, name, run)  # every rank contributed (speeds 1, 3, 2)
        # Direct steps whose buckets went to the all-reduce during the backward (three of four buckets).
        overlapped = result["direct_overlapped_float64"]
        assert overlapped["buckets_overlapped"] == 3 and overlapped["used"] > 0, (rank, overlapped)
    # The cyclic code's decoding coefficients are not all 0/1: least squares on the host, applied on the device.
    coefficients = {c for result in results for c in result["cyclic_float64"]["coefficients"]}
    assert coefficients - {0.0, 1.0}, coefficients
