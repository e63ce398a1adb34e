"""The results viewer (issue 16) with real parts only: a Tiled server, a result written by
process_scan, the viewer app as an HTTP server subprocess on 127.0.0.1 and Debian's chromium driven by
playwright. Checks colours at known voxels (canvas pixels), a clicked voxel's trajectory against the
scan's volume, slice moves, polling of a running result, bad input (wrong key, unknown result, a
result without labels) and the offline HTML file."""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from tiled_support import DEFAULT_API_KEY

from xtec_flows.engine import ClusterParams
from xtec_flows.synthetic import make_volume
from xtec_flows.tiled import write_series
from xtec_flows.tiled.process import process_scan

CHROMIUM = Path("/usr/bin/chromium")
SHAPE = (12, 20, 20, 20)  # 12 temperatures: class discovery needs at least 8
AUTO = ClusterParams(classes="auto", max_components=6, stability_runs=2, n_init=1)
COORDS = {"L": {"start": -1.0, "stop": 1.0}, "K": {"start": 2.0, "stop": 3.0}, "H": list(np.linspace(0, 0.95, 20))}
#: tab10, as the page draws labels 0..9
PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
           [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def viewer_server(tiled_uri: str, api_key: str, poll_seconds: float = 0.5):
    """The viewer app under uvicorn in its own process on 127.0.0.1; yields its base URL."""
    port = _free_port()
    code = ("import os, uvicorn; from xtec_flows.viewer.app import make_app; "
            f"uvicorn.run(make_app({tiled_uri!r}, os.environ['TILED_API_KEY'], poll_seconds={poll_seconds}), "
            f"host='127.0.0.1', port={port}, log_level='warning')")
    env = dict(os.environ, TILED_API_KEY=api_key)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"viewer exited: {proc.stdout.read().decode()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/", timeout=1, trust_env=False).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("viewer did not answer in 30 s")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
        proc.stdout.close()


@pytest.fixture(scope="module")
def series():
    volume, temps, _ = make_volume(SHAPE, seed=1)
    return volume.astype(np.float32), temps


@pytest.fixture(scope="module")
def result(tiled_server, series):
    """A classes="auto" result of a plain series node whose metadata gives r.l.u. coordinates."""
    volume, temps = series
    client = tiled_server.client()
    if "viewer_scan" not in client:
        write_series(client, "viewer_scan", volume, temps, metadata={"coords": COORDS})
    out = process_scan(client, "viewer_scan", AUTO)
    node = tiled_server.client()["xtec"][out.key]
    return {"key": out.key, "node": node, "labels": node["labels"].read(), "md": node.metadata}


