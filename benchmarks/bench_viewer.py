"""Results viewer: page load and slice-change times for 64^3 and 512^3 results.

A real Tiled server (``tiled serve catalog`` in a child process), the viewer app under uvicorn in
another, and Debian's chromium driven by playwright. Per size, a 4-temperature float32 scan is
imported with ``write_series`` (Tiled chunks of one temperature by 64^3 voxels, as ``xtec-flows
import`` writes them) and a result container is written beside it with the result writer's own
``write_labels_array`` (int8 labels, from 64^3 zarr chunks as the engine writes them) plus means,
temperatures and counts. The labels are the generator's ground truth, not a clustering: the
viewer's cost does not depend on how labels were found, and clustering 512^3 over HTTP would
dominate the run. Timings are wall-clock in the browser:

* page load: ``goto`` until the central L slice is drawn (results list, description, one slice of
  labels and of the T-averaged intensity);
* slice change: one arrow key until the next slice is drawn (median of 5), across L, K and H;
* trajectory: one voxel's T values (median of 5);
* offline: ``write_offline_view`` of the result (seconds, file size) and opening that file.

Usage: ``.venv/bin/python benchmarks/bench_viewer.py [--sizes 64,512] [--temperatures 4]``;
prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from tiled_subprocess import SubprocessTiledServer, free_port  # noqa: E402

PERIOD = 32  # lattice period of the synthetic peaks, voxels


class LatticeVolume:
    """A (T, n, n, n) float32 series computed on demand, region by region (nothing held):
    Gaussian peaks on a cubic lattice whose height falls with temperature (an order parameter),
    on a flat background."""

    def __init__(self, n: int, temperatures: int):
        self.shape = (temperatures, n, n, n)
        self.dtype = np.dtype("float32")

    def distance2(self, region) -> np.ndarray:
        axes = [((np.arange(s.start, s.stop) % PERIOD) - PERIOD // 2) ** 2 for s in region]
        return axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]

    def __getitem__(self, index):
        t, *region = index
        region = [slice(*r.indices(n)[:2]) for r, n in zip(region, self.shape[1:])]
        order = 1.0 - t / self.shape[0]
        return (10.0 + 1000.0 * order * np.exp(-self.distance2(region) / 8.0)).astype(np.float32)

    def labels(self) -> np.ndarray:
        n = self.shape[1]
        d2 = self.distance2([slice(0, n)] * 3)
        out = np.full(d2.shape, -1, dtype=np.int8)
        out[d2 < 40] = 1
        out[d2 < 8] = 0
        return out


def write_bench_result(client, n: int, temperatures: int) -> str:
    from xtec_flows.tiled import write_series
    from xtec_flows.tiled.results import write_labels_array
    import zarr

    vol = LatticeVolume(n, temperatures)
    key = f"scan{n}"
    write_series(client, key, vol, np.linspace(20, 300, temperatures))
    labels = vol.labels()
    z = zarr.create_array(store=zarr.storage.MemoryStore(), shape=labels.shape, chunks=(64, 64, 64), dtype="int8")
    z[...] = labels
    root = client["xtec"] if "xtec" in client else client.create_container(key="xtec")
    counts = [int((labels == i).sum()) for i in (0, 1)]
    node = root.create_container(key=f"bench-{n}", metadata={
        "status": "running", "source": {"uid": key, "path": key, "kind": "array"}, "counts": counts,
        "parameters": {"n_components": 2, "rescale": "mean"}})
    write_labels_array(node, z, ["L", "K", "H"])
    node.write_array(np.linspace(20, 300, temperatures), key="temperatures", dims=["temperature"])
    node.write_array(np.zeros((2, temperatures)), key="means", dims=["cluster", "temperature"])
    node.write_array(np.asarray(counts, dtype=np.int64), key="counts", dims=["cluster"])
    node.update_metadata({"status": "complete"})
    return f"bench-{n}"


@contextlib.contextmanager
def viewer(tiled_uri: str, api_key: str):
    import httpx

    port = free_port()
    code = ("import os, uvicorn; from xtec_flows.viewer.app import make_app; "
            f"uvicorn.run(make_app({tiled_uri!r}, os.environ['TILED_API_KEY']), host='127.0.0.1', port={port}, "
            "log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, TILED_API_KEY=api_key))
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def slice_is(axis: int, index: int) -> str:
    return f"document.getElementById('slice').dataset.slice === '{axis}:{index}'"


def measure(page, url: str, key: str, n: int) -> dict:
    timeout = 300_000
    t0 = time.perf_counter()
    page.goto(f"{url}/?result={key}&axis=0&index={n // 2}")
    page.wait_for_function(slice_is(0, n // 2), timeout=timeout)
    load = time.perf_counter() - t0
    changes = {}
    for axis in (0, 1, 2):
        if axis:
            page.select_option("#axis", str(axis))
            page.wait_for_function(slice_is(axis, n // 2), timeout=timeout)
        page.locator("body").focus()
        times = []
        for step in range(1, 6):
            t0 = time.perf_counter()
            page.keyboard.press("ArrowUp")
            page.wait_for_function(slice_is(axis, n // 2 + step), timeout=timeout)
            times.append(time.perf_counter() - t0)
        changes["LKH"[axis]] = statistics.median(times)
    traj = []
    for i in range(5):
        page.evaluate("document.getElementById('traj-data').textContent = ''")
        t0 = time.perf_counter()
        page.evaluate(f"xtec.showTrajectory([{n // 2}, {i * 3}, {n // 2 + i}])")
        page.wait_for_function("document.getElementById('traj-data').textContent.length > 0", timeout=timeout)
        traj.append(time.perf_counter() - t0)
    return {"load": load, **changes, "trajectory": statistics.median(traj)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64,512")
    ap.add_argument("--temperatures", type=int, default=4)
    ap.add_argument("--results", default="", help="markdown file to merge the section into ('' = stdout only)")
    args = ap.parse_args(argv)
    load0 = os.getloadavg()
    from playwright.sync_api import sync_playwright

    from xtec_flows.viewer import write_offline_view

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as work:
        srv = SubprocessTiledServer(Path(work) / "srv").start()
        try:
            client = srv.client()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
                for n in (int(s) for s in args.sizes.split(",")):
                    t0 = time.perf_counter()
                    key = write_bench_result(client, n, args.temperatures)
                    written = time.perf_counter() - t0
                    with viewer(srv.uri, srv.api_key) as url:
                        page = browser.new_page(viewport={"width": 1200, "height": 800})
                        m = measure(page, url, key, n)
                        page.close()
                    t0 = time.perf_counter()
                    html = write_offline_view(client["xtec"][key], Path(work) / f"view-{n}.html")
                    m["offline"], m["offline_mb"] = time.perf_counter() - t0, html.stat().st_size / 1e6
                    page = browser.new_page(viewport={"width": 1200, "height": 800})
                    t0 = time.perf_counter()
                    page.goto(html.as_uri())
                    page.wait_for_function(slice_is(0, n // 2), timeout=300_000)
                    m["offline_load"] = time.perf_counter() - t0
                    page.close()
                    rows.append((n, written, m))
                browser.close()
        finally:
            srv.stop()
    T = args.temperatures
    lines = ["## 16. Results viewer in the browser\n",
             f"_{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC; `python benchmarks/bench_viewer.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}`; load average at start "
             f"{', '.join(f'{v:.2f}' for v in load0)}, at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}; "
             f"{os.cpu_count()} CPUs._\n",
             "`xtec-flows view`'s app (uvicorn subprocess) in front of `tiled serve catalog` on 127.0.0.1, driven "
             "by Debian's chromium through playwright. Each scan has T temperatures (float32), imported with "
             "`write_series` in 64³ tiles; its labels are the generator's ground truth written by the result "
             "writer (`write_labels_array`, 64³ zarr chunks), since the viewer's cost does not depend on how the "
             "labels were made. Page load: navigation until the first slice is drawn; slice changes and a "
             "voxel's trajectory: medians of 5; offline: `write_offline_view` of the same result and its load "
             "from file. Seconds.", "",
             "| volume | scan+labels MB | import s | page load | slice L | slice K | slice H | trajectory "
             "| offline write | offline MB | offline load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, written, m in rows:
        mb = (T * 4 + 1) * n ** 3 / 1e6
        lines.append(f"| {T}×{n}³ | {mb:.0f} | {written:.1f} | {m['load']:.2f} | {m['L']:.2f} | {m['K']:.2f} | "
                     f"{m['H']:.2f} | {m['trajectory']:.2f} | {m['offline']:.2f} | {m['offline_mb']:.1f} | "
                     f"{m['offline_load']:.2f} |")
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        ratio = large[2]["load"] / small[2]["load"]
        lines += ["", "| target | value | status |", "|---|---|---|",
                  f"| page load {T}×{large[0]}³ / {T}×{small[0]}³ ≤ 1.5× (a large result opens as fast: slices "
                  f"fetched block-wise) | {ratio:.2f}× | {'met' if ratio <= 1.5 else 'MISSED'} |"]
    block = "\n".join(lines) + "\n"
    sys.stdout.write(block)
    if args.results:
        from bench_engine import merge_results

        merge_results(Path(args.results), {"viewer": block})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
