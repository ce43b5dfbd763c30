"""Reference: the teacher's own features with a nearest-neighbour memory, no student at all.

This is what every student is measured against (``bench.accuracy`` prints each method's gain over it): a
student that scores below the features it learns from has lost information its teacher carried. The recipe is
PatchCore's in its simplest form (Roth et al., CVPR 2022), without coreset selection:

- Embedding: the frozen teacher's levels at ``strides`` (default 8 and 16), each 3×3 average-pooled (stride 1)
  for local context, upsampled bilinearly to the finest level's grid and concatenated along channels.
- Memory: ``bank_size`` embedding vectors drawn uniformly at random (seeded) from at most ``bank_images``
  training images. A random subset instead of PatchCore's greedy coreset keeps fitting to seconds on a CPU.
- Map: Euclidean distance of every position to its nearest memory vector, upsampled bilinearly to the input
  size, Gaussian blur σ = ``sigma``, then z-scored per position on the normal hold-out
  (``map_normalization="zscore"``, see ``kdcore.methods.base``). Image score = max of the map, as for the
  students.

Why the z-score: the reference must be the best the teacher's features do alone, or a student's "gain" over
it is flattery. Raw, almost every good test image of magnetic_tile has its maximum on the picture's border
(where crops differ), which buries the defects: image AUROC 0.660 (pixel 0.801). With the students' per-position
mean subtraction it is 0.799 (0.813); z-scored per position 0.871 (0.810), which is also what the first
measurement of this reference reported (0.86). The students keep "position": z-scoring lowered RD's image
AUROC from 0.790 to 0.756 and URD's from 0.813 to 0.795 on the same set.

It has nothing to train (``trains = False``): ``fit`` builds the memory and calibrates on the hold-out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.backbones import Backbone
from kdcore.methods.base import AnomalyMethod, MethodConfig
from kdcore.ops import GaussianBlur, upsample
from kdcore.registry import register_method

# Query vectors per distance block: bounds the block's memory to QUERY_BLOCK × bank_size floats.
QUERY_BLOCK = 4096


def local_context_embedding(levels: list[torch.Tensor]) -> torch.Tensor:
    """N×C×h×w embedding of backbone levels on the finest level's grid, float32: each level 3×3-averaged
    (stride 1) for local context, the coarser ones upsampled bilinearly, all concatenated along channels."""
    levels = [F.avg_pool2d(f.float(), 3, stride=1, padding=1, count_include_pad=False) for f in levels]
    grid = levels[0].shape[-2:]
    return torch.cat([levels[0]] + [F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
                                    for f in levels[1:]], dim=1)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each of the M×C ``queries`` to its nearest row of the K×C ``bank``, in float32."""
    bank = bank.float()
    bank_sq = bank.pow(2).sum(1)
    # An exported graph takes any batch size, which a loop over a data-dependent number of blocks cannot
    # express; there the runtime holds the whole (positions × bank) distance matrix of a batch at once.
    blocks = [queries.float()] if torch.compiler.is_exporting() else queries.float().split(QUERY_BLOCK)
    out = []
    for block in blocks:
        sq = block.pow(2).sum(1, keepdim=True) - 2.0 * block @ bank.T + bank_sq
        out.append(sq.amin(dim=1).clamp_min(0).sqrt())
    return torch.cat(out)


class TeacherKNNNetwork(nn.Module):
    def __init__(self, teacher: Backbone, size: int, bank_size: int, sigma: float):
        super().__init__()
        self.teacher = teacher
        self.register_buffer("bank", torch.zeros(bank_size, sum(teacher.channels)))
        self.blur = GaussianBlur(sigma=sigma)
        self.size = size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return local_context_embedding(self.teacher(x))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        embedding = self.embed(x)
        n, c, h, w = embedding.shape
        with torch.autocast(x.device.type, enabled=False):
            distances = nearest_distances(embedding.permute(0, 2, 3, 1).reshape(-1, c), self.bank)
        return self.blur(upsample(distances.view(n, 1, h, w), self.size))


@dataclass
class TeacherKNNConfig(MethodConfig):
    """``epochs`` and ``batch_size`` are not used: there is nothing to train."""

    strides: tuple[int, ...] = (8, 16)  # the teacher's levels, 3×3-averaged and upsampled to the finest
    bank_size: int = 20000  # patch vectors kept in the memory, drawn at random
    bank_images: int = 200  # training images the memory's vectors are drawn from
    sigma: float = 4.0  # Gaussian blur of the map, in pixels of the input
    map_normalization: str = "zscore"

    def validate(self) -> None:
        super().validate()
        self.strides = tuple(self.strides)
        if not self.strides or any(not isinstance(s, int) or s < 1 for s in self.strides):
            raise ValueError(f"strides must be positive integers, got {self.strides!r}")
        if not isinstance(self.bank_size, int) or self.bank_size < 1:
            raise ValueError(f"bank_size must be a positive integer, got {self.bank_size!r}")
        if not isinstance(self.bank_images, int) or self.bank_images < 1:
            raise ValueError(f"bank_images must be a positive integer, got {self.bank_images!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma!r}")


@register_method
class TeacherKNN(AnomalyMethod):
    name = "teacher_knn"
    summary = "Reference: the teacher's features with a nearest-neighbour memory, no student (PatchCore-style)"
    Config = TeacherKNNConfig
    trains = False

    def teacher_strides(self) -> tuple[int, ...]:
        return self.config.strides

    def build_network(self, backbone: Backbone) -> nn.Module:
        c = self.config
        return TeacherKNNNetwork(backbone, c.size, c.bank_size, c.sigma)

    def setup_training(self, train_images: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = torch.randperm(len(train_images), generator=generator)[:self.config.bank_images]
        self.net.eval()
        with torch.inference_mode(), self._autocast():
            vectors = torch.cat([self.net.embed(self._normalize(train_images[chunk])).permute(0, 2, 3, 1).flatten(0, 2)
                                 for chunk in chosen.split(32)])
        picked = torch.randperm(len(vectors), generator=generator)[:self.config.bank_size]
        bank = torch.zeros_like(self.net.bank)
        bank[:len(picked)] = vectors[picked.to(vectors.device)].float()
        # Fewer vectors than asked (tiny data sets): repeat real ones rather than keep zero rows in the memory.
        if len(picked) < len(bank):
            bank[len(picked):] = bank[torch.arange(len(bank) - len(picked)) % len(picked)]
        self.net.bank.copy_(bank)
