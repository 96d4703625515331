"""Layer-wise linear mode connectivity (Adilova et al., ICLR 2024).

Convention (as everywhere in lmcflow): θ_α = α·θ_A + (1−α)·θ_B, so α = 1 is A and α = 0 is B.
Layer-wise barriers are taken at α = ½ against the mean of the two *full* endpoint values:

    barrier = L(θ) − ½·[L(θ_A) + L(θ_B)]        (same formula for the error)

A *layer group* is one module's own tensors: its parameters and buffers (BN running stats and
``num_batches_tracked`` included), see :func:`layer_groups`.

Every analysis takes state dicts plus a model instance that is used as scratch space (each
variant is loaded into it in turn; afterwards it holds the last variant), evaluates with
:func:`lmcflow.training.evaluate` on the requested splits of a :class:`~lmcflow.data.Data`, and
returns a tidy (long) DataFrame, one row per variant × split. Variants are built lazily, one
at a time, so memory holds a few copies of the weights, never all variants.

Cost: every variant is evaluated once per split and the endpoints once in all. With
``bn="reset"`` on a model with BatchNorm, every variant additionally costs one no-grad pass over
``data.train_x`` to recompute the running statistics (``interpolation.reset_bn``); on models
without BatchNorm ``"reset"`` costs nothing. The endpoints get the same treatment as the
variants, so a variant equal to an endpoint has exactly that endpoint's values.

Randomness is explicit: every random draw comes from a ``torch.Generator`` seeded with
``training.derive_seed(seed, ...)`` of the indices naming the draw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import SPLITS, Data
from .interpolation import lerp_state, reset_bn
from .metrics import barrier
from .training import derive_seed, evaluate

__all__ = ["layer_groups", "mix_state", "single_layer_barriers", "cumulative_barriers",
           "random_direction", "layer_robustness", "perturbation_directions",
           "subspace_perturbations", "linear_toy", "ALL"]

ALL = "(all)"  # the `layer` value of rows about the whole network
BN_MODES = ("interpolate", "reset")

Result = dict[str, tuple[float, float]]  # split -> (loss, error)


# ----------------------------------------------------------------------------- groups and states


def layer_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """One group per module that directly owns state: ``(module name, its state_dict keys)``.

    The name is the module's ``named_modules()`` name ("fc1", "features.bn3",
    "layer2.0.shortcut.conv"); keys are parameters and persistent buffers owned by that module
    itself (not its children), e.g. a BatchNorm group has weight, bias, running_mean,
    running_var and num_batches_tracked. Every state_dict key is in exactly one group.

    Groups are ordered by first appearance in ``state_dict()``, i.e. module registration order,
    which is input-to-output order for the lmcflow models. In a ResNet block the shortcut
    (conv + norm) runs in parallel to the main branch; it comes after the block's conv2/norm2
    and before the next block.
    """
    groups: dict[str, list[str]] = {}
    for key in model.state_dict():
        owner = key.rpartition(".")[0]  # parameter and buffer names contain no dots
        groups.setdefault(owner, []).append(key)
    return [(name or "(root)", keys) for name, keys in groups.items()]


def mix_state(state_base: dict, state_other: dict, keys: Iterable[str], alpha: float) -> dict:
    """``state_base`` with the floating tensors of ``keys`` replaced by α·base + (1−α)·other.

    α = 1 keeps base, α = 0 takes other; integer buffers (``num_batches_tracked``) always come
    from base. With every key this is exactly ``lerp_state(state_base, state_other, alpha)``.
    Tensors not replaced are shared with ``state_base`` (no copy): treat the result as
    read-only, as ``load_state_dict`` does.
    """
    keys = set(keys)
    if not keys <= state_base.keys() or state_base.keys() != state_other.keys():
        raise ValueError(f"unknown or mismatched keys: {sorted(keys - state_base.keys())}")
    return {k: torch.lerp(state_other[k], v, alpha) if k in keys and v.is_floating_point() else v
            for k, v in state_base.items()}


def _splice(state_base: dict, donor: dict, keys: Iterable[str]) -> dict:
    """``state_base`` with the floating tensors of ``keys`` taken from ``donor`` (no copies).

    Used with donor = θ_½ so that "group averaged into A" and "into B" use bit-identical
    averaged weights, and averaging every group reproduces θ_½ exactly.
    """
    keys = set(keys)
    return {k: donor[k] if k in keys and v.is_floating_point() else v for k, v in state_base.items()}


def _parameter_keys(model: nn.Module, state: dict, keys: Iterable[str]) -> list[str]:
    """The floating *parameters* among ``keys`` (buffers such as BN running stats excluded)."""
    params = {name for name, _ in model.named_parameters()}
    return [k for k in keys if k in params and state[k].is_floating_point()]


# ---------------------------------------------------------------------------------- evaluation


def _check_bn(bn: str) -> None:
    if bn not in BN_MODES:
        raise ValueError(f"bn must be 'interpolate' or 'reset', got {bn!r}")


@torch.no_grad()
def _evaluate_state(model: nn.Module, state: dict, data: Data, splits: Sequence[str], bn: str,
                    batch_size: int, device) -> Result:
    """Load ``state`` into ``model``, reset BN stats if asked, evaluate every split once."""
    model.load_state_dict(state)
    if bn == "reset":
        reset_bn(model, data.train_x, data.normalize, batch_size, device)
    return {s: evaluate(model, *data.split(s), data.normalize, batch_size, device) for s in splits}


@torch.no_grad()
def evaluate_many(model: nn.Module, states: Sequence[dict], x: Tensor, y: Tensor,
                  normalize: Callable, batch_size: int = 1000, device="cpu") -> list[tuple[float, float]]:
    """(loss, error) of every state in ONE pass over (x, y): the states' tensors are stacked
    (K, ...) and the model is vmapped over them (torch.func.functional_call), so each batch is
    read, normalised and moved once for all K variants. Eval mode (BN uses running statistics)."""
    model.eval()
    stacked = {k: torch.stack([st[k].to(device) for st in states]) for k in states[0]}
    forward = torch.vmap(lambda p, xb: torch.func.functional_call(model, p, (xb,)), in_dims=(0, None))
    loss = torch.zeros(len(states), dtype=torch.float64, device=device)
    wrong = torch.zeros(len(states), dtype=torch.long, device=device)
    for start in range(0, len(y), batch_size):
        xb = normalize(x[start:start + batch_size].to(device))
        yb = y[start:start + batch_size].to(device)
        logits = forward(stacked, xb).double()  # (K, B, classes)
        ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(len(states)), reduction="none")
        loss += ce.view(len(states), -1).sum(1)
        wrong += (logits.argmax(-1) != yb).sum(1)
    return [(float(l_) / len(y), int(w) / len(y)) for l_, w in zip(loss.cpu(), wrong.cpu())]


class _Evaluator:
    """Evaluates states on the splits: one at a time (`ev(state)`), or many variants per pass
    over the data (`ev.many(states)`) where the variants need no BN reset of their own."""

    MAX_STACKED = 2 ** 26  # floats of stacked weights per pass (256 MB in float32)

    def __init__(self, model, data, splits, bn, batch_size, device):
        _check_bn(bn)
        for s in splits:
            data.split(s)  # fail early on an unknown split name
        self.model, self.data, self.splits = model.to(device), data, tuple(splits)
        self.bn, self.batch_size, self.device = bn, batch_size, device
        self.batched = not (bn == "reset" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()))

    def __call__(self, state: dict) -> Result:
        return _evaluate_state(self.model, state, self.data, self.splits, self.bn,
                               self.batch_size, self.device)

    def many(self, states: Sequence[dict]) -> list[Result]:
        chunk = self.MAX_STACKED // sum(t.numel() for t in states[0].values())
        if not self.batched or len(states) < 2 or chunk < 2:
            return [self(st) for st in states]
        results: list[Result] = []
        for start in range(0, len(states), chunk):
            part = states[start:start + chunk]
            per_split = {s: evaluate_many(self.model, part, *self.data.split(s), self.data.normalize,
                                          self.batch_size, self.device) for s in self.splits}
            results += [{s: per_split[s][i] for s in self.splits} for i in range(len(part))]
        return results


def _evaluator(model, data, splits, bn, batch_size, device) -> _Evaluator:
    return _Evaluator(model, data, splits, bn, batch_size, device)


def _rows(meta: dict, result: Result, reference: Result | None = None) -> list[dict]:
    """One row per split; with ``reference`` also the barrier columns (value − reference)."""
    rows = []
    for split, (loss, error) in result.items():
        row = {**meta, "split": split, "loss": loss, "error": error}
        if reference is not None:
            row["loss_barrier"] = loss - reference[split][0]
            row["error_barrier"] = error - reference[split][1]
        rows.append(row)
    return rows


def _endpoint_reference(ev, state_a: dict, state_b: dict) -> Result:
    """½[L(θ_A) + L(θ_B)] and ½[E(θ_A) + E(θ_B)] per split (two evaluations in all)."""
    res_a, res_b = ev(state_a), ev(state_b)
    return {s: (0.5 * (res_a[s][0] + res_b[s][0]), 0.5 * (res_a[s][1] + res_b[s][1])) for s in res_a}


def _barrier_summary(rows: list[dict]) -> str:
    """"into a train 0.0123, into a test ..." (loss barriers) for a log line."""
    return ", ".join(f"into {r['into']} {r['split']} {r['loss_barrier']:.4f}" for r in rows)


# ----------------------------------------------------------------------- single-layer barriers


def single_layer_barriers(model: nn.Module, state_a: dict, state_b: dict, data: Data,
                          splits: Sequence[str] = SPLITS, batch_size: int = 1000, device="cpu",
                          bn: str = "reset", log: Callable[[str], None] = print) -> pd.DataFrame:
    """Barrier of averaging one layer group only, into A and into B, at α = ½.

    For each group ℓ and into ∈ {a, b}: the base network (A or B) with group ℓ replaced by its
    θ_½ values. Plus one row per split with layer "(all)", layer_index −1, into "both": the
    full midpoint θ_½, whose barrier is the usual full-model barrier at α = ½.
    Evaluations: 2 endpoints + 1 midpoint + 2·G variants, each on every split.

    Columns: layer, layer_index, into, split, loss, error, loss_barrier, error_barrier
    (rows: G·2·len(splits) + len(splits)).
    """
    ev = _evaluator(model, data, splits, bn, batch_size, device)
    mid = lerp_state(state_a, state_b, 0.5)
    variants = [({"layer": name, "layer_index": i, "into": into}, _splice(base, mid, keys))
                for i, (name, keys) in enumerate(layer_groups(model))
                for into, base in (("a", state_a), ("b", state_b))]
    # endpoints and midpoint one by one (every analysis shares these exact numbers), the
    # variants batched: they agree with one-by-one evaluation to float32 rounding
    reference, res_mid = _endpoint_reference(ev, state_a, state_b), ev(mid)
    results = ev.many([v for _, v in variants])
    rows = []
    for (meta, _), result in zip(variants, results):
        rows += _rows(meta, result, reference)
        log(f"single layer {meta['layer']} into {meta['into']}: {_barrier_summary(rows[-len(splits):])}")
    rows += _rows({"layer": ALL, "layer_index": -1, "into": "both"}, res_mid, reference)
    log(f"full midpoint loss barrier: {_barrier_summary(rows[-len(splits):])}")
    return pd.DataFrame(rows, columns=["layer", "layer_index", "into", "split", "loss", "error",
                                       "loss_barrier", "error_barrier"])


def cumulative_barriers(model: nn.Module, state_a: dict, state_b: dict, data: Data,
                        splits: Sequence[str] = SPLITS, batch_size: int = 1000, device="cpu",
                        bn: str = "reset", log: Callable[[str], None] = print) -> pd.DataFrame:
    """Barrier of averaging a growing set of layer groups, from the input or the output side.

    order "shallow": step k averages groups 1..k; order "deep": the last k groups. ``layer`` is
    the group added at that step; the other groups come from A (into "a") or B (into "b").
    At step G every group is averaged, which is exactly θ_½ for both `into` values and both
    orders: that evaluation is done once and shared, so the last rows equal the full barrier.
    Evaluations: 2 endpoints + 1 midpoint + 2·2·(G − 1) variants.

    Columns: order, step, layer, into, split, loss, error, loss_barrier, error_barrier.
    """
    ev = _evaluator(model, data, splits, bn, batch_size, device)
    reference = _endpoint_reference(ev, state_a, state_b)
    mid = lerp_state(state_a, state_b, 0.5)
    full = ev(mid)
    groups = layer_groups(model)
    variants = []  # (meta, state or None for θ_½ itself)
    for order, sequence in (("shallow", groups), ("deep", groups[::-1])):
        averaged: list[str] = []
        for step, (name, keys) in enumerate(sequence, start=1):
            averaged += keys
            for into, base in (("a", state_a), ("b", state_b)):
                state = None if step == len(groups) else _splice(base, mid, averaged)
                variants.append(({"order": order, "step": step, "layer": name, "into": into}, state))
    batched = iter(ev.many([st for _, st in variants if st is not None]))
    rows = []
    for meta, state in variants:
        rows += _rows(meta, full if state is None else next(batched), reference)
        log(f"cumulative {meta['order']} step {meta['step']} (+{meta['layer']}) into {meta['into']}: "
            f"{_barrier_summary(rows[-len(splits):])}")
    return pd.DataFrame(rows, columns=["order", "step", "layer", "into", "split", "loss", "error",
                                       "loss_barrier", "error_barrier"])


# ---------------------------------------------------------------------------- layer robustness


def random_direction(state: dict, keys: Sequence[str], norm: float, seed: int) -> dict[str, Tensor]:
    """Gaussian direction over ``keys`` with total (joint) Euclidean norm ``norm``.

    r ~ N(0, I) drawn on the CPU from ``torch.Generator().manual_seed(seed)`` in float64, scaled
    to ``norm`` over all keys together, returned per key in each tensor's dtype and device.
    """
    gen = torch.Generator().manual_seed(int(seed))
    r = {k: torch.randn(state[k].shape, generator=gen, dtype=torch.float64) for k in keys}
    total = torch.sqrt(sum(v.square().sum() for v in r.values()))
    return {k: (v * (norm / total)).to(state[k].dtype).to(state[k].device) for k, v in r.items()}


def _norm(tensors: Iterable[Tensor]) -> float:
    return float(torch.sqrt(sum(t.double().square().sum() for t in tensors)))


def layer_robustness(model: nn.Module, state_a: dict, state_b: dict, data: Data, draws: int = 5,
                     seed: int = 0, steps: Sequence[float] = (0.0, 0.5, 1.0),
                     splits: Sequence[str] = SPLITS, batch_size: int = 1000, device="cpu",
                     bn: str = "reset", log: Callable[[str], None] = print) -> pd.DataFrame:
    """Move one layer of A toward B, or by a random direction of the same length.

    Per group ℓ with d = θ_Bˡ − θ_Aˡ over its floating *parameters* (buffers stay A's; use
    bn="reset" on BatchNorm models):
    - direction "interpolation" (draw 0): group ℓ of A set to lerp(θ_Aˡ, θ_Bˡ, s) = θ_Aˡ + s·d
      (torch.lerp, so s = 1 is exactly B's layer);
    - direction "random", draws 0..draws−1: θ_Aˡ + s·r·‖d‖/‖r‖, r ~ N(0, I) from a generator
      seeded with derive_seed(seed, ℓ, draw) (see :func:`random_direction`).
    Step 0 is θ_A itself for every direction, so A's evaluation is reused there.
    Groups without parameters are skipped.

    Columns: layer, layer_index, direction, draw, step, split, loss, error, norm (= ‖d‖).
    """
    ev = _evaluator(model, data, splits, bn, batch_size, device)
    result_a = ev(state_a)
    rows = []
    for i, (name, keys) in enumerate(layer_groups(model)):
        pkeys = _parameter_keys(model, state_a, keys)
        if not pkeys:
            continue
        norm = _norm(state_b[k] - state_a[k] for k in pkeys)
        moves = [("interpolation", 0, lambda s: {k: torch.lerp(state_a[k], state_b[k], s) for k in pkeys})]
        for draw in range(draws):
            r = random_direction(state_a, pkeys, norm, derive_seed(seed, i, draw))
            moves.append(("random", draw, lambda s, r=r: {k: state_a[k] + s * r[k] for k in pkeys}))
        variants = [({"layer": name, "layer_index": i, "direction": direction, "draw": draw,
                      "step": float(s)}, move(float(s))) for direction, draw, move in moves for s in steps]
        moved = iter(ev.many([{**state_a, **v} for meta, v in variants if meta["step"] != 0]))
        for meta, _ in variants:  # step 0 is θ_A itself: its evaluation is reused
            result = result_a if meta["step"] == 0 else next(moved)
            rows += [{**row, "norm": norm} for row in _rows(meta, result)]
        log(f"robustness {name}: ‖d‖ = {norm:.4f}, {draws} random draws")
    return pd.DataFrame(rows, columns=["layer", "layer_index", "direction", "draw", "step", "split",
                                       "loss", "error", "norm"])


# ----------------------------------------------------------------------- subspace perturbations


def _flat(state: dict, keys: Sequence[str]) -> Tensor:
    """The tensors of ``keys`` as one float64 CPU vector (a real copy)."""
    return torch.cat([state[k].detach().reshape(-1).to("cpu", torch.float64) for k in keys])


def _unflat(vector: Tensor, like: dict, keys: Sequence[str]) -> dict[str, Tensor]:
    """Split a flat vector back into tensors shaped, typed and placed like ``like[keys]``."""
    out, start = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[start:start + n].reshape(like[k].shape).to(like[k].device, like[k].dtype)
        start += n
    return out


def _orthonormal_basis(columns: Tensor, rtol: float = 1e-10) -> Tensor:
    """(P, m) float64 -> (P, r) orthonormal basis of the column span, r ≤ m (reduced QR).

    A column whose |R_ii| is negligible depends on the earlier ones; its Q column is arbitrary
    and is dropped, so the basis spans exactly the columns' span.
    """
    if columns.shape[1] == 0:
        return columns
    q, r = torch.linalg.qr(columns)
    diag = r.diagonal().abs()
    return q[:, diag > rtol * diag.max().clamp_min(torch.finfo(torch.float64).tiny)]


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v)


def perturbation_directions(state_a: dict, state_b: dict, checkpoints: Sequence[dict],
                            keys: Sequence[str], draws: int, seed: int) -> dict[str, list[Tensor]]:
    """Unit directions (float64, flattened over ``keys`` in order) starting from θ_A.

    - "interpolation": (θ_B − θ_A)/‖θ_B − θ_A‖ (one vector);
    - "subspace": Q·g/‖g‖, g ~ N(0, I_r), Q an orthonormal basis (QR in float64) of
      span{c − θ_A : c in checkpoints} (``draws`` vectors; none if the span is {0});
    - "orthogonal": a Gaussian vector with its projection onto that span removed (twice, for
      numerical orthogonality), normalised (``draws`` vectors).
    A direction that does not exist is left out (empty list): "interpolation" when θ_B = θ_A on
    ``keys`` (e.g. untouched BN weights), "subspace" when the span is {0}, "orthogonal" when the
    span is the whole space (a small layer and many checkpoints).
    Memory: the (P, len(checkpoints)) float64 difference matrix and its Q factor.
    """
    theta = _flat(state_a, keys)
    basis = _orthonormal_basis(torch.stack([_flat(c, keys) - theta for c in checkpoints], dim=1)
                               if checkpoints else theta.new_zeros(theta.numel(), 0))
    gen = torch.Generator().manual_seed(int(seed))
    d = _flat(state_b, keys) - theta
    out = {"interpolation": [_unit(d)] if d.any() else [], "subspace": [], "orthogonal": []}
    for _ in range(draws):
        if basis.shape[1] > 0:
            g = torch.randn(basis.shape[1], generator=gen, dtype=torch.float64)
            out["subspace"].append(_unit(basis @ g))
        v = torch.randn(theta.numel(), generator=gen, dtype=torch.float64)
        if basis.shape[1] < theta.numel():
            for _ in range(2):
                v = v - basis @ (basis.T @ v)
            out["orthogonal"].append(_unit(v))
    return out


def subspace_perturbations(model: nn.Module, state_a: dict, checkpoints: Sequence[dict],
                           state_b: dict, data: Data, norms: Sequence[float], draws: int = 3,
                           seed: int = 0, per_layer: bool = False, splits: Sequence[str] = SPLITS,
                           batch_size: int = 1000, device="cpu", bn: str = "reset",
                           log: Callable[[str], None] = print) -> pd.DataFrame:
    """Loss of θ_A + ε·u for unit directions u inside / outside the training subspace.

    ``checkpoints`` are state dicts saved along A's training (real copies of the weights, not
    references to a live model). Directions (see :func:`perturbation_directions`) live on the
    floating *parameters* (buffers stay A's). Scope "(all)" (layer_index −1) uses the whole
    parameter vector; with ``per_layer`` every group ℓ (layer_index ℓ) gets its own directions
    built from its own parameters only, seeded with derive_seed(seed, scope index) where the
    scope index is 0 for the whole network and ℓ + 1 for group ℓ. ε = 0 reuses A's evaluation.

    Columns: layer, layer_index, direction, draw, norm (= ε), split, loss, error.
    """
    ev = _evaluator(model, data, splits, bn, batch_size, device)
    result_a = ev(state_a)
    groups = [(name, _parameter_keys(model, state_a, keys)) for name, keys in layer_groups(model)]
    scopes = [(ALL, -1, [k for _, keys in groups for k in keys])]
    if per_layer:
        scopes += [(name, i, keys) for i, (name, keys) in enumerate(groups) if keys]
    rows = []
    for layer, index, keys in scopes:
        theta = _flat(state_a, keys)
        directions = perturbation_directions(state_a, state_b, checkpoints, keys, draws,
                                             derive_seed(seed, index + 1))
        for direction, vectors in directions.items():
            for draw, u in enumerate(vectors):
                for eps in norms:
                    moved = {**state_a, **_unflat(theta + eps * u, state_a, keys)} if eps else None
                    result = ev(moved) if eps else result_a
                    meta = {"layer": layer, "layer_index": index, "direction": direction,
                            "draw": draw, "norm": float(eps)}
                    rows += _rows(meta, result)
        log(f"subspace perturbations {layer}: {sum(map(len, directions.values()))} directions "
            f"x {len(norms)} norms")
    return pd.DataFrame(rows, columns=["layer", "layer_index", "direction", "draw", "norm", "split",
                                       "loss", "error"])


# ------------------------------------------------------------------------------ deep linear toy


def linear_toy(minimum_a=(2.0, 0.5), minimum_b=(0.5, 2.0), target=1.0,
               alphas: Sequence[float] | None = None) -> pd.DataFrame:
    """Two-layer diagonal linear network f(x) = w2 ⊙ w1 ⊙ x, loss mean((w2 ⊙ w1 − target)²).

    ``minimum_a``/``minimum_b`` are (w1, w2) pairs of scalars or equal-length vectors (one
    entry per dimension). The defaults (2, ½) and (½, 2) are two global minima related by the
    rescaling symmetry w1 → c·w1, w2 → w2/c; on the full path w1·w2 = 1.5625 at α = ½
    (loss ≈ 0.316), a barrier. When only one layer is interpolated the product is linear in α,
    so the loss is a convex quadratic along the path: no barrier.

    Paths on α ∈ ``alphas`` (default linspace(0, 1, 21)), θ_α = α·A + (1−α)·B per interpolated
    layer: "full" (both layers, into "both"); "layer1" (only w1; w2 from A for into "a", from B
    for into "b"); "layer2" (only w2). ``barrier`` is :func:`metrics.barrier` of each path (max
    over the grid of loss minus the chord between the path's own endpoints), repeated per row.

    Columns: path, into, alpha, loss, barrier.
    """
    alphas = np.linspace(0.0, 1.0, 21) if alphas is None else np.asarray(alphas, dtype=np.float64)
    (a1, a2), (b1, b2) = [tuple(np.atleast_1d(np.asarray(w, dtype=np.float64)) for w in m)
                          for m in (minimum_a, minimum_b)]
    target = np.asarray(target, dtype=np.float64)

    def loss(w1, w2):
        return float(np.mean((w2 * w1 - target) ** 2))

    def lerp(x, y, a):
        return a * x + (1.0 - a) * y

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
                                    "barrier": barrier(alphas, losses)}))
    return pd.concat(frames, ignore_index=True)
