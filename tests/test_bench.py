"""The benchmarks run at a tiny size: their equality checks hold and each prints a ratio and its command.

Timings at this size are meaningless (and this machine is shared), so no test asserts a speed;
the full-size figures live in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import (  # noqa: E402
    at_step,
    common,
    eval_precision,
    gpu,
    norm_layout,
    shared_attack,
    vs_reference_loop,
    vs_torchattacks,
)
from rna_core import create_model  # noqa: E402
from rna_core.config import AttackConfig, TrainConfig  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benches set torch's thread count (--threads 1); give the next tests back theirs."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


TINY = ["--repeats", "1", "--warmup", "0", "--threads", "1"]


def _check_printed(out: str, bench: str, result: dict) -> None:
    assert f"command: PYTHONPATH=. python bench/{bench}.py" in out
    assert f"ratio {result['ratio_name']} = " in out
    assert result["ratio"] > 0 and all(t["seconds"] and min(t["seconds"]) > 0 for t in result["timings"].values())


def test_measure_interleaved_alternates_order_and_counts_calls():
    calls: list[str] = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    timings = common.measure_interleaved(cases, items=4, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then A B / B A / A B
    assert [len(t.seconds) for t in timings.values()] == [3, 3]
    t_slow = common.Timing("slow", 10, [2.0, 4.0, 3.0])
    t_fast = common.Timing("fast", 10, [1.0, 1.0, 2.0])
    assert common.ratio(t_slow, t_fast) == pytest.approx(3.0)
    assert t_slow.items_per_second == pytest.approx(10 / 3)
    assert common.paired_ratios(t_slow, t_fast) == [2.0, 4.0, 1.5]
    assert common.paired_ratio(t_slow, t_fast) == 2.0  # the headline: median of the per-round ratios
    assert common.command_line("bench/x.py", ["--a", "b c"]) == "PYTHONPATH=. python bench/x.py --a 'b c'"


def test_median_interval_uses_order_statistics_with_the_stated_coverage():
    # 7 rounds: x_(1)..x_(7) covers 1 - 2/128 = 98.4%; x_(2)..x_(6) only 87.5% (< 90%).
    rounds = [1.07, 0.95, 1.01, 0.99, 1.03, 0.90, 1.10]
    assert common.median_interval(rounds, 0.9) == (0.90, 1.10, pytest.approx(1 - 2 / 128))
    assert common.median_interval(rounds, 0.85) == (0.95, 1.07, pytest.approx(1 - 2 * 8 / 128))
    # 15 rounds at 90%: k = 4 covers 1 - 2 * 576/32768 = 96.5%; k = 5 would cover only 88.2%.
    fifteen = [float(v) for v in range(15)]
    low, high, coverage = common.median_interval(fifteen, 0.9)
    assert (low, high) == (3.0, 11.0) and coverage == pytest.approx(1 - 2 * 576 / 32768)
    assert low <= statistics.median(fifteen) <= high
    # Too few rounds for 90%: the whole range, with the coverage it really has.
    assert common.median_interval([1.0, 3.0, 2.0], 0.9) == (1.0, 3.0, pytest.approx(0.75))
    with pytest.raises(ValueError):
        common.median_interval([])


def test_report_prints_the_headline_interval(capsys):
    slow, fast = (
        common.Timing("slow", 4, [2.0, 4.0, 3.0, 2.2, 2.4]),
        common.Timing("fast", 4, [1.0, 1.0, 2.0, 1.1, 1.0]),
    )
    rounds = common.paired_ratios(slow, fast)
    result = common.report(
        "x", [], {"slow": slow, "fast": fast}, "slow/fast", common.paired_ratio(slow, fast), ">= 1", True, rounds=rounds
    )
    assert result["ratio_interval"] == {"low": 1.5, "high": 4.0, "coverage": pytest.approx(1 - 2 / 32)}
    assert "[1.500, 4.000], coverage 93.8%" in capsys.readouterr().out


def test_at_step_tiny(capsys, tmp_path):
    argv = ["--model", "small_cnn", "--batch", "4", "--pgd-steps", "2", *TINY, "--json", str(tmp_path / "r.json")]
    result = at_step.main(argv)
    _check_printed(capsys.readouterr().out, "at_step", result)
    assert set(result["timings"]) == {"norm=bn,gns:1", "norm=bn"}
    assert json.loads((tmp_path / "r.json").read_text())["ratio"] == pytest.approx(result["ratio"])


def test_at_step_bf16_reports_the_bf16_step_headlines(capsys, tmp_path):
    argv = [
        "--model",
        "small_cnn",
        "--batch",
        "4",
        "--pgd-steps",
        "2",
        "--amp-bf16",
        "--channels-last",
        *TINY,
        "--json",
        str(tmp_path / "r.json"),
    ]
    result = at_step.main(argv)
    out = capsys.readouterr().out
    _check_printed(out, "at_step", result)
    assert set(result["timings"]) == {"norm=bn,gns:1", "norm=bn", "fp32 norm=bn,gns:1", "fp32 norm=bn"}
    heads = json.loads((tmp_path / "r.json").read_text())["headlines"]
    assert set(heads) == {"bf16_step", "bf16_step_base"}
    assert heads["bf16_step"]["ratio_name"] == "time(fp32 norm=bn,gns:1) / time(norm=bn,gns:1)"
    assert heads["bf16_step"]["target"] == ">= 3.0" and heads["bf16_step"]["cpu_time_ratio"] > 0
    assert "headline bf16_step: ratio time(fp32 norm=bn,gns:1) / time(norm=bn,gns:1) = " in out
    assert "load_average" in result["machine"]


def test_vs_reference_loop_tiny_is_bit_identical(capsys):
    result = vs_reference_loop.main(["--model", "small_cnn", "--batch", "4", "--pgd-steps", "2", "--atol", "0", *TINY])
    out = capsys.readouterr().out
    _check_printed(out, "vs_reference_loop", result)
    assert "equality check: passed (max_abs_diff_adversarial=0.00e+00, max_abs_diff_state=0.00e+00" in out
    # reported both ways: ours in bf16 + channels_last against the same fp32 reference
    assert set(result["timings"]) == {"reference", "ours", "ours_bf16"}
    assert "bf16 check: passed (ours_bf16: same paths as the reference" in out
    head = result["headlines"]["vs_reference_loop_bf16"]
    assert head["ratio_name"] == "time(reference) / time(ours_bf16)" and head["target"] == ">= 4.5"


def test_vs_reference_bf16_check_fails_when_the_bf16_step_changes_the_method(monkeypatch):
    """The bf16 check can fail: a bf16 step that draws its update path another way is caught."""
    torch.manual_seed(0)
    model = create_model("small_cnn", norm="bn,gns:1")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    fp32 = TrainConfig(attack=AttackConfig(steps=2), amp_bf16="false", channels_last="false")
    whitebox = TrainConfig(mode="whitebox", attack=AttackConfig(steps=2), amp_bf16="true", channels_last="true")
    with pytest.raises(AssertionError, match="another update path"):
        vs_reference_loop.check_bf16_close(model, x, y, fp32, whitebox, seed=0)


def test_vs_reference_check_fails_when_the_steps_differ(monkeypatch):
    """The equality check can fail: a reference that attacks with another step size is caught."""
    original = vs_reference_loop.reference_step

    def off_by_one(model, x, y, optimizer, cfg, sampler):
        bigger = TrainConfig(attack=AttackConfig(steps=cfg.attack.steps, step_size=cfg.attack.step_size * 2))
        return original(model, x, y, optimizer, bigger, sampler)

    monkeypatch.setattr(vs_reference_loop, "reference_step", off_by_one)
    torch.manual_seed(0)
    model = create_model("small_cnn", norm="bn,gns:1")
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    with pytest.raises(AssertionError, match="adversarial examples differ"):
        fp32 = TrainConfig(attack=AttackConfig(steps=2), amp_bf16="false", channels_last="false")  # not `auto`
        vs_reference_loop.check_identical(model, x, y, fp32, seed=0)


def test_vs_torchattacks_tiny(capsys):
    result = vs_torchattacks.main(["--model", "small_cnn", "--batch", "4", "--pgd-steps", "3", *TINY])
    out = capsys.readouterr().out
    _check_printed(out, "vs_torchattacks", result)
    assert set(result["timings"]) == {"torchattacks", "ours"}
    assert "fraction_of_pixels_differing=" in out


def test_gpu_flop_count_matches_the_attack_and_update_passes():
    torch.manual_seed(0)
    model = create_model("small_cnn", norm="bn,gns:1")
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    update, f2 = gpu.flops_per_image(model, x, y, 0), gpu.flops_per_image(model, x, y, 2)
    attack_pass = (f2 - update) / 2
    # Update pass = forward + full backward (~3 forwards); attack pass = forward + input-only
    # backward (~2 forwards). A count that missed the backward would give about 1/3.
    assert 0.55 < attack_pass / update < 0.8, (update, attack_pass)


@pytest.mark.slow  # runs bench/gpu.sh as a process and trains a few steps
def test_gpu_sh_runs_on_cpu_tiny_without_ray_mlflow_or_attack_libraries(tmp_path):
    """bench/gpu.sh as on the bare GPU machine: those packages are made unimportable."""
    blocked = tmp_path / "blocked"
    for name in ("ray", "mlflow", "torchattacks", "pyautoattack"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU machine')\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(blocked), OMP_NUM_THREADS="1")
    out_json = tmp_path / "gpu.json"
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu.sh"),
            "--device",
            "cpu",
            "--tiny",
            "--variants",
            "fp32,bf16_cl",
            "--peak-tflops",
            "1",
            "--threads",
            "1",
            "--json",
            str(out_json),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "command: PYTHONPATH=. python bench/gpu.py --device cpu --tiny" in proc.stdout
    assert "ratio time(fp32) / time(bf16_cl) = " in proc.stdout
    assert "projected 200-epoch recipe" in proc.stdout and "MFU" in proc.stdout
    result = json.loads(out_json.read_text())
    assert set(result["timings"]) == {"fp32", "bf16_cl"}
    assert float(result["extra"]["GFLOP per image per training step"]) > 0
    assert "PGD-20 eval (bf16 forward)" in result["extra"] and "x fp32" in result["extra"]["PGD-20 eval (bf16 forward)"]
    # benchmark 3 needs torchattacks, absent on the bare GPU machine: reported as skipped, not a crash
    assert result["extra"]["vs_torchattacks on this device"].startswith("skipped (torchattacks not importable")


def test_gpu_bench_compares_with_torchattacks_where_it_is_installed():
    result = gpu.main(["--device", "cpu", "--tiny", "--variants", "fp32", "--threads", "1"])
    line = result["extra"]["vs_torchattacks on this device"]
    assert line.startswith("time(torchattacks) / time(ours) = ") and "batch 8" in line
    assert float(line.split(" = ")[1].split(" ")[0]) > 0
    # Item 9 of issue 18: the projection names the backend settings, the ones the training job sets.
    projection = next(v for k, v in result["extra"].items() if k.startswith("projected 200-epoch recipe"))
    assert "train.deterministic=false: " in projection and "cudnn.benchmark=true" in projection


def test_eval_precision_tiny_runs_both_precisions_on_the_same_units(capsys, tmp_path):
    from rna_core.checkpoint import save_checkpoint
    from rna_core.config import load_config
    from rna_core.data import make_synthetic, write_parquet_dataset

    test = make_synthetic(16, seed=0, split="test")
    write_parquet_dataset(tmp_path / "test.parquet", test.images, test.labels, test.classes, "cifar10")
    cfg = load_config(None, ["model.name=small_cnn", "model.norm=bn,gns:1", "data.dataset=cifar10"])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt.pt", create_model("small_cnn", norm="bn,gns:1"), config=cfg)
    result = eval_precision.main(
        [
            "--checkpoint",
            str(tmp_path / "ckpt.pt"),
            "--data-dir",
            str(tmp_path),
            "--limit",
            "16",
            "--batch",
            "8",
            "--units",
            "pgd20:transfer,eot_pgd:eot",
            "--eot-iter",
            "2",
            "--threads",
            "1",
        ]
    )
    out = capsys.readouterr().out
    _check_printed(out, "eval_precision", result)
    assert set(result["timings"]) == {
        "fp32 pgd20:transfer",
        "bf16 pgd20:transfer",
        "fp32 eot_pgd:eot",
        "bf16 eot_pgd:eot",
    }
    assert all(len(t["seconds"]) == 2 for t in result["timings"].values())  # 2 batches each
    assert (
        "bf16 - fp32 = " in result["extra"]["accuracy pgd20:transfer"]
        and "on 16 images" in result["extra"]["accuracy eot_pgd:eot"]
    )
    assert set(result["headlines"]) == {"speed pgd20:transfer", "speed eot_pgd:eot"}


def test_norm_layout_tiny_times_the_three_ways(capsys):
    result = norm_layout.main(["--batch", "2", "--stages", "1", "--group-channels", "1,16", *TINY])
    out = capsys.readouterr().out
    _check_printed(out, "norm_layout", result)
    assert set(result["timings"]) == {
        "gn C=64 D=1 channels_last",
        "gn C=64 D=1 via_contiguous",
        "gn C=64 D=1 fused",  # one channel per group only: the case ChannelsLastGroupNorm fuses
        "gn C=64 D=16 channels_last",
        "gn C=64 D=16 via_contiguous",
        "bn C=64 channels_last",
    }
    assert "C=64 D=16: channels_last / via_contiguous" in result["extra"]
    assert "fused / bn" in result["extra"]["C=64 D=1: via_contiguous / fused"]
    assert result["ratio_name"] == "time(gn C=64 D=1 via_contiguous) / time(gn C=64 D=1 fused)"


def test_shared_attack_tiny_gives_the_same_rows_both_ways(capsys):
    protocols = "transfer,fixed-path,early-stop"
    argv = ["--images", "8", "--batch", "4", "--attacks", "fgsm", "--protocols", protocols, *TINY]
    result = shared_attack.main(argv)
    _check_printed(capsys.readouterr().out, "shared_attack", result)
    assert set(result["timings"]) == {"one attack per protocol", "shared attack"}
    assert result["extra"]["rows equal (n, correct, worst, vote per attack, protocol, trial)"] == "yes"
    assert result["extra"]["attack runs per batch, alone -> shared"] == "3 -> 2"  # early-stop runs its own
    ideal = result["extra"]["ideal ratio (from the separate runs' own times per protocol)"]
    assert 1.0 < ideal < 2.0  # two of three protocols share: (T + F + E) / (max(T, F) + E)


def test_the_sizing_counts_a_shared_attack_once(monkeypatch):
    """The reproduction's evaluation estimate: transfer + fixed-path of one attack cost one attack run
    (with the transfer fill), not two; the other steps are unaffected."""
    from experiments.reproduction import run, size

    table1 = next(s for s in run.PLAN if s.name == "table1")
    assert table1.protocols == "transfer,fixed-path"
    attacks = ["natural", "fgsm", "pgd20", "mifgsm"]
    once = sum(size.passes(a, "transfer") for a in attacks) * table1.limit
    alone = sum(size.passes(a, p) for a in attacks for p in ("transfer", "fixed-path")) * table1.limit
    total = size.eval_seconds_per_model("rna", 1.0)
    monkeypatch.setattr(run, "PLAN", tuple(s for s in run.PLAN if s.name != "table1"))
    rest = size.eval_seconds_per_model("rna", 1.0)
    assert total - rest == pytest.approx(once + size.PATH_ANALYSIS_PASSES) and once < alone


def test_the_sizing_reference_pass_follows_the_bf16_fast_path(monkeypatch):
    """Without a bf16 fast path the bf16 reference is emulated (~140x slower): the fp32 pass and its time."""
    from experiments.reproduction import size

    monkeypatch.setattr(size, "bf16_fast_path", lambda device: None)
    assert size.reference_kind() == (False, size.REFERENCE_IDLE_SECONDS_FP32)
    monkeypatch.setattr(size, "bf16_fast_path", lambda device: "cpu: amx_bf16")
    assert size.reference_kind() == (True, size.REFERENCE_IDLE_SECONDS)
    assert size.REFERENCE_IDLE_SECONDS_FP32 > size.REFERENCE_IDLE_SECONDS


def test_gpu_peak_lookup_matches_whole_model_names():
    """Issue 18: a substring match took an L40S for an L4."""
    assert gpu.peak_for_name("NVIDIA L4") == gpu.PEAK_BF16_FLOPS["L4"]
    assert gpu.peak_for_name("NVIDIA L40S") is None and gpu.peak_for_name("NVIDIA L40") is None
    assert gpu.peak_for_name("NVIDIA A100-SXM4-80GB") == gpu.PEAK_BF16_FLOPS["A100"]
    assert gpu.peak_for_name("NVIDIA H100 80GB HBM3") == gpu.PEAK_BF16_FLOPS["H100"]
    assert gpu.peak_for_name("NVIDIA H200") == gpu.PEAK_BF16_FLOPS["H200"]


def test_gpu_bench_writes_its_json_as_it_goes_and_records_failed_optional_parts(tmp_path, monkeypatch):
    """One late error must not lose a lent GPU window: checks and timings are on disk before it."""
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--tiny", "--variants", "fp32", "--threads", "1", "--json", str(out)]

    def broken(*args, **kwargs):
        raise RuntimeError("torchattacks exploded")

    monkeypatch.setattr(gpu, "vs_torchattacks", broken)
    result = gpu.main(argv)
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and saved["ratio"] == result["ratio"]
    assert saved["extra"]["errors (optional parts)"] == {"vs_torchattacks": "RuntimeError: torchattacks exploded"}
    checks = saved["extra"]["device checks"]
    assert checks["bit_identical_steps"]["identical"] is True
    assert checks["bf16_forward_backward"]["rpt"]["quantized_output_dtypes"] == ["torch.float32"]

    def late(*args, **kwargs):
        raise RuntimeError("the window closed")

    monkeypatch.setattr(gpu, "report", late)
    out.unlink()
    with pytest.raises(RuntimeError, match="the window closed"):
        gpu.main(argv)
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and float(partial["extra"]["fp32 images/s"]) > 0
    assert partial["checks"]["noise_on_device"] == {"noise_generator_device": "cpu"}
    assert "projected 200-epoch recipe (fp32)" in partial["extra"]
