"""Read a Tiled array node straight from its file, when this host can open that file.

A Tiled array node served from a zarr directory or an HDF5 file on a shared file system can be
read without the server: the client shows the node's data source (``node.data_sources()``, one
``read:metadata`` request; the assets' ``data_uri`` is ``file://...``, the parameters hold the
HDF5 dataset path), and reading the file is several times faster than one HTTP request per
block (the server decodes the stored chunks, re-encodes them and sends them over a socket).

:func:`direct_source` decides whether a node can be read directly and returns a
:class:`DirectSource` (a picklable reader of regions in the node's own coordinates) or None.
:func:`direct_array` wraps it as a dask array of the node's shape and dtype, under the policy
``read_mode``:

- ``"auto"``: direct when possible, else None (the caller reads over HTTP);
- ``"http"``: always None;
- ``"direct"``: direct, or :class:`DirectReadUnavailable` saying why not.

What is checked, against the structure Tiled serves (shape, dtype, chunks):

- zarr (format 2 or 3, a ``application/x-zarr`` array at the asset's directory, which is how
  tiled 0.2 writes arrays and how ``tiled register`` and TiledWriter reference them): the same
  dtype; the same shape, or the shape padded to whole chunks (tiled 0.2 creates its zarr
  arrays padded and trims on read); zarr chunks equal to Tiled's first chunk on every axis;
- HDF5 (``application/x-hdf5``, one dataset in one file or concatenated along the first axis
  over several files, as TiledWriter registers detector data): the same dtype, and the
  concatenated shape equal to Tiled's. The file's own chunking is storage layout that Tiled's
  HDF5 adapter does not expose, so it is not compared; Tiled's chunks must tile its shape.

Direct reads stay inside Tiled's access control: before using the file, one element is read
over HTTP (it needs ``read:data`` on the node, as every HTTP block would) and compared with the
file's.

Anything else (another format, several data sources, a non-file URI, HDF5 ``slice`` or
``squeeze`` parameters) is read over HTTP, logged at debug level. A file that does not match,
or that this host cannot read, is logged as a warning. The checks run again in every task
(opening a zarr array reads its small ``zarr.json``; an HDF5 file is opened per task), so a
file that changes after the graph was built is caught too: with ``read_mode="auto"`` that
block is then read over HTTP (with a warning), with ``"direct"`` the task raises.

Only numpy, dask, zarr, h5py and the tiled client, besides this package's :func:`.client.node_path`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from .arrays import read_region
from .client import node_path

log = logging.getLogger(__name__)

READ_MODES = ("auto", "http", "direct")
ZARR_MIMETYPES = ("application/x-zarr",)
HDF5_MIMETYPES = ("application/x-hdf5",)


class DirectReadUnavailable(RuntimeError):
    """``read_mode="direct"`` was asked for but the node cannot be read from its file here.

    Not a ValueError: the scan is fine, this host's view of the storage is not (a mount, a
    permission, a file changed behind Tiled's back), so it is not a permanent failure of the
    input.
    """


class StructureMismatch(DirectReadUnavailable):
    """The file no longer matches the structure Tiled serves for the node."""


def check_read_mode(read_mode: str) -> str:
    if read_mode not in READ_MODES:
        raise ValueError(
            f"read_mode must be one of {READ_MODES} ('auto': read files directly when this host can, "
            f"'http': always through the Tiled server, 'direct': files only); got {read_mode!r}"
        )
    return read_mode


def _native(dtype) -> np.dtype:
    """``dtype`` in native byte order (the values, not the stored bytes, are compared)."""
    dtype = np.dtype(dtype)
    return dtype.newbyteorder("=") if dtype.byteorder not in ("=", "|") else dtype


@dataclass(frozen=True)
class DirectSource:
    """Where and how to read one Tiled array node from its file(s).

    kind : "zarr" or "hdf5"
    paths : file system paths; one zarr directory, or HDF5 files concatenated along axis 0
    shape, dtype, chunks : the structure Tiled serves for the node (dask-style chunks)
    node_path : the node's Tiled path (for messages)
    dataset : the HDF5 dataset path inside every file (None for zarr)
    swmr, locking : HDF5 open options, as the Tiled HDF5 adapter uses them
    """

    kind: str
    paths: tuple
    shape: tuple
    dtype: np.dtype
    chunks: tuple
    node_path: str
    dataset: str | None = None
    swmr: bool = False
    locking: object = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    # -- opening and checking ----------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`StructureMismatch` (or OSError) unless the file matches the structure."""
        if self.kind == "zarr":
            self._check_zarr(self._open_zarr())
        else:
            self._scan_hdf5()

    def _mismatch(self, what: str) -> StructureMismatch:
        where = self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"
        return StructureMismatch(
            f"{self.kind} file {where} behind Tiled node {self.node_path} does not match the structure Tiled "
            f"serves: {what}. The file changed after it was registered (or Tiled's record is stale); "
            "read over HTTP (read_mode='auto' or 'http'), or re-register the node"
        )

    def _open_zarr(self):
        import zarr

        return zarr.open_array(store=str(self.paths[0]), mode="r")

    def _check_zarr(self, arr) -> None:
        if _native(arr.dtype) != _native(self.dtype):
            raise self._mismatch(f"dtype {arr.dtype} in the file, {self.dtype} in Tiled")
        padded = tuple(c[0] * len(c) if c else 0 for c in self.chunks)
        if tuple(arr.shape) not in (self.shape, padded):
            raise self._mismatch(f"shape {tuple(arr.shape)} in the file, {self.shape} in Tiled")
        first = tuple(c[0] if c else 0 for c in self.chunks)
        if tuple(arr.chunks) != first:
            raise self._mismatch(f"chunks {tuple(arr.chunks)} in the file, {first} in Tiled")

    def _open_hdf5(self, path):
        import h5py

        kw = {"swmr": True, "libver": "latest"} if self.swmr else {}
        if self.locking is not None:
            kw["locking"] = self.locking
        return h5py.File(path, "r", **kw)

    def _scan_hdf5(self, region: tuple | None = None) -> list:
        """Check every file; with ``region``, also read its rows of ``region`` (one open per file).

        Returns the parts read, in order (empty without ``region``).
        """
        parts, start = [], 0
        for path in self.paths:
            with self._open_hdf5(path) as f:
                if self.dataset not in f:
                    raise self._mismatch(f"{path} has no dataset {self.dataset!r}")
                ds = f[self.dataset]
                if _native(ds.dtype) != _native(self.dtype):
                    raise self._mismatch(f"dtype {ds.dtype} in {path}, {self.dtype} in Tiled")
                if ds.ndim != self.ndim or tuple(ds.shape[1:]) != self.shape[1:]:
                    raise self._mismatch(f"shape {tuple(ds.shape)} in {path}, {self.shape} in Tiled")
                stop = start + ds.shape[0]
                if region is not None:
                    lo, hi = max(region[0].start, start), min(region[0].stop, stop)
                    if lo < hi:
                        parts.append(ds[(slice(lo - start, hi - start), *region[1:])])
                start = stop
        if start != self.shape[0]:
            raise self._mismatch(f"{start} rows along axis 0 in the file(s), {self.shape[0]} in Tiled")
        return parts

    # -- reading -----------------------------------------------------------------------------

    def read(self, region: tuple) -> np.ndarray:
        """The values of ``region`` (a tuple of slices with explicit bounds, in Tiled's coordinates)."""
        if self.kind == "zarr":
            arr = self._open_zarr()
            self._check_zarr(arr)
            out = arr[region]
        else:
            out = self._read_hdf5(region)
        expected = tuple(s.stop - s.start for s in region)
        out = np.asarray(out)
        if out.shape != expected:  # the file shrank between the check and the read
            raise self._mismatch(f"region {region} read back with shape {out.shape}, expected {expected}")
        return out.astype(self.dtype, copy=False)

    def _read_hdf5(self, region: tuple) -> np.ndarray:
        parts = self._scan_hdf5(region)
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return np.empty(tuple(s.stop - s.start for s in region), dtype=self.dtype)
        return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------------
