"""The MLflow UI as a user opens it, for browser tests: `mlflow ui` on 127.0.0.1 and headless Chromium.

`MlflowUI` starts `mlflow ui` (one worker, job execution off, as STACK.md measured: ~0.5 GB) in a
session of its own, records the id of the process it started and stops exactly that session.
`render` loads a page in Debian's `chromium` and returns the DOM after MLflow's JavaScript ran,
saving a screenshot beside it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MlflowUI:
    """`mlflow ui` over `store` (a tracking URI) on 127.0.0.1; a context manager."""

    def __init__(self, store: str, log: Path):
        self.store, self.log = store, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> MlflowUI:
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [mlflow, "ui", "--backend-store-uri", self.store, "--host", "127.0.0.1", "--port", str(self.port)]
        self.out = open(self.log, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen(
            [*cmd, "--workers", "1"], stdout=self.out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow ui exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"mlflow ui did not answer on {self.url} within 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the session this object started, nothing else
            try:
                self.proc.wait(timeout=3)  # `mlflow ui` often outlives SIGTERM; it holds no state to save
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()


def render(url: str, screenshot: Path, budget_ms: int = 20000, size: str = "1600,1000") -> str:
    """The DOM of `url` after `budget_ms` of virtual time in headless Chromium; a PNG at `screenshot`."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium on PATH: apt-get install -y chromium (.ci/run does)")
    common = [
        exe,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        f"--window-size={size}",
        f"--virtual-time-budget={budget_ms}",
        f"--user-data-dir={screenshot.parent / ('.chromium-' + screenshot.stem)}",
    ]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True).stdout
    subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True)
    return dom
