"""Evaluate a model under attacks and protocols, fanned out on Ray, tracked in MLflow.

    python jobs/evaluate.py --run-id <mlflow run id>            # the checkpoint of a training run (its last epoch)
    python jobs/evaluate.py --run-id <id> --selected val        # its epoch selected on the validation split
    python jobs/evaluate.py --checkpoint ray_results/<run>/<epoch>/checkpoint.pt
    python jobs/evaluate.py --model-uri models:/<name>@<alias>  # or runs:/<run id>/model: a logged model
    python jobs/evaluate.py --model mypkg.nets:build --weights net.safetensors [--factory-arg depth=18] \
        --set data.data_dir=DIR                                 # any torch.nn.Module on images in [0, 1]
        [--attacks fgsm,pgd20,...] [--protocols transfer,eot,...] [--trials N] [--limit N] [--batch-size B]
        [--inference-draws R]
    ray job submit --working-dir . -- python jobs/evaluate.py --run-id <id>

Every (attack, protocol, trial, shard of the test set) is a Ray task; finished units are stored
as they come in, so running the same command again skips them (an interrupted evaluation
resumes). It prints progress (units done / total, elapsed, ETA), then the paper-style tables and
where the Parquet table and the MLflow run are. A bad input (unknown attack or protocol, missing
checkpoint, unknown run, a --model that cannot be imported or built, weights that do not fit it) is
one line on stderr and exit code 2, before Ray starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence  # noqa: E402

from jobs.cli import OneLineParser, run_main  # noqa: E402
from rna_core.config import EvalConfig  # noqa: E402
from rna_core.errors import ConfigError  # noqa: E402

PROG = "evaluate.py"

# Each option flag is a key of the config's `eval:` section (rna_core/eval_config.py): the flags
# only name them, the section holds the defaults, and the config coerces and checks the values
# (as it does for `--set eval.<key>=VALUE`). (flag, eval key, help)
FLAGS = (
    ("--attacks", "attacks", "comma-separated attack names"),
    ("--protocols", "protocols", "comma-separated among transfer, transfer-raw, early-stop, fixed-path, eot"),
    ("--trials", "trials", "repetitions with distinct seeds, for the stability summary"),
    ("--limit", "limit", "test images: a fixed subset spread over the classes, as data.eval_limit; 0 = all"),
    ("--batch-size", "batch_size", "default: the checkpoint's data.eval_batch_size"),
    ("--seed", "seed", "base seed of the path draws and attacks"),
    ("--eot-iter", "eot_iter", "path draws averaged per gradient under eot"),
    ("--forward-precision", "forward_precision", "the model's forward in attacks and scoring: fp32 or bf16"),
    ("--inference-draws", "inference_draws", "R: scoring draws per example, for worst-of-R and vote-of-R"),
    ("--strategy", "strategy", "path sampling strategy of the protocols (default: the checkpoint's train.sampling)"),
    ("--shard-size", "shard_size", "test images per Ray task, rounded up to whole batches"),
    ("--path-analysis", "path_analysis", "images for accuracy-vs-path-distance and the transfer matrix; 0 = skip"),
    ("--path-attack", "path_attack", "attack of the path analysis"),
    ("--cpus-per-task", "cpus_per_task", "CPUs per Ray task"),
    ("--gpus-per-task", "gpus_per_task", "GPU share per task on GPU clusters (default: sized from the model)"),
    ("--gpu-memory-gib", "gpu_memory_gib", "GiB of each GPU, for sizing tasks (default 22.5: a 24 GB card)"),
    ("--max-in-flight", "max_in_flight", "tasks submitted at once (default: twice what the cluster runs at once)"),
    ("--max-retries", "max_retries", "Ray retries of a failed task"),
    ("--out", "out_dir", "result folder (default: eval_results/<model>-<fingerprint> under the base folder)"),
)


def _default_text(key: str) -> str:
    value = getattr(EvalConfig(), key)
    return ",".join(value) if isinstance(value, tuple) else str(value)


def attack_set_override(text: str) -> str:
    """`pgd20.steps=10` -> `eval.attack_settings.pgd20.steps=10` (eps, step_size in pixels/255)."""
    key, sep, raw = text.partition("=")
    attack, dot, name = key.strip().partition(".")
    if not sep or not dot or not attack or not name:
        raise ConfigError(f"--attack-set '{text}' is not ATTACK.SETTING=VALUE; write e.g. --attack-set pgd20.steps=10")
    return f"eval.attack_settings.{attack.strip().lower()}.{name.strip()}={raw}"


def eval_overrides(args) -> list[str]:
    """The `--set` overrides, then every option flag given, as `eval.<key>=VALUE` overrides."""
    out = list(args.overrides)
    for _flag, key, _ in FLAGS:
        value = getattr(args, key)
        if value is not None:
            out.append(f"eval.{key}={value}")
    out += [attack_set_override(t) for t in args.attack_set]
    return out


def parse_args(argv: Sequence[str] | None):
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="MLflow run of a training job (its checkpoint artifact is evaluated)")
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint.pt written by jobs/train.py")
    src.add_argument(
        "--model-uri",
        metavar="URI",
        help="an MLflow model logged by jobs/train.py: models:/<name>@<alias>, models:/<name>/<version>, "
        "runs:/<run id>/model (or model_selected_val); nested under its training run",
    )
    src.add_argument(
        "--model",
        metavar="MODULE:FACTORY",
        help="a user's model: FACTORY(**factory args) in MODULE (importable from the current folder or PYTHONPATH) "
        "returns a torch.nn.Module on images in [0, 1] (wrap your own normalisation); randomized models: "
        "rna_core/randomness.py",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="with --model: its state dict (torch.save, read with weights_only=True, or .safetensors)",
    )
    p.add_argument(
        "--factory-arg",
        dest="factory_args",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="with --model: a keyword argument of the factory (value read as YAML: 18, true, text); repeatable",
    )
    p.add_argument(
        "--selected",
        choices=("val", "test"),
        default=None,
        help="with --run-id: the run's checkpoint selected on the validation split (val) or on the test set "
        "(test, the papers' way, labelled so) instead of its last epoch",
    )
    for flag, key, text in FLAGS:
        p.add_argument(flag, dest=key, default=None, help=f"{text} (eval.{key}; default: {_default_text(key)})")
    p.add_argument(
        "--attack-set",
        action="append",
        default=[],
        metavar="ATTACK.KEY=VALUE",
        help="change an attack's setting, e.g. pgd20.steps=10 or fgsm.eps=4 (eps, step_size in pixels/255; "
        "eval.attack_settings); repeatable",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the checkpoint's config (with --model: the default config), e.g. --set data.data_dir=DIR or "
        "--set ray.address=local; repeatable",
    )
    return p.parse_args(argv)


def job(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    os.environ.setdefault(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
    )  # the checkpoint download's bar: noise in job logs
    from pipelines.evaluation.job import FAIL_ONCE_ENV, run_evaluation
    from pipelines.evaluation.plan import plan_evaluation
    from pipelines.evaluation.source import load_external_source, load_source
    from pipelines.evaluation.store import TABLES_FILE
    from pipelines.model_uri import load_uri_source

    # Validation only (nothing started or written) up to run_evaluation.
    overrides = eval_overrides(args)
    if args.model is None and (args.weights is not None or args.factory_args):
        raise ConfigError("--weights and --factory-arg go with --model MODULE:FACTORY")
    if args.model_uri is not None:  # pipelines.model_uri: a logged model's checkpoint
        if args.selected is not None:
            raise ConfigError(
                "--selected goes with --run-id; with --model-uri name the model, e.g. runs:/<id>/model_selected_val"
            )
        source = load_uri_source(args.model_uri, overrides)
    elif args.model is not None:
        if args.selected is not None:
            raise ConfigError("--selected picks a checkpoint of a training run (--run-id), not of a --model")
        source = load_external_source(args.model, args.weights, args.factory_args, overrides)
    else:
        source = load_source(
            run_id=args.run_id, checkpoint=args.checkpoint, overrides=overrides, selected=args.selected
        )
    plan = plan_evaluation(source)

    def echo(line: str) -> None:
        print(line, flush=True)

    out = run_evaluation(plan, echo, fail_once_marker=os.environ.get(FAIL_ONCE_ENV) or None)

    from pipelines.mlflow_ui import ui_command

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
    print(
        f"  mlflow run  {out.mlflow.run_id} (experiment id {out.mlflow.experiment_id}{nested}), store "
        f"{out.mlflow.tracking_uri}"
    )
    print(f"  mlflow ui   {ui_command(out.mlflow.tracking_uri)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, job, argv)


if __name__ == "__main__":
    sys.exit(main())
