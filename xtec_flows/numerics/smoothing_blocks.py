"""XTEC-s on row blocks: the label smoothing of :mod:`.smoothing` where the rows are.

For trajectories kept in row blocks, one per spatial block of the grid (the chunked
trajectory store), the normalised masked convolution of :class:`.smoothing.LabelSmoother`
is computed block by block, as dask tasks:

- ``local`` kernel: each block's responsibilities are smoothed from its own rows and the
  rows of the blocks within the kernel's support of it (the halo exchange of dask's
  ``map_overlap``, with depth = the stencil radius). The rows, not a dense array, are
  exchanged: a dense responsibility volume costs (K + 1) numbers per voxel, kept or not,
  where only a few per cent of the voxels are kept. Each task scatters the rows it got
  into a dense (K + 1, block + 2 r) array, applies the stencil to the block's core and
  reads the result back at the block's own rows.
- ``periodic`` kernel: the sum over all voxels folds onto one unit cell, so every block
  folds its rows per cell position (K x cell numbers), the folds are summed, the circular
  convolution runs once on the cell, and every block reads its rows' values back.

Both give :class:`.smoothing.LabelSmoother`'s result up to the order of floating-point
sums. Pure numpy kernels here plus the task wiring in :class:`BlockSmoother`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .smoothing import SmoothingKernel


def local_coords(flat: np.ndarray, spatial_shape: tuple, offset: tuple, block_shape: tuple) -> np.ndarray:
    """(n, ndim) grid indices of flat voxel indices relative to a block's ``offset``: int16 for
    blocks under 2**15 voxels along every axis (6 bytes per row are what a run holds), else int32."""
    coords = np.stack(np.unravel_index(np.asarray(flat, dtype=np.int64), spatial_shape), axis=1)
    dtype = np.int16 if max(block_shape, default=0) < (1 << 15) else np.int32
    return (coords - np.asarray(offset, dtype=np.int64)).astype(dtype)


def smooth_local_block(own: int, resp: list, coords: list, shifts: list, core_shape: tuple, radius: int,
                       offsets: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Smoothed responsibilities of one block's rows from its rows and its neighbours'.

    Parameters
    ----------
    own : which entry of ``resp``/``coords`` is the block itself
    resp : list of (n_i, K) responsibilities of the block and its neighbours
    coords : list of (n_i, ndim) int grid indices of those rows, each relative to its own block
    shifts : list of (ndim,) int, each neighbour's offset minus this block's
    core_shape : the block's shape; radius : the stencil's reach in voxels
    offsets : (n_offsets, ndim) int stencil offsets; weights : (n_offsets,)

    Returns
    -------
    ndarray of shape (n_own, K), float64: sum_i w p_i / sum_i w over the kept voxels i in
    the support of each row (every row is its own neighbour, so the denominator is > 0)
    """
    k = resp[own].shape[1]
    padded = tuple(int(s) + 2 * radius for s in core_shape)
    dense = np.zeros((k + 1,) + padded)
    for p, c, shift in zip(resp, coords, shifts):
        g = np.asarray(c, dtype=np.int64) + np.asarray(shift, dtype=np.int64) + radius
        inside = np.all((g >= 0) & (g < np.asarray(padded)), axis=1)
        idx = tuple(g[inside].T)
        dense[(slice(0, k),) + idx] = np.asarray(p, dtype=np.float64)[inside].T
        dense[(k,) + idx] = 1.0
    out = np.zeros((k + 1,) + tuple(int(s) for s in core_shape))
    for off, w in zip(offsets, weights):
        window = tuple(slice(radius + int(o), radius + int(o) + int(s)) for o, s in zip(off, core_shape))
        out += w * dense[(slice(None),) + window]
    idx = tuple(np.asarray(coords[own], dtype=np.int64).T)
    values = out[(slice(None),) + idx]  # (K + 1, n_own)
    return (values[:k] / values[k]).T


def fold_block(resp: np.ndarray, cell_index: np.ndarray, n_cells: int) -> np.ndarray:
    """(K + 1, n_cells): each responsibility column and the row count summed per unit-cell position."""
    resp = np.asarray(resp, dtype=np.float64)
    folded = np.empty((resp.shape[1] + 1, n_cells))
    for j in range(resp.shape[1]):
        folded[j] = np.bincount(cell_index, weights=resp[:, j], minlength=n_cells)
    folded[-1] = np.bincount(cell_index, minlength=n_cells)
    return folded


def circular_convolve(folded: np.ndarray, kernel_fft: np.ndarray, cell_shape: tuple) -> np.ndarray:
    """(C, n_cells) per-cell fields circularly convolved with the (symmetric) cell kernel."""
    axes = tuple(range(1, len(cell_shape) + 1))
    fields = folded.reshape((folded.shape[0],) + tuple(cell_shape))
    out = np.fft.irfftn(np.fft.rfftn(fields, axes=axes) * kernel_fft, s=cell_shape, axes=axes)
    return out.reshape(folded.shape[0], -1)


def unfold_block(convolved: np.ndarray, cell_index: np.ndarray) -> np.ndarray:
    """(n, K) smoothed responsibilities of one block's rows from the convolved folds (K + 1, n_cells)."""
    values = convolved[:, cell_index]
    return (values[:-1] / values[-1]).T


