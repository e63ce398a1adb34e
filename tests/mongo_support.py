"""Bluesky runs in databroker's MongoDB layout, served by a real ``tiled serve config`` process.

The server's config is ``deploy/tiled/legacy-mongo.yml`` itself (its ${VARS} set for a temporary
directory), with the /raw tree swapped for :func:`build_mongomock_tree` unless
``XTEC_FLOWS_MONGO_URI`` names a real MongoDB:

* mongomock (default): mongomock lives inside one process, so the *server* process acquires the
  runs: the config's /raw tree is ``mongo_support:build_mongomock_tree``, which makes the
  ``MongoAdapter`` from mongomock, runs the RunEngine scans into it through the adapter's own
  suitcase-mongo serializer, and returns the adapter.
* ``XTEC_FLOWS_MONGO_URI=mongodb://host:27017/dbname``: /raw is the deploy file's
  ``MongoAdapter.from_uri(${XTEC_FLOWS_MONGO_URI})`` and this (test) process runs the scans,
  inserting with suitcase-mongo into that database.

Either way the runs are made by :func:`acquire`: a real ``RunEngine``, an ophyd ``SynAxis`` as the
temperature controller, and :class:`ADHDF5Volume`, a simulated AreaDetector whose HDF5 plugin
writes one (1, L, K, H) frame per trigger into ``/entry/data/data`` and emits a ``resource``
(spec ``AD_HDF5``, handled server-side by area-detector-handlers) and one ``datum`` per event.
Each run's start document carries ``purpose`` (see :data:`PURPOSES`) and ``xtec_session``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEPLOY_CONFIG = HERE.parent / "deploy" / "tiled" / "legacy-mongo.yml"
MONGO_URI_ENV = "XTEC_FLOWS_MONGO_URI"

TEMPS = [20.0, 45.0, 70.0, 95.0, 120.0, 140.0, 160.0, 180.0, 200.0, 230.0, 260.0, 300.0]
SHAPE = (16, 16, 16)
SEED = 7
SMALL_TEMPS = [20.0, 150.0, 300.0]
SMALL_SHAPE = (4, 4, 4)
#: purpose (start-document key) -> what the run is
PURPOSES = {
    "good": "TEMPS x SHAPE volumes from an AD_HDF5 detector 'volume'",
    "two-volumes": "two AD_HDF5 detectors 'volume' and 'volume_b' (ambiguous volume field)",
    "no-primary": "a 'baseline' stream only, no primary events",
}


class ADHDF5Volume:
    """A simulated AreaDetector with an HDF5 file plugin, one (L, K, H) volume per trigger.

    ``assets="resource"`` (databroker's way), like ophyd's ``HDF5Plugin`` + ``FileStoreHDF5``:
    staging opens ``<directory>/<name>_<uuid>.h5`` and emits a ``resource`` (spec ``AD_HDF5``,
    ``frame_per_point`` 1); each trigger appends ``volumes[i]`` to ``/entry/data/data`` and emits a
    ``datum`` with ``point_number`` i; the event holds the datum id. The data key's shape is
    (1, L, K, H): the handler returns ``frame_per_point`` frames per datum, and databroker checks
    the shape against it.

    ``assets="stream"`` (TiledWriter's way): the same file, announced by one ``stream_resource``
    (application/x-hdf5, dataset ``/entry/data/data``) and one ``stream_datum`` per trigger; the
    data key is ``external: "STREAM:"`` of shape (L, K, H) and the event holds nothing for it.
    """

    def __init__(self, name: str, volumes: np.ndarray, directory, assets: str = "resource") -> None:
        if assets not in ("resource", "stream"):
            raise ValueError(f"assets must be 'resource' or 'stream'; got {assets!r}")
        self.assets = assets
        self.name = name
        self.parent = None
        self.volumes = np.asarray(volumes, dtype=np.float32)
        self.directory = Path(directory)
        self._file = None
        self._resource = None
        self._pending: list = []
        self._datum_id = None
        self._i = 0

    # bluesky protocols -----------------------------------------------------------------------
    def describe(self):
        if self.assets == "stream":
            return {self.name: {"source": f"SIM:{self.name}", "dtype": "array", "dtype_numpy": "<f4",
                                "shape": list(self.volumes.shape[1:]), "external": "STREAM:"}}
        return {self.name: {"source": f"SIM:{self.name}", "dtype": "array", "dtype_numpy": "<f4",
                            "shape": [1, *self.volumes.shape[1:]], "external": "FILESTORE:"}}

    def describe_configuration(self):
        return {}

    def read_configuration(self):
        return {}

    def stage(self):
        import h5py

        self.directory.mkdir(parents=True, exist_ok=True)
        filename = f"{self.name}_{uuid.uuid4().hex[:8]}.h5"
        self._file = h5py.File(self.directory / filename, "w")
        self._dataset = self._file.create_dataset(
            "/entry/data/data", shape=(0, *self.volumes.shape[1:]), maxshape=(None, *self.volumes.shape[1:]),
            dtype="<f4", chunks=(1, *self.volumes.shape[1:]))
        if self.assets == "stream":
            self._resource = {"uid": str(uuid.uuid4()), "data_key": self.name, "mimetype": "application/x-hdf5",
                              "uri": f"file://localhost{(self.directory / filename).resolve()}",
                              "parameters": {"dataset": "/entry/data/data",
                                             "chunk_shape": [1, *self.volumes.shape[1:]]}}
            self._pending.append(("stream_resource", self._resource))
        else:
            self._resource = {"uid": str(uuid.uuid4()), "spec": "AD_HDF5", "root": str(self.directory),
                              "resource_path": filename, "resource_kwargs": {"frame_per_point": 1},
                              "path_semantics": "posix"}
            self._pending.append(("resource", self._resource))
        self._i = 0
        return [self]

    def unstage(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        return [self]

    def trigger(self):
        from ophyd.sim import NullStatus

        i = self._i
        self._dataset.resize(i + 1, axis=0)
        self._dataset[i] = self.volumes[i]
        self._file.flush()
        self._i += 1
        if self.assets == "stream":  # the RunEngine fills in descriptor and seq_nums
            self._pending.append(("stream_datum", {
                "uid": f"{self._resource['uid']}/{i}", "stream_resource": self._resource["uid"], "descriptor": "",
                "indices": {"start": i, "stop": i + 1}, "seq_nums": {"start": 0, "stop": 0}}))
            return NullStatus()
        self._datum_id = f"{self._resource['uid']}/{i}"
        self._pending.append(("datum", {"datum_id": self._datum_id, "resource": self._resource["uid"],
                                        "datum_kwargs": {"point_number": i}}))
        return NullStatus()

    def read(self):
        if self.assets == "stream":
            return {}
        return {self.name: {"value": self._datum_id, "timestamp": time.time()}}

    def collect_asset_docs(self):
        pending, self._pending = self._pending, []
        yield from pending


def scan_volumes(temperatures, shape, seed):
    from xtec_flows.demo.beamline import scan_volumes as _scan_volumes

    return _scan_volumes(temperatures, shape, seed=seed)


def acquire(callback, hdf5_dir, session: str) -> dict:
    """Run the three scans of :data:`PURPOSES` through a RunEngine into ``callback``.

    Returns {purpose: start uid}.
    """
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from bluesky import RunEngine
    from bluesky.plans import list_scan
    from ophyd.sim import SynAxis

    RE = RunEngine({})
    RE.subscribe(callback)
    temperature = SynAxis(name="temperature")
    uids = {}
    md = {"sample": "synthetic", "xtec_session": session}

    det = ADHDF5Volume("volume", scan_volumes(TEMPS, SHAPE, SEED), hdf5_dir)
    (uids["good"],) = RE(list_scan([det], temperature, TEMPS), purpose="good", **md)

    a = ADHDF5Volume("volume", scan_volumes(SMALL_TEMPS, SMALL_SHAPE, 1), hdf5_dir)
    b = ADHDF5Volume("volume_b", scan_volumes(SMALL_TEMPS, SMALL_SHAPE, 2), hdf5_dir)
    (uids["two-volumes"],) = RE(list_scan([a, b], temperature, SMALL_TEMPS), purpose="two-volumes", **md)

    @bpp.run_decorator(md={"purpose": "no-primary", **md})
    def baseline_only():
        yield from bps.trigger_and_read([temperature], name="baseline")

    (uids["no-primary"],) = RE(baseline_only())
    return uids


def build_mongomock_tree(hdf5_dir: str, session: str):
    """The config's /raw tree for mongomock: a MongoAdapter holding the :func:`acquire` runs.

    Runs inside the Tiled server process (mongomock is in-process memory).
    """
    from databroker.mongo_normalized import MongoAdapter

    adapter = MongoAdapter.from_mongomock()
    acquire(adapter.get_serializer(), hdf5_dir, session)
    return adapter


def server_config(api_key: str, hdf5_dir, session: str, mongo_uri: str | None) -> dict:
    """``deploy/tiled/legacy-mongo.yml`` as the test server runs it (a dict to dump as YAML).

    With ``mongo_uri`` the /raw tree is the deploy file's, unchanged; without it, the mongomock
    builder. /xtec may also read ``hdf5_dir`` (the test registers external HDF5 there). The key is
    written in: the harness's child environment drops ``TILED_SINGLE_USER_API_KEY`` on purpose.
    """
    import yaml

    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    config["authentication"]["single_user_api_key"] = api_key
    trees = {t["path"]: t for t in config["trees"]}
    if mongo_uri is None:
        trees["/raw"].update(tree="mongo_support:build_mongomock_tree",
                             args={"hdf5_dir": str(hdf5_dir), "session": session})
    trees["/xtec"]["args"]["readable_storage"] = [str(hdf5_dir)]
    return config


def config_env(directory, mongo_uri: str | None) -> dict:
    """The environment the deploy file's ${VARS} expect, for a server under ``directory``."""
    directory = Path(directory)
    env = {
        "TILED_CATALOG_DATABASE_URI": f"sqlite:///{directory / 'catalog.db'}",
        "TILED_DATA_DIR": str(directory / "data"),
        "TILED_TABLES_DATABASE_URI": f"duckdb:///{directory / 'tables.duckdb'}",
        # the config's tree builder is imported from this directory in the server process
        "PYTHONPATH": os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p),
    }
    if mongo_uri is not None:
        env[MONGO_URI_ENV] = mongo_uri
    return env


def make_server_class():
    """A :class:`tiled_subprocess.SubprocessTiledServer` that runs ``tiled serve config FILE``."""
    from tiled_subprocess import SubprocessTiledServer, tiled_executable

    class ConfigTiledServer(SubprocessTiledServer):
        """``tiled serve config <directory>/config.yml``; the file is written before start()."""

        @property
        def config_path(self) -> Path:
            return self.directory / "config.yml"

        def argv(self, writable: bool) -> list[str]:
            return [*tiled_executable(), "serve", "config", str(self.config_path),
                    "--host", "127.0.0.1", "--port", str(self.port)]

    return ConfigTiledServer
