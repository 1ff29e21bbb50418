"""Shared command-line plumbing for every job (train, sweep, evaluate, ...).

Why one module: every job must treat user mistakes the same way: one line on
stderr naming what is wrong and what to do, exit code 2, no traceback, and nothing started
(no Ray cluster, no MLflow run) before the configuration has been validated.

    from jobs.cli import OneLineParser, add_config_arguments, config_from_args, run_main

Jobs run as `python jobs/<job>.py` from the repository root without installing the project,
so each job puts the repository root on `sys.path` before importing this module.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from rna_core.config import Config, load_config  # noqa: E402
from rna_core.errors import RnaError  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but usage mistakes are one line on stderr and exit code 2, like every job."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: {message} (see --help)\n")


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`--config PRESET.yaml` and repeated `--set key=value` (e.g. `--set train.lr=0.05`)."""
    parser.add_argument(
        "--config",
        required=required,
        metavar="YAML",
        help="config preset, e.g. configs/smoke.yaml" + ("" if required else " (optional)"),
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value; repeatable, e.g. --set train.epochs=5 --set ray.num_workers=2",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load and validate the config named by `--config` with the `--set` overrides applied."""
    return load_config(getattr(args, "config", None), list(getattr(args, "overrides", []) or []))


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> bool:
    """`ray job stop` (and Kubernetes, and `kill`) end a job with SIGTERM: treat it as Ctrl+C, so the
    job's MLflow run ends KILLED instead of staying RUNNING until the same job is submitted again.
    Only where nothing else handles SIGTERM already (the main thread, default disposition); True if
    installed (the caller puts the default back)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
        return True
    return False


def run_main(prog: str, job: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `job(argv)`; a user error (RnaError) becomes one stderr line and exit code 2; SIGTERM
    and Ctrl+C end it as interrupted (exit 130, its runs KILLED).

    Anything else propagates with its traceback: it is a bug, and the traceback is what
    whoever fixes it needs.
    """
    installed = interrupt_on_sigterm()
    try:
        code = job(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        user_error = find_user_error(exc)
        if user_error is None:
            raise
        message = " ".join(str(user_error).split())  # guarantee one line
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if installed:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return int(code or 0)


def find_user_error(exc: BaseException, depth: int = 6) -> RnaError | None:
    """The RnaError behind `exc`, also when a Ray task or Train worker raised it remotely.

    Ray wraps a task's exception (``RayTaskError``, whose ``cause`` is the original; its own text
    carries the remote traceback), and Ray Train reports workers' exceptions in
    ``WorkerGroupError.worker_failures``. The driver's checks should stop bad input before Ray
    starts; this is the net for what gets past them: the user still gets the one line.
    """
    seen: set[int] = set()
    todo: list[tuple[BaseException, int]] = [(exc, 0)]
    while todo:
        current, level = todo.pop(0)
        if id(current) in seen or level > depth:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        if isinstance(current, RnaError) and not isinstance(cause, BaseException):
            return current
        nested: list[object] = [
            cause,
            getattr(current, "controller_failure", None),
            current.__cause__,
            current.__context__,
        ]
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            nested.extend(failures.values())
        todo.extend((e, level + 1) for e in nested if isinstance(e, BaseException))
    return None


__all__ = [
    "EXIT_USER_ERROR",
    "find_user_error",
    "OneLineParser",
    "REPO_ROOT",
    "add_config_arguments",
    "config_from_args",
    "run_main",
]
