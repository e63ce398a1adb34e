"""Peak averaging: connected components of the thresholded mask and their mean trajectories.

XTEC's peak mode clusters one averaged trajectory per connected peak instead of
every voxel, then gives every voxel of a peak its peak's label. Components use
full connectivity (faces, edges and corners).

For a volume processed in chunks, components are found in four steps (as in
dask-image): label each block with provisional labels offset to be globally
unique; look at the two-voxel-thick slab across every chunk boundary to find
provisional labels that touch; join them with a graph connected-components
pass; relabel. :func:`resolve_labels` numbers the final components in the order
of their first voxel in C order, exactly as ``scipy.ndimage.label`` does on the
whole mask, so chunked and in-memory results are identical.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def full_connectivity(ndim: int) -> np.ndarray:
    """Structuring element connecting voxels that share a face, edge or corner."""
    return np.ones((3,) * ndim, dtype=bool)


def label_mask(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a boolean array (full connectivity).

    Returns
    -------
    labels : ndarray of shape mask.shape, int32; 0 = background, 1..n components
    n : int
    """
    labels, n = ndimage.label(mask, structure=full_connectivity(mask.ndim), output=np.int32)
    return labels, int(n)


def slab_edges(slab_labels: np.ndarray) -> np.ndarray:
    """Pairs of provisional labels that touch across a chunk boundary.

    Parameters
    ----------
    slab_labels : ndarray of shape (2, *rest), int
        The last plane before and the first plane after a boundary (along the
        first axis), holding globally unique provisional labels (0 = empty).

    Returns
    -------
    edges : ndarray of shape (n_edges, 2), int64
    """
    before, after = slab_labels[0], slab_labels[1]
    if not before.any() or not after.any():
        return np.empty((0, 2), dtype=np.int64)
    rest = before.ndim
    pairs = []
    # A voxel touches the voxel across the face and its diagonal neighbours:
    # compare the plane after against every shift of the plane before by -1..1.
    for shift in np.ndindex(*((3,) * rest)):
        d = np.asarray(shift) - 1
        src = tuple(slice(max(0, -x), before.shape[i] - max(0, x)) for i, x in enumerate(d))
        dst = tuple(slice(max(0, x), after.shape[i] - max(0, -x)) for i, x in enumerate(d))
        a, b = before[src], after[dst]
        both = (a > 0) & (b > 0)
        if both.any():
            pairs.append(np.stack([a[both], b[both]], axis=1))
    if not pairs:
        return np.empty((0, 2), dtype=np.int64)
    return np.unique(np.concatenate(pairs).astype(np.int64), axis=0)


def resolve_labels(n_provisional: int, edges: np.ndarray, first_flat: np.ndarray) -> tuple[np.ndarray, int]:
    """Merge touching provisional labels and number the results canonically.

    Parameters
    ----------
    n_provisional : int
        Provisional labels are 1..n_provisional (0 is background).
    edges : ndarray of shape (n_edges, 2)
    first_flat : ndarray of shape (n_provisional + 1,)
        Flat (C-order) index of the first voxel of each provisional label
        (entry 0 unused).

    Returns
    -------
    mapping : ndarray of shape (n_provisional + 1,), int32; mapping[0] == 0
    n_final : int
    """
    size = n_provisional + 1
    if edges.size:
        graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(size, size))
    else:
        graph = coo_matrix((size, size))
    n_comp, comp = connected_components(graph, directed=False)
    # First voxel of every merged component, then order components by it.
    first = np.full(n_comp, np.iinfo(np.int64).max)
    np.minimum.at(first, comp[1:], first_flat[1:])
    background = comp[0]
    order = np.argsort(first, kind="stable")
    order = order[order != background]
    rank = np.zeros(n_comp, dtype=np.int32)
    rank[order] = np.arange(1, order.size + 1, dtype=np.int32)
    mapping = rank[comp]
    mapping[0] = 0
    return mapping, int(order.size)


def first_voxel_per_label(labels: np.ndarray, n: int, offset_flat: np.ndarray) -> np.ndarray:
    """Smallest global flat index of each label 1..n in a block.

    Parameters
    ----------
    labels : ndarray of shape block, int (0 background, 1..n)
    offset_flat : ndarray of shape block, int64, global flat index of each voxel
    Returns
    -------
    first : ndarray of shape (n,)
    """
    first = np.full(n + 1, np.iinfo(np.int64).max)
    sel = labels > 0
    np.minimum.at(first, labels[sel], offset_flat[sel])
    return first[1:]


def peak_sums(trajectories: np.ndarray, peak_ids: np.ndarray, n_peaks: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed raw trajectory of each peak (they add over blocks of rows).

    Parameters
    ----------
    trajectories : ndarray of shape (n_samples, T)
    peak_ids : ndarray of shape (n_samples,), values 1..n_peaks
    Returns
    -------
    sums : ndarray of shape (n_peaks, T), float64
    sizes : ndarray of shape (n_peaks,), voxels per peak
    """
    idx = np.asarray(peak_ids, dtype=np.int64) - 1
    sizes = np.bincount(idx, minlength=n_peaks)
    sums = np.empty((n_peaks, trajectories.shape[1]))
    # One bincount per temperature: far faster than np.add.at over many rows,
    # and no O(n_peaks x volume) membership tests.
    for t in range(trajectories.shape[1]):
        sums[:, t] = np.bincount(idx, weights=trajectories[:, t], minlength=n_peaks)
    return sums, sizes


def peak_means(trajectories: np.ndarray, peak_ids: np.ndarray, n_peaks: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean raw trajectory of each peak, (n_peaks, T), and its voxels, (n_peaks,); see :func:`peak_sums`."""
    sums, sizes = peak_sums(trajectories, peak_ids, n_peaks)
    return means_of_sums(sums, sizes), sizes


def means_of_sums(sums: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(n_peaks, T) means from (n_peaks, T) sums and (n_peaks,) sizes (an empty peak's mean is 0)."""
    return sums / np.maximum(sizes, 1)[:, None]
