"""Process one Tiled scan end to end: read -> cluster -> write the result back.

This is the unit of work that CLIs and Prefect flows call. It is idempotent:
the result key is a hash of (source uid, parameters, engine major version), a
complete result with that key is returned without recomputing, and an
incomplete one (running or failed) is replaced.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import tiled as tiled_io
from ..engine import ClusterParams, apply, run

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What :func:`process_scan` did.

    key : the result node's key under the derived-data root
    path : its Tiled path
    status : "complete" (always, on return; failures raise)
    reused : True when an existing complete result was returned without recomputing
    """

    key: str
    path: str
    status: str
    reused: bool
    node: object = None


def process_scan(
    source,
    scan=None,
    params: ClusterParams | None = None,
    *,
    root: str = tiled_io.DEFAULT_ROOT,
    api_key: str | None = None,
    volume_field: str | None = None,
    temperature_field: str | None = None,
    chunks=None,
    progress: bool = False,
    on_stage=None,
    read_mode: str = "auto",
    model=None,
) -> Outcome:
    """Cluster a scan served by Tiled and write the result back under ``root``.

    Parameters
    ----------
    source : server URI or tiled client (root), or a run client (then scan=None)
    scan : bluesky uid or node path
    params : clustering parameters (default ClusterParams())
    on_stage : optional ``callable(name, fraction)`` called after each pass ("read", "fit",
        "labels", "written"); fraction of the work done, 0..1
    read_mode : "auto" (read the scan's files directly when this host can, else over HTTP),
        "http" or "direct" (see :mod:`xtec_flows.tiled.direct`); how the data travel, so it is
        not a clustering parameter and never part of the result key
    model : a StoredModel (:func:`xtec_flows.tiled.load_model` of a result node): label the scan
        with it instead of fitting (:func:`xtec_flows.engine.apply`); ``params`` is then the
        model's, and the result key names the model

    Raises
    ------
    tiled_io.ScanNotReady : the scan is not finished, failed, or incomplete (nothing written)
    ValueError : bad data or parameters (the result is marked failed with the message)
    tiled_io.AccessDenied : the key may not write results under ``root`` (nothing read or written)
    """
    if model is not None:
        params = model.params
    params = params or ClusterParams()
    model_name = None if model is None else model.source.get("path")
    client = tiled_io.connect(source, api_key) if isinstance(source, str) else source
    server_root = client if scan is not None else _server_root(client)
    # A key that cannot write results fails here, before any data is read.
    tiled_io.check_key_scopes(server_root, root)
    try:
        the_scan = tiled_io.open_scan(client, scan, volume_field=volume_field, temperature_field=temperature_field,
                                      read_mode=read_mode)
        if model is not None:
            model.check_temperatures(the_scan.temperatures)  # another grid: refused before any result node
    except tiled_io.ScanNotReady:
        raise
    except (ValueError, TypeError) as exc:
        # The scan exists but does not fit (fields, shapes, temperatures): record that where
        # the result would be, so nobody re-submits it, then fail.
        if isinstance(scan, str) and tiled_io.failure_kind(exc) is tiled_io.FailureKind.PERMANENT:
            uid = scan.strip("/").split("/")[-1]
            results_root = tiled_io.derived_root(server_root, root)
            key = tiled_io.result_key(uid, params.to_dict(), model_name)
            tiled_io.reject_scan(results_root, key, {"uid": uid, "path": scan, "kind": "unknown"}, params.to_dict(), exc)
            log.warning("scan %s rejected: %s", uid, exc)
        raise
    results_root = tiled_io.derived_root(server_root, root)
    key = tiled_io.result_key(the_scan.uid, params.to_dict(), model_name)
    node, existing = tiled_io.begin_result(results_root, key, the_scan, params.to_dict())
    path = tiled_io.node_path(node)
    if existing:
        log.info("scan %s: complete result %s exists; not recomputing", the_scan.uid, path)
        return Outcome(key, path, tiled_io.Status.COMPLETE.value, True, node)
    log.info("scan %s: clustering into %s", the_scan.uid, path)
    t0 = time.perf_counter()
    try:
        if model is None:
            result = run(the_scan.volume, the_scan.temperatures, params, chunks=chunks, progress=progress,
                         on_stage=on_stage)
        else:
            result = apply(the_scan.volume, the_scan.temperatures, model, chunks=chunks, progress=progress,
                           on_stage=on_stage)
        tiled_io.write_result(node, result, the_scan)
        if on_stage is not None:
            on_stage("written", 1.0)
    except BaseException as exc:
        tiled_io.fail_result(node, exc)
        raise
    log.info("scan %s: complete in %.1f s", the_scan.uid, time.perf_counter() - t0)
    return Outcome(key, path, tiled_io.Status.COMPLETE.value, False, node)


def _server_root(node):
    """Walk up to the server root from a node the caller passed in."""
    # path_parts of the root can be [''] rather than []: count only real parts.
    for _ in range(64):
        if not [p for p in getattr(node, "path_parts", []) if p]:
            return node
        parent = getattr(node, "parent", None)
        if parent is None:
            break
        node = parent
    raise ValueError("could not find the Tiled server root above the given node; pass the root client and a scan uid")
