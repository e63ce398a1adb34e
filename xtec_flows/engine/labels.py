"""Labels: per-voxel labels scattered into a chunked int8 zarr array, block by block."""

from __future__ import annotations

import math

import numpy as np
import zarr

from ..chunking import block_regions
from ..io import zarr_io
from ..numerics.subsample import is_dask
from .trajectories import Trajectories
from .trajectory_store import kept_rows


def write_labels(traj: Trajectories, sample_labels: np.ndarray, store=None, attrs: dict | None = None) -> zarr.Array:
    """Scatter per-voxel labels into a chunked int8 zarr array (−1 elsewhere), block by block."""
    chunks = tuple(c[0] for c in traj.spatial_chunks)
    arr = zarr_io.create_labels(store if store is not None else zarr.storage.MemoryStore(), traj.spatial_shape, chunks, attrs)
    if traj.chunked is not None:
        _write_chunked(traj, sample_labels, arr)
        return arr
    coords = traj.coords
    block_of = coords // np.asarray(chunks)
    nblocks = tuple(len(c) for c in traj.spatial_chunks)
    block_flat = np.ravel_multi_index(block_of.T, nblocks) if coords.size else np.empty(0, np.int64)
    order = np.argsort(block_flat, kind="stable")
    bounds = np.searchsorted(block_flat[order], np.arange(math.prod(nblocks) + 1))

    def write_one(item):
        b, (idx, offset, region) = item
        sel = order[bounds[b] : bounds[b + 1]]
        if sel.size == 0:
            return
        out = np.full(tuple(r.stop - r.start for r in region), -1, dtype=np.int8)
        local = coords[sel] - np.asarray(offset)
        out[tuple(local.T)] = sample_labels[sel]
        arr[region] = out

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor() as pool:
        list(pool.map(write_one, enumerate(block_regions(traj.spatial_chunks))))
    return arr


def _write_chunked(traj: Trajectories, sample_labels: np.ndarray, arr: zarr.Array, batch: int = 64) -> None:
    """Rows in block order (:class:`~.trajectory_store.ChunkedTrajectories`): each block's labels
    are the slice of ``sample_labels`` at its rows. The label block is made where the block's
    rows are (a task per block on the active scheduler: threads here, or the worker that holds
    them), then written here ``batch`` blocks at a time, so the label array may be any store,
    in memory included, and memory holds a batch of int8 blocks."""
    import dask

    chunked = traj.chunked
    regions = list(block_regions(traj.spatial_chunks))
    starts = chunked.row_starts
    if is_dask(sample_labels):
        # Lazy labels (mode "peaks": made from each row's peak where the rows are), one chunk per block.
        per_block = list(sample_labels.rechunk((tuple(int(n) for n in chunked.counts),)).to_delayed().ravel())
    else:
        per_block = [sample_labels[starts[p]:starts[p + 1]] for p in range(len(chunked.blocks))]
    for first in range(0, len(chunked.blocks), batch):
        positions = range(first, min(first + batch, len(chunked.blocks)))
        tasks = [
            dask.delayed(_label_block)(chunked.sources[chunked.blocks[p]], chunked.log_cutoff,
                                       per_block[p], regions[chunked.blocks[p]][1],
                                       regions[chunked.blocks[p]][2], traj.spatial_shape)
            for p in positions
        ]
        for p, out in zip(positions, dask.compute(*tasks)):
            arr[regions[chunked.blocks[p]][2]] = out


def _label_block(rows, log_cutoff: float, labels: np.ndarray, offset, region, spatial_shape) -> np.ndarray:
    """The int8 label block of one spatial block (−1 where no row), from its kept rows' voxels."""
    flat = kept_rows(rows, "flat", log_cutoff)
    local = np.stack(np.unravel_index(flat, spatial_shape), axis=1) - np.asarray(offset)
    out = np.full(tuple(r.stop - r.start for r in region), -1, dtype=np.int8)
    out[tuple(local.T)] = labels
    return out
