"""The reproduction experiment end to end: the four-arm sweep, each evaluation once its arm trained, the report.

    RNA_BASE_DIR=/work/rna_experiments/reproduction \\
        python experiments/reproduction/run.py --data-dir /work/shared/data/cifar10 [--set key=value ...]

The sweep trains the arms one after another; while it runs, this driver looks at its trials every
`--poll-s` seconds and starts the evaluation steps of each arm whose training finished, at most
`--eval-jobs` at a time (each a jobs/evaluate.py with its own local Ray), so the two cores are not
left to one job's start-ups and serial stretches. The jobs' Ray workers run at niceness 0, not
Ray's 15 (`job_env`), so the jobs share the cores evenly with each other and with plain processes.

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
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
WORKER_NICENESS_ENV = "RAY_worker_niceness"

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


def job_env(base: Path) -> dict[str, str]:
    """The jobs' environment: the base folder, this code, and Ray workers at niceness 0.

    Ray starts its workers at niceness 15 (every thread), which suits a shared workstation but not this
    experiment: its evaluation jobs run beside the sweep, and anything at niceness 0 (a driver, a report,
    the user's shell) would take the cores from the workers that train and attack. Each job's local Ray
    reads `RAY_worker_niceness` (Ray's own setting); a value set by the user is kept.
    """
    env = {**os.environ, "RNA_BASE_DIR": str(base), "PYTHONPATH": str(REPO)}
    env.setdefault(WORKER_NICENESS_ENV, "0")
    return env


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
    p.add_argument(
        "--eval-jobs",
        type=int,
        default=2,
        help="evaluation jobs at once, started as soon as their arm's training finished (beside the sweep)",
    )
    p.add_argument(
        "--poll-s", type=float, default=60.0, help="while the sweep runs: seconds between looks at its trials"
    )
    p.add_argument("--retries", type=int, default=3, help="retries of a failed job (each resumes its work)")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)

    if args.eval_jobs < 1 or args.poll_s <= 0:
        print("run.py: --eval-jobs must be >= 1 and --poll-s > 0 (e.g. --eval-jobs 2 --poll-s 60)", file=sys.stderr)
        return 2
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
    env = job_env(base)
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
    state["ray_worker_niceness"] = env[WORKER_NICENESS_ENV]
    bf16, why = resolve_bf16_steps(args.bf16_steps)
    state["bf16_steps"] = {"choice": args.bf16_steps, "bf16": bf16, "reason": why}  # steps done keep theirs
    print(f"run.py: bf16 steps {'on' if bf16 else 'off'} ({why})", flush=True)
    state["driver_command"] = shlex.join(["python", "experiments/reproduction/run.py", *(argv or sys.argv[1:])])

    # 1. The sweep (the four trainings, one after another; a finished sweep returns at once), in a thread,
    # 2. while the evaluations run as soon as their arm's training finished, `--eval-jobs` at a time.
    lock = threading.Lock()  # the state and its file, shared by the sweep's thread and the evaluations'
    with interrupts_stop_the_driver():
        try:
            return drive(args, base, data_dir, env, state, state_path, written, logs, bf16, lock)
        except KeyboardInterrupt:  # before or after the jobs ran (the loop handles one while they run)
            print("run.py: interrupted; run the same command again to resume", file=sys.stderr)
            return 130


def drive(
    args: argparse.Namespace,
    base: Path,
    data_dir: str,
    env: dict[str, str],
    state: dict[str, Any],
    state_path: Path,
    written: set[str],
    logs: Path,
    bf16: bool,
    lock: threading.Lock,
) -> int:
    """The sweep in a thread; the evaluations started as their arms finish training; the report."""
    sweep_thread = None
    sweep_state = state["steps"].get("sweep", {})
    if sweep_state.get("rc") != 0 and not args.evaluate_only:
        sweep_cmd = sweep_command(data_dir, args.overrides, args.ray_address)
        written.add("sweep")  # recorded as running first, so the report can say what is going on
        state["steps"]["sweep"] = {**sweep_state, "command": shlex.join(sweep_cmd), "rc": None, "running_since": now()}
        save_state(state_path, state, written)
        sweep_thread = threading.Thread(
            target=run_sweep,
            args=(sweep_cmd, logs / "sweep.log", env, args.retries, state, state_path, written, lock),
            daemon=True,
        )
        sweep_thread.start()

    steps = [s for name in args.steps.split(",") for s in PLAN if s.name == name]
    units = [
        (step, arm) for step in steps for arm in args.arms.split(",") if not (step.random_only and arm in DETERMINISTIC)
    ]
    running: dict[str, threading.Thread] = {}
    outcome: dict[str, int] = {}  # unit key -> exit code, as each finishes
    runs: dict[str, dict[str, Any]] = {}
    last_poll, polled_after_sweep = -math.inf, False
    stopping = False
    try:
        while True:
            sweep_running = sweep_thread is not None and sweep_thread.is_alive()
            # which arms finished training: every poll_s while the sweep runs, once more after it
            if (sweep_running and time.monotonic() - last_poll >= args.poll_s) or not (
                sweep_running or polled_after_sweep
            ):
                runs = trial_runs(base, args.sweep_name)
                last_poll, polled_after_sweep = time.monotonic(), not sweep_running
                with lock:
                    state["trials"] = runs
                    save_state(state_path, state, written)
            for key in [k for k, t in running.items() if not t.is_alive()]:
                del running[key]
                if not args.no_report:
                    write_report(base, env)
            # a job that saw the interrupt (exit 130: e.g. a Ctrl+C that reached the jobs, not this driver)
            sweep_saw_it = sweep_thread is not None and not sweep_running and state["steps"]["sweep"]["rc"] == 130
            stopping = 130 in outcome.values() or sweep_saw_it
            for step, arm in units:
                key = f"eval/{arm}/{step.name}"
                if len(running) >= args.eval_jobs or stopping:
                    break
                if key in running or key in outcome or state["steps"].get(key, {}).get("rc") == 0:
                    continue
                trial = runs.get(arm)
                if not trial or trial["status"] != "FINISHED":
                    continue  # not trained yet (or its training failed: said once the sweep ended)
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
                job = threading.Thread(
                    target=run_evaluation,
                    args=(cmd, key, arm, step.name, out_dir, logs, env, args.retries, state, state_path, written),
                    kwargs={"lock": lock, "outcome": outcome},
                    daemon=True,
                )
                running[key] = job
                job.start()
            if not running and not sweep_running:
                break
            time.sleep(min(1.0, args.poll_s))
    except KeyboardInterrupt:
        stopping = True
    if stopping:  # Ctrl+C / stop.sh reach the jobs too (one process group): they save their work and exit
        for job in running.values():
            job.join(timeout=120)
        if sweep_thread is not None:
            sweep_thread.join(timeout=120)
        print("run.py: interrupted; run the same command again to resume", file=sys.stderr)
        return 130

    sweep_rc = state["steps"].get("sweep", {}).get("rc")
    for step, arm in units:
        key = f"eval/{arm}/{step.name}"
        if key not in outcome and state["steps"].get(key, {}).get("rc") != 0:
            print(f"run.py: arm {arm} has no finished training run; skipped {step.name}", file=sys.stderr)
    failed = sum(rc != 0 for rc in outcome.values())
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
    if sweep_thread is not None and sweep_rc != 0:
        print(f"run.py: the sweep exited {sweep_rc}; run the same command again to resume it", file=sys.stderr)
        return sweep_rc or 1
    return 1 if failed else 0


@contextmanager
def interrupts_stop_the_driver() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt here while the jobs run, then the handlers are restored.

    launch.sh starts this driver in the background of a script, where the shell sets SIGINT to
    "ignore" and Python then leaves it so: without this, stop.sh's Ctrl+C would stop the jobs but not
    the driver, which would go on starting evaluations.
    """

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_sweep(
    cmd: list[str],
    log: Path,
    env: dict[str, str],
    retries: int,
    state: dict[str, Any],
    state_path: Path,
    written: set[str],
    lock: threading.Lock,
) -> None:
    """The sweep job to its end (with retries), its record in the state when it ends."""
    before = float(state["steps"].get("sweep", {}).get("seconds", 0.0))
    rc, seconds, _ = run_with_retries(cmd, log, env, retries)
    with lock:
        written.add("sweep")
        state["steps"]["sweep"] = {
            "command": shlex.join(cmd),
            "rc": rc,
            "seconds": seconds + before,  # over all attempts
            "finished": now(),
        }
        save_state(state_path, state, written)


def run_evaluation(
    cmd: list[str],
    key: str,
    arm: str,
    step: str,
    out_dir: Path,
    logs: Path,
    env: dict[str, str],
    retries: int,
    state: dict[str, Any],
    state_path: Path,
    written: set[str],
    *,
    lock: threading.Lock,
    outcome: dict[str, int],
) -> None:
    """One evaluation job (one step on one model) to its end, its record in the state when it ends."""
    done = state["steps"].get(key, {})
    started = now()
    rc, seconds, output = run_with_retries(cmd, logs / f"eval-{arm}-{step}.log", env, retries)
    mlflow_run = next((ln.split()[2] for ln in output.splitlines() if ln.strip().startswith("mlflow run")), None)
    with lock:
        written.add(key)
        state["steps"][key] = {
            "command": shlex.join(cmd),
            "rc": rc,
            "seconds": seconds + float(done.get("seconds", 0.0)),
            "out_dir": str(out_dir),
            "mlflow_run_id": mlflow_run or done.get("mlflow_run_id"),
            "started": started,
            "finished": now(),
            "arm": arm,
            "step": step,
        }
        save_state(state_path, state, written)
        outcome[key] = rc


def write_report(base: Path, env: dict[str, str]) -> None:
    """The report from what is there now (into <base>/reproduction/report; docs/ is the checkout's copy)."""
    out = base / "reproduction" / "report"
    cmd = [sys.executable, "experiments/reproduction/report.py", "--base", str(base), "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, env=env, check=False)


if __name__ == "__main__":
    sys.exit(main())
