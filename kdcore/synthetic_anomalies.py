"""DRAEM-style synthetic anomalies for training on normal images only (Zavrtanik et al., ICCV 2021).

A defect region is a thresholded Perlin-noise map: 2-D Perlin noise with a random lattice of 2^a × 2^b cells
(a, b uniform in {0..5}), rotated by a random angle in [-90°, 90°], above 0.5. DRAEM and URD fill the region
with a DTD texture image; no texture data set is available offline here, so each region is filled, with equal
odds by default, either

- with *another image of the batch*, geometrically and photometrically disturbed (random rotation, zoom and
  shift with reflected borders; random gain, offset and inversion), so the texture is realistic but foreign, or
- with a *procedural texture*: fractal Perlin noise (three octaves) mapped between two random colours.

Blending follows DRAEM and URD: ``x̃ = x·(1 - m) + m·((1 - β)·texture + β·x)`` with β ~ U(0, 0.8) per image.
Unlike DRAEM (which leaves half the images clean) every synthetic image gets a non-empty defect, as URD does
with ``aug_prob = 1``; maps that came out empty are redrawn.

With ``relight_prob`` > 0, that share of the images instead gets the region *relit* (``relight``): brighter or
darker by a random gain, slightly blurred, with soft edges, as uneven lighting, grinding or a stain. A texture
fill changes what the surface is; relighting changes only how bright it is, a change a student trained on
texture fills alone was never taught to undo. The change reaches past the mask by the edge blur's radius.

Everything works on batches of float images in [0, 1] on the batch's device. All random numbers come from
the caller's CPU ``torch.Generator``, so a seed gives the same anomalies on every device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdcore.ops import GaussianBlur

MAX_MASK_REDRAWS = 100
# A relit region's edge is feathered by a Gaussian of this sigma (pixels), so its change reaches a little past
# its mask, as far as that blur's radius.
RELIGHT_EDGE_SIGMA = 2.0


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(size: int, res: torch.Tensor, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gradient noise N×S×S in about [-1, 1]; ``res`` (N×2 integers) is each map's lattice (rows, columns)."""
    n = res.shape[0]
    cells = int(res.max()) + 1
    angles = 2 * math.pi * torch.rand(n, cells, cells, generator=generator)
    gradients = torch.stack((angles.cos(), angles.sin()), dim=1).to(device)  # N×2×L×L
    steps = torch.arange(size, dtype=torch.float32, device=device) / size
    pos_y = steps[None, :] * res[:, 0:1].to(device)  # N×S, lattice coordinates of each row
    pos_x = steps[None, :] * res[:, 1:2].to(device)
    cell_y, cell_x = pos_y.long(), pos_x.long()
    fy, fx = (pos_y - cell_y)[:, :, None], (pos_x - cell_x)[:, None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        # Rows first, then columns: two gathers along one axis each are several times faster than one
        # gather with broadcast row and column indices.
        rows = torch.gather(gradients, 2, (cell_y + dy)[:, None, :, None].expand(n, 2, size, cells))  # N×2×S×L
        g = torch.gather(rows, 3, (cell_x + dx)[:, None, None, :].expand(n, 2, size, size))  # N×2×S×S
        return g[:, 0] * (fy - dy) + g[:, 1] * (fx - dx)

    ty, tx = _fade(fy), _fade(fx)
    top = torch.lerp(corner(0, 0), corner(1, 0), ty)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), ty)
    return math.sqrt(2) * torch.lerp(top, bottom, tx)


def _random_lattices(n: int, max_exponent: int, generator: torch.Generator) -> torch.Tensor:
    return 2 ** torch.randint(0, max_exponent + 1, (n, 2), generator=generator)


