"""Checkpoints that a crash can never leave half-written: the default ``checkpoint_io`` of both strategies.

Lightning's ``TorchCheckpointIO`` (2.6, through ``lightning_fabric.utilities.cloud_io._atomic_save`` and
an fsspec transaction) writes a local checkpoint to a temporary file in the *system* temporary
directory and then moves it into place. When that directory is on another filesystem than the
checkpoints (a node-local ``/tmp`` and a shared checkpoint volume, the usual cluster layout), the
move is a copy into the target file: a ``kill -9`` during the copy leaves a truncated ``last.ckpt``,
``ckpt_path="last"`` picks it (it is the newest), and every restart fails to load it. Nothing is
fsynced either, so a machine crash can leave an empty file behind a completed rename.

:class:`AtomicCheckpointIO` writes the temporary file next to the target (same directory, so the
same filesystem), fsyncs it, replaces the target with one ``os.replace`` (atomic on POSIX), and
fsyncs the directory. A reader sees the old checkpoint or the new one, never a part of one. A
temporary file left by a killed writer has a name Lightning's checkpoint discovery ignores (it does
not end in ``.ckpt``) and is removed by the next save of the same target.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import get_filesystem
from typing_extensions import override

__all__ = ["AtomicCheckpointIO"]

_TEMP_MARK = ".tmp-"  # ".{name}.tmp-{pid}": hidden, and not a ".ckpt" file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (remote paths: Lightning's save).

    Loading and removing are Lightning's. ``Trainer(plugins=[...])`` or the strategy's
    ``checkpoint_io=`` argument still replaces it.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not {"file", "local"} & set(_protocols(path)):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)  # object stores: theirs
            return
        if storage_options is not None:
            raise TypeError(
                f"checkpoint_io: {type(self).__name__} takes no storage_options (got {storage_options!r}); "
                "pass a CheckpointIO of your own to use them"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialise first: an error here leaves no file at all
        temp = target.with_name(f".{target.name}{_TEMP_MARK}{os.getpid()}")
        try:
            _write_durably(temp, buffer.getbuffer())
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(target.parent)  # the rename itself survives a machine crash
        _remove_stale_temps(target, keep=temp)


def _protocols(path: Any) -> tuple[str, ...]:
    protocol = get_filesystem(path).protocol
    return protocol if isinstance(protocol, tuple) else (protocol,)


def _write_durably(path: Path, data: memoryview) -> None:
    """Write ``data`` to a new file at ``path`` and fsync it (the tests kill a writer in here)."""
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform without directory descriptors: the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_stale_temps(target: Path, keep: Path) -> None:
    """Temporary files of ``target`` left by writers that were killed (only one process saves a path)."""
    for stale in target.parent.glob(f".{target.name}{_TEMP_MARK}*"):
        if stale != keep:
            stale.unlink(missing_ok=True)
