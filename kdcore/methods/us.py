"""Uninformed Students (Bergmann, Fauser, Sattlegger, Steger, CVPR 2020, arXiv 1911.02357).

A small patch-descriptor network, the teacher, first learns to describe image patches like a pretrained CNN.
An ensemble of students of the same architecture, randomly initialised, then learns to predict the teacher's
descriptor at every pixel of normal images. Where the students' mean misses the teacher (regression error)
or the students disagree (predictive variance), the patch is anomalous. There is no official code; the
best-known reimplementation (denguir/student-teacher-anomaly-detection) departs from the paper, so the paper
is followed wherever it is explicit.

Network, per receptive field p (``patch_sizes``), from the paper's supplementary tables, LeakyReLU with slope
5e-3 after every convolution but the last, so the descriptor itself is linear; 2×2 max pools with stride 2:
- p=17: conv6×6(128)-conv5×5(256)-conv5×5(256)-conv4×4(d)
- p=33: conv5×5(128)-pool-conv5×5(256)-pool-conv2×2(256)-conv4×4(d)
- p=65: conv5×5(128)-pool-conv5×5(128)-pool-conv5×5(256)-pool-conv4×4(256)-conv1×1(d)
with d = ``descriptor_dim`` = 128. The p=33 and p=65 networks map a p×p patch to one descriptor but, because
the floor pooling drops the last row, only see its top-left 32×32 and 60×60 pixels. ``width`` scales the
hidden channels (1.0 is the paper). Students have the teacher's architecture.

Dense application: every 2×2/stride-2 pool becomes a 2×2/stride-1 pool dilated by the product of the earlier
strides, and each later layer is dilated the same way (the "à trous" form of fast dense feature extraction).
The unstrided network run on the image padded by p//2 (reflect) gives, at every pixel, exactly the descriptor
the patch network gives for the p×p patch centred there (tested). Students train on random crops together
with the context their receptive field needs, so a crop's targets equal the whole image's at those pixels.

Teacher distillation (``setup_training``, before the students): loss ``kd_weight·L_k + metric_weight·L_m +
compact_weight·L_c`` on batches of ``teacher_batch_size`` patches, Adam (2e-4, weight decay 1e-5):
- L_k: ``||D(T(p)) - P(p)||²`` with D a linear decoder from d to the backbone's width and P(p), with
  ``distill_target="patch"`` (default, the paper's), the frozen backbone (``teacher_strides``: its stride-16
  and stride-32 levels) applied to the patch resized to ``distill_size`` (default: p rounded to a multiple of
  32, about its own resolution), each level average-pooled and the two concatenated (for EfficientNet-Lite0
  112+320 = 432 values; the paper used ResNet-18's 512-d pooled output). With ``distill_target="image"`` P(p)
  is instead the backbone's stride-8 and stride-16 features of the whole image, 3×3-averaged (what
  ``teacher_knn`` reads), at the patch's centre; patches then stay upright. With ``standardize_targets`` the
  targets are z-scored per dimension (mean and std of 1024 probe patches), so that no few large channels
  dominate the loss.
- L_c: sum of the squared off-diagonal entries of the descriptor dimensions' correlation matrix over the batch.
- L_m: triplet loss ``max(0, margin + δ+ - δ-)``, δ+ the squared distance from a patch to a positive (the same
  place shifted by up to p//16 pixels, with luminance jitter and Gaussian noise), δ- the smaller squared
  distance of either to a negative (the next patch in the batch, from another random place).
Deviation: the paper distils on ImageNet patches, which are not available offline; the teacher distils on
random patches of the training images (at the dense resolution), with random 90° rotations and flips.
The collapse, measured: with L_c on, the descriptors become decorrelated noise. The share of the targets'
variance that ``D(T(p))`` explains (``r2`` in ``training_info["teacher"]``, on 1024 fresh patches) stayed at
-0.04 on magnetic_tile at rates 2e-4 and 1e-3, with or without L_m, and rose to 0.46 after 1500 steps with L_k
alone (image target, ``standardize_targets``; 0.27 without). A nearest-neighbour memory on the collapsed
teacher's own dense descriptors read image / pixel AUROC 0.605 / 0.604 (its students' error 0.662 / 0.638,
their variance 0.590 / 0.615; the backbone's features in the same memory 0.660 / 0.801): the students imitate a
teacher that has lost the signal. The triplet term alone did not collapse (r2 0.20 against 0.14 after 500
steps). Without both terms (``--set us.compact_weight=0 us.metric_weight=0 us.teacher_lr=0.001
us.standardize_targets=true``; fast preset, seed 0, quiet 2-core CPU, 15.3 minutes; the teacher's r2 on the
image target 0.58) magnetic_tile reads image / pixel AUROC / AU-PRO 0.634 / 0.641 / 0.522 → **0.719 / 0.673 /
0.507** (images blowhole 0.714, break 0.781, crack 0.618, fray 0.800, uneven 0.703), and with
``distill_target="image"`` too 0.697 / 0.675 / 0.512. The image target alone, with the paper's weights, changed
nothing (0.638 / 0.633 / 0.536). But on the tests' 64-px synthetic set the teacher that learns its backbone
(r2 0.56-0.78) leaves US at chance (image AUROC 0.48-0.55 at 100-300 teacher steps), where the collapsed one
reaches 0.9 and more. Split there (100-300 teacher steps), the students' error is *lower* on the defects than
on the texture (its pixel AUROC 0.03-0.09): a dark spot or scratch leaves less texture in the patch, its pooled
backbone features lie nearer their mean (the teacher's standardised descriptor norm 53-74 against 121 on
normal pixels), and students trained on normal patches predict such plain targets well; the collapsed
teacher's descriptors instead grow tenfold there (2693 against 289). A compactness weight of 0.1 keeps the
fixture working only while the teacher has not yet learnt (r2 0.003 at 100 steps; 0.71 at 300 and chance
again). On elpv (``bench.elpv``, 12 epochs by the step floor) the options read 0.856 against the default's
0.863 (reference 0.958). So the paper's weights stay the default: one real set gains, the other loses a
little and the synthetic one fails; the options are there to try.

Students: regress ``(T(x) - μ)/σ`` with μ, σ the per-dimension mean and std of the teacher's dense
descriptors over the training images (at most 128 of them; buffers); loss ``mean_pixels ||S_i(x) - t̂||²``
summed over students and receptive fields; Adam (paper: 1e-4, weight decay 1e-5, batch 1, 100 epochs).
Students see random crops (``crop_size``, at the descriptor resolution) whose starts favour the borders, so
that the reflect-padded border pixels are learnt about as well as the rest.

Map, per receptive field: regression error ``e = ||mean_i S_i - t̂||²`` and predictive variance
``v = mean_i ||S_i||² - ||mean_i S_i||²``, each z-scored on the normal hold-out (``finish_training``; buffers),
then summed; the maps of all receptive fields are averaged and resized bilinearly to the input size. No
smoothing. Image score = max of the map (the paper evaluates only pixel-level PRO).
Deviation, ``standardize="position"`` (default): the z-score's mean and std are per pixel (hold-out moments
smoothed with σ = 4 descriptor pixels, std floored at 0.1 of the global one), not the paper's one mean and std
over all pixels (``standardize="global"``). On magnetic_tile the students' error is systematically higher and
noisier near the image border, so with global statistics 92-95 % of the normal test images had their maximum
within 16 px of the border and image AUROC was 0.47 (below chance); per-position statistics brought that share
to 51 % and the image AUROC to 0.57 on the same trained model (200-image test subset, 300 teacher steps,
2 student epochs). For images that are not aligned (textures), the per-pixel statistics tend to the global ones.

Training phases: ``fit`` first distils the teacher(s) (``setup_training``; progress goes to the
``kdcore.methods.us`` logger, ``should_stop`` is honoured, and steps, final loss and seconds end up in
``training_info["teacher"]``), then the base loop trains the students; ``training_info["seconds"]`` counts
the students only.

Cost and presets. Dense extraction dominates: in dense form a network costs as many multiply-adds per pixel
as it has convolution weights. The paper's setting (p ∈ {17, 33, 65}, full width, 256² descriptors, 1 teacher
+ 3 students each) is about 1.8 TMAC per 256² image, over a minute per image on a 2-core CPU. ``preset``
fills every parameter left at None:
- "paper": p ∈ {17, 33, 65}, 3 students, width 1, descriptors at full resolution, students on whole images
  (batch 1, 100 epochs, lr 1e-4), 50 000 teacher steps. For a GPU.
- "fast" (default): p=33 only (the paper's best single scale), 3 students, width 0.25, descriptors at half
  the input size (at least 96; 128 for 256² inputs) with the map upsampled, so a patch covers 2p input
  pixels; students on 64² crops, batch 4, lr 1e-3, 12 epochs; 3000 teacher steps. About 13 GMAC per 256²
  image (~0.9 s on a shared 2-core CPU).
What "fast" costs against "paper" could not be measured (the paper preset does not run on a CPU in useful
time). On the synthetic fixture a still smaller setting reaches image AUROC 1.0. On magnetic_tile (256², the
fast preset, seed 0, 2-core CPU shared with two other trainings): image AUROC 0.623, pixel AUROC 0.622,
AU-PRO 0.477, F1-max 0.807; teacher 492 s, students 1279 s (3 epochs), 1.9 images/s. The previous fast
preset (200 teacher steps, 1 student epoch, global z-scores) gave image AUROC 0.44 there: the students were
far from converged (their loss still fell from 123 to 52 between epochs 1 and 2) and borders dominated.
With letterboxed inputs on a quiet CPU (same preset): image AUROC 0.582, pixel AUROC 0.628, AU-PRO 0.451 in
3.3 minutes, below the ``teacher_knn`` reference on all three (0.871 / 0.810 / 0.705; with its raw map 0.660 /
0.801 / 0.712): the patch teacher, distilled for 500 steps on the dataset's own patches, carries less than
the ImageNet teacher it learns from. That preset (500 teacher steps, 3 student epochs) was far from converged:
the students' hold-out score fell at every epoch and the best epoch was the last. Six times the teacher steps
and four times the student epochs (today's preset, 13.5 minutes on a quiet 2-core CPU, inside the 20-minute
CPU budget) give 0.634 / 0.641 / 0.522 (per defect image AUROC blowhole 0.662, break 0.747, crack 0.567, fray
0.661, uneven 0.537); the hold-out score was still falling at epoch 12 (160 against 173 at epoch 10). Still
well below the reference: a budget fix, not the missing ImageNet distillation.

Option, off by default: ``hard_fraction`` below 1 averages each student's squared error over the
worst-matched share of the positions (EfficientAD's hard feature loss), which lifted STPM, DSKD, URD and RD on
magnetic_tile (their module notes). Not here: with ``--set us.hard_fraction=0.1`` (same data, preset, seed and
quiet 2-core CPU, 15.6 minutes) image / pixel AUROC / AU-PRO read 0.640 / 0.632 / 0.540 against the plain
mean's 0.634 / 0.641 / 0.522 (per defect image AUROC blowhole 0.692, break 0.750, crack 0.601, fray 0.666,
uneven 0.506), within noise, so the paper's mean stays. US is limited by what its patch teacher carries, not by
where its students spend their steps.
Neither did distilling the patch teacher on synthetic-defect copies of the training images too (one per
image, a third relit; a trial, not kept): 0.588 / 0.634 / 0.470, worse on all three.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from kdcore.backbones import Backbone
from kdcore.methods.base import AnomalyMethod, HardLossConfig
from kdcore.methods.teacher_knn import local_context_embedding
from kdcore.ops import hardest_mean, position_mean, upsample
from kdcore.registry import register_method

log = logging.getLogger(__name__)

LEAKY_SLOPE = 5e-3
POOL = "pool"
# Layers of the patch networks: kernel size and output channels (None = the descriptor), or a 2×2 pool.
ARCHITECTURES: dict[int, tuple] = {
    17: ((6, 128), (5, 256), (5, 256), (4, None)),
    33: ((5, 128), POOL, (5, 256), POOL, (2, 256), (4, None)),
    65: ((5, 128), POOL, (5, 128), POOL, (5, 256), POOL, (4, 256), (1, None)),
}
# Guards the standardisations against a constant descriptor dimension or score.
MIN_STD = 1e-6
# The descriptor mean and std are estimated on at most this many training images (millions of descriptors
# already; more only cost a dense teacher pass each).
STATS_IMAGES = 128
# Patches that estimate the patch teacher's target statistics and measure its fit.
TARGET_PROBE_PATCHES = 1024
# Per-position standardisation: smoothing of the hold-out moments (descriptor pixels) and the floor of the std
# relative to the global one.
POSITION_SIGMA = 4.0
POSITION_MIN_STD = 0.1
STANDARDIZE_MODES = ("global", "position")
# The backbone levels each distillation target reads.
DISTILL_TARGETS = {"patch": (16, 32), "image": (8, 16)}


# ----------------------------------------------------------------------------- network
class PatchDescriptorNet(nn.Module):
    """Maps a p×p patch to a descriptor (``forward``) or an image to one descriptor per pixel (``dense``)."""

    def __init__(self, patch_size: int, descriptor_dim: int, width: float):
        super().__init__()
        self.patch_size = patch_size
        self.plan, convs, in_channels = [], [], 3
        receptive_field, jump, side = 1, 1, patch_size
        for layer in ARCHITECTURES[patch_size]:
            if layer == POOL:
                self.plan.append(POOL)
                receptive_field, jump, side = receptive_field + jump, jump * 2, side // 2
                continue
            kernel, channels = layer
            out_channels = descriptor_dim if channels is None else max(8, round(channels * width))
            self.plan.append(len(convs))
            convs.append(nn.Conv2d(in_channels, out_channels, kernel))
            in_channels = out_channels
            receptive_field, side = receptive_field + (kernel - 1) * jump, side - kernel + 1
        if side != 1:
            raise AssertionError(f"architecture for p={patch_size} does not reduce a patch to one descriptor")
        self.convs = nn.ModuleList(convs)
        self.receptive_field = receptive_field
        # Reflect padding that centres the p×p patch on each pixel; the right/bottom needs only what the
        # receptive field (shorter than p when pooling drops a row) reaches.
        self.padding = (patch_size // 2, receptive_field - 1 - patch_size // 2)

    def _run(self, x: torch.Tensor, dense: bool) -> torch.Tensor:
        dilation = 1
        for step in self.plan:
            if step == POOL:
                if dense:
                    x = F.max_pool2d(x, 2, stride=1, dilation=dilation)
                    dilation *= 2
                else:
                    x = F.max_pool2d(x, 2)
                continue
            conv = self.convs[step]
            x = F.conv2d(x, conv.weight, conv.bias, dilation=dilation)
            if step < len(self.convs) - 1:
                x = F.leaky_relu(x, LEAKY_SLOPE)
        return x

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """N×3×p×p patches → N×d descriptors (the patch network as trained on patches)."""
        return self._run(patches, dense=False).flatten(1)

    def dense_valid(self, x: torch.Tensor) -> torch.Tensor:
        """Descriptors of every full receptive-field window: N×3×H×W → N×d×(H-r+1)×(W-r+1)."""
        return self._run(x, dense=True)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.padding
        return F.pad(x, (before, after, before, after), mode="reflect")

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """One descriptor per pixel, N×d×H×W, each equal to ``forward`` on the p×p patch centred there."""
        return self.dense_valid(self.pad(x))


class ScaleEnsemble(nn.Module):
    """Teacher, its distillation decoder and the students for one receptive field, with their statistics."""

    def __init__(self, patch_size: int, descriptor_dim: int, width: float, n_students: int, target_dim: int,
                 dense_size: int):
        super().__init__()
        self.teacher = PatchDescriptorNet(patch_size, descriptor_dim, width)
        self.decoder = nn.Linear(descriptor_dim, target_dim)
        self.students = nn.ModuleList(PatchDescriptorNet(patch_size, descriptor_dim, width)
                                      for _ in range(n_students))
        self.register_buffer("descriptor_mean", torch.zeros(1, descriptor_dim, 1, 1))
        self.register_buffer("descriptor_std", torch.ones(1, descriptor_dim, 1, 1))
        # Mean and std (2×H×W, per pixel or constant) of the regression error and of the predictive variance
        # over the normal hold-out.
        identity = torch.stack([torch.zeros(dense_size, dense_size), torch.ones(dense_size, dense_size)])
        self.register_buffer("error_stats", identity.clone())
        self.register_buffer("variance_stats", identity.clone())

    def freeze_teacher(self) -> None:
        self.teacher.requires_grad_(False)
        self.decoder.requires_grad_(False)

    def targets(self, windows: torch.Tensor) -> torch.Tensor:
        """The standardised teacher descriptors of padded windows (valid mode)."""
        with torch.no_grad():
            return (self.teacher.dense_valid(windows) - self.descriptor_mean) / self.descriptor_std

    def student_outputs(self, windows: torch.Tensor) -> torch.Tensor:
        """M×N×d×h×w predictions of the students for padded windows (valid mode)."""
        return torch.stack([student.dense_valid(windows) for student in self.students])

    def error_and_variance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        windows = self.teacher.pad(x)
        return ensemble_scores((student.dense_valid(windows) for student in self.students), self.targets(windows))

    def score_map(self, x: torch.Tensor) -> torch.Tensor:
        error, variance = self.error_and_variance(x)
        return (error - self.error_stats[0]) / self.error_stats[1] + \
            (variance - self.variance_stats[0]) / self.variance_stats[1]


class USNetwork(nn.Module):
    def __init__(self, backbone: Backbone, size: int, dense_size: int, patch_sizes: tuple[int, ...],
                 n_students: int, descriptor_dim: int, width: float, crop_size: int, hard_fraction: float = 1.0):
        super().__init__()
        self.hard_fraction = hard_fraction
        self.backbone = backbone
        self.scales = nn.ModuleList(ScaleEnsemble(p, descriptor_dim, width, n_students, sum(backbone.channels),
                                                  dense_size) for p in patch_sizes)
        self.size, self.dense_size, self.crop_size = size, dense_size, crop_size

    def to_dense_resolution(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_size == x.shape[-1]:
            return x
        return F.interpolate(x, size=(self.dense_size, self.dense_size), mode="bilinear", antialias=True,
                             align_corners=False)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """Student loss on random crops of the batch, each with the context its receptive field needs."""
        x = self.to_dense_resolution(x)
        n, _, h, w = x.shape
        crop = min(self.crop_size, h, w)
        ys, xs = border_fair_offsets(h, crop, n), border_fair_offsets(w, crop, n)
        total = x.new_zeros(())
        for scale in self.scales:
            padded, side = scale.teacher.pad(x), crop + scale.teacher.receptive_field - 1
            windows = torch.stack([padded[i, :, top:top + side, left:left + side]
                                   for i, (top, left) in enumerate(zip(ys, xs))])
            total = total + student_loss(scale.student_outputs(windows), scale.targets(windows), self.hard_fraction)
        return total

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.to_dense_resolution(x)
        fused = torch.stack([scale.score_map(dense) for scale in self.scales]).mean(dim=0)
        return fused if self.dense_size == self.size else upsample(fused, self.size)


# ----------------------------------------------------------------------------- losses
def backbone_descriptor(backbone: Backbone, patches: torch.Tensor, size: int) -> torch.Tensor:
    """The distillation target: the backbone's levels on the resized patch, average-pooled and concatenated."""
    with torch.no_grad():
        resized = F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)
        return torch.cat([level.float().mean(dim=(2, 3)) for level in backbone(resized)], dim=1)


