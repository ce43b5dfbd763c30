"""Diagnosis: would another map have served a trained student better? Only the map changes, never the network.

    python -m bench.map_variants bench/results/models/rd.pt [more.pt ...] --data ../shared/data/magnetic_tile

For each saved RD, DSKD, URD or STPM model, three maps from the same teacher and student features, in float32:
- ``cosine``: per-level ``1 - cos`` summed over the model's map levels (``map_strides``), each divided by its
  hold-out std where the model has one (``standardize_levels``): RD's, DSKD's and URD's own map (for STPM the
  sum stands in for its product);
- ``std-L2``: EfficientAD's distance, ``mean_channels ((t - s) / σ_c)²`` with σ_c the teacher's per-channel std
  over (at most 64) training images, which also sees a change of magnitude; summed over the same levels;
- ``cosine + std-L2``: the two added after each is standardised on the normal hold-out.
Each is upsampled (align_corners=True), blurred with σ = 4 and has the hold-out's per-position mean removed, as
the methods do; the one evaluator then gives image AUROC, pixel AUROC, AU-PRO and per defect type, and
``per_defect_localization`` the per-type AUROC of defect pixels against the same images' other pixels (0.5:
the map rises as much outside the defect as inside). ``--pool K`` averages teacher and student features over K×K
neighbourhoods (stride 1) before any distance, comparing local patches rather than single positions.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import kdcore
from kdcore import data, metrics
from kdcore.evaluation import test_masks
from kdcore.methods.base import POSITION_SIGMA, _in_image_frame
from kdcore.methods.rd import students_anomaly_map
from kdcore.ops import GaussianBlur, position_mean

VARIANTS = ("cosine", "std-L2", "cosine + std-L2")
STATISTICS_IMAGES = 64


def teacher_and_students(method, x: torch.Tensor) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The teacher's levels and each student's, for the methods whose networks expose them."""
    net = method.net
    if method.name == "rd":
        teacher, student = net.features(x)
        return teacher, [student]
    if method.name == "dskd":
        teacher, forward_student, reverse_student = net.features(x)
        return teacher, [forward_student, reverse_student]
    if method.name == "rd_expert":
        teacher = net.teacher(x)
        return teacher, [net.student(teacher)]
    if method.name == "stpm":
        return net.teacher(x), [net.student(x)]
    raise SystemExit(f"{method.name}: no teacher/student features to compare (rd, dskd, rd_expert, stpm)")


def feature_batches(method, paths):
    """(teacher levels, students' levels, boxes) per batch of 32 images, float32."""
    for start in range(0, len(paths), 32):
        model_input = method.preprocess_paths(paths[start:start + 32])
        with torch.inference_mode():
            teacher, students = teacher_and_students(method, model_input.images)
        yield ([t.float() for t in teacher], [[s.float() for s in student] for student in students],
               model_input.boxes)


def teacher_channel_std(method, paths) -> list[torch.Tensor]:
    squares, count = None, 0
    for teacher, _, _ in feature_batches(method, paths):
        batch = [t.transpose(0, 1).flatten(1).var(1) for t in teacher]
        squares = batch if squares is None else [a + b for a, b in zip(squares, batch)]
        count += 1
    return [(s / count).sqrt().view(1, -1, 1, 1) + 1e-6 for s in squares]


def level_distance(variant: str, teacher: torch.Tensor, student: torch.Tensor, channel_std: torch.Tensor):
    if variant == "cosine":
        return 1 - F.cosine_similarity(teacher, student, dim=1).unsqueeze(1)
    return ((teacher - student) / channel_std).pow(2).mean(1, keepdim=True)


def pooled(features: list[torch.Tensor], pool: int) -> list[torch.Tensor]:
    """Each level averaged over ``pool``×``pool`` neighbourhoods, same size (borders average what they have)."""
    if pool == 1:
        return features
    return [F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False) for f in features]


def raw_maps(method, paths, channel_std, pool: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Blurred maps per basic variant (students averaged), N×S×S, and the boxes of the pictures."""
    size, blur = method.config.size, GaussianBlur(4.0)
    # The method's own choice of levels for every variant; its level weighting for its own map only.
    level_scale, map_levels = getattr(method.net, "level_scale", None), getattr(method.net, "map_levels", None)
    maps, boxes = {variant: [] for variant in VARIANTS[:2]}, []
    for teacher, students, batch_boxes in feature_batches(method, paths):
        teacher, students = pooled(teacher, pool), [pooled(student, pool) for student in students]
        for variant in maps:
            distances = [[level_distance(variant, t, s, std) for t, s, std in zip(teacher, student, channel_std)]
                         for student in students]
            own = variant == "cosine"
            maps[variant].append(students_anomaly_map(distances, size, blur, level_scale if own else None,
                                                      map_levels)[:, 0])
        boxes.append(batch_boxes)
    return {variant: torch.cat(chunks) for variant, chunks in maps.items()}, torch.cat(boxes)


def evaluate_variants(method, dataset: data.AnomalyDataset, pool: int = 1) -> dict[str, dict]:
    channel_std = teacher_channel_std(method, dataset.train[:STATISTICS_IMAGES])
    holdout, _ = raw_maps(method, dataset.holdout, channel_std, pool)
    test, boxes = raw_maps(method, [sample.path for sample in dataset.test], channel_std, pool)
    standardised = {}
    for variant, maps in test.items():
        offset = position_mean(holdout[variant], POSITION_SIGMA)
        scale = float((holdout[variant] - offset).std())
        standardised[variant] = _in_image_frame((maps - offset) / scale, boxes)
    standardised[VARIANTS[2]] = standardised[VARIANTS[0]] + standardised[VARIANTS[1]]
    labels = np.array([sample.label for sample in dataset.test])
    defects = [sample.defect for sample in dataset.test]
    masks = test_masks(dataset, method.config.size)
    results = {}
    for variant in VARIANTS:
        maps = standardised[variant].numpy()
        results[variant] = metrics.evaluate(labels, maps.max(axis=(1, 2)), masks, maps, defects=defects)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--pool", type=int, default=1, help="average features over K×K neighbourhoods (K odd)")
    args = parser.parse_args(argv)
    if args.pool < 1 or args.pool % 2 == 0:
        parser.error(f"--pool must be an odd number >= 1, got {args.pool}")
    dataset = data.load_dataset(args.data)
    for path in args.models:
        method = kdcore.load(path, device="cpu")
        for variant, result in evaluate_variants(method, dataset, args.pool).items():
            line = f"{method.name:10s} {variant:16s} image {result['image_auroc']:.3f}"
            if result.get("pixel_auroc") is not None:
                line += f"  pixel {result['pixel_auroc']:.3f}  AU-PRO {result['aupro']:.3f}"
                for key in ("per_defect_pixel", "per_defect_localization"):
                    line += f"  {key.replace('_', ' ')} " + " ".join(
                        f"{name} {value:.3f}" for name, value in result[key].items())
            print(line, flush=True)


if __name__ == "__main__":
    main()
