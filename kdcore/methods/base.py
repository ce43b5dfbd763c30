"""The interface every method implements, and the training loop, prediction and persistence they share.

A method is a small estimator: ``create_method(name, **params)`` validates its parameters at once,
``fit(dataset)`` trains it on normal images, ``predict(x)`` returns raw anomaly maps and image scores, and
``save``/``kdcore.load`` round-trip it bit for bit. A subclass supplies the network (teacher, students and the
map they produce) and, when it needs more than one optimiser, its own ``training_step``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np
import torch
from PIL import Image
from torch import nn

from kdcore import calibration, data
from kdcore.batchnorm_folding import fold_batchnorm
from kdcore.backbones import DEFAULT_BACKBONE, Backbone, WeightsInfo
from kdcore.ops import position_mean, to_image_frame

FORMAT_VERSION = 1
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32")
MAP_NORMALIZATIONS = ("none", "position", "zscore")
# Smoothing of the per-position hold-out statistics, in map pixels; as US's per-position statistics.
POSITION_SIGMA = 4.0
# "zscore": a position's std is floored at this fraction of the median position's, so that a place where the
# hold-out happens to be nearly constant cannot turn noise into a high score.
POSITION_STD_FLOOR = 0.1
# Percentile of the normal hold-out scores used as the threshold until QA saves one.
DEFAULT_THRESHOLD_PERCENTILE = 99.0


@dataclass
class MethodConfig:
    """Parameters shared by all methods; each method extends this with its own fields and defaults."""

    size: int = 256
    epochs: int | None = None  # None: the method's ``default_epochs`` for the device it trains on
    batch_size: int = 8
    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"
    device: str = "auto"
    seed: int = 0
    # "auto": bfloat16 autocast where the hardware has native bf16 (CUDA, or CPUs with AVX-512 BF16/AMX), for
    # training and, unless the method opts out (``cpu_bf16_inference``), for prediction; "fp32" never.
    precision: str = "auto"
    # How images become the square input (``data.RESIZE_MODES``). Maps always come back in the image frame
    # (the picture stretched to the square), where masks and displays live. Models saved before this field
    # existed were trained on stretched images and load as "stretch".
    resize: str = "letterbox"
    # "position": after training, the map's per-position mean on the normal hold-out (smoothed) is subtracted
    # and the map divided by the hold-out maps' global std, so that places where normal images always respond
    # (fixture edges, borders) do not decide the image score. "zscore": divided by the per-position std (smoothed)
    # instead, so that places where normal images *vary* (a crop's border) count less as well. "none": the
    # method's raw map.
    map_normalization: str = "position"
    # Values of parameters added after models were saved, which reproduce those models: a saved config that
    # lacks a key gets it from here, not from today's default.
    legacy_defaults: ClassVar[dict] = {"resize": "stretch", "map_normalization": "none"}

    def __post_init__(self) -> None:
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Each parameter has its default's kind (e.g. ``--set lr=abc`` is refused here, in words); an int is
        taken where a float is expected."""
        for field in dataclasses.fields(self):
            default, value = field.default, getattr(self, field.name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{field.name} must be true or false, got {value!r}")
            elif isinstance(default, (int, float)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"{field.name} must be a number, got {value!r}")
                if isinstance(default, float):
                    setattr(self, field.name, float(value))
            elif isinstance(default, str) and not isinstance(value, str):
                raise ValueError(f"{field.name} must be text, got {value!r}")

    def validate(self) -> None:
        if not isinstance(self.size, int) or self.size < 64 or self.size % 32:
            raise ValueError(f"size must be a multiple of 32 and at least 64, got {self.size!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.map_normalization not in MAP_NORMALIZATIONS:
            raise ValueError(f"map_normalization must be one of {MAP_NORMALIZATIONS}, got {self.map_normalization!r}")
        if self.resize not in data.RESIZE_MODES:
            raise ValueError(f"resize must be one of {data.RESIZE_MODES}, got {self.resize!r}")
        if not isinstance(self.weights, str) or not self.weights:
            raise ValueError("weights must be 'default', 'imagenet', 'none' or a path to a weights file")


@dataclass
class HardLossConfig(MethodConfig):
    """For methods whose loss is a mean of per-position discrepancies (``kdcore.ops.hardest_mean``)."""

    # Share of each level's positions, hardest first, that the loss averages; 1 is the plain mean (the papers').
    hard_fraction: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be in (0, 1], got {self.hard_fraction!r}")


TEACHER_STRIDES = (4, 8, 16)  # the levels the feature-matching students distil (``teacher_strides``)


def checked_map_strides(map_strides, choices: tuple[int, ...] = TEACHER_STRIDES) -> tuple[int, ...]:
    """``map_strides`` as a sorted tuple, or a clear error where it names no level or one not in ``choices``."""
    strides = (map_strides,) if isinstance(map_strides, int) else tuple(map_strides)
    if not strides or not set(strides) <= set(choices):
        raise ValueError(f"map_strides must be one or more of the teacher's strides {choices}, "
                         f"got {map_strides!r}")
    return tuple(sorted(set(strides)))


# The levels a student may learn: the three above and the teacher's stride-32 level, which STPM and RD add where
# their map reads it (their notes).
DISTILLABLE_STRIDES = (*TEACHER_STRIDES, 32)
# From this input size up STPM's and RD's default maps read the stride-32 level: stride 32 is then a grid of 8+
# cells (at 64 px it would be 2×2).
COARSE_MAP_MIN_SIZE = 256


def coarse_map_strides(size: int, below: tuple[int, ...]) -> tuple[int, ...]:
    """A default ``map_strides`` for square inputs of side ``size``: (8, 16, 32) from ``COARSE_MAP_MIN_SIZE`` up,
    else ``below``."""
    return (8, 16, 32) if size >= COARSE_MAP_MIN_SIZE else below


def distilled_strides(map_strides: tuple[int, ...]) -> tuple[int, ...]:
    """The levels a student learns: the papers' three, and any coarser level the map reads."""
    return tuple(sorted(set(TEACHER_STRIDES) | set(map_strides)))


def map_level_indices(map_strides: tuple[int, ...], strides: tuple[int, ...] = TEACHER_STRIDES) -> tuple[int, ...]:
    """Indices of ``map_strides`` among the distilled levels ``strides``."""
    return tuple(strides.index(stride) for stride in map_strides)


@dataclass
class MapStridesConfig(MethodConfig):
    """For students whose map combines their per-level discrepancies at ``TEACHER_STRIDES``."""

    # The teacher strides whose levels make the map (the method's notes); the papers' maps use all three. Every
    # level is still trained.
    map_strides: tuple[int, ...] = (8, 16)
    # The strides ``map_strides`` may name: those the student distils.
    map_stride_choices: ClassVar[tuple[int, ...]] = TEACHER_STRIDES

    def validate(self) -> None:
        super().validate()
        self.map_strides = checked_map_strides(self.map_strides, self.map_stride_choices)


@dataclass(frozen=True)
class TrainProgress:
    """What ``fit`` reports after every optimisation step (and once more after each hold-out check)."""

    step: int
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    loss: float
    elapsed_seconds: float
    eta_seconds: float
    holdout_score: float | None = None  # mean normal hold-out score, set on the report that ends an epoch


@dataclass
class ModelInput:
    """Normalised images N×3×S×S as a model sees them, with each picture's box (top, left, height, width) in
    its square; ``boxes`` None means every picture fills it. ``predict`` takes this or a bare tensor."""

    images: torch.Tensor
    boxes: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: slice) -> "ModelInput":
        return ModelInput(self.images[index], None if self.boxes is None else self.boxes[index])


ProgressCallback = Callable[[TrainProgress], None]
StopCallback = Callable[[], bool]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available")
    return torch.device(name)


def _library_versions() -> dict[str, str]:
    import timm
    from kdcore import __version__
    return {"kdcore": __version__, "torch": str(torch.__version__), "timm": str(timm.__version__),
            "numpy": str(np.__version__), "python": platform.python_version()}


class AnomalyMethod:
    """Base class of all methods. Subclasses set ``name``, ``Config`` and implement ``build_network``.

    The network a subclass builds must provide ``loss(x) -> scalar`` (unless the subclass overrides
    ``training_step``) and ``anomaly_map(x) -> N×1×S×S``, the raw map at input resolution.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""  # one line shown to users next to the registry name
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # Keep the epoch whose normal hold-out has the lowest mean score; a method whose teacher also trains
    # (so that low scores can mean collapse) turns this off and keeps the last epoch.
    select_on_holdout: ClassVar[bool] = True
    # A reference method with nothing to optimise (``teacher_knn``) turns this off: ``fit`` then only runs
    # ``setup_training`` and the hold-out calibration.
    trains: ClassVar[bool] = True
    # A method built from other trained models (``ensemble``) rather than from parameters alone: not offered
    # where a method is trained from scratch (``registry.list_trainable_methods``).
    combines_models: ClassVar[bool] = False
    # Predict under bfloat16 on CPUs with native bf16. Checked with the evaluator on magnetic_tile: the four
    # metrics of STPM, RD, DSKD and URD moved by at most 0.004 while evaluation ran 1.4-1.8x faster. A method
    # whose map subtracts near-equal values (US's predictive variance) turns it off.
    cpu_bf16_inference: ClassVar[bool] = True
    # Epochs when ``epochs`` is None, per device type: on a CPU what fits about a quarter of an hour on two
    # cores at 256² for a few hundred images; on a GPU the longer budget of the paper's recipe.
    default_epochs: ClassVar[dict[str, int]] = {"cpu": 10, "cuda": 100}
    # ... but never fewer optimiser steps than this when the epochs are the default: a small dataset (of a
    # bottle-sized 200 images 180 train, 11 steps of 16 an epoch) then gets more epochs of its few images, in about
    # the time a large set's default takes, instead of a tenth of the training.
    min_default_steps: ClassVar[int] = 250

    def __init__(self, **params):
        self.config = self.make_config(params)
        self.device = resolve_device(self.config.device)
        self._epochs_by_default = self.config.epochs is None
        if self._epochs_by_default:
            self.config.epochs = self.default_epochs.get(self.device.type, self.default_epochs["cpu"])
        self.net: nn.Module | None = None
        self.teacher_weights: WeightsInfo | None = None
        self.calibration: dict | None = None
        self.threshold: dict | None = None
        self.training_info: dict = {}
        self.map_offset: torch.Tensor | None = None  # S×S, with ``map_normalization`` "position" or "zscore"
        self._fitting = False
        self._folded_net: nn.Module | None = None  # see ``_prediction_net``
        self.map_scale: float | torch.Tensor = 1.0  # S×S with "zscore"
        self._mean = self._std = None

    @classmethod
    def make_config(cls, params: dict) -> MethodConfig:
        """The validated config; unknown names and bad values raise ValueError."""
        valid = {f.name for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(params) - valid)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown} for method '{cls.name}'; valid: {sorted(valid)}")
        return cls.Config(**params)

    # ----------------------------------------------------------------- subclass hooks
    def build_network(self, backbone: Backbone) -> nn.Module:
        """The method's network around the (frozen, pretrained) ``backbone``."""
        raise NotImplementedError

    def teacher_strides(self) -> tuple[int, ...]:
        return TEACHER_STRIDES

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        raise NotImplementedError

    def configure_schedulers(self, optimizers: list[torch.optim.Optimizer], total_steps: int) -> list:
        """Learning-rate schedulers, stepped after every training step; default none (a constant rate)."""
        return []

    def setup_training(self, train_images: torch.Tensor) -> None:
        """Called once before the first step with the uint8 training images (N×3×S×S); e.g. for statistics."""

    def training_step(self, x: torch.Tensor, optimizers: list[torch.optim.Optimizer],
                      indices: torch.Tensor | None = None) -> float:
        """One update on the normalised batch ``x``; returns the loss. Default: one optimiser, ``net.loss``.
        ``indices``: the batch's positions among the images given to ``setup_training``, for per-image caches
        (None where the batch is not from them, e.g. in the speed benchmark)."""
        (optimizer,) = optimizers
        optimizer.zero_grad(set_to_none=True)
        loss = self.net.loss(x)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def train_second_stage(self, train_images: torch.Tensor, progress: ProgressCallback | None,
                           should_stop: StopCallback | None) -> None:
        """Called after the selected epoch's state is restored, before ``finish_training``, with the uint8
        training images: a part trained on top of the selected network (RD's segmentation head), reporting its
        own steps to ``progress``. Default: none."""

    def finish_training(self, holdout_images: torch.Tensor) -> None:
        """Called after the best state is restored, before calibration; e.g. to fit map normalisation."""

    # ----------------------------------------------------------------- building
    def _build(self, teacher_weights: str) -> None:
        torch.manual_seed(self.config.seed)
        backbone = Backbone(self.config.backbone, self.teacher_strides(), teacher_weights)
        self.teacher_weights = backbone.weights_info
        self._mean = torch.tensor(backbone.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(backbone.std, device=self.device).view(1, 3, 1, 1)
        # Channels-last suits the CPU's convolution kernels (and tensor cores): measured 1.7x faster inference
        # and 5x faster STPM training steps than NCHW on EfficientNet-Lite0's depthwise convolutions.
        self.net = self.build_network(backbone).to(self.device, memory_format=torch.channels_last)
        self._folded_net = None

    @property
    def is_fitted(self) -> bool:
        return self.calibration is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError(f"method '{self.name}' is not fitted: call fit() or kdcore.load() first")

    def _bf16_device(self, training: bool = False) -> str | None:
        """The device type ("cpu", "cuda") under whose bfloat16 autocast the network runs, or None for float32."""
        if self.config.precision == "fp32":
            return None
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "cuda"
        if (training or self.cpu_bf16_inference) and self.device.type == "cpu" and \
                torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "cpu"
        return None

    def _autocast(self, training: bool = False):
        """bfloat16 autocast where it is native; it needs no loss scaling, so CPU and GPU share one path."""
        device = self._bf16_device(training)
        return torch.autocast(device, dtype=torch.bfloat16) if device else contextlib.nullcontext()

    # ----------------------------------------------------------------- input handling
    def _normalize(self, images_u8: torch.Tensor) -> torch.Tensor:
        x = images_u8.to(self.device, non_blocking=True).float().div_(255.0)
        return ((x - self._mean) / self._std).contiguous(memory_format=torch.channels_last)

    def _to_uint8_tensor(self, images: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def preprocess(self, images: Iterable[Image.Image]) -> ModelInput:
        """PIL images (any mode and size) → the model's normalised input, on the model's device."""
        self._require_fitted()
        prepared = [data.prepare_model_input(image, self.config.size, self.config.resize) for image in images]
        arrays = np.stack([array for array, _ in prepared])
        return self._model_input(arrays, np.array([box for _, box in prepared], dtype=np.int64))

    def preprocess_paths(self, paths: Iterable[str | Path]) -> ModelInput:
        return self._model_input(*data.read_model_inputs(list(paths), self.config.size, self.config.resize))

    def _model_input(self, arrays: np.ndarray, boxes: np.ndarray) -> ModelInput:
        return ModelInput(self._normalize(self._to_uint8_tensor(arrays)), torch.from_numpy(boxes))

    # ----------------------------------------------------------------- prediction
    def predict(self, x: ModelInput | torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Anomaly maps N×S×S in the image frame (float32; hold-out normalised per ``map_normalization``) and
        image scores N (max of each map).

        A bare tensor is taken as pictures that fill their squares.
        """
        self._require_fitted()
        return self._predict(x if isinstance(x, ModelInput) else ModelInput(x), batch_size)

    def _predict(self, x: ModelInput, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        maps = _in_image_frame(self._maps(x.images, batch_size), x.boxes)
        return maps.numpy(), maps.amax(dim=(1, 2)).numpy()

    def _maps(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        net = self._prediction_net()
        chunks = []
        with torch.inference_mode(), self._autocast():
            for chunk in x.split(batch_size):
                chunk = chunk.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                chunks.append(net.anomaly_map(chunk).float()[:, 0].cpu())
        maps = torch.cat(chunks)
        if self.map_offset is not None:
            maps = (maps - self.map_offset) / self.map_scale
        return maps

    def _prediction_net(self) -> nn.Module:
        """The network that computes maps, in eval mode: after ``fit``, in float32, a copy with BatchNorm folded
        into the convolutions (``kdcore.batchnorm_folding``), made once; otherwise ``net`` itself.

        Not under bfloat16: autocast rounds the folded bias ``beta - mean·gamma/std`` to bfloat16, and where it
        nearly cancels the convolution's output the error grows. Measured on the trained RD (magnetic_tile):
        folded bfloat16 maps were 0.058 map-std from float32 against 0.039 unfolded, and image AUROC fell by
        0.003-0.005 for STPM, RD, DSKD and URD; in float32 folding changes maps by about 1e-6 relative.
        """
        self.net.eval()
        if self._fitting or self._bf16_device() is not None:
            return self.net
        if self._folded_net is None:
            size = self.config.size
            example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(
                self.device).contiguous(memory_format=torch.channels_last)
            self._folded_net, _ = fold_batchnorm(self.net, example, lambda net, x: net.anomaly_map(x))
        return self._folded_net

    def _holdout_scores(self, holdout: ModelInput) -> np.ndarray:
        """Image scores of the normal hold-out (kept as uint8 images to bound memory)."""
        scores = []
        for start in range(0, len(holdout), 32):
            chunk = holdout[start:start + 32]
            scores.append(self._predict(ModelInput(self._normalize(chunk.images), chunk.boxes), 32)[1])
        return np.concatenate(scores)

    # ----------------------------------------------------------------- training
    def fit(self, dataset: data.AnomalyDataset | str | Path, progress: ProgressCallback | None = None,
            should_stop: StopCallback | None = None) -> "AnomalyMethod":
        """Train on the dataset's normal training images; the hold-out selects the epoch and calibrates.

        ``progress`` is called after every step; ``should_stop()`` returning true ends training cleanly with
        the best state seen so far (the current one is checked on the hold-out first).
        """
        if not isinstance(dataset, data.AnomalyDataset):
            dataset = data.load_dataset(dataset)
        self._build(self.config.weights)
        size = self.config.size
        train_u8 = self._to_uint8_tensor(data.read_model_inputs(dataset.train, size, self.config.resize)[0])
        holdout_images, holdout_boxes = data.read_model_inputs(dataset.holdout, size, self.config.resize)
        holdout = ModelInput(self._to_uint8_tensor(holdout_images), torch.from_numpy(holdout_boxes))
        self.net.train()
        self._fitting, self._folded_net = True, None
        try:
            self.setup_training(train_u8)
            start = time.perf_counter()
            if self.trains:
                step, epoch, best_epoch, stopped = self._train_epochs(train_u8, holdout, progress, should_stop)
                if not stopped:
                    self.train_second_stage(train_u8, progress, should_stop)
            else:
                step, epoch, best_epoch, stopped = 0, 0, 0, False
            self.finish_training(holdout.images)
        finally:
            self._fitting = False
        self._calibrate(self._fit_map_normalization(holdout))
        self.training_info = {
            "seconds": round(time.perf_counter() - start, 3), "steps": step, "epochs_run": epoch,
            "best_epoch": best_epoch, "stopped_early": stopped, "n_train": len(train_u8),
            "n_holdout": len(holdout), "device": self.device.type, "dataset": str(dataset.root),
        }
        return self

    def _train_epochs(self, train_u8: torch.Tensor, holdout: ModelInput, progress: ProgressCallback | None,
                      should_stop: StopCallback | None) -> tuple[int, int, int, bool]:
        """The optimisation loop; leaves the selected epoch's state in ``net``. Returns step, epoch, best, stopped."""
        optimizers = self.configure_optimizers()

        batch_size = min(self.config.batch_size, len(train_u8))
        steps_per_epoch = len(train_u8) // batch_size  # drop the ragged last batch: BatchNorm dislikes tiny ones
        if self._epochs_by_default:
            self.config.epochs = max(self.config.epochs, math.ceil(self.min_default_steps / steps_per_epoch))
        total_steps = steps_per_epoch * self.config.epochs
        schedulers = self.configure_schedulers(optimizers, total_steps)
        generator = torch.Generator().manual_seed(self.config.seed)
        start = time.perf_counter()
        step, loss, stopped = 0, float("nan"), False
        best_score, best_state, best_epoch = math.inf, None, 0

        for epoch in range(1, self.config.epochs + 1):
            self.net.train()
            order = torch.randperm(len(train_u8), generator=generator)
            for batch_index in range(steps_per_epoch):
                indices = order[batch_index * batch_size:(batch_index + 1) * batch_size]
                with self._autocast(training=True):
                    loss = self.training_step(self._normalize(train_u8[indices]), optimizers, indices)
                for scheduler in schedulers:
                    scheduler.step()
                step += 1
                if progress is not None:
                    progress(self._progress(step, total_steps, epoch, loss, start))
                if should_stop is not None and should_stop():
                    stopped = True
                    break
            holdout_scores = self._holdout_scores(holdout)
            holdout_mean = float(holdout_scores.mean())
            if progress is not None:
                progress(self._progress(step, total_steps, epoch, loss, start, holdout_mean))
            if not self.select_on_holdout or holdout_mean < best_score:
                best_score, best_epoch = holdout_mean, epoch
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
            if stopped:
                break

        self.net.load_state_dict(best_state)
        return step, epoch, best_epoch, stopped

    def _progress(self, step, total_steps, epoch, loss, start, holdout_score=None) -> TrainProgress:
        elapsed = time.perf_counter() - start
        eta = elapsed / step * (total_steps - step) if step else math.nan
        return TrainProgress(step, total_steps, epoch, self.config.epochs, loss, elapsed, eta, holdout_score)

    # ----------------------------------------------------------------- calibration
    def map_normalization_rule(self) -> str:
        """The hold-out normalisation the fitted map gets: ``map_normalization``, unless the method's map
        needs another."""
        return self.config.map_normalization

    def _fit_map_normalization(self, holdout: ModelInput) -> np.ndarray:
        """Fit ``map_offset``/``map_scale`` on the hold-out's maps; returns its image scores under them."""
        self.map_offset, self.map_scale = None, 1.0
        maps = torch.cat([self._maps(self._normalize(chunk), 32) for chunk in holdout.images.split(32)])
        rule = self.map_normalization_rule()
        if rule in ("position", "zscore"):
            self.map_offset = position_mean(maps, POSITION_SIGMA)
            if rule == "zscore":
                std = position_mean((maps - self.map_offset).pow(2), POSITION_SIGMA).sqrt()
                self.map_scale = std.clamp_min(max(POSITION_STD_FLOOR * float(std.median()), 1e-12))
            else:
                self.map_scale = max(float((maps - self.map_offset).std()), 1e-12)
            maps = (maps - self.map_offset) / self.map_scale
        return _in_image_frame(maps, holdout.boxes).amax(dim=(1, 2)).numpy()

    def _calibrate(self, holdout_scores: np.ndarray) -> None:
        self.calibration = calibration.summarize_scores(holdout_scores)
        value = calibration.threshold_from_percentile(holdout_scores, DEFAULT_THRESHOLD_PERCENTILE)
        self.set_threshold(value, mode="percentile", parameter=DEFAULT_THRESHOLD_PERCENTILE)

    def set_threshold(self, value: float, mode: str = "score", parameter: float | None = None,
                      by: str | None = None) -> None:
        """Set the image threshold (NG iff score > value); ``mode``/``parameter`` record how it was chosen and
        ``by`` who chose it (the logged-in user of the app), when known."""
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {value!r}")
        self.threshold = {"value": float(value), "mode": mode, "parameter": parameter,
                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if by:
            self.threshold["by"] = by

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write config, all weights, teacher identity, calibration and versions to one file, atomically."""
        self._require_fitted()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": FORMAT_VERSION, "method": self.name, "config": dataclasses.asdict(self.config),
            "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
            "teacher_weights": self.teacher_weights.as_dict(), "calibration": self.calibration,
            "threshold": self.threshold, "training": self.training_info, "versions": _library_versions(),
            "map_normalization": None if self.map_offset is None else
            {"offset": self.map_offset.clone(),
             "scale": self.map_scale.clone() if torch.is_tensor(self.map_scale) else self.map_scale},
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def _from_payload(cls, payload: dict, device: str) -> "AnomalyMethod":
        method = cls(**{**cls.Config.legacy_defaults, **payload["config"], "device": device})
        # The saved state holds the teacher too, so rebuild without fetching weights and load them all.
        method._build(teacher_weights="none")
        try:
            method.net.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:  # e.g. a model saved before a method's network changed
            detail = str(exc).strip().splitlines()[-1].strip()
            raise ValueError(f"the saved '{cls.name}' network does not fit this kdcore version's ({detail}); "
                             "train the model again") from exc
        method.teacher_weights = WeightsInfo(**payload["teacher_weights"])
        method.calibration = payload["calibration"]
        method.threshold = payload["threshold"]
        method.training_info = payload.get("training", {})
        if (normalization := payload.get("map_normalization")) is not None:
            scale = normalization["scale"]  # one number, or one per position ("zscore")
            method.map_offset = normalization["offset"]
            method.map_scale = scale if torch.is_tensor(scale) else float(scale)
        method.net.eval()
        return method


def _in_image_frame(maps: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
    """``to_image_frame``, skipped where every picture fills its square (stretched or square images): the
    prediction path then pays nothing for letterboxing."""
    if boxes is None or bool((boxes[:, 2:] == maps.shape[-1]).all()):
        return maps
    return to_image_frame(maps, boxes)


def load(path: str | Path, device: str = "auto") -> AnomalyMethod:
    """Load a model written by ``save``; the maps match the saved model's bit for bit on the same device."""
    from kdcore.registry import get_method_class

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own text for a foreign pickle suggests weights_only=False, which would run its code: never.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail = type(exc).__name__ if "weights_only" in str(exc) else f"{type(exc).__name__}: {first_line[:160]}"
        raise ValueError(f"{path} is not a kdcore model file, or it is damaged ({detail})") from exc
    if not isinstance(payload, dict) or "method" not in payload or "format_version" not in payload:
        raise ValueError(f"{path} is not a kdcore model file")
    if not isinstance(payload["format_version"], int) or isinstance(payload["format_version"], bool):
        raise ValueError(f"{path} is damaged: its format version is {payload['format_version']!r}")
    if payload["format_version"] > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer kdcore (format {payload['format_version']})")
    return get_method_class(payload["method"])._from_payload(payload, device)
