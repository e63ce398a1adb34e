"""Statistics -> threshold -> trajectories: the streaming passes over the input, in order."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
import math
import time
from dataclasses import dataclass, field

import dask
import dask.array as da
import numpy as np

from .. import validation
from ..chunking import block_regions
from ..numerics import peaks, threshold
from ..numerics.mixture import label_counts
from ..numerics.blocks import block_counts, gather_block, log_valid
from .components import chunked_components
from .first_pass import block_first_pass, provisional_cut
from .histogram import histogram_chunked
from .params import ClusterParams
from .store import (DEFAULT_LIMITS, StreamingLimits, as_dask, compute, distributed_client_active, intermediate,
                    scratch_store, tree_sum, values_at)
from .trajectory_store import ChunkedTrajectories, ScratchRows, open_candidate_directory, split_rows

log = logging.getLogger(__name__)


@dataclass
class Trajectories:
    """Output of the streaming passes: what the fit needs.

    In memory (``chunked`` None):

    flat : (n_samples,) int64, C-order flat index of each thresholded voxel, ascending
    raw : (n_samples, T) float32, their intensities

    Or, for inputs larger than ``StreamingLimits.cache_all_bytes``, left where the first pass
    wrote them: ``chunked`` (:class:`~.trajectory_store.ChunkedTrajectories`, rows in block
    order), ``flat`` and ``raw`` None until :meth:`to_memory`. Call :meth:`close` when done.

    Mode "peaks" only:

    peak_ids : (n_samples,) int32, peak of each voxel (1..n_peaks), in memory only (chunked rows
        keep theirs beside them)
    peak_raw : (n_peaks, T) float64 mean raw trajectory of each peak; peak_sizes : (n_peaks,) its voxels
    histogram : threshold histogram of log(<I>_T)
    cutoff : the threshold result
    """

    spatial_shape: tuple
    spatial_chunks: tuple
    temperatures: np.ndarray
    flat: np.ndarray
    raw: np.ndarray
    histogram: threshold.LogMeanHistogram
    cutoff: threshold.Cutoff
    n_valid: int
    n_masked_nonfinite: int
    peak_ids: np.ndarray | None = None
    n_peaks: int = 0
    peak_raw: np.ndarray | None = None
    peak_sizes: np.ndarray | None = None
    n_reads: int = 1
    timings: dict = field(default_factory=dict)
    chunked: ChunkedTrajectories | None = None

    @property
    def n_samples(self) -> int:
        return self.chunked.n_samples if self.chunked is not None else int(self.flat.size)

    @property
    def row_keys(self):
        """(n_samples,) int64 flat index of each row, numpy or (chunked) dask: what identifies a row."""
        return self.chunked.flat() if self.chunked is not None else self.flat

    def voxel_labels(self, row_labels: np.ndarray):
        """(n_samples,) int8 label of every thresholded voxel from the labels of the fit's rows:
        the rows themselves, or in mode "peaks" (``n_peaks`` rows) each voxel's peak's label:
        numpy in memory, a dask array computed where the chunked rows are."""
        if self.peak_sizes is None:
            return row_labels
        if self.chunked is not None:
            return self.chunked.labels_of_peaks(row_labels)
        return row_labels[self.peak_ids - 1]

    def voxel_counts(self, row_labels: np.ndarray, n_labels: int) -> np.ndarray:
        """(n_labels,) int64 thresholded voxels per label, from the labels of the fit's rows (in mode
        "peaks", each peak's label counts its voxels); dask labels are counted block by block."""
        if self.peak_sizes is None:
            return label_counts(row_labels, n_labels)
        return np.bincount(row_labels, weights=self.peak_sizes, minlength=n_labels).astype(np.int64)

    def to_memory(self) -> "Trajectories":
        """Bring chunked rows into memory, sorted by voxel (the in-memory layout), and remove
        their scratch (for a caller that wants every row at once; the engine never does)."""
        if self.chunked is not None:
            parts = self.chunked.to_memory(with_peaks=self.peak_sizes is not None)
            self.flat, self.raw = parts[:2]
            if self.peak_sizes is not None:
                self.peak_ids = parts[2]
            self.close()
        return self

    def close(self) -> None:
        """Remove the chunked rows' scratch, if any (idempotent)."""
        if self.chunked is not None:
            self.chunked.close()
            self.chunked = None

    @property
    def coords(self) -> np.ndarray:
        """(n_samples, ndim) grid indices."""
        return np.stack(np.unravel_index(self.flat, self.spatial_shape), axis=1)


