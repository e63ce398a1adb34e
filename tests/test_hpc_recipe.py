"""deploy/hpc/jobqueue_cluster.py run as a subprocess against the repository's deploy/hpc/jobqueue.yml.

No batch system is needed: ``--print-job-script`` only renders the script, and the long-running mode with
``minimum_jobs: 0`` starts the scheduler without submitting a job. Expected directives are computed from
the YAML file itself, so editing the file's values does not break the tests.
"""

from __future__ import annotations

import math
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("dask_jobqueue")

from dask.utils import parse_bytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "hpc" / "jobqueue_cluster.py"
CONFIG = REPO / "deploy" / "hpc" / "jobqueue.yml"


def run_script(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def expected_directives(system: str, job: dict) -> list[str]:
    """The header lines the file's queue/account/walltime/memory must become (memory in whole GiB, rounded
    up, which Slurm spells G and PBS spells GB)."""
    gib = math.ceil(parse_bytes(job["memory"]) / 2**30)
    if system == "slurm":
        return [f"#SBATCH -p {job['queue']}", f"#SBATCH -A {job['account']}", f"#SBATCH -t {job['walltime']}",
                f"#SBATCH --mem={gib}G", f"#SBATCH --cpus-per-task={job['cores']}"]
    return [f"#PBS -q {job['queue']}", f"#PBS -A {job['account']}", f"#PBS -l walltime={job['walltime']}",
            f"#PBS -l select=1:ncpus={job['cores']}:mem={gib}GB"]


@pytest.mark.parametrize("system", ["slurm", "pbs"])
def test_print_job_script_has_the_files_directives_and_the_worker_command(system):
    job = yaml.safe_load(CONFIG.read_text())[system]
    out = run_script(CONFIG, "--system", system, "--print-job-script")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    lines = script.splitlines()
    for directive in expected_directives(system, job):
        assert directive in lines, f"{directive!r} not in the {system} script:\n{script}"
    for extra in job["job_extra_directives"]:
        assert f"#{'SBATCH' if system == 'slurm' else 'PBS'} {extra}" in lines
    worker = [line for line in lines if "distributed.cli.dask_worker" in line]
    assert len(worker) == 1, script
    cmd = worker[0].split()
    assert cmd[:3] == [job["python"], "-m", "distributed.cli.dask_worker"]
    # Single-threaded workers, one per core, each with its share of the job's memory (what SIZING.md sizes).
    threads = job["cores"] // job["processes"]
    assert cmd[cmd.index("--nthreads") + 1] == str(threads)
    assert cmd[cmd.index("--nworkers") + 1] == str(job["processes"])
    assert cmd[cmd.index("--interface") + 1] == job["interface"]
    assert "--lifetime" in cmd
    # The key reaches workers through the prologue's environment variable, read from a file at run time.
    assert any(line.startswith("export TILED_API_KEY=") for line in lines)


def test_the_files_own_system_is_the_default():
    system = yaml.safe_load(CONFIG.read_text())["system"]
    default = run_script(CONFIG, "--print-job-script")
    assert default.returncode == 0, default.stderr
    prefix, other = ("#SBATCH ", "#PBS ") if system == "slurm" else ("#PBS ", "#SBATCH ")
    assert prefix in default.stdout and other not in default.stdout


def _write(tmp_path, data) -> Path:
    path = tmp_path / "jobqueue.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_system_fails_naming_the_file_and_the_key(tmp_path):
    data = yaml.safe_load(CONFIG.read_text())
    data["system"] = "sge"
    path = _write(tmp_path, data)
    out = run_script(path, "--print-job-script")
    assert out.returncode == 2
    assert str(path) in out.stderr and "system" in out.stderr and "'sge'" in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_missing_cores_fails_naming_the_file_and_the_key(tmp_path):
    data = yaml.safe_load(CONFIG.read_text())
    del data["pbs"]["cores"]
    path = _write(tmp_path, data)
    out = run_script(path, "--system", "pbs", "--print-job-script")
    assert out.returncode == 2
    assert str(path) in out.stderr and "pbs.cores is missing" in out.stderr
    assert "Traceback" not in out.stderr


def test_runs_a_scheduler_until_sigterm_and_publishes_its_address(tmp_path):
    """The long-running mode for real, minus the batch system: minimum_jobs 0 submits nothing."""
    data = yaml.safe_load(CONFIG.read_text())
    data["scheduler"].update(port=0, dashboard_address=None, interface="lo")
    data["adaptive"]["minimum_jobs"] = 0
    path = _write(tmp_path, data)
    address_file = tmp_path / "run" / "dask.env"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(path), "--address-file", str(address_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)  # never hang the suite on a stuck start
        assert ready, "no scheduler address within 30 s"
        address = proc.stdout.readline().strip()  # the script prints only the address on stdout
        assert address.startswith("tcp://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else address
        assert address_file.read_text() == f"XTEC_FLOWS_DASK_ADDRESS={address}\n"
        where = urlsplit(address)
        with socket.create_connection((where.hostname, where.port), timeout=5):
            pass  # the scheduler accepts connections: serve --dask-address would reach it
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not address_file.exists()  # no stale address for serve to find
    assert "received SIGTERM" in proc.stderr.read()
