"""Adversarial training of a randomized model on Ray Train, tracked in MLflow (the main job).

    python jobs/train.py --config configs/smoke.yaml [--set key=value ...]
    ray job submit --working-dir . -- python jobs/train.py --config configs/<preset>.yaml
    python jobs/train.py --resume ray_results/<run name> [--set train.epochs=300]

Without `ray job submit` the job connects to a cluster started with `ray start` on this machine,
or starts a local Ray itself. It prints one line per epoch and, at the end, where the MLflow run
and the checkpoint are and how to open the MLflow UI. A bad config, a missing dataset or a run
folder that does not fit is one line on stderr and exit code 2, before Ray starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence  # noqa: E402

from jobs.cli import OneLineParser, add_config_arguments, config_from_args, run_main  # noqa: E402

PROG = "train.py"


def parse_args(argv: Sequence[str] | None):
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_config_arguments(p, required=False)
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its last checkpoint into the same MLflow run (the folder printed at the end "
        "of a run)",
    )
    args = p.parse_args(argv)
    if not args.config and not args.resume:
        p.error("give --config PRESET.yaml (e.g. configs/smoke.yaml) or --resume RUN_DIR")
    return args


def job(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars of MLflow's copies: log noise
    # Everything below up to run_training only validates: no Ray, no MLflow yet.
    from pipelines.run_folder import resolve_run_dir
    from pipelines.train import load_resume_config, run_training
    from rna_core.evaluation import final_metric_names

    if args.resume and not args.config:
        cfg = load_resume_config(resolve_run_dir(args.resume), args.overrides)
    else:
        cfg = config_from_args(args)

    def echo(line: str) -> None:
        print(line, flush=True)

    out = run_training(cfg, config_path=args.config, resume=args.resume, echo=echo)

    from pipelines.mlflow_ui import experiment_url, ui_command

    f = out.final_metrics
    names = list(final_metric_names(cfg.train).values())
    print("", flush=True)
    resumed = f" (resumed after epoch {out.start_epoch})" if out.resumed else ""
    print(f"done: {out.run_name}, {out.epochs_done} epoch{'' if out.epochs_done == 1 else 's'}{resumed}")
    if f:
        scores = "  ".join(f"{n} {f.get(n, float('nan')):.4f}" for n in names)
        print(f"  results     {scores}  on {int(f.get('eval_images', 0))} held-out images (last epoch: the result)")
        for which, info in out.selected.items():
            scores = "  ".join(f"{n} {f.get(f'{which}_selected_{n}', float('nan')):.4f}" for n in names)
            biased = "  (selected on the test set: biased upward)" if which == "test" else ""
            print(f"  selected    on {which}, epoch {info['epoch']}: {scores}{biased}")
    print(
        f"  mlflow run  {out.mlflow.run_id} in experiment '{out.experiment}' (id {out.mlflow.experiment_id}), "
        f"store {out.mlflow.tracking_uri}"
    )
    print(f"  checkpoint  {out.checkpoint}")
    for which, info in out.selected.items():
        print(
            f"  selected    {info['checkpoint']}  (python jobs/evaluate.py --run-id {out.mlflow.run_id} "
            f"--selected {which})"
        )
    for which, m in out.models.items():
        label = "model" if which == "last" else f"model ({which})"
        also = ", ".join(u for u in (m.get("alias_uri"), m.get("registered")) if u)
        print(f"  {label:<11} {m['run_uri']}" + (f"  ({also})" if also else ""))
    print(f"  run folder  {out.run_dir}")
    print(f"  mlflow ui   {ui_command(out.mlflow.tracking_uri)}")
    print(f"              then open {experiment_url(out.mlflow.tracking_uri, out.mlflow.experiment_id)}")
    last = out.models.get("last") or {}
    target = f"--model-uri {last.get('alias_uri') or last['run_uri']}" if last else f"--run-id {out.mlflow.run_id}"
    print(f"  evaluate    python jobs/evaluate.py {target}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, job, argv)


if __name__ == "__main__":
    sys.exit(main())
