#!/usr/bin/env python
"""Sizing: measured per-worker throughput of the engine and of Tiled reads, and the workers a facility needs.

Everything is measured on this machine in one run, then turned into worker counts:

  engine   XTEC-d (``pipeline.run``, K=4) on a synthetic zarr volume (default 24x192^3, 648 MiB, above the
           engine's keep-everything limit so it takes the path a full-size scan takes): pinned to 1 core
           (dask threads, num_workers=1), on 2 cores (num_workers=2), and on a ``distributed.LocalCluster``
           of 1 and 2 single-threaded worker processes (what ``dask worker --nthreads 1`` runs). The ``xtec``
           reference (1 core, BLAS pinned) and the engine (1 core) on a smaller volume (default 24x64^3),
           because the reference needs a minute where the engine needs a second.
  tiled    the same volume uploaded to a real Tiled server (``xtec_flows.demo.services.TiledService``: a
           ``tiled serve config`` subprocess, SQLite catalog, zarr storage), read back through the HTTP
           client block by block (1 and 2 concurrent requests; MB/s, and the CPU seconds the server and the
           client spend per GB), then ``process_scan`` end to end with local threads and on a LocalCluster of
           one single-threaded worker that reads from Tiled itself (the deploy/ shape), with the time spent
           reading.
  sizing   from those numbers (nothing hard-coded): workers and Tiled server processes for a 24x700^3
           float32 scan within 15 minutes, and for one scan every N minutes.

With ``--tiled production`` the Tiled part runs against deploy/'s own Tiled instead (``tiled.service`` on
``deploy/tiled/config.yml``: catalog, authn and table databases on this machine's PostgreSQL, created and
dropped by the run, a Redis streaming cache, principals, scoped keys and the access policy from
``bootstrap_access.py all``), with the plugin's key: the scan is uploaded under /xtec (/raw takes bluesky
runs only), read and clustered from there. Its report is section 12.

Every measured configuration runs in its own subprocess, so peak RSS is that process's own and one run's
memory does not leak into the next. Seeds are fixed. Memory stays bounded: the volume is streamed from zarr
into Tiled and read back as a sum, never held whole; only the reference's small volume is loaded.

    python benchmarks/bench_sizing.py                     # ~4 min on 2 cores -> RESULTS.md section "sizing"
    python benchmarks/bench_sizing.py --size 24,128 --no-results      # quick look
    python benchmarks/bench_sizing.py --target 24,1000 --deadline-min 10 --cadence-min 2,5,10
    python benchmarks/bench_sizing.py --tiled production  # deploy/'s Tiled -> section 12 (needs PostgreSQL)

Progress goes to stderr, the tables to stdout and into benchmarks/RESULTS.md (section 10; 12 with --tiled production).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:  # run from a checkout without installing; bench_engine is a sibling
        sys.path.insert(0, _p)

from bench_engine import (  # noqa: E402  (shared formatting, machine line and RESULTS.md merge)
    fmt_bytes,
    fmt_t,
    fmt_x,
    log,
    machine_info,
    machine_line,
    merge_results,
    parse_shape,
    peak_rss_bytes,
    run_reference_pipeline,
    shape_str,
    table,
    use_worker_dask_config,
    warm_workers,
)
from xtec_flows.engine import StreamingLimits  # noqa: E402

#: --tiled: (RESULTS.md section id, its title)
SECTIONS = {
    "embedded": ("sizing", "10. Sizing: per-worker throughput and workers needed"),
    "production": ("sizing-production", "12. Sizing with deploy/'s Tiled: PostgreSQL catalog, API keys, access policy"),
}
K = 4
SCAN_KEY = "sizing_scan"
BYTES_PER_VALUE = 4  # float32 scans throughout


# ---------------------------------------------------------------------------------------
# children: one measured configuration per subprocess
# ---------------------------------------------------------------------------------------


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _pin(n_cores: int | None) -> list[int]:
    """Restrict this process (and the threads it starts) to ``n_cores`` CPUs; returns the CPUs used.

    Pinning, not just a thread count, makes "1 core" mean one core: the fit's and the label
    writer's thread pools size themselves from os.cpu_count() whatever dask is told."""
    allowed = sorted(os.sched_getaffinity(0))
    if n_cores is not None and n_cores < len(allowed):
        allowed = allowed[:n_cores]
        os.sched_setaffinity(0, allowed)
    return allowed


