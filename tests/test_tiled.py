"""Tiled-native I/O against a real Tiled server and real bluesky runs (TiledWriter)."""

import json

import httpx
import numpy as np
import pytest
from tiled.queries import Key

import xtec_flows
from tiled_support import run_temperature_scan, scan_volumes, write_plain_array_node
from xtec_flows import cli
from xtec_flows.tiled import results
from xtec_flows import tiled as tiled_io
from xtec_flows.engine import ClusterParams
from xtec_flows.tiled.process import process_scan

TEMPS = [20.0, 60.0, 100.0, 130.0, 150.0, 170.0, 220.0, 300.0]
SHAPE = (16, 16, 16)
PARAMS = ClusterParams(n_components=3, n_init=1)


@pytest.fixture(scope="module")
def inline_uid(tiled_server):
    return run_temperature_scan(tiled_server.client(), TEMPS, spatial_shape=SHAPE, seed=1, md={"sample": "synthetic"})


@pytest.fixture(scope="module")
def external_uid(tiled_server):
    return run_temperature_scan(tiled_server.client(), TEMPS, spatial_shape=SHAPE, seed=2, external=True,
                                hdf5_dir=tiled_server.hdf5_dir)


def expected_labels(seed, params=PARAMS):
    vol = scan_volumes(TEMPS, SHAPE, seed=seed)
    return xtec_flows.engine.run(vol, np.asarray(TEMPS), params).labels[...]


# ------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("which,seed", [("inline", 1), ("external", 2)])
def test_open_bluesky_run(tiled_client, inline_uid, external_uid, which, seed):
    uid = inline_uid if which == "inline" else external_uid
    scan = tiled_io.open_scan(tiled_client, uid)
    assert scan.kind == "bluesky-run" and scan.uid == uid
    assert scan.path == f"/{uid}/primary/volume"
    np.testing.assert_array_equal(scan.temperatures, TEMPS)
    assert scan.volume.shape == (len(TEMPS),) + SHAPE and scan.volume.dtype == np.float32
    np.testing.assert_array_equal(scan.volume.compute(), scan_volumes(TEMPS, SHAPE, seed=seed))


def test_open_run_object_the_user_holds(tiled_client, inline_uid):
    run = tiled_client[inline_uid]  # the BlueskyRun client tiled returns
    scan = tiled_io.open_scan(run)
    assert scan.uid == inline_uid
    np.testing.assert_array_equal(scan.temperatures, TEMPS)


@pytest.mark.parametrize("read_mode", ["http", "auto"])
def test_reads_region_by_region(tiled_client, inline_uid, read_mode):
    node = tiled_io.walk(tiled_client, tiled_io.open_scan(tiled_client, inline_uid).path)
    volume = tiled_io.lazy_array(node, read_mode=read_mode, max_request_bytes=8 * 8**3 * 4)  # 8^3 tiles: 8 reads
    assert volume.numblocks == (1, 2, 2, 2)
    np.testing.assert_array_equal(volume.compute(), scan_volumes(TEMPS, SHAPE, seed=1))


def test_each_region_is_fetched_in_the_thread_of_its_task(tiled_client, inline_uid):
    # tiled's ArrayClient.read computes a dask graph of its own; nested in our threaded graph,
    # computed off the main thread, that inner compute once hung for good (a provisional
    # update). read_region fetches in the calling thread instead.
    import threading

    from xtec_flows.tiled.arrays import read_region

    node = tiled_io.walk(tiled_client, tiled_io.open_scan(tiled_client, inline_uid).path)
    fetched_in, fetch = [], node._get_slice
    node._get_slice = lambda slc: (fetched_in.append(threading.current_thread()), fetch(slc))[1]
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("block", read_region(node, (slice(None), slice(0, 8)))))
    worker.start()
    worker.join(30)
    assert fetched_in and set(fetched_in) == {worker}
    np.testing.assert_array_equal(out["block"], scan_volumes(TEMPS, SHAPE, seed=1)[:, :8])


@pytest.mark.parametrize("temperatures_as", ["metadata", "sibling"])
def test_open_plain_array_node(tiled_client, temperatures_as):
    vol = scan_volumes(TEMPS, SHAPE, seed=3)
    path = write_plain_array_node(tiled_client, f"test_tiled_plain_{temperatures_as}", vol, TEMPS, temperatures_as=temperatures_as)
    scan = tiled_io.open_scan(tiled_client, path)
    assert scan.kind == "array"
    np.testing.assert_array_equal(scan.temperatures, TEMPS)
    np.testing.assert_array_equal(scan.volume.compute(), vol)


