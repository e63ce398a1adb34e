"""Which voxels can be clustered at all: zero masks (non-finite values are caught by the pipeline
from the temperature mean, which is NaN or Inf exactly when the trajectory is).

All functions take a block of the volume shaped ``(T, *spatial)`` and return a
boolean array shaped ``spatial`` that is True for voxels to *keep*.
"""

from __future__ import annotations

import numpy as np

MASK_TYPES = ("zero-mean", "any-zero")


def valid_voxels(block: np.ndarray, mask_type: str = "zero-mean") -> np.ndarray:
    """Voxels whose trajectory carries signal.

    Parameters
    ----------
    block : ndarray of shape (T, *spatial)
    mask_type : {"zero-mean", "any-zero"}
        ``"zero-mean"`` drops voxels whose temperature-mean intensity is <= 0
        (detector gaps, masked pixels); ``"any-zero"`` also drops voxels that are
        <= 0 at any single temperature (needed before a logarithmic rescale).

    Returns
    -------
    keep : ndarray of bool, shape (*spatial)
    """
    if mask_type == "zero-mean":
        # Sum instead of mean: same sign, one division fewer per voxel.
        return block.sum(axis=0, dtype=np.float64) > 0
    if mask_type == "any-zero":
        return (block > 0).all(axis=0)
    raise ValueError(f"mask_type must be one of {MASK_TYPES}; got {mask_type!r}")

