"""Reverse Distillation (RD4AD: Deng and Li, CVPR 2022, arXiv 2201.10703).

The frozen encoder teacher's three feature levels are squeezed by a trainable one-class bottleneck (OCBE) into
one compact embedding, from which a decoder student reconstructs the teacher's levels in reverse order.
Anomalies are what the bottleneck could not carry through.

Network (built from the backbone's ``feature_info``, so EfficientNet-Lite0 and ResNets both work):
- MFF: level 1 goes through two stride-2 3×3 convolutions (c1→c2→c3), level 2 through one (c2→c3), each with
  BatchNorm and ReLU; both are concatenated with level 3 (3·c3 channels at stride 16).
- OCE: a residual stage of ``bottleneck_blocks`` basic blocks, the first with stride 2, to 2·c3 channels at
  stride 32. The paper's Wide-ResNet uses bottleneck blocks; basic blocks are what anomalib uses for the small
  ResNets and suit the small channel counts of EfficientNet-Lite0.
- Decoder: per level, from deep to shallow, a stride-2 transposed convolution to that level's channels then
  ``decoder_blocks`` basic blocks; its outputs align with the teacher's levels.
- Departure, ``linear_heads=True`` (default): each level's output is a 1×1 convolution (linear, with bias) of
  the decoder stage, which still feeds the next stage through its ReLU. The paper's decoder ends every level
  in ReLU, which suits a ResNet teacher (its block outputs are post-ReLU); EfficientNet-Lite0's block outputs
  are signed (47-48 % negative at strides 4/8/16), so a non-negative student cannot reach cosine 1 anywhere
  and the loss floor (about 0.82) varies with content, which becomes noise in every map. ``False`` is the
  paper's decoder (and how models saved before this existed load).

Loss: ``sum_levels mean_batch [1 - cos(flatten(teacher_l), flatten(student_l))]``, i.e. the cosine of each
sample's whole flattened map, as in the official code. The paper writes a per-pixel cosine averaged over
positions; the code's flattened form is what produced the published numbers and reported better results
(hq-deng/RD4AD issue 22: per-pixel gave carpet image AUROC 92.3 %), and RD++ and anomalib kept it.

Map: sum over levels of per-pixel ``1 - cos``, bilinear upsampling with align_corners=True to the input
size (as the code), then a Gaussian blur with σ = 4 as a fixed convolution. Image score = max of the map.
Optimiser: Adam, lr 0.005, betas (0.5, 0.999) as in the paper and code (anomalib uses 0.99), at a constant rate
as the paper. ``lr_schedule="cosine"`` lets the rate fall along half a cosine to zero at the last step, which
settles the last epochs (with a constant rate magnetic_tile's image AUROC is 0.903 at epoch 35 and 0.920 at 38
while the hold-out score moves by 0.005), but at 36 epochs it traded one set for the other: magnetic_tile 0.903 /
0.668 / 0.694 → 0.912 / 0.678 / 0.700 image / pixel AUROC / AU-PRO, elpv 0.951 → 0.943; so not the default.
Epochs: 28 on a CPU (the 20-minute CPU budget, not convergence; the paper's 200 on a GPU). Before the stride-32
level, magnetic_tile read 0.883 / 0.655 / 0.695 image / pixel AUROC / AU-PRO at 20 epochs, 0.903 / 0.668 / 0.694
at 36 and 0.920 / 0.674 / 0.704 at 40, the hold-out score still falling (figures from before ``magnitude``), and
36 epochs took 18-20 minutes on 2 cores with AMX. With the level an epoch takes 38-43 s quiet on a 2-core AMD
EPYC without AMX, so 36 took about 25 minutes there; 28 fit (``bench.accuracy --epochs rd=28``, seed 0: 22.1
minutes with a low-priority inference job beside it, so about 20 quiet). Measured against 36: magnetic_tile 0.970
/ 0.799 / 0.654 → 0.966 / 0.807 / 0.659 (F1-max 0.951 → 0.940, all-NG 0.805; images blowhole 0.975, break 0.989,
crack 0.922, fray 0.937, uneven 0.970; pixels ``uneven`` 0.861 → 0.858), elpv 0.956 → 0.955 (F1-max 0.907 →
0.906; 10.0 minutes). The map is normalised per position on the hold-out after training (``map_normalization``,
``kdcore.methods.base``), a departure shared by all students: on magnetic_tile the trained RD's image AUROC went
from 0.732 to 0.790 and AU-PRO from 0.607 to 0.651 on the same network.

Departure, ``map_strides`` (default (8, 16) below 256 px, (8, 16, 32) from 256 up, next paragraph): the map
sums the stride-8 and stride-16 levels, not the stride-4 one; all three levels are still trained (the loss is
the paper's). Lite0's stride-4 level (24 channels after three small
blocks) is texture the decoder cannot predict where normal images are busy and predicts all too well where a
defect is smooth: on magnetic_tile the trained denoising student's stride-4 map alone has pixel AUROC 0.49
(``uneven`` regions 0.38, i.e. *lower* than on good surface), stride 8 0.57, stride 16 0.70. Measured on the
same trained networks, only the map's levels changed (hold-out normalisation refitted; image / pixel AUROC /
AU-PRO): magnetic_tile RD 0.879 / 0.621 / 0.698 → 0.883 / 0.655 / 0.695, DSKD 0.766 / 0.647 / 0.688 → 0.781 /
0.672 / 0.685, URD 0.829 / 0.603 / 0.685 → 0.828 / 0.628 / 0.680; elpv (image labels, 3-epoch models) RD
0.894 → 0.904, DSKD 0.910 → 0.916. Every student and both sets gain pixel or image AUROC and lose at most
0.005 AU-PRO (the coarser levels outline small defects less tightly). The stride-16 level alone reads higher
still on magnetic_tile's pixel AUROC (RD 0.702) but costs 0.035 AU-PRO there and 0.007 image AUROC on elpv,
so both coarse levels stay. All measured at 256²; on small inputs (64², where stride 16 is a 4×4 grid) the
stride-4 level may be worth its noise. ``(4, 8, 16)`` is the paper's map (and how models saved before it
existed load).

Departure, a stride-32 level (from 256 px up ``map_strides`` is (8, 16, 32); ``kdcore.methods.base.
coarse_map_strides``, as STPM's): the map also sums the teacher's stride-32 level, which a head of its own
(``CoarseLevelHead``: ``decoder_blocks`` basic blocks to that level's channels and a linear 1×1 output) rebuilds
from the OCBE embedding, itself at stride 32; the bottleneck and decoder stay the paper's, on the first three
levels, and the loss, ``magnitude`` and the level scales cover the four. The paper reads strides 4-16 only.
Magnetic_tile's ``uneven`` (72 % of its defect pixels) is a wide region of a different finish that looks like
normal surface to a receptive field of stride 16; the stride-32 level sees most of the image. Measured
(magnetic_tile, 256², 36 epochs, seed 0, ``bench.accuracy --methods rd``; image / pixel AUROC / AU-PRO): 0.960 /
0.703 / 0.696 → **0.970 / 0.799 / 0.654** (F1-max 0.932 → 0.951, all-NG 0.805; images blowhole 0.977, break 0.984,
crack 0.951, fray 0.943, uneven 0.969; pixels 0.986 / 0.985 / 0.928 / 0.991 / 0.861, ``uneven`` 0.653 before and
0.818 for the reference ``teacher_knn``; ``uneven`` localisation 0.517 → 0.675). So RD is above the reference on
image AUROC and on ``uneven``'s pixels, 0.011 below it on pixel AUROC overall, and loses 0.042 AU-PRO, as STPM's
map did with the same level. Why, from the same trained network's levels recombined (hold-out normalisation
refitted per map; throwaway script): the level trades small regions for large ones. Localisation (defect
pixels against the same images' others) of blowhole 0.985 → 0.966 and ``uneven`` 0.506 → 0.668 with the level;
AU-PRO averages over regions, most of them small (blowholes, cracks), so it follows the small ones, and pixel
AUROC, 72 % ``uneven`` pixels, the large one. Every other combination sat on the same trade-off line (image /
pixel AUROC / AU-PRO): (8, 16) 0.963 / 0.695 / 0.693; half weight on the level 0.971 / 0.773 / 0.675; levels
multiplied 0.971 / 0.769 / 0.689; (16, 32) 0.969 / 0.809 / 0.616; the level alone 0.952 / 0.802 / 0.538; the
per-level z-scored maps' maximum 0.963 / 0.805 / 0.585, their log-sum-exp 0.966 / 0.805 / 0.594; blur σ 2 or 8
instead of 4: 0.968 / 0.792 / 0.658, 0.969 / 0.797 / 0.634. None gains pixel AUROC and AU-PRO together, so the
sum stays. The map from (8, 16) shows that learning the level changes the finer ones little: reading it makes
the gain. On elpv (``--data elpv_mono``) 0.945 → 0.956, F1-max 0.897 → 0.907 (all-NG
0.769; reference 0.958). The head adds 3.6M parameters to the student's 2.9M with Lite0, and 0.23 GMAC an image at
256² to its 0.45 (the teacher: 0.48; it runs on the 8×8 grid); quiet epochs took 38-43 s on a 2-core AMD EPYC
without AMX; with a ResNet teacher the stride-32 level has 512 (resnet18) or 2048 (wide_resnet50_2) channels, and
``map_strides=[8, 16]`` keeps three levels. The segmentation head (``segment_steps``) then reads the stride-32
level from the teacher the student distils, with no second extractor. DSKD's reverse student and URD's take the
same head where their ``map_strides`` name 32 (an option there, not measured). Models saved before it load as
trained, with three levels.

Departure, ``standardize_levels=True`` (default): after training, each level's upsampled ``1 - cos`` map is
divided by its std over the normal hold-out's images and pixels before the levels are summed (``LevelScale``,
``fit_level_scale``; a buffer of the network, so saved models and exports carry it; model selection during
training still sums the raw levels). The paper adds the levels as they are, so the level with the largest
normal variation dominates; on Lite0 that is the noisy stride-4 level (hold-out std 0.120, against 0.073 and
0.035 at strides 8 and 16). Measured on the same trained networks, only this step redone: magnetic_tile RD
image / pixel AUROC / AU-PRO 0.790 / 0.563 / 0.651 → 0.814 / 0.603 / 0.667, URD 0.813 / 0.579 / 0.676 →
0.829 / 0.603 / 0.685, DSKD 0.707 / 0.613 / 0.666 → 0.728 / 0.625 / 0.671; on elpv (image labels, 3-epoch
models) RD 0.897 → 0.898, URD 0.891 → 0.890, DSKD 0.906 → 0.909. ``False`` is the paper's map (and how models
saved before it existed load).

Departure, ``denoise=True`` (default; ``kdcore.methods.denoising``): every step the student also reconstructs
the teacher's features of the clean batch from the teacher's features of a copy with synthetic defects, as
URD's student does and DeSTSeg's does for a forward student. The plain RD student generalises: shown a defect
through the bottleneck, it rebuilds it. Measured on magnetic_tile (256², 20 epochs, seed 0, standardised
levels): image / pixel AUROC / AU-PRO 0.814 / 0.603 / 0.667 → 0.879 / 0.621 / 0.698, the first student above
the teacher's own features on image AUROC (``teacher_knn`` 0.871); per defect type blowhole 0.848 → 0.956,
crack 0.717 → 0.798, uneven 0.690 → 0.745. A step cost about twice as much (13.1 CPU minutes for the 20
epochs instead of 5.4), before the synthesis got cheaper and the teacher's features of the clean training images
were cached (``feature_cache``): 30 s an epoch of 686 images instead of 39. On elpv (solar cells, 3 epochs):
0.898 → 0.894. ``False`` is the paper's training (and how models saved before it existed are described).

Departure, ``magnitude=1.0`` (default): the loss adds, per level and for every student output it already
matches (clean and defective input), the mean over pixels and channels of ``((teacher - student) / σ_c)²``,
σ_c the teacher's std of channel c over the training images (``ChannelScale``, fitted before the first step and
saved with the model; EfficientAD's distance). The cosine leaves a student free to answer with the right
direction at the wrong length, and Lite0's features of a smooth, differently ground surface (magnetic_tile's
``uneven``) differ from the normal ones mostly in length; a student held to the length too keeps less of its
freedom to rebuild what it was not trained on. The map stays the paper's cosine. Measured on magnetic_tile
(256², 36 epochs, seed 0, one 2-core CPU without AMX, the same evaluator): image / pixel AUROC / AU-PRO 0.897 /
0.658 / 0.688 → 0.914 / 0.664 / 0.685 (epoch 35 kept; epoch 36, a hold-out tie, reads 0.929 / 0.685 / 0.696;
``uneven`` images 0.817 → 0.865, fray 0.896 → 0.932, crack 0.829 → 0.814); elpv 0.949
(F1-max 0.912) against 0.951 (0.906) before, measured on the AMX machine: unchanged. The same term
on the RD of an earlier session (no synthetic defects, ReLU outputs, 20 epochs) changed nothing: it pays once
the student also rebuilds normal features from defective input. Adding the distance to the map as well
(standardised like the levels, weight w against the cosine, the epoch-36 network) trades image for pixel
AUROC: w = 0.5 0.898 / 0.716 / 0.734, w = 1 0.879 / 0.729 / 0.745, w = 2 0.867 / 0.740 / 0.754 (``uneven``
pixel AUROC 0.654 / 0.673 / 0.688 against the reference's 0.818), so the map keeps the cosine.
``0`` is the paper's loss (and how models saved before it existed load).

Departure, ``relight_prob=0.33`` (default; ``kdcore.synthetic_anomalies.relight``): a third of the synthetic
defects the denoising student learns to undo relight their region (brighter or darker by a gain of 0.55-0.8
or 1.25-1.8, slightly blurred, soft edges) instead of filling it with a texture. Texture fills change what the
surface is; a brightness change leaves its structure, and a student that never had to undo one rebuilds it:
on magnetic_tile ``uneven`` (uneven grinding or lighting, 72 % of the defect pixels) was RD's weakest type.
Measured on magnetic_tile (256², 36 epochs, seed 0, the no-AMX CPU; before = ``magnitude`` above, epoch 35;
after: epoch 34 kept): image / pixel AUROC / AU-PRO 0.914 / 0.664 / 0.685 → 0.945 / 0.687 / 0.690, F1-max
0.882 → 0.911 (all-NG 0.805); images of ``uneven`` 0.865 → 0.949, blowhole 0.954 → 0.973, crack 0.814 →
0.866, break 0.978 → 0.975, fray 0.932 → 0.888; ``uneven`` pixel AUROC 0.582 → 0.620 (the reference's
0.818). On elpv (same machine): 0.949 → 0.947 image AUROC, F1-max 0.912 → 0.901 (all-NG 0.769): no
change on the second set. Milder gains (0.55-0.87 or 1.15-1.8, nearer the 1.04-1.36 brightness ratio of
real ``uneven`` regions) gave 0.940 / 0.676 / 0.687 on magnetic_tile (epoch 35): no gain, so the range stays.
The student now finds ``uneven`` images but not their regions: its map rises as much beside the marked region
as on it (``per_defect_localization`` 0.502, the reference's 0.691). Not the bottleneck's doing alone: STPM's
student, which has none, localises them no better (0.482). The same shading made URD's *teacher* (not its
student) learn brightness defects in an earlier session and changed nothing there (``kdcore.methods.rd_expert``).
``0`` is URD's and DRAEM's generator (and how models saved before it existed load).

Departure, ``hard_fraction=0.1`` (default): the loss is the per-position ``1 - cos`` averaged over the
worst-matched 10 % of each level's positions in the batch (``pyramid_matching_loss``, ``kdcore.ops.hardest_mean``;
EfficientAD's hard feature loss, as STPM's, DSKD's and URD's) instead of the code's cosine of whole flattened
levels (above); the ``magnitude`` term still averages all positions. Once most of a normal surface is matched,
the rest of the budget goes where the student is still wrong. Measured on magnetic_tile (256², 36 epochs, seed
0, the no-AMX CPU, ``--set rd.hard_fraction=0.1``; before = ``relight_prob`` above; epoch 34 kept): image /
pixel AUROC / AU-PRO 0.945 / 0.687 / 0.690 → 0.960 / 0.703 / 0.696, F1-max 0.911 → 0.932 (all-NG 0.805);
images of crack 0.866 → 0.913, fray 0.888 → 0.925, uneven 0.949 → 0.965, blowhole 0.973 → 0.974, break 0.975 →
0.979; ``uneven`` pixel AUROC 0.620 → 0.653, its localisation 0.502 → 0.517. On elpv
(same CPU, ``--data elpv_mono``): 0.947 → 0.945, F1-max 0.901 → 0.897 (all-NG 0.769): no change on the second
set, so it is the default. ``1.0`` is the code's
loss (and how models saved before it existed load).

Option, ``segment_steps`` (default 0: the paper's map): after the student is trained and its epoch selected,
a segmentation head (``kdcore.methods.segmentation``, DeSTSeg's second stage) is trained for that many steps
of ``batch_size`` on the frozen teacher and student, on the training images with the same synthetic defects
(half of each batch left clean), and its probability becomes the map; the student's epoch is still selected on
its own map, and a training stopped before the head keeps the student's map (``segment_steps`` then reads 0).
The student cannot outline what it reproduces; the head is told where the synthetic defects are and learns
which mismatches, and which surfaces, go with them. Measured on magnetic_tile (256², seed 0, the no-AMX CPU,
``python -m bench.accuracy --data ../shared/data/magnetic_tile --methods rd --set rd.segment_steps=800``;
student epoch 35 kept): image / pixel AUROC / AU-PRO 0.945 / 0.687 / 0.690 → 0.913 / 0.788 /
0.777, F1-max 0.911 both (all-NG 0.805); localisation (``per_defect_localization``) blowhole / break / crack /
fray / uneven 0.990 / 0.961 / 0.830 / 0.923 / 0.502 → 0.997 / 0.924 / 0.939 / 0.961 / 0.650 (the reference's
0.966 / 0.914 / 0.893 / 0.925 / 0.691); images of crack 0.866 → 0.726, uneven 0.949 → 0.924. The head's 800 steps
took about 29 minutes on that CPU (part of them beside a test run), 72 minutes in all. So not the default: it
buys pixel AUROC and AU-PRO with image AUROC and CPU time, and pixel AUROC stays below the reference's 0.810;
it is the option for sharper heatmaps, not for more found defects. On elpv (image labels only, ``--data
elpv_mono``, same CPU, student epoch 33 kept): image AUROC 0.947 → 0.953, F1-max 0.901 → 0.920 (all-NG 0.769;
reference 0.958): the head costs nothing there.
Throwaway variants on the saved default RD (800 steps): DeSTSeg's input alone (the products, no teacher
features) 0.902 / 0.770 / 0.767; that head's map position-normalised like the students' 0.903 / 0.738 (so
the head's map skips the default "position" rule); the head with teacher features (today's) 0.901 / 0.797 /
0.785, and its logits instead of its probability 0.875 / 0.796.
Option, ``segment_context_strides`` (default ``[32]``; ``[]`` is the head above, and how models saved before it
existed load): the head also reads the teacher's coarser levels, which no student distils (from a second
extractor with the teacher's weights; Lite0's stride-32 level adds 320 channels, and the model file grows from
16.7 to 30.2 MB). ``uneven`` is a gradual change of grinding and brightness over a wide region, which the finer
levels see only as texture. Measured as above (``--set rd.segment_steps=800``, student epoch 35 kept): 0.913 /
0.788 / 0.777 → **0.901 / 0.825 / 0.781**, F1-max 0.893 (all-NG 0.805); images of uneven 0.924 → 0.913, crack
0.726 → 0.697; pixel AUROC of uneven 0.789 (reference 0.818); localisation 0.997 / 0.934 / 0.913 / 0.966 /
0.696. So RD with its head is above the reference (0.871 / 0.810 / 0.705) on all three, the only student that is
on pixel AUROC; 83 minutes of training, the head's half of them partly beside a test run. The throwaway version
(on the saved default student) had read 0.908 / 0.833 / 0.754.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import nn

from kdcore.backbones import Backbone
from kdcore.methods.base import (DISTILLABLE_STRIDES, TEACHER_STRIDES, AnomalyMethod, HardLossConfig,
                                 MapStridesConfig, coarse_map_strides, distilled_strides, map_level_indices)
from kdcore.methods.denoising import DenoisingConfig, DenoisingMethod
from kdcore.methods.segmentation import SegmentationHead, segmentation_loss, with_clean_share
from kdcore.ops import (GaussianBlur, cosine_distance_map, flattened_cosine_loss, fuse_levels, hardest_mean,
                        standardized_sq_distance_map, upsample)
from kdcore.registry import register_method


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; a projection shortcut appears when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, out_channels, stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class OCBE(nn.Module):
    """Multi-scale feature fusion + one-class embedding: three teacher levels → one stride-32 embedding."""

    def __init__(self, channels: tuple[int, int, int], blocks: int = 2):
        super().__init__()
        c1, c2, c3 = channels
        self.reduce1 = nn.Sequential(conv_bn_relu(c1, c2, stride=2), conv_bn_relu(c2, c3, stride=2))
        self.reduce2 = conv_bn_relu(c2, c3, stride=2)
        self.out_channels = 2 * c3
        stage = [BasicBlock(3 * c3, self.out_channels, stride=2)]
        stage += [BasicBlock(self.out_channels, self.out_channels) for _ in range(blocks - 1)]
        self.embed = nn.Sequential(*stage)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        f1, f2, f3 = features
        return self.embed(torch.cat([self.reduce1(f1), self.reduce2(f2), f3], dim=1))


class DecoderStage(nn.Module):
    """Upsample ×2 with a transposed convolution, then refine with basic blocks."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int):
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(*[BasicBlock(out_channels, out_channels) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.up(x))


class ReverseDecoder(nn.Module):
    """Decoder student mirroring the encoder: returns features shallow-to-deep, like the teacher's.

    Each stage ends in ReLU and feeds the next stage; what is compared with the teacher is a linear 1×1
    projection of it (``heads``), so the student can produce signed features (see the module notes).
    """

    def __init__(self, channels: tuple[int, ...], in_channels: int, blocks: int = 2, linear_heads: bool = True):
        super().__init__()
        stages, previous = [], in_channels
        for level_channels in reversed(channels):
            stages.append(DecoderStage(previous, level_channels, blocks))
            previous = level_channels
        self.stages = nn.ModuleList(stages)
        self.heads = nn.ModuleList([nn.Conv2d(c, c, 1) if linear_heads else nn.Identity() for c in reversed(channels)])

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        outputs, x = [], embedding
        for stage, head in zip(self.stages, self.heads):
            x = stage(x)
            outputs.append(head(x))
        return outputs[::-1]


class CoarseLevelHead(nn.Module):
    """Rebuilds the teacher's stride-32 level from the OCBE embedding, which is already at stride 32: basic
    blocks to that level's channels, then a linear 1×1 output as the decoder's heads (module notes)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int = 2):
        super().__init__()
        stages = [BasicBlock(in_channels, out_channels)] + [BasicBlock(out_channels, out_channels)
                                                            for _ in range(blocks - 1)]
        self.blocks = nn.Sequential(*stages, nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.blocks(embedding)


def coarse_level_head(channels: tuple[int, ...], in_channels: int, blocks: int) -> CoarseLevelHead | None:
    """The head for a distilled level beyond the paper's three (``channels``: all distilled levels), if any."""
    return CoarseLevelHead(in_channels, channels[-1], blocks) if len(channels) > len(TEACHER_STRIDES) else None


def with_coarse_level(levels: list[torch.Tensor], coarse: CoarseLevelHead | None,
                      embedding: torch.Tensor) -> list[torch.Tensor]:
    """A reverse student's output: the decoder's ``levels``, then the coarse head's from ``embedding``."""
    return levels if coarse is None else [*levels, coarse(embedding)]


def rd_level_distances(teacher_features, student_features) -> list[torch.Tensor]:
    """Per-level per-pixel ``1 - cos`` at each level's resolution, N×1×h×w."""
    return [cosine_distance_map(t, s) for t, s in zip(teacher_features, student_features)]


class ChannelScale(nn.Module):
    """The teacher's per-channel std of each level over the training images, the unit of ``magnitude_loss``."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        for level, count in enumerate(channels):
            self.register_buffer(f"std{level}", torch.ones(count))

    def stds(self) -> list[torch.Tensor]:
        return [getattr(self, f"std{level}") for level in range(len(self._buffers))]

    @torch.no_grad()
    def fit(self, feature_batches) -> None:
        """Set the stds from an iterable of per-level feature lists (N×C×h×w each)."""
        moments = None  # per level: count, sum and sum of squares per channel, in float64
        for levels in feature_batches:
            batch = [(f[:, 0].numel(), f.double().sum(dim=(0, 2, 3)), f.double().pow(2).sum(dim=(0, 2, 3)))
                     for f in levels]
            moments = batch if moments is None else [tuple(a + b for a, b in zip(m, n))
                                                     for m, n in zip(moments, batch)]
        for std, (count, total, squares) in zip(self.stds(), moments):
            mean = total / count
            std.copy_((squares / count - mean.pow(2)).clamp_min(1e-12).sqrt().to(std))


class LevelScale(nn.Module):
    """Each student's per-level std of its upsampled ``1 - cos`` maps on the normal hold-out (students × levels),
    by which ``students_anomaly_map`` divides the levels; ones until ``fit_level_scale`` sets them."""

    def __init__(self, students: int, levels: int):
        super().__init__()
        self.register_buffer("std", torch.ones(students, levels))


def students_anomaly_map(level_distances: list[list[torch.Tensor]], size: int, blur: GaussianBlur,
                         level_scale: LevelScale | None = None, levels: tuple[int, ...] | None = None) -> torch.Tensor:
    """RD's map from each student's level distances: the ``levels`` (indices; all when None) summed at input
    size (align_corners=True), each divided by its hold-out std when ``level_scale`` is given; the students'
    mean; then blurred."""
    fused = 0
    for student, distances in enumerate(level_distances):
        if level_scale is not None:
            distances = [d / std for d, std in zip(distances, level_scale.std[student])]
        if levels is not None:
            distances = [distances[level] for level in levels]
        fused = fused + fuse_levels(distances, size, mode="sum", align_corners=True)
    return blur(fused / len(level_distances))


@torch.no_grad()
def fit_level_scale(method: AnomalyMethod, holdout_images: torch.Tensor) -> None:
    """Set ``method.net.level_scale`` from the uint8 hold-out images: the std over images and pixels of every
    student's level maps, upsampled to the input size as the map uses them."""
    net = method.net.eval()
    std = net.level_scale.std
    total, squares, count = torch.zeros_like(std), torch.zeros_like(std), 0
    with method._autocast():
        for chunk in holdout_images.split(32):
            maps = torch.stack([torch.stack([upsample(d.float(), net.size, align_corners=True) for d in student])
                                for student in net.student_level_distances(method._normalize(chunk))])
            dims = tuple(range(2, maps.dim()))
            total += maps.sum(dim=dims)
            squares += maps.pow(2).sum(dim=dims)
            count += maps[0, 0].numel()
    mean = total / count
    std.copy_((squares / count - mean.pow(2)).clamp_min(1e-12).sqrt())


def pyramid_matching_loss(teacher_features, student_features, hard_fraction: float = 1.0) -> torch.Tensor:
    """``sum_levels mean_{batch, positions} (1 - cos)`` of per-pixel feature vectors, the mean over the hardest
    ``hard_fraction`` of each level's positions (``kdcore.ops.hardest_mean``)."""
    return sum(hardest_mean(cosine_distance_map(t, s), hard_fraction)
               for t, s in zip(teacher_features, student_features))


def rd_loss(teacher_features, student_features, hard_fraction: float = 1.0) -> torch.Tensor:
    """RD's code loss, ``1 - cos`` of each sample's flattened level, summed over levels; with ``hard_fraction``
    below 1 the per-position ``pyramid_matching_loss`` over the worst-matched share of the positions."""
    if hard_fraction >= 1.0:
        return sum(flattened_cosine_loss(t, s) for t, s in zip(teacher_features, student_features))
    return pyramid_matching_loss(teacher_features, student_features, hard_fraction)


def magnitude_loss(teacher_features, student_features, channel_scale: ChannelScale) -> torch.Tensor:
    """``sum_levels mean ((teacher - student) / teacher's channel std)^2``: what the cosine loss leaves free."""
    return sum(standardized_sq_distance_map(t, s, std).mean()
               for t, s, std in zip(teacher_features, student_features, channel_scale.stds()))


class RDNetwork(nn.Module):
    def __init__(self, teacher: Backbone, size: int, bottleneck_blocks: int, decoder_blocks: int,
                 linear_heads: bool = True, standardize_levels: bool = True,
                 map_levels: tuple[int, ...] | None = None, magnitude: float = 0.0, segmentation: bool = False,
                 segmentation_context_strides: tuple[int, ...] = (), hard_fraction: float = 1.0):
        super().__init__()
        self.teacher = teacher
        self.hard_fraction = hard_fraction
        # The teacher's coarser levels for the head alone: a second extractor of the same weights, since the
        # teacher's own levels are what every student-side part is built on.
        self.segmentation_context = Backbone(teacher.name, segmentation_context_strides, teacher.weights) \
            if segmentation and segmentation_context_strides else None
        self.segmentation = SegmentationHead(teacher.channels, self.segmentation_context.channels if
                                             self.segmentation_context else ()) if segmentation else None
        # The map is the head's once the head is trained (``ReverseDistillation.train_second_stage``); a model
        # built to be loaded has a trained one.
        self.map_from_segmentation = segmentation
        self.map_levels = map_levels
        self.magnitude = magnitude
        self.channel_scale = ChannelScale(teacher.channels) if magnitude > 0 else None
        # The bottleneck and decoder are the paper's, on the first three levels; a teacher level coarser than those
        # (stride 32, where the map reads it) is rebuilt from the embedding by a head of its own.
        paper_levels = teacher.channels[:len(TEACHER_STRIDES)]
        self.bottleneck = OCBE(paper_levels, bottleneck_blocks)
        self.decoder = ReverseDecoder(paper_levels, self.bottleneck.out_channels, decoder_blocks, linear_heads)
        self.coarse = coarse_level_head(teacher.channels, self.bottleneck.out_channels, decoder_blocks)
        self.blur = GaussianBlur(sigma=4.0)
        self.level_scale = LevelScale(1, len(teacher.channels)) if standardize_levels else None
        self.size = size

    def features(self, x: torch.Tensor, teacher_features: list[torch.Tensor] | None = None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Teacher and student features of ``x``; ``teacher_features``, where given, are the teacher's of ``x``."""
        if teacher_features is None:
            with torch.no_grad():
                teacher_features = self.teacher(x)
        embedding = self.bottleneck(teacher_features[:len(TEACHER_STRIDES)])
        return teacher_features, with_coarse_level(self.decoder(embedding), self.coarse, embedding)

    def loss(self, x: torch.Tensor, defective: torch.Tensor | None = None,
             teacher_features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """RD's loss on ``x``; with ``defective`` (x with synthetic defects) also the student's reconstruction,
        from the defective copy, of the teacher's features of ``x``. ``teacher_features``: as in ``features``."""
        teacher_features, student_features = self.features(x, teacher_features)
        students = [student_features] + ([self.features(defective)[1]] if defective is not None else [])
        loss = sum(rd_loss(teacher_features, student, self.hard_fraction) for student in students)
        if self.channel_scale is not None:
            loss = loss + self.magnitude * sum(magnitude_loss(teacher_features, student, self.channel_scale)
                                               for student in students)
        return loss

    def student_level_distances(self, x: torch.Tensor) -> list[list[torch.Tensor]]:
        return [rd_level_distances(*self.features(x))]

    def segmentation_inputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], ...]:
        """What the segmentation head reads: teacher, student and context features of ``x``."""
        context = self.segmentation_context(x) if self.segmentation_context is not None else []
        return (*self.features(x), context)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        if self.map_from_segmentation:
            logits = self.segmentation(*self.segmentation_inputs(x))
            return self.blur(upsample(torch.sigmoid(logits.float()), self.size))
        return students_anomaly_map(self.student_level_distances(x), self.size, self.blur, self.level_scale,
                                    self.map_levels)


LR_SCHEDULES = ("constant", "cosine")
SEGMENTATION_LR = 1e-3  # Adam, for the segmentation head


def cosine_decay(total_steps: int) -> Callable[[int], float]:
    """The learning-rate factor after ``step`` steps: half a cosine from 1 down to 0 at ``total_steps``."""
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def lr_schedulers(schedule: str, optimizers: list[torch.optim.Optimizer], total_steps: int) -> list:
    """The schedulers of ``schedule`` (``LR_SCHEDULES``) for each optimiser; none for a constant rate."""
    if schedule == "constant":
        return []
    return [torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_decay(total_steps)) for optimizer in optimizers]


