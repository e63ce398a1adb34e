"""Connected components of the threshold mask, block by block (mode "peaks")."""

from __future__ import annotations

import dask
import numpy as np

from ..chunking import block_regions
from ..numerics import peaks
from ..numerics.blocks import label_count, label_write
from .store import compute, intermediate, read_slabs


def chunked_components(stat_d, store, shape, chunks, log_cut):
    """Connected components of the threshold mask, block by block (see numerics.peaks).

    ``store`` is the zarr scratch store, or None to keep the provisional labels
    in the workers' memory (distributed Client).

    Returns (mapping from provisional to final label, number of peaks, the
    provisional labels: a zarr scratch array or a persisted dask array)."""
    blocks = stat_d.to_delayed()
    regions = list(block_regions(stat_d.chunks))
    counts = compute(*[dask.delayed(label_count)(blocks[idx], log_cut) for idx, _, _ in regions])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n_prov = int(sum(counts))
    if n_prov >= np.iinfo(np.int32).max:
        raise ValueError(f"too many provisional peaks ({n_prov}) for int32 labels; raise the threshold")
    firsts, _, prov = intermediate(
        label_write,
        [(blocks[idx], log_cut, int(off), offset, shape) for (idx, offset, _), off in zip(regions, offsets)],
        regions, shape, chunks, store, "provisional_labels", np.int32,
    )
    first_flat = np.concatenate([[0]] + [f for f in firsts]).astype(np.int64)
    # The two voxel layers either side of every block boundary: labels that meet there merge.
    boundaries = []
    for axis, c in enumerate(stat_d.chunks):
        for boundary in np.cumsum(c)[:-1]:
            sl = [slice(None)] * len(shape)
            sl[axis] = slice(int(boundary) - 1, int(boundary) + 1)
            boundaries.append((axis, tuple(sl)))
    slabs = read_slabs(prov, [sl for _, sl in boundaries])
    edges = [peaks.slab_edges(np.moveaxis(slab, axis, 0)) for (axis, _), slab in zip(boundaries, slabs)]
    edges = np.concatenate(edges) if edges else np.empty((0, 2), np.int64)
    mapping, n_final = peaks.resolve_labels(n_prov, edges, first_flat)
    return mapping, n_final, prov
