"""Latency of the coded step's commit on torchrun's TCPStore, under contending ranks.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 4 benchmarks/bench_commit.py

Only the coordination is measured: each rank walks its queue of a repetition code (speeds 1, 1, 2, 4,
K = 64, Ω = 1.2) and commits every result through :class:`~codedgrad.runtime.StoreCoordinator`,
with a pause of ``gap / speed`` in place of the task's compute, then waits for the decision, as in
:class:`~codedgrad.CodedDataParallel`. For each gap it reports, over all ranks, the commit's median
and p99 latency, the Store round trips per commit, and for reference one bare ``get`` round trip
issued at the same cadence: a commit costs one round trip, plus one per race with another rank's
commit since this rank last looked (docs/design.md#facts-about-the-stack).

The gap matters on small machines: a Store server and ranks that sleep between requests must be
woken, which a shared 2-core VM does slowly; back-to-back requests measure the Store itself.
Two simplifications: a rank learns of the decision only from its next commit's answer (one round
trip, where the engine's release thread would stop it without one), and the reference ``get``s
run after the step's commits, at the same gap but with less contention.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import numpy as np
import torch.distributed as dist

from codedgrad.codes import make_code
from codedgrad.profile import WorkerProfile
from codedgrad.runtime.coordinator import StoreCoordinator


def _pause(seconds: float) -> None:
    """Sleep, but spin the last half millisecond: a task ends on time, not when the OS wakes us."""
    end = time.perf_counter() + seconds
    if seconds > 1e-3:
        time.sleep(seconds - 5e-4)
    while time.perf_counter() < end:
        pass


def measure(store: dist.Store, rank: int, world: int, gap: float, steps: int, first_step: int) -> dict:
    speeds = [1.0, 1.0, 2.0, 4.0][:world] if world <= 4 else [1.0 + r % 4 for r in range(world)]
    profiles = [WorkerProfile(0.0, 1.0 / s, 0.0) for s in speeds]
    code = make_code("repetition", world, 64, 1.2, profiles)
    coordinator = StoreCoordinator(store, rank, world, timeout=60)
    latencies, round_trips, bare = [], 0, []
    for step in range(first_step, first_step + steps):
        dist.barrier()
        coordinator.begin(step, code)
        for work in code.queue(rank):
            state = coordinator.state
            if state.decided:
                break
            if not state.is_needed(rank, work.result):
                continue
            _pause(gap / speeds[rank])
            before = coordinator.commit_round_trips
            start = time.perf_counter()
            coordinator.commit(work.result)
            latencies.append(time.perf_counter() - start)
            round_trips += coordinator.commit_round_trips - before
        coordinator.wait_decided()
        # The same cadence with a bare round trip, for reference.
        for _ in range(8):
            _pause(gap / speeds[rank])
            start = time.perf_counter()
            store.get(f"s{step}/state")
            bare.append(time.perf_counter() - start)
        dist.barrier()  # everyone is past every wait of the step
        coordinator.finish()
    return {"latencies": latencies, "round_trips": round_trips, "bare": bare}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps-ms", default="0,1,5,20", help="compute time of a speed-1 task between commits")
    parser.add_argument("--steps", type=int, default=30, help="steps per gap")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.PrefixStore("bench_commit", dist.distributed_c10d._get_default_store())
    rows = []
    for index, gap_ms in enumerate(float(g) for g in args.gaps_ms.split(",")):
        mine = measure(store, rank, world, gap_ms / 1e3, args.steps, first_step=index * args.steps)
        everyone: list = [None] * world
        dist.all_gather_object(everyone, mine)
        latencies = np.array([x for r in everyone for x in r["latencies"]]) * 1e3
        bare = np.array([x for r in everyone for x in r["bare"]]) * 1e3
        rows.append(
            {
                "gap_ms": gap_ms,
                "commits": int(latencies.size),
                "commit_median_ms": float(np.median(latencies)),
                "commit_p99_ms": float(np.quantile(latencies, 0.99)),
                "round_trips_per_commit": sum(r["round_trips"] for r in everyone) / latencies.size,
                "get_median_ms": float(np.median(bare)),
                "get_p99_ms": float(np.quantile(bare, 0.99)),
            }
        )
    if rank == 0:
        if args.json:
            print(json.dumps({"world_size": world, "rows": rows}, indent=2))
        else:
            print(f"{world} contending ranks, repetition code, K = 64, Ω = 1.2 (times in ms)")
            print(f"{'gap':>6}{'commits':>9}{'median':>9}{'p99':>9}{'trips':>7}{'get med':>9}{'get p99':>9}")
            for row in rows:
                print(
                    f"{row['gap_ms']:>6g}{row['commits']:>9}{row['commit_median_ms']:>9.3f}{row['commit_p99_ms']:>9.3f}"
                    f"{row['round_trips_per_commit']:>7.2f}{row['get_median_ms']:>9.3f}{row['get_p99_ms']:>9.3f}"
                )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
