"""Where a distributed XTEC-d run spends its workers' time: distributed's task stream, by kind of task.

One synthetic (24, N, N, N) zarr volume, a LocalCluster of --workers workers x 1 thread (configured by
deploy/dask/distributed.yaml and warmed up, as in bench_engine's workers section), one
``cluster(mode="d", n_components=4)`` recorded with ``distributed.get_task_stream``. Prints two
markdown tables: per worker, the share of the wall time it spent computing tasks, and the CPU time
of this process, which holds the client and LocalCluster's scheduler; per kind of task (dask's key
prefix), tasks and compute seconds. The rest of the workers' time is waiting: for the scheduler,
for transfers, and for the client between computes.

    python benchmarks/bench_worker_tasks.py [--size 256] [--workers 2] [--workdir /tmp]

Why it exists: 2 workers against 1 gain 60-70 % of what the machine allows (RESULTS.md, section 18);
this says which tasks and how many computes that costs.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_engine import fmt_t, machine_info, machine_line, table, use_worker_dask_config, warm_workers  # noqa: E402


def record(path: Path, n_workers: int) -> dict:
    """Run the engine once on the volume at ``path`` under a fresh LocalCluster; the task stream and counts."""
    import numpy as np
    import zarr
    from dask.utils import key_split
    from distributed import Client, LocalCluster, get_task_stream

    import dask
    import dask.base

    from xtec_flows.engine import cluster

    group = zarr.open_group(str(path), mode="r")
    temps = np.asarray(group.attrs["temperatures"], dtype=np.float64)
    use_worker_dask_config()
    computes = [0]
    original_compute = dask.base.compute

    def counted_compute(*args, **kwargs):
        computes[0] += 1
        return original_compute(*args, **kwargs)

    with LocalCluster(n_workers=n_workers, threads_per_worker=1, memory_limit="3GB", processes=True,
                      dashboard_address=None) as local, Client(local) as client:
        warm_workers(client)
        # dask.compute and collections' .compute() (dask.persist is not counted)
        dask.base.compute = dask.compute = counted_compute
        try:
            with get_task_stream(client) as stream:
                t0, cpu0 = time.perf_counter(), time.process_time()
                result = cluster(group["intensity"], temps, mode="d", n_components=4)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            dask.base.compute = dask.compute = original_compute
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    busy = collections.defaultdict(float)
    for task in stream.data:
        compute = sum(s["stop"] - s["start"] for s in task["startstops"] if s["action"] == "compute")
        kind = by_kind[key_split(task["key"])]
        kind[0] += 1
        kind[1] += compute
        busy[task["worker"]] += compute
    return {"wall": wall, "client_cpu": cpu, "tasks": len(stream.data), "computes": computes[0], "by_kind": dict(by_kind),
            "busy": dict(busy), "timings": result.timings, "n_thresholded": result.n_thresholded}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256, help="spatial edge N of the (24, N, N, N) volume (default 256)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers, 1 thread each (default 2)")
    p.add_argument("--workdir", default=None, help="where the volume is written (default: a temporary directory)")
    args = p.parse_args(argv)
    from xtec_flows.synthetic import write_zarr

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    machine = machine_line(machine_info())
    workdir = Path(tempfile.mkdtemp(prefix="xtec-tasks-", dir=args.workdir))
    try:
        path = workdir / "volume.zarr"
        write_zarr(str(path), (24, args.size, args.size, args.size), seed=0, overwrite=True)
        run = record(path, args.workers)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall = run["wall"]
    worker_rows = [[f"worker {i + 1}: computing tasks", fmt_t(b), f"{100 * b / wall:.0f} %"]
                   for i, (_, b) in enumerate(sorted(run["busy"].items()))]
    # LocalCluster runs its scheduler in this process: its CPU time is the client's and the scheduler's.
    worker_rows.append(["this process: client + scheduler (CPU time, all threads)", fmt_t(run["client_cpu"]),
                        f"{100 * run['client_cpu'] / wall:.0f} %"])
    kinds = sorted(run["by_kind"].items(), key=lambda kv: -kv[1][1])
    kind_rows = [[f"`{name}`", f"{n:,}", fmt_t(seconds)] for name, (n, seconds) in kinds if seconds >= 0.001 * wall]
    rest = [(n, s) for _, (n, s) in kinds if s < 0.001 * wall]
    if rest:
        kind_rows.append([f"{len(rest)} other kinds", f"{sum(n for n, _ in rest):,}", fmt_t(sum(s for _, s in rest))])
    breakdown = ", ".join(f"{k} {fmt_t(v)}" for k, v in run["timings"].items())
    sys.stdout.write(
        f"_{started}; `python benchmarks/bench_worker_tasks.py --size {args.size} --workers {args.workers}`._  \n"
        f"_Machine: {machine}._\n\n"
        f"24×{args.size}³, {run['n_thresholded']:,} thresholded voxels, {args.workers} workers × 1 thread: wall "
        f"{fmt_t(wall)} ({breakdown}); {run['tasks']:,} tasks in {run['computes']} `dask.compute` calls.\n\n"
        + table(["process", "seconds", "share of the wall time"], worker_rows) + "\n\n"
        + table(["task kind (key prefix)", "tasks", "compute time, all workers"], kind_rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
