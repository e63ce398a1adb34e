"""Bluesky runs in every layout Tiled serves, read by one open_scan (xtec_flows.tiled.layouts).

One real ``tiled serve config`` process for the module (``deploy/tiled/legacy-mongo.yml``, see
mongo_support): /raw is databroker's MongoAdapter (mongomock fed by a RunEngine inside the server,
or the MongoDB at ``XTEC_FLOWS_MONGO_URI``), read-only; /xtec is a writable SQL catalog, which also
holds a run in the older ``streams`` layout written here with the Tiled client.
"""

from __future__ import annotations

import copy
import json
import os
import uuid

import numpy as np
import pytest
import yaml

import mongo_support as ms
import xtec_flows
from xtec_flows import cli
from xtec_flows.engine import ClusterParams
from xtec_flows.tiled import layouts
from xtec_flows.tiled.layouts import RunLayout

API_KEY = "layouts"
PARAMS = ClusterParams(n_components=3, n_init=1)


# ------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("layouts_server")
    hdf5_dir = directory / "hdf5"
    hdf5_dir.mkdir()
    session = uuid.uuid4().hex
    mongo_uri = os.environ.get(ms.MONGO_URI_ENV) or None
    uids = None
    if mongo_uri is not None:  # a real MongoDB: this process acquires, the server only reads
        from suitcase.mongo_normalized import Serializer

        uids = ms.acquire(Serializer(mongo_uri, mongo_uri), hdf5_dir, session)
    (directory / "config.yml").write_text(yaml.safe_dump(ms.server_config(API_KEY, hdf5_dir, session, mongo_uri)))
    srv = ms.make_server_class()(directory, api_key=API_KEY, startup_timeout=120)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in ms.config_env(directory, mongo_uri).items():
            mp.setenv(k, v)
        srv.start()
    try:
        client = srv.client()
        if uids is None:  # acquired inside the server: find the runs by their start documents
            uids = {}
            for uid, run in client["raw"].items():
                start = run.metadata["start"]
                if start.get("xtec_session") == session:
                    uids[start["purpose"]] = uid
        assert set(uids) == set(ms.PURPOSES), uids
        srv.uids = uids
        srv.hdf5_dir = hdf5_dir
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def expected_labels(temps=ms.TEMPS, shape=ms.SHAPE, seed=ms.SEED):
    vol = ms.scan_volumes(temps, shape, seed)
    return xtec_flows.engine.run(vol, np.asarray(temps), PARAMS).labels[...]


# ------------------------------------------------------------------------------- the older 'streams' layout


def write_streams_run(parent, docs) -> str:
    """Write one run's documents into ``parent`` the way bluesky's ``bluesky.callbacks.tiled_writer``
    did before the 'streams' namespace was dropped (bluesky 1.14, spec BlueskyRun 3.0; tiled #1136):

        /<uid>                    container, spec BlueskyRun 3.0, metadata {"start", then "stop"}
          /streams                container (no spec)
            /<stream>             composite, spec BlueskyEventStream 3.0, metadata = descriptor
                                  without name/object_keys/run_start
              /internal           appendable table: seq_num, time, <internal keys>, ts_<internal keys>
              /<external key>     array registered from the StreamResource by the consolidator

    Rows and StreamDatums are cached and written at stop, as that writer did (batch 10000).
    """
    from bluesky_tiled_plugins.writing.consolidators import consolidator_factory
    from tiled.structures.core import Spec, StructureFamily

    import pyarrow

    rows, datums, resources, streams, desc_by_uid = {}, [], {}, {}, {}
    run = streams_node = None
    for name, doc in docs:
        doc = copy.deepcopy(doc)
        if name == "start":
            run = parent.create_container(key=doc["uid"], metadata={"start": doc},
                                          specs=[Spec("BlueskyRun", version="3.0")])
            streams_node = run.create_container(key="streams")
        elif name == "descriptor":
            for obj, keys in doc["object_keys"].items():
                for key in keys:
                    doc["data_keys"][key]["object_name"] = obj
            metadata = {k: v for k, v in doc.items() if k not in {"name", "object_keys", "run_start"}}
            # That writer called create_composite (tiled 0.1 betas); tiled 0.2 spells a composite
            # as a container with the "composite" spec.
            node = streams_node.create_container(key=doc["name"], metadata=metadata,
                                                 specs=[Spec("BlueskyEventStream", version="3.0"), Spec("composite")])
            streams[doc["name"]] = (node, doc)
            desc_by_uid[doc["uid"]] = doc["name"]
        elif name == "event":
            stream = desc_by_uid[doc["descriptor"]]
            internal = [k for k, v in streams[stream][1]["data_keys"].items() if "external" not in v]
            row = {"seq_num": doc["seq_num"], "time": doc["time"]}
            row.update({k: doc["data"][k] for k in internal})
            row.update({f"ts_{k}": doc["timestamps"][k] for k in internal})
            rows.setdefault(stream, []).append(row)
        elif name == "stream_resource":
            resources[doc["uid"]] = doc
        elif name == "stream_datum":
            datums.append(doc)
        elif name == "stop":
            for stream, stream_rows in rows.items():
                node, desc = streams[stream]
                table = pyarrow.Table.from_pylist(stream_rows)
                metadata = {k: v for k, v in desc["data_keys"].items() if k in table.column_names}
                node.create_appendable_table(schema=table.schema, key="internal", metadata=metadata) \
                    .append_partition(0, table)
            consolidators = {}
            for datum in datums:
                sres = resources[datum["stream_resource"]]
                node, desc = streams[desc_by_uid[datum["descriptor"]]]
                if sres["uid"] not in consolidators:
                    consolidators[sres["uid"]] = (consolidator_factory(sres, desc), node)
                consolidators[sres["uid"]][0].consume_stream_datum(datum)
            for consolidator, node in consolidators.values():
                node.new(key=consolidator.data_key, structure_family=StructureFamily.array,
                         data_sources=[consolidator.get_data_source()], metadata={}, specs=[])
            run.update_metadata(metadata={"stop": doc, **dict(run.metadata)})
    return run.metadata["start"]["uid"]


