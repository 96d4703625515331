"""REPAIR (Jordan et al. 2022): rescale the units of an interpolated network to the interpolated
statistics of the endpoints' units.

Interpolating two networks shrinks the variance of their hidden units ("variance collapse": a
matched pair of units with correlation ρ and equal σ has σ·√((1+ρ)/2) at α = ½). REPAIR measures
every unit's mean μ and standard deviation σ in A, in B and in θ_α, and rescales θ_α's unit to

    μ_target = α·μ_A + (1−α)·μ_B,   σ_target = α·σ_A + (1−α)·σ_B   (the std is interpolated)

The units here are the channels of every pre-activation: the input of every activation module
(nn.ReLU, nn.GELU), channels on dim 1 ((B, C) and (B, C, H, W)) or last ((B, T, D) tokens),
positions pooled. That is the conv/Linear output of a no-norm network, the norm output of a
BatchNorm/LayerNorm one and the sum of a residual block (the official notebooks repair conv
outputs of VGG and block outputs of ResNets; their affine is folded into the weights, ours
stays a forward pre-hook on the activation module, so networks without biases work too).

With ``logits=True`` the logits are a unit too (per class): the output of the module that
returns the network's output (`models.logits_module`, e.g. ``out`` or ``fc``) is rescaled the
same way, by a forward hook on that module, so feature hooks on it read the repaired logits.
The official notebooks differ here: ``Train-and-Permute-MNIST-MLP-NoBatchNorm`` and
``Permute-ImageNet-ResNet18/50`` repair the logits (``ResetLinear`` on ``fc2``, ``ResetLayer``
on ``fc``), the VGG-11 notebooks, ``Train-and-Permute-MNIST-MLP-BatchNorm``,
``Permute-Datasets-MLP`` and ``Merge-ResNet50-ImageNet`` do not (``fc2`` commented out, or
only ``features``/blocks wrapped).

Statistics are estimated as BatchNorm's reset estimates its running statistics (and as the
official code does, with BatchNorm layers in train mode): one no-grad pass over the training
data in a seeded shuffled order, mean of the per-batch means and of the per-batch unbiased
variances. While θ_α's statistics are estimated, every unit is already rescaled with its batch
statistics, so deeper units see repaired inputs; afterwards each unit applies the fixed affine
(x − μ)/σ·σ_target + μ_target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .data import sample_order

ACTIVATIONS = (nn.ReLU, nn.GELU)
EPS = 1e-5
LOGITS = "(logits)"  # the key of the logits' statistics (repair with logits=True)
Stats = dict[str, tuple[Tensor, Tensor]]  # activation module name (or LOGITS) -> (mean, std)


def repair_points(model: nn.Module, logits: bool = False) -> list[str]:
    """Names of the activation modules whose inputs are repaired, in registration order: those
    called once per forward pass (a re-used module has no single input to rescale); with
    ``logits``, then :data:`LOGITS`, the output of `models.logits_module`."""
    from .models import modules_called_once

    return modules_called_once(model, ACTIVATIONS) + ([LOGITS] if logits else [])


def _hook_sites(model: nn.Module, points: list[str]) -> dict[str, str]:
    """Repair point -> the module its hook sits on (for :data:`LOGITS`, `models.logits_module`,
    found by a forward pass: done before any hook is registered, which that pass would feed)."""
    from .models import logits_module

    return {p: logits_module(model) if p == LOGITS else p for p in points}


def _hook(model: nn.Module, point: str, site: str, function) -> torch.utils.hooks.RemovableHandle:
    """Register ``function(x) -> x'`` (or None: unchanged) on repair point ``point`` of module
    ``site``: on the input of an activation module (a forward pre-hook), on the output of the
    logits module (a forward hook)."""
    module = model.get_submodule(site)
    if point == LOGITS:
        return module.register_forward_hook(lambda _module, _args, out: function(out))

    def pre_hook(_module, args):
        x = function(args[0])
        return None if x is None else (x,) + tuple(args[1:])

    return module.register_forward_pre_hook(pre_hook)


def _channels_first(x: Tensor) -> Tensor:
    """(B, C[, H, W]) or (B, T, D) -> (C, observations)."""
    x = x.movedim(-1, 1) if x.dim() == 3 else x
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def _shape(v: Tensor, x: Tensor) -> Tensor:
    """Per-unit values shaped to broadcast against x."""
    if x.dim() == 3:
        return v
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class _Accumulator:
    """Mean of per-batch means and of per-batch unbiased variances, per unit (float64)."""

    def __init__(self):
        self.batches, self.mean, self.var = 0, 0.0, 0.0

    def add(self, x: Tensor) -> tuple[Tensor, Tensor]:
        obs = _channels_first(x).double()
        mean, var = obs.mean(1), obs.var(1, unbiased=obs.shape[1] > 1)
        self.batches += 1
        self.mean, self.var = self.mean + mean, self.var + var
        return mean, var

    def result(self) -> tuple[Tensor, Tensor]:
        return self.mean / self.batches, (self.var / self.batches).clamp_min(0).sqrt()


@torch.no_grad()
def _one_pass(model: nn.Module, x: Tensor, normalize: Callable, batch_size: int, device, seed: int
              ) -> None:
    for idx in sample_order(len(x), seed).to(x.device).split(batch_size):
        model(normalize(x[idx].to(device)))


@torch.no_grad()
def unit_statistics(model: nn.Module, x: Tensor, normalize: Callable, batch_size: int = 1000,
                    device="cpu", seed: int = 0, logits: bool = False) -> Stats:
    """(μ, σ) of every unit of every repair point of ``model`` (eval mode; with ``logits``, of
    the logits too) over uint8 inputs ``x``, read in the seeded order
    ``data.sample_order(len(x), seed)``; float64 tensors."""
    model.eval()
    sites = _hook_sites(model, repair_points(model, logits))
    acc = {name: _Accumulator() for name in sites}

    def observe(acc):
        def hook(x):
            acc.add(x)  # returns None: the tensor passes unchanged

        return hook

    handles = [_hook(model, name, sites[name], observe(a)) for name, a in acc.items()]
    try:
        _one_pass(model, x, normalize, batch_size, device, seed)
    finally:
        for h in handles:
            h.remove()
    return {name: a.result() for name, a in acc.items()}


class _Rescale:
    """Hook function of one repair point: rescale its tensor to the target statistics, with the
    batch's own statistics while estimating, with the estimated ones afterwards."""

    def __init__(self, target_mean: Tensor, target_std: Tensor):
        self.target_mean, self.target_std = target_mean, target_std
        self.acc: _Accumulator | None = _Accumulator()
        self.mean = self.std = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.acc is not None:  # estimating: normalise with the batch's statistics
            mean, var = self.acc.add(x)
            std = (var + EPS).sqrt()
        else:
            mean, std = self.mean, self.std
        scale = (self.target_std / std).to(x.dtype)
        shift = (self.target_mean - mean * self.target_std / std).to(x.dtype)
        return x * _shape(scale, x) + _shape(shift, x)

    def freeze(self) -> None:
        mean, std = self.acc.result()
        self.mean, self.std, self.acc = mean, (std.square() + EPS).sqrt(), None


