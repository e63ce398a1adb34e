"""Direct file reads vs HTTP for a scan served by Tiled (xtec_flows.tiled.direct).

A synthetic series is imported into a real Tiled server (``tiled serve catalog`` in a child
process, SQLite catalog, zarr storage on this host) with ``write_series``, the
``xtec-flows import`` path (chunks of one temperature by 64^3 voxels). Then, on that one node:

* read: the whole volume block by block on the grid ``lazy_array`` chooses (blocks span all
  temperatures, ~25 MB each), once over HTTP (one request per block, uncompressed responses as
  ``connect`` asks for) and once from the zarr files; serially (one block at a time) and with
  dask's threaded scheduler (``x.sum()``). MB/s = 10^6 bytes of raw array per second. Every
  block of the two reads is compared (blake2b of its bytes);
* ``process_scan``: read -> cluster (XTEC-d, K=4) -> write the result back, both ways, each
  into a fresh results root; the two label arrays must be identical.

    python benchmarks/bench_direct_reads.py [--shape 24,256] [--quick] [--repeats 1]

``--shape T,N`` means T x N^3; ``--quick`` is 24x96^3. Prints markdown tables; with
``--results benchmarks/RESULTS.md`` they are also merged into that file (section 15).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import inspect
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from tiled_subprocess import SubprocessTiledServer  # noqa: E402

try:  # the Tiled side as one package (xtec_flows.tiled), or the modules before it
    from xtec_flows import tiled as tiled_api  # noqa: E402
    from xtec_flows.tiled import process  # noqa: E402
except ImportError:
    from xtec_flows import process  # noqa: E402
    from xtec_flows.io import tiled as tiled_api  # noqa: E402
from xtec_flows.engine import ClusterParams  # noqa: E402
from xtec_flows.tiled.direct import direct_array  # noqa: E402


def parse_shape(text: str) -> tuple[int, ...]:
    parts = tuple(int(p) for p in text.split(","))
    return (parts[0],) + (parts[1],) * 3 if len(parts) == 2 else parts


def shape_str(shape) -> str:
    t, *sp = shape
    return f"{t}×{sp[0]}³" if len(set(sp)) == 1 and len(sp) == 3 else "×".join(map(str, shape))


def volume_for(node, read_mode: str):
    """The dask array the pipeline would read: ``lazy_array``'s grid, over HTTP or from the file."""
    if "read_mode" in inspect.signature(tiled_api.lazy_array).parameters:
        return tiled_api.lazy_array(node, read_mode=read_mode)
    http = tiled_api.lazy_array(node)  # before lazy_array took read_mode: the same grid, by hand
    return http if read_mode == "http" else direct_array(node, http.chunks, read_mode="direct")


@contextlib.contextmanager
def reading(read_mode: str):
    """Make ``process_scan`` read with ``read_mode``.

    process_scan has no read_mode parameter (yet); it calls ``open_scan``, which does. So, for
    this benchmark only, the ``open_scan`` that process_scan looks up is bound to ``read_mode``.
    """
    if "read_mode" in inspect.signature(process.process_scan).parameters:
        yield {"read_mode": read_mode}
        return
    mod = process.tiled_io
    original = mod.open_scan
    if "read_mode" in inspect.signature(original).parameters:
        def bound(*a, **kw):
            return original(*a, read_mode=read_mode, **kw)
    else:  # open_scan predates read_mode: swap the reader it uses
        scans = sys.modules[original.__module__]
        lazy = scans.lazy_array

        def bound(*a, **kw):
            scans.lazy_array = lambda node, *la, **lk: volume_for(node, read_mode)
            try:
                return original(*a, **kw)
            finally:
                scans.lazy_array = lazy
    mod.open_scan = bound
    try:
        yield {}
    finally:
        mod.open_scan = original


def read_blocks(x) -> tuple[float, list]:
    """Seconds to compute every block of ``x`` one at a time, and each block's digest.

    Only the reads are timed: hashing a 25 MB block costs about as much as reading it directly.
    """
    digests, seconds = [], 0.0
    for idx in np.ndindex(*x.numblocks):
        t0 = time.perf_counter()
        b = x.blocks[idx].compute(scheduler="threads")
        seconds += time.perf_counter() - t0
        digests.append(hashlib.blake2b(np.ascontiguousarray(b).tobytes(), digest_size=16).hexdigest())
    return seconds, digests


