"""Evidence without defect samples: a model scored on a fixed, seeded set of synthetic defects.

The defects are made from the dataset's normal hold-out images (never trained on), in four kinds, each with
its mask:

- ``texture``: a Perlin-shaped region filled with a disturbed patch of another image or a procedural texture
  (``kdcore.synthetic_anomalies``, DRAEM/URD's generator);
- ``cutpaste``: a rectangle of the same image copied to another place;
- ``brightness``: a Perlin-shaped region made brighter or darker and blurred, as uneven lighting or a stain;
- ``scratch``: thin straight strokes, darker or brighter than their surroundings.

The same seed gives the same images on every machine. The normal hold-out images are the negatives and their
defective copies the positives, scored by the one evaluator (``kdcore.metrics.evaluate``). Defects are drawn
only inside each picture's content box (not in letterbox margins), and masks follow the maps into the image frame.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcore import data, metrics
from kdcore.methods.base import AnomalyMethod, ModelInput
from kdcore.ops import to_image_frame
from kdcore.synthetic_anomalies import perlin_masks, relight, synthesize_anomalies

KINDS = ("texture", "cutpaste", "brightness", "scratch")
SEED = 1234


def synthetic_defects(images: torch.Tensor, boxes: torch.Tensor, seed: int = SEED
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Defective copies of uint8 N×3×S×S images (one kind each, in turn), their N×S×S boolean masks in the same
    frame, and the kind of each."""
    generator = torch.Generator().manual_seed(seed)
    n, size = images.shape[0], images.shape[-1]
    x = images.float() / 255.0
    inside = torch.zeros(n, size, size, dtype=torch.bool)
    for i, (top, left, height, width) in enumerate(boxes.tolist()):
        inside[i, top:top + height, left:left + width] = True
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    out, masks = x.clone(), torch.zeros(n, size, size, dtype=torch.bool)
    for kind in KINDS:
        index = [i for i, k in enumerate(kinds) if k == kind]
        if not index:
            continue
        made, made_masks = _MAKERS[kind](x[index], generator)
        out[index], masks[index] = made, made_masks & inside[index]
    # Drawing inside the box can leave a mask empty: such an image keeps its defect where the box is.
    for i in range(n):
        while not masks[i].any():
            scratched, scratch_mask = _scratches(x[i:i + 1], generator)
            out[i], masks[i] = scratched[0], scratch_mask[0] & inside[i]
    out = torch.where(masks[:, None], out, x)  # nothing outside a mask changes
    return (out * 255).round().clamp(0, 255).to(torch.uint8), masks, kinds


