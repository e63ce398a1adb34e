"""The one writer and reader of the result contract declared in :mod:`.spec`.

Writing: a result container's ``status`` goes ``running`` (:func:`begin_result`) ->
``complete`` (:func:`write_result`, set last, after every array is written) or ``failed``
(:func:`fail_result`, :func:`reject_scan`). While the scan is measured: ``provisional``
(:func:`begin_provisional` then :func:`write_result`), replaced by the final result, or
``aborted`` (:func:`mark_aborted`) when the scan ends without success.

Reading: :func:`find_results`, :func:`load_result`, :func:`summarise`. Everything here is also
reachable with plain ``tiled.client`` (see README)::

    from tiled.client import from_uri
    from tiled.queries import Key
    hits = from_uri(URI)["xtec"].search(Key("source.uid") == uid).search(Key("status") == "complete")
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
from dataclasses import dataclass

import numpy as np

from .._version import __version__
from ..chunking import block_regions, regular_chunks
from .access import access_denied
from .arrays import lazy_array_spatial
from .client import MAX_REQUEST_BYTES, node_path, redact_secrets, redact_uri, walk
from .errors import FailureKind, ResultBusy, denied_status, failure_kind, http_status, is_retryable
from .scans import TiledScan
from .spec import (CLASS_CURVES, CLASS_LABELS, CLASS_METADATA_KEYS, CLASS_PER_TEMPERATURE,
                   CLASS_TABLE, CLASS_TABLE_COLUMNS, CLASSES_CONTENT, COMPONENTS, LABELS, RESULT_ARRAYS,
                   DEFAULT_ROOT, NodeSpec, RESULT_SPEC, RESULT_SPEC_VERSION, Status, engine_major)

log = logging.getLogger(__name__)


def utc_now() -> str:
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


def find_result(root_node, key: str):
    """The result node with this key, or None."""
    return root_node[key] if key in root_node else None


def _create_result_container(root_node, key: str, scan: TiledScan, params: dict, **extra):
    """Create result container ``key`` with status running and its provenance (plus ``extra``
    metadata). A refused key raises AccessDenied; a 409 (it exists) is left to the caller."""
    from tiled.structures.core import Spec

    md = {
        "status": Status.RUNNING.value,
        **extra,
        "created": utc_now(),
        "source": scan.source_metadata(),
        "parameters": params,
        "engine_major": engine_major(),
        "versions": _versions(),
    }
    try:
        return root_node.create_container(key, metadata=md, specs=[Spec(RESULT_SPEC, version=RESULT_SPEC_VERSION)])
    except Exception as exc:
        if denied_status(exc):
            raise access_denied(f"create the result {node_path(root_node)}/{key}", exc) from None
        raise


def begin_result(root_node, key: str, scan: TiledScan, params: dict):
    """Create the result container with status 'running' (replacing an incomplete one).

    Returns (node, existing): ``existing`` is True when a complete result with
    this key already exists (then nothing is created and the caller should not
    recompute).
    """
    old = find_result(root_node, key)
    attempt = 1
    if old is not None:
        status = (old.metadata or {}).get("status")
        if status == Status.COMPLETE:
            return old, True
        # A failed or abandoned ("running" left by a lost worker) try counts towards MAX_ATTEMPTS;
        # a provisional result (written while the scan ran) is no try of the final one.
        if not (old.metadata or {}).get("provisional"):
            attempt = int((old.metadata or {}).get("attempt") or 1) + 1
        log.info("replacing %s result %s (attempt %d)", status, key, attempt)
        old.delete(recursive=True, external_only=False)
    try:
        node = _create_result_container(root_node, key, scan, params, attempt=attempt)
    except Exception as exc:
        if http_status(exc) != 409:
            raise
        # Another worker created it between our check and our create.
        other = root_node[key]
        if (other.metadata or {}).get("status") == Status.COMPLETE:
            return other, True
        raise ResultBusy(
            f"result {node_path(other)} is being computed by another worker (status "
            f"{(other.metadata or {}).get('status')!r}); try again when it has finished"
        ) from exc
    return node, False


def begin_provisional(root_node, key: str, scan: TiledScan, params: dict, provisional: dict):
    """Create a provisional result container (replacing the previous provisional one).

    ``provisional`` holds the :data:`~.spec.PROVISIONAL_KEYS` entries. The container says
    ``status: running`` and ``provisional: true`` until :func:`write_result` with
    ``status=Status.PROVISIONAL`` has written every array. Returns the node, or None when the
    key holds anything but a provisional or aborted result (the final one is being made, or
    exists): a provisional result never replaces it.
    """
    old = find_result(root_node, key)
    if old is not None:
        # Only provisional results carry the flag (begin_result creates the final one without it).
        if not (old.metadata or {}).get("provisional"):
            return None
        old.delete(recursive=True, external_only=False)
    try:
        return _create_result_container(root_node, key, scan, params, provisional=True, **json_safe(provisional))
    except Exception as exc:
        if http_status(exc) == 409:  # the final result was created meanwhile
            return None
        raise


def mark_aborted(node, stop: dict) -> None:
    """Mark a provisional result ``aborted``: its scan ended without success (``stop`` document)."""
    node.update_metadata(metadata={"status": Status.ABORTED.value, "aborted": utc_now(),
                                   "exit_status": stop.get("exit_status"),
                                   "reason": redact_secrets(str(stop.get("reason") or ""))[:2000]})


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
        if (old.metadata or {}).get("status") == Status.COMPLETE:
            return None
        old.delete(recursive=True, external_only=False)
    md = {
        "status": Status.FAILED.value,
        "created": utc_now(),
        "failed": utc_now(),
        "retryable": False,
        "failure_kind": FailureKind.PERMANENT.value,
        "error": redact_secrets(f"{type(error).__name__}: {error}")[:2000],
        "source": dict(source),
        "parameters": params,
        "engine_major": engine_major(),
        "versions": _versions(),
    }
    return root_node.create_container(key, metadata=md, specs=[Spec(RESULT_SPEC, version=RESULT_SPEC_VERSION)])


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


def _labels_tiled_chunks(shape: tuple, zarr_chunks: tuple, max_bytes: int = MAX_REQUEST_BYTES) -> tuple:
    """Chunks for the Tiled label node: whole zarr chunks, doubled along each axis in turn
    while one int8 block stays within ``max_bytes`` (few requests, none too big)."""
    chunks = [min(c, s) for c, s in zip(zarr_chunks, shape)]
    grown = True
    while grown:
        grown = False
        for i in range(len(chunks)):
            if chunks[i] < shape[i]:
                trial = list(chunks)
                trial[i] = min(chunks[i] * 2, shape[i])
                if math.prod(trial) <= max_bytes:
                    chunks = trial
                    grown = True
    return tuple(chunks)


def write_labels_array(node, labels, dims: list, key: str | None = None, spec: NodeSpec = LABELS,
                       max_request_bytes: int = MAX_REQUEST_BYTES):
    """Stream an int8 label volume (numpy or zarr) into a new Tiled array node, block by block.

    ``spec`` gives the node's key (unless ``key`` is given) and description.
    """
    from tiled.structures.array import ArrayStructure, BuiltinDtype
    from tiled.structures.data_source import DataSource

    shape = tuple(int(s) for s in labels.shape)
    zchunks = tuple(getattr(labels, "chunks", None) or shape)
    tchunks = _labels_tiled_chunks(shape, zchunks, max_request_bytes)
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


def write_result(node, result, scan: TiledScan, dims: list | None = None, status: Status = Status.COMPLETE):
    """Write every array of a ClusterResult into ``node``, then set ``status`` (last): complete,
    or provisional for a result of the temperatures a running scan has recorded so far.

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
    if result.model is not None:
        metadata["model"] = json_safe(result.model)
    if classes is not None:
        extra = {k: summary[k] for k in CLASS_METADATA_KEYS}
        extra["classes"] = [class_scalars(c) for c in classes]
        metadata.update(content=CLASSES_CONTENT, **json_safe(extra))
    node.update_metadata(metadata=metadata)
    # Last: only now may anyone see it as complete.
    stamp = "completed" if status == Status.COMPLETE else "updated"
    node.update_metadata(metadata={"status": Status(status).value, stamp: utc_now()})
    return node


