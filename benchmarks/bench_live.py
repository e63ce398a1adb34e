"""Provisional results during a scan: update latency per temperature at 64^3 and 128^3.

The embedded default's Tiled (``tiled serve catalog``, SQLite, in a child process); a real
RunEngine scan of T temperatures into TiledWriter with ``batch_size=1`` (each event written as
measured); a :class:`xtec_flows.tiled.live.LiveFollower` in this process polling every
``--poll`` seconds, as ``xtec-flows serve --live`` does. After each event the scan pauses
until the provisional result of that many temperatures is readable through a plain client;
the latency is from the moment the event was written to that moment. (A real scan spends
minutes per temperature; the pause only keeps updates from coalescing, so every temperature
is timed.) The last column times the ``xtec`` reference (Mask_Zeros, KL threshold,
Rescale_mean, GMM.RunEM) on the same recorded temperatures, in memory, with no Tiled I/O:
what a from-scratch fit alone costs there.

Usage: ``.venv/bin/python benchmarks/bench_live.py [--sizes 64,128] [--temperatures 24] [--poll 1]``;
prints a markdown table (``--results FILE`` merges it into RESULTS.md as section 19).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from tiled_subprocess import SubprocessTiledServer  # noqa: E402

SECTION = "## 19. Provisional results during a scan"
#: The issue's bound: a 64³ update readable this long after its event, on the embedded default.
LATENCY_TARGET_S = 5.0


def measure(client, n: int, temperatures: int, poll: float, n_components: int) -> dict:
    from xtec_flows import tiled as tiled_io
    from xtec_flows.demo.beamline import run_temperature_scan
    from xtec_flows.engine import ClusterParams
    from xtec_flows.tiled.live import LiveFollower, running_scans

    raw = client.create_container(f"raw{n}")
    root = tiled_io.derived_root(client, f"xtec{n}")
    params = ClusterParams(n_components=n_components)
    follower = LiveFollower(raw, root, params, poll_seconds=poll)
    thread = threading.Thread(target=follower.run, daemon=True)
    thread.start()
    latencies = {}
    temps = np.linspace(20.0, 300.0, temperatures)
    uid_box = {}

    def after_point(i):
        written = time.perf_counter()
        count = i + 1
        if count < 3:
            return
        uid = uid_box.setdefault("uid", running_scans(raw)[0])
        key = tiled_io.result_key(uid, params.to_dict())
        deadline = written + 60
        while time.perf_counter() < deadline:
            try:
                md = root[key].metadata or {}
            except KeyError:
                md = {}
            if md.get("status") == "provisional" and md.get("n_temperatures_covered") == count:
                latencies[count] = time.perf_counter() - written
                return
            time.sleep(0.02)
        import faulthandler

        faulthandler.dump_traceback(all_threads=True)  # where the follower is stuck
        raise RuntimeError(f"no provisional result of {count} temperatures after 60 s")

    try:
        run_temperature_scan(raw, temps, spatial_shape=(n, n, n), batch_size=1, after_point=after_point)
    finally:
        follower.stop()
        thread.join(60)
    values = [latencies[c] for c in sorted(latencies)]
    return {"latencies": latencies, "median": statistics.median(values), "max": max(values),
            "first": values[0], "last": values[-1], "updates": follower.stats.updates,
            "errors": follower.stats.errors, "uid": uid_box["uid"], "temps": temps}


def reference_fit_seconds(n: int, temps, k: int) -> float:
    """The xtec reference from scratch on the same scan's volume (all temperatures)."""
    from bench_engine import run_reference_pipeline
    from xtec_flows.demo.beamline import scan_volumes

    volume = scan_volumes(temps, (n, n, n), seed=0)
    t, _, _ = run_reference_pipeline(volume, k, seed=0)
    return t["total"]