# deciding
# ---------------------------------------------------------------------------------------------


def _structure(node):
    st = node.structure()
    shape = tuple(int(s) for s in st.shape)
    dtype = np.dtype(st.data_type.to_numpy_dtype())
    chunks = tuple(tuple(int(c) for c in ch) for ch in st.chunks)
    return shape, dtype, chunks


def _file_paths(assets, parameter: str | None) -> list:
    from urllib.parse import urlparse

    from tiled.utils import path_from_uri

    chosen = [a for a in assets if parameter is None or a.parameter == parameter] or list(assets[:1])
    chosen.sort(key=lambda a: (a.num is None, a.num or 0))
    paths = []
    for a in chosen:
        if urlparse(a.data_uri).scheme != "file":
            return []
        paths.append(str(path_from_uri(a.data_uri)))
    return paths


def _why_not(node) -> tuple[DirectSource | None, str | StructureMismatch, bool]:
    """(source, reason, is_warning): the source when direct reads are possible, else why not.

    The reason is a :class:`StructureMismatch` (not raised) when the file does not match.
    """
    label = node_path(node)
    if getattr(node, "structure_family", None) != "array":
        return None, f"{label} is not an array node", False
    try:
        sources = node.data_sources()
    except Exception as exc:  # an older server, or a node inside an adapter: nothing to read directly
        return None, f"{label}: the server did not give its data sources ({type(exc).__name__}: {exc})", False
    if not sources:
        return None, f"{label} has no data sources the client can see (served by an adapter)", False
    if len(sources) != 1:
        return None, f"{label} has {len(sources)} data sources; direct reads handle one", False
    ds = sources[0]
    mimetype = (ds.mimetype or "").split(";")[0].strip()
    params = dict(ds.parameters or {})
    if mimetype in ZARR_MIMETYPES:
        kind, parameter = "zarr", "data_uri"
    elif mimetype in HDF5_MIMETYPES:
        kind, parameter = "hdf5", "data_uris"
        if params.get("slice") or params.get("squeeze"):
            return None, f"{label}: HDF5 'slice'/'squeeze' parameters are not supported for direct reads", False
        if not params.get("dataset"):
            return None, f"{label}: HDF5 data source names no dataset", False
    else:
        return None, f"{label} is stored as {ds.mimetype!r}; direct reads handle zarr and HDF5", False
    if not ds.assets:
        return None, f"{label}: its data source has no assets", False
    paths = _file_paths(ds.assets, parameter)
    if not paths:
        return None, f"{label} is stored at {ds.assets[0].data_uri!r}, not a file:// URI", False
    if kind == "zarr" and len(paths) != 1:
        return None, f"{label}: a zarr data source with {len(paths)} assets", False
    for p in paths:
        if not os.access(p, os.R_OK):
            return None, (f"{label} is stored in {p}, which this host cannot read (not mounted here, or no "
                          "permission); mount the storage at the same path to read it directly"), True
    shape, dtype, chunks = _structure(node)
    if tuple(sum(c) for c in chunks) != shape:
        return None, f"{label}: Tiled's chunks {chunks} do not tile its shape {shape}", True
    src = DirectSource(kind=kind, paths=tuple(paths), shape=shape, dtype=dtype, chunks=chunks, node_path=label,
                       dataset=params.get("dataset"), swmr=bool(params.get("swmr", False)),
                       locking=params.get("locking"))
    try:
        src.check()
    except StructureMismatch as exc:
        return None, exc, True
    except (OSError, ValueError, KeyError) as exc:  # unreadable, or not zarr/HDF5 after all (zarr's are ValueErrors)
        return None, f"{label}: cannot open {paths[0]} as {kind} ({type(exc).__name__}: {exc})", True
    return _probe(node, src)


