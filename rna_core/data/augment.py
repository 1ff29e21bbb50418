"""Standard CIFAR augmentation (zero-padded random crop + horizontal flip) on whole batches.

Runs on the batch's device with one gather, so augmentation costs no per-example Python work
and no host round trip when training on a GPU. Randomness comes from an explicit generator so
a (seed, epoch) pair reproduces the exact augmented batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rna_core.speed import to_device_async


def crop_flip(
    x: torch.Tensor, offset_y: torch.Tensor, offset_x: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Deterministic core: crop each zero-padded image at its offsets, then flip where asked.

    ``offset_y``/``offset_x`` are ``(B,)`` ints in ``[0, 2 * padding]``; ``flip`` is ``(B,)`` bool.
    Offset ``padding`` with no flip returns the image unchanged.
    """
    b, c, h, w = x.shape
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))
    hp, wp = x.shape[2], x.shape[3]
    dev = x.device
    # Pinned, non-blocking copies: a plain .to("cuda") would stall the host until the GPU is idle.
    oy, ox, fl = to_device_async(offset_y, dev), to_device_async(offset_x, dev), to_device_async(flip, dev)
    rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H) rows of the padded image
    cols = ox[:, None] + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(fl[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(x.reshape(b, c, hp * wp), 2, flat).reshape(b, c, h, w)


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly crop (after ``padding`` zeros each side) and flip each image of a ``(B,3,H,W)`` batch.

    Offsets and flips are drawn on the generator's device (CPU unless given otherwise), then moved
    to ``x.device``; with ``generator=None`` torch's global RNG is used.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a (B,C,H,W) batch, got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b = x.shape[0]
    dev = generator.device if generator is not None else torch.device("cpu")
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=dev)
    flip = torch.randint(0, 2, (b,), generator=generator, device=dev).bool()
    return crop_flip(x, oy, ox, flip, padding)
