"""Test harness: a real Tiled HTTP server plus Bluesky temperature scans written by TiledWriter.

Plain module (not a conftest): import what you need, e.g. in ``conftest.py``::

    from tiled_support import tiled_server, tiled_client  # noqa: F401  (pytest fixtures)

or use the functions directly::

    with TiledTestServer(tmp_path) as srv:
        c = srv.client()
        uid = run_temperature_scan(c, [20, 80, 140, 200])
        vol = c[uid]["primary"]["volume"].read()          # (4, 16, 16, 16) float32

Facts this module relies on (tiled 0.2.20, bluesky-tiled-plugins 2.0.12, bluesky 1.15.1):

* Several Tiled apps in one Python process share ONE settings object
  (``tiled.server.settings.get_settings`` is cached and ``build_app`` mutates it), so the
  last-built app's API key/public flag wins for all of them. :class:`TiledTestServer` therefore
  refuses to start a second server with a different key in the same process; use one server per
  pytest process (the session fixture :func:`tiled_server`; pytest-xdist workers are separate
  processes, each gets its own server, port and directory).
* The client retries 5xx errors 10 times / 45 s by default. The limits are read from
  ``TILED_RETRY_ATTEMPTS`` / ``TILED_RETRY_TIMEOUT`` when ``tiled.client.utils`` is first
  imported, and read again from that module's globals at every request; this module sets both
  (env and globals) to small values unless they are already set in the environment.
* TiledWriter layout: ``/<uid>`` (BlueskyRun) / ``primary`` (composite container) with the
  real nodes ``<volume_field>`` (array, leading axis = event) and ``internal`` (appendable SQL
  table with ``seq_num, time, <temperature_field>, <temperature_field>_setpoint, ts_*``).
  ``client[uid]["primary"]`` is a composite client; its ``.base`` is the plain container.
* The stored dtype comes from the data key's ``dtype_numpy``; without it TiledWriter stores
  float64, so the simulated detectors advertise ``"<f4"``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Lower the client's retry budget BEFORE tiled.client is imported (the values are read at import
# time); _lower_client_retries() below also patches the module globals in case tiled.client was
# imported first (e.g. by another conftest).
RETRY_ATTEMPTS = int(os.environ.setdefault("TILED_RETRY_ATTEMPTS", "2"))
RETRY_TIMEOUT = float(os.environ.setdefault("TILED_RETRY_TIMEOUT", "5"))

__all__ = [
    "TiledTestServer",
    "start_tiled_server",
    "shared_tiled_server",
    "subscribe_container",
    "run_temperature_scan",
    "ScanFailure",
    "scan_volumes",
    "write_plain_array_node",
    "tiled_server",
    "tiled_client",
    "DEFAULT_API_KEY",
]

DEFAULT_API_KEY = "secret"
STARTUP_TIMEOUT = 60.0  # seconds; the catalog-init subprocess alone takes ~4 s on 2 cores

logger = logging.getLogger(__name__)


def _lower_client_retries() -> None:
    import tiled.client.utils as tcu

    tcu.TILED_RETRY_ATTEMPTS = RETRY_ATTEMPTS
    tcu.TILED_RETRY_TIMEOUT = RETRY_TIMEOUT


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------

_ACTIVE_LOCK = threading.Lock()
_ACTIVE: TiledTestServer | None = None  # the server running in this process, if any


class _LogCapture(logging.Handler):
    """Collects uvicorn/tiled error records during start-up, for the error message."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - only on failure
        try:
            line = record.getMessage()
            if record.exc_info:
                line += "\n" + logging.Formatter().formatException(record.exc_info)
            self.lines.append(line)
        except Exception:
            pass


