"""MDS codes of a matrix's row blocks (codedgrad.linear.mds): exact decoding, conditioning, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from codedgrad.linear import CodedMatrix, MDSCode, MDSError
from codedgrad.plan import PlanError

EXACT = 1e-8  # float64 decoding must be this close, relative to the product's norm


def _matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _sets(code: MDSCode, count: int, seed: int) -> list[list[int]]:
    """Every decoding set when there are few, else ``count`` random ones plus the worst-conditioned."""
    if math.comb(code.coded, code.tasks) <= count:
        return [list(s) for s in itertools.combinations(range(code.coded), code.tasks)]
    rng = np.random.default_rng(seed)
    sets = [sorted(rng.choice(code.coded, code.tasks, replace=False).tolist()) for _ in range(count)]
    return [list(code.condition_report(max_sets=2000, seed=seed).worst_set), *sets]


def _decode_error(coded: CodedMatrix, matrix: torch.Tensor, x: torch.Tensor, indices: list[int]) -> float:
    results = torch.stack([coded.task(i, x) for i in indices])
    truth = matrix @ x
    return float(torch.linalg.norm(coded.decode(indices, results) - truth) / torch.linalg.norm(truth))


@pytest.mark.parametrize(
    ("tasks", "redundancy", "kind"),
    [(16, 1.25, "orthogonal"), (16, 1.5, "orthogonal"), (8, 2.0, "orthogonal"), (6, 1.5, "orthogonal"),
     (12, 1.25, "chebyshev"), (1, 3.0, "orthogonal"), (16, 1.0, "orthogonal")],
)  # fmt: skip
def test_decoding_is_exact_from_every_sampled_k_subset(tasks: int, redundancy: float, kind: str) -> None:
    code = MDSCode.for_redundancy(tasks, redundancy, kind, seed=3)
    matrix = _matrix(101, 7)  # 101 rows: not a multiple of K, so the last block is padded
    coded = CodedMatrix(matrix, code)
    vector, block = _matrix(7, 1, seed=1)[:, 0], _matrix(7, 3, seed=2)  # matrix-vector and matrix-matrix
    errors = [_decode_error(coded, matrix, x, s) for s in _sets(code, 150, seed=tasks) for x in (vector, block)]
    assert max(errors) <= EXACT, f"worst relative decoding error {max(errors):.2e}"


def test_systematic_code_is_the_uncoded_split_at_redundancy_one_and_decodes_by_copying() -> None:
    code = MDSCode(8, 8)
    assert code.systematic and np.array_equal(code.generator, np.eye(8))
    report = code.condition_report()
    assert report.exhaustive and report.sets == 1 and report.worst == pytest.approx(1.0)
    matrix = _matrix(40, 5)
    coded = CodedMatrix(matrix, MDSCode(8, 12, seed=1))
    x = _matrix(5, 1)[:, 0]
    order = list(reversed(range(8)))
    results = torch.stack([coded.task(i, x) for i in order])
    # The uncoded results are copied into place, with no arithmetic: bitwise the blocks' own products.
    assert torch.equal(coded.decode(order, results), torch.cat([coded.task(i, x) for i in range(8)]))


def test_condition_report_is_exhaustive_when_small_and_sampled_when_large() -> None:
    small = MDSCode(4, 6, seed=0).condition_report(max_sets=100)
    assert small.exhaustive and small.sets == math.comb(6, 4)
    large = MDSCode(16, 24, seed=0).condition_report(max_sets=300, seed=1)
    assert not large.exhaustive and large.sets == 300
    assert large.median <= large.worst < 1e7
    assert MDSCode(16, 24, seed=0).condition_number(large.worst_set) == pytest.approx(large.worst)


def test_the_generator_is_far_better_conditioned_than_a_plain_vandermonde() -> None:
    orthogonal = MDSCode(16, 20, "orthogonal").condition_report(max_sets=1000).worst
    vandermonde = MDSCode(16, 20, "vandermonde").condition_report(max_sets=1000).worst
    assert orthogonal < 1e5 < 1e7 < vandermonde


def test_codes_are_deterministic_in_the_seed() -> None:
    assert np.array_equal(MDSCode(10, 13, seed=4).generator, MDSCode(10, 13, seed=4).generator)
    assert not np.array_equal(MDSCode(10, 13, seed=4).generator, MDSCode(10, 13, seed=5).generator)


@given(
    tasks=st.integers(1, 10),
    extra=st.integers(0, 6),
    rows=st.integers(1, 40),
    seed=st.integers(0, 50),
)
def test_any_k_results_decode_the_product(tasks: int, extra: int, rows: int, seed: int) -> None:
    code = MDSCode(tasks, tasks + extra, seed=seed)
    matrix = _matrix(rows, 3, seed)
    coded = CodedMatrix(matrix, code)
    indices = np.random.default_rng(seed).permutation(code.coded)[:tasks].tolist()
    assert _decode_error(coded, matrix, _matrix(3, 2, seed + 1), indices) <= EXACT


@pytest.mark.parametrize(
    ("call", "names"),
    [
        (lambda: MDSCode(0, 3), "tasks"),
        (lambda: MDSCode(4, 3), "coded"),
        (lambda: MDSCode(4, 5, kind="reed-solomon"), "kind"),
        (lambda: MDSCode(4, 5, seed=-1), "seed"),
        (lambda: MDSCode.for_redundancy(4, 0.5), "redundancy"),
        (lambda: MDSCode(2, 3).decode([0, 0], torch.zeros(2, 1, dtype=torch.float64)), "indices"),
        (lambda: MDSCode(2, 3).decode([0, 3], torch.zeros(2, 1, dtype=torch.float64)), "indices"),
        (lambda: MDSCode(2, 3).decode([0, 1], torch.zeros(3, 1, dtype=torch.float64)), "results"),
        (lambda: MDSCode(2, 3).decode([0, 1], torch.zeros(2, 1, dtype=torch.int64)), "results"),
        (lambda: MDSCode(2, 3).encode(torch.zeros(4)), "matrix"),
        (lambda: MDSCode(2, 3).condition_report(max_sets=0), "max_sets"),
        (lambda: CodedMatrix(torch.zeros(4, 2, dtype=torch.float64), MDSCode(2, 3)).task(3, torch.zeros(2)), "index"),
        (lambda: CodedMatrix(torch.zeros(4, 2, dtype=torch.float64), MDSCode(2, 3)).task(0, torch.zeros(3)), "x"),
        (lambda: CodedMatrix(torch.zeros(4, 2, dtype=torch.float64), "code"), "code"),
    ],
)
def test_bad_input_fails_early_naming_the_argument(call, names: str) -> None:
    with pytest.raises((MDSError, PlanError), match=rf"^{names}:"):
        call()
