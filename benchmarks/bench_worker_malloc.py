"""The engine's per-block kernels in a plain process and in Dask workers, with distributed's
default worker environment and with deploy/dask/distributed.yaml (the deployed allocator settings).

Prints one markdown table (median over --calls calls, each kernel on the same data everywhere):

    python benchmarks/bench_worker_malloc.py [--calls 40]

Why it exists: distributed's Nanny gives workers MALLOC_TRIM_THRESHOLD_=65536, which also switches
off glibc's dynamic mmap threshold; the yaml file's comments say what that costs and why.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_engine import fmt_t, machine_info, machine_line, table, use_worker_dask_config, warm_workers  # noqa: E402


def kernel_times(calls: int) -> dict:
    """Median seconds per call of each kernel on one synthetic (24, 64, 64, 64) block."""
    import numpy as np

    from xtec_flows.engine.histogram import _stacked_hist
    from xtec_flows.numerics import threshold
    from xtec_flows.numerics.blocks import log_valid
    from xtec_flows.numerics.mixture import MixtureParams, e_step_stats
    from xtec_flows.synthetic import make_volume

    vol, _, _ = make_volume((24, 64, 64, 64), seed=0)
    stat = vol.mean(axis=0)
    v = log_valid(stat)
    q25, q75 = np.quantile(v, [0.25, 0.75])
    edges, _ = threshold.histogram_edges(float(v.min()), float(v.max()), float(q25), float(q75), 384**3)
    rows = np.ascontiguousarray(vol.reshape(24, -1)[:, :16384].T, dtype=np.float32)
    rows /= rows.mean(axis=1, keepdims=True) + 1e-9
    rng = np.random.default_rng(0)
    params = MixtureParams(np.full(4, 0.25), rows[rng.choice(rows.shape[0], 4)].astype(float), np.ones((4, 24)))
    kernels = {
        "threshold histogram of one block's log-means (block_hist)": lambda: _stacked_hist(stat, edges),
        "E-step statistics of 16,384 rows, K=4 (e_step_stats)": lambda: e_step_stats(rows, params),
        "temperature mean of one (24, 64, 64, 64) block": lambda: vol.mean(axis=0),
    }
    out = {}
    for name, f in kernels.items():
        f()
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    return out


def in_worker(calls: int, configured: bool) -> dict:
    from distributed import Client, LocalCluster

    if configured:
        use_worker_dask_config()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \
            Client(lc) as client:
        warm_workers(client)
        return client.submit(kernel_times, calls, pure=False).result()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=40, help="calls per kernel (median reported; default 40)")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    here = kernel_times(args.calls)
    default = in_worker(args.calls, configured=False)
    configured = in_worker(args.calls, configured=True)
    rows = [[name, fmt_t(here[name]), fmt_t(default[name]), f"{default[name] / here[name]:.2f}×",
             fmt_t(configured[name]), f"{configured[name] / here[name]:.2f}×"] for name in here]
    sys.stdout.write(
        f"_{started}; `python benchmarks/bench_worker_malloc.py --calls {args.calls}`._  \n"
        f"_Machine: {machine_line(machine_info())}._\n\n"
        + table(["kernel", "plain process", "worker, distributed defaults", "vs process",
                 "worker, deploy/dask/distributed.yaml", "vs process"], rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
