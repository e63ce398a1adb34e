"""Where a bluesky run's event stream lives in Tiled, for each layout Tiled serves.

Three layouts hold the same documents (tiled 0.2.20, bluesky-tiled-plugins 2.0.12, databroker 2.0.2):

``RunLayout.TILEDWRITER``
    What TiledWriter writes today (bluesky-tiled-plugins 2.x, spec ``BlueskyRun`` 3.0)::

        /<uid>/<stream>            composite container, spec BlueskyEventStream
              /internal            appendable SQL table: seq_num, time, <scalar fields>, ts_<field>
              /<field>             one array node per non-scalar field (leading axis = event)

``RunLayout.STREAMS``
    The same stream one level down, under a ``streams`` namespace (bluesky's own
    ``bluesky.callbacks.tiled_writer`` before the namespace was dropped, tiled issues #1136 and
    #1179)::

        /<uid>/streams/<stream>    composite container, as above

``RunLayout.MONGO``
    databroker's MongoDB adapter (``databroker.mongo_normalized.MongoAdapter``, spec
    ``BlueskyRun`` 1)::

        /<uid>/<stream>/data/<field>         one array per field, scalar fields as 1-D arrays;
                                             external fields filled server-side by the
                                             databroker handler named in the resource's spec
        /<uid>/<stream>/timestamps/<field>

:func:`open_stream` finds the stream in any of them and returns a :class:`RunStream` that reads
them all the same way; :func:`as_run_node` turns the run objects users hold (a databroker v1
``Header``, a v2/v3 ``BlueskyRun`` client) into the Tiled container node.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .client import node_path

__all__ = ["RunLayout", "RunStream", "open_stream", "as_run_node", "run_label", "EVENT_COLUMNS"]

#: Bookkeeping columns every table layout carries beside the fields (not measured quantities).
EVENT_COLUMNS = ("seq_num", "time")
_TIMESTAMP_PREFIX = "ts_"
#: Spec names (in the node's specs) of a bluesky event stream node.
_STREAM_SPEC = "BlueskyEventStream"


class RunLayout(str, enum.Enum):
    """How a run's event streams are laid out in Tiled (see the module docstring)."""

    TILEDWRITER = "tiledwriter"
    STREAMS = "streams"
    MONGO = "mongo"


def _is_tiled_node(obj) -> bool:
    from tiled.client.base import BaseClient

    return isinstance(obj, BaseClient)


def as_run_node(obj):
    """The Tiled container node of a run, from whatever run object the caller holds.

    Accepted: a Tiled client node (returned as is: a ``BlueskyRun`` client of
    bluesky-tiled-plugins, v2 or v3, is one), or a databroker v1 ``Header`` (its ``.v2`` is the
    ``BlueskyRun`` client). Raises ``TypeError`` for anything else.
    """
    if _is_tiled_node(obj):
        return obj
    v2 = getattr(type(obj), "v2", None)  # databroker.v1.Header.v2 is a property
    if v2 is not None:
        node = obj.v2
        if _is_tiled_node(node):
            return node
    raise TypeError(
        f"{type(obj).__module__}.{type(obj).__name__} is not a Tiled node or a databroker run; pass a Tiled "
        "client of the run (e.g. from_uri(URI)['raw'][uid]) or a databroker v1 Header"
    )


def run_label(run) -> str:
    """How messages name a run: its start uid and its Tiled path."""
    start = (getattr(run, "metadata", None) or {}).get("start") or {}
    uid = start.get("uid")
    path = node_path(run)
    return f"run {uid} ({path})" if uid and not path.endswith(uid) else f"run {path}"


def _plain(node):
    # bluesky-tiled-plugins wraps a run and a stream in clients that rewrite keys (a run hides
    # 'streams' and warns; a composite stream lists table columns beside its real children).
    # The layout is read from the real nodes, which composites expose as .base.
    base = getattr(type(node), "base", None)
    return node.base if base is not None else node


def _spec_names(node) -> set:
    return {s.name for s in (getattr(node, "specs", None) or [])}


def _keys(node) -> list:
    return list(_plain(node))