def gather_trajectories(
    volume,
    temperatures,
    params: ClusterParams,
    *,
    chunks: tuple | None = None,
    scratch=None,
    progress: bool = False,
    limits: StreamingLimits = DEFAULT_LIMITS,
) -> Trajectories:
    """Statistics, threshold and trajectory gathering: usually one read of the input.

    The first pass computes <I>_T of every voxel (into a scratch array) and
    keeps the trajectories above a provisional cut; the threshold histogram is
    then built from the scratch array (1/T of the input), and the kept
    trajectories are filtered to the final cut. Only if the final cut falls
    below the provisional one is the input read a second time.

    Inputs up to ``limits.cache_all_bytes`` come back in memory. Larger ones keep a generous
    candidate set where each block was read (.npy row blocks in a scratch directory on local disk, or the
    workers' memory under a distributed Client without ``scratch``): the result's ``chunked``
    presents the rows above the final cut block by block, and nothing of them is held here
    until :meth:`Trajectories.to_memory`. The caller closes the result (:meth:`Trajectories.close`).

    Parameters
    ----------
    volume : numpy, zarr or dask array of shape (T, *spatial), 1, 2 or 3 spatial dims
    temperatures : array-like of shape (T,)
    chunks : spatial block shape (default: from the input's chunks, or 64^3-ish; merged into larger
        blocks under a distributed Client, see :func:`~.store.as_dask`)
    scratch : directory for intermediate arrays (default: memory when small, else a temp dir)
    limits : memory against reads (:class:`~xtec_flows.engine.store.StreamingLimits`); never the labels

    Returns
    -------
    Trajectories
    """
    shape = validation.check_volume(volume)
    temps = validation.check_temperatures(temperatures, shape[0], params.ordering)
    timings = {}
    on_cluster = distributed_client_active()
    x = as_dask(volume, chunks, limits, on_cluster=on_cluster)
    spatial_shape = shape[1:]
    spatial_chunks = x.chunks[1:]
    regular = tuple(c[0] for c in spatial_chunks)
    regions = list(block_regions(spatial_chunks))
    store, tmp = scratch_store(4 * math.prod(spatial_shape), scratch, limits)
    directory = chunked = None
    # The passes run on a thread pool of our own, not dask's shared one, so that on failure or
    # Ctrl-C the tasks still writing scratch can be waited for before the scratch is removed
    # (else a block written after the removal leaves a directory behind).
    pool = None if on_cluster else ThreadPoolExecutor(
        dask.config.get("num_workers", None) or os.cpu_count() or 1)
    passes = dask.config.set(pool=pool) if pool is not None else contextlib.nullcontext()
    with passes:
        try:
            t0 = time.perf_counter()
            # Kept rows stay where they were read, in blocks (trajectory_store): on local disk, or
            # under a distributed Client without a shared scratch directory in the workers' memory.
            large = x.nbytes > limits.cache_all_bytes
            on_disk = store is not None and large
            provisional, fine_edges = provisional_cut(x, params, regions, limits, on_disk=on_disk)
            on_workers = store is None and large and provisional != -math.inf
            if on_disk and provisional != -math.inf:
                directory = open_candidate_directory(scratch)
            xb = x.to_delayed().reshape(x.numblocks[1:])
            first, stat_d, _ = intermediate(
                block_first_pass,
                [(xb[idx], offset, spatial_shape, params.mask, provisional, fine_edges, directory, i)
                 for i, (idx, offset, _) in enumerate(regions)],
                regions, spatial_shape, regular, store, "statistic", np.float32, progress=progress,
                keep_on_workers=split_rows if on_workers else None,
            )
            n_bad = sum(p["n_bad"] for p in first)
            if n_bad and params.nonfinite == "raise":
                where = np.unravel_index(int(da.argmax(~da.isfinite(stat_d).ravel()).compute()), spatial_shape)
                raise ValueError(
                    f"volume holds NaN or Inf in {n_bad} voxel trajectories (first at spatial index "
                    f"{tuple(int(i) for i in where)}); clean the data, or pass nonfinite='mask' "
                    "(CLI: --mask-nonfinite) to leave those voxels unclustered"
                )
            n_valid = sum(p["n_valid"] for p in first)
            if n_valid == 0:
                raise ValueError(
                    "volume has no voxel with positive mean intensity (all zero, negative or masked); "
                    "check that the right dataset was given and that it is not empty"
                )
            lo = min(p["lo"] for p in first)
            hi = max(p["hi"] for p in first)
            whole_blocks = provisional == -math.inf
            if whole_blocks:
                cached_log = np.concatenate([log_valid(p["stat"]) for p in first])
            elif directory is not None or on_workers:
                cached_log = None
            else:
                cached_log = np.concatenate([p.pop("log") for p in first])
                kept = [(p.pop("flat"), p.pop("traj"), None) for p in first]
            timings["statistics"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            if whole_blocks:
                # Every valid voxel is in memory: the histogram comes straight from the values.
                hist = threshold.histogram_of(cached_log) if cached_log.size >= 2 else histogram_chunked(
                    stat_d, n_valid, lo, hi, None, None)
            else:
                fine = sum(p["fine"] for p in first) if fine_edges is not None else None
                if fine is None:
                    fine_edges = np.linspace(lo, hi, 4097)
                    (fine,) = compute(tree_sum([dask.delayed(block_counts)(b, fine_edges)
                                                for b in stat_d.to_delayed().ravel()]))
                hist = histogram_chunked(stat_d, n_valid, lo, hi, fine_edges, fine)
            cutoff = threshold.find_cutoff(hist, params.threshold)
            timings["threshold"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            if whole_blocks:
                gathered = []
                for p, (_, offset, _) in zip(first, regions):
                    gathered.append(gather_block(p.pop("block"), p.pop("stat"), offset, spatial_shape, cutoff.log_cutoff))
                flat, raw, _ = sort_by_voxel(gathered, shape[0])
                n_reads = 1
            elif (directory is not None or on_workers) and (cutoff.log_cutoff >= provisional or provisional < lo):
                sources = {b: (ScratchRows(directory, b) if directory is not None else p["rows"])
                           for b, p in enumerate(first) if p["n_candidates"]}
                chunked = ChunkedTrajectories.after_cut(sources, cutoff.log_cutoff, shape[0], directory)
                flat = raw = None
                n_reads = 1
            elif cutoff.log_cutoff >= provisional:
                flat, raw, _ = sort_by_voxel(kept, shape[0], keep=cached_log > cutoff.log_cutoff)
                n_reads = 1
            else:
                kept = None
                if directory is not None:
                    shutil.rmtree(directory, ignore_errors=True)
                log.info("final cut below the provisional one: reading the trajectories again")
                sb = stat_d.to_delayed()
                tasks = [
                    dask.delayed(gather_block)(xb[idx], sb[idx], offset, spatial_shape, cutoff.log_cutoff)
                    for idx, offset, _ in regions
                ]
                flat, raw, _ = sort_by_voxel(list(compute(*tasks, progress=progress)), shape[0])
                n_reads = 2
            del cached_log, first
            timings["trajectories"] = time.perf_counter() - t0

            peak_ids = peak_raw = peak_sizes = None
            n_peaks = 0
            if params.mode == "peaks" and (chunked.n_samples if chunked is not None else flat.size):
                t0 = time.perf_counter()
                mapping, n_peaks, prov_arr = chunked_components(stat_d, store, spatial_shape, regular, cutoff.log_cutoff)
                if chunked is None:
                    coords = np.unravel_index(flat, spatial_shape)
                    peak_ids = mapping[values_at(prov_arr, coords)]
                    peak_raw, peak_sizes = peaks.peak_means(raw, peak_ids, n_peaks)
                else:
                    # Each block's rows learn their peak where they are, while the provisional
                    # labels (in this pass's scratch) exist; only the peak sums come back.
                    provisional = prov_arr if isinstance(prov_arr, da.Array) else da.from_zarr(prov_arr)
                    chunked.attach_peaks(provisional, mapping, regions, spatial_shape)
                    peak_raw, peak_sizes = chunked.peak_means(n_peaks)
                timings["components"] = time.perf_counter() - t0
        except BaseException:
            # Failure or Ctrl-C: no scratch left behind.
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if tmp is not None:
                tmp.cleanup()
    n_samples = chunked.n_samples if chunked is not None else flat.size
    if n_samples == 0:
        if chunked is not None:
            chunked.close()
        raise ValueError(
            f"no voxel passed the threshold ({params.threshold!r}, cut at <I>_T > "
            f"{math.exp(cutoff.log_cutoff) if math.isfinite(cutoff.log_cutoff) else 0:.4g}); "
            "lower an explicit threshold or use threshold='simple'/'none'"
        )
    return Trajectories(
        spatial_shape=spatial_shape,
        spatial_chunks=spatial_chunks,
        temperatures=temps,
        flat=flat,
        raw=raw,
        histogram=hist,
        cutoff=cutoff,
        n_valid=n_valid,
        n_masked_nonfinite=n_bad,
        peak_ids=peak_ids,
        n_peaks=n_peaks,
        peak_raw=peak_raw,
        peak_sizes=peak_sizes,
        n_reads=n_reads,
        timings=timings,
        chunked=chunked,
    )


def sort_by_voxel(results: list, n_temperatures: int, keep: np.ndarray | None = None):
    """Merge per-block (flat, trajectories, provisional labels) into C order of the voxels.

    Each block's rows are filtered (``keep``, over the concatenated rows),
    scattered straight to their final positions, and released, so peak memory
    is the blocks as they came plus the kept rows once, not the three copies of
    filter-concatenate-permute. ``results`` is emptied on the way.
    """
    flat = np.concatenate([r[0] for r in results]) if results else np.empty(0, np.int64)
    starts = np.cumsum([0] + [r[0].size for r in results])
    if keep is not None:
        flat = flat[keep]
    order = np.argsort(flat, kind="stable")
    destination = np.empty_like(order)
    destination[order] = np.arange(order.size)
    raw = np.empty((flat.size, n_temperatures), dtype=np.float32)
    with_labels = bool(results) and results[0][2] is not None
    prov = np.empty(flat.size, dtype=np.int32) if with_labels else None
    start = 0
    for i in range(len(results)):
        _, traj, ids = results[i]
        results[i] = None
        if keep is not None:
            sel = keep[starts[i] : starts[i + 1]]
            traj = traj[sel]
            ids = None if ids is None else ids[sel]
        stop = start + traj.shape[0]
        raw[destination[start:stop]] = traj
        if with_labels:
            prov[destination[start:stop]] = ids
        del traj
        start = stop
    return flat[order], raw, prov