def remove_repair(model: nn.Module) -> None:
    """Take the REPAIR hooks off ``model`` (it computes θ_α's plain function again)."""
    for handle in getattr(model, "_lmcflow_repair", []):
        handle.remove()
    model._lmcflow_repair = []


@torch.no_grad()
def repair(model: nn.Module, stats_a: Stats, stats_b: Stats, alpha: float, x: Tensor,
           normalize: Callable, batch_size: int = 1000, device="cpu", seed: int = 0,
           logits: bool = False) -> None:
    """Rescale every unit of ``model`` (θ_α, in place, as forward pre-hooks; with ``logits``,
    the logits too, as a forward hook) to α·μ_A + (1−α)·μ_B and α·σ_A + (1−α)·σ_B, estimating
    θ_α's own statistics with one pass over ``x`` (see the module docstring). Replaces any
    earlier REPAIR of ``model``."""
    remove_repair(model)
    model.eval()
    hooks = {}
    sites = _hook_sites(model, repair_points(model, logits))
    for name, site in sites.items():
        if name not in stats_a or name not in stats_b:
            raise KeyError(f"no endpoint statistics of repair point {name!r} (measure them with "
                           f"logits={logits})")
        (mu_a, sd_a), (mu_b, sd_b) = stats_a[name], stats_b[name]
        target_mean, target_std = alpha * mu_a + (1 - alpha) * mu_b, alpha * sd_a + (1 - alpha) * sd_b
        hooks[name] = _Rescale(target_mean.to(device), target_std.to(device))
        model._lmcflow_repair.append(_hook(model, name, site, hooks[name]))
    _one_pass(model, x, normalize, batch_size, device, seed)
    for hook in hooks.values():
        hook.freeze()
