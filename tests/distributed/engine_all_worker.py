"""One 4-rank launch for two test modules: engine_worker.py's ``exact`` scenario, then engine2_worker.py's.

One launch instead of two saves a launch's start-up and exit (torchrun and four interpreters
importing torch: ≈ 8 s on two cores). ``exact`` goes first, in a fresh process as when it ran alone
(its stall checks are the most sensitive to timing); the engine's second generation follows in the
same process group, its checks of threads, groups and Store keys being counts before and after.

Usage: ``torchrun --nproc-per-node 4 engine_all_worker.py OUT_DIR``; writes ``OUT_DIR/exact/rank{r}.json``
(tests/test_engine.py) and ``OUT_DIR/lifecycle/rank{r}.json`` (tests/test_engine_lifecycle.py).
"""

from __future__ import annotations

import datetime
import json
import sys
import traceback
from pathlib import Path

import torch.distributed as dist

from tests.distributed import engine2_worker, engine_worker


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        exact = engine_worker.scenario_exact(rank, world)
    except Exception:
        exact = {"crash": traceback.format_exc()}
    for name in ("exact", "lifecycle"):
        (out_dir / name).mkdir(exist_ok=True)
    (out_dir / "exact" / f"rank{rank}.json").write_text(json.dumps(exact))
    if "crash" in exact:  # the group may be unusable: do not start the second part
        lifecycle = {"crash_exact": "not run: the exact scenario crashed before it on this rank"}
    else:
        dist.barrier()
        lifecycle = engine2_worker.run_scenarios(rank, world)
    engine_worker.write_results_and_exit(out_dir / "lifecycle", rank, lifecycle)


if __name__ == "__main__":
    main()
