"""What the viewer reads, through Tiled's public HTTP API only (never the storage behind it).

Every request carries the user's key in the ``Authorization: Apikey`` header, so Tiled's access
policy decides what the viewer may show. Volumes are only ever read one slice, one voxel's
trajectory or one result array at a time (``/api/v1/array/full/<path>?slice=...``): the server
reads the stored chunks those touch, so a 512^3 result opens as fast as a 64^3 one.

Axis order is the project's: scan volumes are (T, L, K, H) (or (T, K, H)), label volumes
(L, K, H) (or (K, H)).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np

from ..tiled.spec import Status

log = logging.getLogger(__name__)

#: Names of the spatial axes, outermost first, as the result's ``labels`` node stores them.
SPATIAL_DIMS = ("L", "K", "H")
#: Result statuses after which nothing changes any more (the page stops polling).
FINAL_STATUSES = tuple(s.value for s in (Status.COMPLETE, Status.FAILED, Status.ABORTED))


class ViewerError(Exception):
    """A request the viewer cannot answer, with the HTTP status to answer it with and a message
    naming the input and the remedy (shown in the page as is)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ArrayInfo:
    """An array node's structure: shape, numpy dtype, dims (may be empty) and metadata."""

    path: str
    shape: tuple
    dtype: np.dtype
    dims: tuple
    metadata: dict


def _numpy_dtype(data_type: dict) -> np.dtype:
    endian = {"little": "<", "big": ">", "not_applicable": "|"}.get(data_type.get("endianness"), "|")
    return np.dtype(f"{endian}{data_type['kind']}{data_type['itemsize']}")


def _slice_param(index: tuple) -> str:
    """A numpy-style index tuple (ints and ``slice(None)``) as Tiled's ``slice=`` parameter."""
    return ",".join(":" if isinstance(i, slice) else str(int(i)) for i in index)


