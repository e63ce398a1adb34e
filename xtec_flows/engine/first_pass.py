"""The first (usually only) read of the input: each block's statistic, and the trajectories
above a provisional cut."""

from __future__ import annotations

import math
import warnings

import dask
import dask.array as da
import numpy as np

from ..numerics import threshold
from ..numerics.blocks import block_flat, block_mask, block_statistic, log_valid
from .params import ClusterParams
from .store import DEFAULT_LIMITS, StreamingLimits, compute


def block_first_pass(block, offset, shape, mask_type, provisional, fine_edges, stat_target, region):
    """Everything the first read of one block yields.

    Returns (the block's <I>_T, or None once written into ``stat_target``; a
    dict with the counts and range of valid log-means, the number of
    non-finite trajectories, a fine histogram of the log-means (if
    ``fine_edges`` is given) and the trajectories, flat indices and log-means
    of the voxels above ``provisional``).
    """
    stat = block_statistic(block, mask_type)
    written = stat_target is not None
    if written:
        stat_target[region] = stat
    n_bad = int((~np.isfinite(stat)).sum())
    logv = log_valid(stat)
    out = {
        "n_valid": int(logv.size),
        "lo": float(logv.min()) if logv.size else math.inf,
        "hi": float(logv.max()) if logv.size else -math.inf,
        "n_bad": n_bad,
        "fine": threshold.partial_histogram(logv, fine_edges)[0] if fine_edges is not None else None,
    }
    if provisional == -math.inf:
        # Small input: keep the block itself (no copy); select after the cut is known.
        out["block"], out["stat"] = block, stat
    else:
        keep = block_mask(stat, provisional)
        out["flat"] = block_flat(offset, stat.shape, shape, keep)
        out["traj"] = np.ascontiguousarray(block[:, keep].T, dtype=np.float32)
        out["log"] = np.log(stat[keep].astype(np.float64))
    return (None if written else stat), out


def provisional_cut(x: da.Array, params: ClusterParams, regions: list, limits: StreamingLimits = DEFAULT_LIMITS):
    """Where the first pass may safely start keeping trajectories.

    Returns (provisional log cut, fine histogram edges or None). An explicit
    threshold is exact; "none" keeps every valid voxel; small inputs keep every
    valid voxel; otherwise the cut is estimated on a sample of blocks and
    lowered by a margin. If the final cut turns out lower still, the
    trajectories are read a second time (correct, only slower).
    """
    if not isinstance(params.threshold, str):
        return math.log(params.threshold), None
    nbytes = x.dtype.itemsize * math.prod(x.shape)
    if params.threshold == "none" or nbytes <= limits.cache_all_bytes:
        return -math.inf, None
    n_sample = min(16, max(2, math.ceil(len(regions) / 20)))
    picks = np.unique(np.linspace(0, len(regions) - 1, n_sample).round().astype(int))
    xb = x.to_delayed().reshape(x.numblocks[1:])
    stats = compute(*[dask.delayed(block_statistic)(xb[regions[i][0]], params.mask) for i in picks])
    values = np.concatenate([log_valid(s) for s in stats])
    if values.size < 100 or values.max() <= values.min():
        return -math.inf, None
    hist = threshold.histogram_of(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = threshold.find_cutoff(hist, params.threshold)
    fine_edges = np.linspace(values.min(), values.max(), 4097)
    return cut.log_cutoff - limits.provisional_margin_bins * hist.bin_size, fine_edges
