"""Worker for tests/test_cuda.py: CodedDataParallel on CUDA tensors (skipped where there is no GPU).

Three ranks share the first GPU over gloo (NCCL needs one device per rank; gloo reduces CUDA tensors
through the host), which is enough to exercise the CUDA path of the engine: parameters, buffers
and accumulators on the device, the stream synchronisation before a commit, and the no-wait
release's own stream ordered by events. Each step is compared with one process computing the
same global batch on the same device.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from codedgrad import CodedDataParallel
from codedgrad.emulate import Heterogeneity
from codedgrad.runtime import CodedHookState, coded_allreduce_hook
from tests.distributed.engine_worker import (
    TINY_BUCKETS_MB,
    grads,
    identical_across_ranks,
    make_data,
    make_model,
    reference_grads,
    relative_error,
    task_loss_fn,
    write_results_and_exit,
)


def run(no_wait: bool, dtype: torch.dtype, device: torch.device, code: str = "repetition", redundancy=1.25) -> dict:
    noisy = Heterogeneity(speeds=[1.0, 3.0, 2.0], base=0.004, jitter=0.5, stall_prob=0.1, seed=3)
    model = make_model(dtype).to(device)
    cdp = CodedDataParallel(model, code=code, redundancy=redundancy, emulate=noisy, no_wait=no_wait, timeout=60)
    reference = make_model(dtype).to(device)
    reference.load_state_dict(cdp.module.state_dict())
    errors, used, coefficients = [], 0, []
    for step in range(6):
        x, y = (t.to(device) for t in make_data(12, dtype, step))
        cdp.module.zero_grad(set_to_none=True)
        report = cdp.backward(task_loss_fn(cdp.module, x, y), 12)
        used += report.used
        coefficients.append(report.rank_coefficient)
        want = reference_grads(reference, 12, x, y)
        errors.append(relative_error(grads(cdp.module), want))
    return {
        "max_error": max(errors),
        "identical": identical_across_ranks(grads(cdp.module)),
        "on_device": all(
            p.grad.device == p.device and p.device.type == device.type
            for p in cdp.module.parameters()
            if p.grad is not None
        ),
        # The release really ran on its own stream (CUDA) or thread (CPU dry run), as asked.
        "release_as_asked": (cdp._release_group is not None) == no_wait
        and (cdp._release_stream is not None) == (no_wait and device.type == "cuda"),
        "used": used,
        "coefficients": coefficients,
    }


def run_direct_overlapped(device: torch.device) -> dict:
    """Direct steps (Ω = 1, no spare work, measured) with buckets reduced from the backward's hooks,
    which on CUDA run on autograd's device thread: exact, and buckets launched during the backward."""
    model = make_model(torch.float64, with_unused=False).to(device)
    cdp = CodedDataParallel(
        model,
        redundancy=1.0,
        spare_work=False,
        bucket_cap_mb=TINY_BUCKETS_MB,
        replan_every=2,
        warmup_steps=2,
        max_steps_ahead=1,
        timeout=60,
    )
    reference = make_model(torch.float64, with_unused=False).to(device)
    reference.load_state_dict(cdp.module.state_dict())
    errors, direct, overlapped = [], 0, 0
    for step in range(14):
        x, y = (t.to(device) for t in make_data(12, torch.float64, step))
        cdp.module.zero_grad(set_to_none=True)
        task_loss = task_loss_fn(cdp.module, x, y)
        report = cdp.backward(
            tasks=12, batch_loss=lambda ids, task_loss=task_loss: sum(task_loss(j) for j in ids) / len(ids)
        )
        direct += report.direct
        overlapped = max(overlapped, report.buckets_overlapped)
        errors.append(relative_error(grads(cdp.module), reference_grads(reference, 12, x, y)))
    cdp.close()
    return {
        "max_error": max(errors),
        "identical": identical_across_ranks(grads(cdp.module)),
        "on_device": all(p.grad.device == p.device and p.device.type == device.type for p in cdp.module.parameters()),
        "release_as_asked": True,
        "used": direct,  # direct steps run
        "coefficients": [],
        "buckets_overlapped": overlapped,
    }


def run_ddp_hook(device: torch.device) -> dict:
    """Plain DDP with the coded all-reduce hook on the device: batches of 3, 7 and 2 samples, exact."""
    rank, counts = dist.get_rank(), [3, 7, 2]
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))

    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double().to(device)

    model, reference = make(), make()
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(CodedHookState(sample_counts=counts), coded_allreduce_hook)
    errors = []
    for step in range(3):  # DDP rebuilds its buckets after the first iteration
        generator = torch.Generator().manual_seed(step)
        x, y = (torch.randn(12, n, generator=generator, dtype=torch.float64).to(device) for n in (5, 1))
        ddp.zero_grad(set_to_none=True)
        ((ddp(x[mine]) - y[mine]) ** 2).mean().backward()
        reference.load_state_dict(model.state_dict())
        reference.zero_grad(set_to_none=True)
        ((reference(x) - y) ** 2).mean().backward()  # one process, the whole batch
        want = grads(reference)
        errors.append(relative_error(grads(model), want))
    return {
        "max_error": max(errors),
        "identical": identical_across_ranks(grads(model)),
        "on_device": all(
            p.grad.device == p.device and p.device.type == device.type for p in model.parameters() if p.grad is not None
        ),
        "release_as_asked": True,  # no release in plain DDP
        "used": 1,
        "coefficients": [],
    }


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    device = torch.device(os.environ.get("CODEDGRAD_TEST_DEVICE", "cuda:0"))  # "cpu" to dry-run the script
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        results = {
            f"{'no_wait' if no_wait else 'sync'}_{str(dtype)[6:]}": run(no_wait, dtype, device)
            for no_wait in (True, False)
            for dtype in (torch.float64, torch.float32, torch.bfloat16)
        }
        # A code whose decoding coefficients are not 0/1 (least squares on the host, applied on the device).
        results["cyclic_float64"] = run(True, torch.float64, device, code="cyclic", redundancy=2)
        results["ddp_hook_float64"] = run_ddp_hook(device)
        results["direct_overlapped_float64"] = run_direct_overlapped(device)
    except Exception:
        results = {"crash": traceback.format_exc()}
    write_results_and_exit(out_dir, rank, results)


if __name__ == "__main__":
    main()
