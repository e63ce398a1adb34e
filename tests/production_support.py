"""The production stack of deploy/, started from deploy/'s own files for the ``production`` tier.

Every long-running process is started from its systemd unit in ``deploy/systemd`` (see
:func:`unit_command`): the unit's ``ExecStart=`` with its ``EnvironmentFile=`` (the ``*.env.example``
next to the unit, or ``deploy/tiled/tiled.env.example``) and ``WorkingDirectory=``, overriding only
addresses, ports, local directories and secrets through small explicit mappings that fail when
they target something the unit does not contain. Tiled (``tiled.service``, ``deploy/tiled/config.yml``)
with its catalog, authn and table databases in fresh PostgreSQL databases (created here, dropped at
the end) and a Redis streaming cache (the tests' own ``redis-server`` on a free port, so it can be
killed); principals, keys, access-tag grants and the /raw and /xtec containers made by
``deploy/tiled/bootstrap_access.py all``; the Prefect server on PostgreSQL (``prefect-server.service``);
a Dask scheduler and two workers (``dask-scheduler.service``, ``dask-worker@1``, ``dask-worker@2``);
``xtec-flows serve`` (``xtec-flows-serve.service``) pointed at all of them. ``tiled-multiprocess.service``
(:class:`ProductionTiled` with ``processes``) is started by the test that needs it.

When PostgreSQL (127.0.0.1:5432) or ``redis-server`` is missing the tier is skipped with a
message, except with ``XTEC_FLOWS_REQUIRE_SERVICES=1`` (``.ci/run`` sets it): then it fails.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from xtec_flows.demo.services import ManagedProcess, PrefectService, ServeService, child_env, executable, free_port
from xtec_flows import tiled as tiled_io

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, os.environ.get("XTEC_FLOWS_PG_USER", "postgres")
REQUIRE = os.environ.get("XTEC_FLOWS_REQUIRE_SERVICES") == "1"
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------------------------------
# deploy/systemd: what systemd would run, on this checkout
# ---------------------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"
#: Where deploy/README.md installs the checkout (its venv, the pull step of prefect.yaml).
INSTALL_ROOT = "/opt/xtec-flows"
#: Files a facility copies to /etc/xtec-flows, and where they are in this checkout.
INSTALLED_FILES = {"/etc/xtec-flows/tiled.yml": DEPLOY / "tiled" / "config.yml",
                   # The Dask workers' configuration directory (DASK_CONFIG), read from the install's checkout.
                   f"{INSTALL_ROOT}/deploy/dask": DEPLOY / "dask"}
#: A unit's EnvironmentFile= and the example it is filled from.
ENVIRONMENT_FILE_EXAMPLES = {
    "/etc/xtec-flows/tiled.env": DEPLOY / "tiled" / "tiled.env.example",
    "/etc/xtec-flows/xtec-flows.env": SYSTEMD / "xtec-flows.env.example",
    "/etc/xtec-flows/prefect-server.env": SYSTEMD / "prefect-server.env.example",
}
# A process started with one of these (a facility's path, a placeholder secret or host, all
# interfaces) would not be the test's: the test has to override it, so a unit or example gaining
# one breaks the test.
FACILITY_PATHS = ("/opt/", "/etc/", "/var/", "/data/")
FACILITY_VALUES = ("change-me", "paste-", "-host:", "0.0.0.0")


class UnitMismatch(AssertionError):
    """The test's overrides no longer fit what deploy/ says (a unit or example changed)."""


