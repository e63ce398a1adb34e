"""A simulated beamline: bluesky temperature scans of a synthetic crystal, written to Tiled.

The detectors are real bluesky devices (ophyd ``SynSignal`` for inline volumes, a
bluesky-protocol device streaming into HDF5 for externally registered data) and the documents
go through a real ``RunEngine`` into ``bluesky_tiled_plugins.TiledWriter``, exactly as at a
beamline. Used by ``make demo`` and by the tests.

Layout written under the client passed in::

    /<uid>/primary/<volume_field>     (T, *spatial_shape) float32 (zarr, or external HDF5)
    /<uid>/primary/internal           columns seq_num, time, <temperature_field>, ...

Needs the ``demo`` extra (bluesky, ophyd, bluesky-tiled-plugins).
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import numpy as np


class ScanFailure(RuntimeError):
    """Raised by the simulated detectors at point ``fail_at``."""


def scan_volumes(temperatures, spatial_shape=(16, 16, 16), seed: int = 0, model=None) -> np.ndarray:
    """The exact (T, *spatial) float32 volume :func:`run_temperature_scan` acquires."""
    from xtec_flows.synthetic import SeriesModel, intensity_block

    temps = np.asarray(temperatures, dtype=np.float64)
    model = SeriesModel() if model is None else model
    vol = intensity_block(model, temps, region=None, spatial_shape=tuple(spatial_shape),
                          rng=np.random.default_rng(seed))
    return np.ascontiguousarray(vol, dtype=np.float32)


def _make_inline_detector(name: str, volumes: np.ndarray, motor, temperatures, fail_at):
    from ophyd.sim import NullStatus, SynSignal

    class VolumeDetector(SynSignal):
        """Returns volumes[i] at the i-th trigger, checking the motor sits at temperatures[i]."""

        def __init__(self) -> None:
            self._i = 0
            super().__init__(name=name, func=lambda: volumes[min(self._i, len(volumes) - 1)])

        def trigger(self):
            i = self._i
            if fail_at is not None and i == fail_at:
                raise ScanFailure(f"simulated detector failure at point {i}")
            if i >= len(volumes):
                raise ScanFailure(f"more triggers ({i + 1}) than temperatures ({len(volumes)})")
            pos = motor.position
            if not np.isclose(pos, temperatures[i]):
                raise ScanFailure(f"motor at {pos}, expected temperatures[{i}]={temperatures[i]}")
            super().trigger()  # puts self._func() = volumes[i]
            self._i += 1
            return NullStatus()

        def describe(self):
            d = super().describe()
            d[self.name]["dtype_numpy"] = "<f4"  # else TiledWriter stores float64
            d[self.name]["shape"] = list(volumes.shape[1:])
            d[self.name]["dtype"] = "array"
            return d

    return VolumeDetector()


class _HDF5VolumeDetector:
    """A bluesky-protocol detector writing one volume per trigger into an HDF5 file.

    ``describe()`` advertises the data key as ``external: "STREAM:"``; ``collect_asset_docs``
    yields one ``stream_resource`` (application/x-hdf5, dataset ``/entry/data/data``) then one
    ``stream_datum`` per trigger, so TiledWriter registers the file as an external array.
    """

    dataset = "/entry/data/data"

    def __init__(self, name, volumes, motor, temperatures, hdf5_dir, fail_at):
        self.name = name
        self.parent = None
        self._volumes = volumes
        self._motor = motor
        self._temperatures = temperatures
        self._fail_at = fail_at
        self.path = Path(hdf5_dir).resolve() / f"{name}_{uuid.uuid4().hex[:12]}.h5"
        self._file = None
        self._ds = None
        self._i = 0
        self._sres_uid: str | None = None
        self._asset_docs: list[tuple[str, dict]] = []

    # bluesky protocols ------------------------------------------------------------------
    def describe(self):
        return {
            self.name: {
                "source": f"file://localhost{self.path}",
                "dtype": "array",
                "dtype_numpy": "<f4",
                "shape": list(self._volumes.shape[1:]),
                "external": "STREAM:",
            }
        }

    def read(self):
        return {}

    def describe_configuration(self):
        return {}

    def read_configuration(self):
        return {}

    def stage(self):
        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        shape = self._volumes.shape[1:]
        self._file = h5py.File(self.path, "w", libver="latest")
        self._ds = self._file.create_dataset(
            self.dataset, shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape),
            dtype="<f4",
        )
        self._file.swmr_mode = True
        self._i = 0
        self._sres_uid = None
        self._asset_docs = []
        return [self]

    def unstage(self):
        if self._file is not None:
            self._file.close()
        self._file = self._ds = None
        return [self]

    def trigger(self):
        from ophyd.sim import NullStatus

        i = self._i
        if self._fail_at is not None and i == self._fail_at:
            raise ScanFailure(f"simulated detector failure at point {i}")
        if i >= len(self._volumes):
            raise ScanFailure(f"more triggers ({i + 1}) than temperatures")
        pos = self._motor.position
        if not np.isclose(pos, self._temperatures[i]):
            raise ScanFailure(f"motor at {pos}, expected temperatures[{i}]={self._temperatures[i]}")
        self._ds.resize(i + 1, axis=0)
        self._ds[i] = self._volumes[i]
        self._ds.flush()
        if self._sres_uid is None:
            self._sres_uid = str(uuid.uuid4())
            self._asset_docs.append(("stream_resource", {
                "uid": self._sres_uid,
                "data_key": self.name,
                "mimetype": "application/x-hdf5",
                "uri": f"file://localhost{self.path}",
                "parameters": {"dataset": self.dataset, "chunk_shape": [1, *self._volumes.shape[1:]],
                               "swmr": True},
            }))
        self._asset_docs.append(("stream_datum", {
            "uid": f"{self._sres_uid}/{i}",
            "stream_resource": self._sres_uid,
            "descriptor": "",  # filled in by the RunEngine
            "indices": {"start": i, "stop": i + 1},
            "seq_nums": {"start": 0, "stop": 0},  # filled in by the RunEngine
        }))
        self._i += 1
        return NullStatus()

    def collect_asset_docs(self, index=None):
        docs, self._asset_docs = self._asset_docs, []
        yield from docs


_RE_LOCK = threading.Lock()
_RE = None


def _run_engine():
    """One RunEngine per process (each RunEngine starts an event-loop thread that never ends)."""
    global _RE
    if _RE is None:
        from bluesky import RunEngine
        from bluesky.utils import DuringTask

        # No SIGINT context manager (pytest owns signals); plain blocking wait, no Qt.
        _RE = RunEngine({}, context_managers=[], during_task=DuringTask())
    return _RE


def run_temperature_scan(
    client,
    temperatures,
    *,
    spatial_shape=(16, 16, 16),
    volume_field: str = "volume",
    temperature_field: str = "temperature",
    external: bool = False,
    hdf5_dir=None,
    seed: int = 0,
    fail_at: int | None = None,
    md: dict | None = None,
    batch_size: int | None = None,
    after_point=None,
) -> str:
    """Run ``list_scan([detector], temperature_motor, temperatures)`` with TiledWriter(client).

    The detector yields ``scan_volumes(temperatures, spatial_shape, seed)[i]`` at point i
    (float32, from :func:`xtec_flows.synthetic.intensity_block` computed once). Result in Tiled::

        /<uid>/primary/<volume_field>     (T, *spatial_shape) float32 (zarr, or external HDF5)
        /<uid>/primary/internal           columns seq_num, time, <temperature_field>, ...

    ``external=True`` writes the volumes to an HDF5 file in ``hdf5_dir`` (must be in the
    server's readable storage) and emits stream_resource/stream_datum documents.
    ``fail_at=i`` makes the detector raise at point i: the run stops with exit_status "fail"
    and i events; the exception is swallowed (``fail_at=0``: no event, so no descriptor and
    no ``primary`` node at all; ``num_events == {}``). ``md`` goes into the start document.
    ``batch_size`` is passed to TiledWriter (default: write everything at the stop document;
    1 writes each event as it is measured, as a live beamline does). ``after_point(i)`` is
    called after point i's event has been emitted (and, with ``batch_size=1``, written): a
    pause between temperatures, as a sample's thermal equilibration makes.
    Returns the run uid (the key of the run under ``client``).
    """
    import bluesky.plans as bp
    from bluesky_tiled_plugins import TiledWriter
    from ophyd.sim import SynAxis

    temps = np.asarray(temperatures, dtype=np.float64)
    if temps.ndim != 1 or temps.size < 1:
        raise ValueError(f"temperatures must be a non-empty 1-D sequence; got shape {temps.shape}")
    if external and hdf5_dir is None:
        raise ValueError("external=True needs hdf5_dir (a directory in the server's readable storage)")
    if volume_field == temperature_field:
        raise ValueError("volume_field and temperature_field must differ")
    volumes = scan_volumes(temps, spatial_shape, seed)

    motor = SynAxis(name=temperature_field)
    if external:
        det = _HDF5VolumeDetector(volume_field, volumes, motor, temps, hdf5_dir, fail_at)
    else:
        det = _make_inline_detector(volume_field, volumes, motor, temps, fail_at)

    kw = {} if batch_size is None else {"batch_size": batch_size}
    writer = TiledWriter(client, **kw)
    uids: list[str] = []

    def remember_start(name, doc):
        uids.append(doc["uid"])

    per_step = None
    if after_point is not None:
        import itertools

        import bluesky.plan_stubs as bps

        points = itertools.count()

        def per_step(detectors, step, pos_cache):
            yield from bps.one_nd_step(detectors, step, pos_cache)
            after_point(next(points))

    with _RE_LOCK:
        RE = _run_engine()
        tokens = [RE.subscribe(writer), RE.subscribe(remember_start, "start")]
        try:
            RE(bp.list_scan([det], motor, list(temps), per_step=per_step, md=dict(md or {})))
        except ScanFailure:
            if fail_at is None:
                raise
        except Exception as exc:
            # The RunEngine re-raises the plan's exception (possibly wrapped) after the stop doc.
            if fail_at is None or not _caused_by(exc, ScanFailure):
                raise
        finally:
            for t in tokens:
                RE.unsubscribe(t)
    if not uids:
        raise RuntimeError("the RunEngine emitted no start document")
    if fail_at is None and len(uids) != 1:
        raise RuntimeError(f"expected one run, got {uids}")
    return uids[0]


def _caused_by(exc: BaseException | None, kind) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False
