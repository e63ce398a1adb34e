"""The production stack of deploy/, started from deploy/'s own files for the ``production`` tier.

Only addresses, ports and secrets are overridden (through the environment, as the systemd
units do): Tiled from ``deploy/tiled/config.yml`` with its catalog, authn and table databases
in fresh PostgreSQL databases (created here, dropped at the end) and a Redis streaming cache
(the tests' own ``redis-server`` on a free port, so it can be killed); principals, keys, access-tag
grants and the /raw and /xtec containers made by ``deploy/tiled/bootstrap_access.py all``; the Prefect server on PostgreSQL; a ``dask scheduler``
and two ``dask worker`` processes; ``xtec-flows serve`` pointed at all three.

When PostgreSQL (127.0.0.1:5432) or ``redis-server`` is missing the tier is skipped with a
message, except with ``XTEC_FLOWS_REQUIRE_SERVICES=1`` (``.ci/run`` sets it): then it fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xtec_flows.demo.services import ManagedProcess, PrefectService, ServeService, child_env, executable, free_port
from xtec_flows.io import tiled as tiled_io

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, os.environ.get("XTEC_FLOWS_PG_USER", "postgres")
REQUIRE = os.environ.get("XTEC_FLOWS_REQUIRE_SERVICES") == "1"


def _psql(sql: str, db: str = "postgres") -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-h", PG_HOST, "-p", str(PG_PORT), "-U", PG_USER, "-d", db, "-v",
                           "ON_ERROR_STOP=1", "-q", "-t", "-A", "-c", sql], capture_output=True, text=True, timeout=60)


def missing_services() -> str | None:
    """Why the production tier cannot run here, or None."""
    if shutil.which("psql") is None:
        return "psql is not installed"
    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=2):
            pass
    except OSError as exc:
        return f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT} ({exc})"
    out = _psql("select 1")
    if out.returncode != 0:
        return f"cannot log in to PostgreSQL as {PG_USER}: {out.stderr.strip()[:200]}"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


def require_services() -> None:
    reason = missing_services()
    if reason is None:
        return
    if REQUIRE:
        pytest.fail(f"production tier: {reason} (XTEC_FLOWS_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(f"production tier skipped: {reason}; set XTEC_FLOWS_REQUIRE_SERVICES=1 to make this an error")


class Databases:
    """Fresh PostgreSQL databases with a random suffix; :meth:`drop` removes them all."""

    def __init__(self):
        self.suffix = uuid.uuid4().hex[:8]
        self.names: list[str] = []

    def create(self, role: str) -> str:
        name = f"xtecflows_{role}_{self.suffix}"
        out = _psql(f'CREATE DATABASE "{name}"')
        if out.returncode != 0:
            raise RuntimeError(f"could not create database {name}: {out.stderr}")
        self.names.append(name)
        return name

    def uri(self, name: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    def drop(self) -> None:
        for name in reversed(self.names):
            _psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.clear()

    def terminate_connections(self, name: str) -> int:
        """pg_terminate_backend for every connection to ``name``; returns how many."""
        out = _psql(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{name}' "
                    "AND pid <> pg_backend_pid()")
        return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


class RedisService(ManagedProcess):
    """The tests' own redis-server on a free port (never the machine's)."""

    def __init__(self, directory: Path, port: int | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        argv = [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory)]
        super().__init__("redis", argv, child_env(), self.directory / "redis.log", cwd=self.directory)

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")


class ProductionTiled(ManagedProcess):
    """``tiled serve config deploy/tiled/config.yml`` with its ${VARS} from the environment."""

    start_timeout = 120.0

    def __init__(self, directory: Path, env: dict, port: int | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        argv = [executable("tiled"), "serve", "config", str(DEPLOY / "tiled" / "config.yml"), "--host", "127.0.0.1",
                "--port", str(self.port)]
        super().__init__("tiled-production", argv, child_env(**env), self.directory / "tiled.log", cwd=self.directory)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        from xtec_flows.demo.services import _http_ok

        return _http_ok(f"{self.uri}/healthz")


class DaskScheduler(ManagedProcess):
    def __init__(self, directory: Path):
        self.port = free_port()
        argv = [executable("dask"), "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                "--no-dashboard"]
        super().__init__("dask-scheduler", argv, child_env(), Path(directory) / "dask-scheduler.log")

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return "Scheduler at" in self.log_path.read_text(errors="replace")


class DaskWorker(ManagedProcess):
    def __init__(self, directory: Path, scheduler: str, name: str, env: dict):
        argv = [executable("dask"), "worker", scheduler, "--nthreads", "1", "--memory-limit", "2GiB", "--name", name,
                "--local-directory", str(Path(directory) / f"dask-{name}"), "--no-dashboard",
                "--host", "127.0.0.1"]
        super().__init__(f"dask-worker-{name}", argv, child_env(**env), Path(directory) / f"dask-{name}.log")

    def ready(self) -> bool:
        return "Registered to" in self.log_path.read_text(errors="replace")


@dataclass
class ProductionStack:
    directory: Path
    databases: Databases
    redis: RedisService
    tiled: ProductionTiled
    prefect: PrefectService
    scheduler: DaskScheduler
    workers: list
    serve: ServeService | None
    plugin_key: str
    writer_key: str
    catalog_db: str
    tiled_env: dict = field(default_factory=dict)
    principals: dict = field(default_factory=dict)  # XTEC_FLOWS_PRINCIPAL / BEAMLINE_WRITER_PRINCIPAL: uuids
    processes: list = field(default_factory=list)

    def writer(self):
        return tiled_io.connect(self.tiled.uri, self.writer_key)

    def plugin(self):
        return tiled_io.connect(self.tiled.uri, self.plugin_key)

    def stop(self) -> None:
        for proc in [self.serve, *self.workers, self.scheduler, self.prefect, self.tiled, self.redis]:
            if proc is not None:
                proc.stop()
        self.databases.drop()


def start_production_stack(directory: Path, limit: int = 2, reconcile_seconds: float = 8.0) -> ProductionStack:
    directory = Path(directory)
    dbs = Databases()
    started: list[ManagedProcess] = []
    try:
        catalog, authn, tables, prefect_db = (dbs.create(r) for r in ("catalog", "authn", "tables", "prefect"))
        redis = RedisService(directory / "redis").start()
        started.append(redis)
        admin_password = secrets.token_hex(12)
        (directory / "data").mkdir(parents=True, exist_ok=True)
        (directory / "raw").mkdir(parents=True, exist_ok=True)
        tiled_env = {
            "TILED_ADMIN_PASSWORD": admin_password,
            "TILED_SECRET_KEY": secrets.token_hex(32),
            "TILED_AUTHN_DATABASE_URI": dbs.uri(authn),
            "TILED_CATALOG_DATABASE_URI": dbs.uri(catalog),
            "TILED_TABLES_DATABASE_URI": dbs.uri(tables, "postgresql"),
            "TILED_DATA_DIR": str(directory / "data"),
            "TILED_RAW_HDF5_DIR": str(directory / "raw"),
            "TILED_REDIS_URI": redis.uri,
        }
        tiled = ProductionTiled(directory / "tiled", tiled_env)
        prefect = PrefectService(directory / "prefect",
                                 extra_env={"PREFECT_API_DATABASE_CONNECTION_URL": dbs.uri(prefect_db)})
        for svc in (tiled, prefect):
            svc.launch()
            started.append(svc)
        for svc in (tiled, prefect):
            svc.wait_ready(svc.ready, svc.start_timeout)
        keys = subprocess.run([sys.executable, str(DEPLOY / "tiled" / "bootstrap_access.py"), "all", tiled.uri],
                              env=child_env(**tiled_env), capture_output=True, text=True, timeout=120)
        if keys.returncode != 0:
            raise RuntimeError(f"bootstrap_access.py failed:\n{keys.stderr[-2000:]}")
        values = dict(line.split("=", 1) for line in keys.stdout.split())
        plugin_key, writer_key = values["XTEC_FLOWS_TILED_API_KEY"], values["BEAMLINE_WRITER_TILED_API_KEY"]
        scheduler = DaskScheduler(directory).start()
        started.append(scheduler)
        workers = [DaskWorker(directory, scheduler.address, f"w{i}", {"TILED_API_KEY": plugin_key})
                   for i in range(2)]
        for w in workers:
            w.launch()
            started.append(w)
        for w in workers:
            w.wait_ready(w.ready, 60)
        stack = ProductionStack(directory, dbs, redis, tiled, prefect, scheduler, workers, None, plugin_key,
                                writer_key, catalog, tiled_env,
                                {k: v for k, v in values.items() if k.endswith("_PRINCIPAL")})
        stack.serve = start_production_serve(stack, limit=limit, reconcile_seconds=reconcile_seconds)
        return stack
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        dbs.drop()
        raise


def start_production_serve(stack: ProductionStack, limit: int = 2, reconcile_seconds: float = 8.0) -> ServeService:
    # Polling Prefect every 2 s and catching up every 8 s: each poll and catch-up costs CPU in
    # serve, Prefect and Tiled, which share 2 cores with the flow runs in CI.
    serve = ServeService(stack.directory / "serve", stack.tiled.uri, stack.plugin_key, stack.prefect.api_url,
                         args=["--raw-path", "raw", "-k", "3", "--limit", str(limit), "--query-seconds", "2",
                               "--reconcile-seconds", str(reconcile_seconds), "--reprocess-cron", "",
                               "--dask-address", stack.scheduler.address],
                         extra_env={"TILED_RETRY_ATTEMPTS": "3", "TILED_RETRY_TIMEOUT": "10"})
    return serve.start()
