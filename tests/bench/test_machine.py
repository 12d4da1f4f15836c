"""bench.machine.wait_until_quiet: a peer run's next slot starts only once every server is idle."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.machine import cpu_snapshot, wait_until_quiet

# Spins on the CPU until `spin_s` of wall time has passed, writes the marker, then sleeps.
BUSY_THEN_IDLE = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
open(sys.argv[2], "w").close()
time.sleep(60)
"""


def test_waits_while_a_server_spins_and_returns_once_it_is_idle(tmp_path: Path) -> None:
    marker = tmp_path / "idle"
    proc = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE, "1.5", str(marker)], start_new_session=True)
    try:
        waited = wait_until_quiet((proc.pid,), window_s=0.25, max_wait_s=30.0)
        # It cannot call a spinning process quiet: the spin must have ended first.
        assert marker.exists(), f"returned after {waited:.2f} s while the process still spun"
        assert waited < 30.0
        # And once idle, it returns at the first quiet window.
        assert wait_until_quiet((proc.pid,), window_s=0.25, max_wait_s=30.0) < 1.0
    finally:
        proc.kill()
        proc.wait()


def test_gives_up_after_max_wait(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", BUSY_THEN_IDLE, "30", str(tmp_path / "idle")],
                            start_new_session=True)
    try:
        start = time.monotonic()
        waited = wait_until_quiet((proc.pid,), window_s=0.25, max_wait_s=1.0)
        assert 1.0 <= waited < 5.0 and time.monotonic() - start < 5.0
        assert cpu_snapshot(proc.pid).server_s > 0.5  # it really was spinning all along
    finally:
        proc.kill()
        proc.wait()
