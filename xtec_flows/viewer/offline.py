"""The viewer's page as ONE self-contained HTML file: no server, no network, data embedded.

A bounded set of slices goes in: every slice of every axis when the volume is small (at most
``all_slices_voxels`` voxels), else the central slice of each axis; and the trajectories of a
subsample of voxels on those slices (every voxel of a small volume, else a regular grid on each
central slice, at most ``max_trajectories_per_slice`` each). A click shows the nearest embedded
voxel, and names it. Intensity is, as in the live viewer, log10 of the scan's volume averaged
over all temperatures.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import numpy as np

from .reader import ArrayInfo, TiledReader, ViewerError, describe, log_mean, plane_index, voxel_curve

ALL_SLICES_VOXELS = 32 ** 3
MAX_TRAJECTORIES_PER_SLICE = 2048


def _b64(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")


class _TiledSource:
    """A result node of a ``tiled.client`` tree, read over the same HTTP API as the live viewer."""

    def __init__(self, node):
        import httpx

        parts = [p for p in node.path_parts if p]
        if len(parts) < 2:
            raise ValueError(f"{node!r} is not a result container (expected <root>/<key>); pass the node of one "
                             "result, e.g. client['xtec'][key]")
        api = node.context.api_uri
        server = str(api).split("/api/v1")[0]
        key = node.context.api_key
        self.http = httpx.Client(base_url=server, headers={"Authorization": f"Apikey {key}"} if key else {},
                                 timeout=120.0, trust_env=False)
        self.reader = TiledReader(self.http, "/".join(parts[:-1]))
        self.key = parts[-1]
        self.whole = None  # (labels, volume) of a small result, read in two requests instead of 2 per slice

    def prefetch(self, desc: dict) -> None:
        labels = self.reader.read(self.reader.array_info(f"{self.reader.root}/{self.key}/labels", "the labels"))
        volume = None
        if desc["volume"] is not None:
            volume = self.reader.read(self.reader.array_info(desc["volume"]["path"], "the scan volume"))
        self.whole = (labels, volume)

    def description(self) -> dict:
        return self.reader.result(self.key)

    def labels(self, axis: int, index: int) -> np.ndarray:
        if self.whole is not None:
            return self.whole[0][plane_index(self.whole[0].shape, axis, index)]
        return self.reader.labels_slice(self.key, axis, index)

    def stack(self, desc: dict, axis: int, index: int) -> np.ndarray | None:
        if self.whole is not None:
            volume = self.whole[1]
            return None if volume is None else volume[(slice(None),) + plane_index(volume.shape[1:], axis, index)]
        if desc["volume"] is None:
            return None
        info = self.reader.array_info(desc["volume"]["path"], "the scan volume")
        return self.reader.read(info, (slice(None),) + plane_index(info.shape[1:], axis, index))

    def close(self) -> None:
        self.http.close()


class _DirectorySource:
    """An ``xtec-flows cluster -o DIR`` output: ``result.json`` and ``labels.zarr``; the scan's volume
    is ``volume`` if given (a (T, L, K, H) array-like), else the run's single zarr input."""

    def __init__(self, directory: Path, volume=None):
        import zarr

        doc_path, labels_path = directory / "result.json", directory / "labels.zarr"
        if not doc_path.is_file() or not labels_path.exists():
            raise ValueError(f"{directory} is not an xtec-flows output directory (needs result.json and "
                             "labels.zarr); pass the -o directory of `xtec-flows cluster` or a Tiled result node")
        self.doc = json.loads(doc_path.read_text())
        self.labels_array = zarr.open_array(str(labels_path), mode="r")
        if volume is None:
            inputs = self.doc.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
            if len(inputs) == 1 and Path(str(inputs[0])).exists() and ":" not in str(inputs[0]):
                from ..io.zarr_io import open_volume

                volume = open_volume(inputs[0])[0]
        if volume is not None and tuple(volume.shape[1:]) != tuple(self.labels_array.shape):
            raise ValueError(f"volume of shape {tuple(volume.shape)} does not match the labels "
                             f"{tuple(self.labels_array.shape)}; pass the (T, *spatial) series that was clustered")
        self.volume = volume
        self.directory = directory

    def description(self) -> dict:
        doc = self.doc
        classes = doc.get("classes") if doc.get("n_classes") else None
        inputs = doc.get("input")
        inputs = ", ".join(map(str, inputs)) if isinstance(inputs, list) else str(inputs)
        md = {"status": "complete", "content": "classes" if classes else None, "classes": classes,
              "counts": doc.get("counts"), "parameters": doc.get("params") or {},
              "source": {"path": inputs, "uid": str(self.directory)}}
        curves = {"temperatures": np.asarray(doc["temperatures"]), "means": np.asarray(doc["means"])}
        if classes:
            curves["class_means_relative"] = np.asarray([c["mean_relative"] for c in classes])
            curves["class_fit_curves"] = np.asarray([c["fit_curve"] for c in classes])
        shape = tuple(self.labels_array.shape)
        labels = ArrayInfo("labels.zarr", shape, np.dtype("int8"), (), {})
        volume = None if self.volume is None else ArrayInfo(inputs, tuple(self.volume.shape),
                                                            np.dtype("float32"), (), {})
        return describe(self.directory.name, md, labels, volume, curves)

    def prefetch(self, desc: dict) -> None:
        pass  # local files: slices are cheap

    def labels(self, axis: int, index: int) -> np.ndarray:
        return np.asarray(self.labels_array[plane_index(self.labels_array.shape, axis, index)], dtype=np.int8)

    def stack(self, desc: dict, axis: int, index: int) -> np.ndarray | None:
        if self.volume is None:
            return None
        return np.asarray(self.volume[(slice(None),) + plane_index(tuple(self.volume.shape[1:]), axis, index)])

    def close(self) -> None:
        pass


