"""A segmentation head on a teacher-student pair, trained on synthetic defects (DeSTSeg: Zhang et al., CVPR 2023).

A student's map says where it failed to reproduce the teacher, which is not the same as where the defect is:
where a defect only shifts the features a little (a differently ground surface), the student reproduces the
shift and the map stays flat, and where normal texture is busy the map is noisy. DeSTSeg adds a small network
that looks at the pair and is trained, with the teacher and the student frozen, to outline synthetic defects.
Its map is the head's probability of "defect" per position.

Input, per teacher level: the element-wise product of the L2-normalised teacher and student features (DeSTSeg's
input: its channel sum is the cosine similarity, so the head can weigh the channels the plain cosine weighs
equally) and, a departure, the normalised teacher features themselves, which let the head see what the surface
is as well as how well the student matched it. Optionally (RD's ``segment_context_strides``, a departure too)
the teacher's coarser levels that no student distils, normalised the same way: what a wider neighbourhood looks
like, which a gradual change of brightness or grinding needs. All levels are resampled to the finest level's
grid and concatenated. Head: two 3×3 convolutions with BatchNorm and ReLU and a 1×1 output (DeSTSeg uses a deeper,
ASPP-style head on a ResNet-18 pair; Lite0's levels are small). Loss: focal (γ = 2) plus L1 on the probability,
as DeSTSeg, against the synthetic masks averaged onto the grid; half of every batch is left clean (target 0).
The map is the probability upsampled to the input size and blurred like the students' maps; score = its max.

Measured on a trained RD (``kdcore.methods.rd``, magnetic_tile, 256², 800 steps of 16): see the RD notes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FOCAL_GAMMA = 2.0
CLEAN_SHARE = 0.5  # of each batch left without a synthetic defect
HIDDEN_CHANNELS = 128


def head_input(teacher_features: list[torch.Tensor], student_features: list[torch.Tensor],
               context_features: list[torch.Tensor] = ()) -> torch.Tensor:
    """Per level ``[t̂·ŝ, t̂]`` (hats: unit length over channels), then each context level ``ĉ``, all on the
    first level's grid, concatenated."""
    grid = teacher_features[0].shape[-2:]
    parts = [torch.cat([teacher * student, teacher], dim=1) for teacher, student in
             zip(map(unit_channels, teacher_features), map(unit_channels, student_features))]
    parts += map(unit_channels, context_features)
    return torch.cat([part if part.shape[-2:] == grid else
                      F.interpolate(part, size=grid, mode="bilinear", align_corners=False) for part in parts], dim=1)


def unit_channels(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=1)


class SegmentationHead(nn.Module):
    def __init__(self, channels: tuple[int, ...], context_channels: tuple[int, ...] = (),
                 hidden: int = HIDDEN_CHANNELS):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(2 * sum(channels) + sum(context_channels), hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, 1, 1))

    def forward(self, teacher_features: list[torch.Tensor], student_features: list[torch.Tensor],
                context_features: list[torch.Tensor] = ()) -> torch.Tensor:
        """Logits N×1×h×w on the finest level's grid."""
        return self.layers(head_input(teacher_features, student_features, context_features))


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Focal loss plus L1 on the probability, against ``masks`` (N×1×S×S in [0, 1]) averaged onto the logits'
    grid; a grid cell counts as defective for the focal term when most of it is."""
    target = F.interpolate(masks.float(), size=logits.shape[-2:], mode="area")
    logits = logits.float()
    probability = torch.sigmoid(logits)
    hard = (target > 0.5).float()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, hard, reduction="none")
    p_true = hard * probability + (1 - hard) * (1 - probability)
    focal = ((1 - p_true) ** FOCAL_GAMMA * cross_entropy).mean()
    return focal + (probability - target).abs().mean()


def with_clean_share(clean: torch.Tensor, defective: torch.Tensor, masks: torch.Tensor,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch with ``CLEAN_SHARE`` of its images (drawn from ``generator``) put back clean, and its masks."""
    keep_clean = (torch.rand(len(clean), generator=generator) < CLEAN_SHARE).to(clean.device)
    images = torch.where(keep_clean.view(-1, 1, 1, 1), clean, defective)
    return images, torch.where(keep_clean.view(-1, 1, 1, 1), torch.zeros_like(masks), masks)
