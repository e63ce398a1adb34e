"""A Tiled server in a child process (``tiled serve catalog``), for fault-injection tests.

Why a subprocess: Tiled apps built in one Python process share one settings object (see
``tiled_support``), and a server that must be *killed* mid-request, or restarted read-only on
the same directories, is most honestly a separate process.

Layout under ``directory`` (the same as :class:`tiled_support.TiledTestServer`)::

    catalog.db      SQLite catalog
    data/           writable (or, read-only, readable) storage for zarr arrays
    tables.duckdb   writable SQL storage (appendable tables)
    server-N.log    stdout+stderr of the N-th start

Usage::

    srv = SubprocessTiledServer(tmp_path / "srv", api_key="abc123").start()
    try:
        c = srv.client()
        ...
        srv.kill()                       # SIGKILL: the server "goes away"
        srv.start(writable=False)        # same dirs, same port if still free, read-only
    finally:
        srv.stop()

Every start waits for ``/healthz``; a server that dies or does not answer within
``startup_timeout`` raises ``RuntimeError`` with the tail of its log. :meth:`stop` and
:meth:`kill` only signal the process group this object started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

STARTUP_TIMEOUT = 60.0

# A child environment without the test process's Tiled client/auth settings or proxies.
_DROP_ENV = ("TILED_API_KEY", "TILED_SINGLE_USER_API_KEY", "TILED_PROFILES", "HTTP_PROXY", "HTTPS_PROXY",
             "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(extra)
    return env


def tiled_executable() -> list[str]:
    exe = Path(sys.executable).with_name("tiled")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tiled"]


class SubprocessTiledServer:
    """``tiled serve catalog`` on 127.0.0.1 in a child process (its own process group)."""

    def __init__(self, directory, api_key: str = "secret", *, startup_timeout: float = STARTUP_TIMEOUT) -> None:
        if not (api_key.isalnum() and api_key.isascii()):
            raise ValueError("tiled requires an alphanumeric API key")
        self.directory = Path(directory).resolve()
        self.data_dir = self.directory / "data"
        self.catalog_path = self.directory / "catalog.db"
        self.tables_path = self.directory / "tables.duckdb"
        self.api_key = api_key
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.writable: bool | None = None
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None
        self._starts = 0
        self._clients: list = []

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        if self.port is None:
            raise RuntimeError("server never started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def argv(self, writable: bool) -> list[str]:
        args = [*tiled_executable(), "serve", "catalog", str(self.catalog_path), "--init",
                "--host", "127.0.0.1", "--port", str(self.port), "--api-key", self.api_key]
        if writable:
            args += ["-w", str(self.data_dir), "-w", f"duckdb:///{self.tables_path}"]
        else:  # no --write at all: tiled serves the catalog read-only
            args += ["-r", str(self.data_dir)]
        return args

    def start(self, *, writable: bool = True, port: int | None = None) -> SubprocessTiledServer:
        """Start (or restart, on the same directories) the server; returns self.

        The port: ``port`` if given, else the previous port when it is free again, else a new
        free one (so a restart usually keeps its URI).
        """
        if self.alive:
            raise RuntimeError("server already running; stop() or kill() it first")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        errors = []
        for attempt in range(3):  # a port picked by free_port() may be taken before we bind it
            if port is not None:
                self.port = port
            elif self.port is None or not port_is_free(self.port) or attempt:
                self.port = free_port()
            try:
                self._start_once(writable)
                return self
            except RuntimeError as exc:
                errors.append(exc)
                if port is not None or "address already in use" not in str(exc).lower():
                    raise
        raise errors[-1]

    def _start_once(self, writable: bool) -> None:
        import httpx

        self._starts += 1
        self.writable = writable
        self.log_path = self.directory / f"server-{self._starts}.log"
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.argv(writable), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=child_env(), cwd=self.directory,
                                         start_new_session=True)
        finally:
            log.close()
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(trust_env=False) as http:
            while True:
                if self.proc.poll() is not None:
                    self._reap()
                    raise RuntimeError(f"tiled server in {self.directory} exited during start-up "
                                       f"(code {self.proc.returncode}):\n{self.log_tail()}")
                try:
                    if http.get(f"{self.uri}/healthz", timeout=1.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"tiled server in {self.directory} did not answer /healthz within "
                                       f"{self.startup_timeout} s:\n{self.log_tail()}")
                time.sleep(0.1)

    def _signal(self, sig) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)  # the group we created (start_new_session=True)

    def _reap(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.context.close()
        self._clients.clear()

    def kill(self) -> None:
        """SIGKILL the server (no clean shutdown) and wait for it to be gone."""
        self._signal(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL); idempotent. Closes clients made by client()."""
        self._reap()
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> SubprocessTiledServer:
        return self if self.alive else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------

    def client(self, **kw):
        from tiled.client import from_uri

        kw.setdefault("api_key", self.api_key)
        c = from_uri(self.uri, **kw)
        self._clients.append(c)
        return c

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def __repr__(self) -> str:
        state = "running" if self.alive else "stopped"
        return f"<SubprocessTiledServer {state} port={self.port} dir={self.directory}>"
