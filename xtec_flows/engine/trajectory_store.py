"""The thresholded voxels' trajectories where the first pass left them: row blocks on local disk.

The first read of the input keeps, per spatial block, the trajectories of the voxels above a
provisional cut. Rather than send them to the calling process (0.1 KB per kept voxel at 24
temperatures, memory that grows with the data), each block task writes its rows into a scratch
directory, one file triple per block (under a distributed Client without a shared scratch
directory, the same triple stays in the memory of the worker that read the block)::

    b<i>.traj.npy  (n_i, T) float32   raw intensities
    b<i>.flat.npy  (n_i,)   int64     C-order flat index of each voxel, ascending within the block
    b<i>.log.npy   (n_i,)   float64   log <I>_T, compared with the final cut on every read
    b<i>.features_<rescale>.npy  (m_i, T) float32  the rows above the final cut, rescaled
                                       (written once, before the fit)
    b<i>.peak.npy  (m_i,)   int64     mode "peaks": the connected peak (1..n_peaks) of each of
                                       those rows (written once, while the provisional labels exist)

``i`` is the block's position in :func:`xtec_flows.chunking.block_regions` order. Plain .npy
files, not zarr arrays: each is written once and read whole, and opening one costs 0.3 ms
against 2-3 ms for a zarr array's metadata, once per block and EM iteration. After the threshold,
:class:`ChunkedTrajectories` presents the rows above the final cut as dask arrays with one row
chunk per non-empty spatial block, so the mixture fit reads them block by block (each EM
iteration a reduction of per-block sufficient statistics, see
:func:`xtec_flows.numerics.mixture.fit_mixture`) and the labels are written block by block from
the same row layout. Memory is a few blocks, whatever the number of kept voxels.

The directory is temporary (under the run's ``scratch`` directory when one is given);
:meth:`ChunkedTrajectories.close` removes it, and the engine closes it after success, failure
and KeyboardInterrupt alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np

from ..numerics import peaks
from ..numerics.rescale import rescale

_FIELDS = {"traj": np.float32, "flat": np.int64, "log": np.float64}


def open_candidate_directory(scratch=None) -> str:
    """A new, empty scratch directory on local disk (under ``scratch`` when given)."""
    return tempfile.mkdtemp(prefix="xtec-flows-trajectories-", dir=None if scratch is None else str(scratch))


def _path(directory: str, block: int, name: str) -> str:
    return os.path.join(directory, f"b{block}.{name}.npy")


def write_candidates(directory: str, block: int, flat: np.ndarray, traj: np.ndarray, log: np.ndarray) -> int:
    """Store one block's candidate rows (flat (n,), traj (n, T), log (n,)); returns n."""
    n = int(flat.size)
    if n == 0:
        return 0
    for name, values in (("flat", flat), ("traj", traj), ("log", log)):
        np.save(_path(directory, block, name), np.ascontiguousarray(values, dtype=_FIELDS[name]))
    return n


class ScratchRows:
    """One block's rows on disk: ``rows["traj"]`` reads ``b<i>.traj.npy``."""

    def __init__(self, directory: str, block: int):
        self.directory, self.block = directory, block

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(_path(self.directory, self.block, name))

    def __setitem__(self, name: str, values: np.ndarray) -> None:
        np.save(_path(self.directory, self.block, name), values)


def split_rows(summary: dict) -> tuple[dict, dict]:
    """(the first pass's block summary without its rows, plus ``n_candidates``; the rows
    {"flat", "traj", "log"}): the rows stay where the task ran (worker memory)."""
    rows = {name: summary.pop(name) for name in _FIELDS}
    summary["n_candidates"] = int(rows["flat"].size)
    return summary, rows


def _kept_count(rows, log_cutoff: float) -> int:
    return int(np.count_nonzero(rows["log"] > log_cutoff))


def kept_rows(rows, name: str, log_cutoff: float) -> np.ndarray:
    """Field ``name`` of one block's rows above the cut (``rows``: ScratchRows or the dict)."""
    return rows[name][rows["log"] > log_cutoff]


