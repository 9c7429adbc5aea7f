"""Plain DDP against the coded direct step on a larger model, a quiet homogeneous cluster, no emulation.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/bench_direct.py
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_direct.py --device cuda   # a GPU node

The recipes' models fit one gradient bucket; this MLP (6 layers of 1024: 6.3 M parameters, 25 MB in
float32) fills one 100 MB bucket or seven of 4 MB, where DDP overlaps its all-reduce with the
backward and the direct step (which reduces after its compute) does not. Both run the same global
batch (32 tasks of 8 samples), alternating in blocks of 5 steps after 15 warm-up steps each (the
engine's first plans run coded; its measured plan, with redundancy and spare work off, runs
direct). Prints the median step times, their ratio, and the coded step's own breakdown (compute,
all-reduce) from its ``StepReport``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from codedgrad import CodedDataParallel

TASKS, SAMPLES_PER_TASK = 32, 8


def make_mlp(width: int, depth: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank and for both strategies
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10)).to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--bucket-cap-mb", type=float, nargs="+", default=[100.0, 4.0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(TASKS * SAMPLES_PER_TASK, args.width, generator=generator).to(device)
    y = torch.randint(0, 10, (TASKS * SAMPLES_PER_TASK,), generator=generator).to(device)
    if (TASKS * SAMPLES_PER_TASK) % world:
        raise SystemExit(f"bench_direct: {world} ranks do not divide the global batch of {TASKS * SAMPLES_PER_TASK}")
    share = TASKS * SAMPLES_PER_TASK // world

    for cap in args.bucket_cap_mb:
        ddp = nn.parallel.DistributedDataParallel(make_mlp(args.width, args.depth, device), bucket_cap_mb=cap)
        # Redundancy and spare work off, as "auto" resolves them where ranks share a device: the plan
        # has nothing to decide, so its steps run direct also with a device per rank.
        coded = CodedDataParallel(
            make_mlp(args.width, args.depth, device),
            replan_every=5,
            bucket_cap_mb=cap,
            redundancy=1.0,
            spare_work=False,
        )

        def ddp_step(ddp: nn.Module = ddp) -> None:
            ddp.zero_grad(set_to_none=True)
            rows = slice(rank * share, (rank + 1) * share)
            nn.functional.cross_entropy(ddp(x[rows]), y[rows]).backward()

        def coded_step(coded: CodedDataParallel = coded):
            coded.module.zero_grad(set_to_none=True)

            def batch_loss(tasks: list[int]) -> torch.Tensor:
                rows = torch.cat([torch.arange(t * SAMPLES_PER_TASK, (t + 1) * SAMPLES_PER_TASK) for t in tasks])
                return nn.functional.cross_entropy(coded.module(x[rows]), y[rows])

            return coded.backward(tasks=TASKS, batch_loss=batch_loss)

        for _ in range(15):
            ddp_step()
            coded_step()
        seconds: dict[str, list[float]] = {"ddp": [], "coded": []}
        reports = []
        for _ in range(args.rounds):
            for name, step in (("ddp", ddp_step), ("coded", coded_step)):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(5):
                    report = step()
                    if report is not None:
                        reports.append(report)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name].append((time.perf_counter() - start) / 5)
        coded.close()
        if rank == 0:
            ddp_ms, coded_ms = (1e3 * float(np.median(seconds[n])) for n in ("ddp", "coded"))
            direct = [r for r in reports if r.direct]

            def median_ms(field: str, direct: list = direct) -> float:
                return 1e3 * float(np.median([getattr(r, field) for r in direct])) if direct else float("nan")

            params = sum(p.numel() for p in ddp.parameters()) / 1e6
            print(
                f"[bench_direct] {world} ranks, {device.type}, {params:.1f} M parameters, buckets of {cap:g} MB: "
                f"ddp {ddp_ms:.1f} ms, coded {coded_ms:.1f} ms, coded / ddp speed {ddp_ms / coded_ms:.2f}; "
                f"coded direct steps {len(direct)}/{len(reports)}: compute {median_ms('time_to_decision'):.1f} ms, "
                f"all-reduce {median_ms('allreduce_time'):.1f} ms",
                flush=True,
            )
        del ddp
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
