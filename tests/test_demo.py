"""The README's main command: ``make demo`` runs ``xtec-flows demo``; so do these tests.

They start the whole stack (Tiled, Prefect server, ``xtec-flows serve``), run a simulated scan,
and check the result appears and that nothing is left running, also after Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow]

XTEC_FLOWS = str(Path(sys.executable).parent / "xtec-flows")


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "TILED_"))}
    return env


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _assert_all_gone(procs, timeout=30.0):
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, f"left running: {[(p.pid, p.cmdline()[:3]) for p in alive]}"


def test_demo_shows_the_result_appearing_in_tiled_and_stops_everything(tmp_path):
    proc = subprocess.Popen([XTEC_FLOWS, "demo", "--workdir", str(tmp_path), "--shape", "12,32,32,32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen: dict[int, psutil.Process] = {}
    while proc.poll() is None:  # remember every process the demo starts
        for p in _descendants(proc.pid):
            seen.setdefault(p.pid, p)
        time.sleep(0.2)
    out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert re.search(r"result: http://127\.0\.0\.1:\d+/api/v1/metadata/xtec/xtec-[0-9a-f]{20}", out), out
    counts = re.search(r"K = 3, counts \[(\d+), (\d+), (\d+)\]", out)
    assert counts and all(int(c) > 0 for c in counts.groups()), out
    assert (tmp_path / "maps" / "qmap.png").stat().st_size > 1000
    assert (tmp_path / "maps" / "trajectories.png").stat().st_size > 1000
    latency = float(re.search(r"appeared in Tiled ([\d.]+) s after its stop document", out).group(1))
    assert latency > 0
    names = " ".join(" ".join(p.cmdline()) for p in seen.values() if _cmdline_ok(p)) or " ".join(
        str(p.pid) for p in seen.values())
    assert len(seen) >= 3, names  # tiled, prefect server, serve (+ flow runs)
    _assert_all_gone(list(seen.values()))


def _cmdline_ok(p):
    try:
        p.cmdline()
        return True
    except psutil.Error:
        return False


def test_ctrl_c_during_the_demo_leaves_nothing_running(tmp_path):
    proc = subprocess.Popen([XTEC_FLOWS, "demo", "--workdir", str(tmp_path), "--shape", "12,32,32,32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 120
    serve_log = tmp_path / "stack" / "serve" / "serve.log"
    # Interrupt once the serve process is up (the most processes are running then).
    while time.monotonic() < deadline and proc.poll() is None:
        for p in _descendants(proc.pid):
            seen.setdefault(p.pid, p)
        if serve_log.exists() and "subscribed to completed scans" in serve_log.read_text(errors="replace"):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the demo ended before it could be interrupted"
    for p in _descendants(proc.pid):
        seen.setdefault(p.pid, p)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=90)
    assert len(seen) >= 3
    _assert_all_gone(list(seen.values()))
