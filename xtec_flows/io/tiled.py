"""Tiled backend: read temperature scans from a Tiled server, write XTEC results back.

Reading
    :func:`open_scan` resolves a scan into a :class:`TiledScan`: a lazily read
    (T, *spatial) dask array whose tasks fetch one region each (never the whole
    4-D array in one request), plus temperatures and provenance. Three kinds of
    source are understood:

    - a bluesky run written by TiledWriter: ``/<uid>/primary/<volume field>``
      with the temperature column in ``/<uid>/primary/internal``;
    - a plain array node of 3 or 4 dims with a ``temperatures`` metadata entry,
      or a container holding such an array and a 1-D ``temperature(s)`` array;
    - a run client the caller already holds (``BlueskyRun`` or a container).

    A bluesky run is processable only when its stop document says
    ``exit_status == "success"`` and it has one event per temperature.

Writing
    One container per (source scan, parameter set) under a derived-data root
    (default ``xtec``), keyed by a hash of (source uid, parameters, engine major
    version). Its ``status`` metadata goes ``running`` -> ``complete`` (set last,
    after every array is written) or ``failed``. See :func:`result_key`,
    :func:`begin_result`, :func:`write_result`, :func:`fail_result`. The container's
    nodes are declared once (:data:`LABELS`, :data:`RESULT_ARRAYS`, and for
    ``classes="auto"`` :data:`CLASS_LABELS`, :data:`CLASS_NODES`).

API keys come from the caller or ``TILED_API_KEY`` and are never logged or
stored: every URI recorded in metadata is stripped of its query string.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .._version import __version__
from ..chunking import block_regions, regular_chunks

log = logging.getLogger(__name__)

RESULT_SPEC = "xtec-clusters"
RESULT_SPEC_VERSION = "1"
DEFAULT_ROOT = "xtec"
# Requests to Tiled stay well under its 300 MB response limit and the client's
# 100 MB upload split.
MAX_REQUEST_BYTES = 64 << 20
TEMPERATURE_NAMES = ("temperature", "temperatures", "T", "temp", "sample_temperature")


class ScanNotReady(ValueError):
    """The scan exists but cannot be processed (yet): running, failed, or incomplete."""


# ---------------------------------------------------------------------------------------
# connection
# ---------------------------------------------------------------------------------------


def redact_uri(uri: str) -> str:
    """The URI without query string or credentials (safe to log and to store)."""
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_secrets(text: str) -> str:
    """``text`` with any ``api_key=...`` value masked (error messages may quote URIs)."""
    import re

    return re.sub(r"(api_key=)[^&\s'\"]+", r"\1***", text)


def connect(uri: str, api_key: str | None = None, compress_transfers: bool = False):
    """A Tiled client for ``uri``; the key comes from ``api_key`` or ``TILED_API_KEY``.

    By default responses are requested uncompressed: processing runs next to the
    server (same host or facility network), where the server's per-request
    re-compression of stored chunks costs more than it saves (a 24x128^3
    read was 1.9x faster uncompressed on loopback; benchmarks/RESULTS.md, section tiled). Over a slow link,
    pass ``compress_transfers=True``.
    """
    from tiled.client import from_uri

    key = api_key or os.environ.get("TILED_API_KEY") or None
    log.info("connecting to %s", redact_uri(uri))
    headers = None if compress_transfers else {"accept-encoding": "identity"}
    return from_uri(uri, api_key=key, headers=headers)


def _walk(client, path: str):
    node = client
    for part in [p for p in str(path).split("/") if p]:
        try:
            node = node[part]
        except KeyError:
            raise KeyError(
                f"Tiled has no node {path!r} under {redact_uri(client.uri)} (missing part {part!r}); "
                "check the scan uid or node path"
            ) from None
    return node


def _node_path(node) -> str:
    return "/" + "/".join(p for p in node.path_parts if p)


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


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


# Keys this package writes must be readable back: Tiled 0.2 accepts but cannot
# serve keys with '/', '?', '#', '%', and '.'/'..' (see notes).
_SAFE_KEY = __import__("re").compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")


def check_key(key: str, what: str = "key") -> str:
    if not isinstance(key, str) or not _SAFE_KEY.match(key) or key in (".", ".."):
        raise ValueError(
            f"{what} {key!r} is not a node name Tiled can serve back; use letters, digits, '_', '-' and '.' "
            "(not first), at most 200 characters"
        )
    return key


def _check_volume_node(vnode, temps) -> None:
    """A volume node must be a numeric (T, *spatial) array with one temperature per slice."""
    shape = tuple(vnode.shape)
    dtype = np.dtype(vnode.dtype.to_numpy_dtype() if hasattr(vnode.dtype, "to_numpy_dtype") else vnode.dtype)
    if len(shape) not in (3, 4):
        raise ValueError(
            f"{_node_path(vnode)} has shape {shape}: a temperature series must be a 3-D (T, K, H) or "
            "4-D (T, L, K, H) array"
        )
    if dtype.kind not in "iuf":
        raise ValueError(f"{_node_path(vnode)} holds {dtype} data; a temperature series must be numeric")
    if temps is not None and len(temps) != shape[0]:
        raise ValueError(
            f"{_node_path(vnode)} has {shape[0]} volumes but {len(temps)} temperatures; "
            "give exactly one temperature per volume"
        )


def _base(node):
    # bluesky-tiled-plugins shows a stream as a composite of table columns and
    # arrays; the real child nodes are under .base.
    return getattr(node, "base", node)


def _region_reader(node, region):
    return np.asarray(node.read(slice=region))


def lazy_array(node, spatial_chunk: int | None = None):
    """A dask array over a Tiled array node, one request per task.

    Blocks span the whole first (temperature) axis and are sized so that each
    request stays under ``MAX_REQUEST_BYTES``; they are aligned to Tiled's own
    chunks when those are small enough.
    """
    import dask
    import dask.array as da

    shape = tuple(int(s) for s in node.shape)
    dtype = np.dtype(node.dtype.to_numpy_dtype() if hasattr(node.dtype, "to_numpy_dtype") else node.dtype)
    ndim = len(shape)
    if spatial_chunk is None:
        per_voxel = shape[0] * dtype.itemsize
        side = int((MAX_REQUEST_BYTES / per_voxel) ** (1.0 / (ndim - 1)))
        spatial_chunk = max(8, min(128, side))
    tiled_chunks = [max(c) for c in node.chunks[1:]] if node.chunks else [None] * (ndim - 1)
    sizes = []
    for s, tc in zip(shape[1:], tiled_chunks):
        c = min(spatial_chunk, s)
        if tc and tc < s and tc <= spatial_chunk:
            c = tc * max(1, spatial_chunk // tc)  # a whole number of Tiled chunks
        sizes.append(c)
    chunks = regular_chunks(shape, (shape[0], *sizes))
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for idx, _, region in block_regions(chunks):
        bshape = tuple(r.stop - r.start for r in region)
        blocks[idx] = da.from_delayed(dask.delayed(_region_reader)(node, region), bshape, dtype=dtype)
    return da.block(blocks.tolist())


def lazy_array_spatial(node):
    """A dask array over any Tiled array node, one read_block request per Tiled chunk."""
    import dask
    import dask.array as da

    dtype = np.dtype(node.dtype.to_numpy_dtype() if hasattr(node.dtype, "to_numpy_dtype") else node.dtype)
    chunks = tuple(tuple(int(c) for c in ch) for ch in node.chunks)
    blocks = np.empty(tuple(len(c) for c in chunks), dtype=object)
    for idx in np.ndindex(*blocks.shape):
        bshape = tuple(chunks[a][i] for a, i in enumerate(idx))
        blocks[idx] = da.from_delayed(dask.delayed(node.read_block)(idx), bshape, dtype=dtype)
    return da.block(blocks.tolist())


def _temperatures_from_internal(base, field_name: str | None, start: dict) -> tuple[np.ndarray, str]:
    if "internal" not in base:
        raise ValueError(f"run stream {_node_path(base)} has no 'internal' table holding the temperature column")
    table = base["internal"].read()
    columns = [c for c in table.columns if c not in ("seq_num", "time") and not c.startswith("ts_")]
    if field_name is None:
        motors = [m for m in start.get("motors", []) if m in table.columns]
        candidates = motors if len(motors) == 1 else [c for c in columns if "temp" in c.lower() and "setpoint" not in c]
        if len(candidates) != 1:
            raise ValueError(
                f"cannot tell which column of {_node_path(base)}/internal is the temperature "
                f"(candidates {candidates or columns}); pass temperature_field= / --temperature-field"
            )
        field_name = candidates[0]
    if field_name not in table.columns:
        raise ValueError(
            f"{_node_path(base)}/internal has no column {field_name!r} (columns {list(table.columns)}); "
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
                f"cannot tell which array of {_node_path(base)} is the volume (candidates {arrays}); "
                "pass volume_field= / --volume-field"
            )
        return arrays[0]
    if field_name not in base:
        raise ValueError(f"{_node_path(base)} has no field {field_name!r} (arrays {arrays}); check volume_field")
    return field_name


def check_run_complete(run) -> dict:
    """The stop document of a run that can be processed; raises ScanNotReady otherwise."""
    md = run.metadata or {}
    start = md.get("start", {})
    stop = md.get("stop")
    uid = start.get("uid", _node_path(run))
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
    node = _walk(client, scan) if scan is not None else client
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
            uid=start.get("uid", _node_path(node)),
            path=_node_path(vnode),
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
                f"{_node_path(node)} is a container but not a bluesky run, and holds {len(vols)} arrays of 3+ dims "
                f"({vols}); give the path of the array node"
            )
        vnode = node[vols[0]]
        temps = _array_temperatures(vnode, node)
    elif getattr(node, "structure_family", None) == "array":
        vnode = node
        temps = _array_temperatures(vnode, vnode.parent if hasattr(vnode, "parent") else None)
    else:
        raise ValueError(f"{_node_path(node)} is neither a bluesky run, a container nor an array node")
    _check_volume_node(vnode, temps)
    if temps is None:
        raise ValueError(
            f"array {_node_path(vnode)} has no temperatures: put them in its metadata as 'temperatures' or "
            "add a 1-D 'temperature' array beside it (xtec-flows import does this)"
        )
    return TiledScan(
        volume=lazy_array(vnode),
        temperatures=np.asarray(temps, dtype=np.float64),
        uid=(vnode.metadata or {}).get("uid") or _node_path(vnode),
        path=_node_path(vnode),
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


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


def engine_major() -> int:
    return int(__version__.split(".")[0])


def result_key(source_uid: str, params: dict) -> str:
    """Stable node key for (source scan, parameters, engine major version)."""
    doc = json.dumps({"source": source_uid, "params": params, "engine": engine_major()}, sort_keys=True, default=str)
    return "xtec-" + hashlib.sha256(doc.encode()).hexdigest()[:20]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _versions() -> dict:
    import dask
    import numpy
    import scipy
    import zarr

    out = {"xtec_flows": __version__, "numpy": numpy.__version__, "scipy": scipy.__version__,
           "dask": dask.__version__, "zarr": zarr.__version__}
    try:
        import tiled

        out["tiled"] = tiled.__version__
    except ImportError:  # pragma: no cover - tiled is required to get here
        pass
    return out


# What the plugin's key must be allowed: read runs, create and fill result containers.
WRITE_SCOPES = ("read:metadata", "read:data", "create:node", "write:metadata", "write:data")


class AccessDenied(PermissionError):
    """The Tiled key may not do what xtec-flows needs; the message says what and how to fix it."""


def _denied_status(error: BaseException) -> int | None:
    """401/403 when ``error`` (or its cause) is Tiled refusing the key, else None."""
    import httpx

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, httpx.HTTPStatusError) and error.response.status_code in (401, 403):
            return error.response.status_code
        error = error.__cause__ or error.__context__
    return None


def _access_denied(what: str, error: BaseException) -> AccessDenied:
    status = _denied_status(error)
    detail = redact_secrets(str(error).splitlines()[0] if str(error) else type(error).__name__)[:300]
    if status == 401:
        remedy = "the server does not accept the key: give a valid one in TILED_API_KEY or --api-key-file"
    else:
        remedy = ("the key lacks the scope or the access-policy grant: use the xtec-flows service key "
                  f"(scopes {', '.join(WRITE_SCOPES)}; deploy/tiled/bootstrap_access.py) and the 'derived' "
                  "tag's grant in access_tags.yml")
    return AccessDenied(f"Tiled refused to let this key {what} ({status}: {detail}); {remedy}")


def key_scopes(client) -> set[str] | None:
    """Scopes of the API key ``client`` uses, or None when the server cannot say (single-user
    servers and unauthenticated access have no per-key scopes)."""
    context = client.context
    key = getattr(context, "api_key", None)
    if not key or not context.server_info.authentication.links:
        return None
    try:
        me = context.whoami() or {}
    except Exception as exc:
        if _denied_status(exc):
            raise _access_denied("identify itself", exc) from None
        raise
    for record in me.get("api_keys", []):
        if record.get("first_eight") == key[:8]:
            return set(record.get("scopes") or [])
    return None


def check_key_scopes(client, root: str = DEFAULT_ROOT) -> None:
    """Raise AccessDenied when the key's scopes do not allow writing results (one request).

    A no-op where the server has no per-key scopes (single-user or anonymous servers).
    """
    scopes = key_scopes(client)
    if scopes is None:
        return
    missing = [s for s in WRITE_SCOPES if s not in scopes]
    if missing:
        raise AccessDenied(
            f"the Tiled API key lacks the scope(s) {', '.join(missing)} that xtec-flows needs to write "
            f"results under /{root.strip('/')} (it has: {', '.join(sorted(scopes)) or 'none'}); create the "
            "plugin's key with deploy/tiled/bootstrap_access.py or `tiled admin create-api-key` with "
            f"scopes {', '.join(WRITE_SCOPES)}")


def check_write_access(client, root: str = DEFAULT_ROOT):
    """Fail early, before any work, when this key cannot write results under ``root``.

    Checks the key's scopes, then creates and deletes an empty container under ``root``: only
    that proves the server's access policy lets this principal write there. Returns the
    derived root node.

    Raises
    ------
    AccessDenied : with what is missing and how to fix it; nothing has been written.
    """
    import secrets

    check_key_scopes(client, root)
    node = derived_root(client, root)
    key = f"access-probe-{secrets.token_hex(6)}"
    try:
        probe_node = node.create_container(key, metadata={"xtec_flows_probe": True})
    except Exception as exc:
        if _denied_status(exc):
            raise _access_denied(f"create results under /{root.strip('/')}", exc) from None
        raise
    try:
        probe_node.delete(recursive=True, external_only=False)
    except Exception as exc:
        log.warning("could not delete the access probe %s/%s: %s", root, key, type(exc).__name__)
    return node


def derived_root(client, root: str = DEFAULT_ROOT):
    """The container that holds results, created on first use.

    Raises AccessDenied when it is missing and this key may not create it (under an access
    policy the admin creates it: deploy/tiled/bootstrap_access.py containers).
    """
    node = client
    for part in [p for p in root.split("/") if p]:
        check_key(part, "derived-data root part")
        if part in node:
            node = node[part]
        else:
            try:
                node = node.create_container(part, metadata={"description": "XTEC clustering results (xtec-flows)"})
            except Exception as exc:
                if _denied_status(exc):
                    raise _access_denied(f"create the results container /{root.strip('/')} (have the Tiled "
                                         "admin create it: deploy/tiled/bootstrap_access.py containers)",
                                         exc) from None
                node = node[part]  # created concurrently by another worker: use theirs
    return node


def find_result(root_node, key: str):
    """The result node with this key, or None."""
    return root_node[key] if key in root_node else None


def begin_result(root_node, key: str, scan: TiledScan, params: dict):
    """Create the result container with status 'running' (replacing an incomplete one).

    Returns (node, existing): ``existing`` is True when a complete result with
    this key already exists (then nothing is created and the caller should not
    recompute).
    """
    from tiled.structures.core import Spec

    old = find_result(root_node, key)
    if old is not None:
        status = (old.metadata or {}).get("status")
        if status == "complete":
            return old, True
        log.info("replacing %s result %s", status, key)
        old.delete(recursive=True, external_only=False)
    md = {
        "status": "running",
        "created": _now(),
        "source": scan.source_metadata(),
        "parameters": params,
        "engine_major": engine_major(),
        "versions": _versions(),
    }
    try:
        node = root_node.create_container(key, metadata=md, specs=[Spec(RESULT_SPEC, version=RESULT_SPEC_VERSION)])
    except Exception as exc:
        if _denied_status(exc):
            raise _access_denied(f"create the result {_node_path(root_node)}/{key}", exc) from None
        if "409" not in str(exc):
            raise
        # Another worker created it between our check and our create.
        other = root_node[key]
        if (other.metadata or {}).get("status") == "complete":
            return other, True
        raise ResultBusy(
            f"result {_node_path(other)} is being computed by another worker (status "
            f"{(other.metadata or {}).get('status')!r}); try again when it has finished"
        ) from exc
    return node, False


def reject_scan(root_node, key: str, source: dict, params: dict, error: BaseException):
    """Record that a scan cannot be clustered with these parameters (bad fields, wrong shape...).

    Creates (or replaces an unfinished) result node with status 'failed' and ``retryable``
    False, so watchers and schedules do not submit it again and the reason is readable where
    the result would have been. A complete result is never touched. Returns the node, or None
    if a complete result exists.
    """
    from tiled.structures.core import Spec

    old = find_result(root_node, key)
    if old is not None:
        if (old.metadata or {}).get("status") == "complete":
            return None
        old.delete(recursive=True, external_only=False)
    md = {
        "status": "failed",
        "created": _now(),
        "failed": _now(),
        "retryable": False,
        "error": redact_secrets(f"{type(error).__name__}: {error}")[:2000],
        "source": dict(source),
        "parameters": params,
        "engine_major": engine_major(),
        "versions": _versions(),
    }
    return root_node.create_container(key, metadata=md, specs=[Spec(RESULT_SPEC, version=RESULT_SPEC_VERSION)])


# ---------------------------------------------------------------------------------------
# the result container's layout: declared here once, written by write_result, read by
# xtec_flows.results.load_result
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeSpec:
    """One child node of a result container.

    key : node name; dims : axis names (empty for a label volume, whose spatial dims are the
    scan's, given at write time); description and content go into the node's metadata;
    dtype : stored dtype (None keeps the engine's).
    """

    key: str
    dims: tuple = ()
    description: str | None = None
    dtype: str | None = None
    content: str | None = None

    def metadata(self, **extra) -> dict | None:
        md = {k: v for k, v in (("description", self.description), ("content", self.content)) if v is not None}
        md.update(extra)
        return md or None

    def cast(self, values) -> np.ndarray:
        return np.asarray(values) if self.dtype is None else np.asarray(values, dtype=self.dtype)


#: Every result: the label volume ...
LABELS = NodeSpec("labels", description="cluster label per voxel; -1 = not clustered")
#: ... and these arrays, each the ClusterResult attribute of the same name.
RESULT_ARRAYS = (
    NodeSpec("means", ("cluster", "temperature"), "cluster mean trajectories (rescaled units)"),
    NodeSpec("variances", ("cluster", "temperature"), "cluster variances of the rescaled trajectories"),
    NodeSpec("temperatures", ("temperature",), dtype="float64"),
    NodeSpec("counts", ("cluster",), dtype="int64"),
    NodeSpec("weights", ("cluster",), dtype="float64"),
    NodeSpec("histogram_edges", ("edge",), "bin edges of log(<I>_T)", dtype="float64"),
    NodeSpec("histogram_counts", ("bin",), dtype="int64"),
)

#: The result's content in classes="auto" mode (metadata "content"; the label volumes' too).
CLASSES_CONTENT = "classes"
#: classes="auto": ``labels`` holds class labels; the mixture's component labels, the class
#: table and the per-class curves are added. A fixed-K result has none of these.
CLASS_LABELS = NodeSpec("labels", description="class label per voxel (classes='auto'); -1 = not clustered; "
                        "the classes table says which mixture components each class merges",
                        content=CLASSES_CONTENT)
COMPONENTS = NodeSpec("components", description="mixture component label per voxel; -1 = not clustered; the "
                      "rows of means/variances/counts/weights", content="components")
CLASS_TABLE = NodeSpec("classes", description="one row per class (row i = class label i): kind, Tc, exponent "
                       "or width, fit quality, stability; components is a comma-separated list")
#: (C, T) arrays, row i = class i, each from the per-class list of the same ``result.classes`` key.
CLASS_CURVES = {
    "mean_raw": NodeSpec("class_means_raw", ("class", "temperature"), "class mean raw intensity",
                         dtype="float64"),
    "mean_relative": NodeSpec("class_means_relative", ("class", "temperature"),
                              "class mean relative intensity I / <I>_T", dtype="float64"),
    "fit_curve": NodeSpec("class_fit_curves", ("class", "temperature"),
                          "fitted model of each class's mean relative intensity", dtype="float64"),
}
CLASS_NODES = (COMPONENTS, CLASS_TABLE, *CLASS_CURVES.values())
#: Columns of the class table (scalars only; NaN/None where a class has no such value).
CLASS_TABLE_COLUMNS = (
    "label", "kind", "trend", "components", "n_voxels", "tc", "tc_err", "beta", "beta_err", "width", "width_err",
    "amplitude", "amplitude_err", "critical_amplitude", "critical_amplitude_err", "r2", "chi2_red", "stability",
    "stable",
)
#: Per-class (T,) lists of ``result.classes`` left out of the container's metadata (arrays hold them).
CLASS_PER_TEMPERATURE = ("mean_raw", "mean_relative", "mean_rescaled", "fit_curve")
#: Result-metadata keys a classes="auto" result adds (from ``ClusterResult.to_dict()``, plus "content").
CLASS_METADATA_KEYS = ("n_classes", "classes", "component_class", "component_kinds", "temperature_factor",
                       "stability")


def json_safe(value):
    """``value`` with every non-finite float replaced by None (metadata is JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def class_scalars(c: dict) -> dict:
    """A class summary (an item of ``result.classes``) without its per-temperature lists."""
    return json_safe({k: v for k, v in c.items() if k not in CLASS_PER_TEMPERATURE})


def class_table(classes: list):
    """The class table: a pandas DataFrame of CLASS_TABLE_COLUMNS, one row per class.

    ``stable`` is a nullable boolean (None: no stability refits), so that it stays boolean
    through parquet; ``components`` is a comma-separated string ("0,1,2").
    """
    import pandas as pd

    rows = []
    for c in classes:
        row = {name: c.get(name) for name in CLASS_TABLE_COLUMNS}
        row["components"] = ",".join(str(int(k)) for k in c.get("components") or [])
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(CLASS_TABLE_COLUMNS))
    floats = [n for n in CLASS_TABLE_COLUMNS if n not in ("label", "kind", "trend", "components", "n_voxels", "stable")]
    frame[floats] = frame[floats].astype("float64")  # None -> NaN, and a float column even when all are None
    return frame.astype({"label": "int64", "n_voxels": "int64", "stable": "boolean"})


def _labels_tiled_chunks(shape: tuple, zarr_chunks: tuple) -> tuple:
    """Chunks for the Tiled label node: whole zarr chunks, doubled along each axis in turn
    while one int8 block stays within MAX_REQUEST_BYTES (few requests, none too big)."""
    chunks = [min(c, s) for c, s in zip(zarr_chunks, shape)]
    grown = True
    while grown:
        grown = False
        for i in range(len(chunks)):
            if chunks[i] < shape[i]:
                trial = list(chunks)
                trial[i] = min(chunks[i] * 2, shape[i])
                if math.prod(trial) <= MAX_REQUEST_BYTES:
                    chunks = trial
                    grown = True
    return tuple(chunks)


def write_labels_array(node, labels, dims: list, key: str | None = None, spec: NodeSpec = LABELS):
    """Stream an int8 label volume (numpy or zarr) into a new Tiled array node, block by block.

    ``spec`` gives the node's key (unless ``key`` is given) and description.
    """
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.data_source import DataSource

    shape = tuple(int(s) for s in labels.shape)
    zchunks = tuple(getattr(labels, "chunks", None) or shape)
    tchunks = _labels_tiled_chunks(shape, zchunks)
    chunks = regular_chunks(shape, tchunks)
    structure = ArrayStructure(
        data_type=BuiltinDtype.from_numpy_dtype(np.dtype("int8")), shape=shape, chunks=chunks, dims=list(dims)
    )
    arr = node.new(
        "array",
        [DataSource(structure=structure, structure_family="array")],
        key=key or spec.key,
        metadata=spec.metadata(fill_value=-1),
    )
    for idx, _, region in block_regions(chunks):
        arr.write_block(np.ascontiguousarray(labels[region], dtype=np.int8), block=idx)
    return arr


def write_classes(node, classes: list, n_temperatures: int) -> None:
    """The class table and the (C, T) class curves of a classes="auto" result."""
    node.write_table(class_table(classes), key=CLASS_TABLE.key, metadata=CLASS_TABLE.metadata())
    for name, spec in CLASS_CURVES.items():
        values = spec.cast([c[name] for c in classes]).reshape(len(classes), n_temperatures)
        node.write_array(values, key=spec.key, dims=list(spec.dims), metadata=spec.metadata())


def write_result(node, result, scan: TiledScan, dims: list | None = None):
    """Write every array of a ClusterResult into ``node``, then mark it complete (last).

    The layout is LABELS and RESULT_ARRAYS; a classes="auto" result (``result.classes`` not
    None) writes CLASS_LABELS instead of LABELS, adds CLASS_NODES and CLASS_METADATA_KEYS,
    and says ``content: "classes"``.
    """
    spatial = len(result.labels.shape)
    if dims is None:
        dims = ["L", "K", "H"][-spatial:]
    classes = result.classes
    if classes is None:
        write_labels_array(node, result.labels, dims)
    else:
        write_labels_array(node, result.labels, dims, spec=CLASS_LABELS)
        write_labels_array(node, result.components, dims, spec=COMPONENTS)
    for spec in RESULT_ARRAYS:
        node.write_array(spec.cast(getattr(result, spec.key)), key=spec.key, dims=list(spec.dims),
                         metadata=spec.metadata())
    if classes is not None:
        write_classes(node, classes, len(result.temperatures))
    summary = result.to_dict()
    for bulky in ("means", "variances", "temperatures", "weights"):
        summary.pop(bulky, None)
    summary["threshold"] = {k: v for k, v in summary["threshold"].items() if not k.startswith("histogram")}
    metadata = {
        "n_components": summary["n_components"],
        "counts": summary["counts"],
        "log_likelihood": summary["log_likelihood"],
        "bic": summary["bic"],
        "n_iter": summary["n_iter"],
        "converged": summary["converged"],
        "threshold": summary["threshold"],
        "n_valid": summary["n_valid"],
        "n_thresholded": summary["n_thresholded"],
        "n_peaks": summary["n_peaks"],
        "input_reads": summary["input_reads"],
        "timings": summary["timings"],
        "shape": summary["shape"],
        "dims": list(dims),
    }
    if classes is not None:
        extra = {k: summary[k] for k in CLASS_METADATA_KEYS}
        extra["classes"] = [class_scalars(c) for c in classes]
        metadata.update(content=CLASSES_CONTENT, **json_safe(extra))
    node.update_metadata(metadata=metadata)
    # Last: only now may anyone see it as complete.
    node.update_metadata(metadata={"status": "complete", "completed": _now()})
    return node


def is_transient_error(error: BaseException) -> bool:
    """Whether trying again later could help: lost connections, timeouts, 5xx, 429, a result
    another worker is still writing. Bad input (ValueError, TypeError, KeyError, 4xx) would fail
    the same way again, so it is not transient."""
    import httpx

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, httpx.HTTPStatusError):
            code = error.response.status_code
            return code >= 500 or code in (408, 429)
        if isinstance(error, (httpx.TransportError, ConnectionError, TimeoutError, ResultBusy)):
            return True
        if isinstance(error, (ValueError, TypeError, KeyError, LookupError, AccessDenied)):
            return False
        error = error.__cause__ or error.__context__
    return False


class ResultBusy(RuntimeError):
    """The result node is being written by another worker right now."""


def fail_result(node, error: BaseException, attempts: int = 3, wait: float = 2.0) -> bool:
    """Mark a result failed with the error (message only, never credentials).

    The metadata records whether the failure was transient (``retryable``): a
    watcher's catch-up re-submits those, but never a scan whose data or
    parameters were bad. The server may be what failed, so this tries a few
    times; if it still cannot, the result stays 'running' (never 'complete') and
    a re-run replaces it. Returns whether the status was recorded.
    """
    import time

    message = redact_secrets(f"{type(error).__name__}: {error}")[:2000]
    update = {"status": "failed", "failed": _now(), "error": message, "retryable": is_transient_error(error)}
    for attempt in range(attempts):
        try:
            node.update_metadata(metadata=update)
            return True
        except Exception as exc:  # the original error matters more than this one
            log.warning("could not mark result %s as failed (attempt %d): %s", _node_path(node), attempt + 1,
                        type(exc).__name__)
            if attempt + 1 < attempts:
                time.sleep(wait)
    return False


# ---------------------------------------------------------------------------------------
# importing a series (e.g. from NeXus) as a plain 4-D array node
# ---------------------------------------------------------------------------------------


def write_series(parent, key: str, volume, temperatures, *, sources=(), dims=None, metadata=None, overwrite=False):
    """Stream a (T, *spatial) series into a new Tiled array node, one block per request.

    Blocks are one temperature by a spatial tile of at most ``MAX_REQUEST_BYTES``,
    so any input that supports ``volume[t, region]`` (h5py, zarr, a stack of
    files) is copied without holding more than one block in memory.
    ``temperatures`` go into the node's metadata, which is where
    :func:`open_scan` looks for them.
    """
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.data_source import DataSource

    shape = tuple(int(s) for s in volume.shape)
    if len(shape) not in (3, 4):
        raise ValueError(f"a series must be (T, *spatial) with 2 or 3 spatial dims; got shape {shape}")
    temps = np.asarray(temperatures, dtype=np.float64)
    if temps.shape != (shape[0],):
        raise ValueError(f"{temps.size} temperatures for {shape[0]} volumes; give one temperature per volume")
    dtype = np.dtype(volume.dtype)
    if dims is None:
        dims = ["T", "L", "K", "H"][: len(shape)] if len(shape) == 4 else ["T", "K", "H"]
    # 64-voxel tiles: readers fetch (T, 64^3)-ish regions, which then touch whole
    # stored chunks only (a region cutting through big chunks makes the server
    # decode every chunk it touches, once per region).
    side = min(64, max(8, int((MAX_REQUEST_BYTES / dtype.itemsize) ** (1.0 / (len(shape) - 1)))))
    spatial = [min(side, s) for s in shape[1:]]
    chunks = regular_chunks(shape, (1, *spatial))
    check_key(key, "node key")
    if key in parent:
        if not overwrite:
            raise FileExistsError(f"Tiled node {_node_path(parent)}/{key} exists; pass --overwrite to replace it")
        parent[key].delete(recursive=True, external_only=False)
    structure = ArrayStructure(data_type=BuiltinDtype.from_numpy_dtype(dtype), shape=shape, chunks=chunks,
                               dims=list(dims))
    md = {"temperatures": temps.tolist(), "sources": list(sources), "imported_by": __version__}
    md.update(metadata or {})
    node = parent.new("array", [DataSource(structure=structure, structure_family="array")], key=key, metadata=md)
    for idx, _, region in block_regions(chunks):
        block = np.asarray(volume[(idx[0],) + region[1:]], dtype=dtype)[np.newaxis]
        node.write_block(np.ascontiguousarray(block), block=idx)
    return node