def make_streams_run(server, client) -> str:
    """A TEMPS x SHAPE scan in the 'streams' layout under /xtec/legacy-*; returns its path."""
    from bluesky import RunEngine
    from bluesky.plans import list_scan
    from ophyd.sim import SynAxis

    docs = []
    RE = RunEngine({})
    RE.subscribe(lambda name, doc: docs.append((name, doc)))
    det = ms.ADHDF5Volume("volume", ms.scan_volumes(ms.TEMPS, ms.SHAPE, ms.SEED), server.hdf5_dir, assets="stream")
    RE(list_scan([det], SynAxis(name="temperature"), ms.TEMPS), sample="synthetic")
    legacy = client["xtec"].create_container(key=f"legacy-{uuid.uuid4().hex[:8]}")
    uid = write_streams_run(legacy, docs)
    return "/".join(p for p in legacy.path_parts) + "/" + uid


@pytest.fixture(scope="module")
def streams_run(server, client):
    return make_streams_run(server, client)


# ------------------------------------------------------------------------------- tests


def test_open_stream_in_each_layout(client, server, streams_run):
    mongo = layouts.open_stream(client["raw"][server.uids["good"]])
    assert mongo.layout is RunLayout.MONGO and mongo.table is None
    assert mongo.path == f"/raw/{server.uids['good']}/primary/data"
    assert set(mongo.columns()) == {"temperature", "temperature_setpoint"}
    np.testing.assert_array_equal(mongo.column("temperature"), ms.TEMPS)
    # the AreaDetector frame axis (frame_per_point = 1) follows the event axis
    assert mongo.array_fields(3) == ["volume"] and mongo.arrays["volume"].shape == (12, 1, *ms.SHAPE)

    streams = layouts.open_stream(client[streams_run])
    assert streams.layout is RunLayout.STREAMS and streams.path.endswith("/streams/primary")
    np.testing.assert_array_equal(streams.column("temperature"), ms.TEMPS)
    assert streams.array_fields(3) == ["volume"] and streams.arrays["volume"].shape == (12, *ms.SHAPE)
    np.testing.assert_array_equal(streams.arrays["volume"].read(), ms.scan_volumes(ms.TEMPS, ms.SHAPE, ms.SEED))

    with pytest.raises(KeyError, match=r"no scalar field 'nope'.*temperature"):
        mongo.column("nope")


def test_databroker_objects_are_runs(client, server):
    run = client["raw"][server.uids["good"]]  # bluesky-tiled-plugins BlueskyRun (databroker v2 API)
    header = run.v1  # databroker v1 Header
    assert layouts.as_run_node(header) is header.v2 and layouts.as_run_node(run) is run
    stream = layouts.open_stream(header)
    assert stream.layout is RunLayout.MONGO
    np.testing.assert_array_equal(stream.column("temperature"), ms.TEMPS)
    with pytest.raises(TypeError, match="not a Tiled node or a databroker run"):
        layouts.as_run_node(object())