def _probe(node, src: DirectSource) -> tuple[DirectSource | None, str | StructureMismatch, bool]:
    """Read one element over HTTP and from the file: they must agree.

    The HTTP read is what keeps direct reads inside Tiled's access control: the data sources
    need only ``read:metadata``, the file only file-system permission, so without it a key
    Tiled refuses data to could still read the file. It also catches a file whose values
    changed at an unchanged structure, at one element's cost (one small request).
    """
    if 0 in src.shape:
        return src, "", False
    first = tuple(slice(0, 1) for _ in src.shape)
    try:
        served = np.asarray(node.read(slice=first))
    except Exception as exc:  # denied, or the server failing: the HTTP path will report it
        return None, f"{src.node_path}: the server did not serve one element ({type(exc).__name__}: {exc})", True
    try:
        stored = src.read(first)
    except (DirectReadUnavailable, OSError, ValueError, KeyError) as exc:
        return None, f"{src.node_path}: reading {src.paths[0]} failed ({type(exc).__name__}: {exc})", True
    if served.tobytes() != stored.astype(served.dtype, copy=False).tobytes():
        return None, src._mismatch(f"element {(0,) * src.ndim} is {stored.ravel()[0]!r} in the file, "
                                   f"{served.ravel()[0]!r} from Tiled"), True
    return src, "", False


def direct_source(node) -> DirectSource | None:
    """A :class:`DirectSource` for a Tiled array node, or None when it must be read over HTTP.

    Why not is logged: at debug level when the node is simply not file-backed (another format,
    a remote store), as a warning when it is but the file cannot be read here or does not match.
    """
    src, reason, warn = _why_not(node)
    if src is None:
        (log.warning if warn else log.debug)("reading %s over HTTP: %s", node_path(node), reason)
    return src