def image_descriptor(embeddings: torch.Tensor, centres: torch.Tensor, dense_shape: tuple[int, int]) -> torch.Tensor:
    """The distillation target of ``distill_target="image"``: the backbone's embedding of the whole image
    (``embeddings``, one per training image, covering the same extent as the dense images of ``dense_shape``)
    read bilinearly at each patch's centre (``centres`` from ``sample_patch_pairs``)."""
    h, w = dense_shape
    index = centres[:, 0].long().to(embeddings.device)
    grid = torch.stack([2 * centres[:, 2] / w - 1, 2 * centres[:, 1] / h - 1], dim=1).to(embeddings.device)
    sampled = F.grid_sample(embeddings[index].float(), grid.view(-1, 1, 1, 2), mode="bilinear",
                            align_corners=False)
    return sampled.flatten(1)


def compactness_loss(descriptors: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal correlations between descriptor dimensions over the batch."""
    centred = descriptors - descriptors.mean(dim=0)
    z = centred / centred.std(dim=0).clamp_min(MIN_STD)
    correlation = z.T @ z / (len(descriptors) - 1)
    return (correlation.pow(2).sum() - correlation.diagonal().pow(2).sum())


def triplet_loss(anchors: torch.Tensor, positives: torch.Tensor, margin: float) -> torch.Tensor:
    """``max(0, margin + δ+ - δ-)`` with the next sample's anchor as negative, hardest of the two pairings."""
    negatives = anchors.roll(1, dims=0)
    positive_distance = (anchors - positives).pow(2).sum(dim=1)
    negative_distance = torch.minimum((anchors - negatives).pow(2).sum(dim=1),
                                      (positives - negatives).pow(2).sum(dim=1))
    return F.relu(margin + positive_distance - negative_distance).mean()


def teacher_loss(scale: ScaleEnsemble, anchors: torch.Tensor, positives: torch.Tensor, targets: torch.Tensor,
                 weights: tuple[float, float, float], margin: float) -> torch.Tensor:
    kd_weight, compact_weight, metric_weight = weights
    descriptors = scale.teacher(anchors)
    loss = kd_weight * (scale.decoder(descriptors) - targets).pow(2).sum(dim=1).mean()
    loss = loss + compact_weight * compactness_loss(descriptors)
    if metric_weight:
        loss = loss + metric_weight * triplet_loss(descriptors, scale.teacher(positives), margin)
    return loss


def student_loss(predictions: torch.Tensor, targets: torch.Tensor, hard_fraction: float = 1.0) -> torch.Tensor:
    """Per-pixel squared error to the standardised teacher, averaged over the worst ``hard_fraction`` of the
    pixels (all at 1.0, the paper's), summed over students."""
    return sum(hardest_mean(errors, hard_fraction) for errors in (predictions - targets).pow(2).sum(dim=2))


def ensemble_scores(predictions: Iterable[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression error ``||mean S - t̂||²`` and predictive variance ``mean ||S||² - ||mean S||²``, N×1×H×W.

    The students' N×d×H×W predictions are accumulated one at a time, so an ensemble never sits in memory whole.
    """
    total = total_sq_norm = None
    count = 0
    for prediction in predictions:
        prediction = prediction.float()
        sq_norm = prediction.pow(2).sum(dim=1, keepdim=True)
        total = prediction if total is None else total + prediction
        total_sq_norm = sq_norm if total_sq_norm is None else total_sq_norm + sq_norm
        count += 1
    mean = total / count
    error = (mean - targets.float()).pow(2).sum(dim=1, keepdim=True)
    variance = total_sq_norm / count - mean.pow(2).sum(dim=1, keepdim=True)
    return error, variance


# ----------------------------------------------------------------------------- teacher pre-training data
def sample_patch_pairs(images: torch.Tensor, patch_size: int, count: int, rotate: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random patches (with ``rotate``, a random 90° rotation and flip), their perturbed positives for the
    triplet loss, and where each patch lies: ``count``×3 (image index, centre y, centre x in pixels, continuous
    coordinates; a rotation turns the patch about that centre)."""
    shift = max(1, patch_size // 16)
    side = patch_size + 2 * shift
    n, _, h, w = images.shape
    index = torch.randint(n, (count,)).tolist()
    ys = torch.randint(h - side + 1, (count,)).tolist()
    xs = torch.randint(w - side + 1, (count,)).tolist()
    turns = torch.randint(4, (count,)).tolist() if rotate else [0] * count
    flips = torch.rand(count).lt(0.5).tolist() if rotate else [False] * count
    offsets = torch.randint(2 * shift + 1, (count, 2)).tolist()
    anchors, positives = [], []
    for i, y, x, k, flip, (dy, dx) in zip(index, ys, xs, turns, flips, offsets):
        crop = torch.rot90(images[i, :, y:y + side, x:x + side], k, dims=(1, 2))
        if flip:
            crop = crop.flip(2)
        anchors.append(crop[:, shift:shift + patch_size, shift:shift + patch_size])
        positives.append(crop[:, dy:dy + patch_size, dx:dx + patch_size])
    positives = torch.stack(positives)
    # Luminance jitter (gain and offset in normalised units) and sensor-like noise.
    gain = 1 + 0.1 * (2 * torch.rand(count, 1, 1, 1, device=images.device) - 1)
    offset = 0.1 * (2 * torch.rand(count, 1, 1, 1, device=images.device) - 1)
    positives = positives * gain + offset + 0.05 * torch.randn_like(positives)
    centres = torch.tensor([index, ys, xs], dtype=torch.float32).T + torch.tensor([0.0, side / 2, side / 2])
    return torch.stack(anchors), positives, centres


def border_fair_offsets(length: int, crop: int, count: int) -> list[int]:
    """Random crop starts that cover border pixels about half as often as central ones, not ``crop`` times less.

    With plain uniform starts the students rarely see the reflect-padded borders and put the image's maximum
    score there (magnetic_tile: image AUROC below 0.5). Starts drawn uniformly from ``[1 - crop, length - 1]``
    (every pixel equally covered) and then clamped into the image fix that.
    """
    starts = torch.randint(1 - crop, length, (count,))
    return starts.clamp(0, length - crop).tolist()


def standardization(values: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean and std (2×H×W) that z-score maps like ``values`` (N×H×W normal hold-out maps).

    "global": one mean and std over all pixels (the paper). "position": per pixel, both moments smoothed
    by a Gaussian (σ = ``POSITION_SIGMA`` pixels, so that a small hold-out gives stable estimates), the std
    kept at least ``POSITION_MIN_STD`` of the global one.
    """
    global_mean, global_std = values.mean(), values.std().clamp_min(MIN_STD)
    if mode == "global":
        mean, std = global_mean.expand(values.shape[1:]), global_std.expand(values.shape[1:])
    else:
        mean = position_mean(values, POSITION_SIGMA).double()
        second = position_mean(values.pow(2), POSITION_SIGMA).double()
        std = (second - mean.pow(2)).clamp_min(0).sqrt().clamp_min(POSITION_MIN_STD * global_std)
    return torch.stack([mean, std]).float()


def min_dense_size(patch_size: int) -> int:
    """Smallest descriptor resolution from which a patch and its shifted positive can be cut."""
    return patch_size + 2 * max(1, patch_size // 16)


# ----------------------------------------------------------------------------- configuration
PRESETS: dict[str, dict] = {
    "paper": dict(patch_sizes=(17, 33, 65), n_students=3, width=1.0, teacher_steps=50_000,
                  epochs=100, batch_size=1, lr=1e-4),
    "fast": dict(patch_sizes=(33,), n_students=3, width=0.25, crop_size=64, teacher_steps=3000,
                 epochs=12, batch_size=4, lr=1e-3),
}


@dataclass
class USConfig(HardLossConfig):
    """Parameters left at None take the ``preset``'s value (see the module docstring)."""

    preset: str = "fast"  # "fast" (the CPU default) or "paper": the values the options left empty take
    epochs: int | None = None  # student epochs
    batch_size: int | None = None
    patch_sizes: tuple[int, ...] | None = None  # receptive fields of the scales, e.g. [17, 33, 65] (the paper's)
    n_students: int | None = None  # students per scale, whose disagreement is the variance term
    descriptor_dim: int = 128  # length of the teacher's and students' descriptors
    width: float | None = None  # channel multiplier of the patch networks (1.0: the paper's)
    dense_size: int | None = None  # descriptor resolution; preset: size ("paper"), max(96, size // 2) ("fast")
    crop_size: int | None = None  # student training crops at the descriptor resolution; preset: dense_size
    lr: float | None = None  # the students' Adam learning rate
    weight_decay: float = 1e-5  # the students'
    teacher_steps: int | None = None  # per receptive field
    teacher_batch_size: int = 64  # patches per step of the patch teacher's distillation
    teacher_lr: float = 2e-4  # the patch teacher's Adam learning rate
    teacher_weight_decay: float = 1e-5  # the patch teacher's
    # What the patch teacher learns to describe: "patch" (the paper: the backbone run on the patch alone,
    # resized to ``distill_size``) or "image" (the backbone's stride-8 and stride-16 features of the whole
    # image, 3×3-averaged, at the patch's centre: what ``teacher_knn`` reads)
    distill_target: str = "patch"
    distill_size: int | None = None  # "patch": side the patches are resized to; None: p rounded to 32
    kd_weight: float = 1.0  # the patch teacher's loss: matching the backbone's features
    # The patch teacher's loss: decorrelated descriptor channels (with it on, the descriptors collapsed and
    # explained none of the backbone; 0 learns it, module notes)
    compact_weight: float = 1.0
    metric_weight: float = 1.0  # the patch teacher's loss: the triplet term
    standardize_targets: bool = False  # the patch teacher matches its targets z-scored per dimension
    triplet_margin: float = 1.0  # margin of that triplet term
    standardize: str = "position"  # "global" (the paper) or "position": how error and variance are z-scored
    map_normalization: str = "none"  # the z-scores above already are per position
    # The students' loss averages the worst-matched share of each scale's positions; 1, the paper's plain mean,
    # stays the default: the hard loss that lifted the other students left US unchanged (module notes).
    hard_fraction: float = 1.0
    legacy_defaults: ClassVar[dict] = {**HardLossConfig.legacy_defaults, "hard_fraction": 1.0,
                                       "distill_target": "patch"}

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        preset = PRESETS[self.preset]
        for name, value in preset.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.dense_size is None and isinstance(self.size, int):
            self.dense_size = self.size if self.preset == "paper" else min(self.size, max(96, self.size // 2))
        if self.crop_size is None:
            self.crop_size = self.dense_size
        if isinstance(self.patch_sizes, (list, tuple)):
            self.patch_sizes = tuple(self.patch_sizes)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if not self.patch_sizes or len(set(self.patch_sizes)) != len(self.patch_sizes) or \
                not set(self.patch_sizes) <= set(ARCHITECTURES):
            raise ValueError(f"patch_sizes must be distinct values from {sorted(ARCHITECTURES)}, "
                             f"got {self.patch_sizes!r}")
        _check_int(self, "n_students", 2, why=" (the predictive variance needs an ensemble)")
        _check_int(self, "descriptor_dim", 1)
        _check_int(self, "teacher_steps", 1)
        _check_int(self, "teacher_batch_size", 2, why=" (correlations and negatives need a batch)")
        if self.distill_size is not None:
            _check_int(self, "distill_size", 32, why=" (the backbone's stride-32 level must exist)")
        _check_int(self, "crop_size", 1)
        needed = max(64, *(min_dense_size(p) for p in self.patch_sizes))
        if not isinstance(self.dense_size, int) or not needed <= self.dense_size <= self.size:
            raise ValueError(f"dense_size must be an integer between {needed} (for patch sizes "
                             f"{self.patch_sizes}) and size={self.size}, got {self.dense_size!r}")
        if self.distill_target not in DISTILL_TARGETS:
            raise ValueError(f"distill_target must be one of {sorted(DISTILL_TARGETS)}, got {self.distill_target!r}")
        if self.standardize not in STANDARDIZE_MODES:
            raise ValueError(f"standardize must be one of {STANDARDIZE_MODES}, got {self.standardize!r}")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width!r}")
        for name in ("lr", "teacher_lr", "kd_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("weight_decay", "teacher_weight_decay", "compact_weight", "metric_weight", "triplet_margin"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")


def _check_int(config, name: str, minimum: int, why: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}{why}, got {value!r}")


# ----------------------------------------------------------------------------- method
@register_method
class UninformedStudents(AnomalyMethod):
    name = "us"
    summary = "Uninformed Students (CVPR 2020): student ensemble regresses a distilled patch-descriptor teacher"
    Config = USConfig
    cpu_bf16_inference = False

    def __init__(self, **params):
        super().__init__(**params)
        self._should_stop = None
        self._teacher_info: dict = {}

    def teacher_strides(self) -> tuple[int, ...]:
        return DISTILL_TARGETS[self.config.distill_target]

    def build_network(self, backbone: Backbone) -> nn.Module:
        c = self.config
        return USNetwork(backbone, c.size, c.dense_size, c.patch_sizes, c.n_students, c.descriptor_dim,
                         c.width, c.crop_size, c.hard_fraction)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        students = [p for scale in self.net.scales for p in scale.students.parameters()]
        return [torch.optim.Adam(students, lr=self.config.lr, weight_decay=self.config.weight_decay)]

    def fit(self, dataset, progress=None, should_stop=None) -> "UninformedStudents":
        # The teacher phase runs inside ``setup_training``, which the base calls without the callbacks.
        self._should_stop = should_stop
        try:
            super().fit(dataset, progress, should_stop)
        finally:
            self._should_stop = None
        self.training_info["teacher"] = self._teacher_info
        return self

    def _dense_images(self, train_images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net.to_dense_resolution(self._normalize(chunk)) for chunk in train_images.split(32)])

    def setup_training(self, train_images: torch.Tensor) -> None:
        """Distil each receptive field's teacher, then fit the descriptor standardisation on the training set."""
        images = self._dense_images(train_images)
        start = time.perf_counter()
        embeddings = self._image_embeddings(train_images) if self.config.distill_target == "image" else None
        info = {}
        for scale in self.net.scales:
            info[f"p{scale.teacher.patch_size}"] = self._distil_teacher(scale, images, embeddings)
            scale.freeze_teacher()
        self._fit_descriptor_stats(images)
        self._teacher_info = {"seconds": round(time.perf_counter() - start, 3), **info}

    @torch.no_grad()
    def _image_embeddings(self, train_images: torch.Tensor) -> torch.Tensor:
        """The backbone's local-context embedding of every training image, kept in float16 (N×C×h×w)."""
        with self._autocast():
            return torch.cat([local_context_embedding(self.net.backbone(self._normalize(chunk))).half()
                              for chunk in train_images.split(32)])

    def _distil_teacher(self, scale: ScaleEnsemble, images: torch.Tensor, embeddings: torch.Tensor | None) -> dict:
        c = self.config
        trainable = list(scale.teacher.parameters()) + list(scale.decoder.parameters())
        optimizer = torch.optim.Adam(trainable, lr=c.teacher_lr, weight_decay=c.teacher_weight_decay)
        weights = (c.kd_weight, c.compact_weight, c.metric_weight)
        report_every = max(1, c.teacher_steps // 10)
        patch_size = scale.teacher.patch_size
        # About the patch's own resolution: the backbone neither invents detail nor loses it.
        distill_size = c.distill_size or max(32, 32 * round(patch_size / 32))

        def sample(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # A patch turned or flipped has no whole-image features to match, so "image" keeps them upright.
            anchors, positives, centres = sample_patch_pairs(images, patch_size, count, rotate=embeddings is None)
            if embeddings is None:
                return anchors, positives, backbone_descriptor(self.net.backbone, anchors, distill_size)
            return anchors, positives, image_descriptor(embeddings, centres, images.shape[-2:])

        # With ``standardize_targets``, per-dimension statistics keep a few large backbone channels from
        # dominating the loss.
        target_offset, target_std = 0.0, 1.0
        if c.standardize_targets:
            _, _, probe_targets = sample(TARGET_PROBE_PATCHES)
            target_offset, target_std = probe_targets.mean(dim=0), probe_targets.std(dim=0).clamp_min(MIN_STD)
        loss, step = float("nan"), 0
        for step in range(1, c.teacher_steps + 1):
            anchors, positives, targets = sample(c.teacher_batch_size)
            with self._autocast():
                batch_loss = teacher_loss(scale, anchors, positives, (targets - target_offset) / target_std,
                                          weights, c.triplet_margin)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            loss = float(batch_loss.detach())
            if step % report_every == 0:
                log.info("teacher p=%d: step %d/%d, loss %.4g", scale.teacher.patch_size, step, c.teacher_steps, loss)
            if self._should_stop is not None and self._should_stop():
                break
        # How much of the targets' variance the descriptors explain on fresh patches (near 0: the teacher has
        # learnt nothing of its backbone, as with the collapse the module notes describe).
        # Drawn aside (``fork_rng``) so that measuring leaves the students' random stream as it was.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            probe_anchors, _, probe_targets = sample(TARGET_PROBE_PATCHES)
            residual = scale.decoder(scale.teacher(probe_anchors)).float() * target_std + target_offset - probe_targets
            r2 = 1 - float(residual.pow(2).sum() / (probe_targets - probe_targets.mean(dim=0)).pow(2).sum())
        return {"steps": step, "loss": loss, "r2": round(r2, 4)}

    @torch.no_grad()
    def _fit_descriptor_stats(self, images: torch.Tensor) -> None:
        if len(images) > STATS_IMAGES:
            images = images[torch.linspace(0, len(images) - 1, STATS_IMAGES).round().long()]
        for scale in self.net.scales:
            total = total_sq = 0.0
            count = 0
            for chunk in images.split(8):
                descriptors = scale.teacher.dense(chunk).double()
                total = total + descriptors.sum(dim=(0, 2, 3))
                total_sq = total_sq + descriptors.pow(2).sum(dim=(0, 2, 3))
                count += descriptors.numel() // descriptors.shape[1]
            mean = total / count
            std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(MIN_STD)
            scale.descriptor_mean.copy_(mean.view_as(scale.descriptor_mean))
            scale.descriptor_std.copy_(std.view_as(scale.descriptor_std))

    def finish_training(self, holdout_images: torch.Tensor) -> None:
        """Fit the z-scores of the regression error and the predictive variance on the normal hold-out."""
        self.net.eval()
        per_scale = [([], []) for _ in self.net.scales]
        with torch.inference_mode(), self._autocast():
            for chunk in holdout_images.split(8):
                dense = self.net.to_dense_resolution(self._normalize(chunk))
                for (errors, variances), scale in zip(per_scale, self.net.scales):
                    error, variance = scale.error_and_variance(dense)
                    errors.append(error[:, 0].double().cpu())
                    variances.append(variance[:, 0].double().cpu())
        for (errors, variances), scale in zip(per_scale, self.net.scales):
            for values, stats in ((errors, scale.error_stats), (variances, scale.variance_stats)):
                stats.copy_(standardization(torch.cat(values), self.config.standardize))
