"""Prediction networks with eval-mode BatchNorm folded into the convolution that feeds it.

In eval mode a BatchNorm is a fixed affine map per channel. Where it reads nothing but one convolution's output,
scaling that convolution's weights and shifting its bias gives the same result (within float rounding) without
the extra pass over the activations: 16-23 % of STPM's and RD's CPU inference time was eval-mode BatchNorm.

The pairs are found by running the network once and watching which tensor flows from a convolution straight
into a BatchNorm, so any architecture works (timm backbones, our students) without a list of layer names. A
convolution whose output also goes elsewhere (a skip connection) must not be folded; the folded copy is
therefore compared with the original on that run and thrown away if they differ.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

# Largest difference between the folded and the original network's output, relative to the output's largest
# magnitude, that counts as the same network (float32 folding differs by about 1e-6).
TOLERANCE = 1e-4
_CONVOLUTIONS = (nn.Conv2d, nn.ConvTranspose2d)

Run = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def fold_batchnorm(net: nn.Module, example: torch.Tensor, run: Run) -> tuple[nn.Module, int]:
    """A copy of ``net`` in eval mode with every foldable BatchNorm folded, and how many were; ``net`` itself
    is left as it was. ``run(network, example)`` computes the output that must not change (e.g. the anomaly
    map). Returns ``(net, 0)`` when nothing folds or the folded copy's output differs."""
    folded = copy.deepcopy(net).eval()
    pairs = _conv_batchnorm_pairs(folded, example, run)
    with torch.no_grad():
        for conv_name, norm_name in pairs:
            norm = folded.get_submodule(norm_name)
            _fold_into(folded.get_submodule(conv_name), norm)
            parent_name, _, attribute = norm_name.rpartition(".")
            setattr(folded.get_submodule(parent_name), attribute, _after_normalization(norm))
    if not pairs:
        return net, 0
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            expected, got = run(net, example).float(), run(folded, example).float()
    finally:
        net.train(was_training)
    if (got - expected).abs().max() > TOLERANCE * max(float(expected.abs().max()), 1e-12):
        return net, 0
    return folded, len(pairs)


def _foldable(norm: nn.Module) -> bool:
    return (isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats and norm.running_mean is not None
            and (type(norm) is nn.BatchNorm2d or _is_norm_then_activation(norm)))


def _is_norm_then_activation(norm: nn.Module) -> bool:
    """timm's BatchNormAct2d: batch_norm, then ``drop``, then ``act``."""
    return isinstance(getattr(norm, "act", None), nn.Module) and isinstance(getattr(norm, "drop", None), nn.Module)


def _conv_batchnorm_pairs(net: nn.Module, example: torch.Tensor, run: Run) -> list[tuple[str, str]]:
    """(convolution name, BatchNorm name) where the BatchNorm's input is exactly the convolution's output, each
    module called once in the run."""
    produced: dict[int, str] = {}
    kept: list[torch.Tensor] = []  # alive until the end of the run, so no two tensors share an id
    calls: dict[str, int] = {}
    fed: dict[str, str] = {}
    handles = []

    def after_conv(name):
        def hook(module, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            produced[id(output)] = name
            kept.append(output)
        return hook

    def before_norm(name):
        def hook(module, inputs):
            calls[name] = calls.get(name, 0) + 1
            if id(inputs[0]) in produced:
                fed[name] = produced[id(inputs[0])]
        return hook

    for name, module in net.named_modules():
        if isinstance(module, _CONVOLUTIONS):
            handles.append(module.register_forward_hook(after_conv(name)))
        elif _foldable(module):
            handles.append(module.register_forward_pre_hook(before_norm(name)))
    try:
        with torch.inference_mode():
            run(net, example)
    finally:
        for handle in handles:
            handle.remove()
    return [(conv, norm) for norm, conv in fed.items() if calls[norm] == 1 and calls[conv] == 1
            and _foldable_conv(net.get_submodule(conv))]


def _foldable_conv(conv: nn.Module) -> bool:
    return not isinstance(conv, nn.ConvTranspose2d) or conv.groups == 1


def _fold_into(conv: nn.Module, norm: nn.BatchNorm2d) -> None:
    """conv then norm == conv with weights ``W·s`` and bias ``(b - mean)·s + beta``, ``s = gamma/sqrt(var+eps)``."""
    weight = conv.weight.double()
    scale = norm.running_var.double().add(norm.eps).rsqrt()
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    shift = (bias - norm.running_mean.double()) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    # Conv2d weights are out×in×k×k; ConvTranspose2d weights in×out×k×k.
    shape = (1, -1, 1, 1) if isinstance(conv, nn.ConvTranspose2d) else (-1, 1, 1, 1)
    conv.weight = nn.Parameter((weight * scale.view(shape)).to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def _after_normalization(norm: nn.Module) -> nn.Module:
    """What is left of the BatchNorm module once its affine map moved into the convolution."""
    if _is_norm_then_activation(norm):
        return nn.Sequential(norm.drop, norm.act)
    return nn.Identity()