@contextlib.contextmanager
def _scheduler(cfg: dict):
    """dask threads with ``cfg['threads']`` workers, or a LocalCluster of ``cfg['workers']`` 1-thread processes.

    Yields a callable returning each worker's peak RSS (bytes) -- empty for threads."""
    import dask

    if not cfg.get("workers"):
        with dask.config.set(scheduler="threads", num_workers=cfg["threads"]):
            yield lambda: []
        return
    import logging

    from distributed import Client, LocalCluster

    use_worker_dask_config()
    with LocalCluster(n_workers=cfg["workers"], threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        client.wait_for_workers(cfg["workers"], timeout=60)
        warm_workers(client)
        yield lambda: sorted(client.run(peak_rss_bytes).values())


def child_engine(cfg: dict) -> dict:
    """``pipeline.run`` on a local zarr volume, ``cfg['repeat']`` times; the fastest run's breakdown."""
    import zarr

    from xtec_flows.engine import ClusterParams, run

    cpus = _pin(cfg.get("pin"))
    g = zarr.open_group(cfg["path"], mode="r")
    arr, temps = g["intensity"], np.asarray(g.attrs["temperatures"], dtype=np.float64)
    params = ClusterParams(mode="d", n_components=K)
    runs = []
    with _scheduler(cfg) as worker_rss:
        base_rss = _current_rss()  # after the imports and the cluster start: what the runs add
        for _ in range(cfg["repeat"]):
            t0 = time.perf_counter()
            res = run(arr, temps, params)
            runs.append((time.perf_counter() - t0, dict(res.timings), int(res.n_thresholded), int(res.n_valid)))
        workers = worker_rss()
    best = min(runs, key=lambda r: r[0])
    return {"cpus": cpus, "times": [r[0] for r in runs], "time": best[0], "timings": best[1],
            "n_thresholded": best[2], "n_valid": best[3], "rss": peak_rss_bytes(), "base_rss": base_rss,
            "worker_rss": workers}


def child_reference(cfg: dict) -> dict:
    """The ``xtec`` reference pipeline (K=4) on the volume loaded into memory, on one core."""
    import zarr

    cpus = _pin(1)
    g = zarr.open_group(cfg["path"], mode="r")
    volume = g["intensity"][...]
    t, th, gmm = run_reference_pipeline(volume, K, seed=0)
    return {"cpus": cpus, "time": t["total"], "timings": t, "epochs": int(gmm.epoch),
            "n_thresholded": int(len(th.ind_thresholded)), "rss": peak_rss_bytes()}


# The model sizes Tiled server processes, so every read here goes over HTTP. The server and the benchmark
# share a file system, where "auto" would read the zarr directly and bypass the server (section 15).
READ_MODE = "http"

CLUSTER_BLOCK_VOXELS = StreamingLimits().cluster_block_voxels


def child_process_scan(cfg: dict) -> dict:
    """``process_scan`` from the Tiled server, ``cfg['repeat']`` times into fresh results roots (the first
    run also warms the workers up, as a long-lived worker is), then a plain read of the same scan.

    The key comes from TILED_API_KEY in this child's environment (never its command line)."""
    from xtec_flows import tiled as tiled_io
    from xtec_flows.engine import ClusterParams
    from xtec_flows.tiled.process import process_scan

    cpus = _pin(cfg.get("pin"))
    client = tiled_io.connect(cfg["uri"])
    params = ClusterParams(mode="d", n_components=K)
    runs = []
    with _scheduler(cfg) as worker_rss:
        base_rss = _current_rss()
        for i in range(cfg["repeat"]):
            t0 = time.perf_counter()
            out = process_scan(client, cfg["scan"], params, root=f"{cfg['root']}_{i}", read_mode=READ_MODE)
            runs.append((time.perf_counter() - t0, dict(out.node.metadata), out.reused))
        # The same scan read once more, alone, with the same scheduler: how much of a run is the read.
        scan = tiled_io.open_scan(client, cfg["scan"], read_mode=READ_MODE)
        t0 = time.perf_counter()
        checksum = float(scan.volume.sum(dtype=np.float64).compute())
        read = time.perf_counter() - t0
        workers = worker_rss()
    total, md, reused = min(runs, key=lambda r: r[0])
    return {"cpus": cpus, "time": total, "times": [r[0] for r in runs], "read": read, "checksum": checksum,
            "reused": reused, "timings": md.get("timings", {}), "n_thresholded": md.get("n_thresholded"),
            "input_reads": md.get("input_reads"), "rss": peak_rss_bytes(), "base_rss": base_rss, "worker_rss": workers}


CHILDREN = {"engine": child_engine, "reference": child_reference, "process_scan": child_process_scan}


def run_child(kind: str, cfg: dict, timeout: float, env: dict | None = None) -> dict:
    """Run one configuration in a fresh interpreter; its JSON result (or {'error': ...})."""
    with tempfile.NamedTemporaryFile(prefix="xtec-sizing-", suffix=".json", delete=False) as f:
        out_path = f.name
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-config", json.dumps(cfg),
            "--child-out", out_path]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-12:])
            return {"error": f"exit {proc.returncode}: {tail}"}
        return json.loads(Path(out_path).read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(out_path)


# ---------------------------------------------------------------------------------------
# the sizing model (pure functions of the measured numbers)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    """What the worker counts are computed from, for one measured scan.

    voxel_temps : T x voxels of the measured scan
    worker_seconds : seconds of the streaming passes (read + statistics + threshold) with ONE 1-thread
        worker reading from Tiled: the part that divides over workers
    serial_seconds : everything else in ``process_scan`` (trajectory sort, fit, label scatter, result
        writes): runs in the flow-run process on the ``serve`` host and does not divide over workers
    server_mb_s : raw MB/s one Tiled server process delivered (best client concurrency measured)
    """

    voxel_temps: float
    worker_seconds: float
    serial_seconds: float
    server_mb_s: float

    def scaled(self, voxel_temps: float) -> tuple[float, float, float]:
        """(worker seconds, serial seconds, seconds of one server's reading) for a scan of ``voxel_temps``.

        Linear in voxel-temperatures: the passes stream every voxel; the serial part scales with the
        thresholded voxels, i.e. with the volume if the thresholded fraction is the same."""
        f = voxel_temps / self.voxel_temps
        read_s = voxel_temps * BYTES_PER_VALUE / 1e6 / self.server_mb_s
        return self.worker_seconds * f, self.serial_seconds * f, read_s


def needed(work_seconds: float, window_seconds: float) -> int | None:
    """Units (workers or servers) so that ``work_seconds`` of divisible work fits in ``window_seconds``;
    None when the window is empty (the serial part alone is too long)."""
    if window_seconds <= 0:
        return None
    return max(1, math.ceil(work_seconds / window_seconds))


def deadline_row(m: Measured, voxel_temps: float, deadline_s: float) -> dict:
    """Workers and servers so that one scan finishes within ``deadline_s`` (its parallel part has
    ``deadline_s - serial`` seconds)."""
    work, serial, read = m.scaled(voxel_temps)
    window = deadline_s - serial
    w, s = needed(work, window), needed(read, window)
    wall = None if w is None else serial + max(work / w, read / s)
    return {"work": work, "serial": serial, "read": read, "workers": w, "servers": s, "wall": wall}


def cadence_row(m: Measured, voxel_temps: float, every_s: float) -> dict:
    """Keeping up with one scan every ``every_s`` seconds.

    Steady state (``serve --limit`` ≥ 2, so one scan's serial part overlaps the next one's passes): the
    workers must do one scan's parallel work per interval, and the serve host must run
    ceil(serial / interval) flow runs at once. Strict (each scan done before the next arrives): the
    parallel part must fit in interval - serial."""
    work, serial, read = m.scaled(voxel_temps)
    strict_window = every_s - serial
    workers, servers = needed(work, every_s), needed(read, every_s)
    latency = serial + max(work / workers, read / servers)
    return {
        "workers": workers, "servers": servers, "latency": latency,
        "limit": max(1, math.ceil(latency / every_s)),
        "workers_strict": needed(work, strict_window), "servers_strict": needed(read, strict_window),
        "serial": serial,
    }


# ---------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------


def vt_rate(voxel_temps: float, seconds: float | None) -> float:
    return voxel_temps / seconds if seconds else float("nan")


def fmt_rate(v: float) -> str:
    """voxel-temperatures per second, in millions."""
    return "-" if not math.isfinite(v) else f"{v / 1e6:.0f} M/s" if v >= 1e7 else f"{v / 1e6:.2f} M/s"


def fmt_mb(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.0f} MB/s"


def breakdown(timings: dict) -> str:
    return ", ".join(f"{k} {fmt_t(v)}" for k, v in timings.items())


def load_now() -> str:
    """The 1-minute load average as a row is measured, so a reader can see which rows shared the machine."""
    return f"load {os.getloadavg()[0]:.1f}"


def worker_part(timings: dict) -> float:
    """Seconds of the passes that run as dask tasks over the volume's blocks (divide over workers)."""
    return float(timings.get("statistics", 0.0) + timings.get("threshold", 0.0))


def rss_note(res: dict) -> str:
    parts = [f"driver {fmt_bytes(res['rss'])}"]
    if res.get("worker_rss"):
        parts.append("worker(s) " + ", ".join(fmt_bytes(r) for r in res["worker_rss"]))
    return "; ".join(parts)


def write_volume(path: Path, shape, seed: int) -> tuple[float, object, np.ndarray]:
    import zarr

    from xtec_flows.synthetic import write_zarr

    t0 = time.perf_counter()
    write_zarr(path, shape, seed=seed, overwrite=True)
    dt = time.perf_counter() - t0
    g = zarr.open_group(str(path), mode="r")
    return dt, g["intensity"], np.asarray(g.attrs["temperatures"], dtype=np.float64)


def _cpu_seconds(proc) -> float:
    """User + system CPU seconds of a psutil process and its children."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(Exception):
            c = p.cpu_times()
            total += c.user + c.system
    return total


def measure_engine(args, path: Path, ref_path: Path, vt: float, ref_vt: float) -> tuple[list, dict]:
    configs = [
        ("1 thread (dask threads, num_workers=1, pinned to 1 core)", 1, {"threads": 1, "pin": 1}),
        ("2 threads (dask threads, num_workers=2, 2 cores)", 2, {"threads": 2, "pin": 2}),
        ("LocalCluster 1 worker × 1 thread (processes)", 1, {"workers": 1}),
        ("LocalCluster 2 workers × 1 thread (processes)", 2, {"workers": 2}),
    ]
    rows, results = [], {}
    for label, cores, cfg in configs:
        log(f"engine: {label}")
        res = run_child("engine", {"path": str(path), "repeat": args.repeat, **cfg}, args.child_timeout)
        results[label] = res
        if "error" in res:
            rows.append([label, cores, "failed", "-", "-", res["error"][:200], "-"])
            continue
        rate = vt_rate(vt, res["time"])
        rows.append([label, cores, fmt_t(res["time"]), fmt_rate(rate), fmt_rate(rate / cores),
                     breakdown(res["timings"]) + f"; all runs {', '.join(fmt_t(x) for x in res['times'])}; {load_now()}",
                     rss_note(res)])
    log("engine: the xtec reference on the comparison volume (1 core)")
    ref = run_child("reference", {"path": str(ref_path)}, args.child_timeout)
    log("engine: xtec-flows on the comparison volume (1 core)")
    small = run_child("engine", {"path": str(ref_path), "repeat": args.repeat, "threads": 1, "pin": 1},
                      args.child_timeout)
    results["reference"], results["small"] = ref, small
    for label, res, note in (
        (f"xtec-flows, 1 thread, pinned to 1 core ({shape_str(args.ref_shape)})", small,
         lambda r: breakdown(r["timings"])),
        (f"**xtec 0.1.1 reference** (Mask_Zeros, Threshold_Background KL, GMM K={K}; BLAS 1 thread; "
         f"pinned to 1 core; {shape_str(args.ref_shape)})", ref,
         lambda r: f"{breakdown(r['timings'])}; {r['epochs']} EM epochs"),
    ):
        if "error" in res:
            rows.append([label, 1, "failed", "-", "-", res["error"][:200], "-"])
        else:
            rate = vt_rate(ref_vt, res["time"])
            rows.append([label, 1, fmt_t(res["time"]), fmt_rate(rate), fmt_rate(rate), f"{note(res)}; {load_now()}",
                         rss_note(res)])
    return rows, results


@dataclass
class SizingTiled:
    """The Tiled server a sizing run uploads to and reads from.

    service : the server process (``uri``, ``pid``, ``wait_ready``, ``ready``, ``start_timeout``, ``stop``)
    api_key : the key that uploads, reads and processes the scan (the plugin's on deploy/'s Tiled)
    scan_path : where the scan is written, below the top level
    results_prefix : where process_scan's results roots go ("" or "xtec/")
    description : one sentence for the report
    stop : stops the server and whatever it needs (idempotent)
    """

    service: object
    api_key: str
    scan_path: str
    results_prefix: str
    description: str
    stop: object


def launch_tiled(workdir: Path, kind: str) -> SizingTiled:
    """Start the Tiled server of ``kind`` (see --tiled). The embedded one is not waited for: its start-up
    (catalog creation) overlaps the untimed volume writing."""
    if kind == "production":
        return _launch_production_tiled(workdir)
    from xtec_flows.demo.services import TiledService

    api_key = secrets.token_hex(16)  # alphanumeric, as tiled requires; lives only in environments
    srv = TiledService(workdir / "tiled", api_key, streaming_cache=None)
    log("tiled: launching a Tiled server subprocess")
    srv.launch()
    return SizingTiled(
        srv, api_key, SCAN_KEY, "",
        "A `tiled serve config` subprocess (`xtec_flows.demo.services.TiledService`: SQLite catalog, zarr storage, "
        "API key) on 127.0.0.1",
        srv.stop)


def _launch_production_tiled(workdir: Path) -> SizingTiled:
    tests = str(HERE.parent / "tests")
    if tests not in sys.path:  # deploy/'s Tiled is started by the production tier's own harness
        sys.path.insert(0, tests)
    from production_support import Databases, bootstrap_access, launch_production_tiled, missing_services

    reason = missing_services()
    if reason is not None:
        raise RuntimeError(f"--tiled production needs PostgreSQL and redis-server: {reason}")
    dbs, started = Databases(), []

    def stop():
        for proc in reversed(started):
            proc.stop()
        dbs.drop()

    try:
        log("tiled: starting deploy/'s Tiled (PostgreSQL, Redis, access policy) and bootstrapping its access")
        tier = launch_production_tiled(workdir / "production", dbs, started)
        tier.tiled.wait_ready(tier.tiled.ready, tier.tiled.start_timeout)
        values = bootstrap_access(tier)
    except BaseException:
        stop()
        raise
    # /raw holds bluesky runs only (its client looks keys up as run uids), so the plain array goes under
    # /xtec, where the plugin's key may write: the reads are the plugin's either way.
    return SizingTiled(
        tier.tiled, values["XTEC_FLOWS_TILED_API_KEY"], f"xtec/{SCAN_KEY}", "xtec/",
        "deploy/'s Tiled (`tiled.service` on `deploy/tiled/config.yml`: catalog, authn and table databases on "
        "PostgreSQL, Redis streaming cache, TagBasedAccessPolicy, keys from `bootstrap_access.py all`) on "
        "127.0.0.1; the plugin's key uploads the scan under /xtec (/raw takes bluesky runs only), reads it and "
        "writes results there",
        stop)


def measure_tiled(args, server, arr, temps, vt: float, nbytes: int) -> tuple[list, list, dict]:
    import dask
    import dask.array as da
    import psutil

    from xtec_flows.demo.services import child_env
    from xtec_flows import tiled as tiled_io

    srv = server.service
    t0 = time.perf_counter()
    srv.wait_ready(srv.ready, srv.start_timeout)
    log(f"tiled: server up (waited {fmt_t(time.perf_counter() - t0)} more)")
    rows_io, rows_ps, out = [], [], {}
    try:
        process = psutil.Process(srv.pid)
        parent, _, key = server.scan_path.rpartition("/")
        client = tiled_io.connect(srv.uri, server.api_key)
        log("tiled: upload, block by block from the zarr (dask threads)")
        t0 = time.perf_counter()
        tiled_io.walk(client, parent).write_array(
            da.from_zarr(arr), key=key, dims=["T", "L", "K", "H"], metadata={"temperatures": temps.tolist()})
        t_up = time.perf_counter() - t0
        rows_io.append(["upload (`client.write_array` of `da.from_zarr(...)`: one `write_block` per zarr chunk, "
                        "2 dask threads)", fmt_t(t_up), fmt_mb(nbytes, t_up), "-", load_now()])
        local_sum = float(da.from_zarr(arr).sum(dtype=np.float64).compute())
        scan = tiled_io.open_scan(client, server.scan_path, read_mode=READ_MODE)
        best = (0.0, None)
        for n in args.read_concurrency:
            times, cpu_srv, cpu_cli, sums = [], [], [], []
            for _ in range(args.repeat):
                s0, c0, t0 = _cpu_seconds(process), time.process_time(), time.perf_counter()
                with dask.config.set(scheduler="threads", num_workers=n):
                    sums.append(float(scan.volume.sum(dtype=np.float64).compute()))
                times.append(time.perf_counter() - t0)
                cpu_srv.append(_cpu_seconds(process) - s0)
                cpu_cli.append(time.process_time() - c0)
            i = int(np.argmin(times))
            mb_s = nbytes / times[i] / 1e6
            log(f"tiled: read with {n} concurrent request(s): {mb_s:.0f} MB/s")
            if mb_s > best[0]:
                best = (mb_s, n)
            out[f"read_{n}"] = {"time": times[i], "cpu_server": cpu_srv[i], "cpu_client": cpu_cli[i]}
            same = all(math.isclose(s, local_sum, rel_tol=1e-9) for s in sums)
            rows_io.append([f"read: `open_scan(...).volume.sum()`, {n} concurrent request(s) "
                            f"({math.prod(scan.volume.numblocks)} blocks of {tuple(max(c) for c in scan.volume.chunks)})",
                            fmt_t(times[i]), fmt_mb(nbytes, times[i]),
                            f"server {cpu_srv[i] / (nbytes / 1e9):.2f} s/GB, client {cpu_cli[i] / (nbytes / 1e9):.2f} s/GB",
                            f"{'equal' if same else '**differs**'}; all runs {', '.join(fmt_t(x) for x in times)}; "
                            f"{load_now()}"])
        out["server_mb_s"], out["best_concurrency"] = best
        gb = nbytes / 1e9
        out["server_cpu_s_per_gb"] = min(out[f"read_{n}"]["cpu_server"] for n in args.read_concurrency) / gb
        out["client_cpu_s_per_gb"] = min(out[f"read_{n}"]["cpu_client"] for n in args.read_concurrency) / gb

        env = child_env(TILED_API_KEY=server.api_key)
        for label, cfg in (
            ("local threads (2, like `serve` without `--dask-address`)", {"threads": 2}),
            ("LocalCluster 1 worker × 1 thread; the worker reads from Tiled (deploy/ shape)", {"workers": 1}),
        ):
            root = f"{server.results_prefix}sizing_{len(rows_ps)}"
            log(f"tiled: process_scan, {label}")
            res = run_child("process_scan", {"uri": srv.uri, "scan": server.scan_path, "root": root,
                                             "repeat": args.repeat, **cfg},
                            args.child_timeout, env=env)
            out[label] = res
            if "error" in res:
                rows_ps.append([label, "failed", "-", "-", "-", res["error"][:200], "-"])
                continue
            tm = res["timings"]
            engine_s = sum(tm.values())
            stream = worker_part(tm)
            rows_ps.append([
                label, fmt_t(res["time"]), fmt_rate(vt_rate(vt, res["time"])),
                f"{100 * res['read'] / res['time']:.0f}% (plain read {fmt_t(res['read'])}, "
                f"{fmt_mb(nbytes, res['read'])})",
                f"{100 * tm.get('statistics', 0) / res['time']:.0f}%",
                breakdown(tm) + f"; outside the engine (open_scan, result node, label and array writes) "
                f"{fmt_t(res['time'] - engine_s)}; streaming passes {fmt_t(stream)}; all runs "
                + ", ".join(fmt_t(x) for x in res["times"]) + f"; {load_now()}",
                rss_note(res),
            ])
        ps_sum = [r.get("checksum") for k, r in out.items() if isinstance(r, dict) and "checksum" in r]
        out["checksums_equal"] = all(math.isclose(s, local_sum, rel_tol=1e-9) for s in ps_sum)
    finally:
        log("tiled: stopping the server")
        server.stop()
    return rows_io, rows_ps, out


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def sizing_tables(args, m: Measured, worker_rss: float | None, driver: tuple[float, float] | None,
                  n_voxels_measured: int) -> list[str]:
    t, *spatial = args.target_shape
    n_target = math.prod(spatial)
    vt_target = float(t * n_target)
    b_target = vt_target * BYTES_PER_VALUE
    work, serial, read = m.scaled(vt_target)
    deadline_s = args.deadline_min * 60
    d = deadline_row(m, vt_target, deadline_s)
    md = [
        f"**Model.** For a scan of V voxel-temperatures (B = 4·V bytes) with W single-threaded workers and S Tiled "
        f"server processes: t(W, S) = t_serial + max(t_worker / W, B / (S · R)), where, scaled linearly from the "
        f"measured {shape_str(args.shape)} scan (V₀ = {m.voxel_temps:.3g}):",
        "",
        f"* t_worker = {fmt_t(m.worker_seconds)} · V/V₀: the streaming passes (read from Tiled, statistics, "
        "threshold) with ONE 1-thread worker (LocalCluster row of the process_scan table), i.e. "
        f"{fmt_rate(m.voxel_temps / m.worker_seconds)} voxel-temperatures per worker core;",
        f"* t_serial = {fmt_t(m.serial_seconds)} · V/V₀: the rest of that run (trajectory sort, fit, labels, result "
        "writes), which runs in the flow-run process on the `serve` host;",
        f"* R = {m.server_mb_s:.0f} MB/s: one Tiled server process, best client concurrency in the read table.",
        "",
        "Assumptions: (1) read and pass cost scale with all voxels, whatever fraction passes the KL cut; the serial "
        "part scales with the thresholded voxels, taken to be the same fraction as in the synthetic scan "
        f"({args.thresholded_fraction:.1%} here); EM iterations are taken as measured. (2) Workers never wait on each "
        "other (the passes are independent blocks); reads are limited by the Tiled servers (R each) before the "
        "network. (3) Measured on a shared 2-CPU machine where the server, the worker and the driver share the "
        "cores, so R and the per-worker rate are lower bounds for dedicated hosts; a Tiled server's own cost was "
        f"{args.server_cpu:.2f} CPU-s per GB (≈ {1000 / args.server_cpu:.0f} MB/s per server core if nothing else ran).",
        "",
        f"### {shape_str(args.target_shape)} float32 scan ({fmt_bytes(b_target)}) within {args.deadline_min:g} min",
        "",
        table(["quantity", "value"], [
            ["worker time (1 worker)", fmt_t(work)],
            ["serial part on the serve host", fmt_t(serial)],
            ["reading with one Tiled server", fmt_t(read)],
            [f"**workers (1 core each) to finish within {args.deadline_min:g} min**",
             "**impossible: the serial part alone is longer**" if d["workers"] is None else f"**{d['workers']}**"],
            ["**Tiled server processes**", "-" if d["servers"] is None else f"**{d['servers']}**"],
            ["expected wall time with those", fmt_t(d["wall"]) if d["wall"] else "-"],
        ]),
        "",
        f"### Keeping up with one {shape_str(args.target_shape)} scan every N minutes",
        "",
    ]
    rows = []
    for n in args.cadence_min:
        c = cadence_row(m, vt_target, n * 60)
        rows.append([f"{n:g}", c["workers"], c["servers"], fmt_t(c["latency"]), c["limit"],
                     "impossible" if c["workers_strict"] is None else c["workers_strict"],
                     "-" if c["servers_strict"] is None else c["servers_strict"]])
    md += [
        table(["every N min", "workers (steady state)", "Tiled servers (steady state)", "latency per scan",
               "`serve --limit` needed", "workers (each scan done before the next)", "Tiled servers (idem)"], rows),
        "",
        "Steady state: the workers do one scan's passes per interval; `--limit` flow runs overlap so one scan's "
        "serial part runs while the next is read. 'Each scan done before the next': the passes must fit in "
        "interval − t_serial.",
    ]
    if worker_rss is not None or driver is not None:
        md += ["", "Memory: "
               + (f"peak RSS of one 1-thread worker {fmt_bytes(worker_rss)} (bounded by the block size: on a cluster "
                  f"each task holds one float32 block of the whole T axis and at least {CLUSTER_BLOCK_VOXELS:,} "
                  f"voxels (storage chunks merged, `StreamingLimits.cluster_block_voxels`), "
                  f"{fmt_bytes(24 * CLUSTER_BLOCK_VOXELS * 4)} at T=24, plus its kept "
                  "trajectories; it does not grow with the scan). " if worker_rss is not None else "")
               + (f"The flow-run (driver) process peaked at {fmt_bytes(driver[1])} over a {fmt_bytes(driver[0])} "
                  f"baseline; the excess holds the kept trajectories and grows with the thresholded voxels: "
                  f"≈ {fmt_bytes(driver[0] + (driver[1] - driver[0]) * n_target / n_voxels_measured)} for "
                  f"{shape_str(args.target_shape)} at the same fraction." if driver is not None else "")]
    return md


def build_report(args, machine, la_start, eng_rows, eng, tiled_io_rows, ps_rows, tl, gen_s, nbytes, vt,
                 tiled_description: str) -> str:
    md = [
        f"Volume {shape_str(args.shape)} float32 ({fmt_bytes(nbytes)}, V₀ = {vt:.3g} voxel-temperatures), "
        f"`synthetic.write_zarr` seed 0, chunks (24, 64, 64, 64), written in {fmt_t(gen_s)} (not timed below; the "
        "runs read it warm from the page cache). Each row is a fresh subprocess; times are the best of "
        f"{args.repeat} (all runs shown). XTEC-d, K={K}, `ClusterParams` defaults (n_init=3). Throughput is "
        "voxel-temperatures per second (T × voxels / s); 'per core' divides by the cores the configuration had. "
        "Peak RSS is each process's own high-water mark (VmHWM; workers' via `Client.run`). 'load' is the "
        "machine's 1-minute load average when the row finished.",
        "",
        f"Machine load average at the start of the run: {', '.join(f'{x:.2f}' for x in la_start)} "
        f"({machine['cpus']} CPUs).",
        "",
        "### Engine throughput on a local zarr",
        "",
        table(["configuration", "cores", "time", "voxel-T/s", "per core", "breakdown", "peak RSS"], eng_rows),
        "",
    ]
    ref, small = eng.get("reference", {}), eng.get("small", {})
    if "error" not in ref and "error" not in small:
        md += [f"Per core on the same {shape_str(args.ref_shape)} data, xtec-flows is {fmt_x(ref['time'] / small['time'])} "
               f"the reference ({ref['n_thresholded']:,} vs {small['n_thresholded']:,} thresholded voxels).", ""]
    md += [
        "### Tiled: reads through the HTTP client, and process_scan",
        "",
        f"{tiled_description}; clients use `xtec_flows.tiled.connect` "
        "(uncompressed responses). Reads sum the scan block by block (nothing held whole); CPU is user+system "
        "seconds of the server process and of the reading process. process_scan writes into a fresh results root; "
        "'reading' is the same scan read once more alone with the same scheduler, as a share of the run.",
        "",
        table(["step", "time", "MB/s", "CPU per GB read", "notes"], tiled_io_rows),
        "",
        table(["process_scan", "time", "voxel-T/s", "reading (share)", "statistics pass (share)", "breakdown",
               "peak RSS"], ps_rows),
        "",
    ]
    return "\n".join(md)


def main_run(args) -> int:
    command = "python benchmarks/bench_sizing.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    if args.wait_load is not None:
        deadline = time.monotonic() + args.wait_max
        while os.getloadavg()[0] > args.wait_load and time.monotonic() < deadline:
            log(f"load average {os.getloadavg()[0]:.2f} > {args.wait_load}; waiting")
            time.sleep(15)
    machine = machine_info()
    la_start = os.getloadavg()
    log(f"machine: {machine_line(machine)}")
    workdir = Path(tempfile.mkdtemp(prefix="xtec-sizing-", dir=args.workdir))
    t_all = time.perf_counter()
    server = None
    try:
        server = launch_tiled(workdir, args.tiled)
        log(f"writing {shape_str(args.shape)} and {shape_str(args.ref_shape)} synthetic volumes")
        gen_s, arr, temps = write_volume(workdir / "scan.zarr", args.shape, seed=0)
        write_volume(workdir / "small.zarr", args.ref_shape, seed=0)
        nbytes = BYTES_PER_VALUE * math.prod(args.shape)
        vt = float(math.prod(args.shape))
        ref_vt = float(math.prod(args.ref_shape))
        eng_rows, eng = measure_engine(args, workdir / "scan.zarr", workdir / "small.zarr", vt, ref_vt)
        tiled_io_rows, ps_rows, tl = measure_tiled(args, server, arr, temps, vt, nbytes)
        body = build_report(args, machine, la_start, eng_rows, eng, tiled_io_rows, ps_rows, tl, gen_s, nbytes, vt,
                            server.description)
        dist = tl.get("LocalCluster 1 worker × 1 thread; the worker reads from Tiled (deploy/ shape)", {})
        if "error" in dist or "timings" not in dist or not tl.get("server_mb_s"):
            body += "\n**Sizing skipped**: the process_scan run on a worker or the Tiled reads failed (see above).\n"
            failed = True
        else:
            stream = worker_part(dist["timings"])
            m = Measured(voxel_temps=vt, worker_seconds=stream, serial_seconds=dist["time"] - stream,
                         server_mb_s=tl["server_mb_s"])
            n_vox = math.prod(args.shape[1:])
            args.thresholded_fraction = (dist.get("n_thresholded") or 0) / n_vox
            args.server_cpu = tl["server_cpu_s_per_gb"]
            worker_rss = max(dist["worker_rss"]) if dist.get("worker_rss") else None
            driver = (dist["base_rss"], dist["rss"])
            body += "\n" + "\n".join(sizing_tables(args, m, worker_rss, driver, n_vox)) + "\n"
            failed = not tl.get("checksums_equal", False)
            if failed:
                body += "\n**Check failed**: a Tiled read differs from the local zarr.\n"
    except Exception as exc:
        traceback.print_exc()
        body = f"**Run failed**: `{type(exc).__name__}: {exc}`"
        failed = True
    finally:
        if server is not None:
            server.stop()  # idempotent: measure_tiled stops it too
        shutil.rmtree(workdir, ignore_errors=True)
    la_end = os.getloadavg()
    section, title = SECTIONS[args.tiled]
    block = (
        f"## {title}\n\n"
        f"_{machine['date']}; `{command}`; took {fmt_t(time.perf_counter() - t_all)}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in la_start)}, at end {', '.join(f'{x:.2f}' for x in la_end)}._  \n"
        f"_Machine: {machine_line(machine)}._\n\n{body}\n"
    )
    print(block, flush=True)
    if args.results and not failed:
        merge_results(Path(args.results), {section: block})
        log(f"section '{section}' merged into {args.results}")
    elif args.results:
        log("not writing RESULTS.md: the run failed")
    return 1 if failed else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--size", default="24,192", help="measured scan, 'T,N' (N³) or 'T,L,K,H' (default 24,192)")
    p.add_argument("--ref-size", default="24,64", help="volume for the xtec reference comparison (default 24,64)")
    p.add_argument("--target", default="24,700", help="scan to size for (default 24,700)")
    p.add_argument("--deadline-min", type=float, default=15.0, help="minutes one target scan may take (default 15)")
    p.add_argument("--cadence-min", default="5,10,15,30", help="scan intervals in minutes (default 5,10,15,30)")
    p.add_argument("--read-concurrency", default="1,2",
                   help="concurrent Tiled requests to try (default 1,2; more on a server with more cores)")
    p.add_argument("--repeat", type=int, default=2, help="runs per engine configuration and Tiled read (default 2)")
    p.add_argument("--tiled", choices=sorted(SECTIONS), default="embedded",
                   help="the Tiled server to read from: the embedded default (SQLite; section 10) or deploy/'s "
                        "production configuration (PostgreSQL, Redis, API keys, access policy; section 12)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"), help="markdown file to merge the section into")
    p.add_argument("--no-results", action="store_true", help="print only")
    p.add_argument("--workdir", default=None, help="where the temporary volumes and the Tiled server live")
    p.add_argument("--wait-load", type=float, default=None,
                   help="wait (up to --wait-max s) until the 1-minute load average is below this before starting")
    p.add_argument("--wait-max", type=float, default=600.0)
    p.add_argument("--child-timeout", type=float, default=600.0, help="seconds before a measured subprocess is killed")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    args.shape, args.ref_shape, args.target_shape = (parse_shape(s) for s in (args.size, args.ref_size, args.target))
    args.cadence_min = [float(x) for x in args.cadence_min.split(",") if x.strip()]
    args.read_concurrency = [int(x) for x in args.read_concurrency.split(",") if x.strip()]
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1; got {args.repeat}")
    if args.no_results:
        args.results = None
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = CHILDREN[args.child](json.loads(args.child_config))
        Path(args.child_out).write_text(json.dumps(result))
        return 0
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
