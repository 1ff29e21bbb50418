"""Benchmark 5, `eval_fanout`: the evaluation fan-out on Ray vs the sequential in-process evaluation.

Same model (small_cnn, RNA), same synthetic test images, same attacks, protocols, trials, batch
size and seeds for every case:
  * fanout_2x1cpu: `pipelines.evaluation.fanout.fan_out` with a local Ray of 2 CPUs, tasks of 1 CPU
    (1 torch thread each), so 2 units run at once; then `gather_rows` sums the unit files.
  * seq_1thread: `rna_core.evaluation.evaluate_model` in this process with 1 torch thread: the
    sequential loop, one unit after another on one core (what each fan-out task runs).
    Headline: seq_1thread / fanout >= 1.6x.
  * seq_2threads: the same with 2 torch threads (what a user gets without Ray on this machine),
    reported beside it with its bound: on C cores no C-process fan-out can beat it by more than
    C * seq_2threads / seq_1thread (2 / 1.44 = 1.39x here, as 2 threads are already 1.44x
    faster than 1), so the fan-out's parallel efficiency (seq_1thread / C / fanout) is printed too.
Ray start-up (`ray.init`) is outside every timed region and reported apart; the untimed warm-up
call of the fan-out also starts the worker processes and caches model and data in them.
Every timed call's accuracies are checked equal to the sequential ones (same seeds per batch).

    PYTHONPATH=. python bench/eval_fanout.py          # full size (~3 min on 2 cores)
    PYTHONPATH=. python bench/eval_fanout.py --tiny   # seconds: for tests
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` and `rna_core` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import (
    Timing,
    add_common_args,
    apply_threads,
    measure_interleaved,
    paired_ratio,
    paired_ratios,
    report,
)
from rna_core.config import config_from_dict

TARGET = 1.6
CORES = 2  # the local Ray's CPUs: the fan-out's workers, and the cores of the bound


def build_plan(args: argparse.Namespace, out_dir: str):
    """The evaluation plan of a freshly initialised small_cnn (weights seeded) on synthetic data."""
    from pipelines.evaluation.plan import plan_evaluation
    from pipelines.evaluation.source import ModelSource
    from rna_core.builders import model_from_config as build_model
    from rna_core.config import EvalConfig as EvalOptions
    from rna_core.distributed import state_digest

    cfg = config_from_dict(
        {
            "model": {"name": args.model, "method": "rna", "norm": "bn,gns:1"},
            "data": {"dataset": "synthetic", "synthetic_size": 4 * args.images, "eval_batch_size": args.batch},
            "train": {"sampling": "uniform", "seed": args.seed},
            "ray": {"use_gpu": "false"},
        }
    )
    torch.manual_seed(args.seed)
    model = build_model(cfg).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    source = ModelSource("checkpoint", "bench", "bench eval_fanout (seeded init)", cfg, state, state_digest(state), "")
    options = EvalOptions(
        attacks=tuple(args.attacks.split(",")),
        protocols=tuple(args.protocols.split(",")),
        trials=args.trials,
        limit=args.images,
        batch_size=args.batch,
        seed=args.seed,
        eot_iter=args.eot_iter,
        shard_size=args.shard,
        path_analysis=0,
        cpus_per_task=1.0,
        out_dir=out_dir,
        progress_every=1e9,
    )
    return plan_evaluation(source, options), model


def counts(rows) -> dict[tuple[str, str, int], tuple[int, int]]:
    return {(r.attack, r.protocol, r.trial): (r.correct, r.n) for r in rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, repeats=3, warmup=1)
    parser.add_argument("--tiny", action="store_true", help="seconds-long run for tests (numbers meaningless)")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shard", type=int, default=32, help="examples per Ray task (unit)")
    parser.add_argument("--attacks", default="pgd20")
    parser.add_argument("--protocols", default="transfer,eot")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--eot-iter", type=int, default=2)
    args = parser.parse_args(argv)
    if args.tiny:
        args.images, args.batch, args.shard, args.attacks, args.repeats = 32, 16, 16, "fgsm", 1
    apply_threads(args.threads)
    load_at_start = " ".join(f"{v:.2f}" for v in os.getloadavg())

    import ray

    from pipelines.evaluation.fanout import fan_out
    from pipelines.evaluation.store import gather_rows
    from rna_core.evaluation.runner import evaluate_model

    work = tempfile.mkdtemp(prefix="rna-bench-eval-")
    plan, model = build_plan(args, str(Path(work) / "plan"))
    o = plan.options
    reference: dict[str, Any] = {}
    checks = {"fanout_calls_equal": 0, "seq_calls_equal": 0}

    def sequential(threads: int):
        def run() -> None:
            torch.set_num_threads(threads)
            rows = evaluate_model(
                model,
                plan.dataset,
                attacks=plan.attacks,
                protocols=o.protocols,
                trials=o.trials,
                seed=o.seed,
                batch_size=o.batch_size,
                eot_iter=o.eot_iter,
                strategy=o.strategy,
                include_natural=False,
                progress=False,
            )
            got = counts(rows)
            if "counts" not in reference:
                reference["counts"] = got
            assert got == reference["counts"], (
                f"sequential ({threads} threads) accuracies differ: {got} vs {reference['counts']}"
            )
            checks["seq_calls_equal"] += 1

        return run

    calls = [0]
    task_seconds: list[float] = []

    def fanout() -> None:
        calls[0] += 1
        p = replace(plan, out_dir=Path(work) / f"fanout-{calls[0]}")
        ran = fan_out(p, list(p.units), lambda line: None, with_paths=False)
        assert ran == len(p.units), f"fan-out ran {ran} of {len(p.units)} units"
        rows = gather_rows(p, "bench")
        task_seconds.append(sum(r.seconds for r in rows))  # compute inside the tasks, summed over units
        got = counts(rows)
        if "counts" not in reference:
            reference["counts"] = got
        assert got == reference["counts"], (
            f"fan-out accuracies differ from the sequential ones: {got} vs {reference['counts']}"
        )
        checks["fanout_calls_equal"] += 1
        shutil.rmtree(p.out_dir, ignore_errors=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=CORES, include_dashboard=False)
    ray_start = time.perf_counter() - t0
    try:
        timings = measure_interleaved(
            {"fanout_2x1cpu": fanout, "seq_2threads": sequential(2), "seq_1thread": sequential(1)},
            items=len(plan.dataset),
            repeats=args.repeats,
            warmup=args.warmup,
        )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        apply_threads(args.threads)

    fan, seq2, seq1 = timings["fanout_2x1cpu"], timings["seq_2threads"], timings["seq_1thread"]
    speedup = paired_ratio(seq1, fan)
    vs_2threads = paired_ratio(seq2, fan)
    # The counts come from sequential and fan-out alike; every timed call was compared to them.
    acc = {f"{a}/{p}/t{t}": f"{c}/{n}" for (a, p, t), (c, n) in sorted(reference["counts"].items())}
    extra = {
        "speedup seq_1thread/fanout (headline)": f"{speedup:.3f}",
        "speedup seq_2threads/fanout": f"{vs_2threads:.3f}",
        "seq_1thread/seq_2threads (in-process thread scaling)": f"{paired_ratio(seq1, seq2):.3f}",
        f"bound on seq_2threads/fanout with {CORES} cores": f"{fanout_bound(seq1, seq2, CORES):.3f}",
        "fan-out parallel efficiency (seq_1thread / cores / fanout)": f"{parallel_efficiency(seq1, fan, CORES):.3f}",
        "fan-out task compute seconds (sum over units, per call incl. warm-up)": ", ".join(
            f"{x:.2f}" for x in task_seconds
        ),
        "ray_start_seconds (ray.init, not timed)": f"{ray_start:.2f}",
        "accuracies_equal": f"True (fan-out calls checked: {checks['fanout_calls_equal']}, "
        f"sequential calls: {checks['seq_calls_equal']})",
        "correct/n": ", ".join(f"{k}={v}" for k, v in acc.items()),
        "setup": f"{args.model}, {len(plan.dataset)} synthetic test images, batch {o.batch_size}, "
        f"{len(plan.units)} units of "
        f"{args.shard} images, attacks natural+{args.attacks}, protocols {','.join(o.protocols)}, eot_iter "
        f"{o.eot_iter}, trials {o.trials}",
        "load_average_at_start (1/5/15 min)": load_at_start,
    }
    # report() prints the per-round ratio of its first two timings: fanout/seq_1thread (the inverse of the headline).
    return report(
        "eval_fanout",
        argv,
        {"fanout_2x1cpu": fan, "seq_1thread": seq1, "seq_2threads": seq2},
        "seq_1thread/fanout_2x1cpu (speedup)",
        speedup,
        f">= {TARGET:.1f}",
        speedup >= TARGET,
        extra,
        args.json,
        rounds=paired_ratios(seq1, fan),
    )


def fanout_bound(seq1: Timing, seq2: Timing, cores: int) -> float:
    """The most a `cores`-process fan-out can gain over the multi-threaded in-process run.

    Perfect fan-out takes seq_1thread / cores; the in-process run with `cores` threads takes
    seq_2threads. Their ratio is the ceiling, whatever the fan-out does (per-round medians).
    """
    return cores * paired_ratio(seq2, seq1)


def parallel_efficiency(seq1: Timing, fan: Timing, cores: int) -> float:
    """How close the fan-out comes to `cores` times the single-core sequential speed (1.0 = perfect)."""
    return paired_ratio(seq1, fan) / cores


if __name__ == "__main__":
    main()
