"""Size the reproduction experiment by measurement: what one training step and one attacked
test image cost for each arm and candidate architecture, on this machine, corrected for load.

Other jobs share the 2 cores, so absolute times mean little. Every case is timed interleaved
(bench.common.measure_interleaved) beside a reference case whose time on the idle machine is
known: a ResNet-18 attack pass (forward + input gradient, batch 64, 2 threads, train mode), in bf16 +
channels_last where the CPU has a bf16 fast path (0.19 s on the idle Intel/AMX machine, STACK.md,
checked 2026-12-01), in fp32 where it has none (1.3 s on the idle AMD EPYC, 2026-12-03). A case's
idle-machine estimate is its measured time x (the reference's idle time / its measured time in the
same rounds): a ratio, which survives load far better than either time.

    PYTHONPATH=. python experiments/reproduction/size.py --archs small_cnn,wrn16_2 --pgd-steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import measure_interleaved, random_batch  # noqa: E402
from pipelines.sweep.spec import arm_params, base_config, load_sweep_config, trial_config  # noqa: E402
from rna_core import create_model  # noqa: E402
from rna_core.builders import effective_train_config, model_from_config  # noqa: E402
from rna_core.evaluation import evaluate_model  # noqa: E402
from rna_core.evaluation.protocols import SHARED_ATTACK  # noqa: E402
from rna_core.optim import build_optimizer  # noqa: E402
from rna_core.paths import PathSampler  # noqa: E402
from rna_core.speed import as_channels_last, bf16_fast_path, use_channels_last  # noqa: E402
from rna_core.training import train_step  # noqa: E402

# The reference pass and its time on the idle machine, by whether the CPU has a bf16 fast path: the
# bf16 pass on one without it is emulated and some 140 times slower (AMD EPYC, 2026-12-03: 26.7 s), which
# would scale every estimate down by as much.
REFERENCE_IDLE_SECONDS = 0.19  # STACK.md: ResNet-18 attack pass, batch 64, bf16 + channels_last, 2 threads (AMX)
REFERENCE_IDLE_SECONDS_FP32 = 1.3  # the same pass in fp32, contiguous: fastest of 7, AMD EPYC, load 0.0, 2026-12-03
PRESET = Path(__file__).resolve().parents[2] / "configs" / "reproduction_cpu.yaml"


def reference_kind() -> tuple[bool, float]:
    """(bf16 reference, its idle seconds) for this machine."""
    if bf16_fast_path("cpu") is not None:
        return True, REFERENCE_IDLE_SECONDS
    return False, REFERENCE_IDLE_SECONDS_FP32


def reference_case(bf16: bool):
    torch.manual_seed(0)
    model = create_model("resnet18", norm="bn").train()
    x, y = random_batch(64, 0, "cpu")
    if bf16:
        model, x = use_channels_last(model), as_channels_last(x)

    def run() -> None:
        xa = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(xa)
        (g,) = torch.autograd.grad(F.cross_entropy(out.float(), y), xa)

    return run


def train_case(arch: str, arm: str, batch: int, steps: int):
    sc = load_sweep_config(str(PRESET), [f"model.name={arch}", f"train.attack.steps={steps}"])
    cfg = trial_config(base_config(sc), arm_params(sc.sweep, arm, {}))
    tcfg = effective_train_config(cfg)
    torch.manual_seed(0)
    model = model_from_config(cfg)
    opt = build_optimizer(model, tcfg)
    sampler = PathSampler(tcfg.sampling, seed=0)
    x, y = random_batch(batch, 0, "cpu")
    return lambda: train_step(model, x, y, opt, tcfg, sampler)


def eval_case(arch: str, norm: str, attack: str, protocol: str, n: int):
    torch.manual_seed(0)
    model = create_model(arch, norm=norm).eval()
    x, y = random_batch(n, 1, "cpu")
    return lambda: evaluate_model(
        model, [(x, y)], attacks=[attack], protocols=[protocol], include_natural=False, progress=False
    )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="small_cnn,wrn16_2,preact_resnet18")
    p.add_argument("--arms", default="bn,rna,rpt,rna_eot")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--eval", default="pgd20:transfer,eot_pgd:eot,fgsm:transfer", help="attack:protocol,...")
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--from-json", default=None, help="skip the measurement: estimate from an earlier --json file")
    p.add_argument("--train-images", type=int, default=50000)
    p.add_argument("--epochs", default="5,10,15", help="epoch counts to estimate the experiment for")
    args = p.parse_args(argv)
    if args.from_json:
        out = json.loads(Path(args.from_json).read_text())
        add_estimates(out, args)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return out
    torch.set_num_threads(2)
    bf16_reference, reference_idle = reference_kind()
    out: dict = {
        "load_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reference": {"bf16": bf16_reference, "idle_s": reference_idle},
    }
    results = []
    for arch in args.archs.split(","):
        cases = {"reference": reference_case(bf16_reference)}
        for arm in args.arms.split(","):
            cases[f"train {arch} {arm}"] = train_case(arch, arm, args.batch, args.pgd_steps)
        for spec in filter(None, args.eval.split(",")):
            attack, protocol = spec.split(":")
            for norm in ("bn", "bn,gns:1"):
                cases[f"eval {arch} {norm} {attack} {protocol}"] = eval_case(
                    arch, norm, attack, protocol, args.eval_images
                )
        t = measure_interleaved(cases, 1, args.repeats, warmup=1)
        ref = t["reference"]
        for name, timing in t.items():
            if name == "reference":
                continue
            ratios = [a / b for a, b in zip(timing.seconds, ref.seconds)]
            idle = statistics.median(ratios) * reference_idle
            items = args.batch if name.startswith("train") else args.eval_images
            row = {
                "case": name,
                "measured_s": statistics.median(timing.seconds),
                "reference_s": statistics.median(ref.seconds),
                "idle_estimate_s": idle,
                "idle_ms_per_image": 1000 * idle / items,
            }
            results.append(row)
            print(
                f"{name:45s} measured {row['measured_s']:7.2f}s  ref {row['reference_s']:5.2f}s  "
                f"idle~{row['idle_estimate_s']:6.2f}s  {row['idle_ms_per_image']:7.3f} ms/image",
                flush=True,
            )
    out["load_after"] = os.getloadavg()
    out["results"] = results
    out["command"] = "PYTHONPATH=. python experiments/reproduction/size.py " + " ".join(argv or sys.argv[1:])
    add_estimates(out, args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


def add_estimates(out: dict, args: argparse.Namespace) -> None:
    archs = sorted({r["case"].split()[1] for r in out["results"] if r["case"].startswith("train ")})
    out["estimates"] = []
    for arch in archs:
        for epochs in (int(e) for e in args.epochs.split(",")):
            try:
                e = estimate(out["results"], arch, args.train_images, epochs)
            except KeyError:  # a case was not measured for this architecture
                continue
            out["estimates"].append(e)
            print(
                f"estimate {arch:16s} {args.train_images} images x {epochs:3d} epochs: train {e['train_min']:6.1f} min "
                f"+ eval {e['eval_min']:6.1f} min = {e['total_min']:6.1f} min (idle machine)",
                flush=True,
            )
    out["assumptions"] = {"clean": CLEAN, "robust": ROBUST, "passes": {f"{a}/{p}": v for (a, p), v in PASSES.items()}}


# ----------------------------------------------------------------------------- the estimate
# Forward-backward passes per attacked image, relative to one PGD step, for what size.py does not
# time itself (assumptions, written down; the report prints them): AutoAttack's sub-attacks run only
# on examples still robust (ROBUST of the test rows, CLEAN correctly classified), FAB-T's steps cost
# about two passes, Square's 5,000 queries are forwards (a third of a pass); DeepFool works example by
# example (batch-1 passes cost several batched ones). Under transfer/eot an unperturbed output gets
# APGD-CE's 100 steps (the unperturbed rule).
CLEAN, ROBUST = 0.5, 0.3
PASSES = {
    ("natural", "any"): 0.3,
    ("fgsm", "any"): 1.3,
    ("pgd20", "any"): 21.0,
    ("pgd20", "early-stop"): 15.0,
    ("mifgsm", "any"): 6.0,
    ("cw_l2", "fixed-path"): 101.0,
    ("cw_l2", "transfer"): 201.0,  # + APGD-CE fill: with c=1e-4 most outputs come back unperturbed
    ("deepfool", "any"): 250.0,
    ("eot_pgd", "eot"): 201.0,
    ("autoattack", "any"): CLEAN * 100 + ROBUST * (900 + 1800 + 5000 / 3) + ROBUST * 100,
    ("autoattack_rand", "eot"): CLEAN * 2000 + ROBUST * 2000 + ROBUST * 100,
}
PATH_ANALYSIS_PASSES = 256 * 21 * 10  # accuracy vs distance + transfer matrix, ~10 PGD-20 attacks of 256 images


def passes(attack: str, protocol: str) -> float:
    return PASSES.get((attack, protocol), PASSES.get((attack, "any"), 21.0))


def eval_seconds_per_model(arm: str, per_pass_s: float) -> float:
    from experiments.reproduction.run import PLAN

    total = 0.0
    for step in PLAN:
        if step.random_only and arm == "bn":
            continue
        attacks = ["natural", *[a for a in step.attacks.split(",") if a != "natural"]]
        protocols = step.protocols_for(arm).split(",")
        shared = [p for p in protocols if p in SHARED_ATTACK]
        for a in attacks:  # one attack run for the protocols that share it (rna_core run_protocols)
            cost = sum(passes(a, p) for p in protocols if p not in shared)
            cost += max((passes(a, p) for p in shared), default=0.0)
            total += cost * step.limit * step.trials
        if step.path_analysis and arm != "bn":
            total += PATH_ANALYSIS_PASSES
    return total * per_pass_s


def estimate(results: list[dict], arch: str, train_images: int, epochs: int, eval_limit: int = 500) -> dict:
    """Idle-machine minutes of the whole experiment for `arch` (trainings at the measured PGD steps)."""
    by: dict[str, dict] = {}  # a case measured in several runs: the slower one (conservative)
    for r in results:
        if r["case"] not in by or r["idle_estimate_s"] > by[r["case"]]["idle_estimate_s"]:
            by[r["case"]] = r
    pgd_bn = by[f"eval {arch} bn pgd20 transfer"]["idle_ms_per_image"] / 1000  # seconds per image, 21 passes
    pgd_rna = by[f"eval {arch} bn,gns:1 pgd20 transfer"]["idle_ms_per_image"] / 1000
    out = {"arch": arch, "train_images": train_images, "epochs": epochs, "arms": {}}
    for arm in ("bn", "rna", "rpt", "rna_eot"):
        step = by[f"train {arch} {arm}"]["idle_estimate_s"]  # one step of 128 images
        pgd = pgd_bn if arm in ("bn", "rpt") else pgd_rna
        per_epoch = math.ceil(train_images / 128) * step + eval_limit * pgd  # + per-epoch PGD-20 on the slice
        final = eval_limit * pgd * (1 + 10)  # final evaluation: PGD-20 and EOT-PGD (10 draws) on the slice
        train_s = epochs * per_epoch + final + 60  # ~1 min of Ray Train start-up per trial
        eval_s = eval_seconds_per_model(arm, pgd / 21)
        out["arms"][arm] = {"train_min": train_s / 60, "eval_min": eval_s / 60, "epoch_min": per_epoch / 60}
    out["train_min"] = sum(a["train_min"] for a in out["arms"].values())
    out["eval_min"] = sum(a["eval_min"] for a in out["arms"].values())
    out["total_min"] = out["train_min"] + out["eval_min"]
    return out


if __name__ == "__main__":
    main()