class TiledTestServer:
    """A real, writable Tiled HTTP server on 127.0.0.1:<free port>, run by uvicorn in a thread.

    Layout under ``directory``::

        catalog.db      SQLite catalog
        data/           writable storage for zarr arrays and parquet tables
        tables.duckdb   writable SQL storage (TiledWriter's appendable ``internal`` tables)
        hdf5/           external HDF5 files (in ``readable_storage``)

    Authentication: single-user API key (not public). A memory streaming cache is enabled so
    websocket subscriptions work.

    Parameters
    ----------
    directory : path; created if missing.
    api_key : alphanumeric string (tiled rejects others at start-up).
    readable : extra directories the server may read external files from (``hdf5_dir`` is
        always included).
    port : TCP port; 0 (default) lets the OS pick a free one (no clashes between xdist workers).
    startup_timeout : seconds to wait for ``/healthz`` before failing.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        api_key: str = DEFAULT_API_KEY,
        *,
        readable: Sequence[str | os.PathLike] = (),
        port: int = 0,
        startup_timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        if not (isinstance(api_key, str) and api_key.isalnum() and api_key.isascii()):
            raise ValueError(f"api_key must be a non-empty alphanumeric string; got {api_key!r}")
        self.directory = Path(directory).resolve()
        self.hdf5_dir = self.directory / "hdf5"
        self.data_dir = self.directory / "data"
        self.catalog_path = self.directory / "catalog.db"
        self.tables_path = self.directory / "tables.duckdb"
        self.api_key = api_key
        self.readable = [self.hdf5_dir, *(Path(p).resolve() for p in readable)]
        self.startup_timeout = startup_timeout
        self.uri: str | None = None
        self.port: int = port
        self._server = None
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None
        self._clients: list[Any] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> TiledTestServer:
        global _ACTIVE
        if self._thread is not None:
            raise RuntimeError("server already started")
        with _ACTIVE_LOCK:
            if _ACTIVE is not None:
                raise RuntimeError(
                    "A Tiled test server is already running in this process. Tiled apps in one "
                    "process share one settings object (the last app's API key wins for all), so "
                    "use a single server per process (the session fixture `tiled_server`)."
                )
            _ACTIVE = self
        try:
            self._start()
        except BaseException:
            with _ACTIVE_LOCK:
                if _ACTIVE is self:
                    _ACTIVE = None
            raise
        return self

    def _build_app(self):
        from tiled.catalog import from_uri as catalog_from_uri
        from tiled.config import Authentication
        from tiled.server.app import build_app

        for d in (self.directory, self.data_dir, self.hdf5_dir, *self.readable):
            d.mkdir(parents=True, exist_ok=True)
        tree = catalog_from_uri(
            f"sqlite:///{self.catalog_path}",
            writable_storage=[self.data_dir, f"duckdb:///{self.tables_path}"],
            readable_storage=[str(p) for p in self.readable],
            init_if_not_exists=True,  # runs `python -m tiled catalog init` in a subprocess
            cache_config={"uri": "memory"},  # websocket subscriptions need a streaming cache
        )
        return build_app(
            tree,
            Authentication(single_user_api_key=self.api_key, allow_anonymous_access=False),
            server_settings={},
        )

    def _start(self) -> None:
        import httpx
        import uvicorn

        _lower_client_retries()
        app = self._build_app()

        class _ThreadedServer(uvicorn.Server):
            def install_signal_handlers(self) -> None:  # signals belong to the main thread
                pass

        # log_config=None: do not let uvicorn call logging.config.dictConfig on the test process.
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
            log_config=None, lifespan="on",
        )
        server = _ThreadedServer(config)
        capture = _LogCapture()
        watched = [logging.getLogger(n) for n in ("uvicorn", "tiled")]  # uvicorn.error propagates
        for lg in watched:
            lg.addHandler(capture)

        def run() -> None:
            try:
                server.run()
            except BaseException as exc:  # surfaced by _fail()
                self._thread_error = exc

        thread = threading.Thread(target=run, name=f"tiled-test-server-{self.directory.name}",
                                  daemon=True)
        self._server, self._thread = server, thread
        thread.start()

        def fail(why: str) -> None:
            details = "\n".join(capture.lines[-20:])
            err = self._thread_error
            self.stop()
            msg = f"Tiled test server in {self.directory} {why}."
            if err is not None:
                msg += f" Server thread raised {err!r}."
            if details:
                msg += f"\nServer log:\n{details}"
            raise RuntimeError(msg) from err

        try:
            deadline = time.monotonic() + self.startup_timeout
            while not server.started:
                if not thread.is_alive():
                    fail("died during start-up")
                if time.monotonic() > deadline:
                    fail(f"did not start listening within {self.startup_timeout} s")
                time.sleep(0.02)
            host, port = server.servers[0].sockets[0].getsockname()[:2]
            self.port = port
            self.uri = f"http://{host}:{port}"
            # uvicorn reports `started` once the lifespan start-up ran; also check the app answers.
            with httpx.Client(trust_env=False) as http:
                while True:
                    if not thread.is_alive():
                        fail("died during start-up")
                    try:
                        if http.get(f"{self.uri}/healthz", timeout=1.0).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if time.monotonic() > deadline:
                        fail(f"did not answer /healthz within {self.startup_timeout} s")
                    time.sleep(0.05)
        finally:
            for lg in watched:
                lg.removeHandler(capture)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server thread (idempotent). Clients made by :meth:`client` are closed."""
        global _ACTIVE
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.context.close()
        self._clients.clear()
        server, thread = self._server, self._thread
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():  # pragma: no cover
                server.force_exit = True
                thread.join(5)
        self._thread = None
        self._server = None
        with _ACTIVE_LOCK:
            if _ACTIVE is self:
                _ACTIVE = None

    def __enter__(self) -> TiledTestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers -----------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def client(self, **kw):
        """``tiled.client.from_uri(self.uri, api_key=self.api_key, **kw)``; closed on stop()."""
        from tiled.client import from_uri

        if not self.alive:
            raise RuntimeError("Tiled test server is not running")
        kw.setdefault("api_key", self.api_key)
        c = from_uri(self.uri, **kw)
        self._clients.append(c)
        return c

    def __repr__(self) -> str:
        return f"<TiledTestServer {self.uri or '(not started)'} dir={self.directory}>"


