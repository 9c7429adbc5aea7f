"""Least squares through coded jobs: every product with the data matrix is a coded stream job.

``min_w ‖A·w − b‖`` needs two products per iteration, ``A·p`` and ``Aᵀ·r``. Both matrices are held
as coded row blocks (``Aᵀ``'s row blocks are ``A``'s column blocks), so each product is one coded
job: any K of its coded tasks decode it exactly, whatever the stragglers.

* ``method="cg"``: conjugate gradients on the normal equations (CGLS, Björck's stable form): the
  gradient method that reaches the least-squares solution in at most n iterations in exact
  arithmetic, so a float64 run matches a direct solver to 1e-8 in a few dozen jobs.
* ``method="gd"``: plain gradient descent with step 1/‖A‖₂²; its iterates equal those of the same
  descent in one process (the coded products are exact), but it needs about κ(AᵀA)·ln(1/ε)
  iterations to converge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import torch
from sklearn import datasets

from codedgrad.linear.stream import Master

__all__ = [
    "DATASETS",
    "METHODS",
    "LeastSquares",
    "coded_least_squares",
    "direct_solution",
    "gradient_descent",
    "load_regression",
]

DATASETS = ("diabetes", "breast_cancer", "digits")
"""Data sets that ship inside scikit-learn (no download)."""

METHODS = ("cg", "gd")


def load_regression(name: str, standardize: bool = True, intercept: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A float64 design matrix and target from a data set shipped with scikit-learn.

    Args:
        name: ``diabetes`` (442 × 10, disease progression), ``breast_cancer`` (569 × 30, the 0/1
            label as a least-squares classifier) or ``digits`` (1797 × 64, the digit as a number).
        standardize: centre each feature and scale it to unit standard deviation (constant features
            become zero columns); keeps the normal equations well conditioned.
        intercept: append a column of ones.
    """
    loaders = {"diabetes": datasets.load_diabetes, "breast_cancer": datasets.load_breast_cancer}
    loaders["digits"] = datasets.load_digits
    if name not in loaders:
        raise ValueError(f"data: must be one of {', '.join(DATASETS)}, got {name!r}")
    bunch = loaders[name]()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.float64)
    if standardize:
        scale = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    if intercept:
        x = np.hstack([x, np.ones((x.shape[0], 1))])
    return torch.from_numpy(x), torch.from_numpy(y)


@dataclass
class LeastSquares:
    """The outcome of a coded least-squares solve.

    Attributes:
        solution: the coefficients w.
        method: ``cg`` or ``gd``.
        iterations: iterations run.
        jobs: coded jobs served (two per iteration, plus one to start).
        gradient_norms: ‖Aᵀ(A·w − b)‖ after each iteration.
        converged: whether the gradient fell below ``tol`` times its starting value.
    """

    solution: torch.Tensor
    method: str
    iterations: int
    jobs: int
    gradient_norms: list[float] = field(default_factory=list)
    converged: bool = False


def coded_least_squares(
    master: Master,
    b: torch.Tensor,
    method: str = "cg",
    tol: float = 1e-12,
    max_iterations: int = 500,
    step: float | None = None,
    matrix: int = 0,
    transpose: int = 1,
) -> LeastSquares:
    """Solve ``min ‖A·w − b‖`` on the master, every product with A or Aᵀ a coded job.

    Args:
        master: the session's master; its operators ``matrix`` and ``transpose`` hold A and Aᵀ.
        b: the target (float64, one entry per row of A).
        method: ``cg`` (conjugate gradients on the normal equations) or ``gd`` (gradient descent).
        tol: stop when ‖Aᵀ(A·w − b)‖ ≤ tol·‖Aᵀb‖.
        max_iterations: upper bound on iterations.
        step: gradient descent's step (required for ``gd``: e.g. 1/‖A‖₂²).
        matrix, transpose: operator indices of A and Aᵀ in the session.
    """
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol: must be finite and >= 0, got {tol!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations: must be an integer >= 1, got {max_iterations!r}")
    if method == "gd" and (step is None or not (math.isfinite(step) and step > 0)):
        raise ValueError(f"step: gradient descent needs a finite step > 0, got {step!r}")
    first_job = master.next_job
    # w = 0, so the residual is b and the first gradient (up to sign) is Aᵀb.
    residual = b.clone()
    gradient = master.apply(residual, transpose)
    start_norm = float(torch.linalg.norm(gradient))
    w = torch.zeros_like(gradient)
    out = LeastSquares(solution=w, method=method, iterations=0, jobs=0)
    direction, gamma = gradient.clone(), float(gradient @ gradient)
    for iteration in range(1, max_iterations + 1):
        if method == "cg":
            q = master.apply(direction, matrix)
            alpha = gamma / float(q @ q)
            w += alpha * direction
            residual -= alpha * q
        else:
            w += step * gradient
            residual = b - master.apply(w, matrix)
        gradient = master.apply(residual, transpose)
        gamma_next = float(gradient @ gradient)
        out.gradient_norms.append(math.sqrt(gamma_next))
        out.iterations = iteration
        if math.sqrt(gamma_next) <= tol * start_norm:
            out.converged = True
            break
        if method == "cg":
            direction = gradient + (gamma_next / gamma) * direction
            gamma = gamma_next
    out.jobs = master.next_job - first_job
    return out


def gradient_descent(a: torch.Tensor, b: torch.Tensor, step: float, iterations: int) -> torch.Tensor:
    """The same gradient descent in one process (the reference for ``method="gd"``)."""
    w = torch.zeros(a.shape[1], dtype=a.dtype)
    for _ in range(iterations):
        w = w + step * (a.T @ (b - a @ w))
    return w


def direct_solution(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The single-process least-squares solution (minimum norm), by scipy's LAPACK driver."""
    w, *_ = scipy.linalg.lstsq(a.numpy(), b.numpy())
    return torch.from_numpy(w)
