"""Denoising students: trained also to give the teacher's features of a normal image from a defective copy.

A student trained on normal images only learns a mapping that is smooth in its input, and it generalises:
shown a defect, it reproduces the teacher's response to it, and the defect vanishes from the map. DeSTSeg
(Zhang et al., CVPR 2023) trains its student on synthetic defects with the teacher's features of the *clean*
image as the target, and URD's student (``kdcore.methods.rd_expert``) does the same behind its own teacher.
``denoise=True`` adds that target to a method's own loss: every step, the batch gets a copy with DRAEM-style
synthetic defects (``kdcore.synthetic_anomalies``), and the student's output for the copy is matched, with the
method's own loss, to the teacher's features of the clean batch. The map is unchanged: the teacher sees the
test image as it is, the student answers with what a normal image would give there.

A method opts in by inheriting ``DenoisingConfig`` and ``DenoisingMethod`` and by giving its network a
``loss(x, defective=None, teacher_features=None)`` that adds that term when ``defective`` is given and uses
``teacher_features`` (the frozen teacher's features of ``x``, from ``kdcore.methods.feature_cache``) instead of
computing them when they are given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdcore.methods.base import AnomalyMethod, MethodConfig
from kdcore.methods.feature_cache import FrozenFeatureCache
from kdcore.synthetic_anomalies import synthesize_normalised


@dataclass
class DenoisingConfig(MethodConfig):
    denoise: bool = False  # the student also learns from synthetic-defect copies of each batch
    image_texture_prob: float = 0.5  # share of synthetic defects textured from another image, else procedural
    relight_prob: float = 0.0  # share of synthetic defects that relight their region instead of texturing it

    def validate(self) -> None:
        super().validate()
        for name in ("image_texture_prob", "relight_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")


class DenoisingMethod(AnomalyMethod):
    """One optimiser over ``net.loss(x)``, or ``net.loss(x, defective)`` with ``denoise``."""

    def frozen_network(self) -> nn.Module:
        """The frozen network whose features of the training images are cached (``feature_cache``)."""
        return self.net.teacher

    def setup_training(self, train_images: torch.Tensor) -> None:
        # Its own stream, apart from the base's batch-order generator seeded with the same seed.
        self._anomaly_generator = torch.Generator().manual_seed(self.config.seed + 1)
        self._frozen_features = FrozenFeatureCache.build(
            self.frozen_network(), train_images, self._normalize, self.device, lambda: self._autocast(training=True))

    def frozen_features(self, indices: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The cached frozen features of the training images at ``indices``, None where there is no cache."""
        if indices is None or self._frozen_features is None:
            return None
        return self._frozen_features[indices]

    def frozen_feature_batches(self, train_images: torch.Tensor):
        """The frozen network's features of all training images, batch by batch (from the cache where there is
        one)."""
        if self._frozen_features is not None:
            yield from zip(*(level.split(64) for level in self._frozen_features.levels))
            return
        network = self.frozen_network()
        with torch.no_grad(), self._autocast(training=True):
            for chunk in train_images.split(32):
                yield network(self._normalize(chunk))

    def finish_training(self, holdout_images: torch.Tensor) -> None:
        self._frozen_features = None

    def synthesize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Defective copies of the normalised batch ``x`` and their N×1×S×S masks."""
        return synthesize_normalised(x, self._mean, self._std, self._anomaly_generator,
                                     image_texture_prob=self.config.image_texture_prob,
                                     relight_prob=self.config.relight_prob)

    def training_step(self, x: torch.Tensor, optimizers: list[torch.optim.Optimizer],
                      indices: torch.Tensor | None = None) -> float:
        (optimizer,) = optimizers
        defective = self.synthesize(x)[0] if self.config.denoise else None
        optimizer.zero_grad(set_to_none=True)
        loss = self.net.loss(x, defective, self.frozen_features(indices))
        loss.backward()
        optimizer.step()
        return float(loss.detach())