@dataclass
class RDFamilyConfig(MapStridesConfig, DenoisingConfig):
    """What RD, DSKD and URD share: a reverse decoder behind an OCBE, trained with Adam."""

    batch_size: int = 16
    lr: float = 0.005  # Adam's learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # Adam's
    bottleneck_blocks: int = 2  # residual blocks in the one-class bottleneck
    decoder_blocks: int = 2  # residual blocks per decoder stage
    # A linear 1×1 output per decoder level (module notes); models saved before it existed have none.
    linear_heads: bool = True
    # Levels divided by their hold-out std before they are summed (module notes); the paper sums them as they are.
    standardize_levels: bool = True
    # The student also learns from synthetic-defect copies (module notes); the paper trains on normal images only.
    denoise: bool = True
    # "constant" (the paper's) or "cosine": the rate decays to zero over the training's steps.
    lr_schedule: str = "constant"
    # The teacher strides whose levels make the map, from 4, 8, 16 and 32 (the student also learns 32 where the map
    # reads it, RD's notes); None: by input size, (8, 16, 32) from 256 px up, (8, 16) below. The paper's map
    # uses 4, 8 and 16.
    map_strides: tuple[int, ...] | None = None
    map_stride_choices: ClassVar[tuple[int, ...]] = DISTILLABLE_STRIDES
    legacy_defaults: ClassVar[dict] = {**DenoisingConfig.legacy_defaults, "linear_heads": False,
                                       "standardize_levels": False, "denoise": False, "map_strides": TEACHER_STRIDES}

    def validate(self) -> None:
        if self.map_strides is None:
            self.map_strides = coarse_map_strides(self.size, below=(8, 16))
        super().validate()
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.bottleneck_blocks < 1 or self.decoder_blocks < 1:
            raise ValueError("bottleneck_blocks and decoder_blocks must be at least 1")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


