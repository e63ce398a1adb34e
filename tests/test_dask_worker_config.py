"""deploy/dask/distributed.yaml, loaded as DASK_CONFIG does, reaches the environment of real
worker processes started by a Nanny (a LocalCluster with processes), and keeps distributed's
other pre-spawn settings."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "deploy" / "dask"


def test_the_workers_get_the_files_allocator_settings():
    wanted = yaml.safe_load((CONFIG_DIR / "distributed.yaml").read_text())["distributed"]["nanny"]["pre-spawn-environ"]
    assert {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} <= set(wanted)
    script = textwrap.dedent("""
        import json, os
        from distributed import Client, LocalCluster
        if __name__ == "__main__":
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as lc, \\
                    Client(lc) as client:
                env = next(iter(client.run(lambda: dict(os.environ)).values()))
            print(json.dumps({k: v for k, v in env.items() if k.startswith(("MALLOC_", "OMP_"))}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DASK_CONFIG": str(CONFIG_DIR)})
    assert out.returncode == 0, out.stderr
    import json

    env = json.loads(out.stdout.strip().splitlines()[-1])
    for key, value in wanted.items():
        assert env.get(key) == str(value), (key, env)
    # distributed's own defaults beside them are kept (the file adds, it does not replace).
    assert env.get("OMP_NUM_THREADS") == "1"


@pytest.mark.parametrize("path", ["deploy/systemd/dask-worker@.service", "deploy/hpc/jobqueue.yml"])
def test_every_worker_recipe_points_dask_config_at_the_file(path):
    text = (REPO / path).read_text()
    assert "DASK_CONFIG=/opt/xtec-flows/deploy/dask" in text


def test_the_preload_gives_zarr_as_many_decoding_threads_as_the_worker_has():
    preload = yaml.safe_load((CONFIG_DIR / "distributed.yaml").read_text())["distributed"]["worker"]["preload"]
    assert preload == ["xtec_flows.worker_preload"]
    script = textwrap.dedent("""
        import json
        from distributed import Client, LocalCluster
        def zarr_threads():
            import zarr
            return zarr.config.get("threading.max_workers")
        if __name__ == "__main__":
            with LocalCluster(n_workers=2, threads_per_worker=3, processes=True, dashboard_address=None) as lc, \\
                    Client(lc) as client:
                print(json.dumps(sorted(client.run(zarr_threads).values())))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DASK_CONFIG": str(CONFIG_DIR)}, cwd=REPO)
    assert out.returncode == 0, out.stderr
    import json

    assert json.loads(out.stdout.strip().splitlines()[-1]) == [3, 3]
