"""Why LLFC emerges (Zhou et al. 2023, §5): weak additivity of ReLU and commutativity.

Both are measured between A and B as given (for permutation methods B is already π(B)) on the
probe set, one batch at a time, with dist(x, y) = ‖x − y‖² / (‖x‖·‖y‖) (`metrics.dist`).

- Weak additivity, per ReLU module with pre-activations H̃_A, H̃_B (its inputs) and per sample:
  Dist_σ = dist(σ(αH̃_A + (1−α)H̃_B), ασ(H̃_A) + (1−α)σ(H̃_B)). Baseline `dist_sigma_shuffled`:
  the same with B's pre-activations of another sample (the batch rolled by one position).
- Commutativity, per Linear/Conv2d module with weight W and input H (biases cancel and are
  left out; a conv is its unfolded matrix product, i.e. the conv itself without bias):
  Dist_com = dist(vec(W_A H_A + W_B H_B), vec(W_A H_B + W_B H_A)) over the whole probe set,
  whose difference is exactly (W_A − W_B)(H_A − H_B) and is computed that way (no
  cancellation). Beside it Dist_W = dist(vec W_A, vec W_B) and Dist_H = dist(vec H_A, vec H_B).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .features import capture
from .metrics import DistAccumulator, dist


def modules_of(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def _batches(x, samples, normalize, batch_size, device):
    for start in range(0, len(samples), batch_size):
        idx = samples[start:start + batch_size]
        yield idx, normalize(x[torch.as_tensor(idx)].to(device))


def _inputs_of(model_a, model_b, names, xb):
    with capture(model_a, names, inputs=True) as h_a:
        model_a(xb)
    with capture(model_b, names, inputs=True) as h_b:
        model_b(xb)
    return h_a, h_b


@torch.no_grad()
def weak_additivity(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, samples: np.ndarray,
                    normalize: Callable, alphas, batch_size: int = 100, device="cpu") -> pd.DataFrame:
    """Per ReLU layer, α and sample: dist_sigma and the shuffled-sample baseline."""
    model_a.eval(), model_b.eval()
    relus = modules_of(model_a, (nn.ReLU,))
    frames = []
    for idx, xb in _batches(x, samples, normalize, batch_size, device):
        h_a, h_b = _inputs_of(model_a, model_b, relus, xb)
        for i, layer in enumerate(relus):
            a, b = h_a[layer].flatten(1).double(), h_b[layer].flatten(1).double()
            b_other = b.roll(1, dims=0)  # B's pre-activation of another sample of the batch
            for alpha in alphas:
                mix = lambda u, v: alpha * u + (1 - alpha) * v  # noqa: E731
                frames.append(pd.DataFrame({
                    "alpha": alpha, "layer": layer, "layer_index": i, "sample": idx,
                    "dist_sigma": dist(F.relu(mix(a, b)), mix(F.relu(a), F.relu(b))).numpy(),
                    "dist_sigma_shuffled": dist(F.relu(mix(a, b_other)),
                                                mix(F.relu(a), F.relu(b_other))).numpy(),
                }))
    return pd.concat(frames, ignore_index=True)


def _apply(module: nn.Module, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's linear map with another weight and no bias: W·H (conv = unfolded W·H)."""
    if isinstance(module, nn.Linear):
        return F.linear(h, weight)
    return F.conv2d(h, weight, None, module.stride, module.padding, module.dilation, module.groups)


@torch.no_grad()
def commutativity(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, samples: np.ndarray,
                  normalize: Callable, batch_size: int = 100, device="cpu") -> pd.DataFrame:
    """Per Linear/Conv2d layer: dist_com, dist_w and dist_h over the whole probe set."""
    model_a.eval(), model_b.eval()
    layers = modules_of(model_a, (nn.Linear, nn.Conv2d))
    mods_a, mods_b = dict(model_a.named_modules()), dict(model_b.named_modules())
    com = {n: DistAccumulator() for n in layers}
    hid = {n: DistAccumulator() for n in layers}
    for _, xb in _batches(x, samples, normalize, batch_size, device):
        h_a, h_b = _inputs_of(model_a, model_b, layers, xb)
        for n in layers:
            m, w_a, w_b = mods_a[n], mods_a[n].weight, mods_b[n].weight
            ha, hb = h_a[n], h_b[n]
            com[n].add(_apply(m, ha, w_a) + _apply(m, hb, w_b), _apply(m, hb, w_a) + _apply(m, ha, w_b),
                       diff=_apply(m, (ha - hb).double(), (w_a - w_b).double()))
            hid[n].add(ha, hb)
    rows = []
    for i, n in enumerate(layers):
        w = DistAccumulator()
        w.add(mods_a[n].weight, mods_b[n].weight)
        rows.append({"layer": n, "layer_index": i, "dist_com": com[n].value, "dist_w": w.value,
                     "dist_h": hid[n].value})
    return pd.DataFrame(rows)
