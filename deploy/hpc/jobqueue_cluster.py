#!/usr/bin/env python
"""A Dask cluster on Slurm or PBS for ``xtec-flows serve --dask-address``, configured by one YAML file.

    python deploy/hpc/jobqueue_cluster.py deploy/hpc/jobqueue.yml --print-job-script [--system pbs]
    python deploy/hpc/jobqueue_cluster.py deploy/hpc/jobqueue.yml [--address-file FILE]

With ``--print-job-script`` it prints the batch script one worker job would run and exits (no scheduler is
started and no job submitted, so it works where sbatch/qsub are not installed). Otherwise it starts the
Dask scheduler on this host, lets dask-jobqueue submit worker jobs between ``adaptive.minimum_jobs`` and
``adaptive.maximum_jobs``, prints the scheduler address (and writes ``XTEC_FLOWS_DASK_ADDRESS=<address>`` to
``--address-file``, an environment file for ``xtec-flows serve``), and runs until SIGTERM or Ctrl-C, when
it cancels its jobs and exits 0.

A bad file exits with status 2 and a message naming the file and the key. See deploy/hpc/jobqueue.yml for
every key and deploy/SIZING.md for how many workers a scan needs.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("xtec-flows.jobqueue")

SYSTEMS = ("pbs", "slurm")
TOP_KEYS = {"system", "scheduler", "adaptive", *SYSTEMS}
SCHEDULER_KEYS = {"port", "dashboard_address", "interface", "host"}
ADAPTIVE_KEYS = {"minimum_jobs", "maximum_jobs"}
# Job keys passed to SLURMCluster / PBSCluster as they are (dask-jobqueue 0.9.0 names).
JOB_KEYS = {
    "queue", "account", "cores", "processes", "memory", "walltime", "interface", "local_directory",
    "log_directory", "python", "job_name", "job_extra_directives", "job_script_prologue", "worker_extra_args",
    "job_directives_skip", "death_timeout", "nanny",
}
SYSTEM_KEYS = {"slurm": JOB_KEYS | {"job_cpu", "job_mem"}, "pbs": JOB_KEYS | {"resource_spec"}}
LIST_KEYS = ("job_extra_directives", "job_script_prologue", "worker_extra_args", "job_directives_skip")
REQUIRED = {
    "cores": "the cores per batch job, e.g. cores: 8",
    "memory": "the memory per batch job, e.g. memory: 32GiB",
    "walltime": 'the walltime of a worker job, e.g. walltime: "04:00:00"',
}


class ConfigError(ValueError):
    """A problem with the YAML file; the message names the file and the key."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _section(raw: dict, name: str, keys, where: str) -> dict:
    """The optional mapping ``raw[name]``, with only known keys (ConfigError naming the file otherwise)."""
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: {name} must be a mapping with keys {sorted(keys)}")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; known: {sorted(keys)}")
    return section


