"""Ports and processes of the local cluster (`infra/local_cluster.py`): free loopback ports, processes
started in their own sessions and recorded with their start times, so that stopping them signals
exactly what was started (never a reused pid, never someone else's Ray)."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class ClusterError(Exception):
    """A problem `up` or `down` reports in one line (exit code 2)."""


# ----------------------------------------------------------------------------------------- ports


def free_ports(n: int) -> list[int]:
    """`n` distinct ports free on 127.0.0.1 (held open together while picking)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(size: int, taken: set[int], rng: random.Random) -> int:
    """The first port of `size` consecutive free ports (for a node's Ray worker processes)."""
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        if any(p in taken for p in range(base, base + size)):
            continue
        try:
            socks = []
            for p in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ClusterError(f"found no {size} consecutive free ports for Ray workers; free some ports and retry")


def answers(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------- processes


def start_process(
    name: str, cmd: list[str], env: dict[str, str], log: Path, cwd: Path, state: dict[str, Any]
) -> dict[str, Any]:
    """Start `cmd` in a new session (its process group is its pid) and record it in `state`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    entry = {"pid": proc.pid, "started": process_start_time(proc.pid), "log": str(log), "offset": offset, "cmd": cmd}
    state["processes"][name] = entry
    return entry


def process_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a process from a reused pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()[19]


def is_ours(entry: dict[str, Any]) -> bool:
    """Whether the recorded process is still the one we started (alive, same start time)."""
    started = process_start_time(int(entry["pid"]))
    return started is not None and started == entry.get("started")


def descendants(pid: int) -> list[tuple[int, str | None]]:
    """(pid, start time) of every descendant of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append((c, process_start_time(c)))
            todo.append(c)
    return out


def stop_process(entry: dict[str, Any], grace: float, hard: bool = False) -> None:
    """SIGTERM (or SIGKILL when `hard`) the recorded process, then SIGKILL its group and descendants.

    Only processes we started are signalled: the recorded pid if its start time still matches, its
    process group (it led a new session), and the descendants it had when we came to stop it.
    """
    if not is_ours(entry):
        return
    pid = int(entry["pid"])
    family = descendants(pid)
    try:
        os.kill(pid, signal.SIGKILL if hard else signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + (0 if hard else grace)
    while time.monotonic() < deadline and is_ours(entry):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child, started in family:
        if started is not None and process_start_time(child) == started:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    reap(pid)


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(what: str, check, entry: dict[str, Any], timeout: float) -> None:
    """Poll `check()` until it is true; fail with the log's tail if the process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        # `ray start` that failed can linger after its traceback (its children keep it waiting): failed too
        if not is_ours(entry) or logged_since_start(entry, "Traceback (most recent call last)"):
            raise ClusterError(f"{what} exited while starting; its log {entry['log']} ends with: {tail(entry['log'])}")
        time.sleep(0.5)
    raise ClusterError(f"{what} did not come up within {timeout:.0f} s; see {entry['log']}: {tail(entry['log'])}")


def logged_since_start(entry: dict[str, Any], text: str) -> bool:
    """Whether the process has written `text` to its log (this start, not an earlier attempt's)."""
    try:
        with open(entry["log"], "rb") as f:
            f.seek(int(entry.get("offset", 0)))
            return text.encode() in f.read()
    except OSError:
        return False


def tail(log: str, lines: int = 3) -> str:
    try:
        text = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:])
