"""The chunked XTEC pipeline: volume -> statistics -> threshold -> trajectories -> fit -> labels.

The 4-D input (T, *spatial) is streamed block by block through dask, normally once:

1. *statistics* (the one read): the temperature mean of every voxel (0 where
   masked, NaN where the trajectory holds NaN/Inf) goes to a 3-D scratch array
   (1/T of the input; a zarr array, or dask blocks persisted in the workers'
   memory under a distributed Client, see ``_scratch_store``); at the same time the block keeps the trajectories above
   a provisional cut (every valid one for inputs under ``CACHE_ALL_BYTES``;
   otherwise a cut estimated on a sample of blocks, lowered by a margin);
2. *threshold*: the histogram of log <I>_T is built from the scratch array by
   cheap passes (or from memory), and the final cut found;
3. *trajectories*: the kept trajectories are filtered to the final cut and
   sorted by flat voxel index, so every later step is independent of the
   chunking. Only if the final cut is below the provisional one is the input
   read a second time.

The fit then runs on the gathered trajectories (EM as a reduction over row
blocks), and labels are written block by block into a chunked int8 zarr array.
dask's default scheduler is used, so an active ``distributed.Client`` takes the
block tasks; otherwise the local threaded scheduler does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import dask
import dask.array as da
import numpy as np
import zarr

from . import validation
from .chunking import block_regions
from ._version import __version__
from .io import zarr_io
from .numerics import masking, peaks, threshold
from .numerics.mixture import MixtureParams, fit_mixture
from .numerics.rescale import RESCALE_METHODS, rescale
from .numerics.smoothing import LabelSmoother, SmoothingKernel
from .class_discovery import ClassDiscovery, discover_classes

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "mask")
# None: a fixed number of components, each one cluster (XTEC-d/s as published). "auto":
# class discovery (see class_discovery.py).
CLASS_MODES = (None, "auto")
# The parameters that only class discovery reads.
CLASS_DISCOVERY_FIELDS = ("classes", "max_components", "stability_runs")
# Voxels per spatial block when the input does not suggest a chunking: 64**3
# voxels x 24 temperatures x 4 bytes = 25 MB per block.
DEFAULT_BLOCK_VOXELS = 64**3
# Scratch arrays smaller than this stay in memory; larger ones go to disk.
SCRATCH_IN_MEMORY_BYTES = 1 << 30
# Below this many bytes of input, the first pass keeps every valid trajectory in
# memory, so the input is read exactly once and the threshold histogram comes
# straight from the kept values.
CACHE_ALL_BYTES = 512 << 20
# Larger inputs: the first pass keeps the trajectories above a provisional cut
# estimated from a sample of blocks, this many (sample) bins below it.
PROVISIONAL_MARGIN_BINS = 4


@dataclass(frozen=True)
class ClusterParams:
    """Every parameter of an XTEC run (recorded in the result's metadata).

    mode : "d" (every thresholded voxel), "s" (with label smoothing) or
        "peaks" (one averaged trajectory per connected peak)
    n_components : number of clusters K (1..127)
    threshold : "kl", "simple", "none", or a number: an explicit cut on <I>_T
    rescale : "mean", "zscore", "log-mean" or "none"
    mask : "zero-mean" or "any-zero" (which voxels count as empty)
    nonfinite : "raise" (NaN/Inf is an error) or "mask" (drop those voxels)
    smoothing : label-smoothing kernel for mode "s" (default: local, L = 1 voxel)
    reg_covar, tol, max_iter, n_init, random_state : EM settings (scikit-learn meaning)
    """

    mode: str = "d"
    n_components: int = 4
    threshold: str | float = "kl"
    rescale: str = "mean"
    mask: str = "zero-mean"
    nonfinite: str = "raise"
    smoothing: SmoothingKernel | None = None
    reg_covar: float = 1e-6
    tol: float = 1e-4
    max_iter: int = 300
    n_init: int = 3
    random_state: int | None = 0
    init_sample_size: int = 20_000
    classes: str | None = None
    max_components: int = 8
    stability_runs: int = 3
    ordering: str = "monotonic"

    def __post_init__(self):
        validation.check_choice("mode", self.mode, validation.MODES)
        validation.check_int("n_components", self.n_components, 1)
        if self.n_components > 127:
            raise ValueError(f"n_components must be <= 127 (labels are int8); got {self.n_components}")
        if isinstance(self.threshold, str):
            validation.check_choice("threshold", self.threshold, threshold.THRESHOLD_METHODS)
        else:
            validation.check_positive("threshold (explicit mean-intensity cutoff)", self.threshold)
        validation.check_choice("rescale", self.rescale, RESCALE_METHODS)
        validation.check_choice("mask", self.mask, masking.MASK_TYPES)
        validation.check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        validation.check_positive("reg_covar", self.reg_covar)
        validation.check_positive("tol", self.tol)
        validation.check_int("max_iter", self.max_iter, 1)
        validation.check_int("n_init", self.n_init, 1)
        validation.check_int("init_sample_size", self.init_sample_size, 2)
        if self.random_state is not None:
            validation.check_int("random_state", self.random_state, 0)
        if self.smoothing is not None and not isinstance(self.smoothing, SmoothingKernel):
            raise TypeError(f"smoothing must be a SmoothingKernel or None; got {type(self.smoothing).__name__}")
        if self.mode == "s" and self.smoothing is None:
            object.__setattr__(self, "smoothing", SmoothingKernel())
        if self.mode != "s" and self.smoothing is not None:
            raise ValueError(f"smoothing applies to mode 's' only; got mode {self.mode!r} with smoothing")
        validation.check_choice("ordering", self.ordering, validation.ORDERINGS)
        validation.check_choice("classes", self.classes, CLASS_MODES)
        validation.check_int("stability_runs", self.stability_runs, 0)
        if self.classes is not None and isinstance(self.max_components, int) and 2 <= self.max_components <= 127:
            # Class discovery fits max_components components; n_components says the same, so that
            # the recorded parameters (and the result key, a hash of them) do not depend on an
            # unused n_components.
            object.__setattr__(self, "n_components", self.max_components)
        if isinstance(self.max_components, bool) or not isinstance(self.max_components, int) or not (
            2 <= self.max_components <= 127
        ):
            raise ValueError(
                "max_components (the upper bound on mixture components for classes='auto') must be an "
                f"integer from 2 to 127; got {self.max_components!r}. Class discovery fits more components "
                "than classes and groups them, so it needs at least 2 (default 8)"
            )

    @classmethod
    def from_dict(cls, values: dict | None) -> ClusterParams:
        """Parameters from JSON-like values (a flow parameter, a result's metadata).

        Unknown names are refused with the list of known ones, so a typo never silently
        falls back to a default.
        """
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown clustering parameter(s) {unknown}; known: {sorted(known)}")
        smoothing = values.get("smoothing")
        if isinstance(smoothing, dict):
            kernel = dict(smoothing)
            if "unit_cell" in kernel:
                kernel["unit_cell"] = tuple(kernel["unit_cell"])
            values["smoothing"] = SmoothingKernel(**kernel)
        return cls(**values)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.classes is None:
            # Fixed-K runs record exactly what they did before class discovery existed, so
            # their result keys (a hash of these parameters) do not change.
            for name in CLASS_DISCOVERY_FIELDS:
                d.pop(name)
        if self.ordering == "monotonic":
            d.pop("ordering")  # the default, unrecorded so that earlier result keys hold
        if self.smoothing is not None:
            d["smoothing"] = asdict(self.smoothing)
            d["smoothing"]["unit_cell"] = list(self.smoothing.unit_cell)
        return d


@dataclass
class Trajectories:
    """Output of the two streaming passes: what the fit needs, in memory.

    flat : (n_samples,) int64, C-order flat index of each thresholded voxel, ascending
    raw : (n_samples, T) float32, their intensities
    peak_ids : (n_samples,) int32, peak of each voxel (1..n_peaks), mode "peaks" only
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
    n_reads: int = 1
    timings: dict = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.flat.size)

    @property
    def coords(self) -> np.ndarray:
        """(n_samples, ndim) grid indices."""
        return np.stack(np.unravel_index(self.flat, self.spatial_shape), axis=1)


@dataclass
class ClusterResult:
    """Everything an XTEC run produced.

    labels : zarr.Array of shape spatial, int8; -1 = not clustered, else 0..K-1
        in canonical order (see ``numerics.mixture.canonical_order``)
    means, variances : (K, T) per-cluster trajectories in rescaled units
    weights : (K,) mixing weights; counts : (K,) voxels per label
    """

    labels: zarr.Array
    temperatures: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    log_likelihood: float
    bic: float
    n_iter: int
    converged: bool
    log_cutoff: float
    threshold_success: bool
    histogram_edges: np.ndarray
    histogram_counts: np.ndarray
    n_valid: int
    n_thresholded: int
    n_samples: int
    n_peaks: int
    params: ClusterParams
    timings: dict
    n_reads: int = 1
    version: str = __version__
    components: zarr.Array | None = None
    discovery: ClassDiscovery | None = None

    @property
    def classes(self) -> list | None:
        """Class summaries (dicts, see ``PhysicalClass.to_dict``) with classes='auto', else None."""
        return None if self.discovery is None else [c.to_dict() for c in self.discovery.classes]

    @property
    def stability(self) -> dict | None:
        return None if self.discovery is None else self.discovery.stability

    @property
    def intensity_cutoff(self) -> float:
        return math.exp(self.log_cutoff) if math.isfinite(self.log_cutoff) else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary (everything but the label volume)."""
        return {
            "xtec_flows": self.version,
            "params": self.params.to_dict(),
            "shape": list(self.labels.shape),
            "temperatures": self.temperatures.tolist(),
            "n_components": int(self.means.shape[0]),
            "means": self.means.tolist(),
            "variances": self.variances.tolist(),
            "weights": self.weights.tolist(),
            "counts": [int(c) for c in self.counts],
            "log_likelihood": self.log_likelihood,
            "bic": self.bic,
            "n_iter": self.n_iter,
            "converged": self.converged,
            "threshold": {
                "method": self.params.threshold,
                "log_cutoff": self.log_cutoff if math.isfinite(self.log_cutoff) else None,
                "intensity_cutoff": self.intensity_cutoff,
                "success": self.threshold_success,
                "histogram_edges": self.histogram_edges.tolist(),
                "histogram_counts": [int(c) for c in self.histogram_counts],
            },
            "n_valid": self.n_valid,
            "n_thresholded": self.n_thresholded,
            "n_samples": self.n_samples,
            "n_peaks": self.n_peaks,
            "input_reads": self.n_reads,
            "timings": self.timings,
            **({} if self.discovery is None else {
                "n_classes": len(self.discovery.classes),
                **self.discovery.to_dict(),
            }),
        }


# ---------------------------------------------------------------------------------------
# input normalisation
# ---------------------------------------------------------------------------------------


def _default_spatial_chunks(shape: tuple, hint: tuple | None) -> tuple:
    ndim = len(shape)
    if hint is None:
        side = max(int(round(DEFAULT_BLOCK_VOXELS ** (1.0 / ndim))), 1)
        return tuple(min(side, s) for s in shape)
    # Grow the storage chunks until a block holds enough voxels to amortise task overhead.
    chunks = [min(c, s) for c, s in zip(hint, shape)]
    while math.prod(chunks) < DEFAULT_BLOCK_VOXELS // 8:
        grown = False
        for i in range(ndim):
            if chunks[i] < shape[i]:
                chunks[i] = min(chunks[i] * 2, shape[i])
                grown = True
        if not grown:
            break
    return tuple(chunks)


def as_dask(volume, chunks: tuple | None = None) -> da.Array:
    """(T, *spatial) dask array with the whole temperature axis in every block and
    regular spatial chunks (so blocks line up with zarr chunks of scratch arrays)."""
    shape = tuple(volume.shape)
    if isinstance(volume, da.Array):
        hint = tuple(max(c) for c in volume.chunks[1:])
        x = volume
    else:
        hint = tuple(volume.chunks[1:]) if isinstance(volume, zarr.Array) else None
        x = None
    spatial = tuple(chunks) if chunks is not None else _default_spatial_chunks(shape[1:], hint)
    if len(spatial) != len(shape) - 1 or not all(isinstance(c, (int, np.integer)) and c >= 1 for c in spatial):
        raise ValueError(
            f"chunks must give one positive integer block size per spatial axis ({len(shape) - 1}); got {chunks!r}"
        )
    target = (shape[0],) + tuple(int(c) for c in spatial)
    if x is None:
        # h5py is not thread-safe for concurrent reads of one file: serialise them.
        lock = type(volume).__module__.startswith("h5py")
        return da.from_array(volume, chunks=target, asarray=True, lock=lock)
    return x.rechunk(target)


def distributed_client_active() -> bool:
    """True when a dask.distributed Client is the default scheduler."""
    if "distributed" not in sys.modules:
        return False
    from distributed import default_client

    try:
        default_client()
    except ValueError:
        return False
    return True


def _scratch_store(nbytes: int, scratch):
    """Where the intermediate arrays (statistic, provisional labels) live.

    Returns (zarr store or None, temp dir to clean up or None). ``None`` as the
    store means *cluster memory*: with a distributed Client and no ``scratch``
    directory, the intermediates are dask arrays persisted on the workers.
    A zarr store is wrong there: tasks get a pickled copy of an in-memory
    store and would swallow their writes, and a temp dir on this host is not
    the temp dir of a worker on another host (each would see only its own
    blocks). An explicit ``scratch`` directory is used as given, so on a
    multi-host cluster it must be on a file system every worker shares.
    """
    if scratch is not None:
        return zarr.storage.LocalStore(str(scratch)), None
    if distributed_client_active():
        return None, None
    if nbytes <= SCRATCH_IN_MEMORY_BYTES:
        return zarr.storage.MemoryStore(), None
    tmp = tempfile.TemporaryDirectory(prefix="xtec-flows-scratch-")
    return zarr.storage.LocalStore(tmp.name), tmp


def _assemble(parts: list, regions: list, grid: tuple, dtype) -> da.Array:
    """One dask array from per-block delayed arrays, laid out as ``regions`` on ``grid``."""
    blocks = np.empty(grid, dtype=object)
    for part, (idx, _, region) in zip(parts, regions):
        blocks[idx] = da.from_delayed(part, tuple(r.stop - r.start for r in region), dtype=dtype)
    return da.block(blocks.tolist())


def _intermediate(make_block, args_per_block: list, regions: list, shape: tuple, chunks: tuple, store, name: str,
                  dtype, progress: bool = False):
    """Run one task per block that yields a block of an intermediate array and a summary.

    ``make_block(*args, target, region)`` returns (block or None, summary): it
    writes its block into the zarr array ``target`` when there is one (and
    returns None for it), else returns the block. With a zarr ``store`` the
    intermediate is a zarr scratch array named ``name``; without one
    (distributed Client) it is a dask array persisted in the workers' memory.

    Returns (summaries in the order of ``regions``, the intermediate as a dask
    array of ``shape`` chunked by ``chunks``, and the array to index directly:
    the zarr array, or the persisted dask array itself).
    """
    if store is not None:
        target = zarr_io.scratch_array(store, name, shape, chunks, dtype)
        tasks = [dask.delayed(make_block, nout=2)(*args, target, region)
                 for args, (_, _, region) in zip(args_per_block, regions)]
        summaries = _compute(*[t[1] for t in tasks], progress=progress)
        return list(summaries), da.from_zarr(target, chunks=chunks), target
    tasks = [dask.delayed(make_block, nout=2)(*args, None, region)
             for args, (_, _, region) in zip(args_per_block, regions)]
    with _progress(progress):
        # Persist the per-block tasks together, as plain delayed objects, then assemble the array
        # from what was persisted. Persisting the assembled array (its summaries apart) left later
        # passes over it without the persisted blocks: each pass read the whole input again
        # (tests/test_multihost_dask.py counts the reads).
        blocks, summaries = dask.persist([t[0] for t in tasks], [t[1] for t in tasks])
    array = _assemble(blocks, regions, tuple(math.ceil(n / c) for n, c in zip(shape, chunks)), dtype)
    return list(dask.compute(*summaries)), array, array


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr, minimum=1.0)


# ---------------------------------------------------------------------------------------
# block kernels (run inside dask tasks)
# ---------------------------------------------------------------------------------------


def _block_statistic(block: np.ndarray, mask_type: str) -> np.ndarray:
    """<I>_T of each voxel: > 0 for a usable voxel, 0 when masked, NaN/Inf when
    the trajectory is not finite. Shape (*spatial), float32."""
    # float32 data are summed in float32 (as numpy's own mean does, and 4x faster
    # than widening); integer counts are summed exactly in float64.
    acc = np.float32 if block.dtype.kind == "f" and block.dtype.itemsize <= 4 else np.float64
    with np.errstate(invalid="ignore", over="ignore"):
        mean = block.sum(axis=0, dtype=acc)
        mean /= block.shape[0]
    keep = masking.valid_voxels(block, mask_type) if mask_type != "zero-mean" else mean > 0
    out = np.where(keep, mean, 0).astype(np.float32)
    out[~np.isfinite(mean)] = np.nan
    return out


def _log_valid(stat: np.ndarray) -> np.ndarray:
    v = stat[np.isfinite(stat) & (stat > 0)]
    return np.log(v.astype(np.float64))


def _block_counts(stat, edges):
    return threshold.partial_histogram(_log_valid(stat), edges)[0]


def _block_hist(stat, edges):
    return threshold.partial_histogram(_log_valid(stat), edges)


def _block_mask(stat: np.ndarray, log_cut: float) -> np.ndarray:
    ok = np.isfinite(stat) & (stat > 0)
    if math.isfinite(log_cut):
        with np.errstate(divide="ignore", invalid="ignore"):
            ok &= np.log(np.where(ok, stat, 1.0).astype(np.float64)) > log_cut
    return ok


def _block_flat(offset: tuple, block_shape: tuple, shape: tuple, mask: np.ndarray) -> np.ndarray:
    local = np.nonzero(mask)
    return np.ravel_multi_index(tuple(l + o for l, o in zip(local, offset)), shape).astype(np.int64)


def _gather(block, stat, offset, shape, log_cut):
    """(flat indices, trajectories (n, T) float32, None) of the block's voxels above the cut."""
    mask = _block_mask(stat, log_cut)
    flat = _block_flat(offset, stat.shape, shape, mask)
    traj = np.ascontiguousarray(block[:, mask].T, dtype=np.float32)
    return flat, traj, None


def _label_count(stat, log_cut):
    return peaks.label_mask(_block_mask(stat, log_cut))[1]


def _label_write(stat, log_cut, label_offset, offset, shape, target, region):
    """(block's provisional labels, or None once written to ``target``; first voxel of each label)."""
    labels, n = peaks.label_mask(_block_mask(stat, log_cut))
    glob = np.where(labels > 0, labels.astype(np.int64) + label_offset, 0).astype(np.int32)
    grids = np.meshgrid(*[np.arange(o, o + s) for o, s in zip(offset, stat.shape)], indexing="ij")
    flat = np.ravel_multi_index(tuple(grids), shape)
    firsts = peaks.first_voxel_per_label(labels, n, flat)
    if target is None:
        return glob, firsts
    target[region] = glob
    return None, firsts


# ---------------------------------------------------------------------------------------
# the streaming pass
# ---------------------------------------------------------------------------------------


def _compute(*tasks, progress=False):
    with _progress(progress):
        return dask.compute(*tasks)


def _block_first_pass(block, offset, shape, mask_type, provisional, fine_edges, stat_target, region):
    """Everything the first read of one block yields.

    Returns (the block's <I>_T, or None once written into ``stat_target``; a
    dict with the counts and range of valid log-means, the number of
    non-finite trajectories, a fine histogram of the log-means (if
    ``fine_edges`` is given) and the trajectories, flat indices and log-means
    of the voxels above ``provisional``).
    """
    stat = _block_statistic(block, mask_type)
    written = stat_target is not None
    if written:
        stat_target[region] = stat
    n_bad = int((~np.isfinite(stat)).sum())
    logv = _log_valid(stat)
    out = {
        "n_valid": int(logv.size),
        "lo": float(logv.min()) if logv.size else math.inf,
        "hi": float(logv.max()) if logv.size else -math.inf,
        "n_bad": n_bad,
        "fine": threshold.partial_histogram(logv, fine_edges)[0] if fine_edges is not None else None,
    }
    if provisional == -math.inf:
        # Small input: keep the block itself (no copy); select after the cut is known.
        out["block"], out["stat"] = block, stat
    else:
        keep = _block_mask(stat, provisional)
        out["flat"] = _block_flat(offset, stat.shape, shape, keep)
        out["traj"] = np.ascontiguousarray(block[:, keep].T, dtype=np.float32)
        out["log"] = np.log(stat[keep].astype(np.float64))
    return (None if written else stat), out


def _provisional_cut(x: da.Array, params: ClusterParams, regions: list):
    """Where the first pass may safely start keeping trajectories.

    Returns (provisional log cut, fine histogram edges or None). An explicit
    threshold is exact; "none" keeps every valid voxel; small inputs keep every
    valid voxel; otherwise the cut is estimated on a sample of blocks and
    lowered by a margin. If the final cut turns out lower still, the
    trajectories are read a second time (correct, only slower).
    """
    if not isinstance(params.threshold, str):
        return math.log(params.threshold), None
    nbytes = x.dtype.itemsize * math.prod(x.shape)
    if params.threshold == "none" or nbytes <= CACHE_ALL_BYTES:
        return -math.inf, None
    n_sample = min(16, max(2, math.ceil(len(regions) / 20)))
    picks = np.unique(np.linspace(0, len(regions) - 1, n_sample).round().astype(int))
    xb = x.to_delayed().reshape(x.numblocks[1:])
    stats = _compute(*[dask.delayed(_block_statistic)(xb[regions[i][0]], params.mask) for i in picks])
    values = np.concatenate([_log_valid(s) for s in stats])
    if values.size < 100 or values.max() <= values.min():
        return -math.inf, None
    hist = threshold.histogram_of(values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut = threshold.find_cutoff(hist, params.threshold)
    fine_edges = np.linspace(values.min(), values.max(), 4097)
    return cut.log_cutoff - PROVISIONAL_MARGIN_BINS * hist.bin_size, fine_edges


def _exact_quartiles(stat_d: da.Array, n: int, fine_edges: np.ndarray, fine_counts: np.ndarray):
    """Order statistics at the quartile ranks, exactly: the fine histogram tells
    which bins hold them (values outside the edges were clipped into the end
    bins, which then extend to infinity), one pass collects those bins' values."""
    cum = np.cumsum(fine_counts)
    wanted = []
    for r in threshold.quartile_ranks(n):
        b = int(np.searchsorted(cum, r, side="right"))
        below = int(cum[b - 1]) if b > 0 else 0
        lo = fine_edges[b] if b > 0 else -math.inf
        hi = fine_edges[b + 1] if b + 1 < fine_edges.size - 1 else math.inf
        wanted.append((r - below, lo, hi))
    blocks = stat_d.to_delayed().ravel()
    parts = _compute(*[dask.delayed(_block_values_in_bins)(b, [(lo, hi) for _, lo, hi in wanted]) for b in blocks])
    out = []
    for i, (rank, _, _) in enumerate(wanted):
        vals = np.sort(np.concatenate([p[i] for p in parts]))
        out.append(float(vals[min(rank, vals.size - 1)]))
    return out[0], out[1]


def _block_values_in_bins(stat, bins):
    v = _log_valid(stat)
    return [v[(v >= lo) & (v < hi)] for lo, hi in bins]


def _histogram_chunked(stat_d, n_valid, lo, hi, fine_edges, fine_counts):
    q25 = q75 = lo
    if n_valid >= 2 and hi > lo:
        q25, q75 = _exact_quartiles(stat_d, n_valid, fine_edges, fine_counts)
    edges, bin_size = threshold.histogram_edges(lo, hi, q25, q75, n_valid)
    parts = _compute(*[dask.delayed(_block_hist)(b, edges) for b in stat_d.to_delayed().ravel()])
    return threshold.LogMeanHistogram(
        edges, sum(p[0] for p in parts), sum(p[1] for p in parts), sum(p[2] for p in parts), float(bin_size)
    )


def gather_trajectories(
    volume,
    temperatures,
    params: ClusterParams,
    *,
    chunks: tuple | None = None,
    scratch=None,
    progress: bool = False,
) -> Trajectories:
    """Statistics, threshold and trajectory gathering: usually one read of the input.

    The first pass computes <I>_T of every voxel (into a scratch array) and
    keeps the trajectories above a provisional cut; the threshold histogram is
    then built from the scratch array (1/T of the input), and the kept
    trajectories are filtered to the final cut. Only if the final cut falls
    below the provisional one is the input read a second time.

    Parameters
    ----------
    volume : numpy, zarr or dask array of shape (T, *spatial), 1, 2 or 3 spatial dims
    temperatures : array-like of shape (T,)
    chunks : spatial block shape (default: from the input's chunks, or 64^3-ish)
    scratch : directory for intermediate arrays (default: memory when small, else a temp dir)

    Returns
    -------
    Trajectories
    """
    shape = validation.check_volume(volume)
    temps = validation.check_temperatures(temperatures, shape[0], params.ordering)
    timings = {}
    x = as_dask(volume, chunks)
    spatial_shape = shape[1:]
    spatial_chunks = x.chunks[1:]
    regular = tuple(c[0] for c in spatial_chunks)
    regions = list(block_regions(spatial_chunks))
    store, tmp = _scratch_store(4 * math.prod(spatial_shape), scratch)
    try:
        t0 = time.perf_counter()
        provisional, fine_edges = _provisional_cut(x, params, regions)
        xb = x.to_delayed().reshape(x.numblocks[1:])
        first, stat_d, _ = _intermediate(
            _block_first_pass,
            [(xb[idx], offset, spatial_shape, params.mask, provisional, fine_edges) for idx, offset, _ in regions],
            regions, spatial_shape, regular, store, "statistic", np.float32, progress=progress,
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
            cached_log = np.concatenate([_log_valid(p["stat"]) for p in first])
        else:
            cached_log = np.concatenate([p.pop("log") for p in first])
            kept = [(p.pop("flat"), p.pop("traj"), None) for p in first]
        timings["statistics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if whole_blocks:
            # Every valid voxel is in memory: the histogram comes straight from the values.
            hist = threshold.histogram_of(cached_log) if cached_log.size >= 2 else _histogram_chunked(
                stat_d, n_valid, lo, hi, None, None)
        else:
            fine = sum(p["fine"] for p in first) if fine_edges is not None else None
            if fine is None:
                fine_edges = np.linspace(lo, hi, 4097)
                fine = sum(_compute(*[dask.delayed(_block_counts)(b, fine_edges) for b in stat_d.to_delayed().ravel()]))
            hist = _histogram_chunked(stat_d, n_valid, lo, hi, fine_edges, fine)
        cutoff = threshold.find_cutoff(hist, params.threshold)
        timings["threshold"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if whole_blocks:
            gathered = []
            for p, (_, offset, _) in zip(first, regions):
                gathered.append(_gather(p.pop("block"), p.pop("stat"), offset, spatial_shape, cutoff.log_cutoff))
            flat, raw, _ = _sort_by_voxel(gathered, shape[0])
            n_reads = 1
        elif cutoff.log_cutoff >= provisional:
            flat, raw, _ = _sort_by_voxel(kept, shape[0], keep=cached_log > cutoff.log_cutoff)
            n_reads = 1
        else:
            del kept
            log.info("final cut below the provisional one: reading the trajectories again")
            sb = stat_d.to_delayed()
            tasks = [
                dask.delayed(_gather)(xb[idx], sb[idx], offset, spatial_shape, cutoff.log_cutoff)
                for idx, offset, _ in regions
            ]
            flat, raw, _ = _sort_by_voxel(list(_compute(*tasks, progress=progress)), shape[0])
            n_reads = 2
        del cached_log, first
        timings["trajectories"] = time.perf_counter() - t0

        peak_ids = None
        n_peaks = 0
        if params.mode == "peaks" and flat.size:
            t0 = time.perf_counter()
            mapping, n_peaks, prov_arr = _chunked_components(stat_d, store, spatial_shape, regular, cutoff.log_cutoff)
            coords = np.unravel_index(flat, spatial_shape)
            peak_ids = mapping[_values_at(prov_arr, coords)]
            timings["components"] = time.perf_counter() - t0
    finally:
        if tmp is not None:
            tmp.cleanup()
    if flat.size == 0:
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
        n_reads=n_reads,
        timings=timings,
    )


def _sort_by_voxel(results: list, n_temperatures: int, keep: np.ndarray | None = None):
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


def _read_slabs(array, selections: list) -> list:
    """``array[sel]`` for every selection, as numpy; a dask array is read in one compute."""
    if isinstance(array, da.Array):
        return list(dask.compute(*[array[sel] for sel in selections]))
    return [array[sel] for sel in selections]


def _values_at(array, coords: tuple) -> np.ndarray:
    """``array`` at the points ``coords`` (a tuple of index arrays), as numpy."""
    if isinstance(array, da.Array):
        return array.vindex[coords].compute()
    return array.get_coordinate_selection(coords)


def _chunked_components(stat_d, store, shape, chunks, log_cut):
    """Connected components of the threshold mask, block by block (see numerics.peaks).

    ``store`` is the zarr scratch store, or None to keep the provisional labels
    in the workers' memory (distributed Client).

    Returns (mapping from provisional to final label, number of peaks, the
    provisional labels: a zarr scratch array or a persisted dask array)."""
    blocks = stat_d.to_delayed()
    regions = list(block_regions(stat_d.chunks))
    counts = _compute(*[dask.delayed(_label_count)(blocks[idx], log_cut) for idx, _, _ in regions])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n_prov = int(sum(counts))
    if n_prov >= np.iinfo(np.int32).max:
        raise ValueError(f"too many provisional peaks ({n_prov}) for int32 labels; raise the threshold")
    firsts, _, prov = _intermediate(
        _label_write,
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
    slabs = _read_slabs(prov, [sl for _, sl in boundaries])
    edges = [peaks.slab_edges(np.moveaxis(slab, axis, 0)) for (axis, _), slab in zip(boundaries, slabs)]
    edges = np.concatenate(edges) if edges else np.empty((0, 2), np.int64)
    mapping, n_final = peaks.resolve_labels(n_prov, edges, first_flat)
    return mapping, n_final, prov


# ---------------------------------------------------------------------------------------
# fit and labels
# ---------------------------------------------------------------------------------------


@dataclass
class FitOutput:
    params: MixtureParams
    sample_labels: np.ndarray  # (n_samples,) int8, per thresholded voxel
    counts: np.ndarray
    log_likelihood: float
    bic: float
    n_iter: int
    converged: bool
    history: list
    row_labels: np.ndarray | None = None  # (n_rows,) int8, per row of the features (peaks: per peak)
    restarts: list | None = None  # every restart's (MixtureParams, mean log L), with keep_restarts


def _rescale_float32(raw: np.ndarray, method: str, rows: int = 1 << 18) -> np.ndarray:
    """Rescale (n, T) trajectories into float32, a slab of rows at a time, so the
    float64 temporaries stay small however many voxels passed the threshold."""
    out = np.empty(raw.shape, dtype=np.float32)
    for start in range(0, raw.shape[0], rows):
        out[start : start + rows] = rescale(raw[start : start + rows], method)
    return out


def features(traj: Trajectories, params: ClusterParams) -> np.ndarray:
    """What the mixture sees: rescaled trajectories (n_samples, T), or rescaled
    peak averages (n_peaks, T) in mode "peaks"; float32."""
    if params.mode == "peaks":
        means, _sizes = peaks.peak_means(traj.raw, traj.peak_ids, traj.n_peaks)
        return rescale(means, params.rescale).astype(np.float32)
    return _rescale_float32(traj.raw, params.rescale)


def fit_trajectories(
    traj: Trajectories, params: ClusterParams, n_components: int | None = None, X: np.ndarray | None = None,
    warn_empty: bool = True, n_init: int | None = None, keep_restarts: bool = False,
) -> FitOutput:
    """Cluster gathered trajectories (features computed unless given); labels per thresholded voxel."""
    k = params.n_components if n_components is None else n_components
    if X is None:
        X = features(traj, params)
    unit = "peaks" if params.mode == "peaks" else "thresholded voxels"
    if k > X.shape[0]:
        raise ValueError(
            f"n_components={k} is larger than the number of {unit} ({X.shape[0]}); "
            "lower n_components or the threshold"
        )
    smoother = None
    if params.mode == "s":
        smoother = LabelSmoother(traj.coords, traj.spatial_shape, params.smoothing)
    fit = fit_mixture(
        X,
        k,
        reg_covar=params.reg_covar,
        tol=params.tol,
        max_iter=params.max_iter,
        n_init=params.n_init if n_init is None else n_init,
        random_state=params.random_state,
        smoother=smoother,
        init_sample_size=params.init_sample_size,
        keep_restarts=keep_restarts,
    )
    labels = fit.labels
    counts = fit.counts
    if params.mode == "peaks":
        labels = labels[traj.peak_ids - 1]
        counts = np.bincount(labels, minlength=k)
    empty = [int(i) for i in np.nonzero(counts == 0)[0]]
    if empty and warn_empty:
        warnings.warn(
            f"{len(empty)} of {k} clusters received no voxels (labels {empty})"
            + (" after label smoothing" if params.mode == "s" else "")
            + f"; the data support fewer clusters: try n_components={k - len(empty)}",
            RuntimeWarning,
            stacklevel=3,
        )
    return FitOutput(fit.params, labels, counts, fit.log_likelihood, fit.bic, fit.n_iter, fit.converged, fit.history,
                     row_labels=fit.labels, restarts=fit.restarts)


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


def cluster(
    volume,
    temperatures,
    *,
    mode: str = "d",
    n_components: int = 4,
    threshold: str | float = "kl",
    rescale: str = "mean",
    mask: str = "zero-mean",
    nonfinite: str = "raise",
    smoothing: SmoothingKernel | None = None,
    reg_covar: float = 1e-6,
    tol: float = 1e-4,
    max_iter: int = 300,
    n_init: int = 3,
    random_state: int | None = 0,
    ordering: str = "monotonic",
    classes: str | None = None,
    max_components: int = 8,
    stability_runs: int = 3,
    chunks: tuple | None = None,
    labels_store=None,
    components_store=None,
    overwrite: bool = False,
    scratch=None,
    progress: bool = False,
) -> ClusterResult:
    """Cluster the temperature trajectories of a reciprocal-space volume (XTEC).

    Parameters
    ----------
    volume : numpy, zarr or dask array of shape (T, *spatial), 1, 2 or 3 spatial dims
        Intensities I(T, L, K, H), I(T, K, H), or I(T, q) for a series of 1-D patterns (powder,
        line scans, PDFs). Never loaded whole: read block by block.
    temperatures : array-like of shape (T,), strictly monotonic
        (unless ``ordering="as-given"``: any finite values, e.g. times, or a temperature
        ramp then a hold, in measurement order)
    mode : {"d", "s", "peaks"}
        XTEC-d (every voxel), XTEC-s (label smoothing between E and M steps), or
        clustering of connected-peak averages.
    n_components : int
    threshold : {"kl", "simple", "none"} or float (explicit cut on <I>_T)
    rescale : {"mean", "zscore", "log-mean", "none"}
    classes : None or "auto"
        None: ``n_components`` clusters, each one label (XTEC-d/s as published).
        "auto": class discovery (see :mod:`xtec_flows.class_discovery`): a mixture of
        ``max_components`` components, grouped into classes by the shape of their
        temperature dependence (order parameter, critical, onset, static, other) and
        Tc; ``labels`` then holds class labels, ``components`` the component labels,
        and ``result.classes`` each class's kind, Tc, exponent and stability over
        ``stability_runs`` refits. Needs at least 8 temperatures.
    labels_store : zarr store or path for the label array (default: in memory).
        A path holding other data is refused; an earlier xtec-flows label array
        there is replaced only with ``overwrite=True``.
    chunks : spatial block shape for the streaming passes

    Returns
    -------
    ClusterResult

    Examples
    --------
    >>> from xtec_flows.synthetic import make_volume
    >>> from xtec_flows import cluster
    >>> volume, temps, truth = make_volume((8, 32, 32), seed=0)
    >>> result = cluster(volume, temps, n_components=3)
    >>> result.labels.shape
    (32, 32)
    """
    params = ClusterParams(
        mode=mode,
        n_components=n_components,
        threshold=threshold,
        rescale=rescale,
        mask=mask,
        nonfinite=nonfinite,
        smoothing=smoothing,
        reg_covar=reg_covar,
        tol=tol,
        max_iter=max_iter,
        n_init=n_init,
        random_state=random_state,
        ordering=ordering,
        classes=classes,
        max_components=max_components,
        stability_runs=stability_runs,
    )
    return run(
        volume, temperatures, params, chunks=chunks, labels_store=labels_store, overwrite=overwrite,
        scratch=scratch, progress=progress, components_store=components_store,
    )


def run(
    volume, temperatures, params: ClusterParams, *, chunks=None, labels_store=None, overwrite=False, scratch=None,
    progress=False, on_stage=None, components_store=None,
) -> ClusterResult:
    """:func:`cluster` with a ready :class:`ClusterParams`.

    ``on_stage(name, fraction)``, if given, is called as each pass ends ("read", "fit",
    "labels") with the fraction of the work done so far (0..1); orchestrators use it for
    progress reports.
    """
    report = on_stage or (lambda name, fraction: None)
    zarr_io.check_labels_target(labels_store, overwrite)
    if params.classes is not None:
        zarr_io.check_labels_target(components_store, overwrite)
        check_class_discovery_input(volume, temperatures, params.ordering)
    traj = gather_trajectories(volume, temperatures, params, chunks=chunks, scratch=scratch, progress=progress)
    report("read", 0.6)
    t0 = time.perf_counter()
    X = features(traj, params)
    discovery = None
    if params.classes is None:
        traj.raw = None  # the raw intensities are not needed any more: free them before the fit
        fit = fit_trajectories(traj, params, X=X)
        traj.timings["fit"] = time.perf_counter() - t0
    else:
        k = min(params.max_components, X.shape[0])
        # The restarts that lost are fits from other seeds: they serve as the stability refits,
        # so run at least one restart per refit beside the winner.
        fit = fit_trajectories(traj, params, n_components=k, X=X, warn_empty=False,
                               n_init=max(params.n_init, params.stability_runs + 1), keep_restarts=True)
        traj.timings["fit"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        row_raw = traj.raw if params.mode != "peaks" else peaks.peak_means(traj.raw, traj.peak_ids, traj.n_peaks)[0]
        discovery = discover_classes(
            traj.temperatures, X, row_raw, fit.row_labels, fit.params.means, n_components=k, restarts=fit.restarts,
            stability_runs=params.stability_runs, random_state=params.random_state, reg_covar=params.reg_covar,
            tol=params.tol, max_iter=params.max_iter, init_sample_size=params.init_sample_size,
        )
        traj.raw = None
        del row_raw
        traj.timings["classes"] = time.perf_counter() - t1
    del X
    report("fit", 0.8)
    t0 = time.perf_counter()
    attrs = {zarr_io.PRODUCER_KEY: __version__, "params": params.to_dict()}
    components = None
    if discovery is None:
        labels = write_labels(traj, fit.sample_labels, labels_store, attrs=attrs)
    else:
        labels = write_labels(traj, discovery.class_labels(fit.sample_labels), labels_store,
                              attrs={**attrs, "content": "classes"})
        components = write_labels(traj, fit.sample_labels, components_store, attrs={**attrs, "content": "components"})
    traj.timings["labels"] = time.perf_counter() - t0
    report("labels", 0.85)
    return ClusterResult(
        labels=labels,
        temperatures=traj.temperatures,
        means=fit.params.means,
        variances=fit.params.variances,
        weights=fit.params.weights,
        counts=fit.counts,
        log_likelihood=fit.log_likelihood,
        bic=fit.bic,
        n_iter=fit.n_iter,
        converged=fit.converged,
        log_cutoff=traj.cutoff.log_cutoff,
        threshold_success=traj.cutoff.success,
        histogram_edges=traj.histogram.edges,
        histogram_counts=traj.histogram.counts,
        n_valid=traj.n_valid,
        n_thresholded=traj.n_samples,
        n_samples=traj.n_peaks if params.mode == "peaks" else traj.n_samples,
        n_peaks=traj.n_peaks,
        params=params,
        timings=traj.timings,
        n_reads=traj.n_reads,
        components=components,
        discovery=discovery,
    )


def check_class_discovery_input(volume, temperatures, ordering: str = "monotonic") -> None:
    """Refuse, before anything is read, a series too short to fit a Tc, or one whose coordinate repeats."""
    from .numerics.classes import MIN_TEMPERATURES

    n_t = validation.check_volume(volume)[0]
    t = validation.check_temperatures(temperatures, n_t, ordering)
    if np.unique(t).size != t.size:
        raise ValueError(
            "classes='auto' fits each class's intensity as a function of the series coordinate, which must "
            f"then take distinct values; these repeat ({np.unique(t).size} distinct of {t.size}). For a series "
            "ordered by time with a temperature ramp and hold, pass the times as the coordinate (and interpolate "
            "the temperatures at the fitted transition), or drop the repeated scans"
        )
    if n_t < MIN_TEMPERATURES:
        raise ValueError(
            f"classes='auto' fits a transition temperature, an exponent and a baseline to every class, which "
            f"needs at least {MIN_TEMPERATURES} temperatures; this series has {n_t}. Measure more temperatures, "
            "or cluster with a fixed number of components (classes=None, e.g. n_components=3)"
        )


SELECTION_CRITERIA = ("bic", "icl", "elbow")


def select_n_components(volume, temperatures, k_values=range(2, 11), *, criterion: str = "bic", chunks=None,
                        scratch=None, progress=False, **kwargs) -> list[dict]:
    """Sweep K and report BIC and ICL (lower is better); the volume is read only twice.

    criterion : "bic" (lowest BIC), "icl" (lowest ICL = BIC + 2 x assignment entropy,
        which stops adding components that overlap) or "elbow" (the knee of the BIC curve).
        On millions of voxels BIC alone keeps falling with K; ICL or the elbow give an
        honest choice. The table shows all three.

    Returns
    -------
    table : list of dicts with keys n_components, bic, icl, entropy, log_likelihood, n_iter,
        converged, sorted by K; the chosen row has ``"best": True``, every row ``"criterion"``.
    """
    from .numerics.mixture import assignment_entropy, elbow, icl

    validation.check_choice("criterion", criterion, SELECTION_CRITERIA)
    k_values = [validation.check_int("k", k, 1) for k in k_values]
    if not k_values:
        raise ValueError("k_values is empty; give at least one number of components, e.g. 2..10")
    params = ClusterParams(n_components=max(k_values), **kwargs)
    traj = gather_trajectories(volume, temperatures, params, chunks=chunks, scratch=scratch, progress=progress)
    X = features(traj, params)
    table = []
    for k in sorted(set(k_values)):
        fit = fit_trajectories(traj, params, n_components=k, X=X)
        entropy = assignment_entropy(X, fit.params)
        table.append(
            {"n_components": k, "bic": fit.bic, "icl": icl(fit.bic, entropy), "entropy": entropy,
             "log_likelihood": fit.log_likelihood, "n_iter": fit.n_iter, "converged": fit.converged}
        )
    if criterion == "elbow":
        chosen = elbow([r["n_components"] for r in table], [r["bic"] for r in table])
        best = next(r for r in table if r["n_components"] == chosen)
    else:
        best = min(table, key=lambda r: r[criterion])
    for r in table:
        r["best"] = r is best
        r["criterion"] = criterion
    return table
