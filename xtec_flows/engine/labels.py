"""Labels: per-voxel labels scattered into a chunked int8 zarr array, block by block."""

from __future__ import annotations

import math

import numpy as np
import zarr

from ..chunking import block_regions
from ..io import zarr_io
from .trajectories import Trajectories


def write_labels(traj: Trajectories, sample_labels: np.ndarray, store=None, attrs: dict | None = None) -> zarr.Array:
    """Scatter per-voxel labels into a chunked int8 zarr array (−1 elsewhere), block by block."""
    chunks = tuple(c[0] for c in traj.spatial_chunks)
    arr = zarr_io.create_labels(store if store is not None else zarr.storage.MemoryStore(), traj.spatial_shape, chunks, attrs)
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
