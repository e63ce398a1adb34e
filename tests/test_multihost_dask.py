"""A Dask cluster whose workers do not share a file system with the client, as on several hosts.

The test process uses a temp directory of its own, and one ``dask worker`` runs in its own mount
namespace with a private tmpfs mounted over that directory (``unshare --mount``), so nothing it
writes to the client's temp directory is visible to the client or the other worker: exactly what
happens when workers run on other hosts. (Only that directory is hidden, not all of /tmp: the
checkout and its venv may live under /tmp.) The engine must give the same labels
as the local threaded scheduler there. It once did not: the per-voxel statistic and the
provisional peak labels went to a zarr scratch array in the *client's* temp directory, each
worker wrote its blocks into its own /tmp, and the threshold saw only part of the volume.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import numpy as np
import pytest

import xtec_flows
from xtec_flows.engine import StreamingLimits
from xtec_flows.demo.services import ManagedProcess, child_env, executable, free_port
from xtec_flows.synthetic import make_volume

REQUIRE = os.environ.get("XTEC_FLOWS_REQUIRE_SERVICES") == "1"


def _private_tmp_possible(directory) -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            'mount -t tmpfs tmpfs "$0"', str(directory)], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"cannot make a private /tmp mount namespace: {probe.stderr.strip()[:200]} (needs root)"
    return None


class Scheduler(ManagedProcess):
    def __init__(self, directory):
        self.port = free_port()
        super().__init__("dask-scheduler", [executable("dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                            str(self.port), "--no-dashboard"], child_env(), directory / "scheduler.log")

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return "Scheduler at" in self.log_path.read_text(errors="replace")


class Worker(ManagedProcess):
    def __init__(self, directory, scheduler: str, name: str, private_tmp=None):
        worker = [executable("dask"), "worker", scheduler, "--nthreads", "1", "--memory-limit", "2GiB", "--name",
                  name, "--no-dashboard", "--host", "127.0.0.1"]
        if private_tmp is not None:
            # The worker sees its own empty tmpfs where the client's temp directory is, and keeps
            # its local directory there too, as on a host of its own.
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t tmpfs tmpfs "$0" && shift && exec "$@"', str(private_tmp), "sh", *worker,
                    "--local-directory", str(private_tmp / "dask")]
        else:
            argv = [*worker, "--local-directory", str(directory / f"dask-{name}")]
        super().__init__(f"dask-worker-{name}", argv, child_env(), directory / f"{name}.log")

    def ready(self) -> bool:
        return "Registered to" in self.log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(scheduler address, the client's temp directory, hidden from the second worker)."""
    directory = tmp_path_factory.mktemp("multihost")
    client_tmp = tmp_path_factory.mktemp("client-tmp")
    reason = _private_tmp_possible(client_tmp)
    if reason:
        if REQUIRE:
            pytest.fail(f"multi-host Dask test: {reason} (XTEC_FLOWS_REQUIRE_SERVICES=1 forbids skipping)")
        pytest.skip(f"multi-host Dask test skipped: {reason}")
    scheduler = Scheduler(directory).start()
    workers = [Worker(directory, scheduler.address, "shared"),
               Worker(directory, scheduler.address, "elsewhere", private_tmp=client_tmp)]
    try:
        for w in workers:
            w.start()
        yield scheduler.address, client_tmp
    finally:
        for proc in [*workers, scheduler]:
            proc.stop()


@pytest.fixture(scope="module")
def volume():
    return make_volume((8, 24, 24, 24), seed=5)


@pytest.mark.parametrize("mode", ["d", "peaks"])
@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "provisional-cut"])
def test_workers_without_a_shared_temp_dir_give_the_local_labels(cluster, volume, mode, streaming, monkeypatch,
                                                                tmp_path):
    distributed = pytest.importorskip("distributed")
    import dask.array as da

    address, client_tmp = cluster
    monkeypatch.setattr(tempfile, "tempdir", str(client_tmp))  # where a scratch temp dir would go
    vol, temps, _ = volume
    kwargs = dict(mode=mode, n_components=3, n_init=1, chunks=(8, 8, 8), random_state=0)
    if streaming:
        # The path of inputs too large to keep whole: trajectories above a provisional cut,
        # the histogram from the statistic array in several passes.
        kwargs["limits"] = StreamingLimits(cache_all_bytes=0)

    def counted(log):
        """``vol`` as a dask input that notes every block read in ``log`` (a directory both workers
        see; this closure travels to them by value)."""
        def note_read(block, block_info=None):
            with open(log, "a") as f:
                f.write(f"{block_info[0]['chunk-location']}\n")
            return block

        return da.from_array(vol, chunks=(vol.shape[0], 8, 8, 8)).map_blocks(note_read, dtype=vol.dtype)

    local = xtec_flows.cluster(counted(tmp_path / "local.log"), temps, **kwargs)
    with distributed.Client(address, timeout=30) as client, distributed.get_task_stream(client) as stream:
        remote = xtec_flows.cluster(counted(tmp_path / "remote.log"), temps, **kwargs)
        # Releases travel to the scheduler asynchronously: allow them a few seconds.
        deadline = time.monotonic() + 10
        while (held := client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
    # The cluster reads the input as often as the local run: later passes use the persisted
    # statistic, never the input again (they once re-read every block in each pass).
    reads = {name: sorted((tmp_path / f"{name}.log").read_text().splitlines()) for name in ("local", "remote")}
    assert reads["remote"] == reads["local"] and len(reads["local"]) >= 27
    ran_on = {t["worker"] for t in stream.data}
    assert len(ran_on) == 2, f"the block tasks should have run on both workers, ran on {ran_on}"
    # Every voxel's statistic reached the threshold: the histogram and the cut are the local ones.
    assert remote.n_valid == local.n_valid == vol[0].size
    np.testing.assert_array_equal(remote.histogram_counts, local.histogram_counts)
    assert remote.log_cutoff == local.log_cutoff
    assert remote.n_thresholded == local.n_thresholded
    np.testing.assert_array_equal(remote.labels[...], local.labels[...])
    # The intermediates persisted on the workers are released once the result is made.
    assert held == 0
