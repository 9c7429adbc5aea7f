"""Coded linear jobs on real processes: MDS-coded matrix products served as a stream (issue #12).

* :mod:`codedgrad.linear.mds`: real-valued MDS codes of a matrix's row blocks, encode and decode.
* :mod:`codedgrad.linear.stream`: the stream runner over torch.distributed (master + workers).
* :mod:`codedgrad.linear.measure`: measured profiles and the measured stream against the simulator.
* :mod:`codedgrad.linear.solve`: least squares through coded jobs.

Layering: this package uses :mod:`codedgrad.plan`, :mod:`codedgrad.sim`, :mod:`codedgrad.profile`
and :mod:`codedgrad.emulate`, never the training runtime.
"""

from codedgrad.linear.mds import KINDS, CodedMatrix, ConditionReport, MDSCode, MDSError
from codedgrad.linear.stream import (
    JobLog,
    Master,
    SessionOutcome,
    StreamAborted,
    StreamRecord,
    StreamRunner,
    StreamTimeout,
    assign_slots,
)

__all__ = [
    "KINDS",
    "CodedMatrix",
    "ConditionReport",
    "JobLog",
    "MDSCode",
    "MDSError",
    "Master",
    "SessionOutcome",
    "StreamAborted",
    "StreamRecord",
    "StreamRunner",
    "StreamTimeout",
    "assign_slots",
]
