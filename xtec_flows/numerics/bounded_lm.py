"""A Levenberg-Marquardt solver for tiny box-bounded least-squares problems, many at once.

Curve models of a class's temperature dependence have at most 8 parameters and are fitted
to at most a few dozen temperatures, from several starting points for every component and
class (``numerics.classes``). At that size ``scipy.optimize.least_squares`` spends most of
each iteration on bookkeeping (trust-region reflective, an SVD per step) rather than on the
arithmetic, and it solves one problem at a time. This loop does the same damped
Gauss-Newton steps for a stack of S problems (the same model from S starts) with a handful
of batched NumPy calls per step. Bounds are kept by projection: a parameter on a bound that
the descent direction pushes outwards is held there for the step, and the step is clipped
into the box (the model's bounds are physical limits: non-negative amplitudes, Tc inside the
measured range). The result is
checked against scipy in tests/test_classes.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LeastSquaresResult:
    """x : (S, p) solutions; residuals : (S, n) at x; jacobian : (S, n, p) at x; cost : (S,) sum of
    squared residuals; converged : (S,) bool, False where ``max_iter`` ran out first."""

    x: np.ndarray
    residuals: np.ndarray
    jacobian: np.ndarray
    cost: np.ndarray
    converged: np.ndarray


def levenberg_marquardt(residuals, jacobian, x0, lower, upper, *, max_iter: int = 200,
                        ftol: float = 1e-6, xtol: float = 1e-6) -> LeastSquaresResult:
    """Minimise ``sum(residuals(x)**2)`` for ``lower <= x <= upper``, independently for each row of x.

    Parameters
    ----------
    residuals : callable, (S, p) -> (S, n)
    jacobian : callable, (S, p) -> (S, n, p), the derivatives of ``residuals``
    x0 : array-like of shape (S, p) (or (p,) for one problem), starting points
    lower, upper : array-like of shape (p,); infinite bounds allowed
    max_iter : steps (accepted or not) before giving up
    ftol : a problem stops when a step lowers its cost by less than this fraction of it
    xtol : ... or moves every parameter by less than this fraction of (|x| + xtol)

    Returns
    -------
    LeastSquaresResult (rows in the order of ``x0``; shape (1, ...) for a (p,) start)
    """
    lower = np.asarray(lower, dtype=float)
    upper = np.asarray(upper, dtype=float)
    x = np.clip(np.atleast_2d(np.asarray(x0, dtype=float)), lower, upper)
    n_problems, n_params = x.shape
    r = residuals(x)
    cost = np.einsum("sn,sn->s", r, r)
    J = jacobian(x)
    damping = np.full(n_problems, 1e-3)
    done = np.zeros(n_problems, dtype=bool)
    eye = np.eye(n_params)
    for _ in range(max_iter):
        if done.all():
            break
        gradient = np.einsum("snp,sn->sp", J, r)
        hessian = np.einsum("snp,snq->spq", J, J)
        # Marquardt's scaling: damping proportional to the curvature of each parameter, so
        # the step does not depend on the parameters' units (K for Tc, 1 for beta).
        diag = np.einsum("spp->sp", hessian)
        scale = np.maximum(diag, 1e-12 * np.maximum(diag.max(axis=1, keepdims=True), 1e-300))
        # A parameter on a bound that the descent direction pushes outwards is held there and the
        # step is solved for the others (a projected Newton step): clipping the full step instead
        # moves the free parameters as if the held one could still go on, and stalls.
        held = ((x <= lower) & (gradient > 0)) | ((x >= upper) & (gradient < 0))
        free = (~held).astype(float)
        hessian = hessian * free[:, :, None] * free[:, None, :]
        gradient = gradient * free
        scale = np.where(held, 1.0, scale)
        system = hessian + (damping[:, None] * free + (1.0 - free))[:, :, None] * scale[:, :, None] * eye
        try:
            step = np.linalg.solve(system, -gradient[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = np.einsum("spq,sq->sp", np.linalg.pinv(system), -gradient)
        x_new = np.clip(x + step, lower, upper)
        r_new = residuals(x_new)
        cost_new = np.einsum("sn,sn->s", r_new, r_new)
        better = ~done & np.isfinite(cost_new) & (cost_new < cost)
        if better.any():
            moved = np.abs(x_new - x)
            decrease = cost - cost_new
            x = np.where(better[:, None], x_new, x)
            r = np.where(better[:, None], r_new, r)
            cost = np.where(better, cost_new, cost)
            J = np.where(better[:, None, None], jacobian(x), J)
            small = (decrease <= ftol * cost_new) | np.all(moved <= xtol * (np.abs(x_new) + xtol), axis=1)
            done |= better & small
        damping = np.where(better, np.maximum(damping / 3.0, 1e-12), damping * 4.0)
        # No descent direction left inside the box: a (bounded) minimum.
        done |= damping > 1e12
    return LeastSquaresResult(x, r, J, cost, done)