@dataclass
class RDConfig(HardLossConfig, RDFamilyConfig):
    # Weight of the channel-standardised squared distance in the loss (module notes); 0 is the paper's loss.
    magnitude: float = 1.0
    # Share of the denoising student's synthetic defects that relight their region (module notes).
    relight_prob: float = 0.33
    # Steps of a segmentation head trained on synthetic defects after the student, whose probability is then the
    # map (module notes); 0: none, the paper's map. The head's map skips the default "position" normalisation.
    segment_steps: int = 0
    # The teacher's coarser strides the segmentation head also reads (module notes); () for none.
    segment_context_strides: tuple[int, ...] = (32,)
    # Below 1: the loss is the per-position cosine over the worst-matched share of each level's positions
    # (module notes); 1 is the paper code's cosine of whole flattened levels.
    hard_fraction: float = 0.1
    legacy_defaults: ClassVar[dict] = {**RDFamilyConfig.legacy_defaults, "magnitude": 0.0, "relight_prob": 0.0,
                                       "segment_context_strides": (), "hard_fraction": 1.0}

    def validate(self) -> None:
        super().validate()
        if not self.magnitude >= 0:
            raise ValueError(f"magnitude must be zero or positive, got {self.magnitude!r}")
        if isinstance(self.segment_steps, bool) or not isinstance(self.segment_steps, int) or self.segment_steps < 0:
            raise ValueError(f"segment_steps must be a whole number >= 0, got {self.segment_steps!r}")
        strides = self.segment_context_strides
        self.segment_context_strides = (strides,) if isinstance(strides, int) else tuple(strides)
        if not all(isinstance(s, int) and s > max(TEACHER_STRIDES) for s in self.segment_context_strides):
            raise ValueError(f"segment_context_strides must be strides coarser than the teacher's "
                             f"{TEACHER_STRIDES}, e.g. [32], or [] for none; got {strides!r}")