def fail_result(node, error: BaseException, attempts: int = 3, wait: float = 2.0) -> bool:
    """Mark a result failed with the error (message only, never credentials).

    The metadata records the error's :class:`~.errors.FailureKind` and whether a later run may
    succeed (``retryable``, :func:`~.errors.is_retryable`: not the input's fault, and fewer than
    MAX_ATTEMPTS tries so far); watchers and schedules re-submit only those. The server may be
    what failed, so this tries ``attempts`` times; if it still cannot, the result stays
    'running' (never 'complete') and a re-run replaces it. Returns whether the status was
    recorded.
    """
    import time

    attempt = int((getattr(node, "metadata", None) or {}).get("attempt") or 1)
    message = redact_secrets(f"{type(error).__name__}: {error}")[:2000]
    update = {"status": Status.FAILED.value, "failed": utc_now(), "error": message,
              "failure_kind": failure_kind(error).value, "retryable": is_retryable(error, attempt)}
    for attempt_no in range(attempts):
        try:
            node.update_metadata(metadata=update)
            return True
        except Exception as exc:  # the original error matters more than this one
            log.warning("could not mark result %s as failed (attempt %d): %s", node_path(node), attempt_no + 1,
                        type(exc).__name__)
            if attempt_no + 1 < attempts:
                time.sleep(wait)
    return False


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


