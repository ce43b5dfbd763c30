"""Features of a frozen network for every training image, computed once instead of at every step.

Training runs over the same, unaugmented training images every epoch, and a frozen teacher (or URD's frozen
expert) gives the same features for them every time. On a CPU its forward pass over the clean batch is about a
sixth of an RD step with synthetic defects (0.16 of 0.96 s for 16 images at 256², 2 cores), so computing it once
buys epochs. The cache costs memory (672 KB per 256² image for EfficientNet-Lite0's strides 4/8/16 in float32,
half that under bf16 autocast), so it is kept only on a CPU, where the pass is expensive and memory plentiful,
and only under ``MAX_CACHE_BYTES``; on a GPU the pass is cheap and its memory scarce.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

MAX_CACHE_BYTES = 2 * 1024 ** 3
CHUNK = 32


class FrozenFeatureCache:
    """``cache[indices]`` are ``network``'s features of those training images, as ``network(x)`` would give them."""

    def __init__(self, levels: list[torch.Tensor]):
        self.levels = levels

    def __getitem__(self, indices: torch.Tensor) -> list[torch.Tensor]:
        return [level[indices] for level in self.levels]

    @classmethod
    def build(cls, network: nn.Module, images_u8: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
              device: torch.device, autocast) -> "FrozenFeatureCache | None":
        """The cache of ``network`` (frozen, in eval mode) over the uint8 ``images_u8``, or None where it is not
        worth keeping: not on a CPU, or over ``MAX_CACHE_BYTES``. ``autocast`` is the training step's context
        factory, so that cached features equal those the step would compute."""
        if device.type != "cpu" or len(images_u8) == 0:
            return None
        chunks = []
        with torch.no_grad(), autocast():
            for start in range(0, len(images_u8), CHUNK):
                features = network(normalize(images_u8[start:start + CHUNK]))
                if not chunks:
                    per_image = sum(f[0].numel() * f.element_size() for f in features)
                    if per_image * len(images_u8) > MAX_CACHE_BYTES:
                        return None
                chunks.append(features)
        return cls([torch.cat(level) for level in zip(*chunks)])
