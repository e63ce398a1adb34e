"""Direct file reads of Tiled array nodes (xtec_flows.tiled.direct) against a real Tiled server.

One ``tiled serve catalog`` subprocess for the module (its zarr storage and an HDF5 directory in
readable storage, on this host). Every direct read is compared with what the server sends over
HTTP for the same node: equal values, and equal clustering labels.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("tiled.client")
pytest.importorskip("zarr")

from tiled_subprocess import SubprocessTiledServer  # noqa: E402
from tiled_support import _lower_client_retries, run_temperature_scan, write_plain_array_node  # noqa: E402

from xtec_flows.demo.beamline import scan_volumes  # noqa: E402
from xtec_flows.tiled.direct import (  # noqa: E402
    DirectReadUnavailable,
    StructureMismatch,
    direct_array,
    direct_source,
)

TEMPS = np.linspace(20.0, 240.0, 12)
SPATIAL = (16, 16, 16)
LOGGER = "xtec_flows.tiled.direct"


class _Server(SubprocessTiledServer):
    """The subprocess server with one more readable directory, for external HDF5 files."""

    def __init__(self, directory, **kw) -> None:
        super().__init__(directory, **kw)
        self.hdf5_dir = self.directory / "hdf5"

    def argv(self, writable: bool) -> list[str]:
        self.hdf5_dir.mkdir(parents=True, exist_ok=True)
        return [*super().argv(writable), "-r", str(self.hdf5_dir)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    _lower_client_retries()
    srv = _Server(tmp_path_factory.mktemp("direct_srv")).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client(headers={"accept-encoding": "identity"})


@pytest.fixture(scope="module")
def volume():
    return scan_volumes(TEMPS, SPATIAL, seed=3)


@pytest.fixture(scope="module")
def zarr_node(client, volume):
    # Tiled chunks (4, 8, 8, 8): the dask blocks below (12, 8, 16, 16) span several of them.
    path = write_plain_array_node(client, "vol", volume, TEMPS, chunks=(4, 8, 8, 8))
    return client[path]


def _zarr_path(node) -> str:
    return direct_source(node).paths[0]


def _http_dask(node, chunks):
    """The HTTP reference: one ``read(slice=...)`` request per dask block."""
    import dask
    import dask.array as da

    x = da.zeros(node.shape, chunks=chunks, dtype=np.dtype(node.dtype))
    blocks = np.empty(x.numblocks, dtype=object)
    for idx in np.ndindex(*x.numblocks):
        region = tuple(slice(sum(c[:i]), sum(c[:i]) + c[i]) for c, i in zip(x.chunks, idx))
        shape = tuple(s.stop - s.start for s in region)
        blocks[idx] = da.from_delayed(dask.delayed(node.read)(slice=region), shape, dtype=x.dtype)
    return da.block(blocks.tolist())


def test_zarr_direct_read_equals_http(zarr_node, volume):
    src = direct_source(zarr_node)
    assert src is not None and src.kind == "zarr"
    assert src.shape == volume.shape and src.dtype == np.float32
    chunks = (12, 8, 16, 16)
    d = direct_array(zarr_node, chunks)
    assert d.shape == volume.shape and d.dtype == volume.dtype and d.chunks == ((12,), (8, 8), (16,), (16,))
    got = d.compute()
    np.testing.assert_array_equal(got, np.asarray(zarr_node.read()))
    np.testing.assert_array_equal(got, volume)
    # An uneven grid and a sub-slice of the dask array read the same values.
    np.testing.assert_array_equal(direct_array(zarr_node, (5, 7, 16, 3))[:, 3:11, 2, ::3].compute(),
                                  volume[:, 3:11, 2, ::3])


def test_direct_and_http_give_identical_labels(client, zarr_node):
    from xtec_flows.engine import ClusterParams, run
    from xtec_flows.tiled import open_scan

    params = ClusterParams(n_components=3, random_state=0)
    direct = open_scan(client, "vol", read_mode="direct").volume
    http = open_scan(client, "vol", read_mode="http").volume
    assert direct.name.startswith("tiled-direct") and not http.name.startswith("tiled-direct")
    assert direct.chunks == http.chunks  # the same block grid either way
    assert open_scan(client, "vol").volume.name.startswith("tiled-direct")  # "auto": the file is readable here
    labels_direct = np.asarray(run(direct, TEMPS, params).labels)
    labels_http = np.asarray(run(http, TEMPS, params).labels)
    np.testing.assert_array_equal(labels_direct, labels_http)
    assert len(np.unique(labels_direct[labels_direct >= 0])) == 3
    # The hand-made HTTP grid of the first test gives the same labels too.
    np.testing.assert_array_equal(np.asarray(run(_http_dask(zarr_node, http.chunks), TEMPS, params).labels),
                                  labels_direct)


def test_read_mode_policy(zarr_node):
    from xtec_flows.tiled import open_scan

    assert direct_array(zarr_node, (12, 16, 16, 16), read_mode="http") is None
    with pytest.raises(ValueError, match=r"read_mode must be one of .*got 'fast'"):
        direct_array(zarr_node, (12, 16, 16, 16), read_mode="fast")
    with pytest.raises(ValueError, match=r"read_mode must be one of .*got 'fast'"):
        open_scan(zarr_node, read_mode="fast")


def test_file_changed_behind_tiled_falls_back_with_warning(client, volume, caplog):
    import zarr

    node = client[write_plain_array_node(client, "changed", volume, TEMPS, chunks=(4, 8, 8, 8))]
    path = _zarr_path(node)
    before = direct_array(node, (12, 8, 16, 16))  # graph built while the file still matches
    # Behind Tiled's back: the same values, re-chunked (Tiled still serves them correctly).
    tmp = path + ".new"
    zarr.create_array(store=tmp, data=volume, chunks=(12, 16, 16, 16), zarr_format=3)
    shutil.rmtree(path)
    shutil.move(tmp, path)
    np.testing.assert_array_equal(np.asarray(node.read()), volume)

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert direct_array(node, (12, 8, 16, 16)) is None
    assert any("does not match" in r.getMessage() and "chunks" in r.getMessage() for r in caplog.records)
    with pytest.raises(StructureMismatch, match=r"read_mode='direct'.*does not match.*chunks"):
        direct_array(node, (12, 8, 16, 16), read_mode="direct")

    # The graph built before the change: in "auto" mode each task reads its block over HTTP.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        np.testing.assert_array_equal(before.compute(), volume)
    assert any("over HTTP" in r.getMessage() for r in caplog.records)
    # The same graph in "direct" mode fails in the task, naming the node.
    zarr.create_array(store=tmp, data=volume, chunks=(4, 8, 8, 8), zarr_format=3)
    shutil.rmtree(path)
    shutil.move(tmp, path)
    strict = direct_array(node, (12, 8, 16, 16), read_mode="direct")
    zarr.create_array(store=path, data=volume[:, :8], chunks=(4, 8, 8, 8), zarr_format=3, overwrite=True)
    with pytest.raises(StructureMismatch, match=r"/changed.*shape"):
        strict.compute()


def test_zarr_v2_registered_and_unreadable_file(server, client, caplog):
    import zarr
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.data_source import Asset, DataSource, Management

    data = np.arange(6 * 10 * 9, dtype="<i2").reshape(6, 10, 9)
    path = server.hdf5_dir / "v2.zarr"
    zarr.create_array(store=str(path), data=data, chunks=(3, 4, 9), zarr_format=2)
    st = ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(data.dtype), shape=data.shape,
                        chunks=((3, 3), (4, 4, 2), (9,)))
    node = client.new("array", [DataSource(
        structure_family="array", structure=st, mimetype="application/x-zarr", management=Management.external,
        assets=[Asset(data_uri=f"file://localhost{path}", is_directory=True, parameter="data_uri")])], key="v2")
    np.testing.assert_array_equal(direct_array(node, (6, 5, 9), read_mode="direct").compute(), node.read())

    # Not readable from this host (gone here): a warning and HTTP in "auto", an error in "direct".
    path.rename(path.with_suffix(".away"))
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert direct_array(node, (6, 5, 9)) is None
        assert any("cannot read" in r.getMessage() for r in caplog.records)
        with pytest.raises(DirectReadUnavailable, match=r"/v2 is stored in .*v2\.zarr.*cannot read"):
            direct_array(node, (6, 5, 9), read_mode="direct")
    finally:
        path.with_suffix(".away").rename(path)


def test_hdf5_registered_by_tiledwriter(server, client, volume):
    if "raw" not in client:
        client.create_container("raw")
    uid = run_temperature_scan(client["raw"], TEMPS, spatial_shape=SPATIAL, seed=3, external=True,
                               hdf5_dir=server.hdf5_dir)
    stream = client["raw"][uid]["primary"]
    node = getattr(stream, "base", stream)["volume"]
    src = direct_source(node)
    assert src is not None and src.kind == "hdf5" and src.dataset == "/entry/data/data"
    got = direct_array(node, (12, 8, 16, 16), read_mode="direct").compute()
    np.testing.assert_array_equal(got, np.asarray(node.read()))
    np.testing.assert_array_equal(got, volume)
    # The same through open_scan, as process_scan reads a bluesky run.
    from xtec_flows.tiled import open_scan

    scan = open_scan(client, f"raw/{uid}", read_mode="direct")
    assert scan.kind == "bluesky-run" and scan.volume.name.startswith("tiled-direct")
    np.testing.assert_array_equal(scan.volume.compute(), open_scan(client, f"raw/{uid}", read_mode="http").volume.compute())


def test_hdf5_over_several_files_registered_by_the_client(server, client, caplog):
    import h5py
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.data_source import Asset, DataSource, Management

    data = np.random.default_rng(5).random((7, 5, 6)).astype("<f4")
    files = [server.hdf5_dir / "part0.h5", server.hdf5_dir / "part1.h5"]
    for f, rows in zip(files, (data[:3], data[3:])):
        with h5py.File(f, "w") as h:
            h.create_dataset("/entry/data", data=rows, chunks=(1, 5, 6))
    st = ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(data.dtype), shape=data.shape,
                        chunks=((3, 4), (5,), (6,)))
    node = client.new("array", [DataSource(
        structure_family="array", structure=st, mimetype="application/x-hdf5", management=Management.external,
        parameters={"dataset": "/entry/data"},
        assets=[Asset(data_uri=f"file://localhost{f}", is_directory=False, parameter="data_uris", num=i)
                for i, f in enumerate(files)])], key="parts")
    # Blocks across the file boundary (rows 2..4) read the same values as Tiled serves.
    got = direct_array(node, (2, 5, 3), read_mode="direct").compute()
    np.testing.assert_array_equal(got, np.asarray(node.read()))
    np.testing.assert_array_equal(got, data)

    with h5py.File(files[1], "a") as h:  # a row appended behind Tiled's back
        del h["/entry/data"]
        h.create_dataset("/entry/data", data=np.concatenate([data[3:], data[:1]]))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert direct_array(node, (7, 5, 6)) is None
    assert any("8 rows along axis 0" in r.getMessage() for r in caplog.records)
    with pytest.raises(StructureMismatch, match=r"read_mode='direct'.*/parts.*8 rows along axis 0.*7 in Tiled"):
        direct_array(node, (7, 5, 6), read_mode="direct")
