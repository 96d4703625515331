"""Interpolating two networks: θ_α = α·θ_A + (1−α)·θ_B (α = 1 is A, α = 0 is B), BN handling, LMC.

After interpolation, BatchNorm running statistics no longer describe the network's activations
("variance collapse"); `bn="reset"` recomputes them with one no-grad pass over the training data
(momentum=None: a cumulative average over all batches). `num_batches_tracked` is never
interpolated (A's value is kept).
"""

from __future__ import annotations

from typing import Callable

import pandas as pd
import torch
from torch import nn

from .data import Data
from .training import evaluate


def lerp_state(state_a: dict, state_b: dict, alpha: float) -> dict:
    """α·A + (1−α)·B for every floating tensor; integer buffers are taken from A."""
    if state_a.keys() != state_b.keys():
        raise ValueError(f"the two state dicts differ in keys: {sorted(state_a.keys() ^ state_b.keys())}")
    return {k: torch.lerp(state_b[k], state_a[k], alpha) if state_a[k].is_floating_point()
            else state_a[k].clone() for k in state_a}


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reset_bn(model: nn.Module, x: torch.Tensor, normalize: Callable, batch_size: int = 1000,
             device: torch.device | str = "cpu") -> None:
    """Recompute BatchNorm running statistics with one pass over uint8 inputs `x`."""
    bns = batchnorm_modules(model)
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for start in range(0, len(x), batch_size):
        model(normalize(x[start:start + batch_size].to(device)))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    model.eval()


def load_interpolated(model: nn.Module, state_a: dict, state_b: dict, alpha: float, data: Data,
                      bn: str, batch_size: int = 1000, device="cpu") -> nn.Module:
    """Put θ_α into `model` (in place) and, with bn="reset", recompute its BN statistics."""
    if bn not in ("interpolate", "reset"):
        raise ValueError(f"bn must be 'interpolate' or 'reset', got {bn!r}")
    model.load_state_dict(lerp_state(state_a, state_b, alpha))
    if bn == "reset":
        reset_bn(model, data.train_x, data.normalize, batch_size, device)
    return model.eval()


def lmc_curve(model: nn.Module, state_a: dict, state_b: dict, data: Data, alphas: list[float],
              bn: str = "reset", batch_size: int = 1000, device="cpu", log=print) -> pd.DataFrame:
    """Loss and error of θ_α on the train and test splits for every α: one row per (α, split)."""
    rows = []
    for alpha in alphas:
        load_interpolated(model, state_a, state_b, alpha, data, bn, batch_size, device)
        for split in ("train", "test"):
            x, y = data.split(split)
            loss, error = evaluate(model, x, y, data.normalize, batch_size, device)
            rows.append({"alpha": alpha, "split": split, "loss": loss, "error": error})
        log(f"alpha {alpha:.3f}: " + ", ".join(
            f"{r['split']} loss {r['loss']:.4f} err {100 * r['error']:.2f}%" for r in rows[-2:]))
    return pd.DataFrame(rows)
