"""Latency and throughput of automatic post-scan processing on the embedded default stack.

Starts Tiled (SQLite + zarr + memory streaming cache), a Prefect server (SQLite) and
``xtec-flows serve`` on 127.0.0.1, then

* latency: one 24x64^3 scan at a time (RunEngine + TiledWriter); time from the run's stop
  document to its result's ``completed`` stamp in Tiled, and the phases in between (flow-run
  creation, start, end) read from Prefect's API;
* burst: N scans back to back; throughput (scans/min), p50/p95 latency and the peak number of
  concurrent flow runs (from Prefect's start/end times);
* baseline: the same scan clustered in one process with the engine alone, and with the `xtec`
  reference (XTEC-d at the same K) on the same data, so the orchestration overhead is visible.

    python benchmarks/bench_flows.py [--repeats 3] [--burst 10] [--limit 2] [--shape 24,64,64,64]

With ``--compare-burst`` it instead runs the load test's burst (20 scans from two acquisition
processes, small scans) on the embedded default and on the production stack of deploy/
(PostgreSQL, Redis, Dask scheduler + 2 workers, access policy; needs PostgreSQL on 127.0.0.1:5432
and redis-server) and reports throughput, p50/p95 latency and peak concurrent runs for both.

Prints markdown tables; the numbers in RESULTS.md came from this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from flow_support import (  # noqa: E402
    burst_outcome,
    max_overlap,
    parse_time,
    runs_for_scan,
    start_stack,
    write_burst,
)

from xtec_flows.demo.beamline import run_temperature_scan, scan_volumes  # noqa: E402
from xtec_flows.demo.stack import wait_for_result  # noqa: E402


def _percentile(values, q):
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def _flow_run(api_url, uid, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in runs_for_scan(api_url, uid) if r["state_type"] == "COMPLETED"]
        if runs:
            return runs[0]
        time.sleep(0.3)
    raise TimeoutError(uid)


def one_scan(stack, temps, shape, seed):
    client = stack.client()
    uid = run_temperature_scan(client["raw"], temps, spatial_shape=shape, seed=seed)
    stop_t = float(client["raw"][uid].metadata["stop"]["time"])
    node = wait_for_result(client, uid, 600, poll=0.1)
    done_t = parse_time(node.metadata["completed"])
    run = _flow_run(stack.prefect.api_url, uid)
    return {
        "uid": uid,
        "stop_to_complete": done_t - stop_t,
        "stop_to_run_created": parse_time(run["created"]) - stop_t,
        "created_to_start": parse_time(run["start_time"]) - parse_time(run["created"]),
        "run_seconds": parse_time(run["end_time"]) - parse_time(run["start_time"]),
        "interval": (parse_time(run["start_time"]), parse_time(run["end_time"])),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--burst", type=int, default=10)
    ap.add_argument("--limit", type=int, default=2)
    ap.add_argument("--shape", default="24,64,64,64")
    ap.add_argument("--no-reference", action="store_true", help="skip the xtec reference baseline")
    ap.add_argument("--compare-burst", action="store_true",
                    help="only the burst, on the embedded default and on the production stack")
    ap.add_argument("--writers", type=int, default=2, help="acquisition processes in --compare-burst")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "RESULTS.md"),
                    help="markdown file to merge the section into ('' for stdout only)")
    args = ap.parse_args(argv)
    if args.compare_burst:
        return compare_burst(args, argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    temps = np.linspace(20.0, 300.0, shape[0])
    with tempfile.TemporaryDirectory(prefix="xtec-bench-flows-") as tmp:
        t0 = time.perf_counter()
        stack = start_stack(Path(tmp), serve_args=["--limit", str(args.limit), "--reconcile-seconds", "30"])
        startup = time.perf_counter() - t0
        try:
            lat = [one_scan(stack, temps, shape[1:], seed=i) for i in range(args.repeats)]
            t_burst = time.time()
            uids = [run_temperature_scan(stack.client()["raw"], temps, spatial_shape=shape[1:], seed=100 + i)
                    for i in range(args.burst)]
            client = stack.client()
            done = {}
            for uid in uids:
                node = wait_for_result(client, uid, 900, poll=0.2)
                stop_t = float(client["raw"][uid].metadata["stop"]["time"])
                done[uid] = (stop_t, parse_time(node.metadata["completed"]))
            t_end = max(c for _, c in done.values())
            runs = [_flow_run(stack.prefect.api_url, u) for u in uids]
            all_runs = [r for u in uids for r in runs_for_scan(stack.prefect.api_url, u)]
        finally:
            stack.stop()

    from xtec_flows import cluster

    vol = scan_volumes(temps, shape[1:], seed=0)
    t0 = time.perf_counter()
    cluster(vol, temps, n_components=3)
    engine_s = time.perf_counter() - t0
    ref_s = None
    if not args.no_reference:
        ref_s = _reference_seconds(vol, temps)

    out = []
    emit = out.append  # the tables go to stdout and into RESULTS.md
    emit("## 9. Automatic post-scan processing (Prefect + watcher), embedded default\n")
    emit(f"_{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; `python benchmarks/bench_flows.py "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}`; load average at the end "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}._\n")
    emit("Latency is measured from the run's stop document (its `time`) to the result's `completed` stamp in "
          "Tiled; the phases come from Prefect's flow-run records. Tiled with SQLite + memory streaming cache, "
          f"Prefect server on SQLite, `xtec-flows serve --limit {args.limit} --query-seconds 1`, all on 127.0.0.1.\n")
    emit(f"### Post-scan latency, {'x'.join(map(str, shape))} float32 scan, embedded default "
          f"(stack start-up {startup:.1f} s)\n")
    emit("| run | stop -> run created (s) | created -> started (s) | flow run (s) | stop -> complete in Tiled (s) |")
    emit("|---|---|---|---|---|")
    for i, r in enumerate(lat):
        emit(f"| {i + 1} | {r['stop_to_run_created']:.2f} | {r['created_to_start']:.2f} | {r['run_seconds']:.2f} | "
              f"{r['stop_to_complete']:.2f} |")
    med = statistics.median(r["stop_to_complete"] for r in lat)
    emit("\n| target | value | status |\n|---|---|---|")
    emit(f"| median stop document -> complete result, {'x'.join(map(str, shape))} scan ≤ 15 s | {med:.1f} s | "
          f"{'met' if med <= 15 else 'NOT met'} |")
    emit(f"| every burst scan processed exactly once | {len(all_runs)} flow runs for {args.burst} scans | "
          f"{'met' if len(all_runs) == args.burst else 'NOT met'} |")
    peak = max_overlap([(parse_time(r['start_time']), parse_time(r['end_time'])) for r in runs])
    emit(f"| peak concurrent runs ≤ --limit | {peak} | {'met' if peak <= args.limit else 'NOT met'} |\n")
    lats = [c - s for s, c in done.values()]
    span = t_end - t_burst
    emit(f"### Burst of {args.burst} scans, serve --limit {args.limit}\n")
    emit("| scans | flow runs | wall (s) | throughput (scans/min) | p50 latency (s) | p95 latency (s) | peak concurrent runs |")
    emit("|---|---|---|---|---|---|---|")
    emit(f"| {args.burst} | {len(all_runs)} | {span:.1f} | {60 * args.burst / span:.1f} | {_percentile(lats, 50):.1f} | "
          f"{_percentile(lats, 95):.1f} | {max_overlap([(parse_time(r['start_time']), parse_time(r['end_time'])) for r in runs])} |")
    emit("\n### Same scan, one process, no orchestration\n")
    emit("| engine | seconds |")
    emit("|---|---|")
    emit(f"| xtec-flows cluster() (XTEC-d, K=3) | {engine_s:.2f} |")
    if ref_s is not None:
        emit(f"| xtec reference (XTEC-d, K=3) | {ref_s:.2f} |")
    emit("\nThe phases: stop -> run created is the websocket event, the rule check and the idempotent "
         "`run_deployment`; created -> started is the runner's poll plus a fresh Python process importing "
         "prefect, dask and tiled; the flow run reads the scan over HTTP, clusters, writes the result node "
         "(about 34 requests in all) and then renders the maps and artifacts. The burst's latency beyond "
         "the single-scan figure is queueing behind `--limit`.")
    _publish("\n".join(out) + "\n", args.results, "flows")
    return 0


BURST_SHAPE = (6, 12, 12, 12)  # the load test's scans: orchestration, not clustering, is measured


def _burst_on(name: str, start, client_of, api_url_of, key_of, args) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"xtec-bench-burst-{name}-") as tmp:
        t0 = time.perf_counter()
        stack = start(Path(tmp))
        startup = time.perf_counter() - t0
        try:
            per_writer = args.burst // args.writers
            uids = write_burst(stack.tiled.uri, key_of(stack), writers=args.writers, per_writer=per_writer,
                               n_temps=BURST_SHAPE[0], shape=BURST_SHAPE[1:])
            outcome = burst_outcome(client_of(stack), api_url_of(stack), uids, timeout=1800)
        finally:
            stack.stop()
    stops = list(outcome["stops"].values())
    return {**outcome, "stack": name, "startup": startup, "scans": len(uids),
            "runs": sum(len(r) for r in outcome["runs"].values()),
            "completed": sum(r["state_type"] == "COMPLETED" for rs in outcome["runs"].values() for r in rs),
            "acquisition": max(stops) - min(stops)}


def compare_burst(args, argv) -> int:
    from production_support import missing_services, start_production_stack

    rows = [_burst_on("embedded default (SQLite, memory cache, threads)",
                      lambda d: start_stack(d, serve_args=["--limit", str(args.limit), "--reconcile-seconds", "30"]),
                      lambda s: s.client(), lambda s: s.prefect.api_url, lambda s: s.api_key, args)]
    reason = missing_services()
    if reason is None:
        rows.append(_burst_on("production (PostgreSQL, Redis, Dask 2 workers, access policy)",
                              lambda d: start_production_stack(d, limit=args.limit, reconcile_seconds=30.0),
                              lambda s: s.plugin(), lambda s: s.prefect.api_url, lambda s: s.writer_key, args))
    out = [f"## 11. Burst of {args.burst} scans: production stack vs embedded default\n",
           f"_{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; `python benchmarks/bench_flows.py "
           f"{' '.join(argv if argv is not None else sys.argv[1:])}`; load average at the end "
           f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} cores._\n",
           f"{args.burst} scans of {'x'.join(map(str, BURST_SHAPE))} from {args.writers} acquisition processes "
           f"(RunEngine + TiledWriter each) while `xtec-flows serve --limit {args.limit}` processes them. "
           "Latency: stop document -> the result's `completed` stamp; throughput over first stop -> last "
           "completion; peak concurrency from Prefect's flow-run start/end times.\n",
           "| stack | start-up (s) | acquisition span (s) | flow runs (completed) | wall (s) | throughput (scans/min) "
           "| p50 latency (s) | p95 latency (s) | peak concurrent runs |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['stack']} | {r['startup']:.0f} | {r['acquisition']:.0f} | {r['runs']} ({r['completed']}) | "
                   f"{r['span']:.0f} | {r['throughput']:.1f} | {_percentile(r['latencies'], 50):.0f} | "
                   f"{_percentile(r['latencies'], 95):.0f} | {r['peak']} |")
    if reason is not None:
        out.append(f"\nProduction stack not measured: {reason}.")
    out.append("\nEach flow run is a fresh Python process (Prefect's runner) that imports prefect, dask and tiled, "
               "and makes about 50 HTTP requests to Tiled (resolve the scan, read it, create and fill the result "
               "node, read it back for the maps). On the production stack every request also authenticates an "
               "API key against PostgreSQL (tiled records the key's latest activity, a write per request) and "
               "passes the access policy, and the chunks are read by Dask worker processes, so per-scan "
               "overhead, not clustering, sets the throughput of small scans; on 2 cores the services and the "
               "flow runs share the CPU.")
    _publish("\n".join(out) + "\n", args.results, "burst")
    return 0


def _publish(block: str, results: str, section: str) -> None:
    """Print the tables and merge them into RESULTS.md (unless ``results`` is empty)."""
    sys.stdout.write(block)
    if results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_engine import merge_results

        merge_results(Path(results), {section: block})


def _reference_seconds(vol, temps) -> float | None:
    """The `xtec` reference on the same data (the engine benchmark's reference pipeline)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_engine import run_reference_pipeline

    timings, _, _ = run_reference_pipeline(np.asarray(vol), 3, seed=0)
    return timings["total"]


if __name__ == "__main__":
    raise SystemExit(main())
