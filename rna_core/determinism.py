"""The backend settings a training process runs with: cuDNN autotuning, TF32, deterministic kernels.

On CPU our training is bit-reproducible as it stands (same seed, same digests, the same weights
whatever the number of workers). On CUDA it is not: cuDNN picks convolution algorithms by timing
them (`cudnn.benchmark`) and several of them, like CUDA's NLLLoss and cuBLAS with more than one
workspace, accumulate in an order that changes from run to run. `train.deterministic: true` asks
for torch's deterministic algorithms, deterministic cuDNN without autotuning, a fixed cuBLAS
workspace (`CUBLAS_WORKSPACE_CONFIG`, read when cuBLAS starts), and computes the cross-entropy
without NLLLoss on GPUs (:func:`cross_entropy`). Off (the default), cuDNN autotunes
(`cudnn.benchmark`), as `bench/gpu.py` measures it, since the training batches have one shape.

:func:`apply_backend_settings` is the one place both the training job and the GPU benchmark set
these, and what it returns is logged (MLflow params `resolved.backend.*`) and printed with the
benchmark's projection, so a projected time and a run are set up the same way.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # one of the two settings cuBLAS documents as deterministic


def apply_backend_settings(deterministic: bool) -> dict[str, str]:
    """Set torch's process-wide backend flags for training; returns them (for logs and reports)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    return backend_settings()


def backend_settings() -> dict[str, str]:
    """The backend flags in effect now, as strings."""

    def text(value: object) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return {
        "deterministic_algorithms": text(torch.are_deterministic_algorithms_enabled()),
        "cudnn.benchmark": text(torch.backends.cudnn.benchmark),
        "cudnn.deterministic": text(torch.backends.cudnn.deterministic),
        "cudnn.allow_tf32": text(torch.backends.cudnn.allow_tf32),
        "cuda.matmul.allow_tf32": text(torch.backends.cuda.matmul.allow_tf32),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "unset"),
    }


def one_hot_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy from log-softmax and a one-hot mask: plain reductions, no NLLLoss kernel."""
    log_probs = F.log_softmax(logits, dim=1)
    return -(log_probs * F.one_hot(target, logits.shape[1]).to(log_probs.dtype)).sum(1).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`F.cross_entropy`, except off the CPU under deterministic algorithms, where CUDA's NLLLoss
    has no deterministic kernel (torch raises): the one-hot form there (equal within rounding)."""
    if torch.are_deterministic_algorithms_enabled() and logits.device.type != "cpu":
        return one_hot_cross_entropy(logits, target)
    return F.cross_entropy(logits, target)


__all__ = [
    "CUBLAS_WORKSPACE_CONFIG",
    "apply_backend_settings",
    "backend_settings",
    "cross_entropy",
    "one_hot_cross_entropy",
]