def test_field_detection_and_errors(tiled_client, inline_uid):
    with pytest.raises(ValueError, match="has no field 'nope'"):
        tiled_io.open_scan(tiled_client, inline_uid, volume_field="nope")
    with pytest.raises(ValueError, match="no column 'nope'"):
        tiled_io.open_scan(tiled_client, inline_uid, temperature_field="nope")
    with pytest.raises(KeyError, match="no node"):
        tiled_io.open_scan(tiled_client, "no-such-uid")


def test_failed_scan_is_not_processed_and_nothing_is_written(tiled_server, tiled_client):
    uid = run_temperature_scan(tiled_server.client(), TEMPS, spatial_shape=(8, 8, 8), fail_at=4)
    before = set(tiled_client["xtec"]) if "xtec" in tiled_client else set()
    with pytest.raises(tiled_io.ScanNotReady, match="exit_status 'fail'"):
        process_scan(tiled_client, uid, PARAMS)
    after = set(tiled_client["xtec"]) if "xtec" in tiled_client else set()
    assert after == before


# ------------------------------------------------------------------------------- writing


def test_process_scan_writes_a_complete_result(tiled_server, tiled_client, inline_uid):
    out = process_scan(tiled_client, inline_uid, PARAMS)
    assert not out.reused and out.status == "complete" and out.path == f"/xtec/{out.key}"
    node = tiled_client["xtec"][out.key]
    md = node.metadata
    assert md["status"] == "complete" and md["completed"] >= md["created"]
    assert md["source"]["uid"] == inline_uid and md["source"]["path"] == f"/{inline_uid}/primary/volume"
    assert md["parameters"] == PARAMS.to_dict()
    assert md["versions"]["xtec_flows"] == xtec_flows.__version__ and "tiled" in md["versions"]
    assert "log_likelihood" in md and "bic" in md and "timings" in md and md["threshold"]["log_cutoff"]
    assert [s.name for s in node.specs] == ["xtec-clusters"]
    assert tiled_server.api_key not in json.dumps(dict(md))
    labels = node["labels"]
    assert np.dtype(labels.dtype) == np.int8 and tuple(labels.dims) == ("L", "K", "H")
    np.testing.assert_array_equal(labels.read(), expected_labels(1))
    assert node["means"].shape == (3, len(TEMPS)) and node["variances"].shape == (3, len(TEMPS))
    np.testing.assert_array_equal(node["temperatures"].read(), TEMPS)
    assert node["counts"].read().sum() == md["n_thresholded"]
    assert node["histogram_counts"].read().sum() == md["n_valid"]


def test_rerun_returns_existing_and_other_params_make_a_sibling(tiled_client, external_uid):
    first = process_scan(tiled_client, external_uid, PARAMS)
    stamp = tiled_client["xtec"][first.key].metadata["completed"]
    again = process_scan(tiled_client, external_uid, PARAMS)
    assert again.reused and again.key == first.key
    assert tiled_client["xtec"][first.key].metadata["completed"] == stamp  # not recomputed
    other = process_scan(tiled_client, external_uid, ClusterParams(n_components=2, n_init=1))
    assert other.key != first.key and not other.reused
    # the latest complete result of the scan is one search away
    hits = tiled_client["xtec"].search(Key("source.uid") == external_uid).search(Key("status") == "complete")
    assert {first.key, other.key} <= set(hits)
    assert results.latest_result(tiled_client, external_uid).path_parts[-1] == other.key


def test_incomplete_result_is_replaced(tiled_client, inline_uid):
    params = ClusterParams(n_components=2, n_init=1, random_state=5)
    scan = tiled_io.open_scan(tiled_client, inline_uid)
    root = tiled_io.derived_root(tiled_client)
    key = tiled_io.result_key(scan.uid, params.to_dict())
    node, existing = tiled_io.begin_result(root, key, scan, params.to_dict())  # a worker that died: 'running'
    assert not existing and node.metadata["status"] == "running"
    assert results.latest_result(tiled_client, inline_uid) is None or \
        results.latest_result(tiled_client, inline_uid).path_parts[-1] != key  # never visible as complete
    out = process_scan(tiled_client, inline_uid, params)
    assert out.key == key and not out.reused
    assert tiled_client["xtec"][key].metadata["status"] == "complete"


