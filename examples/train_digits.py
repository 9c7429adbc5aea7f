"""Train a small CNN on scikit-learn's handwritten digits with CodedDataParallel (the README's example).

    torchrun --nproc-per-node 4 examples/train_digits.py                       # coded, real compute
    torchrun --nproc-per-node 4 examples/train_digits.py --engine ddp          # plain DDP, same batches
    CODEDGRAD_EMULATE='{"speeds": [1, 1, 2, 4], "base": 0.02}' \\
        torchrun --nproc-per-node 4 examples/train_digits.py                   # emulated unequal ranks

Every rank iterates the same global batches that DDP would give the world (``GlobalBatchSampler``),
splits each into weighted tasks, loads only the tasks it computes (``TaskData``), and the engine
applies the exact gradient of the global batch's mean loss. ``--engine ddp`` runs torch's own
DistributedDataParallel on the same global batches for comparison (each rank its DDP share).
Rank 0 prints the epoch times, the loss and the validation accuracy; ``--json FILE`` saves them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from codedgrad import CodedDataParallel
from codedgrad.data import GlobalBatchSampler, TaskData


def digits() -> tuple[TensorDataset, TensorDataset]:
    """The 1797 8×8 digits that ship inside scikit-learn, split 1500 / 297 (seeded)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, val = order[:1500], order[1500:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )  # fmt: skip


def accuracy(model: nn.Module, dataset: TensorDataset) -> float:
    x, y = dataset.tensors
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("coded", "ddp"), default="coded")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank, as with DDP")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per global batch (coded)")
    parser.add_argument("--redundancy", type=float, default=1.25)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--json", help="write rank 0's results to this file")
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    train, val = digits()
    model = cnn()
    loss_fn = nn.CrossEntropyLoss()
    sampler = GlobalBatchSampler(len(train), batch_size=args.batch_size, world_size=world, seed=0)
    if args.engine == "coded":
        engine = CodedDataParallel(model, redundancy=args.redundancy)
    else:
        engine = DistributedDataParallel(model)
    opt = torch.optim.SGD(engine.parameters(), lr=args.lr)
    epochs = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        dist.barrier()  # every rank starts the epoch together, so the epoch times compare
        start, losses = time.perf_counter(), []
        for global_batch in sampler:
            opt.zero_grad()
            if args.engine == "coded":
                tasks = min(args.tasks, len(global_batch))
                with TaskData(train, global_batch, tasks) as data:
                    data.prefetch(engine.planned_tasks())  # this rank's primaries and backups
                    report = engine.backward(lambda j, data=data: loss_fn(model(data[j][0]), data[j][1]), data.weights)
                losses.append(report.loss)  # the decoded loss of the whole global batch
            else:
                share = len(global_batch) // world  # DDP: each rank its own equal share
                x, y = train[global_batch[rank * share : (rank + 1) * share]]
                loss = loss_fn(engine(x), y)
                loss.backward()
                global_loss = loss.detach().clone()  # the global batch's loss, as coded reports it
                dist.all_reduce(global_loss)
                losses.append(float(global_loss) / world)
            opt.step()
        dist.barrier()
        epochs.append({"seconds": time.perf_counter() - start, "loss": sum(losses) / len(losses)})
    result = {"engine": args.engine, "world": world, "epochs": epochs, "val_accuracy": accuracy(model, val)}
    if rank == 0:
        for i, e in enumerate(epochs):
            print(f"epoch {i}: {e['seconds']:.2f} s, mean loss {e['loss']:.4f}")
        print(f"{args.engine}: validation accuracy {result['val_accuracy']:.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    if args.engine == "coded":
        engine.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
