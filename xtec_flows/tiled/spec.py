"""The result contract, declared once: what a result container holds and says.

One container per (source scan, parameter set) under a derived-data root (default ``xtec``),
keyed by :func:`result_key`: a hash of (source uid, parameters, engine major version). Its
``status`` metadata takes the values of :class:`Status`. Its child nodes are :data:`LABELS`
and :data:`RESULT_ARRAYS`, and for ``classes="auto"`` :data:`CLASS_LABELS` and
:data:`CLASS_NODES`. :mod:`xtec_flows.tiled.results` is the one writer and reader of it.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .._version import __version__

RESULT_SPEC = "xtec-clusters"
RESULT_SPEC_VERSION = "1"
DEFAULT_ROOT = "xtec"


class Status(str, enum.Enum):
    """A result container's ``status``: ``running`` -> ``complete`` (set last, after every
    array is written) or ``failed`` (with ``retryable`` and ``error``).

    While a scan is still being measured its result may be ``provisional`` (clustered from the
    temperatures recorded so far, :data:`PROVISIONAL_KEYS` say which), replaced by the final
    result after the stop document, or ``aborted`` when the scan ended without success."""

    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    PROVISIONAL = "provisional"
    ABORTED = "aborted"

    def __str__(self) -> str:
        return self.value


def engine_major() -> int:
    return int(__version__.split(".")[0])


def result_key(source_uid: str, params: dict, model: str | None = None) -> str:
    """Stable node key for (source scan, parameters, engine major version[, stored model]).

    ``model`` names the stored model that labelled the scan (its result node's path): a scan
    labelled by a model is another result than the same scan fitted afresh. Without it the key
    is what it always was."""
    what = {"source": source_uid, "params": params, "engine": engine_major()}
    if model is not None:
        what["model"] = model
    doc = json.dumps(what, sort_keys=True, default=str)
    return "xtec-" + hashlib.sha256(doc.encode()).hexdigest()[:20]


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
                       "or the critical peak's width and power law, fit quality, stability; components is a comma-separated list")
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
    "gamma", "gamma_err", "amplitude", "amplitude_err", "critical_amplitude", "critical_amplitude_err", "r2", "chi2_red",
    "stability", "stable",
)
#: Per-class (T,) lists of ``result.classes`` left out of the container's metadata (arrays hold them).
CLASS_PER_TEMPERATURE = ("mean_raw", "mean_relative", "mean_rescaled", "fit_curve")
#: Result-metadata keys a provisional result adds: how many temperatures (the first n of the
#: scan) it covers, their values, the parameters it was clustered with (fewer temperatures than
#: class discovery needs fall back to a fixed-K fit) and the alerts already sent for the scan.
PROVISIONAL_KEYS = ("n_temperatures_covered", "temperatures_covered", "provisional_parameters", "alerts",
                    "updated")
#: Result-metadata keys a classes="auto" result adds (from ``ClusterResult.to_dict()``, plus "content").
CLASS_METADATA_KEYS = ("n_classes", "classes", "component_class", "component_kinds", "temperature_factor",
                       "stability")
