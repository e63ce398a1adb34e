"""Tiled array nodes as lazily read dask arrays: one HTTP request per block, or one read of the
node's own zarr/HDF5 file per block when this host can open it (:mod:`.direct`)."""

from __future__ import annotations

import numpy as np

from ..chunking import block_regions, regular_chunks
from .client import MAX_REQUEST_BYTES


def node_dtype(node) -> np.dtype:
    """The numpy dtype of a Tiled array client node."""
    return np.dtype(node.dtype.to_numpy_dtype() if hasattr(node.dtype, "to_numpy_dtype") else node.dtype)


def read_region(node, region) -> np.ndarray:
    """``node.read(slice=region)`` for a task of a dask graph: in this task's own thread.

    tiled's ``ArrayClient.read`` computes a dask graph of its own (one fetch per Tiled chunk).
    Nested in a task of a threaded graph that is itself computed off the main thread (a
    provisional update in :mod:`.live`, a flow's worker thread), that inner compute was seen
    to hang for good: both inner computes waiting on their queues, their pools idle. The inner
    graph is therefore computed synchronously; the outer graph supplies the parallelism.
    """
    from tiled.client.array import DaskArrayClient

    if isinstance(node, DaskArrayClient):
        return np.asarray(DaskArrayClient.read(node, slice=region).compute(scheduler="sync"))
    return np.asarray(node.read(slice=region))


def lazy_array(node, spatial_chunk: int | None = None, read_mode: str = "auto",
               max_request_bytes: int = MAX_REQUEST_BYTES):
    """A dask array over a Tiled array node, one request (or one file read) per task.

    Blocks span the whole first (temperature) axis and are sized so that each
    request stays under ``max_request_bytes``; they are aligned to Tiled's own
    chunks when those are small enough.

    ``read_mode``: "auto" reads the blocks straight from the node's zarr or HDF5
    file when this host can open it and it matches Tiled's structure, else over
    HTTP; "http" always over HTTP; "direct" from the file or
    :class:`~xtec_flows.tiled.direct.DirectReadUnavailable` (see
    :mod:`xtec_flows.tiled.direct`). The block grid is the same either way.
    """
    import dask
    import dask.array as da

    from .direct import check_read_mode, direct_array

    check_read_mode(read_mode)

    shape = tuple(int(s) for s in node.shape)
    dtype = node_dtype(node)
    ndim = len(shape)
    if spatial_chunk is None:
        per_voxel = shape[0] * dtype.itemsize
        side = int((max_request_bytes / per_voxel) ** (1.0 / (ndim - 1)))
        spatial_chunk = max(8, min(128, side))
    tiled_chunks = [max(c) for c in node.chunks[1:]] if node.chunks else [None] * (ndim - 1)
    sizes = []
    for s, tc in zip(shape[1:], tiled_chunks):
        c = min(spatial_chunk, s)
        if tc and tc < s and tc <= spatial_chunk:
            c = tc * max(1, spatial_chunk // tc)  # a whole number of Tiled chunks
        sizes.append(c)
    chunks = regular_chunks(shape, (shape[0], *sizes))
    direct = direct_array(node, chunks, read_mode=read_mode)
    if direct is not None:
        return direct
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for idx, _, region in block_regions(chunks):
        bshape = tuple(r.stop - r.start for r in region)
        blocks[idx] = da.from_delayed(dask.delayed(read_region)(node, region), bshape, dtype=dtype)
    return da.block(blocks.tolist())


def lazy_array_spatial(node):
    """A dask array over any Tiled array node, one read_block request per Tiled chunk."""
    import dask
    import dask.array as da

    dtype = node_dtype(node)
    chunks = tuple(tuple(int(c) for c in ch) for ch in node.chunks)
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for idx in np.ndindex(*blocks.shape):
        bshape = tuple(chunks[a][i] for a, i in enumerate(idx))
        blocks[idx] = da.from_delayed(dask.delayed(node.read_block)(idx), bshape, dtype=dtype)
    return da.block(blocks.tolist())