@contextlib.contextmanager
def start_tiled_server(
    directory: str | os.PathLike, api_key: str = DEFAULT_API_KEY, **kw
) -> Iterator[TiledTestServer]:
    """Context manager: ``with start_tiled_server(tmp) as srv: srv.client()``."""
    with TiledTestServer(directory, api_key, **kw) as srv:
        yield srv


@contextlib.contextmanager
def subscribe_container(container, *, timeout: float = 10.0, start: int | None = None):
    """Open a websocket subscription on ``container`` without risking a hang.

    ``ContainerSubscription.start_in_thread()`` blocks forever if the connection cannot be made
    (e.g. a server without a streaming cache), so it is called in a helper thread and abandoned
    with ``TimeoutError`` after ``timeout`` s. Yields the started subscription; callbacks added
    to ``sub.child_created`` / ``sub.child_metadata_updated`` are held by WEAK reference (keep
    named functions alive). Disconnects on exit.
    """
    sub = container.subscribe()
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            sub.start_in_thread(start=start)
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    t = threading.Thread(target=connect, daemon=True, name="tiled-subscribe-connect")
    t.start()
    t.join(timeout)
    if t.is_alive() or errors:
        with contextlib.suppress(Exception):
            sub.disconnect(wait=False)
        if errors:
            raise errors[0]
        raise TimeoutError(f"websocket subscription to {container.uri} not connected in {timeout} s")
    try:
        yield sub
    finally:
        sub.disconnect()


# --------------------------------------------------------------------------------------------
# Pytest fixtures (plain functions; register them by importing into a conftest)
# --------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

_SHARED: dict[str, Any] = {"server": None, "users": 0}


@contextlib.contextmanager
def shared_tiled_server(tmp_path_factory) -> Iterator[TiledTestServer]:
    """The process-wide test server, started on first use, stopped when the last user leaves.

    Reference-counted so that the ``tiled_server`` fixture may be registered more than once
    (e.g. imported by the main conftest AND by a test module: pytest then makes two fixture
    definitions, but both share this one server instead of colliding).
    """
    with _ACTIVE_LOCK:
        srv = _SHARED["server"]
    if srv is None or not srv.alive:
        directory = tmp_path_factory.mktemp("tiled_server")
        srv = TiledTestServer(directory, DEFAULT_API_KEY,
                              readable=[tmp_path_factory.getbasetemp()]).start()
        _SHARED["server"] = srv
    _SHARED["users"] += 1
    try:
        yield srv
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED["server"] = None
            srv.stop()


