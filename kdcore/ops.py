"""Tensor operations shared by the methods: feature discrepancies, level fusion and map smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cosine_distance_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``1 - cos`` between two N×C×H×W feature maps, as N×1×H×W, computed in float32."""
    return 1.0 - F.cosine_similarity(a.float(), b.float(), dim=1).unsqueeze(1)


def flattened_cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``1 - cos`` between each sample's whole flattened feature maps (RD4AD code)."""
    return (1.0 - F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)).mean()


def normalized_sq_distance_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-pixel ``||a/|a| - b/|b|||^2`` over channels (STPM), as N×1×H×W in float32."""
    diff = F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)
    return diff.pow(2).sum(dim=1, keepdim=True)


def hardest_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the largest ``fraction`` of ``values`` (at least one); all of them at 1.0. As a loss it spends the
    steps where the student is still wrong instead of where it already matches (EfficientAD's hard loss)."""
    if fraction >= 1.0:
        return values.mean()
    flat = values.flatten()
    return flat.topk(max(1, round(fraction * flat.numel())), sorted=False).values.mean()


def standardized_sq_distance_map(a: torch.Tensor, b: torch.Tensor, channel_std: torch.Tensor) -> torch.Tensor:
    """Per-pixel mean over channels of ``((a - b) / channel_std)^2`` (EfficientAD's distance), N×1×H×W float32:
    it sees differences of magnitude that a cosine ignores."""
    diff = (a.float() - b.float()) / channel_std.float().view(1, -1, 1, 1)
    return diff.pow(2).mean(dim=1, keepdim=True)


def upsample(level_map: torch.Tensor, size: int, align_corners: bool = False) -> torch.Tensor:
    return F.interpolate(level_map, size=(size, size), mode="bilinear", align_corners=align_corners)


def fuse_levels(level_maps: list[torch.Tensor], size: int, mode: str, align_corners: bool = False) -> torch.Tensor:
    """Upsample N×1×h×w level maps to ``size`` and combine them by ``"sum"`` or ``"product"`` → N×1×size×size."""
    fused = upsample(level_maps[0], size, align_corners)
    for level_map in level_maps[1:]:
        up = upsample(level_map, size, align_corners)
        fused = fused + up if mode == "sum" else fused * up
    return fused


def crop_resize_weights(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """N×size×size matrices ``W`` such that ``W @ v`` resizes ``v[start:start + length]`` to ``size`` rows as
    bilinear interpolation with align_corners=False does (``F.interpolate``'s source index and weights).

    Crop-and-resize as a matrix product needs no data-dependent slicing, so the same code runs in torch and in
    an exported ONNX graph, whatever the box of each image in the batch.
    """
    length = length.to(torch.float32)[:, None]
    scale = length / size
    source = (scale * (torch.arange(size, dtype=torch.float32, device=length.device) + 0.5) - 0.5).clamp_min(0)
    lower = source.floor()
    weight_upper = source - lower
    upper = torch.minimum(lower + 1, length - 1)
    start = start.to(torch.float32)[:, None, None]
    columns = torch.arange(size, dtype=torch.float32, device=length.device)[None, None, :]
    return ((1 - weight_upper)[..., None] * (columns == start + lower[..., None]).float()
            + weight_upper[..., None] * (columns == start + upper[..., None]).float())


def to_image_frame(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """N×S×S maps of letterboxed inputs → the maps of each picture alone, stretched back to S×S (bilinear).

    ``boxes`` is N×4 (top, left, height, width); a full box gives the map back unchanged.
    """
    size = maps.shape[-1]
    rows = crop_resize_weights(boxes[:, 0], boxes[:, 2], size)
    columns = crop_resize_weights(boxes[:, 1], boxes[:, 3], size)
    return rows @ maps.float() @ columns.transpose(1, 2)


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian with anomalib's size ``2 * int(4 * sigma + 0.5) + 1``."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def position_mean(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-pixel mean H×W of N×H×W maps, Gaussian-smoothed (σ in pixels) so a small sample gives a stable estimate."""
    return GaussianBlur(sigma)(maps.float().mean(dim=0)[None, None])[0, 0]


class GaussianBlur(nn.Module):
    """Gaussian smoothing of N×1×H×W maps as two fixed 1-D convolutions.

    A plain convolution with a constant kernel (not a data-dependent one) keeps the model exportable to ONNX,
    where anomalib's kornia blur failed. Borders replicate the edge value, which is defined for any map size.
    """

    def __init__(self, sigma: float = 4.0):
        super().__init__()
        kernel = gaussian_kernel1d(sigma)
        self.radius = kernel.numel() // 2
        self.register_buffer("kernel_h", kernel.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("kernel_v", kernel.view(1, 1, -1, 1), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        # Always float32: under bfloat16 autocast the map would keep 3 significant digits, too coarse for
        # image scores and thresholds.
        r = self.radius
        with torch.autocast(maps.device.type, enabled=False):
            maps = F.conv2d(F.pad(maps.float(), (r, r, 0, 0), mode="replicate"), self.kernel_h)
            return F.conv2d(F.pad(maps, (0, 0, r, r), mode="replicate"), self.kernel_v)