def _texture(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    made, masks = synthesize_anomalies(x, generator)
    return made, masks[:, 0] > 0.5


def _cutpaste(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, size = x.shape[0], x.shape[-1]
    out, masks = x.clone(), torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(size // 10, size // 4, (2,), generator=generator))
        sy, sx, ty, tx = (int(v) for v in torch.randint(0, size - max(h, w), (4,), generator=generator))
        out[i, :, ty:ty + h, tx:tx + w] = x[i, :, sy:sy + h, sx:sx + w]
        masks[i, ty:ty + h, tx:tx + w] = (x[i, :, sy:sy + h, sx:sx + w] - x[i, :, ty:ty + h, tx:tx + w]).abs().amax(0) > 0.02
    return out, masks


def _brightness(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, size = x.shape[0], x.shape[-1]
    masks = perlin_masks(n, size, generator)
    gains = torch.where(torch.rand(n, generator=generator) < 0.5, 0.6, 1.5)
    return relight(x, masks, gains), masks[:, 0] > 0.5


def _scratches(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, size = x.shape[0], x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            y0, x0, y1, x1 = (float(v) for v in torch.rand(4, generator=generator) * size)
            length = max(np.hypot(y1 - y0, x1 - x0), 1.0)
            # Distance of every pixel to the segment; strokes 1-3 px wide.
            t = (((yy - y0) * (y1 - y0) + (xx - x0) * (x1 - x0)) / length ** 2).clamp(0, 1)
            distance = torch.hypot(yy - (y0 + t * (y1 - y0)), xx - (x0 + t * (x1 - x0)))
            masks[i] |= distance <= float(torch.randint(1, 3, (1,), generator=generator))
    shade = torch.where(torch.rand(n, generator=generator) < 0.5, 0.15, 0.9).view(n, 1, 1, 1)
    return torch.where(masks[:, None], shade.expand_as(x), x), masks


_MAKERS = {"texture": _texture, "cutpaste": _cutpaste, "brightness": _brightness, "scratch": _scratches}


def holdout_defects(dataset: data.AnomalyDataset, size: int, resize: str, seed: int = SEED
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The dataset's hold-out normals as model inputs (uint8 N×3×S×S and their N×4 content boxes) with their
    defective copies, masks and kinds (``synthetic_defects``)."""
    arrays, boxes = data.read_model_inputs(dataset.holdout, size, resize)
    images = torch.from_numpy(np.ascontiguousarray(arrays.transpose(0, 3, 1, 2)))
    return (images, torch.from_numpy(boxes), *synthetic_defects(images, torch.from_numpy(boxes), seed))


def write_synthetic_defects(dataset: data.AnomalyDataset, folder: str | Path, size: int, resize: str,
                            seed: int = SEED) -> list[tuple[Path, Path, str]]:
    """The check's defective images as PNG files in ``folder`` (created), for people to look at: each picture
    cut to its content box (the image as the model saw it, without letterbox margins) as ``<i>-<kind>.png``
    beside ``<i>-<kind>_mask.png``. Returns (image, mask, kind) per image, in the check's order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, boxes, defective, masks, kinds = holdout_defects(dataset, size, resize, seed)
    written = []
    for i, (kind, (top, left, height, width)) in enumerate(zip(kinds, boxes.tolist())):
        image_path, mask_path = folder / f"{i:03d}-{kind}.png", folder / f"{i:03d}-{kind}_mask.png"
        picture = defective[i, :, top:top + height, left:left + width].permute(1, 2, 0).numpy()
        Image.fromarray(np.ascontiguousarray(picture)).save(image_path)
        mask = masks[i, top:top + height, left:left + width].numpy().astype(np.uint8) * 255
        Image.fromarray(mask).save(mask_path)
        written.append((image_path, mask_path, kind))
    return written


def check_inputs(method: AnomalyMethod, dataset: data.AnomalyDataset, seed: int = SEED
                 ) -> tuple[ModelInput, np.ndarray, np.ndarray, list[str]]:
    """The check's model input (the hold-out normals, then their defective copies), image labels, masks in the
    image frame and defect kinds ("good" for the normals)."""
    images, boxes, defective, masks, kinds = holdout_defects(dataset, method.config.size, method.config.resize, seed)
    x = ModelInput(method._normalize(torch.cat([images, defective])), torch.cat([boxes, boxes]))
    frame_masks = to_image_frame(torch.cat([torch.zeros_like(masks), masks]).float(), x.boxes) > 0.5
    labels = np.r_[np.zeros(len(images), int), np.ones(len(images), int)]
    return x, labels, frame_masks.numpy(), ["good"] * len(images) + kinds


def synthetic_check(method: AnomalyMethod, dataset: data.AnomalyDataset, seed: int = SEED) -> dict:
    """``synthetic_image_auroc``, ``synthetic_pixel_auroc`` and ``synthetic_aupro`` of the model on defective
    copies of the dataset's hold-out normals (against those normals), and the image AUROC per kind."""
    x, labels, masks, kinds = check_inputs(method, dataset, seed)
    maps, scores = method.predict(x)
    result = metrics.evaluate(labels, scores, masks, maps, defects=kinds)
    return {"synthetic_image_auroc": result["image_auroc"], "synthetic_pixel_auroc": result["pixel_auroc"],
            "synthetic_aupro": result["aupro"], "synthetic_per_kind": result.get("per_defect", {}),
            "synthetic_n_images": int(len(labels))}
