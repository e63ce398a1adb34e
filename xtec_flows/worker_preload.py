"""A Dask worker preload: the worker decodes zarr chunks on as many threads as it runs tasks on.

zarr 3 decodes the chunks of one read concurrently on a thread pool of its own, sized by default
for the whole machine (``min(32, CPUs + 4)`` threads), in every process. A Dask worker is sized by
its ``--nthreads``; with that pool beside it, a "1-thread" worker that reads a block of several
chunks uses every core of the host, and several workers on one host oversubscribe it. Measured in
benchmarks/RESULTS.md (section 18): two 1-thread workers on a 2-CPU machine ran a 24x384^3 volume
1.4x slower with zarr's default pool than with one decoding thread each.

deploy/dask/distributed.yaml names this module in ``distributed.worker.preload``, so every worker
started with that configuration (systemd units, batch jobs, the benchmarks' LocalClusters) runs
:func:`dask_setup` before its first task.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def decoding_threads(worker) -> int:
    """Threads zarr may decode on in ``worker``'s process: the worker's own task threads."""
    return max(int(worker.state.nthreads), 1)


def dask_setup(worker) -> None:
    """Size zarr's decoding pool to the worker's threads (distributed calls this at worker start)."""
    import zarr
    from zarr.core import sync

    threads = decoding_threads(worker)
    zarr.config.set({"threading.max_workers": threads})
    if getattr(sync, "_executor", None) is not None:
        # The pool exists already (zarr was used before the preload ran): it keeps its size.
        log.warning("zarr's thread pool was created before this preload; it keeps its size, not %d threads",
                    threads)
    log.info("zarr decodes on %d thread(s) in this worker", threads)
