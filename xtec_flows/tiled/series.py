"""Importing a series (e.g. from NeXus) into Tiled as a plain (T, *spatial) array node."""

from __future__ import annotations

import numpy as np

from .._version import __version__
from ..chunking import block_regions, regular_chunks
from .client import MAX_REQUEST_BYTES, check_key, node_path


def write_series(parent, key: str, volume, temperatures, *, sources=(), dims=None, metadata=None, overwrite=False):
    """Stream a (T, *spatial) series into a new Tiled array node, one block per request.

    Blocks are one temperature by a spatial tile of at most ``MAX_REQUEST_BYTES``,
    so any input that supports ``volume[t, region]`` (h5py, zarr, a stack of
    files) is copied without holding more than one block in memory.
    ``temperatures`` go into the node's metadata, which is where
    :func:`open_scan` looks for them.
    """
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.data_source import DataSource

    shape = tuple(int(s) for s in volume.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"a series must be (T, *spatial) with 2 or 3 spatial dims; got shape {shape}")
    temps = np.asarray(temperatures, dtype=np.float64)
    if temps.shape != (shape[0],):
        raise ValueError(f"{temps.size} temperatures for {shape[0]} volumes; give one temperature per volume")
    dtype = np.dtype(volume.dtype)
    if dims is None:
        dims = ["T", "L", "K", "H"][: len(shape)] if len(shape) == 4 else ["T", "K", "H"]
    # 64-voxel tiles: readers fetch (T, 64^3)-ish regions, which then touch whole
    # stored chunks only (a region cutting through big chunks makes the server
    # decode every chunk it touches, once per region).
    side = min(64, max(8, int((MAX_REQUEST_BYTES / dtype.itemsize) ** (1.0 / (len(shape) - 1)))))
    spatial = [min(side, s) for s in shape[1:]]
    chunks = regular_chunks(shape, (1, *spatial))
    check_key(key, "node key")
    if key in parent:
        if not overwrite:
            raise FileExistsError(f"Tiled node {node_path(parent)}/{key} exists; pass --overwrite to replace it")
        parent[key].delete(recursive=True, external_only=False)
    structure = ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(dtype), shape=shape, chunks=chunks,
                               dims=list(dims))
    md = {"temperatures": temps.tolist(), "sources": list(sources), "imported_by": __version__}
    md.update(metadata or {})
    node = parent.new("array", [DataSource(structure=structure, structure_family="array")], key=key, metadata=md)
    for idx, _, region in block_regions(chunks):
        block = np.asarray(volume[(idx[0],) + region[1:]], dtype=dtype)[np.newaxis]
        node.write_block(np.ascontiguousarray(block), block=idx)
    return node
