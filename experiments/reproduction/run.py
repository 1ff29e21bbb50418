"""The reproduction experiment end to end: the four-arm sweep, then every evaluation, then the report.

    RNA_BASE_DIR=/work/rna_experiments/reproduction \\
        python experiments/reproduction/run.py --data-dir /work/shared/data/cifar10 [--set key=value ...]

Resumable at every level: the sweep (jobs/sweep.py resumes its folder: finished trials are kept,
an interrupted one continues from its last epoch checkpoint), each evaluation (jobs/evaluate.py
skips finished units of its result folder) and this driver (`<base>/reproduction/state.json`
records each finished step with its wall time and MLflow run id). Running the same command again
continues where it stopped. Everything it writes is under $RNA_BASE_DIR, which must be outside the
checkout. `--set` overrides reach the sweep (e.g. `--set train.epochs=1` for a dry run; a changed
sweep needs a new `--set sweep.name=...`, and the evaluations follow the sweep's name).

The evaluation plan per model (the seed's Table 1, Table 3 and Table 4, each with the adaptive
columns beside it) is PLAN below; a deterministic model (plain BatchNorm) scores the same under
every protocol, so it runs the `transfer` rows only (the report says so).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
PRESET = "configs/reproduction_cpu.yaml"
STATE = "reproduction/state.json"
ARMS = ("bn", "rna", "rpt", "rna_eot")
DETERMINISTIC = ("bn",)  # one candidate norm, no random layer: every protocol scores the same


@dataclass(frozen=True)
class Step:
    """One jobs/evaluate.py call per model: a group of attacks x protocols that share a size."""

    name: str
    table: str  # where the report shows it
    attacks: str
    protocols: str
    limit: int
    trials: int = 1
    extra: tuple[str, ...] = ()
    random_only: bool = False  # skipped for deterministic models
    path_analysis: bool = False  # this step also runs the path analysis (random models)
    precision: str = "fp32"  # the model's forward in attacks and scoring (jobs/evaluate.py --forward-precision)

    def protocols_for(self, arm: str) -> str:
        if arm in DETERMINISTIC:
            kept = [p for p in self.protocols.split(",") if p not in ("fixed-path", "eot")]
            return ",".join(kept) or "transfer"
        return self.protocols


# The costly, repeated steps (AutoAttack and AutoAttack-rand, Table 4's ten trials) run the model's forward
# in bf16: 2.0-2.8x less CPU time here, within 0.1 points of fp32 on 1,000 images (docs/benchmarks.md,
# section 7). Table 4's first trial shares its seeds with the fp32 single-trial steps (same images,
# paths and random starts), so the report checks bf16 against fp32 on these very checkpoints.
BF16 = "bf16"
CW_STEPS = 100  # the paper's 1,000 Adam steps cost 1,000 forward-backward passes per image (sized; named)
EOT_ITER = 10

PLAN: tuple[Step, ...] = (
    # Table 1 (transfer, the paper's) with the white-box bound beside it; path analysis on PGD-20
    Step("table1", "table1", "natural,fgsm,pgd20,mifgsm", "transfer,fixed-path", 1000, path_analysis=True),
    # the adaptive column: EOT-PGD (PGD-20, every gradient averaged over EOT_ITER fresh paths)
    Step("eot", "table1", "eot_pgd", "eot", 1000, extra=("--eot-iter", str(EOT_ITER)), random_only=True),
    # Table 3: early-stop PGD-20 (Double-Win Quant's evaluation)
    Step("early_stop", "table3", "pgd20", "early-stop", 1000),
    # Table 1's costly columns
    Step(
        "cw_deepfool",
        "table1",
        "cw_l2,deepfool",
        "transfer,fixed-path",
        1000,
        extra=("--attack-set", f"cw_l2.steps={CW_STEPS}"),
    ),
    Step("autoattack", "table1", "autoattack", "transfer,fixed-path", 500, precision=BF16),
    Step("autoattack_rand", "table1", "autoattack_rand", "eot", 500, random_only=True, precision=BF16),
    # Table 4: stability over 10 trials
    Step("stability", "table4", "pgd20", "transfer,fixed-path", 1000, trials=10, precision=BF16),
    Step(
        "stability_eot",
        "table4",
        "eot_pgd",
        "eot",
        1000,
        trials=10,
        extra=("--eot-iter", str(EOT_ITER)),
        random_only=True,
        precision=BF16,
    ),
)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"steps": {}}


def save_state(path: Path, state: dict[str, Any], written: set[str]) -> None:
    """Write the state, merged with the file as it is now: only the steps this process ran
    (`written`) replace the file's, so a second driver (`--evaluate-only` beside a running sweep)
    never erases the other's records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = load_state(path)
    steps = {**fresh.get("steps", {}), **{k: v for k, v in state["steps"].items() if k in written}}
    merged = {**fresh, **{k: v for k, v in state.items() if k != "steps"}, "steps": steps}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    os.replace(tmp, path)
    state["steps"] = steps


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, str]:
    """Run a job, its output appended to `log` and echoed; (exit code, seconds, output)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    lines: list[str] = []
    with log.open("a") as f:
        f.write(f"\n### {now()} {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            lines.append(line)
            print(line, end="", flush=True)
        rc = proc.wait()
    return rc, time.time() - start, "".join(lines)


def run_with_retries(
    cmd: list[str], log: Path, env: dict[str, str], retries: int, pause: float = 60.0
) -> tuple[int, float, str]:
    """run_logged, again after a pause when it fails (every job resumes where it stopped): on a
    loaded machine a local Ray can time out while starting. An interrupt (exit 130) is not retried."""
    total = 0.0
    for attempt in range(retries + 1):
        rc, seconds, output = run_logged(cmd, log, env)
        total += seconds
        if rc in (0, 2, 130) or attempt == retries:  # 2: a bad input, the same every time
            return rc, total, output
        print(f"run.py: exit {rc}; retrying in {pause:.0f}s ({attempt + 1} of {retries})", file=sys.stderr, flush=True)
        time.sleep(pause)
    return rc, total, output


def sweep_command(data_dir: str, overrides: list[str], ray_address: str = "local") -> list[str]:
    cmd = [sys.executable, "jobs/sweep.py", "--config", PRESET, "--set", f"data.data_dir={data_dir}"]
    cmd += ["--set", f"ray.address={ray_address}"] if ray_address else []
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def trial_runs(base: Path, sweep_name: str) -> dict[str, dict[str, Any]]:
    """arm -> {run_id, status, trial_id, seconds} of the sweep's trial runs (from MLflow)."""
    sys.path.insert(0, str(REPO))
    from pipelines import tracking
    from pipelines.sweep.driver import SWEEP_FILE, child_runs

    job = base / "ray_results" / sweep_name / SWEEP_FILE
    if not job.is_file():
        return {}
    parent = tracking.RunRef.from_dict(json.loads(job.read_text())["mlflow"])
    client = tracking.client_for(parent.tracking_uri)
    out: dict[str, dict[str, Any]] = {}
    for run in child_runs(client, parent):
        arm = run.data.tags.get("rna.arm")
        if not arm:
            continue
        end = run.info.end_time or 0
        out[arm] = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "trial_id": run.data.tags.get("rna.trial_id", ""),
            "epochs_done": run.data.metrics.get("epoch"),
            "seconds": (end - run.info.start_time) / 1000 if end else None,
            "parent_run_id": parent.run_id,
            "experiment_id": parent.experiment_id,
            "tracking_uri": parent.tracking_uri,
        }
    return out