class RDFamily(DenoisingMethod):
    """What RD, DSKD and URD share around their networks (``network_class``): the map's levels, the hold-out
    level scale, Adam on everything but the teacher (URD overrides it: its teacher trains), the schedule."""

    Config = RDFamilyConfig
    network_class: type[nn.Module]

    def build_network(self, backbone: Backbone) -> nn.Module:
        c = self.config
        return self.network_class(backbone, c.size, c.bottleneck_blocks, c.decoder_blocks, c.linear_heads,
                                  c.standardize_levels, map_level_indices(c.map_strides, backbone.strides),
                                  **self.network_options())

    def network_options(self) -> dict:
        """Keyword arguments of ``network_class`` beyond the family's."""
        return {}

    def teacher_strides(self) -> tuple[int, ...]:
        return distilled_strides(self.config.map_strides)

    def finish_training(self, holdout_images: torch.Tensor) -> None:
        super().finish_training(holdout_images)
        if self.config.standardize_levels:
            fit_level_scale(self, holdout_images)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        trainable = [p for p in self.net.parameters() if p.requires_grad]  # the teacher is frozen
        return [torch.optim.Adam(trainable, lr=self.config.lr, betas=self.config.betas)]

    def configure_schedulers(self, optimizers: list[torch.optim.Optimizer], total_steps: int) -> list:
        return lr_schedulers(self.config.lr_schedule, optimizers, total_steps)


