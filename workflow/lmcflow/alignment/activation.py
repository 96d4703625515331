"""Activation matching (Git Re-Basin's method 1): per group, one linear assignment on the
correlation (or inner product) of the two networks' features on training data, in one
streaming float64 pass.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..data import sample_order
from ..features import capture
from .builders import permutation_spec
from .spec import PermutationSpec

__all__ = ["activation_matching", "feature_modules", "RESIDUAL_MODES"]


class _Moments:
    """Streaming float64 moments of paired features ``a, b`` of shape (N, n)."""

    def __init__(self, n: int, device):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        self.count = 0
        self.sum_a, self.sum_b, self.sq_a, self.sq_b = z(n), z(n), z(n), z(n)
        self.cross = z(n, n)

    def update(self, a: Tensor, b: Tensor) -> None:
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def cost(self, kind: str, eps: float = 1e-12) -> Tensor:
        if kind == "inner_product":
            return self.cross
        if kind != "correlation":
            raise ValueError(f"cost must be 'correlation' or 'inner_product', got {kind!r}")
        n = self.count
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.cross / n - torch.outer(mean_a, mean_b)
        std_a = (self.sq_a / n - mean_a ** 2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b ** 2).clamp_min(0).sqrt()
        return cov / (torch.outer(std_a, std_b) + eps)


def _as_observations(feats: Tensor, n: int, dim: int = 1) -> Tensor:
    """Hooked output flattened ``(B, n*S)`` -> ``(B*S, n)``: units on dim 1 (NC... layout) or,
    with ``dim=-1``, last ((B, T, n) tokens: the units vary fastest)."""
    batch = feats.shape[0]
    if feats.shape[1] % n:
        raise ValueError(f"feature width {feats.shape[1]} is not a multiple of {n} units")
    if dim == -1:
        return feats.reshape(-1, n)
    return feats.reshape(batch, n, -1).transpose(1, 2).reshape(-1, n)


RESIDUAL_MODES = ("pooled", "last")


def feature_modules(spec: PermutationSpec, residual: str = "pooled") -> dict[str, tuple[str, ...]]:
    """group -> the modules whose outputs activation matching compares. ``"pooled"``: every
    module of ``spec.features`` (a residual stream's stem and block outputs all count, as extra
    observations); ``"last"``: of a group with several modules (a residual stream) only the last
    one, in forward order (the spec lists them so): for a ResNet the output of each stage's last
    block, as the REPAIR code matches a stream."""
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    if residual == "last":
        return {g: ms[-1:] for g, ms in spec.features.items()}
    return dict(spec.features)


@torch.no_grad()
def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None,
                        data, num_batches: int, batch_size: int, cost: str = "correlation",
                        device="cpu", log: Callable[[str], None] | None = None, seed: int = 0,
                        residual: str = "pooled") -> tuple[dict[str, Tensor], dict]:
    """Match every group's units by the similarity of their activations on training data.

    Both models run in eval mode (BN with running stats) on ``num_batches * batch_size``
    training images taken in the seeded shuffled order ``data.sample_order(n, seed)`` (stored
    datasets may be sorted by class), normalized with ``data.normalize``. The outputs of the
    modules in ``spec.features[group]`` (post-ReLU features; conv maps count every spatial
    position as an observation, token tensors every token; with ``residual="pooled"`` several
    modules of a group count as extra observations, with ``"last"`` only the group's last module
    is read, see :func:`feature_modules`) are accumulated in one streaming float64 pass (sums, sums of squares,
    cross products). Each group is then one linear assignment maximising the Pearson
    correlation (``cost="correlation"``) or the inner product (``"inner_product"``) between A's
    unit i and B's unit perm[i]. A group without feature modules (a traced spec's attention
    heads; units seen only inside concatenations, whose outputs are not read: a branch's
    units are read at its own modules, before the ``cat``) keeps the identity: listed in
    ``info["unmatched"]``.

    The models are moved to ``device``; their train/eval mode is restored afterwards.
    Returns ``(perm, info)`` with perm as in :func:`weight_matching` and
    ``info = {"objective": mean matched cost over all units, "sweeps": 0,
    "per_group": {group: mean matched cost}, "samples": images used, "unmatched": groups}``.
    """
    if cost not in ("correlation", "inner_product"):
        raise ValueError(f"cost must be 'correlation' or 'inner_product', got {cost!r}")
    spec = permutation_spec(model_a) if spec is None else spec
    features = feature_modules(spec, residual)
    unmatched = sorted(set(spec.groups) - set(features))
    if unmatched and log:
        log(f"activation matching: no feature modules for {unmatched}; they keep the identity")
    if len(unmatched) == len(spec.groups):
        raise ValueError(f"spec has no feature modules for any group ({unmatched})")
    order = sample_order(len(data.train_x), seed)[: int(num_batches) * int(batch_size)]
    x_all = data.train_x[order.to(data.train_x.device)]
    if len(x_all) == 0:
        raise ValueError("no training samples (num_batches * batch_size == 0)")
    modes = (model_a.training, model_b.training)
    model_a.to(device).eval()
    model_b.to(device).eval()
    names = sorted(set(spec.groups) - set(unmatched))
    layers = sorted({m for g in names for m in features[g]})
    moments = {g: _Moments(spec.sizes[g], device) for g in names}
    try:
        with capture(model_a, layers) as store_a, capture(model_b, layers) as store_b:
            for i, start in enumerate(range(0, len(x_all), int(batch_size)), start=1):
                x = data.normalize(x_all[start:start + int(batch_size)].to(device))
                model_a(x)
                model_b(x)
                for g in names:
                    n = spec.sizes[g]
                    for module in features[g]:
                        dim = spec.feature_dims.get(module, 1)
                        moments[g].update(_as_observations(store_a[module], n, dim),
                                          _as_observations(store_b[module], n, dim))
                if log:
                    log(f"activation matching: batch {i}, {start + len(x)}/{len(x_all)} samples")
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    perm, per_group, total, units = {}, {}, 0.0, 0
    for g in names:
        c = moments[g].cost(cost).cpu().numpy()
        _, cols = linear_sum_assignment(c, maximize=True)
        matched = c[np.arange(len(cols)), cols]
        perm[g] = torch.from_numpy(cols).long()
        per_group[g] = float(matched.mean())
        total += float(matched.sum())
        units += len(cols)
    perm |= {g: torch.arange(spec.sizes[g]) for g in unmatched}
    info = {"objective": total / units, "sweeps": 0, "per_group": per_group,
            "samples": int(len(x_all)), "unmatched": unmatched, "residual": residual}
    if log:
        log(f"activation matching ({cost}, residual streams {residual}): mean matched "
            f"{info['objective']:.6g}")
    return perm, info