class TiledReader:
    """Reads result containers and their scans over Tiled's HTTP API with an ``httpx.Client``.

    Parameters
    ----------
    http : httpx.Client whose ``base_url`` is the Tiled server and whose headers carry the key
    root : the results container (default ``xtec``)
    """

    def __init__(self, http, root: str = "xtec"):
        self.http = http
        self.root = root.strip("/")
        # Structures of the label and scan volumes read slice by slice: their shape and dtype are
        # the scan's (a replaced result is written with the same shape), so a slice costs one
        # request, not two. Missing nodes are not kept (a running result's labels appear later),
        # nor the small per-class arrays, whose number of rows a new result may change.
        self._volumes: dict[str, ArrayInfo] = {}

    # -- plumbing ----------------------------------------------------------------------------

    def _get(self, route: str, path: str, what: str, **params):
        url = f"/api/v1/{route}/{quote(path.strip('/'))}"
        try:
            response = self.http.get(url, params=params)
        except Exception as exc:  # httpx.HTTPError: connection refused, timeout...
            raise ViewerError(502, f"cannot reach the Tiled server at {self.http.base_url} ({type(exc).__name__}); "
                                   "check --tiled-uri and that the server is running") from None
        if response.status_code == 401:
            raise ViewerError(401, f"Tiled at {self.http.base_url} refused the API key while reading {what}: "
                                   "set TILED_API_KEY (or --api-key-file) to a key that may read it")
        if response.status_code == 403:
            raise ViewerError(403, f"the API key may not read {what}; ask for a key with read:metadata and "
                                   "read:data on it")
        if response.status_code == 404:
            raise ViewerError(404, f"{what} does not exist on {self.http.base_url}; check the name")
        if response.status_code >= 400:
            raise ViewerError(502, f"Tiled answered HTTP {response.status_code} while reading {what}")
        return response

    def node(self, path: str, what: str) -> dict:
        """The ``attributes`` of a node: metadata, structure_family, structure, specs."""
        return self._get("metadata", path, what).json()["data"]["attributes"]

    def array_info(self, path: str, what: str) -> ArrayInfo:
        attrs = self.node(path, what)
        if attrs.get("structure_family") != "array":
            raise ViewerError(422, f"{what} ({path}) is a {attrs.get('structure_family')}, not an array")
        s = attrs["structure"]
        return ArrayInfo(path, tuple(s["shape"]), _numpy_dtype(s["data_type"]), tuple(s.get("dims") or ()),
                         attrs.get("metadata") or {})

    def volume_info(self, path: str, what: str) -> ArrayInfo:
        """:meth:`array_info` of a label or scan volume, remembered once found."""
        known = self._volumes.get(path)
        if known is None:
            known = self._volumes[path] = self.array_info(path, what)
        return known

    def read(self, info: ArrayInfo, index: tuple | None = None) -> np.ndarray:
        """``info``'s array (or ``array[index]``, index of ints and ``slice(None)``), as numpy."""
        params = {"format": "application/octet-stream"}
        shape = info.shape
        if index is not None:
            params["slice"] = _slice_param(index)
            shape = tuple(n for n, i in zip(info.shape, index) if isinstance(i, slice)) + info.shape[len(index):]
        raw = self._get("array/full", info.path, f"the array {info.path}", **params).content
        return np.frombuffer(raw, dtype=info.dtype).reshape(shape)

    # -- results -----------------------------------------------------------------------------

    def list_results(self, limit: int = 300) -> list[dict]:
        """One row per result container under the root: key, status, content, source, created."""
        rows, offset = [], 0
        while len(rows) < limit:
            body = self._get("search", self.root, f"the results container /{self.root}", **{
                "page[offset]": offset, "page[limit]": 100, "fields": "metadata"}).json()
            for item in body.get("data") or []:
                md = (item.get("attributes") or {}).get("metadata") or {}
                src = md.get("source") or {}
                rows.append({"key": item["id"], "status": md.get("status"), "content": md.get("content") or "clusters",
                             "uid": src.get("uid"), "path": src.get("path"), "created": md.get("created"),
                             "parameters": md.get("parameters") or {}})
            offset += len(body.get("data") or [])
            if not body.get("data") or offset >= (body.get("meta") or {}).get("count", 0):
                break
        return rows

    def result(self, key: str) -> dict:
        """Everything the page needs to draw a result but the slices: see :func:`describe`."""
        what = f"the result /{self.root}/{key}"
        attrs = self.node(f"{self.root}/{key}", what)
        md = attrs.get("metadata") or {}
        status = md.get("status")
        try:
            labels = self.array_info(f"{self.root}/{key}/labels", f"the labels of {what}")
        except ViewerError as exc:
            if exc.status != 404:
                raise
            hint = f" (status {status!r}: {md.get('error')})" if status == "failed" else \
                f" (status {status!r}; it appears once the labels are written)" if status else ""
            raise ViewerError(422, f"{what} has no labels{hint}; pick a complete result") from None
        source = md.get("source") or {}
        volume = None
        if source.get("path"):
            try:
                volume = self.array_info(source["path"], f"the scan volume {source['path']}")
            except ViewerError as exc:
                if exc.status in (401, 403):
                    raise
                log.warning("result %s: scan volume %s unreadable (%s)", key, source.get("path"), exc.message)
        curves = {}
        for name in ("temperatures", "means", "counts", "class_means_relative", "class_fit_curves"):
            try:
                curves[name] = self.read(self.array_info(f"{self.root}/{key}/{name}", f"{what}/{name}"))
            except ViewerError as exc:
                if exc.status != 404:
                    raise
        return describe(key, md, labels, volume, curves)

    def labels_slice(self, key: str, axis: int, index: int) -> np.ndarray:
        """Labels on one plane: int8 of the labels' shape without ``axis``."""
        info = self.volume_info(f"{self.root}/{key}/labels", f"the labels of /{self.root}/{key}")
        return self.read(info, plane_index(info.shape, axis, index))

    def intensity_slice(self, volume_path: str, axis: int, index: int) -> np.ndarray:
        """log10 of the scan's intensity averaged over temperature on one plane (float32; NaN where
        the mean is not positive, drawn as black)."""
        info = self.volume_info(volume_path, f"the scan volume {volume_path}")
        plane = self.read(info, (slice(None),) + plane_index(info.shape[1:], axis, index))
        return log_mean(plane)

    def trajectory(self, volume_path: str, voxel: tuple) -> np.ndarray:
        """The scan's intensity at one voxel at every temperature: float64 (T,)."""
        info = self.volume_info(volume_path, f"the scan volume {volume_path}")
        check_voxel(info.shape[1:], voxel)
        return self.read(info, (slice(None),) + tuple(voxel)).astype(np.float64)

    def label_at(self, key: str, voxel: tuple) -> int:
        info = self.volume_info(f"{self.root}/{key}/labels", f"the labels of /{self.root}/{key}")
        check_voxel(info.shape, voxel)
        return int(self.read(info, tuple(voxel)).reshape(()))


# -- pure helpers (shared with the offline writer) ----------------------------------------------


def plane_index(shape: tuple, axis: int, index: int) -> tuple:
    """The index tuple of plane ``index`` across ``axis`` of a volume of ``shape``."""
    if not 0 <= axis < len(shape):
        raise ViewerError(400, f"axis {axis} does not exist in a {len(shape)}-D volume; use 0..{len(shape) - 1}")
    if not 0 <= index < shape[axis]:
        raise ViewerError(400, f"index {index} is outside 0..{shape[axis] - 1} along axis {axis}")
    return tuple(index if a == axis else slice(None) for a in range(len(shape)))


def check_voxel(shape: tuple, voxel: tuple) -> None:
    if len(voxel) != len(shape) or not all(0 <= v < n for v, n in zip(voxel, shape)):
        raise ViewerError(400, f"voxel {tuple(voxel)} is outside the volume of shape {tuple(shape)}")


def log_mean(stack: np.ndarray) -> np.ndarray:
    """(T, *plane) intensities -> log10 of their mean over T, float32 of shape ``plane``;
    NaN where the mean is not positive (log undefined)."""
    mean = np.asarray(stack, dtype=np.float64).mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(mean > 0, np.log10(np.where(mean > 0, mean, 1.0)), np.nan)
    return out.astype(np.float32)


