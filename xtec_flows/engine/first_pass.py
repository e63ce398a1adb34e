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
from .trajectory_store import write_candidates
from .store import DEFAULT_LIMITS, StreamingLimits, compute


def block_first_pass(block, offset, shape, mask_type, provisional, fine_edges, candidates, block_index,
                     stat_target, region):
    """Everything the first read of one block yields.

    Returns (the block's <I>_T, or None once written into ``stat_target``; a
    dict with the counts and range of valid log-means, the number of
    non-finite trajectories, a fine histogram of the log-means (if
    ``fine_edges`` is given) and the trajectories, flat indices and log-means
    of the voxels above ``provisional``). With a ``candidates`` scratch directory (see
    :mod:`.trajectory_store`) those rows are written there as block ``block_index``
    and the dict carries only their number, ``n_candidates``.
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
        flat = block_flat(offset, stat.shape, shape, keep)
        traj = np.ascontiguousarray(block[:, keep].T, dtype=np.float32)
        log = np.log(stat[keep].astype(np.float64))
        if candidates is not None:
            out["n_candidates"] = write_candidates(candidates, block_index, flat, traj, log)
        else:
            out["flat"], out["traj"], out["log"] = flat, traj, log
    return (None if written else stat), out


def provisional_cut(x: da.Array, params: ClusterParams, regions: list, limits: StreamingLimits = DEFAULT_LIMITS,
                    on_disk: bool = False):
    """Where the first pass may safely start keeping trajectories.

    Returns (provisional log cut, fine histogram edges or None). An explicit
    threshold is exact; small inputs keep every valid voxel (-inf: whole blocks in
    memory); otherwise the cut is estimated on a sample of blocks and lowered by a
    margin. With ``on_disk`` (the kept rows go to the trajectory store, not to memory) the
    candidates are generous: at least ``limits.candidate_factor`` times the fraction of
    voxels the sampled cut keeps, and every valid voxel for threshold "none" or a sample
    that shows nothing. If the final cut turns out lower still, the trajectories are read
    a second time (correct, only slower).
    """
    if not isinstance(params.threshold, str):
        return math.log(params.threshold), None
    nbytes = x.dtype.itemsize * math.prod(x.shape)
    if nbytes <= limits.cache_all_bytes:
        return -math.inf, None
    if params.threshold == "none":
        return (KEEP_EVERY_VALID if on_disk else -math.inf), None
    n_sample = min(16, max(2, math.ceil(len(regions) / 20)))
    picks = np.unique(np.linspace(0, len(regions) - 1, n_sample).round().astype(int))
    xb = x.to_delayed().reshape(x.numblocks[1:])
    # Every stride-th voxel of a block larger than limits.block_voxels (a cluster's merged blocks):
    # the sample, and the memory it costs here, stay those of 16 blocks of the usual size.
    stride = max(1, math.ceil(math.prod(c[0] for c in x.chunks[1:]) / limits.block_voxels))
    values = np.concatenate(compute(*[dask.delayed(sampled_log_means)(xb[regions[i][0]], params.mask, stride)
                                      for i in picks]))
    if values.size < 100 or values.max() <= values.min():
        return (KEEP_EVERY_VALID if on_disk else -math.inf), None
    hist = threshold.histogram_of(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = threshold.find_cutoff(hist, params.threshold)
    fine_edges = np.linspace(values.min(), values.max(), 4097)
    provisional = cut.log_cutoff - limits.provisional_margin_bins * hist.bin_size
    if on_disk:
        # The sample can miss the volume's character (signal in blocks it did not see): disk is
        # cheaper than a second read of the input, so keep a multiple of what the sample predicts.
        fraction = limits.candidate_factor * (float(np.mean(values > cut.log_cutoff)) + 0.005)
        generous = float(np.quantile(values, 1.0 - fraction)) if fraction < 1.0 else KEEP_EVERY_VALID
        provisional = min(provisional, generous)
    return provisional, fine_edges


def sampled_log_means(block, mask_type, stride: int) -> np.ndarray:
    """(m,) float64 log <I>_T of every ``stride``-th valid voxel of one block (C order)."""
    return log_valid(block_statistic(block, mask_type))[::stride]


# A finite cut below every log-mean: the first pass keeps every valid voxel (on disk).
KEEP_EVERY_VALID = -float(np.finfo(np.float64).max)
