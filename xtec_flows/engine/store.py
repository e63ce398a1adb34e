"""Where the engine's data live between passes: the input as a dask array, scratch arrays (zarr
in memory or on disk, or dask blocks persisted in a distributed cluster's workers), and reading
them back."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
import sys
import tempfile

import dask
import dask.array as da
import numpy as np
import zarr

from ..io import zarr_io



@dataclass(frozen=True)
class StreamingLimits:
    """How the engine trades memory against reads of the input. Not clustering parameters: they
    decide where intermediates live and whether the input is read once or twice, never the
    labels (tests/test_pipeline.py holds that), so they are not part of a result's key.

    block_voxels : voxels per spatial block when the input does not suggest a chunking
        (64**3 voxels x 24 temperatures x 4 bytes = 25 MB per block)
    cluster_block_voxels : under a distributed Client, the input's storage chunks are merged
        into blocks of at least this many voxels (4 * 64**3: 100 MB at 24 temperatures, dask's
        usual chunk size). Every task costs the scheduler 1-2 ms and every block has about 30
        tasks over a run; on a small cluster the scheduler shares the CPUs with the workers, and
        at 64**3 blocks that bookkeeping, not the work, set the pace of every pass but the first
        (benchmarks/RESULTS.md, section 18)
    scratch_in_memory_bytes : scratch arrays smaller than this stay in memory, larger ones go
        to a temporary directory on disk
    cache_all_bytes : below this many bytes of input the first pass keeps every valid
        trajectory, so the input is read exactly once and the threshold histogram comes
        straight from the kept values
    provisional_margin_bins : larger inputs keep the trajectories above a provisional cut
        estimated on a sample of blocks, this many (sample-histogram) bins below it; a final
        cut below that reads the input a second time
    candidate_factor : when the kept trajectories go to disk (the trajectory store), keep at
        least this many times the fraction of voxels the sampled cut keeps, so a sample that
        misjudged the volume does not cost a second read (0: no more than the margin)
    """

    block_voxels: int = 64**3
    cluster_block_voxels: int = 4 * 64**3
    scratch_in_memory_bytes: int = 1 << 30
    cache_all_bytes: int = 512 << 20
    provisional_margin_bins: float = 4.0
    candidate_factor: float = 1.5


DEFAULT_LIMITS = StreamingLimits()


def _default_spatial_chunks(shape: tuple, hint: tuple | None, block_voxels: int, min_voxels: int) -> tuple:
    """Spatial block shape: ``block_voxels``-ish cubes without a ``hint``; else the storage
    chunks ``hint``, doubled one axis at a time (the last, fastest-varying axis first) while a
    block holds fewer than ``min_voxels`` voxels, so that every block reads whole storage chunks."""
    ndim = len(shape)
    if hint is None:
        side = max(int(round(max(block_voxels, min_voxels) ** (1.0 / ndim))), 1)
        return tuple(min(side, s) for s in shape)
    chunks = [min(c, s) for c, s in zip(hint, shape)]
    axis = ndim - 1
    while math.prod(chunks) < min_voxels and any(c < s for c, s in zip(chunks, shape)):
        if chunks[axis] < shape[axis]:
            chunks[axis] = min(chunks[axis] * 2, shape[axis])
        axis = (axis - 1) % ndim
    return tuple(chunks)


def as_dask(volume, chunks: tuple | None = None, limits: StreamingLimits = DEFAULT_LIMITS,
            on_cluster: bool = False) -> da.Array:
    """(T, *spatial) dask array with the whole temperature axis in every block and
    regular spatial chunks (so blocks line up with zarr chunks of scratch arrays). Without
    ``chunks`` the blocks follow the input's storage chunks, merged until a block holds at least
    ``limits.cluster_block_voxels`` voxels when the passes run ``on_cluster`` (a distributed
    Client), else at least an eighth of ``limits.block_voxels``."""
    shape = tuple(volume.shape)
    if isinstance(volume, da.Array):
        hint = tuple(max(c) for c in volume.chunks[1:])
        x = volume
    else:
        hint = tuple(volume.chunks[1:]) if isinstance(volume, zarr.Array) else None
        x = None
    min_voxels = limits.cluster_block_voxels if on_cluster else limits.block_voxels // 8
    spatial = tuple(chunks) if chunks is not None else _default_spatial_chunks(shape[1:], hint, limits.block_voxels,
                                                                               min_voxels)
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


def scratch_store(nbytes: int, scratch, limits: StreamingLimits = DEFAULT_LIMITS):
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
    if nbytes <= limits.scratch_in_memory_bytes:
        return zarr.storage.MemoryStore(), None
    tmp = tempfile.TemporaryDirectory(prefix="xtec-flows-scratch-")
    return zarr.storage.LocalStore(tmp.name), tmp


def _assemble(parts: list, regions: list, grid: tuple, dtype) -> da.Array:
    """One dask array from per-block delayed arrays, laid out as ``regions`` on ``grid``."""
    blocks = np.empty(grid, dtype=object)
    for part, (idx, _, region) in zip(parts, regions):
        blocks[idx] = da.from_delayed(part, tuple(r.stop - r.start for r in region), dtype=dtype)
    return da.block(blocks.tolist())


def intermediate(make_block, args_per_block: list, regions: list, shape: tuple, chunks: tuple, store, name: str,
                  dtype, progress: bool = False, keep_on_workers=None):
    """Run one task per block that yields a block of an intermediate array and a summary.

    ``make_block(*args, target, region)`` returns (block or None, summary): it
    writes its block into the zarr array ``target`` when there is one (and
    returns None for it), else returns the block. With a zarr ``store`` the
    intermediate is a zarr scratch array named ``name``; without one
    (distributed Client) it is a dask array persisted in the workers' memory.

    Returns (summaries in the order of ``regions``, the intermediate as a dask
    array of ``shape`` chunked by ``chunks``, and the array to index directly:
    the zarr array, or the persisted dask array itself).

    ``keep_on_workers(summary) -> (small summary, rest)``, distributed only: the ``rest`` of
    each block's summary is persisted where the block ran instead of sent here, and comes
    back as ``summary["rows"]``, a persisted dask object (the trajectory store's rows).
    """
    if store is not None:
        target = zarr_io.scratch_array(store, name, shape, chunks, dtype)
        tasks = [dask.delayed(make_block, nout=2)(*args, target, region)
                 for args, (_, _, region) in zip(args_per_block, regions)]
        summaries = compute(*[t[1] for t in tasks], progress=progress)
        return list(summaries), da.from_zarr(target, chunks=chunks), target
    tasks = [dask.delayed(make_block, nout=2)(*args, None, region)
             for args, (_, _, region) in zip(args_per_block, regions)]
    with progress_bar(progress):
        # Persist the per-block tasks together, as plain delayed objects, then assemble the array
        # from what was persisted. Persisting the assembled array (its summaries apart) left later
        # passes over it without the persisted blocks: each pass read the whole input again
        # (tests/test_multihost_dask.py counts the reads).
        summaries = [t[1] for t in tasks]
        rests = None
        if keep_on_workers is not None:
            split = [dask.delayed(keep_on_workers, nout=2)(t) for t in summaries]
            summaries, rests = [p[0] for p in split], [p[1] for p in split]
        blocks, summaries, rests = dask.persist([t[0] for t in tasks], summaries, rests)
    array = _assemble(blocks, regions, tuple(math.ceil(n / c) for n, c in zip(shape, chunks)), dtype)
    summaries = list(dask.compute(*summaries))
    if rests is not None:
        for summary, rest in zip(summaries, rests):
            summary["rows"] = rest
    return summaries, array, array


def progress_bar(enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar

    return ProgressBar(out=sys.stderr, minimum=1.0)


def compute(*tasks, progress=False):
    with progress_bar(progress):
        return dask.compute(*tasks)


def tree_sum(parts: list, fan_in: int = 8):
    """One delayed sum of delayed ``parts`` (anything with ``+``), as a tree of ``fan_in``-way sums,
    so partial results are added as they are made instead of all held until the end: per-block
    histograms are n_bins numbers each, and n_bins grows with the volume (1,728 blocks x 3 x 10^5 bins
    of float64 is 4 GB)."""
    if not parts:
        raise ValueError("tree_sum needs at least one part")
    while len(parts) > 1:
        parts = [dask.delayed(_sum_parts)(*parts[i:i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def _sum_parts(*parts):
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def read_slabs(array, selections: list) -> list:
    """``array[sel]`` for every selection, as numpy; a dask array is read in one compute."""
    if isinstance(array, da.Array):
        return list(dask.compute(*[array[sel] for sel in selections]))
    return [array[sel] for sel in selections]


def values_at(array, coords: tuple) -> np.ndarray:
    """``array`` at the points ``coords`` (a tuple of index arrays), as numpy."""
    if isinstance(array, da.Array):
        return array.vindex[coords].compute()
    return array.get_coordinate_selection(coords)
