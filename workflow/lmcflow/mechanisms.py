"""Why LLFC emerges (Zhou et al. 2023, §5): weak additivity of ReLU and commutativity.

Both are measured between A and B as given (for permutation methods B is already π(B)) on the
probe set, one batch at a time, with dist(x, y) = ‖x − y‖² / (‖x‖·‖y‖) (`metrics.dist`).

- Weak additivity, per elementwise activation module σ (ReLU as in the paper; also GELU, SiLU,
  LeakyReLU, ELU, so a transformer's MLP is measured too) with pre-activations H̃_A, H̃_B (its
  inputs) and per sample: Dist_σ = dist(σ(αH̃_A + (1−α)H̃_B), ασ(H̃_A) + (1−α)σ(H̃_B)). Baseline `dist_sigma_shuffled`:
  the same with B's pre-activations of another sample, its partner under a seeded derangement
  of the whole probe set (so partners are mostly of other classes, whatever the batch size and
  the order in which the dataset is stored). The official LLFC code has no such baseline.
- Commutativity, per Linear/Conv2d module with weight W and input H (biases cancel and are
  left out; a conv is its unfolded matrix product, i.e. the conv itself without bias):
  Dist_com = dist(vec(W_A H_A + W_B H_B), vec(W_A H_B + W_B H_A)) over the whole probe set,
  whose difference is exactly (W_A − W_B)(H_A − H_B) and is computed that way (no
  cancellation). Beside it Dist_W = dist(vec W_A, vec W_B) and Dist_H = dist(vec H_A, vec H_B).
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .features import capture
from .metrics import DistAccumulator, dist
from .models import modules_called_once


def modules_of(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """Modules of ``kinds`` called once per forward pass (a module a block re-uses has no
    single input to read)."""
    return modules_called_once(model, kinds)


ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU)
COLUMNS = ["alpha", "layer", "layer_index", "activation", "sample", "dist_sigma",
           "dist_sigma_shuffled"]


def _activation(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation's plain function: out of place (never writes into its argument) and
    without the module's hooks (REPAIR rescales an activation's input through a pre-hook)."""
    if getattr(module, "inplace", False):
        module = copy.copy(module)
        module.inplace = False
    return module.forward


def _batches(x, samples, normalize, batch_size, device):
    for start in range(0, len(samples), batch_size):
        idx = samples[start:start + batch_size]
        yield idx, normalize(x[torch.as_tensor(idx, device=x.device)].to(device))


def _inputs_of(model_a, model_b, names, xb, xb_for_b=None):
    """Inputs of the modules `names` in A on xb and in B on xb (or on `xb_for_b`)."""
    with capture(model_a, names, inputs=True) as h_a:
        model_a(xb)
    with capture(model_b, names, inputs=True) as h_b:
        model_b(xb if xb_for_b is None else xb_for_b)
    return h_a, h_b


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded random permutation σ of range(n) with σ(i) ≠ i for all i (n ≥ 2): one cycle
    through a random order of the n positions."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 elements, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    sigma = np.empty(n, dtype=np.int64)
    sigma[order] = np.roll(order, -1)
    return sigma


@torch.no_grad()
def weak_additivity(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, samples: np.ndarray,
                    normalize: Callable, alphas, batch_size: int = 100, device="cpu",
                    seed: int = 0) -> pd.DataFrame:
    """Per activation module (`ACTIVATIONS`), α and sample: dist_sigma and the other-sample
    baseline. A model without such modules gives an empty table with the same columns.

    The baseline pairs A's pre-activation of sample ``samples[i]`` with B's of
    ``samples[σ(i)]``, σ = derangement(len(samples), seed); B is run a second time on the
    partners of each batch, so partners need not share a batch. NaN for a probe of one sample.
    """
    model_a.eval(), model_b.eval()
    relus = modules_of(model_a, ACTIVATIONS)
    modules = dict(model_a.named_modules())
    sigma = {n: _activation(modules[n]) for n in relus}
    samples = np.asarray(samples)
    partners = samples[derangement(len(samples), seed)] if len(samples) > 1 else None
    frames = []
    for start in range(0, len(samples), batch_size):
        idx = samples[start:start + batch_size]
        xb = normalize(x[torch.as_tensor(idx, device=x.device)].to(device))
        h_a, h_b = _inputs_of(model_a, model_b, relus, xb)
        h_other = None
        if partners is not None:
            other = partners[start:start + batch_size]
            with capture(model_b, relus, inputs=True) as h_other:
                model_b(normalize(x[torch.as_tensor(other, device=x.device)].to(device)))
        for i, layer in enumerate(relus):
            act = sigma[layer]
            a, b = h_a[layer].flatten(1).double(), h_b[layer].flatten(1).double()
            b_other = None if h_other is None else h_other[layer].flatten(1).double()
            for alpha in alphas:
                mix = lambda u, v: alpha * u + (1 - alpha) * v  # noqa: E731
                baseline = (np.full(len(idx), np.nan) if b_other is None else
                            dist(act(mix(a, b_other)), mix(act(a), act(b_other))).cpu().numpy())
                frames.append(pd.DataFrame({
                    "alpha": alpha, "layer": layer, "layer_index": i,
                    "activation": type(modules[layer]).__name__, "sample": idx,
                    "dist_sigma": dist(act(mix(a, b)), mix(act(a), act(b))).cpu().numpy(),
                    "dist_sigma_shuffled": baseline,
                }))
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c.startswith("dist") or c == "alpha"
                                          else object) for c in COLUMNS})
    return pd.concat(frames, ignore_index=True)[COLUMNS]


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
