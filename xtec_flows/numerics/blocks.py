"""Pure per-block kernels of the chunked engine (run inside dask tasks, on numpy blocks).

A block is (T, *block_spatial) intensities; its statistic is <I>_T per voxel, (*block_spatial)
float32: > 0 for a usable voxel, 0 where masked, NaN/Inf where the trajectory is not finite.
"""

from __future__ import annotations

import math

import numpy as np

from . import masking, peaks, threshold


def block_statistic(block: np.ndarray, mask_type: str) -> np.ndarray:
    """<I>_T of each voxel: > 0 for a usable voxel, 0 when masked, NaN/Inf when
    the trajectory is not finite. Shape (*spatial), float32."""
    # float32 data are summed in float32 (as numpy's own mean does, and 4x faster
    # than widening); integer counts are summed exactly in float64.
    acc = np.float32 if block.dtype.kind == "f" and block.dtype.itemsize <= 4 else np.float64
    with np.errstate(invalid="ignore", over="ignore"):
        mean = block.sum(axis=0, dtype=acc)
        mean /= block.shape[0]
    keep = masking.valid_voxels(block, mask_type) if mask_type != "zero-mean" else mean > 0
    out = np.where(keep, mean, 0).astype(np.float32)
    out[~np.isfinite(mean)] = np.nan
    return out


def log_valid(stat: np.ndarray) -> np.ndarray:
    v = stat[np.isfinite(stat) & (stat > 0)]
    return np.log(v.astype(np.float64))


def block_counts(stat, edges):
    return threshold.partial_histogram(log_valid(stat), edges)[0]


def block_hist(stat, edges):
    return threshold.partial_histogram(log_valid(stat), edges)


def block_mask(stat: np.ndarray, log_cut: float) -> np.ndarray:
    ok = np.isfinite(stat) & (stat > 0)
    if math.isfinite(log_cut):
        with np.errstate(divide="ignore", invalid="ignore"):
            ok &= np.log(np.where(ok, stat, 1.0).astype(np.float64)) > log_cut
    return ok


def block_flat(offset: tuple, block_shape: tuple, shape: tuple, mask: np.ndarray) -> np.ndarray:
    local = np.nonzero(mask)
    return np.ravel_multi_index(tuple(l + o for l, o in zip(local, offset)), shape).astype(np.int64)


def gather_block(block, stat, offset, shape, log_cut):
    """(flat indices, trajectories (n, T) float32, None) of the block's voxels above the cut."""
    mask = block_mask(stat, log_cut)
    flat = block_flat(offset, stat.shape, shape, mask)
    traj = np.ascontiguousarray(block[:, mask].T, dtype=np.float32)
    return flat, traj, None


def label_count(stat, log_cut):
    return peaks.label_mask(block_mask(stat, log_cut))[1]


def label_write(stat, log_cut, label_offset, offset, shape, target, region):
    """(block's provisional labels, or None once written to ``target``; first voxel of each label)."""
    labels, n = peaks.label_mask(block_mask(stat, log_cut))
    glob = np.where(labels > 0, labels.astype(np.int64) + label_offset, 0).astype(np.int32)
    grids = np.meshgrid(*[np.arange(o, o + s) for o, s in zip(offset, stat.shape)], indexing="ij")
    flat = np.ravel_multi_index(tuple(grids), shape)
    firsts = peaks.first_voxel_per_label(labels, n, flat)
    if target is None:
        return glob, firsts
    target[region] = glob
    return None, firsts


def values_in_bins(stat, bins):
    v = log_valid(stat)
    return [v[(v >= lo) & (v < hi)] for lo, hi in bins]