@pytest.fixture(scope="module")
def viewer(tiled_server, result):
    with viewer_server(tiled_server.uri, DEFAULT_API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("/usr/bin/chromium is missing; CI must install chromium (apt-get install chromium)")
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    p = browser.new_page(viewport={"width": 1200, "height": 800})
    yield p
    p.close()


# -- helpers reading the page ------------------------------------------------------------------------

def open_slice(page, url: str, axis: int, index: int, opacity: int = 100):
    page.goto(url)
    page.wait_for_function(f"document.getElementById('slice').dataset.slice === '{axis}:{index}'", timeout=20000)
    set_opacity(page, opacity)


def set_opacity(page, value: int):
    page.evaluate("v => { const o = document.getElementById('opacity'); o.value = v;"
                  " o.dispatchEvent(new Event('input')); }", value)


def set_slider(page, position: int):
    page.evaluate("v => { const s = document.getElementById('index'); s.value = v;"
                  " s.dispatchEvent(new Event('input')); }", position)


def canvas_pixels(page) -> dict:
    """The drawn plane as an (rows, cols, 3) array read back from the canvas, one pixel per voxel
    (the centre of its square), in the plane's (row, col) order, and the raw canvas bytes' hash."""
    got = page.evaluate("""() => {
        const c = document.getElementById('slice'), g = xtec.state.geometry, ctx = c.getContext('2d');
        const all = ctx.getImageData(0, 0, c.width, c.height).data, out = [];
        for (let r = 0; r < g.rows; r++) for (let col = 0; col < g.cols; col++) {
            const x = Math.floor(g.x0 + (col + 0.5) * g.scale), y = Math.floor(g.y0 + (g.rows - 1 - r + 0.5) * g.scale);
            const o = (y * c.width + x) * 4; out.push(all[o], all[o + 1], all[o + 2]);
        }
        let h = 0; for (let i = 0; i < all.length; i++) h = (h * 31 + all[i]) >>> 0;
        return {rows: g.rows, cols: g.cols, rgb: out, hash: h, geometry: g};
    }""")
    rgb = np.asarray(got["rgb"], dtype=np.uint8).reshape(got["rows"], got["cols"], 3)
    return {"rgb": rgb, "hash": got["hash"], "geometry": got["geometry"]}


def check_colours(rgb: np.ndarray, labels: np.ndarray):
    """At full overlay opacity every clustered voxel has exactly its label's colour and every
    unclustered one is grey."""
    assert rgb.shape[:2] == labels.shape
    clustered = labels >= 0
    assert clustered.any() and (~clustered).any()
    want = np.asarray(PALETTE, dtype=np.uint8)[labels[clustered] % 10]
    np.testing.assert_array_equal(rgb[clustered], want)
    grey = rgb[~clustered]
    assert np.all(grey[:, 0] == grey[:, 1]) and np.all(grey[:, 1] == grey[:, 2])


# -- HTTP endpoints ------------------------------------------------------------------------------------

def test_endpoints_serve_a_result_slice_by_slice(viewer, result, series):
    volume, temps = series
    key, labels = result["key"], result["labels"]
    rows = httpx.get(f"{viewer}/api/results", trust_env=False).json()["results"]
    assert key in {r["key"] for r in rows}
    d = httpx.get(f"{viewer}/api/result/{key}", trust_env=False).json()
    assert d["content"] == "classes" and d["final"] and d["shape"] == list(SHAPE[1:])
    assert d["dims"] == ["L", "K", "H"] and d["volume"]["path"].strip("/") == "viewer_scan"
    np.testing.assert_allclose(d["coords"]["L"], [-1.0, 2.0 / 19])
    np.testing.assert_allclose(d["coords"]["H"], [0.0, 0.05])
    assert [e["n_voxels"] for e in d["legend"]] == [c["n_voxels"] for c in result["md"]["classes"]]
    assert [e["kind"] for e in d["legend"]] == [c["kind"] for c in result["md"]["classes"]]
    r = httpx.get(f"{viewer}/api/labels/{key}?axis=1&index=7", trust_env=False)
    assert r.headers["x-shape"] == "20,20"
    np.testing.assert_array_equal(np.frombuffer(r.content, np.int8).reshape(20, 20), labels[:, 7, :])
    r = httpx.get(f"{viewer}/api/intensity/{key}?axis=2&index=3", trust_env=False)
    np.testing.assert_allclose(np.frombuffer(r.content, "<f4").reshape(20, 20),
                               np.log10(volume[:, :, :, 3].astype(np.float64).mean(axis=0)), rtol=1e-5)
    t = httpx.get(f"{viewer}/api/trajectory/{key}?voxel=4,5,6", trust_env=False).json()
    np.testing.assert_allclose(t["intensity"], volume[:, 4, 5, 6], rtol=1e-6)
    assert t["label"] == labels[4, 5, 6] and t["temperatures"] == list(temps)


def test_bad_requests_answer_a_message_and_status(viewer, result, tiled_server):
    get = lambda p: httpx.get(viewer + p, trust_env=False)  # noqa: E731
    r = get("/api/result/xtec-doesnotexist")
    assert r.status_code == 404 and "does not exist" in r.json()["error"]
    r = get(f"/api/labels/{result['key']}?axis=0&index=99")
    assert r.status_code == 400 and "outside 0..19" in r.json()["error"]
    r = get(f"/api/trajectory/{result['key']}?voxel=1,2")
    assert r.status_code == 400 and "voxel" in r.json()["error"]
    # a result container without labels (a run that failed before writing them)
    root = tiled_server.client()["xtec"]
    if "xtec-nolabels" not in root:
        root.create_container(key="xtec-nolabels", metadata={"status": "failed", "error": "disk full",
                                                            "source": {"uid": "viewer_scan", "path": "viewer_scan"}})
    r = get("/api/result/xtec-nolabels")
    assert r.status_code == 422 and "has no labels" in r.json()["error"] and "disk full" in r.json()["error"]


def test_a_wrong_key_is_a_401_with_the_remedy_in_the_page(tiled_server, result, page):
    with viewer_server(tiled_server.uri, "wrongkey") as url:
        r = httpx.get(f"{url}/api/results", trust_env=False)
        assert r.status_code == 401 and "TILED_API_KEY" in r.json()["error"]
        assert "wrongkey" not in r.text
        page.goto(url)
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=20000)
        assert "refused the API key" in page.text_content("#error")