def test_failure_is_recorded(tiled_client, inline_uid):
    params = ClusterParams(n_components=2, threshold=1e12, n_init=1)
    with pytest.raises(ValueError, match="no voxel passed the threshold"):
        process_scan(tiled_client, inline_uid, params)
    failed = results.find_results(tiled_client, inline_uid, status="failed")
    assert failed and "no voxel passed the threshold" in failed[0].metadata["error"]


def test_labels_are_written_block_by_block(tiled_client):
    parent = tiled_io.derived_root(tiled_client, "blocktest")
    labels = np.random.default_rng(0).integers(-1, 4, size=(40, 30, 20)).astype(np.int8)
    import zarr

    z = zarr.create_array(zarr.storage.MemoryStore(), shape=labels.shape, chunks=(8, 8, 8), dtype="int8")
    z[...] = labels
    node = tiled_io.write_labels_array(parent, z, ["L", "K", "H"], max_request_bytes=16 * 16 * 16)  # 16^3 blocks
    assert max(max(c) for c in node.chunks) <= 16 and len(node.chunks[0]) > 1
    np.testing.assert_array_equal(node.read(), labels)


# ------------------------------------------------------------------------------- retrieval


def test_retrieval_with_plain_tiled_client_and_http(tiled_server, inline_uid):
    from tiled.client import from_uri

    process_scan(tiled_server.client(), inline_uid, PARAMS)
    # README recipe: nothing but tiled.client
    c = from_uri(tiled_server.uri, api_key=tiled_server.api_key)
    hits = c["xtec"].search(Key("source.uid") == inline_uid).search(Key("status") == "complete")
    node = next(iter(hits.values()))
    np.testing.assert_array_equal(node["labels"].read(), expected_labels(1, node_params(node)))
    # raw HTTP
    headers = {"Authorization": f"Apikey {tiled_server.api_key}"}
    r = httpx.get(f"{tiled_server.uri}/api/v1/search/xtec", headers=headers,
                  params={"filter[eq][condition][key]": "source.uid",
                          "filter[eq][condition][value]": json.dumps(inline_uid)})
    r.raise_for_status()
    keys = [d["id"] for d in r.json()["data"]]
    assert node.path_parts[-1] in keys
    r = httpx.get(f"{tiled_server.uri}/api/v1/array/full/xtec/{node.path_parts[-1]}/means",
                  headers={**headers, "Accept": "application/json"})
    r.raise_for_status()
    np.testing.assert_allclose(np.asarray(r.json()), node["means"].read())
    loaded = results.load_result(node, lazy=True)
    np.testing.assert_array_equal(loaded.labels.compute(), node["labels"].read())


def node_params(node):
    p = dict(node.metadata["parameters"])
    p.pop("smoothing", None)
    return ClusterParams(**p)


# ------------------------------------------------------------------------------- CLI and auth