# ---------------------------------------------------------------------------------------------
# dask
# ---------------------------------------------------------------------------------------------


def _zarr_errors() -> type:
    from zarr.errors import BaseZarrError

    return BaseZarrError


def _bounding_region(key, shape: tuple) -> tuple[tuple, tuple]:
    """(region, within): unit-step slices covering numpy index ``key``, and ``key`` relative to them."""
    if not isinstance(key, tuple):
        key = (key,)
    if any(k is Ellipsis for k in key):
        i = next(j for j, k in enumerate(key) if k is Ellipsis)
        key = key[:i] + (slice(None),) * (len(shape) - len(key) + 1) + key[i + 1:]
    key = key + (slice(None),) * (len(shape) - len(key))
    region, within = [], []
    for k, n in zip(key, shape):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step > 0 and stop > start:
                region.append(slice(start, stop))
                within.append(slice(0, stop - start, step))
            elif step > 0:  # empty
                region.append(slice(start, start))
                within.append(slice(None))
            else:  # negative step: read the whole axis, index it as asked
                region.append(slice(0, n))
                within.append(k)
        elif isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            region.append(slice(i, i + 1))
            within.append(0)
        else:  # an integer or boolean array: read the whole axis
            region.append(slice(0, n))
            within.append(k)
    return tuple(region), tuple(within)


class _BlockReader:
    """Array-like over a :class:`DirectSource` for ``dask.array.from_array``.

    With ``fallback`` (a Tiled array client) a region whose file read fails is read over
    HTTP instead, with a warning: a graph built in "auto" mode never fails because the file
    changed under it.
    """

    def __init__(self, source: DirectSource, fallback=None) -> None:
        self.source = source
        self.fallback = fallback
        self.shape = source.shape
        self.dtype = source.dtype
        self.ndim = source.ndim

    def __dask_tokenize__(self):
        s = self.source
        return ("xtec-direct", s.kind, s.paths, s.dataset, s.shape, str(s.dtype), self.fallback is not None)

    def __getitem__(self, key):
        # dask fuses later slicing into this call, so ``key`` may hold integers and steps:
        # read the bounding box of ``key`` (unit steps), then index that.
        region, within = _bounding_region(key, self.shape)
        return self._read(region)[within]

    def _read(self, region):
        try:
            return self.source.read(region)
        except (DirectReadUnavailable, OSError, KeyError, _zarr_errors()) as exc:
            if self.fallback is None:
                if isinstance(exc, DirectReadUnavailable):
                    raise
                raise DirectReadUnavailable(
                    f"reading {self.source.node_path} from {self.source.paths[0]} failed "
                    f"({type(exc).__name__}: {exc}); use read_mode='auto' to fall back to HTTP"
                ) from exc
            log.warning("reading region %s of %s over HTTP: %s", region, self.source.node_path, exc)
            return read_region(self.fallback, region).astype(self.dtype, copy=False)


def direct_array(node, chunks, read_mode: str = "auto"):
    """A dask array over a Tiled array node whose blocks read its file, or None (read over HTTP).

    Parameters
    ----------
    node : tiled ArrayClient
    chunks : dask-style chunks of the result (any that dask accepts for the node's shape)
    read_mode : "auto" (direct when possible, else None), "http" (always None) or "direct"
        (direct, else :class:`DirectReadUnavailable` with the reason and the remedy)

    Returns
    -------
    dask.array.Array of the node's shape and dtype, or None
    """
    check_read_mode(read_mode)
    if read_mode == "http":
        return None
    src, reason, warn = _why_not(node)
    if src is None:
        if read_mode == "direct":
            if isinstance(reason, StructureMismatch):
                raise StructureMismatch(f"read_mode='direct': {reason}")
            raise DirectReadUnavailable(
                f"read_mode='direct' cannot be honoured: {reason}. Use read_mode='auto' to fall back to HTTP"
            )
        (log.warning if warn else log.debug)("reading %s over HTTP: %s", node_path(node), reason)
        return None
    import dask.array as da
    from dask.base import tokenize

    reader = _BlockReader(src, fallback=node if read_mode == "auto" else None)
    log.debug("reading %s directly from %s %s", src.node_path, src.kind, src.paths[0])
    return da.from_array(reader, chunks=chunks, asarray=False, lock=False,
                         meta=np.empty((0,) * src.ndim, dtype=src.dtype),
                         name=f"tiled-direct-{tokenize(reader, chunks)}")
