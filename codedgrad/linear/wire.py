"""What the stream runner keeps in the c10d Store: key names and the bytes of their values.

Per job j of a session (all keys under the session's :class:`torch.distributed.PrefixStore`):

``in/j``
    Set by the master when job j arrives: a :class:`JobHeader` and the job's input tensor.
``n/j``
    A counter: a worker adds 1 after each coded task it finishes; the value it gets back is the
    result's *ordinal*. Ordinals 1…needed are the results the job uses; a higher one is late.
``r/j/<ordinal>``
    Result number ``ordinal`` (≤ needed): the coded task's index and its output tensor.
``done/j``
    Set (compare-and-set, so exactly once) by the worker whose result is the needed-th:
    ``ok`` and the time it got that ordinal. The master sets it to ``stop`` or ``abort:…`` to end a
    session. Workers watch it to purge the rest of job j.

A calibration round j has no needed count: every worker runs tasks for a time budget, each one
counted in ``n/j`` and posted to ``c/j/<worker>`` (the same two round trips as a real result), then
adds 1 to ``f/j``; the worker that makes ``f/j`` reach P sets ``done/j``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "ABORT",
    "CALIBRATE",
    "JOB",
    "OK",
    "STOP",
    "JobHeader",
    "calibration_key",
    "done_key",
    "finished_key",
    "input_key",
    "job_keys",
    "ordinal_key",
    "pack_done",
    "pack_input",
    "pack_result",
    "result_key",
    "unpack_done",
    "unpack_input",
    "unpack_result",
]

JOB, CALIBRATE, STOP = 0, 1, 2
"""Kinds of ``in/j``: a coded job, a calibration round (every worker runs its tasks, none purged),
the end of the session."""

OK, ABORT = b"ok", b"abort:"

_HEADER = struct.Struct("<BHI")  # kind, operator, calibration budget in µs (0 for other jobs)
_RESULT = struct.Struct("<I")  # coded task index
_DONE_TIME = struct.Struct("<d")
_DTYPES = {torch.float64: b"f8", torch.float32: b"f4"}
_FROM_CODE = {code: dtype for dtype, code in _DTYPES.items()}


def input_key(job: int) -> str:
    """``in/j``: the job's header and input."""
    return f"in/{job}"


def ordinal_key(job: int) -> str:
    """``n/j``: the job's result counter."""
    return f"n/{job}"


def result_key(job: int, ordinal: int) -> str:
    """``r/j/ordinal``: one used result of the job."""
    return f"r/{job}/{ordinal}"


def done_key(job: int) -> str:
    """``done/j``: the job is decided (or the session ends)."""
    return f"done/{job}"


def calibration_key(job: int, worker: int) -> str:
    """``c/j/worker``: where a calibration task posts its result (overwritten by the next)."""
    return f"c/{job}/{worker}"


def finished_key(job: int) -> str:
    """``f/j``: how many workers have spent a calibration round's budget."""
    return f"f/{job}"


def job_keys(job: int, needed: int, workers: int) -> list[str]:
    """Every key job j can leave behind (coded job or calibration round)."""
    results = [result_key(job, n) for n in range(1, needed + 1)]
    calibration = [finished_key(job), *(calibration_key(job, w) for w in range(workers))]
    return [input_key(job), ordinal_key(job), done_key(job), *results, *calibration]


def _pack_tensor(tensor: torch.Tensor) -> bytes:
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"tensor: dtype must be float64 or float32, got {tensor.dtype}")
    array = tensor.detach().cpu().contiguous().numpy()
    shape = struct.pack(f"<B{array.ndim}q", array.ndim, *array.shape)
    return _DTYPES[tensor.dtype] + shape + array.tobytes()


def _unpack_tensor(data: bytes, offset: int) -> torch.Tensor:
    dtype = _FROM_CODE[bytes(data[offset : offset + 2])]
    ndim = data[offset + 2]
    shape = struct.unpack_from(f"<{ndim}q", data, offset + 3)
    start = offset + 3 + 8 * ndim
    array = np.frombuffer(data, dtype=np.float64 if dtype == torch.float64 else np.float32, offset=start)
    return torch.from_numpy(array.reshape(shape).copy())


@dataclass(frozen=True)
class JobHeader:
    """What ``in/j`` announces besides the input.

    Attributes:
        kind: :data:`JOB`, :data:`CALIBRATE` or :data:`STOP`.
        operator: index of the coded matrix the job multiplies.
        budget_us: for a calibration round, how long every worker keeps running tasks (microseconds).
    """

    kind: int
    operator: int = 0
    budget_us: int = 0


def pack_input(header: JobHeader, x: torch.Tensor | None) -> bytes:
    """``in/j``'s value: the header, then the input (none for :data:`STOP`)."""
    head = _HEADER.pack(header.kind, header.operator, header.budget_us)
    return head if x is None else head + _pack_tensor(x)


def unpack_input(data: bytes) -> tuple[JobHeader, torch.Tensor | None]:
    """Inverse of :func:`pack_input`."""
    header = JobHeader(*_HEADER.unpack_from(data, 0))
    return header, (None if len(data) == _HEADER.size else _unpack_tensor(data, _HEADER.size))


def pack_result(index: int, y: torch.Tensor) -> bytes:
    """``r/j/n``'s value: the coded task's index and its output."""
    return _RESULT.pack(index) + _pack_tensor(y)


def unpack_result(data: bytes) -> tuple[int, torch.Tensor]:
    """Inverse of :func:`pack_result`."""
    return _RESULT.unpack_from(data, 0)[0], _unpack_tensor(data, _RESULT.size)


def pack_done(when: float) -> bytes:
    """``done/j``'s value when the job is decided: ``ok`` and the (monotonic) time of its last result."""
    return OK + _DONE_TIME.pack(when)


def unpack_done(data: bytes) -> float | None:
    """The decision time of an ``ok`` value; None for ``stop`` and ``abort:…``."""
    if data.startswith(OK) and len(data) == len(OK) + _DONE_TIME.size:
        return _DONE_TIME.unpack_from(data, len(OK))[0]
    return None