def test_missing_primary_stream_names_the_run(client, server):
    uid = server.uids["no-primary"]
    with pytest.raises(KeyError, match=rf"{uid}.*no 'primary' stream.*baseline"):
        layouts.open_stream(client["raw"][uid])


def test_cli_clusters_the_mongo_run_like_in_memory(server, client, capsys, monkeypatch):
    monkeypatch.setenv("TILED_API_KEY", API_KEY)
    uid = server.uids["good"]
    rc = cli.main(["cluster", "--tiled-uri", server.uri, "--scan", f"raw/{uid}", "-k", "3", "--n-init", "1",
                   "--quiet", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert doc["status"] == "complete" and doc["path"].startswith("/xtec/")
    node = client["xtec"][doc["key"]]
    md = node.metadata
    assert md["source"]["uid"] == uid
    np.testing.assert_array_equal(node["labels"].read(), expected_labels())
    np.testing.assert_array_equal(node["temperatures"].read(), ms.TEMPS)
    assert list(client["raw"][uid]) == ["primary"]  # nothing was written under /raw


def test_open_scan_records_the_layout(client, server, streams_run):
    from xtec_flows.tiled.scans import open_scan

    mongo = open_scan(client, f"raw/{server.uids['good']}")
    assert mongo.metadata["layout"] == "mongo" and mongo.volume.shape == (12, *ms.SHAPE)
    np.testing.assert_array_equal(mongo.volume.compute(), ms.scan_volumes(ms.TEMPS, ms.SHAPE, ms.SEED))
    legacy = open_scan(client, streams_run)
    assert legacy.metadata["layout"] == "streams" and legacy.uid == streams_run.rsplit("/", 1)[-1]
    np.testing.assert_array_equal(legacy.temperatures, ms.TEMPS)
    np.testing.assert_array_equal(legacy.volume.compute(), ms.scan_volumes(ms.TEMPS, ms.SHAPE, ms.SEED))
    held = open_scan(client["raw"][server.uids["good"]].v1)  # a databroker v1 Header
    assert held.metadata["layout"] == "mongo"


def test_streams_layout_clusters_the_same(client, streams_run):
    from xtec_flows.tiled.process import process_scan

    out = process_scan(client, streams_run, PARAMS)
    assert out.status == "complete"
    np.testing.assert_array_equal(client["xtec"][out.key]["labels"].read(), expected_labels())


def test_runs_that_do_not_fit_name_the_run(server, client):
    from xtec_flows.tiled.errors import ScanNotReady
    from xtec_flows.tiled.process import process_scan

    before = set(client["xtec"])
    # no primary stream: not ready, nothing written anywhere
    uid = server.uids["no-primary"]
    with pytest.raises(ScanNotReady, match=rf"{uid}.*no 'primary' stream.*baseline"):
        process_scan(client, f"raw/{uid}", PARAMS)
    assert set(client["xtec"]) == before
    # two candidate volumes: bad input. No labels or arrays anywhere; process_scan's one record of
    # the rejection (status failed, not retryable) is the only node written, and names the run.
    uid = server.uids["two-volumes"]
    with pytest.raises(ValueError, match=rf"{uid}.*'volume', 'volume_b'.*volume_field"):
        process_scan(client, f"raw/{uid}", PARAMS)
    added = set(client["xtec"]) - before
    assert len(added) <= 1
    for key in added:
        md = client["xtec"][key].metadata
        assert md["status"] == "failed" and md["retryable"] is False and uid in md["error"]
        assert list(client["xtec"][key]) == []
    assert list(client["raw"][uid]) == ["primary"]


# The watcher first tries a websocket subscription; the server has no streaming cache, so tiled's
# subscription thread dies on HTTP 500 (expected: that is how the watcher learns to poll).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watcher_polls_the_mongo_tree(server, client):
    """No websocket streaming on /raw: the watcher falls back to polling and still finds the runs."""
    import threading
    import time

    from xtec_flows.tiled.watch import ScanWatcher, completed_scans

    mine = set(server.uids.values())
    assert mine <= set(completed_scans(client["raw"]))  # stop.exit_status read from the stop documents
    submitted = []
    watcher = ScanWatcher(client["raw"], client["xtec"], ClusterParams(n_components=2, n_init=1).to_dict(),
                          submitted.append, reconcile_seconds=0.5, lookback_seconds=None, subscribe_timeout=2.0)
    thread = threading.Thread(target=watcher.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not mine <= set(submitted) and time.monotonic() < deadline:
        time.sleep(0.1)
    watcher.stop()
    thread.join(15)
    assert mine <= set(submitted) and watcher.stats.mode == "polling"
