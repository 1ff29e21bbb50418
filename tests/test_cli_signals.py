"""`ray job stop` ends a job with SIGTERM: the job must end as interrupted (its runs KILLED, exit
130), not die with its MLflow run left RUNNING."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

JOB = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from jobs.cli import run_main
marker = Path(sys.argv[2])
def job(argv):
    marker.write_text("started")
    try:
        time.sleep(60)
    except KeyboardInterrupt:
        marker.write_text("KILLED")  # what the jobs' finally blocks do: end the run as KILLED
        raise
    return 0
sys.exit(run_main("demo.py", job, []))
"""


def test_sigterm_ends_a_job_as_interrupted_and_its_cleanup_runs(tmp_path):
    marker = tmp_path / "status"
    proc = subprocess.Popen(
        [sys.executable, "-c", JOB, str(REPO), str(marker)], stderr=subprocess.PIPE, text=True, cwd=tmp_path
    )
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert marker.read_text() == "KILLED"
    assert err.strip().splitlines()[-1] == "demo.py: interrupted"


def test_run_main_puts_the_default_sigterm_disposition_back():
    from jobs.cli import run_main

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # an earlier test's ray.init may have installed one
    try:
        seen = []
        run_main("demo.py", lambda argv: seen.append(signal.getsignal(signal.SIGTERM)) or 0, [])
        assert seen and seen[0] != signal.SIG_DFL  # installed while the job ran
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        # a handler someone else installed (Ray's, in a driver that already called ray.init) is left alone
        signal.signal(signal.SIGTERM, before if callable(before) else signal.SIG_IGN)
        kept = signal.getsignal(signal.SIGTERM)
        run_main("demo.py", lambda argv: seen.append(signal.getsignal(signal.SIGTERM)) or 0, [])
        assert seen[1] is kept and signal.getsignal(signal.SIGTERM) is kept
    finally:
        signal.signal(signal.SIGTERM, before)
