"""CodedDataParallel on CUDA tensors: exactness with and without the no-wait release.

Skipped (not passed) on machines without a GPU, such as CI; run it where one is lent:
``OMP_NUM_THREADS=1 .venv/bin/pytest -q tests/test_cuda.py`` (with a CUDA build of torch).
"""

from __future__ import annotations

import pytest
import torch
from conftest import DISTRIBUTED_DIR, load_rank_results, run_torchrun

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_gradients_equal_single_process(tmp_path):
    run_torchrun(DISTRIBUTED_DIR / "cuda_worker.py", 2, [tmp_path], timeout=300)
    for rank, result in enumerate(load_rank_results(tmp_path, 2)):
        assert "crash" not in result, f"rank {rank} crashed:\n{result['crash']}"
        for name, run in result.items():
            tolerance = 1e-10 if name.endswith("float64") else 1e-5
            assert run["max_error"] <= tolerance, (rank, name, run)
            assert run["identical"] and run["on_device"], (rank, name, run)
