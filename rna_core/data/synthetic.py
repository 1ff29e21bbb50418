"""A synthetic image task for tests and smoke runs: no download, learnable in seconds.

Each class is a fixed random low-frequency colour pattern; an example is its class pattern
plus a per-example brightness shift and pixel noise. A small CNN separates the classes after a
few dozen SGD steps, yet the noise keeps accuracy from being trivially 100% at step zero, so a
broken training loop still shows up as chance accuracy.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from rna_core.data.tensor_dataset import ImageTensorDataset

_PATTERN_GRID = 4  # pattern resolution before upsampling: low frequency, easy to learn
_AMPLITUDE = 48.0  # pattern std in pixel units (0..255)
_NOISE = 40.0  # per-pixel noise std
_BRIGHTNESS = 16.0  # per-example brightness shift std
_CHUNK = 4096  # rows generated at once, bounds float memory for large n


def _noise_seed(seed: int, split: str) -> int:
    """A seed for (seed, split) that is stable across processes (unlike ``hash``)."""
    return (seed * 2_654_435_761 + zlib.crc32(split.encode()) + 1) % (2**63 - 1)


def class_patterns(num_classes: int, image_size: int, seed: int) -> torch.Tensor:
    """``(K, 3, S, S)`` float patterns, each zero-mean and unit-std, fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, 3, _PATTERN_GRID, _PATTERN_GRID, generator=gen)
    pat = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    pat = pat - pat.mean(dim=(1, 2, 3), keepdim=True)
    return pat / pat.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)


def make_synthetic(
    n: int,
    num_classes: int = 10,
    image_size: int = 32,
    seed: int = 0,
    name: str = "synthetic",
    split: str = "train",
) -> ImageTensorDataset:
    """``n`` balanced examples; patterns come from ``seed``, labels and noise from ``(seed, split)``.

    Splits of one task (same ``seed``) share class patterns, so a model trained on ``"train"``
    is meaningfully evaluated on ``"test"``. Only seeded generators are used, never global RNG.
    """
    if n < 0 or num_classes < 1 or image_size < 1:
        raise ValueError(f"need n >= 0, num_classes >= 1, image_size >= 1; got {n}, {num_classes}, {image_size}")
    patterns = class_patterns(num_classes, image_size, seed)
    gen = torch.Generator().manual_seed(_noise_seed(seed, split))
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    images = torch.empty((n, 3, image_size, image_size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        y = labels[start : start + _CHUNK]
        x = 128.0 + _AMPLITUDE * patterns[y]
        x += _BRIGHTNESS * torch.randn(len(y), 1, 1, 1, generator=gen)
        x += _NOISE * torch.randn(x.shape, generator=gen)
        images[start : start + len(y)] = x.round_().clamp_(0, 255).to(torch.uint8)
    classes = [f"class{k}" for k in range(num_classes)]
    return ImageTensorDataset(images=images, labels=labels, classes=classes, name=f"{name}-{split}")
