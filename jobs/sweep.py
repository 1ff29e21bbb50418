"""Ray Tune sweep of adversarial training runs (random spaces, sampling strategies, hyperparameters).

    python jobs/sweep.py --config configs/sweep_smoke.yaml [--set key=value ...]
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweep_random_space_ablation.yaml
    python jobs/sweep.py --config configs/sweep_smoke.yaml --resume

The config is a training config plus a `sweep:` section (see rna_core/sweep_config.py). `--set` reaches
both parts (`--set train.epochs=1`, `--set sweep.max_concurrent_trials=1`). Running a sweep whose
folder exists resumes it (Tune's restore: finished trials are not run again); `--resume` insists
on that. A bad config is one line on stderr and exit code 2, before Ray starts. At the end it
prints the leaderboard and where the MLflow parent run and the summary are.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collections.abc import Sequence  # noqa: E402

from jobs.cli import EXIT_INTERRUPTED, OneLineParser, add_config_arguments, run_main  # noqa: E402

PROG = "sweep.py"
EXIT_TRIALS_FAILED = 1


def parse_args(argv: Sequence[str] | None):
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_config_arguments(p, required=True)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in its folder (Tune's restore); without it an existing folder is resumed too",
    )
    return p.parse_args(argv)


def job(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars of MLflow's copies: log noise
    # Everything up to run_sweep's Ray start only validates: no Ray, no MLflow yet.
    from pipelines.sweep.driver import run_sweep
    from pipelines.sweep.spec import load_sweep_config

    sc = load_sweep_config(args.config, args.overrides)

    def echo(line: str) -> None:
        print(line, flush=True)

    out = run_sweep(sc, config_path=args.config, resume=args.resume, echo=echo)

    from pipelines.mlflow_ui import compare_url, ui_command

    print("", flush=True)
    if out.interrupted:
        print(
            f"interrupted: {out.name}; {sum(r['status'] != 'incomplete' for r in out.rows)} of "
            f"{len(out.rows)} trials done"
        )
        print(f"  resume      python jobs/sweep.py --config {args.config} --resume")
        print(f"  folder      {out.sweep_dir}")
        return EXIT_INTERRUPTED
    print(out.leaderboard.rstrip())
    print("")
    print(
        f"done: sweep {out.name}, {len(out.rows)} trials"
        + (" (resumed)" if out.resumed else "")
        + (f", {out.num_errors} failed" if out.num_errors else "")
    )
    print(
        f"  mlflow run  {out.parent.run_id} (parent) in experiment '{out.experiment}' "
        f"(id {out.parent.experiment_id}), store {out.parent.tracking_uri}"
    )
    print(f"  summary     {out.summary_dir}")
    print(f"  folder      {out.sweep_dir}")
    print(f"  mlflow ui   {ui_command(out.parent.tracking_uri)}")
    runs = [r["mlflow_run_id"] for r in out.rows if r.get("mlflow_run_id")]
    if runs:
        print(f"  compare     {compare_url(out.parent.tracking_uri, out.parent.experiment_id, runs)}")
    return EXIT_TRIALS_FAILED if out.num_errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, job, argv)


if __name__ == "__main__":
    sys.exit(main())
