"""Which of a dataset's models to use: the evidence, in order of trust, and the cost."""
from __future__ import annotations

from dataclasses import dataclass

from kdcore.store import Model

# (metric key, words) in the order they decide: real labelled test images first, synthetic defects otherwise.
REAL = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AU-PRO"))
SYNTHETIC = (("synthetic_image_auroc", "synthetic-defect image AUROC"),
             ("synthetic_pixel_auroc", "synthetic-defect pixel AUROC"), ("synthetic_aupro", "synthetic-defect AU-PRO"))


@dataclass(frozen=True)
class Recommendation:
    model: Model
    basis: str  # "labelled test images" or "synthetic defects"
    evidence: str  # one line: the deciding numbers of the chosen model and of the runner-up
    runner_up: Model | None


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
            return Recommendation(best, basis, evidence, runner_up)
    return None


def _value(model: Model, key: str) -> float:
    value = (model.metrics or {}).get(key)
    return -1.0 if value is None else float(value)


def _numbers(model: Model, keys) -> str:
    return ", ".join(f"{words} {model.metrics[key]:.3f}" for key, words in keys if model.metrics.get(key) is not None)
