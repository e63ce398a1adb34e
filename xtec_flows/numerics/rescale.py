"""Rescaling of temperature trajectories before clustering.

Every function maps trajectories of shape ``(n_samples, T)`` to an array of the
same shape, float64. The point of rescaling is that XTEC clusters the *shape* of
I_q(T), not its magnitude: a Bragg peak and a weak background voxel with the
same temperature dependence must look alike.
"""

from __future__ import annotations

import numpy as np

RESCALE_METHODS = ("mean", "zscore", "log-mean", "none")


def rescale(trajectories: np.ndarray, method: str = "mean") -> np.ndarray:
    """Rescale each trajectory (row) independently.

    Parameters
    ----------
    trajectories : ndarray of shape (n_samples, T)
        Raw intensities.
    method : {"mean", "zscore", "log-mean", "none"}
        - ``"mean"``: I / <I>_T - 1 (the XTEC paper's choice)
        - ``"zscore"``: (I - <I>_T) / std_T(I); flat trajectories map to 0
        - ``"log-mean"``: log I - <log I>_T, i.e. log(I / geometric mean); values
          <= 0 are first raised to the smallest positive value of that row, so a
          single zero count does not produce -inf
        - ``"none"``: returned unchanged (as float64)

    Returns
    -------
    rescaled : ndarray of shape (n_samples, T), float64
    """
    x = np.asarray(trajectories, dtype=np.float64)
    if method == "mean":
        mean = x.mean(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = x / mean - 1.0
        # A zero-mean row cannot survive masking, but guard anyway: map it to 0.
        out[~np.isfinite(out)] = 0.0
        return out
    if method == "zscore":
        mean = x.mean(axis=1, keepdims=True)
        std = x.std(axis=1, keepdims=True)
        safe = np.where(std > 0, std, 1.0)
        return (x - mean) / safe
    if method == "log-mean":
        positive = np.where(x > 0, x, np.inf)
        floor = positive.min(axis=1, keepdims=True)
        floor = np.where(np.isfinite(floor), floor, 1.0)
        logx = np.log(np.maximum(x, floor))
        return logx - logx.mean(axis=1, keepdims=True)
    if method == "none":
        return x.copy()
    raise ValueError(f"rescale must be one of {RESCALE_METHODS}; got {method!r}")
