"""An image classification dataset held as one uint8 tensor.

CIFAR-sized datasets fit in memory many times over, so every loader (torchvision, Parquet,
synthetic) decodes once into this form; batching is then plain indexing, with no per-example
Python work and no DataLoader worker processes to start inside Ray workers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class ImageTensorDataset:
    """Images ``(N, 3, H, W)`` uint8, labels ``(N,)`` int64, class names and a display name."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        # Catch shape mistakes at construction, where the cause is obvious, not in a batch later.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N,3,H,W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels must be (N,) with N={self.images.shape[0]}, got {tuple(self.labels.shape)}")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def content_digest(self) -> str:
        """blake2b (32 hex digits) of the pixels, labels and class names: the same rows, the same digest."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        h.update(json.dumps(list(self.classes)).encode())
        return h.hexdigest()

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageTensorDataset:
        """Rows at ``indices`` (in that order), sharing class names."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensorDataset(self.images[idx], self.labels[idx], list(self.classes), self.name)

    def shard(self, rank: int, world_size: int) -> ImageTensorDataset:
        """Strided shard ``rank::world_size``, trimmed so that every rank has the same length.

        DDP ranks must run the same number of steps or the collective ops deadlock, so the
        ``N % world_size`` leftover rows are dropped rather than given to some ranks.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        per_rank = len(self) // world_size
        idx = torch.arange(rank, per_rank * world_size, world_size)
        return self.subset(idx)

    def head(self, n: int) -> ImageTensorDataset:
        """The first ``n`` rows (all of them if there are fewer); views, no copy."""
        n = max(0, min(n, len(self)))
        return ImageTensorDataset(self.images[:n], self.labels[:n], list(self.classes), self.name)