@dataclass(frozen=True)
class RunStream:
    """One event stream of a run, read the same way whatever its layout.

    layout : where it came from
    run : label of the run (uid and path), for messages
    name : stream name ("primary")
    path : Tiled path of the stream node
    arrays : field name -> Tiled array node with the event axis first. MONGO: every field
        (scalars as 1-D arrays). TILEDWRITER/STREAMS: the fields stored as array nodes; scalar
        fields are columns of ``table``.
    table : the stream's ``internal`` table node (TILEDWRITER/STREAMS), or None (MONGO)
    """

    layout: RunLayout
    run: str
    name: str
    path: str
    arrays: Mapping[str, Any]
    table: Any = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    # -- scalar columns --------------------------------------------------------------------

    def _frame(self):
        """The internal table as a DataFrame in seq_num order (read once)."""
        if "frame" not in self._cache:
            frame = self.table.read()
            if "seq_num" in frame.columns:
                frame = frame.sort_values("seq_num", kind="stable").reset_index(drop=True)
            self._cache["frame"] = frame
        return self._cache["frame"]

    def _is_scalar_array(self, name: str) -> bool:
        return len(self.arrays[name].shape) == 1

    def columns(self) -> list[str]:
        """Names of the scalar fields (one number per event), without seq_num, time, ts_*."""
        if self.table is not None:
            names = list(self.table.columns) if hasattr(self.table, "columns") else list(self._frame().columns)
        else:
            names = [k for k in self.arrays if self._is_scalar_array(k)]
        return [c for c in names if c not in EVENT_COLUMNS and not c.startswith(_TIMESTAMP_PREFIX)]

    def column(self, name: str) -> np.ndarray:
        """A scalar field's values, shape (n_events,), in event (seq_num) order.

        Raises ``KeyError`` naming the run, the stream and the fields it has.
        """
        if self.table is not None and name in self.columns():
            return np.asarray(self._frame()[name])
        if self.table is None and name in self.arrays and self._is_scalar_array(name):
            # databroker serves a stream's fields in event order already (events sorted by
            # seq_num within the descriptor), so no reordering here.
            return np.asarray(self.arrays[name].read())
        raise KeyError(
            f"{self.run}: stream {self.name!r} ({self.path}) has no scalar field {name!r} "
            f"(scalar fields {self.columns()}, array fields {self.array_fields()}); check the field name"
        )

    # -- array fields ----------------------------------------------------------------------

    def array_fields(self, min_ndim: int = 2) -> list[str]:
        """Fields stored as arrays with at least ``min_ndim`` dims (event axis included)."""
        return [k for k, node in self.arrays.items() if len(node.shape) >= min_ndim]

    @property
    def n_events(self) -> int | None:
        """Number of events, from the table or any field (None if the stream is empty)."""
        if self.table is not None:
            return len(self._frame())
        for node in self.arrays.values():
            return int(node.shape[0])
        return None

    @property
    def descriptor_metadata(self) -> dict:
        return dict(self._cache.get("metadata") or {})


def _table_stream(layout: RunLayout, run_label_: str, name: str, stream_node) -> RunStream:
    base = _plain(stream_node)
    arrays, table = {}, None
    for key in base:
        child = base[key]
        family = getattr(child, "structure_family", None)
        if key == "internal" and family == "table":
            table = child
        elif family == "array":
            arrays[key] = child
    return RunStream(layout, run_label_, name, node_path(base), arrays, table,
                     {"metadata": dict(stream_node.metadata or {})})


def _mongo_stream(run_label_: str, name: str, stream_node) -> RunStream:
    data = stream_node["data"]
    arrays = {key: data[key] for key in data}
    return RunStream(RunLayout.MONGO, run_label_, name, node_path(data), arrays, None,
                     {"metadata": dict(stream_node.metadata or {})})


def detect_layout(run) -> RunLayout:
    """The layout of ``run`` (a Tiled container node of one bluesky run).

    STREAMS: the run holds a ``streams`` container that is not itself an event stream; MONGO: the
    run's spec is ``BlueskyRun`` version 1 (databroker's adapter), or another version before 3
    whose streams hold a ``data`` container; TILEDWRITER otherwise.
    """
    node = _plain(run)
    versions = [str(s.version) for s in (getattr(run, "specs", None) or []) if s.name == "BlueskyRun"]
    keys = list(node)
    if "streams" in keys and _STREAM_SPEC not in _spec_names(node["streams"]):
        return RunLayout.STREAMS
    if versions == ["1"]:  # databroker's MongoAdapter (bluesky's own early TiledWriter said "1.0")
        return RunLayout.MONGO
    if versions and not versions[0].startswith("3"):
        for key in keys:
            child = node[key]
            if getattr(child, "structure_family", None) == "container" and "data" in _keys(child):
                return RunLayout.MONGO
    return RunLayout.TILEDWRITER


def open_stream(run, name: str = "primary") -> RunStream:
    """Stream ``name`` of a bluesky run, in any layout Tiled serves.

    Parameters
    ----------
    run : a Tiled container node of one run, or a databroker run object (see :func:`as_run_node`)
    name : stream name

    Raises
    ------
    TypeError : ``run`` is not a run object
    ValueError : ``run`` is not a bluesky run (no start document)
    KeyError : the run has no stream ``name``; the message names the run and the streams it has
    """
    node = as_run_node(run)
    md = getattr(node, "metadata", None) or {}
    label = run_label(node)
    if "start" not in md or getattr(node, "structure_family", None) != "container":
        raise ValueError(
            f"{node_path(node)} is not a bluesky run (a container with a start document in its metadata); "
            "give the path or uid of a run"
        )
    layout = detect_layout(node)
    plain = _plain(node)
    parent = plain["streams"] if layout is RunLayout.STREAMS else plain
    streams = list(parent)
    if name not in streams:
        raise KeyError(
            f"{label} has no {name!r} stream (streams {streams or 'none: no events were recorded'}, "
            f"layout {layout.value}); check that the scan recorded events, or choose another stream"
        )
    stream_node = parent[name]
    if layout is RunLayout.MONGO:
        if "data" not in _keys(stream_node):
            raise KeyError(f"{label}: stream {name!r} ({node_path(stream_node)}) has no 'data' node; "
                           "is this a databroker (MongoDB) run?")
        return _mongo_stream(label, name, _plain(stream_node))
    return _table_stream(layout, label, name, stream_node)
