"""The threshold histogram of log <I>_T from the statistic array: exact quartiles, then one
chunked counting pass."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np

from ..numerics import threshold
from ..numerics.blocks import block_hist, values_in_bins
from .store import compute, tree_sum


def exact_quartiles(stat_d: da.Array, n: int, fine_edges: np.ndarray, fine_counts: np.ndarray):
    """Order statistics at the quartile ranks, exactly: the fine histogram tells
    which bins hold them (values outside the edges were clipped into the end
    bins, which then extend to infinity), one pass collects those bins' values."""
    cum = np.cumsum(fine_counts)
    wanted = []
    for r in threshold.quartile_ranks(n):
        b = int(np.searchsorted(cum, r, side="right"))
        below = int(cum[b - 1]) if b > 0 else 0
        lo = fine_edges[b] if b > 0 else -math.inf
        hi = fine_edges[b + 1] if b + 1 < fine_edges.size - 1 else math.inf
        wanted.append((r - below, lo, hi))
    blocks = stat_d.to_delayed().ravel()
    parts = compute(*[dask.delayed(values_in_bins)(b, [(lo, hi) for _, lo, hi in wanted]) for b in blocks])
    out = []
    for i, (rank, _, _) in enumerate(wanted):
        vals = np.sort(np.concatenate([p[i] for p in parts]))
        out.append(float(vals[min(rank, vals.size - 1)]))
    return out[0], out[1]


def histogram_chunked(stat_d, n_valid, lo, hi, fine_edges, fine_counts):
    q25 = q75 = lo
    if n_valid >= 2 and hi > lo:
        q25, q75 = exact_quartiles(stat_d, n_valid, fine_edges, fine_counts)
    edges, bin_size = threshold.histogram_edges(lo, hi, q25, q75, n_valid)
    # Summed as a tree: each block's (3, n_bins) partial is added as soon as it is made.
    (total,) = compute(tree_sum([dask.delayed(_stacked_hist)(b, edges) for b in stat_d.to_delayed().ravel()]))
    return threshold.LogMeanHistogram(edges, total[0].astype(np.int64), total[1], total[2], float(bin_size))


def _stacked_hist(stat, edges) -> np.ndarray:
    """(3, n_bins) float64: a block's counts, sums and sums of squares (counts exact below 2**53)."""
    return np.stack([np.asarray(a, dtype=np.float64) for a in block_hist(stat, edges)])
