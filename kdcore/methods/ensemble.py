"""Ensemble: two or more trained models of one dataset as one model whose map combines theirs.

Members can be any methods (a student and the ``teacher_knn`` reference, two students with different
teachers) of the same input size and resize rule. Each member's map is first normalised as the member itself
normalises it, then standardised by that member's statistics on the dataset's normal hold-out (mean and std
over all pixels of its hold-out maps), so members of different scales count equally; the ensemble's map is
the mean of these standardised maps and its score their maximum, calibrated on the same hold-out. Nothing is
trained: ``fit`` reads the member files once, and the saved ensemble holds every member's weights, so it loads,
predicts and exports like any model without them.

Each member sees the image normalised for its own teacher: the ensemble passes pixels scaled to [0, 1] and
applies every member's mean and std inside its network.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from kdcore.backbones import WeightsInfo
from kdcore.methods.base import AnomalyMethod, MethodConfig, load
from kdcore.registry import get_method_class, register_method


class EnsembleNetwork(nn.Module):
    def __init__(self, members: list[nn.Module], size: int):
        super().__init__()
        self.members = nn.ModuleList(members)
        k = len(members)
        self.register_buffer("input_mean", torch.zeros(k, 3))
        self.register_buffer("input_std", torch.ones(k, 3))
        self.register_buffer("map_offset", torch.zeros(k, size, size))  # each member's own map normalisation
        self.register_buffer("map_scale", torch.ones(k, size, size))  # per position with "zscore" members
        self.register_buffer("holdout_mean", torch.zeros(k))  # of the member's normalised hold-out maps
        self.register_buffer("holdout_std", torch.ones(k))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Ensembles saved before members could carry a per-position scale hold one number per member.
        scale = state_dict.get(prefix + "map_scale")
        if scale is not None and scale.dim() == 1:
            state_dict[prefix + "map_scale"] = scale.view(-1, 1, 1).expand_as(self.map_scale).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def member_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each member's map of ``x`` (pixels in [0, 1]) as the member itself gives it, N×S×S float32."""
        maps = []
        for i, member in enumerate(self.members):
            member_input = (x - self.input_mean[i].view(1, 3, 1, 1)) / self.input_std[i].view(1, 3, 1, 1)
            member_map = member.anomaly_map(member_input)[:, 0].float()
            maps.append((member_map - self.map_offset[i]) / self.map_scale[i])
        return maps

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        standardised = [(m - self.holdout_mean[i]) / self.holdout_std[i] for i, m in enumerate(self.member_maps(x))]
        return torch.stack(standardised).mean(dim=0)[:, None]


@dataclass
class EnsembleConfig(MethodConfig):
    """``members``: the model files to combine (read by ``fit``); ``member_specs`` is filled by ``fit`` with each
    member's method and config, which is what a saved ensemble is rebuilt from."""

    members: tuple[str, ...] = ()
    member_specs: tuple[dict, ...] = ()
    map_normalization: str = "none"  # the members' maps are normalised already

    def validate(self) -> None:
        super().validate()
        self.members = tuple(str(member) for member in self.members)
        self.member_specs = tuple(self.member_specs)
        if len(self.members) < 2 and len(self.member_specs) < 2:
            raise ValueError("an ensemble needs two or more trained model files (members)")


@register_method
class Ensemble(AnomalyMethod):
    name = "ensemble"
    summary = "Two or more trained models of one dataset, their hold-out-standardised maps averaged"
    Config = EnsembleConfig
    trains = False
    combines_models = True

    def fit(self, dataset, progress=None, should_stop=None) -> "Ensemble":
        members = [load(path, device=str(self.device)) for path in self.config.members]
        geometry = {(m.config.size, m.config.resize) for m in members}
        if len(geometry) > 1:
            raise ValueError(f"ensemble members must share input size and resize rule, got {sorted(geometry)}")
        self.config.size, self.config.resize = next(iter(geometry))
        self.config.member_specs = tuple({"method": m.name, "config": dataclasses.asdict(m.config),
                                          "teacher_weights": m.teacher_weights.as_dict()} for m in members)
        self._members = members
        return super().fit(dataset, progress, should_stop)

    def _build(self, teacher_weights: str) -> None:
        torch.manual_seed(self.config.seed)
        nets, means, stds = [], [], []
        for spec in self.config.member_specs:
            cls = get_method_class(spec["method"])
            member = cls(**{**cls.Config.legacy_defaults, **spec["config"], "device": "cpu"})
            member._build(teacher_weights="none")  # the architecture: weights come from the members or the file
            nets.append(member.net)
            means.append(member._mean.flatten())
            stds.append(member._std.flatten())
            if not cls.cpu_bf16_inference:
                self.cpu_bf16_inference = False
        self.net = EnsembleNetwork(nets, self.config.size).to(self.device, memory_format=torch.channels_last)
        self.net.input_mean.copy_(torch.stack(means))
        self.net.input_std.copy_(torch.stack(stds))
        self._mean = torch.zeros(1, 3, 1, 1, device=self.device)
        self._std = torch.ones(1, 3, 1, 1, device=self.device)
        identities = "".join(spec["teacher_weights"]["sha256"] for spec in self.config.member_specs)
        self.teacher_weights = WeightsInfo("ensemble of " + ", ".join(s["method"] for s in self.config.member_specs),
                                           hashlib.sha256(identities.encode()).hexdigest())

    def setup_training(self, train_images: torch.Tensor) -> None:
        for i, member in enumerate(self._members):
            self.net.members[i].load_state_dict(member.net.state_dict())
            if member.map_offset is not None:
                self.net.map_offset[i].copy_(member.map_offset)
            self.net.map_scale[i] = member.map_scale
        self._members = []  # their weights live in this network now

    def finish_training(self, holdout_images: torch.Tensor) -> None:
        """Each member's mean and std over all pixels of its normalised hold-out maps."""
        self.net.eval()
        sums = torch.zeros(len(self.net.members), 3, dtype=torch.float64)
        with torch.inference_mode(), self._autocast():
            for chunk in holdout_images.split(16):
                x = self._normalize(chunk)
                for i, member_map in enumerate(self.net.member_maps(x)):
                    values = member_map.double()
                    sums[i] += torch.stack([torch.tensor(float(values.numel())), values.sum().cpu(),
                                            values.pow(2).sum().cpu()])
        mean = sums[:, 1] / sums[:, 0]
        std = (sums[:, 2] / sums[:, 0] - mean.pow(2)).clamp_min(1e-12).sqrt()
        self.net.holdout_mean.copy_(mean.float())
        self.net.holdout_std.copy_(std.float())


