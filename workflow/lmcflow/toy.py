"""The deep linear toy of the layer-wise LMC paper (blog, Fig. 4): a two-layer diagonal linear
network with two minima, where averaging one layer gives a much lower or a much higher barrier
than averaging both (numpy and pandas only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def linear_toy(minimum_a=(1 / 3, 3.0), minimum_b=(3.0, 1 / 3), target=1.0,
               alphas: Sequence[float] | None = None) -> pd.DataFrame:
    """Two-layer diagonal linear network f(x) = w2 ⊙ w1 ⊙ x, loss mean((w2 ⊙ w1 − target)²).

    ``minimum_a``/``minimum_b`` are (w1, w2) pairs of scalars or equal-length vectors (one
    entry per dimension). The defaults (⅓, 3) and (3, ⅓) are two global minima related by the
    rescaling symmetry w1 → c·w1, w2 → w2/c.

    Paths on α ∈ ``alphas`` (default linspace(0, 1, 21); it must contain ½), θ_α = α·A + (1−α)·B
    per interpolated layer: "full" (both layers, into "both"); "layer1" (only w1; w2 from A for
    into "a", from B for into "b"); "layer2" (only w2). ``barrier`` is the layer-wise barrier of
    Adilova et al.: loss at α = ½ minus the mean of the two *full* endpoint losses,
    L(θ_½) − ½[L(A) + L(B)], repeated on every row of the path. With the defaults: full path
    3.16; into A, layer 2 only 0.20 and layer 1 only 16.0. Into B the two layers swap roles
    (w1 ↔ w2 is a symmetry of the product), so into B layer 1 is the low one.

    Columns: path, into, alpha, loss, barrier.
    """
    alphas = np.linspace(0.0, 1.0, 21) if alphas is None else np.asarray(alphas, dtype=np.float64)
    half = np.flatnonzero(np.isclose(alphas, 0.5))
    if half.size == 0:
        raise ValueError("linear_toy needs alpha = 0.5 on the grid (the layer-wise barrier)")
    (a1, a2), (b1, b2) = [tuple(np.atleast_1d(np.asarray(w, dtype=np.float64)) for w in m)
                          for m in (minimum_a, minimum_b)]
    target = np.asarray(target, dtype=np.float64)

    def loss(w1, w2):
        return float(np.mean((w2 * w1 - target) ** 2))

    def lerp(x, y, a):
        return a * x + (1.0 - a) * y

    reference = 0.5 * (loss(a1, a2) + loss(b1, b2))
    paths = {
        ("full", "both"): lambda a: (lerp(a1, b1, a), lerp(a2, b2, a)),
        ("layer1", "a"): lambda a: (lerp(a1, b1, a), a2),
        ("layer1", "b"): lambda a: (lerp(a1, b1, a), b2),
        ("layer2", "a"): lambda a: (a1, lerp(a2, b2, a)),
        ("layer2", "b"): lambda a: (b1, lerp(a2, b2, a)),
    }
    frames = []
    for (path, into), weights in paths.items():
        losses = [loss(*weights(a)) for a in alphas]
        frames.append(pd.DataFrame({"path": path, "into": into, "alpha": alphas, "loss": losses,
                                    "barrier": losses[half[0]] - reference}))
    return pd.concat(frames, ignore_index=True)
