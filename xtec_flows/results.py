"""Find and load XTEC results stored in Tiled.

Everything here is also reachable with plain ``tiled.client`` (see README)::

    from tiled.client import from_uri
    from tiled.queries import Key
    hits = from_uri(URI)["xtec"].search(Key("source.uid") == uid).search(Key("status") == "complete")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .io import tiled as tiled_io


def find_results(client, uid: str, *, root: str = tiled_io.DEFAULT_ROOT, status: str | None = "complete") -> list:
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
    hits = tiled_io._walk(client, root).search(Key("source.uid") == uid)
    if status is not None:
        hits = hits.search(Key("status") == status)
    nodes = list(hits.values())
    nodes.sort(key=lambda n: (n.metadata or {}).get("completed") or (n.metadata or {}).get("created") or "", reverse=True)
    return nodes


def latest_result(client, uid: str, *, root: str = tiled_io.DEFAULT_ROOT):
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
    return (node.metadata or {}).get("content") == tiled_io.CLASSES_CONTENT


def load_classes(node) -> list:
    """The class summaries of a classes="auto" result node (see :class:`LoadedResult`)."""
    classes = [dict(c) for c in (node.metadata or {}).get("classes") or []]
    for name, spec in tiled_io.CLASS_CURVES.items():
        values = node[spec.key].read()
        for c, row in zip(classes, values):
            c[name] = [float(v) for v in row]
    return classes


def load_result(node, *, lazy: bool = False) -> LoadedResult:
    """Read a result node; ``lazy=True`` gives the label volumes as dask arrays."""

    def volume(key):
        return tiled_io.lazy_array_spatial(node[key]) if lazy else node[key].read()

    arrays = {key: node[key].read() for key in ("means", "variances", "temperatures", "counts")}
    auto = has_classes(node)
    return LoadedResult(
        labels=volume(tiled_io.LABELS.key),
        **arrays,
        metadata=dict(node.metadata or {}),
        components=volume(tiled_io.COMPONENTS.key) if auto else None,
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
    if md.get("status") != "complete":
        raise ValueError(f"only a complete result can supersede others; {new_node.path_parts[-1]} is {md.get('status')!r}")
    new_key = new_node.path_parts[-1]
    uid = (md.get("source") or {}).get("uid")
    hits = results_root.search(Key("source.uid") == uid).search(Key("status") == "complete")
    older = [key for key in hits.keys() if key != new_key]
    for key in older:
        results_root[key].update_metadata(metadata={"superseded_by": new_key, "superseded": tiled_io._now()})
    if older:
        new_node.update_metadata(metadata={"supersedes": sorted(set(older) | set(md.get("supersedes") or []))})
    return older
