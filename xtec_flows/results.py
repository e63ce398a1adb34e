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

    labels : (*spatial) int8 (numpy) or dask array when lazy; -1 = not clustered
    means, variances : (K, T); temperatures : (T,); counts : (K,)
    metadata : the result container's metadata (parameters, source, cutoff, log L, BIC, ...)
    """

    labels: object
    means: np.ndarray
    variances: np.ndarray
    temperatures: np.ndarray
    counts: np.ndarray
    metadata: dict


def load_result(node, *, lazy: bool = False) -> LoadedResult:
    """Read a result node; ``lazy=True`` gives the labels as a dask array."""
    labels = tiled_io.lazy_array_spatial(node["labels"]) if lazy else node["labels"].read()
    return LoadedResult(
        labels=labels,
        means=node["means"].read(),
        variances=node["variances"].read(),
        temperatures=node["temperatures"].read(),
        counts=node["counts"].read(),
        metadata=dict(node.metadata or {}),
    )


def summarise(nodes) -> list[dict]:
    """One row per result node: key, status, K, mode, BIC, created/completed."""
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
