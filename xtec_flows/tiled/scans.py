"""Resolving a temperature scan served by Tiled into a :class:`TiledScan`.

:func:`open_scan` understands three kinds of source:

- a bluesky run written by TiledWriter: ``/<uid>/primary/<volume field>`` with the
  temperature column in ``/<uid>/primary/internal``;
- a plain array node of 3 or 4 dims with a ``temperatures`` metadata entry, or a container
  holding such an array and a 1-D ``temperature(s)`` array;
- a run client the caller already holds (``BlueskyRun`` or a container).

A bluesky run is processable only when its stop document says ``exit_status == "success"``
and it has one event per temperature. The volume is a lazily read (T, *spatial) dask array
whose tasks fetch one region each, never the whole 4-D array in one request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .arrays import lazy_array
from .client import connect, node_path, redact_uri, walk
from .errors import ScanNotReady


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
    dtype = np.dtype(vnode.dtype.to_numpy_dtype() if hasattr(vnode.dtype, "to_numpy_dtype") else vnode.dtype)
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


def _base(node):
    # bluesky-tiled-plugins shows a stream as a composite of table columns and
    # arrays; the real child nodes are under .base.
    return getattr(node, "base", node)


def _temperatures_from_internal(base, field_name: str | None, start: dict) -> tuple[np.ndarray, str]:
    if "internal" not in base:
        raise ValueError(f"run stream {node_path(base)} has no 'internal' table holding the temperature column")
    table = base["internal"].read()
    columns = [c for c in table.columns if c not in ("seq_num", "time") and not c.startswith("ts_")]
    if field_name is None:
        motors = [m for m in start.get("motors", []) if m in table.columns]
        candidates = motors if len(motors) == 1 else [c for c in columns if "temp" in c.lower() and "setpoint" not in c]
        if len(candidates) != 1:
            raise ValueError(
                f"cannot tell which column of {node_path(base)}/internal is the temperature "
                f"(candidates {candidates or columns}); pass temperature_field= / --temperature-field"
            )
        field_name = candidates[0]
    if field_name not in table.columns:
        raise ValueError(
            f"{node_path(base)}/internal has no column {field_name!r} (columns {list(table.columns)}); "
            "pass the right temperature_field= / --temperature-field"
        )
    if "seq_num" in table.columns:
        table = table.sort_values("seq_num")
    return np.asarray(table[field_name], dtype=np.float64), field_name


def _volume_field(base, field_name: str | None) -> str:
    arrays = []
    for key in base:
        if key == "internal":
            continue
        child = base[key]
        if getattr(child, "structure_family", None) == "array" and len(child.shape) >= 3:
            arrays.append(key)
    if field_name is None:
        if len(arrays) != 1:
            raise ValueError(
                f"cannot tell which array of {node_path(base)} is the volume (candidates {arrays}); "
                "pass volume_field= / --volume-field"
            )
        return arrays[0]
    if field_name not in base:
        raise ValueError(f"{node_path(base)} has no field {field_name!r} (arrays {arrays}); check volume_field")
    return field_name


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
              api_key: str | None = None) -> TiledScan:
    """Resolve a temperature scan on a Tiled server.

    Parameters
    ----------
    source : str or tiled client
        A server URI (the key from ``api_key`` or ``TILED_API_KEY``), a client
        for the server root, or the run/array client itself (then ``scan`` is None).
    scan : str, optional
        Bluesky start uid, or node path (``"raw/<uid>"``, ``"imports/sample_a"``).
    volume_field, temperature_field : names inside a bluesky run, detected when unambiguous.

    Returns
    -------
    TiledScan
    """
    if isinstance(source, str):
        client = connect(source, api_key)
    else:
        client = source
    node = walk(client, scan) if scan is not None else client
    uri = redact_uri(node.uri)
    if _is_run(node):
        stop = check_run_complete(node)
        start = node.metadata["start"]
        if "primary" not in node:
            raise ScanNotReady(f"scan {start.get('uid')} has no 'primary' stream (no events were recorded)")
        base = _base(node["primary"])
        vfield = _volume_field(base, volume_field)
        vnode = base[vfield]
        temps, tfield = _temperatures_from_internal(base, temperature_field, start)
        n_events = (stop.get("num_events") or {}).get("primary")
        if n_events is not None and n_events != len(temps):
            raise ScanNotReady(
                f"scan {start.get('uid')} has {n_events} events but {len(temps)} temperatures; it is incomplete"
            )
        if vnode.shape[0] != len(temps):
            raise ScanNotReady(
                f"scan {start.get('uid')}: volume {vfield} has {vnode.shape[0]} slices but {len(temps)} temperatures"
            )
        _check_volume_node(vnode, temps)
        return TiledScan(
            volume=lazy_array(vnode),
            temperatures=temps,
            uid=start.get("uid", node_path(node)),
            path=node_path(vnode),
            uri=uri,
            kind="bluesky-run",
            metadata={"volume_field": vfield, "temperature_field": tfield,
                      "sample": start.get("sample"), "plan_name": start.get("plan_name")},
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
        volume=lazy_array(vnode),
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