# -- the page in a browser -----------------------------------------------------------------------------

def test_page_colours_voxels_by_class_and_moves_slices(viewer, result, page):
    key, labels = result["key"], result["labels"]
    open_slice(page, f"{viewer}/?result={key}&axis=0&index=16", 0, 16)
    first = canvas_pixels(page)
    check_colours(first["rgb"], labels[16])
    # legend: one row per class with kind, voxel count and Tc
    legend = page.locator("#legend tr[data-label]")
    assert legend.count() == len(result["md"]["classes"])
    for i, c in enumerate(result["md"]["classes"]):
        text = legend.nth(i).text_content()
        assert c["kind"] in text and str(c["n_voxels"]) in text
        if c.get("tc") is not None:
            assert f"{c['tc']:.1f}" in text
    assert "r.l.u." in page.text_content("#index-value") and "0.684" in page.text_content("#index-value")
    # keys move the slice, the image changes and still matches the labels
    page.locator("body").focus()
    page.keyboard.press("ArrowUp")
    page.wait_for_function("document.getElementById('slice').dataset.slice === '0:17'", timeout=20000)
    moved = canvas_pixels(page)
    assert moved["hash"] != first["hash"]
    check_colours(moved["rgb"], labels[17])
    # the slider too, and another axis
    set_slider(page, 3)
    page.wait_for_function("document.getElementById('slice').dataset.slice === '0:3'", timeout=20000)
    check_colours(canvas_pixels(page)["rgb"], labels[3])
    page.select_option("#axis", "2")
    page.wait_for_function("document.getElementById('slice').dataset.slice === '2:10'", timeout=20000)
    set_slider(page, 16)
    page.wait_for_function("document.getElementById('slice').dataset.slice === '2:16'", timeout=20000)
    check_colours(canvas_pixels(page)["rgb"], labels[:, :, 16])
    # below full opacity the intensity shows through: clustered pixels differ from the pure colour
    set_opacity(page, 50)
    half = canvas_pixels(page)["rgb"]
    lab = labels[:, :, 16]
    assert not np.array_equal(half[lab >= 0], np.asarray(PALETTE, np.uint8)[lab[lab >= 0] % 10])


def test_click_shows_the_voxels_trajectory_beside_its_class_curves(viewer, result, series, page):
    volume, _ = series
    key, labels = result["key"], result["labels"]
    open_slice(page, f"{viewer}/?result={key}&axis=0&index=16", 0, 16)
    g = canvas_pixels(page)["geometry"]
    clustered = np.argwhere(labels[16] >= 0)
    k, h = (int(v) for v in clustered[len(clustered) // 2])
    page.locator("#slice").click(position={"x": g["x0"] + (h + 0.5) * g["scale"],
                                           "y": g["y0"] + (g["rows"] - 1 - k + 0.5) * g["scale"]})
    page.wait_for_function("document.getElementById('traj-data').textContent.length > 0", timeout=20000)
    shown = json.loads(page.text_content("#traj-data"))
    assert shown["voxel"] == [16, k, h] and shown["label"] == labels[16, k, h]
    np.testing.assert_allclose(shown["intensity"], volume[:, 16, k, h], rtol=1e-6)
    traj = volume[:, 16, k, h].astype(np.float64)
    np.testing.assert_allclose(shown["curve"], traj / traj.mean(), rtol=1e-6)
    label = shown["label"]
    node = result["node"]
    np.testing.assert_allclose(shown["mean_curve"], node["class_means_relative"].read()[label])
    np.testing.assert_allclose(shown["fit_curve"], node["class_fit_curves"].read()[label])
    assert result["md"]["classes"][label]["kind"] in page.text_content("#traj-summary")
    if os.environ.get("XTEC_FLOWS_VIEWER_SCREENSHOT"):  # docs/viewer.png is made this way
        set_opacity(page, 65)
        page.screenshot(path=os.environ["XTEC_FLOWS_VIEWER_SCREENSHOT"], full_page=True)


def test_unknown_result_and_result_without_labels_show_the_error(viewer, result, page, tiled_server):
    page.goto(f"{viewer}/?result=xtec-nosuchresult")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=20000)
    assert "xtec-nosuchresult" in page.text_content("#error")
    root = tiled_server.client()["xtec"]
    if "xtec-nolabels" not in root:
        root.create_container(key="xtec-nolabels", metadata={"status": "failed", "error": "disk full",
                                                            "source": {"uid": "viewer_scan", "path": "viewer_scan"}})
    page.goto(f"{viewer}/?result=xtec-nolabels")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=20000)
    assert "has no labels" in page.text_content("#error")