@register_method
class ReverseDistillation(RDFamily):
    name = "rd"
    summary = "Reverse Distillation (CVPR 2022): decoder student behind a one-class bottleneck"
    Config = RDConfig
    default_epochs = {"cpu": 28, "cuda": 200}  # 28: the CPU budget (module notes); the paper's 200 on a GPU
    network_class = RDNetwork

    def network_options(self) -> dict:
        distilled = self.teacher_strides()  # levels the head reads anyway, with the student's beside them
        context = tuple(s for s in self.config.segment_context_strides if s not in distilled)
        return {"magnitude": self.config.magnitude, "segmentation": self.config.segment_steps > 0,
                "segmentation_context_strides": context, "hard_fraction": self.config.hard_fraction}

    def setup_training(self, train_images: torch.Tensor) -> None:
        super().setup_training(train_images)
        self.net.map_from_segmentation = False  # the student is selected on its own map
        if self.net.channel_scale is not None:
            self.net.channel_scale.fit(self.frozen_feature_batches(train_images))

    def train_second_stage(self, train_images: torch.Tensor, progress, should_stop) -> None:
        """Train the segmentation head (``segment_steps``) on the selected, frozen teacher and student."""
        head = self.net.segmentation
        if head is None:
            return
        self.net.eval()
        head.train()
        optimizer = torch.optim.Adam(head.parameters(), lr=SEGMENTATION_LR)
        batch_size = min(self.config.batch_size, len(train_images))
        order = torch.Generator().manual_seed(self.config.seed + 2)
        start, steps = time.perf_counter(), self.config.segment_steps
        for step in range(1, steps + 1):
            indices = torch.randint(len(train_images), (batch_size,), generator=order)
            clean = self._normalize(train_images[indices])
            defective, masks = self.synthesize(clean)
            images, masks = with_clean_share(clean, defective, masks.to(clean.device), order)
            with torch.no_grad(), self._autocast(training=True):
                inputs = self.net.segmentation_inputs(images)
            with self._autocast(training=True):
                loss = segmentation_loss(head(*inputs), masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None:
                progress(self._progress(step, steps, self.config.epochs, float(loss.detach()), start))
            if should_stop is not None and should_stop() and step < steps:
                self.config.segment_steps = step  # what the saved model's head had
                break
        self.net.map_from_segmentation = True

    def finish_training(self, holdout_images: torch.Tensor) -> None:
        super().finish_training(holdout_images)
        if self.net.segmentation is not None and not self.net.map_from_segmentation:
            # Training stopped before the head's stage: keep the student's map, and a model that says so.
            self.net.segmentation, self.net.segmentation_context, self.config.segment_steps = None, None, 0

    def map_normalization_rule(self) -> str:
        # A probability trained against clean images is already 0 where they are; measured on magnetic_tile,
        # subtracting the hold-out's mean per position cost 0.03 pixel AUROC (module notes).
        rule = self.config.map_normalization
        return "none" if self.net.map_from_segmentation and rule == "position" else rule