@dataclass(frozen=True)
class UnitCommand:
    """One systemd unit's process, mapped onto this checkout.

    argv : ExecStart= with the venv, installed files and specifiers mapped, overrides applied,
        then the test-only arguments
    env : the EnvironmentFile(s) parsed, with overrides and test-only additions (to be laid over
        :func:`child_env`)
    working_directory : the override of the unit's WorkingDirectory= (None if it has none)
    """

    unit: str
    argv: list
    env: dict
    working_directory: Path | None


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {directive: [values in order]}} (comments and continuations handled)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        if current is None or not sep:
            raise UnitMismatch(f"{path.name}: cannot read the line {raw!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def read_environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (comments skipped, quotes removed)."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise UnitMismatch(f"{path}: not a KEY=VALUE line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def _expand_specifiers(text: str, unit: str, instance: str | None) -> str:
    def expand(match):
        letter = match.group(1)
        if letter == "%":
            return "%"
        if letter == "i" and instance is not None:
            return instance
        if letter == "H":
            return socket.gethostname()
        raise UnitMismatch(f"{unit}: the test does not know what %{letter} stands for here")

    return re.sub(r"%(.)", expand, text)


def _map_installed(token: str) -> str:
    """/opt/xtec-flows/.venv/bin/X -> this venv's X; an installed config file -> deploy/'s file."""
    venv_bin = f"{INSTALL_ROOT}/.venv/bin/"
    if token.startswith(venv_bin):
        return executable(token[len(venv_bin):])
    return str(INSTALLED_FILES.get(token, token))


def _facility_values(unit: str, what: str, values: Mapping[str, str]) -> None:
    for name, value in values.items():
        if value.startswith(FACILITY_PATHS) or any(v in value for v in FACILITY_VALUES):
            raise UnitMismatch(f"{unit}: {what} {name} is {value!r}, a facility's path, host or placeholder; "
                               "the test must override it")


def environment(unit: str, files: Sequence[str], overrides: Mapping[str, str] = {},
                test_only: Mapping[str, str] = {}) -> dict[str, str]:
    """The environment systemd gives ``unit`` from its EnvironmentFile(s) (the examples in deploy/).

    overrides : values of variables the files set (addresses, secrets, local directories); a
        variable the files do not set raises
    test_only : variables the files do not set, added for the test (one the files set raises:
        it would be a hidden override)
    """
    env: dict[str, str] = {}
    for name in files:
        example = ENVIRONMENT_FILE_EXAMPLES.get(name.lstrip("-"))
        if example is None:
            raise UnitMismatch(f"{unit}: EnvironmentFile={name} has no example in deploy/ the test knows of")
        env.update(read_environment_file(example))
    for key in overrides:
        if key not in env:
            raise UnitMismatch(f"{unit}: the test overrides {key}, but its EnvironmentFile {list(files)} does not "
                               "set it")
    for key in test_only:
        if key in env:
            raise UnitMismatch(f"{unit}: {key} is set by its EnvironmentFile {list(files)}; override it instead "
                               "of adding it as test-only")
    env.update({k: str(v) for k, v in overrides.items()})
    _facility_values(unit, "the environment variable", env)
    env.update({k: str(v) for k, v in test_only.items()})
    return env


def unit_command(unit: str, *, instance: str | None = None, overrides: Mapping[str, str] = {},
                 env: Mapping[str, str] = {}, working_directory: Path | None = None,
                 test_only_args: Sequence[str] = (), test_only_env: Mapping[str, str] = {}) -> UnitCommand:
    """What ``deploy/systemd/<unit>`` starts, with the test's overrides.

    instance : %i of a template unit (``dask-worker@.service`` -> "1")
    overrides : argument -> replacement in ExecStart=; an option ("--port") has the value after it
        replaced, any other argument ("tcp://dask-scheduler:8786") is replaced itself. An
        argument the unit does not have (exactly once) raises :class:`UnitMismatch`.
    env : overrides of variables its EnvironmentFile sets (see :func:`environment`)
    working_directory : replaces WorkingDirectory= (required if the unit has one, refused if not)
    test_only_args, test_only_env : what the tests need beyond the unit, appended after its
        argv / added to its environment; an option the unit already has raises
    """
    name = unit.replace("@.", f"@{instance}.") if instance is not None else unit
    service = read_unit(SYSTEMD / unit).get("Service", {})
    exec_starts = service.get("ExecStart", [])
    if len(exec_starts) != 1:
        raise UnitMismatch(f"{name}: {len(exec_starts)} ExecStart= lines; the test runs exactly one")
    (exec_start,) = exec_starts
    if exec_start[:1] in "-@:+!":
        raise UnitMismatch(f"{name}: the test does not emulate the ExecStart prefix {exec_start[0]!r}")
    argv = [_map_installed(token) for token in shlex.split(_expand_specifiers(exec_start, name, instance))]
    for target, replacement in overrides.items():
        hits = [i for i, token in enumerate(argv) if token == target]
        if len(hits) != 1 or (target.startswith("-") and hits[0] + 1 >= len(argv)):
            raise UnitMismatch(f"{name}: the test overrides {target!r}, but ExecStart= has it {len(hits)} times "
                               f"(or without a value): {exec_start}")
        argv[hits[0] + 1 if target.startswith("-") else hits[0]] = str(replacement)
    _facility_values(name, "ExecStart= argument", {f"#{i}": token for i, token in enumerate(argv)})
    for token in test_only_args:
        if token.startswith("-") and token.split("=")[0] in argv:
            raise UnitMismatch(f"{name}: ExecStart= already has {token}; override it instead of adding it")
    directories = service.get("WorkingDirectory", [])
    if bool(directories) != (working_directory is not None):
        raise UnitMismatch(f"{name}: WorkingDirectory= is {directories or 'not set'}, but the test gives "
                           f"{working_directory or 'no directory'} for it")
    files = [_expand_specifiers(f, name, instance) for f in service.get("EnvironmentFile", [])]
    # systemd reads Environment= first and lets EnvironmentFile= override it; its values may name
    # installed files (TILED_CONFIG=/etc/xtec-flows/tiled.yml), mapped like ExecStart='s.
    assignments = [token for line in service.get("Environment", [])
                   for token in shlex.split(_expand_specifiers(line, name, instance))]
    if any("=" not in a for a in assignments):
        raise UnitMismatch(f"{name}: an Environment= token is not KEY=VALUE: {assignments}")
    unit_env = {key: _map_installed(value) for key, _, value in (a.partition("=") for a in assignments)}
    _facility_values(name, "Environment= variable", unit_env)
    hidden = sorted(set(unit_env) & (set(env) | set(test_only_env)))
    if hidden:
        raise UnitMismatch(f"{name}: the test would replace {hidden}, which its Environment= sets "
                           "(only EnvironmentFile= variables are overridden)")
    return UnitCommand(name, argv + [str(t) for t in test_only_args],
                       {**unit_env, **environment(name, files, env, test_only_env)}, working_directory)


def facility_commands(path: Path) -> list[list[str]]:
    """The ``prefect ...`` and ``xtec-flows ...`` commands the comment at the top of a deploy/ file
    tells a facility to run (its indented command lines, ``#   prefect ...``)."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if re.match(r"#\s{2,}(prefect|xtec-flows) ", line):
            commands.append(shlex.split(line[1:], comments=True))
    return commands


def map_install_root(value):
    """``value`` (JSON: a deployment's pull steps) with INSTALL_ROOT and the paths below it moved to
    this checkout; raises :class:`UnitMismatch` when nothing in it names INSTALL_ROOT."""
    mapped = []

    def walk(item):
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, list):
            return [walk(v) for v in item]
        if isinstance(item, str) and (item == INSTALL_ROOT or item.startswith(INSTALL_ROOT + "/")):
            mapped.append(item)
            return str(REPO) + item[len(INSTALL_ROOT):]
        return item

    result = walk(value)
    if not mapped:
        raise UnitMismatch(f"nothing in {value!r} names {INSTALL_ROOT}, which the test maps to {REPO}")
    return result


def plugin_environment(tiled_uri: str, plugin_key: str, prefect_api_url: str, maps_dir: Path) -> dict:
    """Overrides of xtec-flows.env (serve, Dask workers, Prefect workers): addresses, the key, a directory."""
    return {"XTEC_FLOWS_TILED_URI": tiled_uri, "TILED_API_KEY": plugin_key, "PREFECT_API_URL": prefect_api_url,
            "XTEC_FLOWS_MAPS_DIR": str(maps_dir)}


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
    """tiled.service: ``tiled serve config deploy/tiled/config.yml`` with its ${VARS} from tiled.env.

    env : the test's values of tiled.env's variables (databases, secrets, directories, Redis)
    processes : None for tiled.service (one process); a number for tiled-multiprocess.service,
        the same configuration served by that many uvicorn worker processes
    """

    start_timeout = 120.0

    def __init__(self, directory: Path, env: dict, port: int | None = None, processes: int | None = None):
        self.directory = Path(directory)
        self.port = port or free_port()
        self.processes = processes
        overrides = {"--host": LOOPBACK, "--port": str(self.port)}
        if processes is not None:
            overrides["--workers"] = str(processes)
        unit = unit_command("tiled.service" if processes is None else "tiled-multiprocess.service",
                            overrides=overrides, env=env)
        name = "tiled-production" if processes is None else "tiled-multiprocess"
        super().__init__(name, unit.argv, child_env(**unit.env), self.directory / f"{name}.log", cwd=self.directory)

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def server_processes(self) -> list:
        """The uvicorn worker processes serving requests (psutil.Process; empty for tiled.service)."""
        import psutil

        if self.processes is None or not self.alive:
            return []
        # multiprocessing's spawned children; its resource tracker is a child too, but serves nothing,
        # and a killed one stays a zombie until the supervisor reaps it
        serving = []
        for child in psutil.Process(self.pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
                    serving.append(child)
            except psutil.Error:
                pass
        return serving

    def ready(self) -> bool:
        from xtec_flows.demo.services import _http_ok

        if self.processes is not None:  # every server process has started its application
            if self.log_since_launch().count("Application startup complete") < self.processes:
                return False
        return _http_ok(f"{self.uri}/healthz")


class DaskScheduler(ManagedProcess):
    """dask-scheduler.service on loopback, on free ports."""

    def __init__(self, directory: Path):
        self.port = free_port()
        unit = unit_command("dask-scheduler.service", overrides={
            "--host": LOOPBACK, "--port": str(self.port), "--dashboard-address": f"{LOOPBACK}:{free_port()}"})
        super().__init__("dask-scheduler", unit.argv, child_env(**unit.env), Path(directory) / "dask-scheduler.log")

    @property
    def address(self) -> str:
        return f"tcp://{LOOPBACK}:{self.port}"

    def ready(self) -> bool:
        return "Scheduler at" in self.log_since_launch()


class DaskWorker(ManagedProcess):
    """dask-worker@<instance>.service against the test's scheduler.

    env : overrides of xtec-flows.env (the unit's EnvironmentFile: the workers read scans with the
        plugin's key), see :func:`plugin_environment`
    """

    def __init__(self, directory: Path, scheduler: str, instance: int, env: dict):
        unit = unit_command(
            "dask-worker@.service", instance=str(instance),
            overrides={
                "tcp://dask-scheduler:8786": scheduler,
                # Lowered for the 2-core CI machine, where two workers share the cores with Tiled,
                # Prefect, serve and the flow runs (the unit sizes one worker per host or NUMA node).
                "--nthreads": "1",
                "--memory-limit": "2GiB",
                "--local-directory": str(Path(directory) / f"dask-worker-{instance}"),
            },
            env=env,
            # The unit listens on the host's address for workers on other hosts; the test binds to
            # loopback only, on a shared machine.
            test_only_args=["--host", LOOPBACK])
        name = unit.unit.removesuffix(".service")  # dask-worker@1
        super().__init__(name, unit.argv, child_env(**unit.env), Path(directory) / f"{name}.log")

    def ready(self) -> bool:
        return "Registered to" in self.log_since_launch()


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


@dataclass
class TiledTier:
    """Tiled as deploy/ runs it: its Redis, its server process, tiled.env's values, the catalog database."""

    redis: RedisService
    tiled: ProductionTiled
    env: dict
    catalog_db: str


def launch_production_tiled(directory: Path, dbs: Databases, started: list) -> TiledTier:
    """Fresh catalog, authn and table databases, the tests' own Redis (started), and tiled.service
    launched on them (not waited for: see ``TiledTier.tiled.wait_ready``); what was started is
    appended to ``started``, for the caller to stop."""
    directory = Path(directory)
    catalog, authn, tables = (dbs.create(r) for r in ("catalog", "authn", "tables"))
    redis = RedisService(directory / "redis").start()
    started.append(redis)
    (directory / "data").mkdir(parents=True, exist_ok=True)
    (directory / "raw").mkdir(parents=True, exist_ok=True)
    tiled_env = {
        "TILED_ADMIN_PASSWORD": secrets.token_hex(12),
        "TILED_SECRET_KEY": secrets.token_hex(32),
        "TILED_AUTHN_DATABASE_URI": dbs.uri(authn),
        "TILED_CATALOG_DATABASE_URI": dbs.uri(catalog),
        "TILED_TABLES_DATABASE_URI": dbs.uri(tables, "postgresql"),
        "TILED_DATA_DIR": str(directory / "data"),
        "TILED_RAW_HDF5_DIR": str(directory / "raw"),
        "TILED_REDIS_URI": redis.uri,
    }
    tiled = ProductionTiled(directory / "tiled", tiled_env)
    tiled.launch()
    started.append(tiled)
    return TiledTier(redis, tiled, tiled_env, catalog)


def bootstrap_access(tier: TiledTier) -> dict:
    """``deploy/tiled/bootstrap_access.py all`` as deploy/README tells the admin: principals, scoped
    keys, access-tag grants, /raw and /xtec. Returns what it printed (keys and principal UUIDs)."""
    keys = subprocess.run([sys.executable, str(DEPLOY / "tiled" / "bootstrap_access.py"), "all", tier.tiled.uri],
                          env=child_env(**tier.env), capture_output=True, text=True, timeout=120)
    if keys.returncode != 0:
        raise RuntimeError(f"bootstrap_access.py failed:\n{keys.stderr[-2000:]}")
    return dict(line.split("=", 1) for line in keys.stdout.split())


def start_production_stack(directory: Path, limit: int = 2, reconcile_seconds: float = 8.0) -> ProductionStack:
    directory = Path(directory)
    dbs = Databases()
    started: list[ManagedProcess] = []
    try:
        tier = launch_production_tiled(directory, dbs, started)
        tiled = tier.tiled
        prefect_port = free_port()
        prefect_unit = unit_command(
            "prefect-server.service", overrides={"--host": LOOPBACK, "--port": str(prefect_port)},
            env={"PREFECT_HOME": str(directory / "prefect"),
                 "PREFECT_API_DATABASE_CONNECTION_URL": dbs.uri(dbs.create("prefect"))})
        prefect = PrefectService(directory / "prefect", port=prefect_port, extra_env=prefect_unit.env,
                                 argv=prefect_unit.argv)
        prefect.launch()
        started.append(prefect)
        for svc in (tiled, prefect):
            svc.wait_ready(svc.ready, svc.start_timeout)
        values = bootstrap_access(tier)
        plugin_key, writer_key = values["XTEC_FLOWS_TILED_API_KEY"], values["BEAMLINE_WRITER_TILED_API_KEY"]
        scheduler = DaskScheduler(directory).start()
        started.append(scheduler)
        worker_env = plugin_environment(tiled.uri, plugin_key, prefect.api_url, directory / "dask-maps")
        workers = [DaskWorker(directory, scheduler.address, instance, worker_env) for instance in (1, 2)]
        for w in workers:
            w.launch()
            started.append(w)
        for w in workers:
            w.wait_ready(w.ready, 60)
        stack = ProductionStack(directory, dbs, tier.redis, tiled, prefect, scheduler, workers, None, plugin_key,
                                writer_key, tier.catalog_db, tier.env,
                                {k: v for k, v in values.items() if k.endswith("_PRINCIPAL")})
        stack.serve = start_production_serve(stack, limit=limit, reconcile_seconds=reconcile_seconds)
        return stack
    except BaseException:
        for proc in reversed(started):
            proc.stop()
        dbs.drop()
        raise


def start_production_serve(stack: ProductionStack, limit: int = 2, reconcile_seconds: float = 8.0,
                           watch_only: bool = False) -> ServeService:
    """xtec-flows-serve.service against the stack, started (see :func:`production_serve`)."""
    return production_serve(stack, limit, reconcile_seconds, watch_only).start()


def production_serve(stack: ProductionStack, limit: int = 2, reconcile_seconds: float = 8.0,
                     watch_only: bool = False) -> ServeService:
    """xtec-flows-serve.service against the stack (its Dask scheduler through --dask-address),
    not started; ``watch_only`` adds ``--watch-only``, the set-up beside Prefect workers (prefect.yaml)."""
    directory = stack.directory / "serve"
    unit = unit_command(
        "xtec-flows-serve.service",
        # the burst benchmark sizes the concurrency (bench_flows --limit); the tests keep the unit's 2
        overrides={"--limit": str(limit)},
        env=plugin_environment(stack.tiled.uri, stack.plugin_key, stack.prefect.api_url, directory / "maps"),
        working_directory=directory,
        # Polling Prefect every 2 s and catching up every 8 s: each poll and catch-up costs CPU in
        # serve, Prefect and Tiled, which share 2 cores with the flow runs in CI. No reprocessing
        # schedule (nothing must start on its own during a test), and the stack's Dask cluster.
        test_only_args=["--query-seconds", "2", "--reconcile-seconds", str(reconcile_seconds),
                        "--reprocess-cron", "", "--dask-address", stack.scheduler.address,
                        *(["--watch-only"] if watch_only else [])],
        # a short client retry budget, so that a refused request fails a test instead of stalling it
        test_only_env={"TILED_RETRY_ATTEMPTS": "3", "TILED_RETRY_TIMEOUT": "10"})
    serve = ServeService(unit.working_directory, stack.tiled.uri, stack.plugin_key, stack.prefect.api_url,
                         extra_env=unit.env, argv=unit.argv)
    return serve
