"""Timing helpers shared by the benchmarks: warm-up, interleaved repeats, medians, ratios.

Why interleaved: the machines these run on are shared and noisy (other jobs, clock changes), so an
absolute time means little and two cases timed one after the other see different machines. Every
case is timed once per round, rounds alternate the order (A B, B A, A B, ...), and the ratio is
taken of medians, so slow drift and bursts of load hit both sides alike.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls of one case; `items` images are processed per call."""

    name: str
    items: int
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def items_per_second(self) -> float:
        return self.items / self.median if self.median > 0 else float("inf")

    def summary(self) -> str:
        times = ", ".join(f"{s:.3f}" for s in self.seconds)
        return f"{self.name}: median {self.median:.3f} s/call, {self.items_per_second:.2f} images/s (runs: {times})"


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for queued device work (a no-op on CPU), so timers see finished work."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def random_batch(
    batch: int, seed: int, device: torch.device | str, num_classes: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded CIFAR-shaped batch (pixels in [0, 1], labels) on `device`: the input every bench times."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    return x, y


def measure_interleaved(
    cases: dict[str, Callable[[], Any]],
    items: int,
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, Timing]:
    """Time every case `repeats` times, interleaved, after `warmup` untimed calls of each.

    Round r runs the cases in order when r is even and in reverse when odd (A B / B A), so no
    case is always first after a pause. The headline ratio is :func:`paired_ratio`.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    sync = sync or (lambda: None)
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    sync()
    timings = {name: Timing(name, items) for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            cases[name]()
            sync()
            timings[name].seconds.append(time.perf_counter() - start)
            timings[name].cpu_seconds.append(time.process_time() - cpu_start)
    return timings


def ratio(numerator: Timing, denominator: Timing) -> float:
    """median(numerator) / median(denominator): how many times longer the numerator takes."""
    return numerator.median / denominator.median


def paired_ratios(numerator: Timing, denominator: Timing) -> list[float]:
    """Per-round ratios (both cases measured next to each other): their spread shows the noise."""
    return [a / b for a, b in zip(numerator.seconds, denominator.seconds)]


def cpu_time_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median per-round ratio of process CPU time: a cross-check on CPU runs, since CPU time
    barely grows when other jobs take the cores (wall time does); meaningless for GPU work."""
    return statistics.median(a / b for a, b in zip(numerator.cpu_seconds, denominator.cpu_seconds))


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median of the per-round ratios: the headline ratio of every benchmark.

    Within a round both cases run back to back, so a burst of load from other jobs that lasts
    longer than a round slows both; the median then drops the rounds a short burst hit one-sided.
    On a shared machine this is far steadier than the ratio of the two medians (also printed).
    """
    return statistics.median(paired_ratios(numerator, denominator))


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float, float]:
    """A distribution-free interval for the median of `values`: (low, high, its coverage).

    Why: a headline near its target (1.00 against ">= 1.0") needs to say whether this machine can
    tell the two sides apart at all. The interval is the pair of order statistics x_(k), x_(n+1-k)
    with the largest k whose coverage, 1 - 2 P(Binomial(n, 1/2) < k), is still at least
    `confidence`; it assumes only independent rounds, no distribution and no random draws. With
    too few rounds for `confidence` it is (min, max) with the (lower) coverage that has.
    """
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    best_k, best_coverage = 1, 1 - 2 * 0.5**n
    tail = 0.0  # P(Binomial(n, 1/2) < k)
    for k in range(1, (n + 1) // 2 + 1):
        tail += math.comb(n, k - 1) * 0.5**n
        coverage = 1 - 2 * tail
        if coverage < confidence:
            break
        best_k, best_coverage = k, coverage
    return ordered[best_k - 1], ordered[n - best_k], best_coverage


@dataclass
class Headline:
    """A further headline ratio of a benchmark (e.g. `bf16_step` beside `at_step`'s RNA/BN ratio)."""

    name: str
    numerator: Timing
    denominator: Timing
    target: str
    check: Callable[[float], bool]

    @property
    def value(self) -> float:
        return paired_ratio(self.numerator, self.denominator)

    def as_dict(self) -> dict[str, Any]:
        low, high, coverage = median_interval(paired_ratios(self.numerator, self.denominator))
        cpu = (
            cpu_time_ratio(self.numerator, self.denominator)
            if _has_cpu_times(self.numerator, self.denominator)
            else None
        )
        return {
            "ratio_name": f"time({self.numerator.name}) / time({self.denominator.name})",
            "ratio": self.value,
            "ratio_interval": {"low": low, "high": high, "coverage": coverage},
            "ratio_of_medians": ratio(self.numerator, self.denominator),
            "cpu_time_ratio": cpu,
            "target": self.target,
            "passed": bool(self.check(self.value)),
        }


def _has_cpu_times(a: Timing, b: Timing) -> bool:
    return bool(a.cpu_seconds and b.cpu_seconds and min(b.cpu_seconds) > 0)


def command_line(script: str, args: list[str]) -> str:
    """The exact command that reproduces this run from the repository root (`script` relative to it)."""
    return "PYTHONPATH=. python " + shlex.join([script, *args])


def machine() -> dict[str, Any]:
    """What the numbers were measured on (they mean nothing without it)."""
    info: dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if hasattr(os, "getloadavg"):  # at report time: the 1/5/15-minute averages cover the run
        info["load_average"] = "/".join(f"{v:.2f}" for v in os.getloadavg())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def add_common_args(parser: argparse.ArgumentParser, repeats: int = 3, warmup: int = 1) -> None:
    """Arguments every benchmark takes."""
    parser.add_argument("--repeats", type=int, default=repeats, help="timed calls per case (interleaved)")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls per case first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch's default). 1 by default: on a shared machine a second OpenMP "
        "thread that loses its core stalls every parallel op (measured: 50x slower steps under load)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result as JSON to this file")