def coordinates(metadata: dict, dims: tuple, shape: tuple) -> dict:
    """Reciprocal-space coordinates (r.l.u.) per spatial axis, when the scan says them.

    Looks for ``coords`` (or ``coordinates``) in ``metadata``: axis name -> list of values, one per
    index, or ``{"start": a, "stop": b}`` (evenly spaced, both ends included), as the NeXus reader
    records them (:class:`xtec_flows.io.nexus.HarmonisedVolume`). Returns name -> [first, step]
    for the axes found with the right length; an axis without coordinates is drawn in indices.
    """
    found = metadata.get("coords") or metadata.get("coordinates") or {}
    out = {}
    for name, n in zip(dims, shape):
        c = found.get(name) if isinstance(found, dict) else None
        if isinstance(c, dict) and "start" in c and "stop" in c and n > 1:
            out[name] = [float(c["start"]), (float(c["stop"]) - float(c["start"])) / (n - 1)]
        elif isinstance(c, (list, tuple)) and len(c) == n and n > 1:
            values = np.asarray(c, dtype=np.float64)
            step = np.diff(values)
            # only an evenly spaced axis can be labelled by first + step (what NeXus grids are)
            if np.allclose(step, step[0], rtol=1e-4, atol=1e-9):
                out[name] = [float(values[0]), float(step[0])]
    return out


def legend(md: dict, counts) -> list[dict]:
    """One entry per colour: ``label``, ``name``, ``n_voxels`` and for classes ``kind``, ``tc``,
    ``tc_err``, ``stable``; for a fixed-K result the cluster index and its voxel count."""
    if md.get("content") == "classes" and md.get("classes"):
        return [{"label": int(c["label"]), "name": f"class {c['label']}: {c.get('kind')}", "kind": c.get("kind"),
                 "n_voxels": c.get("n_voxels"), "tc": c.get("tc"), "tc_err": c.get("tc_err"),
                 "stable": c.get("stable")} for c in md["classes"]]
    counts = list(md.get("counts") or ([] if counts is None else np.asarray(counts).tolist()))
    return [{"label": i, "name": f"cluster {i}", "n_voxels": int(n)} for i, n in enumerate(counts)]


def describe(key: str, md: dict, labels: ArrayInfo, volume: ArrayInfo | None, curves: dict) -> dict:
    """The page's description of a result (JSON-ready).

    labels : the ``labels`` node, shape (L, K, H); volume : the scan's (T, L, K, H) node or None;
    curves : arrays read from the result, ``temperatures`` (T,), ``means`` (K, T) and for classes
    ``class_means_relative`` / ``class_fit_curves`` (C, T).
    """
    spatial = len(labels.shape)
    dims = tuple(labels.dims) if len(labels.dims) == spatial else SPATIAL_DIMS[-spatial:]
    classes = md.get("content") == "classes" and "class_means_relative" in curves
    coords = {}
    for source in (volume.metadata if volume else {}, md):
        coords.update({k: v for k, v in coordinates(source, dims, labels.shape).items() if k not in coords})
    mean_curves = curves.get("class_means_relative" if classes else "means")
    return {
        "key": key,
        "status": md.get("status"),
        "final": md.get("status") in FINAL_STATUSES,
        "error": md.get("error"),
        "content": "classes" if classes else "clusters",
        "source": md.get("source") or {},
        "parameters": md.get("parameters") or {},
        "shape": list(labels.shape),
        "dims": list(dims),
        "coords": coords,
        "volume": None if volume is None else {"path": volume.path, "shape": list(volume.shape)},
        "temperatures": np.asarray(curves.get("temperatures", []), dtype=np.float64).tolist(),
        "legend": legend(md, curves.get("counts")),
        # classes: relative intensity I/<I>_T and its fitted model; fixed K: rescaled means
        "curve_units": "I / <I>_T" if classes else f"rescaled ({(md.get('parameters') or {}).get('rescale', 'mean')})",
        "mean_curves": None if mean_curves is None else np.asarray(mean_curves, dtype=np.float64).tolist(),
        "fit_curves": np.asarray(curves["class_fit_curves"], dtype=np.float64).tolist()
        if classes and "class_fit_curves" in curves else None,
    }


def voxel_curve(trajectory: np.ndarray, description: dict) -> list:
    """The voxel's trajectory (T,) in the units of the result's mean curves: I/<I>_T for classes,
    the result's own rescaling for a fixed-K result (so the two can be drawn on one axis)."""
    from ..numerics.rescale import rescale

    t = np.asarray(trajectory, dtype=np.float64)[np.newaxis]
    if description["content"] == "classes":
        mean = t.mean()
        return (t[0] / mean if mean else np.zeros_like(t[0])).tolist()
    method = description["parameters"].get("rescale", "mean")
    return np.nan_to_num(rescale(t, method)[0]).tolist()
