"""Resolving a temperature scan served by Tiled into a :class:`TiledScan`.

:func:`open_scan` understands three kinds of source:

- a bluesky run in any layout Tiled serves (:mod:`.layouts`: TiledWriter's ``primary``, the
  SQL-backed ``streams/primary``, databroker's MongoDB ``primary/data``), volume and temperature
  fields detected when unambiguous;
- a plain array node of 3 or 4 dims with a ``temperatures`` metadata entry, or a container
  holding such an array and a 1-D ``temperature(s)`` array;
- a run object the caller already holds (a ``BlueskyRun`` client, databroker's
  ``catalog[uid]``, a v1 ``Header``, or a container).

A bluesky run is processable only when its stop document says ``exit_status == "success"``
and it has one event per temperature. The volume is a lazily read (T, *spatial) dask array
whose tasks fetch one region each (over HTTP, or from the node's file, :mod:`.direct`), never
the whole 4-D array in one request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .arrays import lazy_array, node_dtype
from .client import connect, node_path, redact_uri, walk
from .errors import ScanNotReady
from .layouts import RunStream, as_run_node, open_stream


@dataclass
class TiledScan:
    """A temperature series served by Tiled.

    volume : dask array of shape (T, *spatial), read region by region
    temperatures : ndarray of shape (T,)
    uid : the bluesky start uid, or the node path for plain arrays
    path : Tiled path of the volume node
    uri : server URI (redacted)
    kind : "bluesky-run" or "array"
    """

    volume: object
    temperatures: np.ndarray
    uid: str
    path: str
    uri: str
    kind: str
    metadata: dict = field(default_factory=dict)

    def source_metadata(self) -> dict:
        return {"uid": self.uid, "path": self.path, "uri": self.uri, "kind": self.kind}


def _is_run(node) -> bool:
    md = getattr(node, "metadata", None) or {}
    return "start" in md and getattr(node, "structure_family", None) == "container"


def _check_volume_node(vnode, temps) -> None:
    """A volume node must be a numeric (T, *spatial) array with one temperature per slice."""
    shape = tuple(vnode.shape)
    dtype = node_dtype(vnode)
    if len(shape) not in (3, 4):
        raise ValueError(
            f"{node_path(vnode)} has shape {shape}: a temperature series must be a 3-D (T, K, H) or "
            "4-D (T, L, K, H) array"
        )
    if dtype.kind not in "iuf":
        raise ValueError(f"{node_path(vnode)} holds {dtype} data; a temperature series must be numeric")
    if temps is not None and len(temps) != shape[0]:
        raise ValueError(
            f"{node_path(vnode)} has {shape[0]} volumes but {len(temps)} temperatures; "
            "give exactly one temperature per volume"
        )


def _temperatures_from_internal(stream: RunStream, field_name: str | None, start: dict) -> tuple[np.ndarray, str]:
    """The temperature column of a run stream (any layout), in event order, and its name.

    Without ``field_name``: the run's only scanned motor, else the only column whose name holds
    "temp" (not a setpoint).
    """
    columns = stream.columns()
    where = f"{stream.run}, stream {stream.name!r} ({stream.path})"
    if field_name is None:
        motors = [m for m in start.get("motors", []) if m in columns]
        candidates = motors if len(motors) == 1 else [c for c in columns if "temp" in c.lower() and "setpoint" not in c]
        if len(candidates) != 1:
            raise ValueError(
                f"cannot tell which scalar field of {where} is the temperature "
                f"(candidates {candidates or columns}); pass temperature_field= / --temperature-field"
            )
        field_name = candidates[0]
    if field_name not in columns:
        raise ValueError(
            f"{where} has no column {field_name!r} (columns {columns}); "
            "pass the right temperature_field= / --temperature-field"
        )
    return np.asarray(stream.column(field_name), dtype=np.float64), field_name


def _volume_field(stream: RunStream, field_name: str | None) -> tuple[str, object, bool]:
    """(field, array node, frame axis) of the run stream's volume.

    Candidates are the fields stored as arrays of 3+ dims (event axis first). An AreaDetector
    field read through databroker carries its frame-per-point axis after the event axis,
    (T, 1, *spatial); ``frame axis`` is True when that size-1 axis must be dropped.
    """
    arrays = stream.array_fields(min_ndim=3)
    where = f"{stream.run}, stream {stream.name!r} ({stream.path})"
    if field_name is None:
        if len(arrays) != 1:
            raise ValueError(
                f"cannot tell which array of {where} is the volume (candidates {arrays}); "
                "pass volume_field= / --volume-field"
            )
        field_name = arrays[0]
    if field_name not in stream.arrays:
        raise ValueError(f"{where} has no field {field_name!r} (arrays {arrays}); check volume_field")
    vnode = stream.arrays[field_name]
    shape = tuple(vnode.shape)
    frame_axis = len(shape) == 5 and shape[1] == 1
    return field_name, vnode, frame_axis


def check_run_complete(run) -> dict:
    """The stop document of a run that can be processed; raises ScanNotReady otherwise."""
    md = run.metadata or {}
    start = md.get("start", {})
    stop = md.get("stop")
    uid = start.get("uid", node_path(run))
    if not stop:
        raise ScanNotReady(f"scan {uid} has no stop document yet (still running?); process it once it has finished")
    status = stop.get("exit_status")
    if status != "success":
        raise ScanNotReady(
            f"scan {uid} ended with exit_status {status!r} ({stop.get('reason', '') or 'no reason given'}); "
            "only successful scans are processed"
        )
    return stop


def open_scan(source, scan=None, *, volume_field: str | None = None, temperature_field: str | None = None,
              api_key: str | None = None, read_mode: str = "auto", partial: bool = False) -> TiledScan:
    """Resolve a temperature scan on a Tiled server.

    Parameters
    ----------
    source : str or tiled client
        A server URI (the key from ``api_key`` or ``TILED_API_KEY``), a client
        for the server root, or the run/array client itself (then ``scan`` is None).
    scan : str, optional
        Bluesky start uid, or node path (``"raw/<uid>"``, ``"imports/sample_a"``).
    volume_field, temperature_field : names inside a bluesky run, detected when unambiguous.
    read_mode : "auto" | "http" | "direct", how the volume is read (see :mod:`xtec_flows.tiled.direct`)
    partial : accept a bluesky run that is still running and return the temperatures it has
        recorded so far (the first n events whose volume and temperature are both written);
        a run that ended without success is refused all the same (provisional results)

    Returns
    -------
    TiledScan
    """
    if isinstance(source, str):
        client = connect(source, api_key)
    else:
        client = as_run_node(source)  # a databroker v1 Header becomes its Tiled node
    node = walk(client, scan) if scan is not None else client
    uri = redact_uri(node.uri)
    if _is_run(node):
        running = partial and not (node.metadata or {}).get("stop")
        stop = {} if running else check_run_complete(node)
        start = node.metadata["start"]
        try:
            stream = open_stream(node, "primary")
        except KeyError as exc:  # the message names the run and the streams it has
            raise ScanNotReady(exc.args[0]) from None
        vfield, vnode, frame_axis = _volume_field(stream, volume_field)
        temps, tfield = _temperatures_from_internal(stream, temperature_field, start)
        if running:
            # Events land in the table and the array one after the other: take what both hold.
            n_recorded = min(len(temps), vnode.shape[0])
            temps = temps[:n_recorded]
        n_events = (stop.get("num_events") or {}).get("primary")
        if n_events is not None and n_events != len(temps):
            raise ScanNotReady(
                f"scan {start.get('uid')} has {n_events} events but {len(temps)} temperatures; it is incomplete"
            )
        if vnode.shape[0] != len(temps) and not running:
            raise ScanNotReady(
                f"scan {start.get('uid')}: volume {vfield} has {vnode.shape[0]} slices but {len(temps)} temperatures"
            )
        if frame_axis:
            # (T, 1, L, K, H) -> (T, L, K, H): the lazy slice drops the axis before any read
            volume = lazy_array(vnode, read_mode=read_mode)[:len(temps), 0]
            if volume.dtype.kind not in "iuf":
                raise ValueError(f"{node_path(vnode)} holds {volume.dtype} data; a temperature series must be numeric")
        else:
            if not running:
                _check_volume_node(vnode, temps)
            volume = lazy_array(vnode, read_mode=read_mode)[:len(temps)]
        return TiledScan(
            volume=volume,
            temperatures=temps,
            uid=start.get("uid", node_path(node)),
            path=node_path(vnode),
            uri=uri,
            kind="bluesky-run",
            metadata={"volume_field": vfield, "temperature_field": tfield, "layout": stream.layout.value,
                      "stream": stream.path, "frame_axis_dropped": frame_axis,
                      "sample": start.get("sample"), "plan_name": start.get("plan_name"),
                      "running": running},
        )
    if getattr(node, "structure_family", None) == "container":
        arrays = [k for k in node if getattr(node[k], "structure_family", None) == "array"]
        vols = [k for k in arrays if len(node[k].shape) >= 3]
        if len(vols) != 1:
            raise ValueError(
                f"{node_path(node)} is a container but not a bluesky run, and holds {len(vols)} arrays of 3+ dims "
                f"({vols}); give the path of the array node"
            )
        vnode = node[vols[0]]
        temps = _array_temperatures(vnode, node)
    elif getattr(node, "structure_family", None) == "array":
        vnode = node
        temps = _array_temperatures(vnode, vnode.parent if hasattr(vnode, "parent") else None)
    else:
        raise ValueError(f"{node_path(node)} is neither a bluesky run, a container nor an array node")
    _check_volume_node(vnode, temps)
    if temps is None:
        raise ValueError(
            f"array {node_path(vnode)} has no temperatures: put them in its metadata as 'temperatures' or "
            "add a 1-D 'temperature' array beside it (xtec-flows import does this)"
        )
    return TiledScan(
        volume=lazy_array(vnode, read_mode=read_mode),
        temperatures=np.asarray(temps, dtype=np.float64),
        uid=(vnode.metadata or {}).get("uid") or node_path(vnode),
        path=node_path(vnode),
        uri=uri,
        kind="array",
        metadata={"dims": list(vnode.dims or [])},
    )


def _array_temperatures(vnode, container):
    md = vnode.metadata or {}
    for name in ("temperatures", "temperature"):
        if name in md:
            return np.asarray(md[name], dtype=np.float64)
    if container is not None and getattr(container, "structure_family", None) == "container":
        for name in ("temperatures", "temperature", "T"):
            if name in container and container[name].structure_family == "array" and len(container[name].shape) == 1:
                return np.asarray(container[name].read(), dtype=np.float64)
        cmd = container.metadata or {}
        for name in ("temperatures", "temperature"):
            if name in cmd:
                return np.asarray(cmd[name], dtype=np.float64)
    return None
