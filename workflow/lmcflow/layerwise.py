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

__all__ = ["layer_groups", "mix_state", "single_layer_barriers", "layer_orders", "cumulative_barriers",
           "random_direction", "layer_robustness", "training_subspace",
           "perturbation_directions", "subspace_perturbations", "ALL"]

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

    Coarser groups: a model listing module names in ``lmcflow_layer_groups`` (the config's
    ``model.layer_groups``) or ``layer_group_modules()`` (the built-in ViT: one group per block)
    gets one group per listed module, holding every key of its subtree; keys outside them keep
    their per-module groups.
    """
    merged = list(getattr(model, "lmcflow_layer_groups", None) or
                  (model.layer_group_modules() if hasattr(model, "layer_group_modules") else []))
    groups: dict[str, list[str]] = {}
    for key in model.state_dict():
        owner = key.rpartition(".")[0]  # parameter and buffer names contain no dots
        owner = next((m for m in merged if owner == m or owner.startswith(m + ".")), owner)
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


def layer_orders(groups: Sequence, random_orders: int = 0, seed: int = 0) -> dict[str, list]:
    """The orders in which cumulative barriers add layer groups: "shallow" (input first),
    "deep" (output first) and ``random_orders`` seeded random ones, "random1", "random2", …
    (order k drawn with derive_seed(seed, 111, k); the official code's random order uses 111)."""
    orders = {"shallow": list(groups), "deep": list(groups)[::-1]}
    for k in range(1, random_orders + 1):
        gen = torch.Generator().manual_seed(derive_seed(seed, 111, k))
        orders[f"random{k}"] = [groups[i] for i in torch.randperm(len(groups), generator=gen).tolist()]
    return orders


def cumulative_barriers(model: nn.Module, state_a: dict, state_b: dict, data: Data,
                        splits: Sequence[str] = SPLITS, batch_size: int = 1000, device="cpu",
                        bn: str = "reset", random_orders: int = 0, seed: int = 0,
                        log: Callable[[str], None] = print) -> pd.DataFrame:
    """Barrier of averaging a growing set of layer groups, in the orders of :func:`layer_orders`.

    order "shallow": step k averages groups 1..k; order "deep": the last k groups; "random{k}":
    the first k of a seeded random order. ``layer`` is the group added at that step; the other
    groups come from A (into "a") or B (into "b"). At step G every group is averaged, which is
    exactly θ_½ for both `into` values and every order: that evaluation is done once and
    shared, so the last rows equal the full barrier.
    Evaluations: 2 endpoints + 1 midpoint + 2·(number of orders)·(G − 1) variants.

    Columns: order, step, layer, into, split, loss, error, loss_barrier, error_barrier.
    """
    ev = _evaluator(model, data, splits, bn, batch_size, device)
    reference = _endpoint_reference(ev, state_a, state_b)
    mid = lerp_state(state_a, state_b, 0.5)
    full = ev(mid)
    groups = layer_groups(model)
    variants = []  # (meta, state or None for θ_½ itself)
    for order, sequence in layer_orders(groups, random_orders, seed).items():
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


def training_subspace(states: Sequence[dict], keys: Sequence[str]) -> Tensor:
    """Orthonormal basis (P, r), float64, of span{θ : θ in ``states``} over ``keys``.

    As in the official notebook (``orth`` of the weight vectors of both networks along training),
    the span is that of the raw weight vectors, not of differences; give it the kept weights of
    both networks and both endpoints, so that it contains θ_A − θ_B. Repeated or dependent
    vectors (a spawned pair shares its parent's checkpoints) add no dimension.
    Memory: the (P, len(states)) float64 matrix and its Q factor.
    """
    return _orthonormal_basis(torch.stack([_flat(s, keys) for s in states], dim=1))


def perturbation_directions(state_from: dict, state_other: dict, basis: Tensor,
                            keys: Sequence[str], draws: int, seed: int) -> dict[str, list[Tensor]]:
    """Unit directions (float64, flattened over ``keys`` in order) for perturbing ``state_from``.

    - "interpolation": (θ_from − θ_other)/‖θ_from − θ_other‖, the line through both networks,
      pointing *away from* the other one (the official code moves each endpoint this way, so
      that a step of norm ‖θ_A − θ_B‖ does not just retrace the LMC path);
    - "subspace": Q·g/‖Q·g‖ with g ~ N(0, I_r), Q = ``basis`` (``draws`` vectors; none if r = 0):
      a direction uniform on the unit sphere of the training subspace, whatever basis Q is;
    - "orthogonal": g ~ N(0, I_P) with its projection onto the subspace removed (twice, for
      numerical orthogonality), normalised: uniform on the sphere of the orthogonal complement
      (``draws`` vectors; none if the subspace is the whole space).
    A direction that does not exist is left out (empty list), e.g. "interpolation" when the two
    networks agree on ``keys``. Draws come from a CPU generator seeded with ``seed``.
    """
    theta = _flat(state_from, keys)
    gen = torch.Generator().manual_seed(int(seed))
    d = theta - _flat(state_other, keys)
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


def subspace_perturbations(model: nn.Module, state_a: dict, state_b: dict,
                           along_training: Sequence[dict], data: Data, norms: Sequence[float],
                           draws: int = 3, seed: int = 0, per_layer: bool = False,
                           splits: Sequence[str] = SPLITS, batch_size: int = 1000, device="cpu",
                           bn: str = "reset", log: Callable[[str], None] = print) -> pd.DataFrame:
    """Loss of θ_e + ε·u for each endpoint e ∈ {A, B} and unit directions u along the
    interpolation line (away from the other endpoint), inside the training subspace and
    orthogonal to it (see :func:`perturbation_directions`).

    The training subspace is spanned by ``along_training`` (the weights kept along training of
    *both* networks, B's aligned like B; real copies, not views of a live model) plus θ_A and
    θ_B (:func:`training_subspace`). Directions live on the floating *parameters* (buffers
    stay the endpoint's). Scope "(all)" (layer_index −1) uses the whole parameter vector; with
    ``per_layer`` every group ℓ (layer_index ℓ) gets its own subspace and directions from its
    own parameters. Draws are seeded with derive_seed(seed, scope, endpoint) where scope is 0
    for the whole network and ℓ + 1 for group ℓ, endpoint 0 for A and 1 for B. ε = 0 reuses
    the endpoint's evaluation.

    Columns: layer, layer_index, endpoint (a or b), direction, draw, norm (= ε), split, loss,
    error.
    """
    ev = _evaluator(model, data, splits, bn, batch_size, device)
    endpoints = {"a": (state_a, state_b), "b": (state_b, state_a)}
    at_endpoint = {e: ev(states[0]) for e, states in endpoints.items()}
    groups = [(name, _parameter_keys(model, state_a, keys)) for name, keys in layer_groups(model)]
    scopes = [(ALL, -1, [k for _, keys in groups for k in keys])]
    if per_layer:
        scopes += [(name, i, keys) for i, (name, keys) in enumerate(groups) if keys]
    rows = []
    for layer, index, keys in scopes:
        basis = training_subspace([*along_training, state_a, state_b], keys)
        for e, (state, other) in endpoints.items():
            directions = perturbation_directions(state, other, basis, keys, draws,
                                                 derive_seed(seed, index + 1, "ab".index(e)))
            theta = _flat(state, keys)
            variants = [({"layer": layer, "layer_index": index, "endpoint": e, "direction": direction,
                          "draw": draw, "norm": float(eps)}, theta + eps * u)
                        for direction, vectors in directions.items()
                        for draw, u in enumerate(vectors) for eps in norms]
            moved = iter(ev.many([{**state, **_unflat(v, state, keys)}
                                  for meta, v in variants if meta["norm"] != 0]))
            for meta, _ in variants:
                rows += _rows(meta, at_endpoint[e] if meta["norm"] == 0 else next(moved))
        log(f"subspace perturbations {layer}: subspace of dimension {basis.shape[1]}, "
            f"{sum(map(len, directions.values()))} directions x {len(norms)} norms per endpoint")
    return pd.DataFrame(rows, columns=["layer", "layer_index", "endpoint", "direction", "draw",
                                       "norm", "split", "loss", "error"])
