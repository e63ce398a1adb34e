"""End-to-end checks of tests/tiled_support.py against a real Tiled HTTP server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tiled.server.app")
pytest.importorskip("bluesky_tiled_plugins")

from tiled_support import (  # noqa: E402,F401  (tiled_server/tiled_client are fixtures)
    TiledTestServer,
    run_temperature_scan,
    scan_volumes,
    subscribe_container,
    tiled_client,
    tiled_server,
    write_plain_array_node,
)

TEMPS = np.linspace(20.0, 300.0, 6)
SHAPE = (12, 12, 12)


@pytest.fixture(scope="module")
def inline_run(tiled_server):
    client = tiled_server.client()
    uid = run_temperature_scan(client, TEMPS, spatial_shape=SHAPE, seed=3,
                               md={"sample": "CsV3Sb5", "purpose": "harness-test"})
    return client, uid


def test_server_requires_api_key(tiled_server):
    import httpx

    assert tiled_server.uri.startswith("http://127.0.0.1:")
    assert "api_key" not in tiled_server.uri
    with httpx.Client(trust_env=False) as http:
        url = f"{tiled_server.uri}/api/v1/metadata/"
        assert http.get(url).status_code == 401
        assert http.get(url, headers={"Authorization": "Apikey wrong"}).status_code == 401
        ok = http.get(url, headers={"Authorization": f"Apikey {tiled_server.api_key}"})
        assert ok.status_code == 200


def test_only_one_server_per_process(tiled_server, tmp_path):
    with pytest.raises(RuntimeError, match="already running in this process"):
        TiledTestServer(tmp_path / "second").start()
    assert tiled_server.alive  # the refused start did not disturb the running server


def test_inline_scan_layout_and_data(inline_run):
    client, uid = inline_run
    run = client[uid]
    start, stop = run.metadata["start"], run.metadata["stop"]
    assert start["sample"] == "CsV3Sb5" and start["plan_name"] == "list_scan"
    assert stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": len(TEMPS)}
    primary = run["primary"].base
    assert set(primary) == {"volume", "internal"}
    arr = primary["volume"]
    assert arr.shape == (len(TEMPS), *SHAPE)
    assert arr.dtype == np.float32
    expected = scan_volumes(TEMPS, SHAPE, seed=3)
    got = arr.read()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert expected.std() > 0 and expected.max() > 10 * np.median(expected)  # real structure
    table = primary["internal"].read()
    np.testing.assert_array_equal(table["temperature"].to_numpy(), TEMPS)
    np.testing.assert_array_equal(table["seq_num"].to_numpy(), np.arange(1, len(TEMPS) + 1))


def test_external_hdf5_scan(tiled_server):
    client = tiled_server.client()
    uid = run_temperature_scan(client, TEMPS, spatial_shape=SHAPE, external=True,
                               hdf5_dir=tiled_server.hdf5_dir, seed=5,
                               volume_field="vol", temperature_field="sample_temp")
    run = client[uid]
    assert run.metadata["stop"]["exit_status"] == "success"
    primary = run["primary"].base
    assert set(primary) == {"vol", "internal"}
    arr = primary["vol"]
    (ds,) = arr.data_sources()
    assert ds.mimetype == "application/x-hdf5"
    assert ds.management == "external"
    (asset,) = ds.assets
    h5 = Path(asset.data_uri.removeprefix("file://localhost"))
    assert h5.parent == tiled_server.hdf5_dir and h5.is_file()
    assert arr.shape == (len(TEMPS), *SHAPE) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr.read(), scan_volumes(TEMPS, SHAPE, seed=5))
    temps = primary["internal"].read()["sample_temp"].to_numpy()
    np.testing.assert_array_equal(temps, TEMPS)


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
def test_failed_scan_keeps_partial_run(tiled_server, external):
    client = tiled_server.client()
    uid = run_temperature_scan(client, TEMPS, spatial_shape=SHAPE, fail_at=3, seed=1,
                               external=external, hdf5_dir=tiled_server.hdf5_dir)
    run = client[uid]
    stop = run.metadata["stop"]
    assert stop["exit_status"] == "fail"
    assert stop["num_events"] == {"primary": 3}
    primary = run["primary"].base
    np.testing.assert_array_equal(primary["volume"].read(), scan_volumes(TEMPS, SHAPE, seed=1)[:3])
    np.testing.assert_array_equal(primary["internal"].read()["temperature"].to_numpy(), TEMPS[:3])


def test_plain_array_node_metadata(tiled_server):
    client = tiled_server.client()
    vol = scan_volumes(TEMPS, SHAPE, seed=7)
    path = write_plain_array_node(client, "plain_md", vol, TEMPS)
    assert path == "plain_md"
    node = client[path]
    assert node.metadata["temperatures"] == TEMPS.tolist()
    assert node.dims == ("T", "L", "K", "H")
    assert node.dtype == np.float32
    np.testing.assert_array_equal(node.read(), vol)


def test_plain_array_node_sibling_chunked(tiled_server):
    client = tiled_server.client()
    vol = scan_volumes(TEMPS, SHAPE, seed=8)
    path = write_plain_array_node(client, "plain_sibling", vol, TEMPS,
                                  temperatures_as="sibling", chunks=(2, 12, 6, 12))
    node = client[path]
    assert set(node) == {"data", "temperature"}
    data = node["data"]
    assert data.chunks == ((2, 2, 2), (12,), (6, 6), (12,))
    assert data.dims == ("T", "L", "K", "H")
    np.testing.assert_array_equal(data.read(), vol)
    np.testing.assert_array_equal(data.read_block((1, 0, 1, 0)), vol[2:4, :, 6:12, :])
    np.testing.assert_array_equal(node["temperature"].read(), TEMPS)
    assert "temperatures" not in node["data"].metadata


def test_websocket_sees_new_run(tiled_server):
    client = tiled_server.client()
    created, finished = [], []
    got_stop = threading.Event()

    def on_created(update):  # named functions: tiled holds callbacks by weak reference
        created.append((update.key, dict(update.metadata or {})))

    def on_metadata(update):
        md = dict(update.metadata or {})
        finished.append((update.key, md))
        if "stop" in md:
            got_stop.set()

    with subscribe_container(client, timeout=10) as sub:
        sub.child_created.add_callback(on_created)
        sub.child_metadata_updated.add_callback(on_metadata)
        uid = run_temperature_scan(client, TEMPS[:3], spatial_shape=(6, 6, 6),
                                   md={"sample": "ws"})
        assert got_stop.wait(10), f"no stop metadata update; got {finished}"
        deadline = time.monotonic() + 5
        while not any(k == uid for k, _ in created) and time.monotonic() < deadline:
            time.sleep(0.05)
    run_created = [md for k, md in created if k == uid]
    assert run_created and run_created[0]["start"]["sample"] == "ws"
    stops = [md["stop"] for k, md in finished if k == uid and "stop" in md]
    assert stops and stops[-1]["exit_status"] == "success"


def test_startup_failure_is_loud(tmp_path):
    """A server that cannot start raises promptly (subprocess: one server per process)."""
    script = textwrap.dedent(f"""
        import socket, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiled_support import TiledTestServer
        s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(1)
        port = s.getsockname()[1]
        t0 = time.monotonic()
        try:
            TiledTestServer({str(tmp_path / "srv")!r}, port=port).start()
        except RuntimeError as exc:
            print("RAISED", round(time.monotonic() - t0, 1), str(exc).splitlines()[0])
        else:
            print("STARTED")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=90)
    assert "RAISED" in out.stdout, out.stdout + out.stderr
    assert "died during start-up" in out.stdout