def write_offline_view(result_or_dir, path, *, volume=None, all_slices_voxels: int = ALL_SLICES_VOXELS,
                       max_trajectories_per_slice: int = MAX_TRAJECTORIES_PER_SLICE) -> Path:
    """Write the viewer for one result as a single self-contained HTML file at ``path``.

    Parameters
    ----------
    result_or_dir : a result container node of a ``tiled.client`` tree (``client["xtec"][key]``), read
        over Tiled's HTTP API with that client's key; or an ``xtec-flows cluster -o`` directory
    path : the HTML file to write (its directory must exist)
    volume : for a directory, the clustered (T, L, K, H) series when result.json's input cannot be
        opened (a NeXus file, several files); without any volume the slices show labels only
    all_slices_voxels : volumes of at most this many voxels embed every slice of every axis and
        every voxel's trajectory; larger ones the central slice of each axis and a voxel grid on it
    max_trajectories_per_slice : the grid's size bound on each central slice

    Returns the path written. Raises ValueError for an input that is not a result.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"cannot write {path}: directory {path.parent} does not exist; create it first")
    if isinstance(result_or_dir, (str, Path)):
        source = _DirectorySource(Path(result_or_dir), volume)
    elif hasattr(result_or_dir, "path_parts") and hasattr(result_or_dir, "context"):
        source = _TiledSource(result_or_dir)
    else:
        raise TypeError(f"write_offline_view needs a Tiled result node or an output directory; got "
                        f"{type(result_or_dir).__name__}")
    try:
        try:
            desc = source.description()
        except ViewerError as exc:
            raise ValueError(exc.message) from None
        data = _embed(source, desc, all_slices_voxels, max_trajectories_per_slice)
    finally:
        source.close()
    page = (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")
    # "</" inside the JSON would end the <script> element early; "<\/" is the same JSON string.
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    page = page.replace("/*XTEC_CONFIG*/null", '{"mode": "offline", "poll_seconds": 0}')
    page = page.replace('<script>\n"use strict";',
                        f'<script type="application/json" id="xtec-data">{blob}</script>\n<script>\n"use strict";', 1)
    path.write_text(page, encoding="utf-8")
    return path


def _embed(source, desc: dict, all_slices_voxels: int, max_per_slice: int) -> dict:
    """The page's offline data: the description, planes ``"axis:index"`` -> base64 int8 labels and
    float32 log intensity of shape (rows, cols), and trajectories (N voxels, T) with their labels."""
    shape = tuple(desc["shape"])
    small = math.prod(shape) <= all_slices_voxels
    slices = {a: list(range(n)) if small else [n // 2] for a, n in enumerate(shape)}
    if small:
        source.prefetch(desc)
    desc = dict(desc, offline_slices=slices, final=True)
    planes, voxels, raw, voxel_labels = {}, [], [], []
    for axis, indices in slices.items():
        for index in indices:
            labels = source.labels(axis, index)
            stack = source.stack(desc, axis, index)
            inten = log_mean(stack) if stack is not None else np.zeros(labels.shape, np.float32)
            planes[f"{axis}:{index}"] = {"shape": list(labels.shape), "labels": _b64(labels.astype(np.int8)),
                                         "intensity": _b64(inten.astype("<f4"))}
            # every voxel once: a small volume's trajectories all come from the axis-0 planes
            if stack is None or (small and axis != 0):
                continue
            stride = 1 if small else max(1, math.ceil(math.sqrt(labels.size / max_per_slice)))
            rows, cols = np.meshgrid(np.arange(0, labels.shape[0], stride), np.arange(0, labels.shape[1], stride),
                                     indexing="ij")
            for r, c in zip(rows.ravel(), cols.ravel()):
                rc = iter((int(r), int(c)))
                voxels.append([index if a == axis else next(rc) for a in range(len(shape))])
                raw.append(stack[:, r, c])
                voxel_labels.append(int(labels[r, c]))
    T = len(desc["temperatures"])
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, T)
    labels_at = np.asarray(voxel_labels, dtype=np.int8)
    curves = np.asarray([voxel_curve(t, desc) for t in raw], dtype=np.float64).reshape(-1, T)
    return {"result": desc, "planes": planes,
            "trajectories": {"voxels": voxels, "intensity": _b64(raw.astype("<f4")),
                             "curve": _b64(curves.astype("<f4")), "labels": _b64(labels_at)}}

