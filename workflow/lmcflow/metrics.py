"""Metrics of the LLFC and LMC papers: cosines, the LLFC scale ``c`` and barriers.

Convention: the interpolated network is ``theta_alpha = alpha*theta_A + (1-alpha)*theta_B``,
so ``alpha = 1`` is model A and ``alpha = 0`` is model B. Feature maps are flattened to
one row per sample, shape ``(N, D)``.

All per-sample reductions run in float64: feature vectors have up to ~10^5 entries and
``1 - cos`` is small (often < 1e-3), so float32 dot products would drown the signal in
rounding error.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .barriers import barrier, barriers, linear_baseline  # noqa: F401  (re-exported)

__all__ = ["cosine", "coef_c", "llfc_batch", "llfc_frames", "LlfcRows", "linear_baseline", "barrier",
           "barriers", "llfc_table", "dist", "DistAccumulator"]


def _rows64(x: Tensor) -> Tensor:
    """(N, ...) -> (N, D) float64, so every sum below accumulates in double precision."""
    return x.reshape(x.shape[0], -1).to(torch.float64)


def cosine(x: Tensor, y: Tensor) -> Tensor:
    """Signed per-row cosine similarity of ``x`` and ``y``, both (N, D) -> float64 (N,).

    Inputs are cast to float64 *before* the dot product and norms. A row where either
    norm is zero has no direction, so its cosine is NaN (not 0, which would look like
    orthogonality); aggregate with NaN-aware reductions.
    """
    x, y = _rows64(x), _rows64(y)
    dot = (x * y).sum(dim=1)
    norm = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)
    return torch.where(norm > 0, dot / norm, torch.full_like(dot, float("nan")))


def coef_c(f_alpha: Tensor, target: Tensor) -> Tensor:
    """Least-squares scale ``c`` per row with ``c * f_alpha ≈ target``; (N, D) -> float64 (N,).

    ``c = <f_alpha, target> / <f_alpha, f_alpha>``. LLFC states the interpolated features
    equal the interpolated endpoint features *up to a scale*; ``c`` is that scale (≈ 1 for
    exact linearity). NaN where the ``f_alpha`` row is zero (any ``c`` fits).
    """
    f, t = _rows64(f_alpha), _rows64(target)
    num, den = (f * t).sum(dim=1), (f * f).sum(dim=1)
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan")))


def llfc_batch(f_a: Tensor, f_b: Tensor, f_alpha: Tensor, alpha: float) -> dict[str, Tensor]:
    """LLFC quantities for one batch of one layer; all inputs (N, D), outputs float64 (N,).

    - ``one_minus_cos_alpha``: 1 - cos(f(theta_alpha), alpha*f(theta_A) + (1-alpha)*f(theta_B))
    - ``one_minus_cos_ab``: 1 - cos(f(theta_A), f(theta_B)), the baseline LLFC must beat
    - ``coef_c``: scale c with c*f(theta_alpha) ≈ the interpolated target
    The target is formed in float64 so that it is not itself a source of rounding error.
    """
    f_a, f_b, f_alpha = _rows64(f_a), _rows64(f_b), _rows64(f_alpha)
    target = alpha * f_a + (1.0 - alpha) * f_b
    return {
        "one_minus_cos_alpha": 1.0 - cosine(f_alpha, target),
        "one_minus_cos_ab": 1.0 - cosine(f_a, f_b),
        "coef_c": coef_c(f_alpha, target),
    }


def llfc_frames(samples, features: dict, layers: Sequence[str], alphas: Sequence[float]
                ) -> list[pd.DataFrame]:
    """LLFC rows of one batch: per layer, α and sample, 1 − cos_α, 1 − cos_AB and c.
    ``features`` maps `features.column(network, layer)` to (B, D) tensors or arrays (any
    device; computed where they lie, in float64)."""
    from .features import alpha_network, column

    frames = []
    as_tensor = lambda v: torch.as_tensor(v) if isinstance(v, Tensor) else torch.from_numpy(v.copy())  # noqa: E731
    for i, layer in enumerate(layers):
        f_a, f_b = (as_tensor(features[column(n, layer)]) for n in ("A", "B"))
        for alpha in alphas:
            f_alpha = as_tensor(features[column(alpha_network(alpha), layer)])
            values = {k: v.cpu().numpy() for k, v in llfc_batch(f_a, f_b, f_alpha, alpha).items()}
            frames.append(pd.DataFrame({"alpha": alpha, "layer": layer, "layer_index": i,
                                        "sample": np.asarray(samples), **values}))
    return frames


class LlfcRows:
    """LLFC rows collected in the streaming feature pass (`features.write_features`'s
    ``on_batch``), so they cover every probe sample, stored in the features file or not."""

    def __init__(self, layers: Sequence[str], alphas: Sequence[float]):
        self.layers, self.alphas, self.frames = list(layers), list(alphas), []

    def __call__(self, samples, features: dict) -> None:
        self.frames += llfc_frames(samples, features, self.layers, self.alphas)

    def table(self) -> pd.DataFrame:
        """Columns: alpha, layer, layer_index, sample, one_minus_cos_alpha, one_minus_cos_ab,
        coef_c; one row per (layer, α, sample), in that order."""
        return _in_order(self.frames)


def _in_order(frames: list[pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(frames, ignore_index=True).sort_values(
        ["layer_index", "alpha", "sample"], kind="stable", ignore_index=True)


def llfc_table(features_path, alphas: Sequence[float] | None = None) -> pd.DataFrame:
    """Per sample, layer and α: 1 − cos_α, 1 − cos_AB and c, from a features Parquet file
    (the samples it stores).

    Streams the file one row group at a time (`features.iter_feature_batches`), so memory holds
    one batch of features, never the whole probe set. Columns as `LlfcRows.table`.
    """
    from .features import alpha_network, column, iter_feature_batches, read_metadata

    layers = read_metadata(features_path)["layers"]
    if alphas is None:
        alphas = [float(n.split("=")[1]) for n in read_metadata(features_path)["networks"]
                  if n.startswith("alpha=")]
    frames = []
    for i, layer in enumerate(layers):
        nets = ["A", "B", *(alpha_network(a) for a in alphas)]
        for batch in iter_feature_batches(features_path, ["sample", *(column(n, layer) for n in nets)]):
            rows = llfc_frames(batch["sample"], batch, [layer], alphas)
            frames += [f.assign(layer_index=i) for f in rows]
    return _in_order(frames)


def dist(x: Tensor, y: Tensor) -> Tensor:
    """Per-row ‖x − y‖² / (‖x‖·‖y‖) in float64, (N, D) -> (N,); NaN where a norm is zero.

    The distance of the LLFC paper's weak-additivity and commutativity checks: scale-free,
    0 for identical rows, 2·(1 − cos) for rows of equal norm.
    """
    x, y = _rows64(x), _rows64(y)
    norm = torch.linalg.vector_norm(x, dim=1) * torch.linalg.vector_norm(y, dim=1)
    sq = ((x - y) ** 2).sum(dim=1)
    return torch.where(norm > 0, sq / norm, torch.full_like(sq, float("nan")))


class DistAccumulator:
    """dist(vec X, vec Y) over a whole dataset, fed batch by batch (sums in float64).

    `add(x, y, diff=None)` takes matching batches; `diff` (= x − y) may be given when it is
    computed more accurately than the subtraction (e.g. (W_A − W_B)(H_A − H_B)).
    """

    def __init__(self):
        self.sq = self.xx = self.yy = 0.0

    def add(self, x: Tensor, y: Tensor, diff: Tensor | None = None) -> None:
        x, y = x.to(torch.float64), y.to(torch.float64)
        d = (x - y) if diff is None else diff.to(torch.float64)
        self.sq += float((d * d).sum())
        self.xx += float((x * x).sum())
        self.yy += float((y * y).sum())

    @property
    def value(self) -> float:
        denom = (self.xx * self.yy) ** 0.5
        return self.sq / denom if denom > 0 else float("nan")