if pytest is not None:

    @pytest.fixture(scope="session")
    def tiled_server(tmp_path_factory):
        """One real Tiled server per pytest process (per xdist worker), key ``"secret"``.

        The session's whole base temp directory is in ``readable_storage``, so external files
        written under any ``tmp_path`` (or ``tiled_server.hdf5_dir``) can be registered.
        """
        with shared_tiled_server(tmp_path_factory) as srv:
            yield srv

    @pytest.fixture
    def tiled_client(tiled_server):
        """A fresh root client of the session server for one test."""
        return tiled_server.client()

    @pytest.fixture
    def containers(tiled_client):
        """(root client, a fresh raw-runs container, a fresh results root) for one test."""
        import uuid

        from xtec_flows import tiled as tiled_io

        name = f"t{uuid.uuid4().hex[:10]}"
        raw = tiled_client.create_container(f"raw_{name}")
        root = tiled_io.derived_root(tiled_client, f"res_{name}")
        return tiled_client, raw, root


# --------------------------------------------------------------------------------------------
# Bluesky scans written by TiledWriter
# --------------------------------------------------------------------------------------------


from xtec_flows.demo.beamline import (  # noqa: E402,F401  (re-exported for the tests)
    ScanFailure,
    _caused_by,
    scan_volumes,
)
from xtec_flows.demo.beamline import run_temperature_scan as _run_temperature_scan  # noqa: E402


def run_temperature_scan(client, temperatures, **kw) -> str:
    """:func:`xtec_flows.demo.beamline.run_temperature_scan` with the tests' low client retry budget."""
    _lower_client_retries()
    return _run_temperature_scan(client, temperatures, **kw)


# --------------------------------------------------------------------------------------------
# Plain array nodes
# --------------------------------------------------------------------------------------------


def write_plain_array_node(
    client,
    key: str,
    volume,
    temperatures,
    *,
    dims=("T", "L", "K", "H"),
    chunks=None,
    temperatures_as: str = "metadata",
    metadata: dict | None = None,
) -> str:
    """Write a plain (non-Bluesky) 4-D array node under container ``client``.

    ``temperatures_as="metadata"``: array node ``key`` with metadata
    ``{"temperatures": [...], **metadata}``.
    ``temperatures_as="sibling"``: container ``key`` (metadata ``metadata``) holding the array
    ``data`` (dims ``dims``) and the 1-D array ``temperature`` (dims ``("T",)``).
    ``chunks``: chunk shape of the data array (a tuple of ints, one per axis; dask-style
    normalisation), e.g. ``(1, -1, -1, -1)`` for one chunk per temperature. Zarr needs regular
    chunks, which this guarantees. None: one chunk when ≤100 MB.

    Returns the node's path from the server root, without leading slash (``key`` for the
    array, or the container path for ``"sibling"``).
    """
    vol = np.asarray(volume)
    temps = np.asarray(temperatures, dtype=np.float64)
    if vol.ndim != len(dims):
        raise ValueError(f"volume has {vol.ndim} axes but dims={dims!r}")
    if temps.shape != (vol.shape[0],):
        raise ValueError(f"temperatures shape {temps.shape} != ({vol.shape[0]},)")
    if not key or "/" in key:
        raise ValueError(f"key must be a non-empty single path segment; got {key!r}")
    _lower_client_retries()
    if chunks is not None:
        import dask.array

        data = dask.array.from_array(vol, chunks=chunks)
    else:
        data = vol
    md = dict(metadata or {})
    if temperatures_as == "metadata":
        node = client.write_array(data, key=key, dims=list(dims),
                                  metadata={**md, "temperatures": temps.tolist()})
    elif temperatures_as == "sibling":
        node = client.create_container(key=key, metadata=md)
        node.write_array(data, key="data", dims=list(dims))
        node.write_array(temps, key="temperature", dims=[dims[0]])
    else:
        raise ValueError(f"temperatures_as must be 'metadata' or 'sibling'; got {temperatures_as!r}")
    return "/".join(p for p in node.path_parts if p)
