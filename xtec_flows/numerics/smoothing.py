"""XTEC-s label smoothing as a normalised, masked convolution on the voxel grid.

Between the E and M steps, XTEC-s replaces every thresholded voxel's cluster
responsibilities by a kernel-weighted average over the thresholded voxels
around it::

    p'_j = sum_i w(q_i - q_j) p_i / sum_i w(q_i - q_j)      (i, j thresholded voxels)

which is the reference implementation's row-normalised Markov matrix applied
to the responsibilities. Written as a masked convolution, numerator and
denominator are the kernel convolved with (mask * p) and with mask.

Two kernels, on integer voxel offsets Δ:

- ``local``: w = exp(-Σ Δ² / L²), cut where w <= zero_cutoff. The support is a
  ball of radius L·sqrt(-ln zero_cutoff), so the convolution is a stencil of a
  few dozen offsets evaluated on the thresholded voxels only: O(n_voxels ·
  n_offsets), never an N x N matrix loop.
- ``periodic``: w = exp(-Σ sin²(π Δ / N) / L²), N the unit cell in voxels. The
  kernel repeats under lattice translations, so the sum over all voxels folds
  onto one unit cell: accumulate (mask * p) and mask per cell position, apply a
  circular convolution on the cell torus, and read the result back at each
  voxel's cell position. O(n_voxels + cell size · log).

With ``weights="uniform"`` every offset inside the support weighs 1 (the
reference's ``uniform_similarity=True``); ``"gaussian"`` keeps w itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

KERNELS = ("local", "periodic")
WEIGHTINGS = ("uniform", "gaussian")


@dataclass(frozen=True)
class SmoothingKernel:
    """A label-smoothing kernel on the voxel grid.

    Parameters
    ----------
    kind : {"local", "periodic"}
    length_scale : float
        L, in voxels for ``local`` and dimensionless (relative to the unit cell
        through sin(π Δ / N)) for ``periodic``.
    zero_cutoff : float in (0, 1)
        Kernel values <= this are treated as 0 (sets the support).
    weights : {"uniform", "gaussian"}
    unit_cell : tuple of int, periodic only
        Voxels per reciprocal-lattice unit along each spatial axis.
    iterations : int
        How many times the smoothing is applied between an E and an M step.
    """

    kind: str = "local"
    length_scale: float = 1.0
    zero_cutoff: float = 1e-2
    weights: str = "uniform"
    unit_cell: tuple = field(default=())
    iterations: int = 1

    def __post_init__(self):
        if self.kind not in KERNELS:
            raise ValueError(f"smoothing kind must be one of {KERNELS}; got {self.kind!r}")
        if self.weights not in WEIGHTINGS:
            raise ValueError(f"smoothing weights must be one of {WEIGHTINGS}; got {self.weights!r}")
        if not self.length_scale > 0:
            raise ValueError(f"smoothing length_scale must be > 0; got {self.length_scale!r}")
        if not 0 < self.zero_cutoff < 1:
            raise ValueError(f"smoothing zero_cutoff must be in (0, 1); got {self.zero_cutoff!r}")
        if int(self.iterations) != self.iterations or self.iterations < 1:
            raise ValueError(f"smoothing iterations must be an integer >= 1; got {self.iterations!r}")
        if self.kind == "periodic":
            cell = tuple(self.unit_cell)
            if not cell or any(int(c) != c or c < 1 for c in cell):
                raise ValueError(
                    "a periodic smoothing kernel needs unit_cell: the number of voxels per "
                    f"reciprocal-lattice unit along each spatial axis (positive integers); got {self.unit_cell!r}"
                )
            object.__setattr__(self, "unit_cell", tuple(int(c) for c in cell))

    @property
    def radius(self) -> float:
        """Support radius in voxels of the local kernel: exp(-r²/L²) = zero_cutoff."""
        return self.length_scale * math.sqrt(-math.log(self.zero_cutoff))

    def _weigh(self, w: np.ndarray) -> np.ndarray:
        return np.ones_like(w) if self.weights == "uniform" else w

    def local_offsets(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """Stencil of the local kernel.

        Returns
        -------
        offsets : ndarray of shape (n_offsets, ndim), int
        weights : ndarray of shape (n_offsets,)
        """
        r = int(math.floor(self.radius)) + 1
        axes = np.meshgrid(*([np.arange(-r, r + 1)] * ndim), indexing="ij")
        offsets = np.stack([a.ravel() for a in axes], axis=1)
        w = np.exp(-(offsets**2).sum(axis=1) / self.length_scale**2)
        keep = w > self.zero_cutoff
        return offsets[keep], self._weigh(w[keep])

    def periodic_kernel(self) -> np.ndarray:
        """Kernel on the unit-cell torus, shape ``unit_cell``, index = Δ mod N."""
        grids = np.meshgrid(*[np.arange(n) for n in self.unit_cell], indexing="ij")
        s = sum(np.sin(np.pi * g / n) ** 2 for g, n in zip(grids, self.unit_cell))
        w = np.exp(-s / self.length_scale**2)
        return np.where(w > self.zero_cutoff, self._weigh(w), 0.0)


def local_smoothing_operator(
    coords: np.ndarray, shape: tuple, kernel: SmoothingKernel, batch: int = 1 << 18
) -> sp.csr_matrix:
    """Row-normalised sparse operator of the local kernel among the given voxels.

    Neighbours are found per stencil offset by a sorted search of flat voxel
    indices, so the cost is O(n · n_offsets · log n) and memory O(nnz).

    Parameters
    ----------
    coords : ndarray of shape (n_samples, ndim), int
        Grid indices of the thresholded voxels.
    shape : tuple of int
        Spatial shape of the grid.

    Returns
    -------
    operator : csr_matrix of shape (n_samples, n_samples); ``operator @ resp`` smooths.
    """
    coords = np.asarray(coords, dtype=np.int64)
    n, ndim = coords.shape
    shape = tuple(int(s) for s in shape)
    flat = np.ravel_multi_index(coords.T, shape)
    order = np.argsort(flat, kind="stable")
    sorted_flat = flat[order]
    offsets, weights = kernel.local_offsets(ndim)
    bounds = np.asarray(shape)
    # Built a batch of rows at a time and stacked: the (row, col, value)
    # temporaries of one batch are freed before the next.
    pieces = []
    for start in range(0, n, batch):
        c = coords[start : start + batch]
        rows, cols, vals = [], [], []
        for off, w in zip(offsets, weights):
            target = c + off
            inside = np.all((target >= 0) & (target < bounds), axis=1)
            local_rows = np.nonzero(inside)[0]
            tflat = np.ravel_multi_index(target[inside].T, shape) if local_rows.size else np.empty(0, np.int64)
            pos = np.minimum(np.searchsorted(sorted_flat, tflat), n - 1)
            hit = sorted_flat[pos] == tflat
            rows.append(local_rows[hit].astype(np.int32))
            cols.append(order[pos[hit]].astype(np.int32))
            vals.append(np.full(int(hit.sum()), w))
        block = sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(c.shape[0], n)
        )
        # Every voxel is its own neighbour (offset 0), so no row sum is zero.
        row_sum = np.asarray(block.sum(axis=1)).ravel()
        pieces.append(sp.diags(1.0 / row_sum) @ block)
    return sp.vstack(pieces, format="csr")


class LabelSmoother:
    """Callable ``resp (n_samples, K) -> smoothed resp (n_samples, K)``.

    Built once per fit from the voxel coordinates; each call applies the
    normalised masked convolution ``kernel.iterations`` times.
    """

    def __init__(self, coords: np.ndarray, shape: tuple, kernel: SmoothingKernel):
        self.kernel = kernel
        coords = np.asarray(coords, dtype=np.int64)
        if kernel.kind == "local":
            self._operator = local_smoothing_operator(coords, shape, kernel)
        else:
            cell = np.asarray(kernel.unit_cell)
            if cell.size != coords.shape[1]:
                raise ValueError(
                    f"unit_cell has {cell.size} entries but the grid has {coords.shape[1]} spatial dims"
                )
            self._cell_shape = tuple(int(c) for c in cell)
            self._cell_index = np.ravel_multi_index((coords % cell).T, self._cell_shape)
            self._kernel_fft = np.fft.rfftn(kernel.periodic_kernel(), axes=tuple(range(cell.size)))
            counts = np.bincount(self._cell_index, minlength=int(np.prod(cell))).astype(np.float64)
            self._denominator = self._circular(counts)[self._cell_index]

    def _circular(self, per_cell: np.ndarray) -> np.ndarray:
        """Circular convolution of a per-cell field with the (symmetric) kernel; flat (n_cells,)."""
        field = per_cell.reshape(self._cell_shape)
        axes = tuple(range(field.ndim))
        out = np.fft.irfftn(np.fft.rfftn(field, axes=axes) * self._kernel_fft, s=self._cell_shape, axes=axes)
        return out.ravel()

    def __call__(self, resp: np.ndarray) -> np.ndarray:
        for _ in range(self.kernel.iterations):
            if self.kernel.kind == "local":
                resp = np.asarray(self._operator @ resp)
            else:
                n_cells = int(np.prod(self._cell_shape))
                out = np.empty_like(resp)
                for k in range(resp.shape[1]):
                    per_cell = np.bincount(self._cell_index, weights=resp[:, k], minlength=n_cells)
                    out[:, k] = self._circular(per_cell)[self._cell_index]
                resp = out / self._denominator[:, None]
        return resp