def _affine(images: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor, shifts: torch.Tensor,
            padding_mode: str) -> torch.Tensor:
    """Sample ``images`` through a rotation by ``angles`` (radians) scaled by ``scales`` and shifted by ``shifts``."""
    cos, sin = angles.cos() * scales, angles.sin() * scales
    theta = torch.stack((torch.stack((cos, -sin, shifts[:, 0]), 1), torch.stack((sin, cos, shifts[:, 1]), 1)), 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def perlin_masks(n: int, size: int, generator: torch.Generator, device: torch.device | str = "cpu",
                 threshold: float = 0.5) -> torch.Tensor:
    """N×1×S×S binary float masks, each non-empty: rotated Perlin noise (lattice 1..32 cells a side) > threshold."""
    device = torch.device(device)
    masks = torch.empty(n, 1, size, size, device=device)
    todo = torch.arange(n)
    for _ in range(MAX_MASK_REDRAWS):
        k = len(todo)
        noise = perlin_noise(size, _random_lattices(k, 5, generator), generator, device)[:, None]
        angles = _uniform(k, -math.pi / 2, math.pi / 2, generator, device)
        noise = _affine(noise, angles, torch.ones(k, device=device), torch.zeros(k, 2, device=device), "zeros")
        drawn = (noise > threshold).float()
        masks[todo.to(device)] = drawn
        todo = todo[(drawn.flatten(1).amax(1) == 0).cpu()]
        if len(todo) == 0:
            return masks
    raise RuntimeError(f"no non-empty Perlin mask in {MAX_MASK_REDRAWS} draws; threshold {threshold} is too high")


def procedural_textures(n: int, size: int, generator: torch.Generator,
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """N×3×S×S textures in [0, 1]: three octaves of Perlin noise, stretched between two random colours."""
    device = torch.device(device)
    base = _random_lattices(n, 3, generator)
    noise = sum(0.5 ** octave * perlin_noise(size, base * 2 ** octave, generator, device) for octave in range(3))
    low, high = noise.amin(dim=(1, 2), keepdim=True), noise.amax(dim=(1, 2), keepdim=True)
    level = ((noise - low) / (high - low).clamp_min(1e-6))[:, None]
    colours = torch.rand(2, n, 3, 1, 1, generator=generator).to(device)
    return torch.lerp(colours[0], colours[1], level)


def foreign_image_textures(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each image another one of the batch (itself if alone), rotated, zoomed, shifted and re-coloured."""
    n, device = images.shape[0], images.device
    offset = int(torch.randint(1, n, (1,), generator=generator)) if n > 1 else 0
    sources = images.roll(offset, dims=0)
    angles = _uniform(n, 0, 2 * math.pi, generator, device)
    scales = _uniform(n, 0.5, 1.0, generator, device)  # below 1 zooms in, magnifying the texture
    shifts = _uniform(2 * n, -0.5, 0.5, generator, device).view(n, 2)
    textures = _affine(sources, angles, scales, shifts, "reflection")
    # Same-product texture can look normal; a strong photometric change makes it a defect.
    gains = _uniform(n, 0.5, 2.0, generator, device).view(n, 1, 1, 1)
    offsets = _uniform(n, -0.3, 0.3, generator, device).view(n, 1, 1, 1)
    textures = ((textures - 0.5) * gains + 0.5 + offsets).clamp(0, 1)
    invert = (torch.rand(n, generator=generator) < 0.5).to(device).view(n, 1, 1, 1)
    return torch.where(invert, 1 - textures, textures)


def relight(images: torch.Tensor, masks: torch.Tensor, gains: torch.Tensor,
            edge_sigma: float = RELIGHT_EDGE_SIGMA, blur_sigma: float = 1.5) -> torch.Tensor:
    """N×3×S×S images in [0, 1] multiplied by ``gains`` (N) and blurred by ``blur_sigma`` inside the N×1×S×S
    ``masks``, whose edges are softened by ``edge_sigma`` (pixels)."""
    soft = GaussianBlur(edge_sigma)(masks)
    changed = (images * gains.view(-1, 1, 1, 1)).clamp(0, 1)
    changed = GaussianBlur(blur_sigma)(changed.flatten(0, 1)[:, None]).view_as(images)
    return images * (1 - soft) + changed * soft


def relight_gains(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per image a gain in [0.55, 0.8] (darker) or [1.25, 1.8] (brighter), with equal odds."""
    darker = torch.rand(n, generator=generator).to(device) < 0.5
    return torch.where(darker, _uniform(n, 0.55, 0.8, generator, device), _uniform(n, 1.25, 1.8, generator, device))


def synthesize_anomalies(images: torch.Tensor, generator: torch.Generator, image_texture_prob: float = 0.5,
                         max_beta: float = 0.8, relight_prob: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Defective copies of N×3×S×S images in [0, 1] and their N×1×S×S binary masks (see the module notes)."""
    n, size, device = images.shape[0], images.shape[-1], images.device
    images = images.float()
    masks = perlin_masks(n, size, generator, device)
    use_image = (torch.rand(n, generator=generator) < image_texture_prob).to(device).view(n, 1, 1, 1)
    textures = torch.where(use_image, foreign_image_textures(images, generator),
                           procedural_textures(n, size, generator, device))
    beta = _uniform(n, 0.0, max_beta, generator, device).view(n, 1, 1, 1)
    fill = (1 - beta) * textures + beta * images
    defective = images * (1 - masks) + fill * masks
    if relight_prob > 0:  # no extra random draws otherwise: seeds keep giving the same textures as before
        relit = (torch.rand(n, generator=generator) < relight_prob).nonzero().flatten().to(device)
        gains = relight_gains(n, generator, device)
        if len(relit):  # only those rows: their blurs cost twice the rest of the synthesis
            defective[relit] = relight(images[relit], masks[relit], gains[relit])
    return defective, masks


def synthesize_normalised(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator,
                          **options) -> tuple[torch.Tensor, torch.Tensor]:
    """``synthesize_anomalies`` on a batch normalised by ``mean`` and ``std``: the defective copies, normalised
    the same way and in the batch's dtype and memory format, and their masks."""
    images = (x.float() * std + mean).clamp(0, 1)
    defective, masks = synthesize_anomalies(images, generator, **options)
    defective = ((defective - mean) / std).to(x.dtype)
    return defective.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else defective, masks