def _cell_index(coords: np.ndarray, offset: tuple, cell: tuple) -> np.ndarray:
    """(n,) int32 position in the unit cell of every row (a cell has far fewer than 2**31 voxels)."""
    g = np.asarray(coords, dtype=np.int64) + np.asarray(offset, dtype=np.int64)
    return np.ravel_multi_index((g % np.asarray(cell)).T, cell).astype(np.int32)


def _sum(parts) -> np.ndarray:
    total = parts[0].copy()
    for p in parts[1:]:
        total += p
    return total


class BlockSmoother:
    """XTEC-s smoothing of row blocks that are spatial blocks, as dask tasks.

    Parameters
    ----------
    row_keys : dask array of shape (n_samples,), int64 flat voxel index of every row, one
        chunk per row block (the trajectory store's layout)
    spatial_shape : the grid's shape; spatial_chunks : its chunks (dask style)
    blocks : (n_row_blocks,) index, in :func:`~xtec_flows.chunking.block_regions` order, of the
        spatial block each row block holds (rows of one spatial block only)
    kernel : SmoothingKernel

    The rows' block-relative coordinates are computed once and persisted (int16, 3 per row, and
    for a periodic kernel an int32 cell position: in this process on the threaded scheduler, on
    the workers under a distributed Client).
    """

    def __init__(self, row_keys, spatial_shape: tuple, spatial_chunks: tuple, blocks: list,
                 kernel: SmoothingKernel):
        import dask

        from ..chunking import block_regions

        self.kernel = kernel
        self.spatial_shape = tuple(int(s) for s in spatial_shape)
        regions = list(block_regions(spatial_chunks))
        self.grid = tuple(len(c) for c in spatial_chunks)
        self.blocks = [int(b) for b in blocks]
        self.offsets = [regions[b][1] for b in self.blocks]
        self.shapes = [tuple(r.stop - r.start for r in regions[b][2]) for b in self.blocks]
        keys = row_keys.rechunk((row_keys.chunks[0],)).to_delayed().ravel()
        if len(keys) != len(self.blocks):
            raise ValueError(f"row_keys has {len(keys)} row blocks for {len(self.blocks)} spatial blocks")
        self.coords = list(dask.persist(*[dask.delayed(local_coords)(k, self.spatial_shape, o, b)
                                          for k, o, b in zip(keys, self.offsets, self.shapes)]))
        if kernel.kind == "local":
            self._offsets, self._weights = kernel.local_offsets(len(self.spatial_shape))
            self.radius = int(np.abs(self._offsets).max()) if self._offsets.size else 0
            self.neighbours = self._neighbours(spatial_chunks)
        else:
            cell = tuple(int(c) for c in kernel.unit_cell)
            if len(cell) != len(self.spatial_shape):
                raise ValueError(f"unit_cell has {len(cell)} entries but the grid has {len(self.spatial_shape)} "
                                 "spatial dims")
            self.cell = cell
            self.n_cells = math.prod(cell)
            self._kernel_fft = np.fft.rfftn(kernel.periodic_kernel(), axes=tuple(range(len(cell))))
            self.cell_index = list(dask.persist(*[dask.delayed(_cell_index)(c, o, cell)
                                                  for c, o in zip(self.coords, self.offsets)]))

    def _neighbours(self, spatial_chunks) -> list:
        """Per row block, the row blocks (itself included) whose voxels lie within the stencil's reach."""
        edges = [np.cumsum((0,) + tuple(c)) for c in spatial_chunks]
        position = {b: i for i, b in enumerate(self.blocks)}
        out = []
        for b, offset, shape in zip(self.blocks, self.offsets, self.shapes):
            ranges = []
            for a, (o, s) in enumerate(zip(offset, shape)):
                lo = int(np.searchsorted(edges[a], o - self.radius, side="right")) - 1
                hi = int(np.searchsorted(edges[a], o + s + self.radius, side="left"))
                ranges.append(range(max(lo, 0), min(hi, self.grid[a])))
            flat = (int(np.ravel_multi_index(idx, self.grid)) for idx in itertools.product(*ranges))
            out.append([position[f] for f in flat if f in position])
        return out

    def smooth(self, resp: list) -> list:
        """Smoothed responsibilities, ``kernel.iterations`` times, as delayed (n_i, K) per row block.

        resp : list of delayed (or numpy) (n_i, K) responsibilities, one per row block
        """
        import dask

        for _ in range(self.kernel.iterations):
            if self.kernel.kind == "local":
                resp = [
                    dask.delayed(smooth_local_block)(
                        near.index(i), [resp[j] for j in near], [self.coords[j] for j in near],
                        [tuple(np.subtract(self.offsets[j], self.offsets[i])) for j in near], self.shapes[i],
                        self.radius, self._offsets, self._weights)
                    for i, near in enumerate(self.neighbours)
                ]
            else:
                folds = [dask.delayed(fold_block)(r, c, self.n_cells) for r, c in zip(resp, self.cell_index)]
                convolved = dask.delayed(circular_convolve)(dask.delayed(_sum)(folds), self._kernel_fft, self.cell)
                resp = [dask.delayed(unfold_block)(convolved, c) for c in self.cell_index]
        return resp
