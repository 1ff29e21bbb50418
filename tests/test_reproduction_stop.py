"""experiments/reproduction/stop.sh: Ctrl+C to the experiment's process group, SIGTERM if it stays."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

STOP = Path(__file__).resolve().parents[1] / "experiments" / "reproduction" / "stop.sh"


def _group(tmp_path: Path, body: str) -> subprocess.Popen:
    """A process group led by a shell running `body`, its id recorded as launch.sh records it."""
    proc = subprocess.Popen(["bash", "-c", body], start_new_session=True)
    # reaped at once, as init reaps launch.sh's orphaned driver: a zombie leader would keep the group "alive"
    threading.Thread(target=proc.wait, daemon=True).start()
    (tmp_path / "pids").write_text(f"{proc.pid}\n")
    time.sleep(0.3)  # the traps are set
    return proc


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "body, expect",
    [
        ("exec sleep 30", "stopped; resume"),  # leaves on SIGINT
        ("trap '' INT; sleep 30 & wait; sleep 30", "sent SIGTERM"),  # ignores SIGINT: SIGTERM ends it
    ],
)
def test_stop_ends_the_recorded_process_group(tmp_path, body, expect):
    proc = _group(tmp_path, body)
    env = {**os.environ, "RNA_BASE_DIR": str(tmp_path), "RNA_STOP_WAIT_S": "2"}
    out = subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and expect in out.stdout, out.stdout + out.stderr
    for _ in range(50):
        if not _alive(proc.pid):
            break
        time.sleep(0.1)
    assert not _alive(proc.pid)
    again = subprocess.run(["bash", str(STOP)], env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "is not running" in again.stdout