def read_threaded(x) -> float:
    t0 = time.perf_counter()
    x.sum(dtype="float64").compute(scheduler="threads")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="24,256", help="T,N for T x N^3 (or T,L,K,H); default 24,256")
    ap.add_argument("--quick", action="store_true", help="24x96^3")
    ap.add_argument("--repeats", type=int, default=1, help="reads per mode (best shown)")
    ap.add_argument("--n-components", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="where the server and the source zarr live (default /tmp)")
    ap.add_argument("--results", default="", help="markdown file to merge the section into ('' = stdout only)")
    args = ap.parse_args(argv)
    shape = parse_shape("24,96" if args.quick else args.shape)
    nbytes = int(np.prod(shape)) * 4
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
    if free < 3 * nbytes:
        raise SystemExit(f"need about {3 * nbytes / 1e9:.1f} GB free in {args.workdir or tempfile.gettempdir()} "
                         f"for a {shape_str(shape)} scan (source zarr + Tiled's copy); {free / 1e9:.1f} GB free. "
                         "Pass --workdir or a smaller --shape")
    load0 = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="xtec-bench-direct-", dir=args.workdir))
    srv = SubprocessTiledServer(work / "srv")
    out = []
    try:
        from xtec_flows.synthetic import write_zarr

        t0 = time.perf_counter()
        src = write_zarr(work / "source.zarr", shape, seed=0)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        srv.start()
        start_s = time.perf_counter() - t0
        client = tiled_api.connect(srv.uri, srv.api_key)
        temps = np.asarray(src["intensity"].attrs["temperatures"], dtype=np.float64)
        t0 = time.perf_counter()
        tiled_api.write_series(client, "scan", src["intensity"], temps)
        upload_s = time.perf_counter() - t0
        node = client["scan"]
        on_disk = sum(f.stat().st_size for f in (srv.data_dir / "scan").rglob("*") if f.is_file())

        reads = {}
        for mode in ("http", "direct"):
            x = volume_for(node, mode)
            serial, threaded, digests = [], [], None
            for _ in range(args.repeats):
                s, digests = read_blocks(x)
                serial.append(s)
                threaded.append(read_threaded(x))
            reads[mode] = {"x": x, "serial": serial, "threaded": threaded, "digests": digests}
        same_blocks = reads["http"]["digests"] == reads["direct"]["digests"]

        params = ClusterParams(n_components=args.n_components, random_state=0)
        runs = {}
        for mode in ("http", "direct"):
            with reading(mode) as kw:
                t0 = time.perf_counter()
                outcome = process.process_scan(client, "scan", params, root=f"bench_{mode}", **kw)
                runs[mode] = {"seconds": time.perf_counter() - t0,
                              "labels": np.asarray(outcome.node["labels"].read())}
        same_labels = np.array_equal(runs["http"]["labels"], runs["direct"]["labels"])

        x = reads["http"]["x"]
        mb = nbytes / 1e6
        h_best, d_best = min(reads["http"]["serial"]), min(reads["direct"]["serial"])
        ht_best, dt_best = min(reads["http"]["threaded"]), min(reads["direct"]["threaded"])
        emit = out.append
        emit("## 15. Direct file reads vs HTTP (Tiled-served scan)\n")
        emit(f"_{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; `python benchmarks/bench_direct_reads.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`; load average at start "
             f"{', '.join(f'{v:.2f}' for v in load0)}, at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}; "
             f"{os.cpu_count()} CPUs._\n")
        emit(f"Scan {shape_str(shape)} float32 ({mb:.0f} MB raw), imported with `write_series` (Tiled chunks "
             f"{tuple(max(c) for c in node.chunks)}; upload {upload_s:.1f} s; {on_disk / 1e6:.0f} MB on the "
             f"server's disk, zarr v3 zstd) into `tiled serve catalog` in a child process on 127.0.0.1 (start-up "
             f"{start_s:.1f} s; synthetic generation {gen_s:.1f} s, not timed). Reads use `lazy_array`'s grid: "
             f"{int(np.prod(x.numblocks))} blocks of ≤{tuple(max(c) for c in x.chunks)} "
             f"({np.prod([max(c) for c in x.chunks]) * 4 / 1e6:.0f} MB). Best of {args.repeats}.\n")
        emit("| read | blocks | serial: s | serial: MB/s | dask threads: s | dask threads: MB/s |")
        emit("|---|---|---|---|---|---|")
        for mode, label in (("http", "HTTP (one request per block)"), ("direct", "direct (zarr files)")):
            r = reads[mode]
            emit(f"| {label} | {int(np.prod(x.numblocks))} | {min(r['serial']):.2f} | {mb / min(r['serial']):.0f} | "
                 f"{min(r['threaded']):.2f} | {mb / min(r['threaded']):.0f} |")
        emit(f"| speed-up direct / HTTP | | | {h_best / d_best:.2f}× | | {ht_best / dt_best:.2f}× |\n")
        emit("| `process_scan` (XTEC-d, K=" f"{args.n_components}) | seconds |")
        emit("|---|---|")
        for mode in ("http", "direct"):
            emit(f"| reading over {mode.upper() if mode == 'http' else 'direct file reads'} | "
                 f"{runs[mode]['seconds']:.2f} |")
        emit(f"| speed-up | {runs['http']['seconds'] / runs['direct']['seconds']:.2f}× |\n")
        emit("| target | value | status |\n|---|---|---|")
        emit(f"| direct ≥ 3× HTTP, block-by-block read of {shape_str(shape)} | {h_best / d_best:.2f}× | "
             f"{'met' if h_best / d_best >= 3 else 'NOT met'} |")
        emit(f"| every block read directly equals the HTTP block | {same_blocks} | {'met' if same_blocks else 'NOT met'} |")
        emit(f"| `process_scan` labels identical both ways | {same_labels} | {'met' if same_labels else 'NOT met'} |")
        block = "\n".join(out) + "\n"
        sys.stdout.write(block)
        if args.results:
            from bench_engine import merge_results

            merge_results(Path(args.results), {"direct": block})
        return 0 if (same_blocks and same_labels) else 1
    finally:
        srv.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