def _kept_features(rows, log_cutoff: float, method: str) -> np.ndarray:
    return rescale(kept_rows(rows, "traj", log_cutoff), method).astype(np.float32)


def _store_features(rows: ScratchRows, log_cutoff: float, method: str) -> None:
    rows[f"features_{method}"] = _kept_features(rows, log_cutoff, method)


def _stored(rows: ScratchRows, name: str) -> np.ndarray:
    return rows[name]


def _block_peak_ids(rows, log_cutoff: float, provisional: np.ndarray, offset: tuple, spatial_shape: tuple,
                    mapping: np.ndarray) -> np.ndarray:
    """(m,) int64 peak of each kept row of one block: its provisional label (``provisional``, the
    block's labels, at its voxel) through ``mapping`` (provisional -> final label)."""
    flat = kept_rows(rows, "flat", log_cutoff)
    local = tuple(c - o for c, o in zip(np.unravel_index(flat, spatial_shape), offset))
    return mapping[provisional[local]].astype(np.int64)


def _store_peak_ids(rows: ScratchRows, *args) -> None:
    rows["peak"] = _block_peak_ids(rows, *args)


def _with_peak_ids(rows: dict, *args) -> dict:
    return {**rows, "peak": _block_peak_ids(rows, *args)}


def _block_peak_sums(rows, log_cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(peaks present (u,), their trajectory sums (u, T) float64, their voxel counts (u,)) of one block."""
    present, inverse = np.unique(rows["peak"], return_inverse=True)
    return (present, *peaks.peak_sums(kept_rows(rows, "traj", log_cutoff), inverse + 1, present.size))


def _labels_of_peaks(rows, peak_labels: np.ndarray) -> np.ndarray:
    return peak_labels[rows["peak"] - 1]


@dataclass
class ChunkedTrajectories:
    """The rows above ``log_cutoff``, in row blocks, one per spatial block, where they were written.

    sources : per spatial block with candidates, its rows: a :class:`ScratchRows` (scratch
        files on disk) or a persisted dask object holding the dict {"flat", "traj", "log"} in a
        distributed worker's memory
    blocks : indices (block_regions order) of the spatial blocks with at least one kept row
    counts : (len(blocks),) kept rows of each of them; rows are in block order, and ascending
        flat index within a block
    directory : the scratch directory to remove, or None (worker memory)
    """

    sources: dict
    log_cutoff: float
    n_temperatures: int
    directory: str | None = None
    blocks: list = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _features: dict = field(default_factory=dict, repr=False)

    @classmethod
    def after_cut(cls, sources: dict, log_cutoff: float, n_temperatures: int,
                  directory: str | None = None) -> "ChunkedTrajectories":
        """Count the rows above the final cut in every block of ``sources`` ({block: rows}, blocks
        with candidates only); reads only ``log``, where the rows are."""
        order = sorted(sources)
        counts = dask.compute(*[dask.delayed(_kept_count)(sources[b], log_cutoff) for b in order])
        kept = [(b, n) for b, n in zip(order, counts) if n]
        return cls({b: sources[b] for b, _ in kept}, float(log_cutoff), int(n_temperatures), directory,
                   [b for b, _ in kept], np.asarray([n for _, n in kept], dtype=np.int64))

    @property
    def n_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def row_starts(self) -> np.ndarray:
        """(len(blocks) + 1,) first row of each block, and the total."""
        return np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def _stack(self, func, extra: tuple, shape_of, dtype) -> da.Array:
        parts = [da.from_delayed(dask.delayed(func)(self.sources[b], *extra), shape_of(int(n)), dtype=dtype)
                 for b, n in zip(self.blocks, self.counts)]
        if not parts:
            return da.zeros(shape_of(0), dtype=dtype)
        return da.concatenate(parts, axis=0)

    def features(self, method: str) -> da.Array:
        """(n_samples, T) float32 rescaled trajectories, one row chunk per block.

        Computed once, by one pass over the candidates, and kept where the rows are (beside them
        on disk, or persisted in the workers' memory): every EM iteration then reads only the
        kept rows' features, not the candidates, their log-means and the rescaling again."""
        if method not in self._features:
            shape_of = lambda n: (n, self.n_temperatures)  # noqa: E731
            if self.directory is not None:
                dask.compute(*[dask.delayed(_store_features)(self.sources[b], self.log_cutoff, method)
                               for b in self.blocks])
                self._features[method] = self._stack(_stored, (f"features_{method}",), shape_of, np.float32)
            else:
                self._features[method] = self._stack(_kept_features, (self.log_cutoff, method), shape_of,
                                                     np.float32).persist()
        return self._features[method]

    def raw(self) -> da.Array:
        """(n_samples, T) float32 raw intensities, lazily."""
        return self._stack(kept_rows, ("traj", self.log_cutoff), lambda n: (n, self.n_temperatures), np.float32)

    def flat(self) -> da.Array:
        """(n_samples,) int64 flat voxel indices, lazily."""
        return self._stack(kept_rows, ("flat", self.log_cutoff), lambda n: (n,), np.int64)

    def attach_peaks(self, provisional, mapping: np.ndarray, regions: list, spatial_shape: tuple) -> None:
        """Mode "peaks": record the peak of every kept row beside the rows (file ``peak`` on disk,
        or in the persisted rows on the workers), from the provisional labels of the connected
        components (``provisional``: a dask array of the spatial shape, chunked as the blocks) and
        their ``mapping`` to final labels; ``regions``: :func:`~xtec_flows.chunking.block_regions`."""
        shared = dask.delayed(np.asarray(mapping))  # one key: sent to a worker once, not with every task
        args = {b: (self.log_cutoff, provisional[regions[b][2]], regions[b][1], tuple(spatial_shape), shared)
                for b in self.blocks}
        if self.directory is not None:
            dask.compute(*[dask.delayed(_store_peak_ids)(self.sources[b], *args[b]) for b in self.blocks])
        else:
            updated = dask.persist(*[dask.delayed(_with_peak_ids)(self.sources[b], *args[b]) for b in self.blocks])
            self.sources = dict(zip(self.blocks, updated))

    def peak_means(self, n_peaks: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean raw trajectory (n_peaks, T) float64, voxels (n_peaks,)) of every peak, summed over
        the blocks where the rows are (after :meth:`attach_peaks`): only the peaks come back."""
        sums = np.zeros((int(n_peaks), self.n_temperatures))
        sizes = np.zeros(int(n_peaks), dtype=np.int64)
        for present, block_sums, block_sizes in dask.compute(
                *[dask.delayed(_block_peak_sums)(self.sources[b], self.log_cutoff) for b in self.blocks]):
            sums[present - 1] += block_sums
            sizes[present - 1] += block_sizes
        return peaks.means_of_sums(sums, sizes), sizes

    def labels_of_peaks(self, peak_labels: np.ndarray) -> da.Array:
        """(n_samples,) int8 label of every kept row from the label of its peak ((n_peaks,)), lazily,
        one chunk per block: computed where the rows are, never gathered."""
        shared = dask.delayed(np.asarray(peak_labels, dtype=np.int8))
        return self._stack(_labels_of_peaks, (shared,), lambda n: (n,), np.int8)

    def peak_ids(self) -> da.Array:
        """(n_samples,) int64 peak of every kept row, lazily (after :meth:`attach_peaks`)."""
        return self._stack(_stored, ("peak",), lambda n: (n,), np.int64)

    def to_memory(self, with_peaks: bool = False) -> tuple:
        """(flat (n,), raw (n, T)[, peak ids (n,)]) of every kept row, sorted by flat index, as
        numpy: the in-memory layout of :class:`~xtec_flows.engine.trajectories.Trajectories`.
        Block order is not C order across blocks, so the rows are sorted here."""
        parts = dask.compute(self.flat(), self.raw(), *([self.peak_ids()] if with_peaks else []))
        order = np.argsort(parts[0], kind="stable")
        return tuple(p[order] for p in parts)

    def close(self) -> None:
        """Remove the scratch directory, or let the workers release the rows (idempotent)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.sources = {}
        self._features = {}
