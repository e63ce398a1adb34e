"""Comparing a series of scans (doping, pressure, field) through one stored model.

Every scan is labelled by the same model (:func:`xtec_flows.tiled.process.process_scan` with
``model=``, idempotent: a scan already labelled by it is not recomputed), so class ``i`` is the
same temperature dependence in every scan and needs no matching; each scan's classes are refitted
on its own voxels. The comparison is one table, a row per (scan, class): the class's kind, its
voxels and their fraction of the scan's clustered voxels, and Tc ± error. It is written to Tiled
as a table node beside the results, keyed by the model and the scans, with the result keys in
its metadata.
"""

from __future__ import annotations

import hashlib
import json
import logging

from . import results as results_io
from .access import derived_root
from .client import check_key, node_path, walk
from .spec import DEFAULT_ROOT

log = logging.getLogger(__name__)

#: Columns of the comparison table, one row per (scan, class).
COMPARISON_COLUMNS = ("scan", "result", "label", "kind", "n_voxels", "fraction", "tc", "tc_err", "stable")


def comparison_key(model_path: str, scans: list[str]) -> str:
    """Stable node key for (model, scans in the given order)."""
    doc = json.dumps({"model": model_path, "scans": list(scans)}, sort_keys=True)
    return "series-" + hashlib.sha256(doc.encode()).hexdigest()[:20]


def compare_scans(client, model_path: str, scans: list[str], *, root: str = DEFAULT_ROOT, progress: bool = False,
                  read_mode: str = "auto"):
    """Label every scan with the model of result node ``model_path`` and tabulate its classes.

    Parameters
    ----------
    client : tiled client of the server root
    model_path : path of a complete classes="auto" result node (e.g. "xtec/<key>")
    scans : scan uids or node paths, in series order (at least 2)

    Returns
    -------
    (pandas DataFrame of COMPARISON_COLUMNS, the table node written under ``root``)

    Raises ValueError naming the input when the model has no classes, a scan is given twice or
    fewer than two scans are given (nothing is written then).
    """
    import pandas as pd

    from .process import process_scan

    scans = [str(s) for s in scans]
    if len(scans) < 2:
        raise ValueError(f"a comparison needs at least two scans; got {len(scans)}. Give --scan once per scan")
    if len(set(scans)) != len(scans):
        raise ValueError(f"scan(s) given twice: {sorted({s for s in scans if scans.count(s) > 1})}; give each once")
    model = results_io.load_model(walk(client, model_path))
    if model.component_class is None:
        raise ValueError(f"{model_path} is a fixed-K result; a comparison needs a classes='auto' model (its classes "
                         "are what is compared): cluster one scan with --classes auto and give that result")
    rows, keys = [], []
    for scan in scans:
        outcome = process_scan(client, scan, root=root, model=model, progress=progress, read_mode=read_mode)
        md = outcome.node.metadata or {}
        clustered = sum(int(c["n_voxels"]) for c in md.get("classes") or []) or 1
        keys.append(outcome.key)
        for c in md.get("classes") or []:
            rows.append({"scan": scan, "result": outcome.key, "label": int(c["label"]), "kind": c["kind"],
                         "n_voxels": int(c["n_voxels"]), "fraction": int(c["n_voxels"]) / clustered,
                         "tc": c.get("tc"), "tc_err": c.get("tc_err"), "stable": c.get("stable")})
    frame = pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))
    frame[["tc", "tc_err"]] = frame[["tc", "tc_err"]].astype("float64")
    frame["stable"] = frame["stable"].astype("boolean")
    root_node = derived_root(client, root)
    key = check_key(comparison_key(model.source["path"], scans), "comparison key")
    if key in root_node:
        root_node[key].delete(recursive=True, external_only=False)  # the same comparison, recomputed
    metadata = {"content": "comparison", "model": model.provenance(), "scans": scans, "results": keys,
                "description": "one row per (scan, class) of scans labelled by one stored model"}
    node = root_node.write_table(frame, key=key, metadata=metadata)
    log.info("comparison of %d scans through %s written to %s", len(scans), model_path, node_path(node))
    return frame, node