def apply_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def report(
    bench: str,
    argv: list[str] | None,
    timings: dict[str, Timing],
    ratio_name: str,
    ratio_value: float,
    target: str,
    passed: bool,
    extra: dict[str, Any] | None = None,
    json_path: str | None = None,
    rounds: list[float] | None = None,
    headlines: list[Headline] | None = None,
) -> dict[str, Any]:
    """Print the benchmark's result (timings, ratio, target, exact command) and return it as a dict.

    `rounds`: the per-round ratios whose median is the headline; with them the report adds the
    headline's interval (:func:`median_interval`), which says whether a result near its target
    is a tie at this machine's resolution. `headlines`: further named ratios, each printed with
    its interval, CPU-time ratio and verdict, and stored under "headlines" in the JSON.
    """
    cmd = command_line(f"bench/{bench}.py", sys.argv[1:] if argv is None else list(argv))
    print(f"== bench {bench}")
    print(f"command: {cmd}")
    host = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in host.items()))
    for t in timings.values():
        print("  " + t.summary())
    names = list(timings)
    if len(names) >= 2:
        a, b = timings[names[0]], timings[names[1]]
        pr = paired_ratios(a, b)
        print(f"  per-round {names[0]}/{names[1]}: " + ", ".join(f"{r:.3f}" for r in pr))
        print(
            f"  ratio of medians {names[0]}/{names[1]}: {ratio(a, b):.3f}; of fastest runs: "
            f"{min(a.seconds) / min(b.seconds):.3f}"
        )
        if a.cpu_seconds and b.cpu_seconds and min(b.cpu_seconds) > 0:
            print(
                f"  CPU-time ratio {names[0]}/{names[1]} (median per round; cross-check on CPU): "
                f"{cpu_time_ratio(a, b):.3f}"
            )
    for key, value in (extra or {}).items():
        print(f"  {key}: {value}")
    interval: dict[str, float] | None = None
    if rounds:
        low, high, coverage = median_interval(rounds)
        interval = {"low": low, "high": high, "coverage": coverage}
        print(
            f"  interval for the headline (median of {len(rounds)} per-round ratios): [{low:.3f}, "
            f"{high:.3f}], coverage {coverage:.1%}"
        )
    more: dict[str, dict[str, Any]] = {}
    for h in headlines or []:
        d = more[h.name] = h.as_dict()
        iv = d["ratio_interval"]
        cpu = f", CPU-time ratio {d['cpu_time_ratio']:.3f}" if d["cpu_time_ratio"] is not None else ""
        print(
            f"headline {h.name}: ratio {d['ratio_name']} = {d['ratio']:.3f} "
            f"[{iv['low']:.3f}, {iv['high']:.3f} at {iv['coverage']:.1%}]"
            f"{cpu} (target {h.target}): {'PASS' if d['passed'] else 'MISS'}"
        )
    verdict = "PASS" if passed else "MISS"
    print(f"ratio {ratio_name} = {ratio_value:.3f} (target {target}): {verdict}")
    result = {
        "bench": bench,
        "command": cmd,
        "machine": host,
        "timings": {
            k: {
                "seconds": t.seconds,
                "cpu_seconds": t.cpu_seconds,
                "median": t.median,
                "images_per_second": t.items_per_second,
            }
            for k, t in timings.items()
        },
        "ratio_name": ratio_name,
        "ratio": ratio_value,
        "ratio_interval": interval,
        "target": target,
        "passed": passed,
        "headlines": more,
        "extra": extra or {},
    }
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    return result