def test_a_running_result_is_polled_until_complete(viewer, result, tiled_server, page):
    """A provisional result (status running, labels written) refreshes by itself."""
    root = tiled_server.client()["xtec"]
    key = "xtec-provisional"
    if key in root:
        root[key].delete(recursive=True)
    src = result["node"]
    node = root.create_container(key=key, metadata={**src.metadata, "status": "running"})
    node.write_array(result["labels"], key="labels", dims=["L", "K", "H"])
    for name in ("temperatures", "means", "counts", "class_means_relative", "class_fit_curves"):
        node.write_array(src[name].read(), key=name)
    open_slice(page, f"{viewer}/?result={key}&axis=0&index=16", 0, 16)
    assert "refreshing" in page.text_content("#status")
    node.update_metadata({"status": "complete"})
    page.wait_for_function("document.getElementById('slice').dataset.status === 'complete'", timeout=20000)
    assert "refreshing" not in page.text_content("#status")
    check_colours(canvas_pixels(page)["rgb"], result["labels"][16])


# -- offline ------------------------------------------------------------------------------------------

def test_offline_file_shows_the_same_colours_without_a_server(viewer, result, series, browser, page, tmp_path):
    from xtec_flows.viewer import write_offline_view

    labels, volume = result["labels"], series[0]
    live = browser.new_page(viewport={"width": 1200, "height": 800})
    open_slice(live, f"{viewer}/?result={result['key']}&axis=0&index=16", 0, 16)
    live_pixels = canvas_pixels(live)
    live.close()
    html = write_offline_view(result["node"], tmp_path / "view.html")
    text = html.read_text()
    assert "Apikey" not in text and DEFAULT_API_KEY not in text.split('id="xtec-data"')[0]
    page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
    open_slice(page, html.as_uri() + "?axis=0&index=16", 0, 16)
    offline = canvas_pixels(page)
    check_colours(offline["rgb"], labels[16])
    assert offline["hash"] == live_pixels["hash"]  # the very same picture
    # small volume: every slice is in the file, and every voxel's trajectory
    page.keyboard.press("ArrowDown")
    page.wait_for_function("document.getElementById('slice').dataset.slice === '0:15'", timeout=20000)
    check_colours(canvas_pixels(page)["rgb"], labels[15])
    page.evaluate("xtec.showTrajectory([15, 4, 5])")
    page.wait_for_function("document.getElementById('traj-data').textContent.length > 0", timeout=20000)
    shown = json.loads(page.text_content("#traj-data"))
    assert shown["voxel"] == [15, 4, 5] and shown["label"] == labels[15, 4, 5]
    np.testing.assert_allclose(shown["intensity"], volume[:, 15, 4, 5], rtol=1e-6)


def test_offline_file_of_a_large_volume_holds_central_slices_and_a_voxel_grid(result, series, tmp_path):
    from xtec_flows.viewer import write_offline_view

    volume, _ = series
    html = write_offline_view(result["node"], tmp_path / "big.html", all_slices_voxels=1,
                              max_trajectories_per_slice=25)
    text = html.read_text()
    blob = text.split('<script type="application/json" id="xtec-data">', 1)[1].split("</script>", 1)[0]
    data = json.loads(blob)
    assert sorted(data["planes"]) == ["0:10", "1:10", "2:10"]
    assert data["result"]["offline_slices"] == {"0": [10], "1": [10], "2": [10]}
    voxels = data["trajectories"]["voxels"]
    assert 3 * 16 <= len(voxels) <= 3 * 25
    T = SHAPE[0]
    raw = np.frombuffer(base64.b64decode(data["trajectories"]["intensity"]), "<f4").reshape(-1, T)
    for v, t in zip(voxels, raw):
        np.testing.assert_allclose(t, volume[(slice(None), *v)], rtol=1e-6)
    lab = np.frombuffer(base64.b64decode(data["planes"]["1:10"]["labels"]), np.int8).reshape(20, 20)
    np.testing.assert_array_equal(lab, result["labels"][:, 10, :])


