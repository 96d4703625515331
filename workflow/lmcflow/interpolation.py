"""Interpolating two networks: θ_α = α·θ_A + (1−α)·θ_B (α = 1 is A, α = 0 is B), BN handling, LMC.

After interpolation, BatchNorm running statistics no longer describe the network's activations
("variance collapse"). The normalisation policy `bn` says what θ_α gets:
- "interpolate": nothing (the interpolated statistics, if any);
- "reset": BN statistics recomputed with one no-grad pass over the training data
  (momentum=None: a cumulative average over all batches, in a seeded shuffled order so that every
  batch mixes the classes);
- "repair": the reset, then REPAIR (`lmcflow.repair`): every unit's pre-activation rescaled to
  the interpolated mean and std of the endpoints' units; for networks with or without
  normalisation layers. ``repair_logits`` rescales the logits (per class) as well.
`num_batches_tracked` is never interpolated (A's value is kept).

One function, :func:`load_interpolated`, puts any network that is compared into its final
state, the endpoints included: A is θ_1 and B is θ_0 (lerp is exact there), so A, B and θ_α
always get the same normalisation policy and a self-pair (A = B) compares identical networks.
"""

from __future__ import annotations

import copy
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .data import Data, sample_order
from .repair import Stats, remove_repair, repair, unit_statistics
from .training import evaluate


def lerp_state(state_a: dict, state_b: dict, alpha: float) -> dict:
    """α·A + (1−α)·B for every floating tensor; integer buffers are taken from A."""
    if state_a.keys() != state_b.keys():
        raise ValueError(f"the two state dicts differ in keys: {sorted(state_a.keys() ^ state_b.keys())}")
    return {k: torch.lerp(state_b[k], state_a[k], alpha) if state_a[k].is_floating_point()
            else state_a[k].clone() for k in state_a}


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


BN_POLICIES = ("interpolate", "reset", "repair")
RESET_SEED = 0  # the data order of every BN reset: the same for every network compared


@torch.no_grad()
def reset_bn(model: nn.Module, x: torch.Tensor, normalize: Callable, batch_size: int = 1000,
             device: torch.device | str = "cpu", seed: int = RESET_SEED) -> None:
    """Recompute BatchNorm running statistics with one pass over uint8 inputs `x`, read in the
    seeded shuffled order `data.sample_order(len(x), seed)` (batches of one class would give
    each BN the within-class variance instead of the population's)."""
    bns = batchnorm_modules(model)
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    order = sample_order(len(x), seed).to(x.device)  # drawn on the CPU, indexed where x lies
    for start in range(0, len(x), batch_size):
        model(normalize(x[order[start:start + batch_size]].to(device)))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def endpoint_statistics(model: nn.Module, state_a: dict, state_b: dict, data: Data,
                        batch_size: int = 1000, device="cpu", logits: bool = False
                        ) -> tuple[Stats, Stats]:
    """REPAIR's unit statistics of A and of B (each with its BN statistics reset; with
    ``logits``, of the logits too), measured on a copy of `model` so that `model` is left as it
    is."""
    scratch = copy.deepcopy(model)
    remove_repair(scratch)
    stats = []
    for state in (state_a, state_b):
        scratch.load_state_dict(state)
        reset_bn(scratch, data.train_x, data.normalize, batch_size, device)
        stats.append(unit_statistics(scratch, data.train_x, data.normalize, batch_size, device,
                                     logits=logits))
    return stats[0], stats[1]


def load_interpolated(model: nn.Module, state_a: dict, state_b: dict, alpha: float, data: Data,
                      bn: str, batch_size: int = 1000, device="cpu",
                      stats: tuple[Stats, Stats] | None = None,
                      repair_logits: bool = False) -> nn.Module:
    """Put θ_α into `model` (in place) under the normalisation policy `bn` and return it in eval
    mode. α = 1 gives A and α = 0 gives B under the same policy: every analysis that compares
    networks gets all of them here. With bn="repair", `stats` are the endpoints' statistics
    (:func:`endpoint_statistics`, with ``logits=repair_logits``; computed here if not given)
    and ``repair_logits`` repairs the logits too."""
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {BN_POLICIES}, got {bn!r}")
    remove_repair(model)
    model.load_state_dict(lerp_state(state_a, state_b, alpha))
    if bn in ("reset", "repair"):
        reset_bn(model, data.train_x, data.normalize, batch_size, device)
    if bn == "repair":
        stats = stats or endpoint_statistics(model, state_a, state_b, data, batch_size, device,
                                             logits=repair_logits)
        repair(model, *stats, alpha, data.train_x, data.normalize, batch_size, device,
               logits=repair_logits)
    return model.eval()


def pair_networks(build: Callable[[], nn.Module], state_a: dict, state_b: dict, alphas, data: Data,
                  bn: str, batch_size: int = 1000, device="cpu", repair_logits: bool = False
                  ) -> dict[float, nn.Module]:
    """α -> θ_α for every α in `alphas`, each a fresh `build()` under the policy `bn` (include 1
    and 0 for A and B)."""
    first = build()
    stats = (endpoint_statistics(first, state_a, state_b, data, batch_size, device, repair_logits)
             if bn == "repair" else None)
    return {float(a): load_interpolated(first if i == 0 else build(), state_a, state_b, float(a),
                                        data, bn, batch_size, device, stats, repair_logits)
            for i, a in enumerate(alphas)}


def lmc_curve(model: nn.Module, state_a: dict, state_b: dict, data: Data, alphas: list[float],
              bn: str = "reset", batch_size: int = 1000, device="cpu", log=print,
              repair_logits: bool = False) -> pd.DataFrame:
    """Loss and error of θ_α on the train and test splits for every α: one row per (α, split)."""
    rows = []
    stats = (endpoint_statistics(model, state_a, state_b, data, batch_size, device, repair_logits)
             if bn == "repair" else None)
    for alpha in alphas:
        load_interpolated(model, state_a, state_b, alpha, data, bn, batch_size, device, stats,
                          repair_logits)
        for split in ("train", "test"):
            x, y = data.split(split)
            loss, error = evaluate(model, x, y, data.normalize, batch_size, device)
            rows.append({"alpha": alpha, "split": split, "loss": loss, "error": error})
        log(f"alpha {alpha:.3f}: " + ", ".join(
            f"{r['split']} loss {r['loss']:.4f} err {100 * r['error']:.2f}%" for r in rows[-2:]))
    return pd.DataFrame(rows)


def lmc_table(model: nn.Module, state_a: dict, state_b: dict, data: Data, setting, device="cpu",
              log=print) -> pd.DataFrame:
    """The LMC curves of a pair under its configured policy ``setting.bn`` and every one of
    ``setting.policies`` (an ``LmcSetting``): `lmc_curve` rows plus ``bn`` (the policy; "none"
    for `interpolate`/`reset` on a network without BatchNorm, where they are the same network)
    and ``configured`` (the curve of ``setting.bn``, the one fig1 shows), configured first."""
    from .models import has_batchnorm

    name = {p: p if has_batchnorm(model) or p == "repair" else "none" for p in BN_POLICIES}
    curves = []
    for bn in dict.fromkeys(name[p] for p in (setting.bn, *setting.policies)):
        curve = lmc_curve(model, state_a, state_b, data, setting.alphas,
                          bn="interpolate" if bn == "none" else bn,
                          batch_size=setting.batch_size, device=device, log=log,
                          repair_logits=setting.repair_logits)
        curves.append(curve.assign(bn=bn, configured=bn == name[setting.bn]))
    return pd.concat(curves, ignore_index=True)