def evaluate_command(
    step: Step,
    arm: str,
    run_id: str,
    data_dir: str,
    out_dir: Path,
    cap_limit: int = 0,
    cap_trials: int = 0,
    ray_address: str = "local",
    cw_steps: int = CW_STEPS,
    bf16: bool = True,
) -> list[str]:
    limit = min(step.limit, cap_limit) if cap_limit else step.limit
    trials = min(step.trials, cap_trials) if cap_trials else step.trials
    cmd = [sys.executable, "jobs/evaluate.py", "--run-id", run_id, "--attacks", step.attacks]
    cmd += ["--protocols", step.protocols_for(arm), "--limit", str(limit), "--trials", str(trials)]
    cmd += ["--path-analysis", "256" if step.path_analysis and arm not in DETERMINISTIC else "0"]
    extra = [e.replace(f"cw_l2.steps={CW_STEPS}", f"cw_l2.steps={cw_steps}") for e in step.extra]
    cmd += ["--forward-precision", step.precision] if step.precision != "fp32" and bf16 else []
    cmd += [*extra, "--out", str(out_dir), "--set", f"data.data_dir={data_dir}"]
    cmd += ["--set", f"ray.address={ray_address}"] if ray_address else []
    return cmd


def resolve_bf16_steps(choice: str) -> tuple[bool, str]:
    """Whether the plan's bf16 steps run in bf16 here, and why.

    `auto` follows this machine: bf16 where it has a fast path (AMX / AVX-512 BF16, a CUDA GPU
    with bf16 tensor cores); elsewhere bf16 is emulated and slower than fp32 (measured on an AMD
    EPYC without AVX-512: the trainings' `auto` turned bf16 off there), so every step runs fp32.
    For a cluster whose GPUs the driver's machine does not have, say `on`.
    """
    if choice in ("on", "off"):
        return choice == "on", f"--bf16-steps {choice}"
    sys.path.insert(0, str(REPO))
    from rna_core.speed import bf16_fast_path

    for device in ("cuda", "cpu"):
        reason = bf16_fast_path(device)
        if reason:
            return True, f"auto: {reason}"
    return False, "auto: no bf16 fast path on this machine (every step fp32)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True, help="folder with CIFAR-10 train.parquet / test.parquet")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--sweep-name", default="reproduction_cpu", help="the sweep.name the overrides leave")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", default=",".join(s.name for s in PLAN), help="evaluation steps to run, in order")
    p.add_argument("--cap-limit", type=int, default=0, help="dry runs only: at most this many test images per step")
    p.add_argument("--cap-trials", type=int, default=0, help="dry runs only: at most this many trials per step")
    p.add_argument("--ray-address", default="local", help="ray.address of every job ('' = a running cluster)")
    p.add_argument("--cw-steps", type=int, default=CW_STEPS, help="CW-L2's Adam steps (the paper: 1000)")
    p.add_argument(
        "--evaluate-only",
        action="store_true",
        help="skip the sweep: evaluate the arms whose training already finished (e.g. while the others train)",
    )
    p.add_argument(
        "--bf16-steps",
        choices=("auto", "on", "off"),
        default="auto",
        help="the plan's costly steps in bf16: auto = where this machine has a bf16 fast path",
    )
    p.add_argument("--retries", type=int, default=3, help="retries of a failed job (each resumes its work)")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)

    base_env = os.environ.get("RNA_BASE_DIR")
    if not base_env:
        print("run.py: set RNA_BASE_DIR to a folder outside the checkout (it holds everything)", file=sys.stderr)
        return 2
    base = Path(base_env).resolve()
    if base == REPO or REPO in base.parents:
        print(f"run.py: RNA_BASE_DIR {base} is inside the checkout {REPO}; choose a folder outside it", file=sys.stderr)
        return 2
    data_dir = str(Path(args.data_dir).resolve())
    if not (Path(data_dir) / "train.parquet").is_file() or not (Path(data_dir) / "test.parquet").is_file():
        print(f"run.py: {data_dir} has no train.parquet and test.parquet (CIFAR-10 as Parquet)", file=sys.stderr)
        return 2
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RNA_BASE_DIR": str(base), "PYTHONPATH": str(REPO)}
    state_path = base / STATE
    state = load_state(state_path)
    written: set[str] = set()  # the steps this process records
    logs = base / "reproduction" / "logs"
    state.setdefault("started", now())
    state["data_dir"] = data_dir
    state["overrides"] = args.overrides
    state["sweep_name"] = args.sweep_name
    state["caps"] = {"limit": args.cap_limit, "trials": args.cap_trials}  # 0: the plan's sizes
    state["cw_steps"] = args.cw_steps
    bf16, why = resolve_bf16_steps(args.bf16_steps)
    state["bf16_steps"] = {"choice": args.bf16_steps, "bf16": bf16, "reason": why}  # steps done keep theirs
    print(f"run.py: bf16 steps {'on' if bf16 else 'off'} ({why})", flush=True)
    state["driver_command"] = shlex.join(["python", "experiments/reproduction/run.py", *(argv or sys.argv[1:])])

    # 1. The sweep: the four trainings, one after another (a finished sweep returns at once).
    sweep_cmd = sweep_command(data_dir, args.overrides, args.ray_address)
    sweep_state = state["steps"].get("sweep", {})
    if sweep_state.get("rc") != 0 and not args.evaluate_only:
        written.add("sweep")  # recorded as running first, so the report can say what is going on
        state["steps"]["sweep"] = {**sweep_state, "command": shlex.join(sweep_cmd), "rc": None, "running_since": now()}
        save_state(state_path, state, written)
        rc, seconds, _ = run_with_retries(sweep_cmd, logs / "sweep.log", env, args.retries)
        written.add("sweep")
        state["steps"]["sweep"] = {
            "command": shlex.join(sweep_cmd),
            "rc": rc,
            "seconds": seconds + float(sweep_state.get("seconds", 0.0)),  # over all attempts
            "finished": now(),
        }
        save_state(state_path, state, written)
        if rc != 0:
            print(f"run.py: the sweep exited {rc}; run the same command again to resume it", file=sys.stderr)
            return rc
    runs = trial_runs(base, args.sweep_name)
    state["trials"] = runs
    save_state(state_path, state, written)

    # 2. The evaluations, step by step over the models (the cheap, central columns first).
    steps = [s for name in args.steps.split(",") for s in PLAN if s.name == name]
    failed = 0
    for step in steps:
        for arm in args.arms.split(","):
            if step.random_only and arm in DETERMINISTIC:
                continue
            key = f"eval/{arm}/{step.name}"
            done = state["steps"].get(key, {})
            if done.get("rc") == 0:
                continue
            trial = runs.get(arm)
            if not trial or trial["status"] != "FINISHED":
                print(f"run.py: arm {arm} has no finished training run; skipping {step.name}", file=sys.stderr)
                continue
            out_dir = base / "eval_results" / args.sweep_name / f"{arm}-{step.name}"
            cmd = evaluate_command(
                step,
                arm,
                trial["run_id"],
                data_dir,
                out_dir,
                args.cap_limit,
                args.cap_trials,
                args.ray_address,
                args.cw_steps,
                bf16,
            )
            rc, seconds, output = run_with_retries(cmd, logs / f"eval-{arm}-{step.name}.log", env, args.retries)
            mlflow_run = next(
                (ln.split()[2] for ln in output.splitlines() if ln.strip().startswith("mlflow run")), None
            )
            written.add(key)
            state["steps"][key] = {
                "command": shlex.join(cmd),
                "rc": rc,
                "seconds": seconds + float(done.get("seconds", 0.0)),
                "out_dir": str(out_dir),
                "mlflow_run_id": mlflow_run or done.get("mlflow_run_id"),
                "finished": now(),
                "arm": arm,
                "step": step.name,
            }
            save_state(state_path, state, written)
            failed += rc != 0
            if not args.no_report:
                write_report(base, env)

    complete = all(
        state["steps"].get(f"eval/{arm}/{s.name}", {}).get("rc") == 0
        for s in PLAN
        for arm in ARMS
        if not (s.random_only and arm in DETERMINISTIC)
    )
    state["finished"] = now() if complete and not failed else None
    save_state(state_path, state, written)
    if not args.no_report:
        write_report(base, env)
    return 1 if failed else 0


def write_report(base: Path, env: dict[str, str]) -> None:
    """The report from what is there now (into <base>/reproduction/report; docs/ is the checkout's copy)."""
    out = base / "reproduction" / "report"
    cmd = [sys.executable, "experiments/reproduction/report.py", "--base", str(base), "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, env=env, check=False)


if __name__ == "__main__":
    sys.exit(main())