def warm_start_fits(n: int, temperatures: int, k: int) -> list[dict]:
    """A provisional update's fit from the previous update's mixture (the follower's warm start)
    against a seeded fit, in memory with no Tiled, at three temperature counts of the scan."""
    from sklearn.metrics import adjusted_rand_score

    from xtec_flows.demo.beamline import scan_volumes
    from xtec_flows.engine import ClusterParams, run
    from xtec_flows.numerics.mixture import MixtureParams
    from xtec_flows.tiled.live import warm_start

    temps = np.linspace(20.0, 300.0, temperatures)
    volume = scan_volumes(temps, (n, n, n), seed=0)
    params = ClusterParams(n_components=k)
    rows = []
    for count in sorted({max(4, temperatures // 3), 2 * temperatures // 3, temperatures}):
        previous = run(volume[:count - 1], temps[:count - 1], params)
        start = warm_start(MixtureParams(np.asarray(previous.weights), np.asarray(previous.means),
                                         np.asarray(previous.variances)), count, params)
        fits = {name: run(volume[:count], temps[:count], params, warm_start=ws)
                for name, ws in (("seeded", None), ("warm", start))}
        labels = {name: np.asarray(r.labels[...]).ravel() for name, r in fits.items()}
        rows.append({"count": count, **{f"{name}_iter": r.n_iter for name, r in fits.items()},
                     **{f"{name}_fit": r.timings["fit"] for name, r in fits.items()},
                     "ari": adjusted_rand_score(labels["seeded"], labels["warm"])})
    return rows


def main(argv=None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("xtec_flows.tiled.live").setLevel(logging.INFO)  # each update, on stderr
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,128")
    ap.add_argument("--temperatures", type=int, default=24)
    ap.add_argument("--poll", type=float, default=1.0, help="follower poll period, s (serve --live's default)")
    ap.add_argument("-k", "--n-components", type=int, default=3)
    ap.add_argument("--results", default="", help="markdown file to merge the section into ('' = stdout only)")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-live-") as work:
        srv = SubprocessTiledServer(Path(work) / "srv").start()
        try:
            client = srv.client()
            for n in (int(s) for s in args.sizes.split(",")):
                m = measure(client, n, args.temperatures, args.poll, args.n_components)
                m["reference"] = reference_fit_seconds(n, m["temps"], args.n_components)
                m["warm"] = warm_start_fits(n, args.temperatures, args.n_components)
                rows.append((n, m))
        finally:
            srv.stop()
    T = args.temperatures
    lines = [f"{SECTION}\n",
             f"_{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; `python benchmarks/bench_live.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`; load average at start "
             f"{', '.join(f'{v:.2f}' for v in load0)}, at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}; "
             f"{os.cpu_count()} CPUs._\n",
             f"The embedded default's `tiled serve catalog` (SQLite) in a child process; a RunEngine scan of {T} "
             "temperatures into TiledWriter with `batch_size=1`; a `LiveFollower` polling every "
             f"{args.poll:g} s (as `serve --live`), K = {args.n_components}. Latency: from the event written to "
             "the provisional result of that many temperatures readable by a plain client (the scan pauses until "
             "then, so every temperature is timed; 3 temperatures is the first update). Reference: the `xtec` "
             f"package's XTEC-d from scratch on all {T} temperatures in memory, no Tiled.\n",
             "| volume | updates | first (3 T) | median | max | last (all T) | errors | xtec fit, all T, in memory |",
             "|---|---|---|---|---|---|---|---|"]
    for n, m in rows:
        lines.append(f"| {T}×{n}³ | {m['updates']} | {m['first']:.2f} s | {m['median']:.2f} s | {m['max']:.2f} s | "
                     f"{m['last']:.2f} s | {m['errors']} | {m['reference']:.2f} s |")
    lines.append("")
    for n, m in rows:
        per = ", ".join(f"{c}: {v:.2f}" for c, v in sorted(m["latencies"].items()))
        lines.append(f"Per temperature at {n}³ (count: seconds): {per}.\n")
    lines += ["Warm start (what each update after the first does): the fit of the first n temperatures begun from "
              "the fit of n − 1 (its last temperature repeated) against a seeded fit, in memory, no Tiled; labels "
              "compared by ARI.\n",
              "| volume | temperatures | seeded: EM iterations | seeded: fit | warm: EM iterations | warm: fit | "
              "ARI warm vs seeded |", "|---|---|---|---|---|---|---|"]
    for n, m in rows:
        for w in m["warm"]:
            lines.append(f"| {T}×{n}³ | {w['count']} | {w['seeded_iter']} | {w['seeded_fit']:.3f} s | "
                         f"{w['warm_iter']} | {w['warm_fit']:.3f} s | {w['ari']:.4f} |")
    lines.append("")
    lines += ["| target | value | status |", "|---|---|---|"]
    for n, m in rows:
        if n == 64:
            lines.append(f"| {T}×64³: every update readable ≤ {LATENCY_TARGET_S:g} s after its event | max "
                         f"{m['max']:.2f} s | {'met' if m['max'] <= LATENCY_TARGET_S else '**MISSED**'} |")
        expected = T - 2  # one update per temperature from the third on
        lines.append(f"| {T}×{n}³: one provisional update per temperature, no errors | {m['updates']} of "
                     f"{expected}, {m['errors']} errors | "
                     f"{'met' if m['updates'] == expected and not m['errors'] else '**MISSED**'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        from bench_engine import merge_results

        merge_results(Path(args.results), {"live": text})
    return 0


if __name__ == "__main__":
    sys.exit(main())