def find_results(client, uid: str, *, root: str = DEFAULT_ROOT, status: str | None = Status.COMPLETE.value) -> list:
    """Result nodes of a scan, newest first.

    Parameters
    ----------
    client : tiled client for the server root
    uid : source scan uid (or node path for plain arrays)
    status : "complete" (default), "running", "failed", or None for all
    """
    from tiled.queries import Key

    if root.strip("/") not in client:
        return []
    hits = walk(client, root).search(Key("source.uid") == uid)
    if status is not None:
        hits = hits.search(Key("status") == status)
    nodes = list(hits.values())
    nodes.sort(key=lambda n: (n.metadata or {}).get("completed") or (n.metadata or {}).get("created") or "", reverse=True)
    return nodes


def latest_result(client, uid: str, *, root: str = DEFAULT_ROOT):
    """The newest complete result of a scan, or None."""
    nodes = find_results(client, uid, root=root)
    return nodes[0] if nodes else None


@dataclass
class LoadedResult:
    """A result read back from Tiled.

    labels : (*spatial) int8 (numpy) or dask array when lazy; -1 = not clustered; class labels
        when ``classes`` is not None
    means, variances : (K, T) of the mixture's components; temperatures : (T,); counts : (K,)
    metadata : the result container's metadata (parameters, source, cutoff, log L, BIC, ...)
    components : classes="auto" only (else None): (*spatial) int8 component labels, like ``labels``
    classes : classes="auto" only (else None): one dict per class, in label order, as
        ``ClusterResult.classes`` (metadata's scalars plus the (T,) lists mean_raw,
        mean_relative and fit_curve from the class arrays; mean_rescaled is not stored)
    """

    labels: object
    means: np.ndarray
    variances: np.ndarray
    temperatures: np.ndarray
    counts: np.ndarray
    metadata: dict
    components: object = None
    classes: list | None = None


def has_classes(node) -> bool:
    """Whether a result node holds a classes="auto" result."""
    return (node.metadata or {}).get("content") == CLASSES_CONTENT