def test_offline_rejects_what_is_not_a_result(tmp_path):
    from xtec_flows.viewer import write_offline_view

    with pytest.raises(ValueError, match="not an xtec-flows output directory"):
        write_offline_view(tmp_path, tmp_path / "v.html")
    with pytest.raises(ValueError, match="does not exist"):
        write_offline_view(tmp_path, tmp_path / "missing" / "v.html")
    with pytest.raises(TypeError, match="Tiled result node or an output directory"):
        write_offline_view(42, tmp_path / "v.html")


def test_the_library_does_not_import_the_viewer():
    """Only the CLI may import xtec_flows.viewer (starlette and the page are no part of the library)."""
    package = Path(__file__).resolve().parents[1] / "xtec_flows"
    offenders = [str(p.relative_to(package)) for p in package.rglob("*.py")
                 if "viewer" not in p.parts and p.name != "cli.py" and "viewer" in
                 "".join(line for line in p.read_text().splitlines() if line.lstrip().startswith(("import", "from")))]
    assert offenders == []


def test_offline_file_of_an_output_directory(browser, tmp_path):
    """`xtec-flows cluster -o DIR` on a zarr series: the file reads labels.zarr, result.json and the input."""
    import zarr

    from xtec_flows.cli import main
    from xtec_flows.viewer import write_offline_view

    series, out = tmp_path / "series.zarr", tmp_path / "out"
    assert main(["synth", str(series), "--shape", "6,16,16,16", "--seed", "2", "--quiet"]) == 0
    assert main(["cluster", str(series), "-o", str(out), "-k", "2", "--no-plots", "--quiet", "--n-init", "1"]) == 0
    labels = zarr.open_array(str(out / "labels.zarr"), mode="r")[...]
    html = write_offline_view(out, tmp_path / "dir.html")
    page = browser.new_page(viewport={"width": 1200, "height": 800})
    try:
        plane = int(np.argmax([(labels[i] >= 0).sum() * (labels[i] < 0).sum() for i in range(16)]))
        open_slice(page, f"{html.as_uri()}?axis=0&index={plane}", 0, plane)
        check_colours(canvas_pixels(page)["rgb"], labels[plane])
        assert page.locator("#legend tr[data-label]").count() == 2
        # a fixed-K result: the voxel's trajectory rescaled as the engine does (I/<I>_T - 1), beside its mean
        k, h = (int(v) for v in np.argwhere(labels[plane] >= 0)[0])
        page.evaluate(f"xtec.showTrajectory([{plane}, {k}, {h}])")
        page.wait_for_function("document.getElementById('traj-data').textContent.length > 0", timeout=20000)
        shown = json.loads(page.text_content("#traj-data"))
        traj = zarr.open_group(str(series), mode="r")["intensity"][:, plane, k, h].astype(np.float64)
        assert shown["voxel"] == [plane, k, h] and shown["label"] == labels[plane, k, h]
        np.testing.assert_allclose(shown["curve"], traj / traj.mean() - 1, rtol=1e-5, atol=1e-6)
        means = json.loads((out / "result.json").read_text())["means"]
        np.testing.assert_allclose(shown["mean_curve"], means[shown["label"]])
        assert shown["fit_curve"] is None
    finally:
        page.close()


def test_an_unreachable_tiled_is_a_502_naming_the_server():
    import asyncio

    from xtec_flows.viewer.app import make_app

    port = _free_port()  # nothing listens there
    app = make_app(f"http://127.0.0.1:{port}", "s3cr3tkey", timeout=2.0)

    async def fetch(path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://viewer") as client:
            return await client.get(path)

    def get(path):
        # in a thread of its own: playwright's sync API keeps an event loop running in this one
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, fetch(path)).result()

    r = get("/api/results")
    assert r.status_code == 502 and f"127.0.0.1:{port}" in r.json()["error"] and "--tiled-uri" in r.json()["error"]
    assert "s3cr3tkey" not in r.text
    page = get("/")
    assert page.status_code == 200 and "s3cr3tkey" not in page.text and '"mode": "live"' in page.text