def load_config(path: Path, system: str | None = None) -> dict:
    """Read and check the YAML file.

    Returns {"system": "slurm"|"pbs", "job": {...cluster keywords...}, "scheduler": {...},
    "adaptive": {"minimum_jobs": int, "maximum_jobs": int}}.
    Raises ConfigError naming the file and the offending key.
    """
    import yaml

    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with keys {sorted(TOP_KEYS)}; got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(TOP_KEYS)}")
    chosen = system or raw.get("system")
    if chosen not in SYSTEMS:
        source = "--system" if system else "system"
        raise ConfigError(f"{where}: {source} must be one of {list(SYSTEMS)}; got {chosen!r}")
    job = raw.get(chosen)
    if not isinstance(job, dict):
        raise ConfigError(f"{where}: section {chosen!r} is missing or not a mapping; it holds the job keys "
                          f"(cores, memory, walltime, queue, ...) for system {chosen!r}")
    job = dict(job)
    unknown = sorted(set(job) - SYSTEM_KEYS[chosen])
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[f'{chosen}.{k}' for k in unknown]}; "
                          f"known: {sorted(SYSTEM_KEYS[chosen])}")
    for key, what in REQUIRED.items():
        if job.get(key) is None:
            raise ConfigError(f"{where}: {chosen}.{key} is missing; give {what}")
    if not _is_int(job["cores"]) or job["cores"] < 1:
        raise ConfigError(f"{where}: {chosen}.cores must be a positive integer; got {job['cores']!r}")
    processes = job.get("processes")
    if processes is not None and (not _is_int(processes) or not 1 <= processes <= job["cores"]):
        raise ConfigError(f"{where}: {chosen}.processes must be an integer from 1 to cores ({job['cores']}); "
                          f"got {processes!r}")
    from dask.utils import parse_bytes

    try:
        parse_bytes(str(job["memory"]))
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: {chosen}.memory must be a size like 32GiB or 64GB; got {job['memory']!r}") from None
    if not isinstance(job["walltime"], str):
        raise ConfigError(f"{where}: {chosen}.walltime must be a quoted string like \"04:00:00\"; "
                          f"got {job['walltime']!r} (unquoted, YAML reads 04:00:00 as a number)")
    for key in LIST_KEYS:
        value = job.get(key)
        if value is not None and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ConfigError(f"{where}: {chosen}.{key} must be a list of strings; got {value!r}")
    # dask-jobqueue treats None as "use dask's jobqueue config"; drop them so the file is the only source.
    job = {k: v for k, v in job.items() if v is not None}

    sched = _section(raw, "scheduler", SCHEDULER_KEYS, where)
    if "port" in sched and (not _is_int(sched["port"]) or not 0 <= sched["port"] <= 65535):
        raise ConfigError(f"{where}: scheduler.port must be an integer 0..65535; got {sched['port']!r}")
    no_dashboard = "dashboard_address" in sched and sched["dashboard_address"] is None
    sched = {k: v for k, v in sched.items() if v is not None}
    if no_dashboard:
        # Explicit null: no dashboard. The scheduler still serves health/metrics over HTTP, on :8787 unless
        # told otherwise, so give it any free port instead.
        sched.update(dashboard=False, dashboard_address=":0")

    adaptive = _section(raw, "adaptive", ADAPTIVE_KEYS, where)
    lo, hi = adaptive.get("minimum_jobs", 0), adaptive.get("maximum_jobs", 1)
    if not _is_int(lo) or lo < 0:
        raise ConfigError(f"{where}: adaptive.minimum_jobs must be an integer >= 0; got {lo!r}")
    if not _is_int(hi) or hi < max(lo, 1):
        raise ConfigError(f"{where}: adaptive.maximum_jobs must be an integer >= max(1, minimum_jobs={lo}); "
                          f"got {hi!r}")
    return {"system": chosen, "job": job, "scheduler": sched, "adaptive": {"minimum_jobs": lo, "maximum_jobs": hi}}


def job_script(config: dict) -> str:
    """The batch script of one worker job, without starting a scheduler.

    The scheduler address in it is a placeholder; the real jobs get the running scheduler's."""
    from dask_jobqueue.pbs import PBSJob
    from dask_jobqueue.slurm import SLURMJob

    job_cls = {"slurm": SLURMJob, "pbs": PBSJob}[config["system"]]
    return job_cls("tcp://<scheduler-address>:8786", name="xtec-worker", **config["job"]).job_script()


def build_cluster(config: dict):
    """A running SLURMCluster / PBSCluster with its adaptive range set (no job is submitted before the
    scheduler asks for workers, except ``minimum_jobs``)."""
    from dask_jobqueue import PBSCluster, SLURMCluster

    cluster_cls = {"slurm": SLURMCluster, "pbs": PBSCluster}[config["system"]]
    cluster = cluster_cls(scheduler_options=dict(config["scheduler"]), **config["job"])
    cluster.adapt(**config["adaptive"])
    return cluster


def serve_until_signalled(config: dict, address_file: Path | None) -> int:
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s; cancelling the worker jobs", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = build_cluster(config)
    try:
        address = cluster.scheduler_address
        log.info("%s scheduler at %s; worker jobs between %d and %d (%s)", config["system"], address,
                 config["adaptive"]["minimum_jobs"], config["adaptive"]["maximum_jobs"],
                 f"{config['job'].get('processes', '?')} workers each")
        if address_file is not None:
            address_file.parent.mkdir(parents=True, exist_ok=True)
            address_file.write_text(f"XTEC_FLOWS_DASK_ADDRESS={address}\n")
        # stdout carries only the address, for `xtec-flows serve --dask-address "$(...)"`-style wrappers.
        print(address, flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        cluster.close()
        if address_file is not None:
            address_file.unlink(missing_ok=True)  # a stale address would send serve to a dead scheduler
    log.info("stopped")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", type=Path, help="YAML file (see deploy/hpc/jobqueue.yml)")
    p.add_argument("--system", help="slurm or pbs (default: the file's `system`)")
    p.add_argument("--print-job-script", action="store_true", help="print one worker job's batch script and exit")
    p.add_argument("--address-file", type=Path, help="write XTEC_FLOWS_DASK_ADDRESS=<address> here while running")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config, args.system)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_job_script:
        print(job_script(config))
        return 0
    return serve_until_signalled(config, args.address_file)


if __name__ == "__main__":
    sys.exit(main())
