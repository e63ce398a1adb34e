"""Start and stop the services of an xtec-flows stack as child processes, on 127.0.0.1.

Used by ``xtec-flows demo`` and by the tests: an embedded Tiled server (SQLite catalog, local
zarr storage, DuckDB tables, in-memory streaming cache so websocket subscriptions work), a
Prefect server (SQLite) and the ``xtec-flows serve`` process. Each child runs in its own
process group, so stopping it also stops what it started (the serve process's flow runs);
:meth:`ManagedProcess.stop` sends SIGTERM, then SIGKILL after a grace period.

Secrets reach children only through their environment, never their command line (which
``ps`` shows to every user).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Settings a child must not inherit from the caller's environment.
_DROP_ENV = ("TILED_API_KEY", "TILED_SINGLE_USER_API_KEY", "TILED_PROFILES", "PREFECT_API_URL", "PREFECT_HOME",
             "PREFECT_PROFILE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")

QUIET_PREFECT = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(QUIET_PREFECT)
    env.update({k: str(v) for k, v in extra.items() if v is not None})
    return env


def executable(name: str) -> str:
    """A console script of this Python environment (``tiled``, ``prefect``, ``xtec-flows``)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} is not installed in this environment; run `make demo` (it installs it)")
    return found


class ManagedProcess:
    """A child process with a log file, a readiness check and a clean stop.

    argv : command line (no secrets)
    env : full environment of the child
    ready : ``callable() -> bool``, polled until true (or the child exits, or the timeout)
    """

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, cwd: Path | None = None):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0  # where this launch's lines start in the (appended) log

    #: seconds :meth:`start` waits for :meth:`ready`
    start_timeout = 60.0

    def ready(self) -> bool:
        """Whether the child is up (subclasses check their health endpoint)."""
        return True

    def start(self, timeout: float | None = None) -> ManagedProcess:
        """Launch, then wait until :meth:`ready` (raises with the log tail if it never is)."""
        self.launch()
        self.wait_ready(self.ready, self.start_timeout if timeout is None else timeout)
        return self

    def launch(self) -> ManagedProcess:
        """Start the child without waiting for it (see :meth:`wait_ready`)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A restart appends to the same log: readiness must look only at this launch's lines.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        log.info("started %s (pid %d), log %s", self.name, self.proc.pid, self.log_path)
        return self

    def wait_ready(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.name} exited during start-up (code {code}):\n{self.log_tail()}")
            try:
                if ready():
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def signal(self, sig) -> None:
        """Send ``sig`` to the child's whole process group."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the process group (a crash, for fault tests)."""
        self.signal(signal.SIGKILL)
        self._reap(10)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; also reaps leftovers in the group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s of SIGTERM; killing it", self.name, grace)
        # Children the leader started (flow-run subprocesses) may outlive it: kill the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._reap(10)

    def _reap(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)

    def log_since_launch(self) -> str:
        """What the child has logged since the last :meth:`launch` (the log is appended to)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _http_ok(url: str) -> bool:
    import httpx

    with httpx.Client(trust_env=False, timeout=2.0) as http:
        return http.get(url).status_code == 200


class TiledService(ManagedProcess):
    """``tiled serve config`` with an SQLite catalog, zarr + DuckDB storage and a streaming cache.

    directory : holds config.yml, catalog.db, data/, tables.duckdb and the log
    api_key : single-user key (alphanumeric), passed through the environment
    streaming_cache : "memory" (embedded default), a redis:// URI, or None (no websockets)
    readable : extra directories the server may read (externally registered HDF5)
    """

    def __init__(self, directory, api_key: str, *, port: int | None = None, streaming_cache: str | None = "memory",
                 readable=()):
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.api_key = api_key
        if not api_key.isalnum():
            raise ValueError("the Tiled API key must be alphanumeric (tiled refuses others)")
        self.config_path = self.directory / "config.yml"
        self.config_path.write_text(self.config_text(streaming_cache, readable))
        argv = [executable("tiled"), "serve", "config", str(self.config_path), "--host", "127.0.0.1",
                "--port", str(self.port)]
        env = child_env(TILED_SINGLE_USER_API_KEY=api_key)
        super().__init__("tiled", argv, env, self.directory / "tiled.log", cwd=self.directory)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config_text(self, streaming_cache, readable) -> str:
        d = self.directory
        (d / "data").mkdir(exist_ok=True)
        lines = [
            "# Written by xtec_flows.demo.services: the embedded default (SQLite + local zarr + DuckDB).",
            "# The API key comes from TILED_SINGLE_USER_API_KEY in the environment.",
            "trees:",
            "  - path: /",
            "    tree: xtec_flows.tiled.server:catalog",  # tiled's catalog, guarded (tiled/server.py)
            "    args:",
            f"      uri: sqlite:///{d / 'catalog.db'}",
            f"      writable_storage: [\"{d / 'data'}\", \"duckdb:///{d / 'tables.duckdb'}\"]",
        ]
        if readable:
            lines.append("      readable_storage: [" + ", ".join(f'"{Path(p).resolve()}"' for p in readable) + "]")
        lines.append("      init_if_not_exists: true")
        if streaming_cache:
            lines += ["streaming_cache:", f"  uri: \"{streaming_cache}\"", "  data_ttl: 3600", "  seq_ttl: 3600"]
        return "\n".join(lines) + "\n"

    start_timeout = 90.0

    def ready(self) -> bool:
        return _http_ok(f"{self.uri}/healthz")


class PrefectService(ManagedProcess):
    """``prefect server start`` on 127.0.0.1 with its SQLite database under ``home``.

    argv : another command line for the same server (the production tests start the systemd
        unit's own ExecStart); it must listen on ``port``
    """

    def __init__(self, home, *, port: int | None = None, extra_env: dict | None = None,
                 argv: list[str] | None = None):
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        if argv is None:
            argv = [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
                    "--analytics-off"]
        # extra_env wins (a unit's environment file sets PREFECT_HOME too)
        env = child_env(**{"PREFECT_HOME": str(self.home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
                           "PREFECT_SERVER_API_PORT": str(self.port), **(extra_env or {})})
        super().__init__("prefect-server", argv, env, self.home / "prefect-server.log", cwd=self.home)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    start_timeout = 120.0

    def ready(self) -> bool:
        return _http_ok(f"{self.api_url}/health")


class ServeService(ManagedProcess):
    """``xtec-flows serve`` against a Tiled and a Prefect server.

    argv : the whole command line instead of ``xtec-flows serve --tiled-uri <tiled_uri> *args``
        (the production tests start the systemd unit's own ExecStart, which takes the Tiled URI
        from XTEC_FLOWS_TILED_URI in ``extra_env``)
    """

    def __init__(self, directory, tiled_uri: str, api_key: str, prefect_api_url: str, args=(),
                 extra_env: dict | None = None, argv: list[str] | None = None):
        self.directory = Path(directory).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        if argv is None:
            argv = [executable("xtec-flows"), "serve", "--tiled-uri", tiled_uri, *args]
        elif args:
            raise ValueError("give either argv (a whole command line) or args (added to the default one)")
        # extra_env wins (a unit's environment file sets the key, the API URL and the maps folder too)
        env = child_env(**{"TILED_API_KEY": api_key, "PREFECT_API_URL": prefect_api_url,
                           "PREFECT_HOME": str(self.directory / "prefect-client"),
                           "XTEC_FLOWS_MAPS_DIR": str(self.directory / "maps"), **(extra_env or {})})
        super().__init__("xtec-flows-serve", argv, env, self.directory / "serve.log", cwd=self.directory)

    start_timeout = 120.0

    def ready(self) -> bool:
        # Ready once the watcher has subscribed or fallen back to polling (it logs either);
        # the deployments are registered before the watcher starts.
        text = self.log_since_launch()
        return "subscribed to completed scans" in text or "polling every" in text
