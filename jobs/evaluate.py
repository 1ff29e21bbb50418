"""Evaluate a trained model under attacks and protocols, fanned out on Ray, tracked in MLflow.

    python jobs/evaluate.py --run-id <mlflow run id>            # the checkpoint of a training run (its last epoch)
    python jobs/evaluate.py --run-id <id> --selected val        # its epoch selected on the validation split
    python jobs/evaluate.py --checkpoint ray_results/<run>/<epoch>/checkpoint.pt
        [--attacks fgsm,pgd20,...] [--protocols transfer,eot,...] [--trials N] [--limit N] [--batch-size B]
    ray job submit --working-dir . -- python jobs/evaluate.py --run-id <id>

Every (attack, protocol, trial, shard of the test set) is a Ray task; finished units are stored
as they come in, so running the same command again skips them (an interrupted evaluation
resumes). It prints progress (units done / total, elapsed, ETA), then the paper-style tables and
where the Parquet table and the MLflow run are. A bad input (unknown attack or protocol, missing
checkpoint, unknown run) is one line on stderr and exit code 2, before Ray starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typing import Any, Sequence  # noqa: E402

import yaml  # noqa: E402

from jobs._cli import OneLineParser, run_main  # noqa: E402
from rna_core.errors import ConfigError  # noqa: E402

PROG = "evaluate.py"
PIXEL_SETTINGS = ("eps", "step_size")  # written in pixels/255 on the command line, like configs


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def parse_attack_settings(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`pgd20.steps=10`, `fgsm.eps=4` -> {"pgd20": {"steps": 10}, "fgsm": {"eps": 4/255}}."""
    out: dict[str, dict[str, Any]] = {}
    for text in items:
        key, sep, raw = text.partition("=")
        attack, dot, name = key.strip().partition(".")
        if not sep or not dot or not attack or not name:
            raise ConfigError(f"--attack-set '{text}' is not ATTACK.SETTING=VALUE; write e.g. --attack-set pgd20.steps=10")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if name in PIXEL_SETTINGS and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = value / 255.0
        out.setdefault(attack.lower(), {})[name] = value
    return out


def parse_args(argv: Sequence[str] | None):
    from pipelines.evaluate import DEFAULT_ATTACKS, DEFAULT_PROTOCOLS, EvalOptions

    d = EvalOptions()
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="MLflow run of a training job (its checkpoint artifact is evaluated)")
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint.pt written by jobs/train.py")
    p.add_argument("--selected", choices=("val", "test"), default=None,
                   help="with --run-id: the run's checkpoint selected on the validation split (val) or on the test set "
                        "(test, the papers' way, labelled so) instead of its last epoch")
    p.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help="comma-separated (default: %(default)s)")
    p.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS), help="comma-separated among transfer, transfer-raw, early-stop, fixed-path, eot (default: %(default)s)")
    p.add_argument("--trials", type=int, default=d.trials, help="repetitions with distinct seeds, for the stability summary (default: %(default)s)")
    p.add_argument("--limit", type=int, default=d.limit, help="test images: a fixed subset spread over the classes; 0 = all (default)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's data.eval_batch_size")
    p.add_argument("--seed", type=int, default=d.seed, help="base seed of the path draws and attacks (default: %(default)s)")
    p.add_argument("--eot-iter", type=int, default=d.eot_iter, help="path draws averaged per gradient under eot (default: %(default)s)")
    p.add_argument("--strategy", default=None, help="path sampling strategy of the protocols (default: the checkpoint's train.sampling)")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="test images per Ray task, rounded up to whole batches (default: %(default)s)")
    p.add_argument("--attack-set", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="change an attack's setting, e.g. pgd20.steps=10 or fgsm.eps=4 (eps, step_size in pixels/255); repeatable")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the checkpoint's config, e.g. --set data.data_dir=DIR or --set ray.address=local; repeatable")
    p.add_argument("--path-analysis", type=int, default=d.path_analysis, metavar="N",
                   help="images for accuracy-vs-path-distance and the transfer matrix; 0 = skip (default: %(default)s)")
    p.add_argument("--path-attack", default=d.path_attack, help="attack of the path analysis (default: %(default)s)")
    p.add_argument("--cpus-per-task", type=float, default=d.cpus_per_task, help="default: %(default)s")
    p.add_argument("--gpus-per-task", type=float, default=d.gpus_per_task, help="GPU fraction per task when the cluster has GPUs (default: %(default)s)")
    p.add_argument("--max-in-flight", type=int, default=None, help="tasks submitted at once (default: twice what the cluster runs at once)")
    p.add_argument("--max-retries", type=int, default=d.max_retries, help="Ray retries of a failed task (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="DIR", help="result folder (default: eval_results/<model>-<fingerprint> under the base folder)")
    return p.parse_args(argv)


def job(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the checkpoint download's bar: noise in job logs
    from pipelines.evaluate import FAIL_ONCE_ENV, TABLES_FILE, EvalOptions, load_source, plan_evaluation, run_evaluation

    options = EvalOptions(
        attacks=_csv(args.attacks), protocols=_csv(args.protocols), trials=args.trials, limit=args.limit,
        batch_size=args.batch_size, seed=args.seed, eot_iter=args.eot_iter, strategy=args.strategy,
        shard_size=args.shard_size, attack_settings=parse_attack_settings(args.attack_set),
        path_analysis=args.path_analysis, path_attack=args.path_attack, cpus_per_task=args.cpus_per_task,
        gpus_per_task=args.gpus_per_task, max_in_flight=args.max_in_flight, max_retries=args.max_retries,
        out_dir=args.out, fail_once_marker=os.environ.get(FAIL_ONCE_ENV) or None,
    )
    # Validation only (nothing started or written) up to run_evaluation.
    source = load_source(run_id=args.run_id, checkpoint=args.checkpoint, overrides=args.overrides, selected=args.selected)
    plan = plan_evaluation(source, options)

    def echo(line: str) -> None:
        print(line, flush=True)

    out = run_evaluation(plan, echo)

    from pipelines.tracking import ui_command

    print("", flush=True)
    print(out.tables.rstrip())
    if plan.options.trials > 1:
        print("\n## Stability over trials\n")
        print(out.stability)
    print("")
    print(f"done: {out.units_run} unit(s) run, {out.units_skipped} already done, in {out.seconds:.1f}s")
    print(f"  results     {out.results_path}")
    print(f"  tables      {Path(out.out_dir) / TABLES_FILE}")
    nested = f", nested under training run {out.parent_run_id}" if out.parent_run_id else ""
    print(f"  mlflow run  {out.mlflow.run_id} (experiment id {out.mlflow.experiment_id}{nested}), store {out.mlflow.tracking_uri}")
    print(f"  mlflow ui   {ui_command(out.mlflow.tracking_uri)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, job, argv)


if __name__ == "__main__":
    sys.exit(main())
