"""A finished training run that simply ends: no close(), no destroy_process_group().

Used by tests/test_clean_exit.py: with the no-wait release (the default) the script must exit 0
every time. It used to abort in about one launch in five ("terminate called without an active
exception", exit -6) when the interpreter tore down the release's process group while its thread
was still alive.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from codedgrad import CodedDataParallel
from codedgrad.emulate import Heterogeneity
from tests.distributed.engine_worker import make_data, make_model, task_loss_fn


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    world = dist.get_world_size()
    het = Heterogeneity(speeds=[1.0, 1.0, 2.0, 4.0][:world], base=0.002, jitter=0.5, stall_prob=0.02, seed=3)
    cdp = CodedDataParallel(make_model(torch.float32), redundancy=1.25, emulate=het, timeout=30)
    opt = torch.optim.SGD(cdp.parameters(), lr=0.05)
    for step in range(20):
        x, y = make_data(16, torch.float32, step)
        opt.zero_grad()
        cdp.backward(task_loss_fn(cdp.module, x, y), 16)
        opt.step()
    print(f"rank {dist.get_rank()} finished", flush=True)


if __name__ == "__main__":
    main()
