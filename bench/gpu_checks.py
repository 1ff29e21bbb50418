"""Correctness checks of the GPU path that no CPU can run (issue 18), for `bench/gpu.py`.

Each check returns a small dict of what it saw (values, not only "ok"), so a report says what
held on which device. `bench/gpu.py` runs them first and writes each result into its JSON as it
comes (an error is recorded under the check's name and the next one runs):

- `bit_identical_steps`: two `train_step`s from the same seed, weights and batch, compared bit
  for bit, with `train.deterministic` backend settings (README: the guarantee needs them on GPU).
- `bf16_forward_backward`: one bf16 + channels_last forward/backward each for `bgn:8`, `rpt` and
  `small_cnn`: finite loss and gradients, fp32 gradients on fp32 weights, and for `rpt` the
  quantized layers' outputs in fp32 (rna_core/quant.py).
- `groupnorm_layout`: GroupNorm (and the other layout-guarded norms) under channels_last hand
  channels_last on (rna_core/speed.py), same values as on a contiguous tensor within bf16 rounding.
- `noise_on_device`: the PGD random start of the training job is drawn on the device from the
  per-step generator (`rna_core.distributed.step_streams`), no host copy.

Only torch and rna_core: they run on the bare GPU machine.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from rna_core import create_model
from rna_core.config import AttackConfig, TrainConfig
from rna_core.determinism import apply_backend_settings
from rna_core.distributed import seeded_steps, state_digest, step_streams
from rna_core.optim import build_optimizer
from rna_core.quant import QuantConv2d, QuantLinear
from rna_core.speed import AutocastForward, as_channels_last, use_channels_last
from rna_core.training import train_step


def _batch(device: torch.device, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def bit_identical_steps(device: torch.device, model_name: str, batch: int) -> dict[str, Any]:
    """Two identical training steps (fp32, deterministic backend settings) give identical weights."""
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    settings = apply_backend_settings(True)
    try:
        cfg = TrainConfig(attack=AttackConfig(steps=2), amp_bf16="false", channels_last="false", deterministic=True)
        x, y = _batch(device, batch)
        digests = []
        for _ in range(2):
            torch.manual_seed(0)
            model = create_model(model_name, norm="bn,gns:1").to(device)
            sampler, noise = step_streams(cfg, 0, 0, device)
            steps = seeded_steps([(x, y)], sampler.generator, 0, 0, 0, noise)
            for xb, yb in steps:
                train_step(model, xb, yb, build_optimizer(model, cfg), cfg, sampler, noise_generator=noise)
            digests.append(state_digest(model))
    finally:
        apply_backend_settings(False)
        if cublas is None:  # the timed runs after this use the job's default settings
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    return {"identical": digests[0] == digests[1], "digests": digests, "backend": settings}


def bf16_forward_backward(device: torch.device, model_name: str, batch: int) -> dict[str, Any]:
    """bf16 autocast + channels_last forward/backward for the norms and methods that need care."""
    out: dict[str, Any] = {}
    cases = {"bgn:8": dict(norm="bgn:8"), "rpt": dict(norm="bn", method="rpt", precisions="4-16")}
    for name, kwargs in cases.items():
        out[name] = _one_bf16_pass(create_model(model_name, **kwargs).to(device), device, batch)
    out["small_cnn"] = _one_bf16_pass(create_model("small_cnn", norm="bn,gns:1").to(device), device, batch)
    return out


def _one_bf16_pass(model: torch.nn.Module, device: torch.device, batch: int) -> dict[str, Any]:
    use_channels_last(model)
    quant_dtypes: set[str] = set()
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            m.register_forward_hook(lambda mod, args, o: quant_dtypes.add(str(o.dtype)))
    x, y = _batch(device, batch)
    x = as_channels_last(x).requires_grad_(True)
    loss = F.cross_entropy(AutocastForward(model.train())(x), y)
    loss.backward()
    loss = loss.detach()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {
        "loss": loss.item(),
        "finite": bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads),
        "grad_dtypes": sorted({str(g.dtype) for g in grads}),
        "input_grad_channels_last": bool(x.grad.is_contiguous(memory_format=torch.channels_last)),
        "quantized_output_dtypes": sorted(quant_dtypes),
    }


@torch.no_grad()
def groupnorm_layout(device: torch.device) -> dict[str, Any]:
    """What layout GroupNorm hands on under channels_last in bf16, with and without our hooks."""
    out: dict[str, Any] = {}
    x = torch.randn(8, 64, 16, 16, device=device)
    for groups in (64, 8, 1):
        gn = torch.nn.GroupNorm(groups, 64).to(device)
        ref = gn(x)
        fp32_cl = gn(as_channels_last(x))
        guarded = use_channels_last(copy.deepcopy(torch.nn.Sequential(gn)))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            plain_out = gn(as_channels_last(x))
            hooked = guarded(as_channels_last(x))
        out[f"groups={groups}"] = {
            "plain_output_channels_last": bool(plain_out.is_contiguous(memory_format=torch.channels_last)),
            "hooked_output_channels_last": bool(hooked.is_contiguous(memory_format=torch.channels_last)),
            "max_abs_diff_vs_fp32": float((hooked.float() - ref).abs().max()),
            "fp32_channels_last_max_abs_diff": float((fp32_cl - ref).abs().max()),
        }
    return out


def noise_on_device(device: torch.device) -> dict[str, Any]:
    """The training job's random-start generator lives on the device (no CPU draw, no copy)."""
    cfg = TrainConfig()
    _, noise = step_streams(cfg, 0, 0, device)
    return {"noise_generator_device": str(noise.device) if noise is not None else "none (per_rank: sampler's)"}


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "noise_on_device": lambda device, model, batch: noise_on_device(device),
    "bit_identical_steps": bit_identical_steps,
    "bf16_forward_backward": bf16_forward_backward,
    "groupnorm_layout": lambda device, model, batch: groupnorm_layout(device),
}


def run_checks(device: torch.device, model_name: str, batch: int, record: Callable[[str, Any], None]) -> None:
    """Run every check, handing each result (or its error) to `record` as soon as it is known."""
    for name, check in CHECKS.items():
        try:
            record(name, check(device, model_name, batch))
        except Exception as exc:  # a check's failure is a finding: record it, run the next one
            record(name, {"error": f"{type(exc).__name__}: {exc}"})


__all__ = [
    "CHECKS",
    "bf16_forward_backward",
    "bit_identical_steps",
    "groupnorm_layout",
    "noise_on_device",
    "run_checks",
]
