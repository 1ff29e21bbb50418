"""Helpers shared by several test files: a synthetic task attacks can hurt, and a model trained on it."""

from __future__ import annotations

import torch

import rna_core
from rna_core.config import TrainConfig
from rna_core.data import BatchIterator, ImageTensorDataset, make_synthetic
from rna_core.optim import build_optimizer
from rna_core.training import train_epoch


def low_contrast(ds: ImageTensorDataset, factor: float = 0.15) -> ImageTensorDataset:
    """The synthetic task with its contrast cut, so that eps = 8/255 is a real threat to it."""
    x = ds.images.float()
    ds.images = ((x - 128) * factor + 128).round().clamp(0, 255).to(torch.uint8)
    return ds


def train_small_cnn(norm: str, epochs: int = 2, n: int = 384, seed: int = 0) -> torch.nn.Module:
    """small_cnn with `norm`, naturally trained a little on the low-contrast synthetic task (eval mode)."""
    torch.manual_seed(seed)
    model = rna_core.create_model("small_cnn", norm=norm)
    data = low_contrast(make_synthetic(n, seed=0, split="train"))
    # fp32 explicitly: `auto` would train in bf16 on a bf16 CPU, and the attack tests that use this
    # model should see the same model on every machine.
    cfg = TrainConfig(mode="natural", lr=0.1, epochs=1, weight_decay=0.0, amp_bf16="false", channels_last="false")
    opt = build_optimizer(model, cfg)
    sampler = rna_core.PathSampler("uniform", seed=seed)
    for epoch in range(epochs):
        train_epoch(model, BatchIterator(data, 32, shuffle=True, seed=seed, epoch=epoch), opt, cfg, sampler)
    return model.eval()
