"""Which of a dataset's models to use: the evidence, in order of trust, and the cost."""
from __future__ import annotations

from dataclasses import dataclass

from kdcore.store import Model

# (metric key, words) in the order they decide: real labelled test images first, synthetic defects otherwise.
REAL = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AU-PRO"))
SYNTHETIC = (("synthetic_image_auroc", "synthetic-defect image AUROC"),
             ("synthetic_pixel_auroc", "synthetic-defect pixel AUROC"), ("synthetic_aupro", "synthetic-defect AU-PRO"))
# Synthetic image AUROCs closer than this do not rank models: on elpv (solar cells) six models scored 0.960-0.986
# on synthetic defects, and the synthetic favourite was fifth of six on the real test set (rho 0.31); on
# magnetic_tile, where the best led by 0.053, the synthetic order was the real one (``bench.synthetic_vs_real``).
SYNTHETIC_TIE = 0.02


@dataclass(frozen=True)
class Recommendation:
    model: Model
    basis: str  # "labelled test images" or "synthetic defects"
    evidence: str  # one line: the deciding numbers of the chosen model and of the runner-up
    runner_up: Model | None
    caution: str | None = None  # why the choice is weak, when it is


def recommend(models: list[Model]) -> Recommendation | None:
    """The model to use among ``models`` (one dataset's): the best on labelled test images when any was
    evaluated on them, else on synthetic defects; None when none was evaluated."""
    for keys, basis in ((REAL, "labelled test images"), (SYNTHETIC, "synthetic defects")):
        scored = [m for m in models if (m.metrics or {}).get(keys[0][0]) is not None]
        if scored:
            ranked = sorted(scored, key=lambda m: tuple(_value(m, key) for key, _ in keys), reverse=True)
            best, runner_up = ranked[0], (ranked[1] if len(ranked) > 1 else None)
            evidence = _numbers(best, keys)
            if runner_up is not None:
                evidence += f"; next: #{runner_up.id} {runner_up.method}, {_numbers(runner_up, keys)}"
            return Recommendation(best, basis, evidence, runner_up, _caution(best, runner_up, keys))
    return None


def _caution(best: Model, runner_up: Model | None, keys) -> str | None:
    if keys != SYNTHETIC or runner_up is None:
        return None
    key, words = keys[0]
    gap = _value(best, key) - _value(runner_up, key)
    if gap >= SYNTHETIC_TIE:
        return None
    return (f"The synthetic check barely separates #{best.id} and #{runner_up.id} ({words} {gap:.3f} apart): "
            "differences this small did not predict the real ranking on our benchmarks. Label a few real "
            "defective images to decide.")


def _value(model: Model, key: str) -> float:
    value = (model.metrics or {}).get(key)
    return -1.0 if value is None else float(value)


def _numbers(model: Model, keys) -> str:
    return ", ".join(f"{words} {model.metrics[key]:.3f}" for key, words in keys if model.metrics.get(key) is not None)
