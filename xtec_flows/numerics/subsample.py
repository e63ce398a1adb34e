"""Subsamples chosen by the rows themselves: the same rows however they are ordered or blocked.

The mixture's seeding and the class-stability refits run on a random subsample of
the rows. A row is chosen by a fixed pseudo-random rank of its key (a voxel's flat
index), not by its position, so a run whose rows are blocks on disk or in workers'
memory, in block order, picks exactly the rows, in the same order, that the
in-memory run (rows sorted by voxel) picks.
"""

from __future__ import annotations

import math

import numpy as np


def subsample_rank(keys: np.ndarray, seed: int) -> np.ndarray:
    """(n,) float64 in [0, 1): a fixed pseudo-random rank of each row key under ``seed``
    (splitmix64 of key XOR seed)."""
    with np.errstate(over="ignore"):
        z = np.asarray(keys).astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_seed(random_state, stream: int = 0) -> int:
    """A 64-bit rank seed from ``random_state`` (None: fresh entropy) and a stream number, so
    that subsamples for different purposes are independent and draw nothing from the
    random generator the caller seeds from ``random_state``."""
    entropy = None if random_state is None else [int(random_state), int(stream)] if stream else int(random_state)
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def is_dask(a) -> bool:
    """True for a dask collection (read block by block where it is), False for numpy and the like."""
    return hasattr(a, "dask") and hasattr(a, "to_delayed")


def sample_rows(arrays: list, keys, size: int, seed: int) -> tuple[np.ndarray, list]:
    """The ``size`` rows of smallest rank (all rows if there are fewer), in key order.

    Parameters
    ----------
    arrays : list of arrays of shape (n, ...), numpy or dask (dask: the same row chunks)
    keys : None or (n,) integers, numpy or dask: what identifies each row (None: row index)
    size : int
    seed : int, see :func:`hash_seed`

    Returns
    -------
    positions : ndarray of shape (m,), int64, the chosen rows' indices, m = min(size, n)
    rows : list of ndarray, each array's chosen rows (m, ...), in memory
    """
    n = int(arrays[0].shape[0])
    if not any(is_dask(a) for a in arrays) and not is_dask(keys):
        keys = np.arange(n, dtype=np.int64) if keys is None else np.asarray(keys)
        if size >= n:
            chosen = np.arange(n)
        else:
            chosen = np.argpartition(subsample_rank(keys, seed), size - 1)[:size]
        positions = chosen[np.argsort(keys[chosen], kind="stable")]
        return positions, [np.asarray(a[positions]) for a in arrays]
    return _sample_blocks(arrays, keys, n, size, seed)


def _sample_blocks(arrays, keys, n, size, seed):
    """:func:`sample_rows` over dask row blocks: each block keeps its rows ranked below a cut
    that lets through a few more than ``size`` rows in all (binomial: +10 sigma), then the
    ``size`` smallest are kept; one pass over the blocks, almost surely."""
    import dask
    import dask.array as da

    arrays = [da.asarray(a) for a in arrays]
    row_chunks = arrays[0].chunks[0]
    arrays = [a.rechunk({0: row_chunks, **{d: -1 for d in range(1, a.ndim)}}) for a in arrays]
    starts = np.cumsum((0,) + tuple(row_chunks))
    key_blocks = (list(da.asarray(keys).rechunk((row_chunks,)).to_delayed().ravel()) if keys is not None
                  else [np.arange(a, b, dtype=np.int64) for a, b in zip(starts[:-1], starts[1:])])
    array_blocks = [list(a.to_delayed().ravel()) for a in arrays]
    cut = 1.0 if size >= n else min(1.0, (size + 10.0 * math.sqrt(size) + 64.0) / n)
    while True:
        tasks = [dask.delayed(_block_rows_below)(key_blocks[i], int(starts[i]), seed, cut, *(b[i] for b in array_blocks))
                 for i in range(len(row_chunks))]
        parts = dask.compute(*tasks)
        if sum(p[0].size for p in parts) >= min(size, n) or cut >= 1.0:
            break
        cut = min(1.0, 2.0 * cut)
    block_keys = np.concatenate([p[0] for p in parts])
    ranks = np.concatenate([p[1] for p in parts])
    positions = np.concatenate([p[2] for p in parts])
    rows = [np.concatenate([p[3 + j] for p in parts]) for j in range(len(arrays))]
    chosen = np.argpartition(ranks, size - 1)[:size] if ranks.size > size else np.arange(ranks.size)
    chosen = chosen[np.argsort(block_keys[chosen], kind="stable")]
    return positions[chosen], [r[chosen] for r in rows]


def _block_rows_below(keys, start: int, seed: int, cut: float, *blocks):
    """(keys, ranks, positions, *rows) of one row block's rows ranked below ``cut``."""
    keys = np.asarray(keys)
    rank = subsample_rank(keys, seed)
    keep = np.nonzero(rank < cut)[0]
    return (keys[keep], rank[keep], keep.astype(np.int64) + start, *(np.asarray(b)[keep] for b in blocks))
