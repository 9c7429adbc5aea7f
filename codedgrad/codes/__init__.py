"""Gradient codes: who computes which tasks, and how committed results decode (docs/design.md, "The codes").

numpy and scipy only: nothing here knows torch or torch.distributed. :func:`make_code` builds a code
by name; :mod:`codedgrad.codes.spare` is the spare-work policy, :mod:`codedgrad.codes.accounting`
checks the ranks' accumulators against the decoder, and :mod:`codedgrad.codes.simulate` runs codes
under the worker model. See ``codes/README.md`` for the design notes (backup order, conditioning of
the cyclic code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

from codedgrad.codes.base import (
    CodeError,
    DecoderState,
    Decoding,
    GradientCode,
    NotDecodable,
    RankLevelCode,
    ResponderState,
    Work,
)
from codedgrad.codes.cyclic import CyclicMDSCode
from codedgrad.codes.fractional import FractionalRepetitionCode
from codedgrad.codes.repetition import RepetitionCode, check_profiles
from codedgrad.profile import WorkerProfile

__all__ = [
    "CODE_NAMES",
    "CodeError",
    "CyclicMDSCode",
    "DecoderState",
    "Decoding",
    "FractionalRepetitionCode",
    "GradientCode",
    "NotDecodable",
    "RankLevelCode",
    "RepetitionCode",
    "ResponderState",
    "Work",
    "make_code",
]

#: The names :func:`make_code` accepts.
CODE_NAMES = ("repetition", "uncoded", "frc", "cyclic")


def make_code(
    name: str,
    num_ranks: int,
    num_tasks: int,
    redundancy: float = 1.0,
    profiles: Sequence[WorkerProfile] | None = None,
    gamma: float = 1.0,
) -> GradientCode:
    """Build a gradient code by name; every rank calling this with the same inputs gets the same code.

    Args:
        name: "repetition" (task-level repetition with backups, any Ω ≥ 1), "uncoded" (the same with
            Ω = 1: balanced primaries, no backups), "frc" (fractional repetition) or "cyclic" (cyclic
            MDS); for the last two Ω = s + 1 must be an integer and any s stragglers are tolerated.
        num_ranks: P ≥ 1.
        num_tasks: K ≥ P, the number of equal tasks of a step.
        redundancy: Ω ≥ 1.
        profiles: one :class:`WorkerProfile` per rank; None means identical workers.
        gamma: weight of the second moment in the load split.

    Raises:
        CodeError: naming the bad argument (unknown name, K < P, Ω < 1, Ω not an integer for
            frc/cyclic, s ≥ P, wrong number of profiles, …).
    """
    if name not in CODE_NAMES:
        raise CodeError(f"name: unknown code {name!r}; choose one of {', '.join(CODE_NAMES)}")
    for arg, value in (("num_ranks", num_ranks), ("num_tasks", num_tasks)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise CodeError(f"{arg}: must be an integer >= 1, got {value!r}")
    if num_tasks < num_ranks:
        raise CodeError(f"num_tasks: need at least one task per rank ({num_ranks}), got {num_tasks}")
    if isinstance(redundancy, bool) or not isinstance(redundancy, Real) or not math.isfinite(redundancy):
        raise CodeError(f"redundancy: must be a finite number, got {redundancy!r}")
    if redundancy < 1:
        raise CodeError(f"redundancy: must be >= 1, got {redundancy}")
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not (math.isfinite(gamma) and gamma >= 0):
        raise CodeError(f"gamma: must be a finite number >= 0, got {gamma!r}")
    num_ranks, num_tasks, redundancy = int(num_ranks), int(num_tasks), float(redundancy)
    profiles = check_profiles(profiles, num_ranks)
    if name == "uncoded":
        if redundancy != 1:
            raise CodeError(f"redundancy: 'uncoded' has none (Ω = 1); got {redundancy}, use 'repetition'")
        code = RepetitionCode(num_ranks, num_tasks, 1.0, profiles, gamma)
        code.name = "uncoded"
        return code
    if name == "repetition":
        return RepetitionCode(num_ranks, num_tasks, redundancy, profiles, gamma)
    if name == "frc":
        return FractionalRepetitionCode(num_ranks, num_tasks, redundancy, profiles, gamma)
    return CyclicMDSCode(num_ranks, num_tasks, redundancy, profiles, gamma)