def test_cli_cluster_results_and_import(tiled_server, tmp_path, capsys, monkeypatch, inline_uid):
    monkeypatch.setenv("TILED_API_KEY", tiled_server.api_key)
    rc = cli.main(["cluster", "--tiled-uri", tiled_server.uri, "--scan", inline_uid, "-k", "2", "--n-init", "1",
                   "--quiet", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert doc["status"] == "complete" and doc["n_components"] == 2
    rc = cli.main(["results", tiled_server.uri, inline_uid, "--json"])
    listed = json.loads(capsys.readouterr().out)["results"]
    assert rc == 0 and doc["key"] in [r["key"] for r in listed]
    # NeXus import, one file per temperature (nxrefine style), then cluster the imported node
    import h5py

    vol = scan_volumes(TEMPS, SHAPE, seed=4)
    files = []
    for i, t in enumerate(TEMPS):
        path = tmp_path / f"s_{int(t)}K.nxs"
        with h5py.File(path, "w") as f:
            f.attrs["default"] = "entry"
            entry = f.create_group("entry")
            entry.attrs["default"] = "data"
            data = entry.create_group("data")
            data.attrs["signal"] = "data"
            data.create_dataset("data", data=vol[i])
            entry.create_group("sample").create_dataset("temperature", data=t)
        files.append(str(path))
    # listed out of temperature order: the temperatures in the files decide the order
    rc = cli.main(["import", *files[::-1], "--tiled-uri", tiled_server.uri, "--key", "imported_s4", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["shape"] == [len(TEMPS), *SHAPE]
    assert json.loads(out.out)["temperatures"] == TEMPS
    scan = tiled_io.open_scan(tiled_server.client(), "imported_s4")
    np.testing.assert_array_equal(scan.volume.compute(), vol)
    rc = cli.main(["import", *files, "--tiled-uri", tiled_server.uri, "--key", "imported_s4"])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    rc = cli.main(["cluster", "--tiled-uri", tiled_server.uri, "--scan", "imported_s4", "-k", "3", "--n-init", "1",
                   "--quiet", "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["status"] == "complete"


def test_auth_errors_are_clear_and_keys_never_leak(tiled_server, inline_uid, capsys, monkeypatch, caplog):
    monkeypatch.delenv("TILED_API_KEY", raising=False)
    rc = cli.main(["results", tiled_server.uri, inline_uid, "--api-key", "wrongkey"])
    err = capsys.readouterr().err
    assert rc == 2 and "wrongkey" not in err
    assert "401" in err or "API key" in err
    with caplog.at_level("DEBUG"):
        tiled_io.connect(tiled_server.uri, tiled_server.api_key)
    assert tiled_server.api_key not in caplog.text
    assert tiled_io.redact_uri("http://h:8000/api/v1?api_key=secret") == "http://h:8000/api/v1"


# ------------------------------------------------------------------------------- bad input


def test_running_scan_is_not_processed(tiled_client):
    # what TiledWriter shows while a scan runs: the run container with a start document, no stop yet
    run = tiled_client.create_container("running_scan_uid", metadata={"start": {"uid": "running_scan_uid"}})
    run.create_container("primary")
    with pytest.raises(tiled_io.ScanNotReady, match="no stop document"):
        process_scan(tiled_client, "running_scan_uid", PARAMS)
    assert not results.find_results(tiled_client, "running_scan_uid", status=None)


def test_bad_nodes_are_refused_before_anything_is_written(tiled_client):
    bad = tiled_client.create_container("bad_nodes")
    bad.write_array(np.zeros((5, 4), np.float32), key="flat", metadata={"temperatures": [1, 2, 3, 4, 5]})
    bad.write_array(np.ones((4, 6, 6, 6), np.float32), key="short", metadata={"temperatures": [1, 2, 3]})
    with pytest.raises(ValueError, match="must be a 3-D"):
        tiled_io.open_scan(tiled_client, "bad_nodes/flat")
    with pytest.raises(ValueError, match="4 volumes but 3 temperatures"):
        process_scan(tiled_client, "bad_nodes/short", PARAMS)
    assert not results.find_results(tiled_client, "/bad_nodes/short", status=None)


@pytest.mark.parametrize("key", ["a/b", "q?x=1", "frag#1", "..", "", "x" * 300])
def test_keys_tiled_cannot_serve_are_refused(tiled_client, key):
    with pytest.raises(ValueError, match="not a node name Tiled can serve back"):
        tiled_io.write_series(tiled_client, key, np.ones((3, 4, 4, 4), np.float32), [1, 2, 3])


def test_process_a_run_object(tiled_client, inline_uid):
    run = tiled_client[inline_uid]
    out = process_scan(run, params=ClusterParams(n_components=3, n_init=1, random_state=9))
    assert out.path.startswith("/xtec/") and tiled_client["xtec"][out.key].metadata["source"]["uid"] == inline_uid


@pytest.mark.parametrize("layout", ["one 4-D dataset", "one entry per temperature"])
def test_import_nexus_layouts(tiled_server, tmp_path, capsys, layout):
    import h5py

    from xtec_flows.io import nexus

    vol = scan_volumes(TEMPS, (8, 8, 8), seed=5)
    path = tmp_path / "series.nxs"
    if layout == "one 4-D dataset":
        inputs = [nexus.write_series(path, vol, TEMPS)]
    else:
        with h5py.File(path, "w") as f:  # nxrefine style: f0, f1, ... one NXentry per temperature
            for i, t in enumerate(TEMPS):
                entry = f.create_group(f"f{i}")
                entry.attrs["default"] = "data"
                data = entry.create_group("data")
                data.attrs["signal"] = "data"
                data.create_dataset("data", data=vol[i])
                entry.create_group("sample").create_dataset("temperature", data=t)
        inputs = [str(path)]
    key = "imported_" + ("4d" if layout.startswith("one 4") else "entries")
    rc = cli.main(["import", *inputs, "--tiled-uri", tiled_server.uri, "--api-key", tiled_server.api_key,
                   "--key", key, "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    scan = tiled_io.open_scan(tiled_server.client(), key)
    np.testing.assert_array_equal(scan.temperatures, TEMPS)
    np.testing.assert_array_equal(scan.volume.compute(), vol)
