"""The coded engine's own cost per step: a tiny model, where a step is almost all overhead.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 1 benchmarks/bench_overhead.py
    ... benchmarks/bench_overhead.py --replan-every 50        # the engine's default exchange period

A 32-64-1 MLP, 8 tasks of 8 samples per step, one rank by default (more ranks add the all-reduce,
the same for both). Plain DDP and the engine's direct step (Ω = 1, no spare work: the plan leaves
nothing to decide) run the same global batch in alternating blocks; the printed difference is the
Python the engine adds around the same forward, backward and all-reduce: the plan, the record, the
agreement packed into the first bucket, the finite check, the profile exchange every
``--replan-every`` steps, writing ``p.grad``. On a real model it is paid once per step, on top of
compute that dwarfs it; this benchmark is how a change to that path is measured.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from codedgrad import CodedDataParallel

TASKS, SAMPLES_PER_TASK = 8, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replan-every", type=int, default=5, help="the engine's exchange period (bench: 5)")
    parser.add_argument("--steps", type=int, default=200, help="steps per block")
    parser.add_argument("--blocks", type=int, default=5, help="blocks per strategy (the fastest counts)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(TASKS * SAMPLES_PER_TASK, 32, generator=generator)
    y = torch.randn(TASKS * SAMPLES_PER_TASK, 1, generator=generator)
    ddp = nn.parallel.DistributedDataParallel(make_model())
    engine = CodedDataParallel(
        make_model(), redundancy=1.0, spare_work=False, replan_every=args.replan_every, warmup_steps=2
    )

    def batch_loss(ids: list[int]) -> torch.Tensor:
        rows = torch.cat([torch.arange(i * SAMPLES_PER_TASK, (i + 1) * SAMPLES_PER_TASK) for i in ids])
        return ((engine.module(x[rows]) - y[rows]) ** 2).mean()

    def ddp_step() -> None:
        ddp.zero_grad(set_to_none=True)
        ((ddp(x) - y) ** 2).mean().backward()

    direct = []

    def coded_step() -> None:
        engine.module.zero_grad(set_to_none=True)
        direct.append(engine.backward(tasks=TASKS, batch_loss=batch_loss).direct)

    for step in (ddp_step, coded_step):  # warm-up: the engine's first plans run coded, then direct
        for _ in range(30):
            step()
    direct.clear()
    best: dict[str, float] = {}
    for _ in range(args.blocks):
        for name, step in (("ddp", ddp_step), ("coded", coded_step)):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            per_step = (time.perf_counter() - start) / args.steps
            best[name] = min(best.get(name, np.inf), per_step)
    if dist.get_rank() == 0:
        print(
            f"ddp {best['ddp'] * 1e3:.3f} ms/step, coded {best['coded'] * 1e3:.3f} ms/step: the engine adds "
            f"{(best['coded'] - best['ddp']) * 1e3:.3f} ms a step (replan_every={args.replan_every}; "
            f"{np.mean(direct):.0%} of its steps direct; fastest of {args.blocks} blocks of {args.steps})"
        )
    engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