def load_classes(node) -> list:
    """The class summaries of a classes="auto" result node (see :class:`LoadedResult`)."""
    classes = [dict(c) for c in (node.metadata or {}).get("classes") or []]
    for name, spec in CLASS_CURVES.items():
        values = node[spec.key].read()
        for c, row in zip(classes, values):
            c[name] = [float(v) for v in row]
    return classes


def load_model(node):
    """The stored model of a complete result node, to label other scans with
    (:func:`xtec_flows.engine.apply`); its provenance is the node's server, path and key.

    Raises ValueError for a node that is not a complete result."""
    from ..engine.model import StoredModel

    md = dict(node.metadata or {})
    where = node_path(node)
    if md.get("status") != Status.COMPLETE:
        raise ValueError(f"{where} is not a complete xtec-flows result (status {md.get('status')!r}); give the "
                         "path of a complete result node as the model")
    arrays = {}
    for name in ("means", "variances", "weights", "temperatures"):
        if name not in node:
            raise ValueError(f"{where} has no {name!r} array; give the path of a complete xtec-flows result node")
        arrays[name] = node[name].read()
    source = {"kind": "tiled", "uri": redact_uri(node.uri), "path": where, "key": node.path_parts[-1]}
    return StoredModel.from_summary(md, source, **arrays)


def load_result(node, *, lazy: bool = False) -> LoadedResult:
    """Read a result node; ``lazy=True`` gives the label volumes as dask arrays."""

    def volume(key):
        return lazy_array_spatial(node[key]) if lazy else node[key].read()

    arrays = {key: node[key].read() for key in ("means", "variances", "temperatures", "counts")}
    auto = has_classes(node)
    return LoadedResult(
        labels=volume(LABELS.key),
        **arrays,
        metadata=dict(node.metadata or {}),
        components=volume(COMPONENTS.key) if auto else None,
        classes=load_classes(node) if auto else None,
    )


def summarise(nodes) -> list[dict]:
    """One row per result node: key, status, K, mode, BIC, created/completed (and, for
    classes="auto", classes and n_classes)."""
    rows = []
    for n in nodes:
        md = n.metadata or {}
        p = md.get("parameters", {})
        rows.append({
            "key": n.path_parts[-1],
            "status": md.get("status"),
            "mode": p.get("mode"),
            "n_components": p.get("n_components"),
            "bic": md.get("bic"),
            "created": md.get("created"),
            "completed": md.get("completed"),
            "error": md.get("error"),
        })
        if p.get("classes") is not None:
            # classes="auto" ignores n_components: report the components fitted and the classes found.
            rows[-1].update(n_components=md.get("n_components"), classes=p["classes"], n_classes=md.get("n_classes"))
    return rows


def mark_superseded(results_root, new_node) -> list[str]:
    """Record that ``new_node`` supersedes the scan's other complete results.

    Every other complete result of the same source scan gets ``superseded_by`` (the new key)
    and the new result gets ``supersedes`` (their keys). Nothing is deleted: older results stay
    readable, and a plain Tiled query ``Key("superseded_by") ...`` finds what was replaced.
    Returns the superseded keys.
    """
    from tiled.queries import Key

    md = new_node.metadata or {}
    if md.get("status") != Status.COMPLETE:
        raise ValueError(f"only a complete result can supersede others; {new_node.path_parts[-1]} is {md.get('status')!r}")
    new_key = new_node.path_parts[-1]
    uid = (md.get("source") or {}).get("uid")
    hits = results_root.search(Key("source.uid") == uid).search(Key("status") == Status.COMPLETE)
    older = [key for key in hits.keys() if key != new_key]
    for key in older:
        results_root[key].update_metadata(metadata={"superseded_by": new_key, "superseded": utc_now()})
    if older:
        new_node.update_metadata(metadata={"supersedes": sorted(set(older) | set(md.get("supersedes") or []))})
    return older
