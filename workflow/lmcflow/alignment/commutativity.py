"""Commutativity matching: the permutation of B that minimises the LLFC commutativity residual.

LLFC holds where every layer ℓ commutes with interpolation, i.e. where
``(W_A − W_B)(H_A − H_B)`` is small (Zhou et al. 2023, §5; the Dist_com of
:mod:`lmcflow.mechanisms`). Weight matching shrinks the first factor, activation matching the
second; this method minimises the product over the permutation π of B:

    J(π) = Σ_ℓ ‖(W_A⁽ˡ⁾ − P_ℓ W_B⁽ˡ⁾ Q_ℓᵀ)(H_A⁽ˡ⁾ − Q_ℓ H_B⁽ˡ⁾)‖²_F

over every Linear/Conv2d module ℓ called once per forward pass whose weight is in the spec
(the modules Dist_com reads): W its weight as a matrix (out, in) (a conv's (o, C·kh·kw)),
H⁽ˡ⁾ the columns of its input on a seeded subset of training images (a conv's input
unfolded: one column per output position), P_ℓ / Q_ℓ the permutations π puts on its output /
input axes. Biases cancel in ``W_A H_A + W_B H_B − (W_A H_B + W_B H_A)`` and are left out, as
in Dist_com; so is a BatchNorm's affine after a conv (W is the conv weight alone, H the
layer's real input, which has been through the BN): the residual is exactly what Dist_com
measures, in the same layers.

Streaming: the objective only needs, per layer, the second moments Σ_AA = H_A H_Aᵀ,
Σ_AB = H_A H_Bᵀ and Σ_BB = H_B H_Bᵀ (d × d, d = the layer's input size), accumulated in
float64 batch by batch (one layer's unfolded input of one batch at a time); then
``J_ℓ = tr(V S Vᵀ)`` with ``V = W_A − W_B'`` and ``S = Σ_AA − Σ_AB' − Σ_AB'ᵀ + Σ_BB'``
(primes: B's current permutation applied).

Coordinate descent over groups: for group g with the others fixed, write π_g ← π_g ∘ R. Where
g permutes a layer's output rows, J_ℓ is linear in R (a row permutation keeps ‖R W_B' X‖):
``J_ℓ = const − 2⟨R, (W_A S)·W_B'ᵀ⟩``. Where g permutes a layer's input, J_ℓ is quadratic
in R (it moves W_B' and H_B' together); its linearisation at R = I has gradient
``−2[W_Aᵀ V (Σ_AB' − Σ_BB') + (Σ_AA − Σ_AB') Vᵀ W_B']`` (summed over the input's other
factors, e.g. the kernel taps). The linearisation alone overshoots far from a minimum, so a
proximal term makes it a majoriser: with E = V X affine in R̃ (R̃ = R on the input's units),
``‖W_A Δ H_B'‖² + ‖W_B' Δᵀ H_A‖²`` (Δ = R̃ − I) bounds the quadratic part and is at most
``‖W_A‖₂² ‖Δ H_B'‖² + ‖W_B'‖₂² ‖Δᵀ H_A‖²``, which on permutations is linear in R
(``‖(R̃ − I) H‖² = 2‖H‖² − 2⟨R̃, H Hᵀ⟩``); hence ``⟨G + λ·prox, R⟩`` with
``prox = −4(‖W_A‖₂² Σ_BB' + ‖W_B'‖₂² Σ_AA)`` (block sums) bounds J from above for λ = 1
and equals it at R = I, so its assignment never increases J (majorisation-minimisation).
Each step solves the assignment for λ in ``steps_prox`` (default 0, 1/16, 1/4, 1: from the
plain linearisation to the majoriser) and keeps the candidate with the lowest J, recomputed
exactly in float64 from the moments over the layers g touches, if it is lower than now. When
none is, the λ = 0 step is retried one cycle at a time (cycles in the order of their linear
gain, at most ``max_cycles``, each kept only if J decreases). Groups are visited in a seeded
random order; a group is tried again only after a group sharing a layer with it changed (or
it changed itself: its linear model moved); stop after a sweep without a kept step. J never
increases.

Where it fails: this is a local search on a product objective. A planted permutation (B a
permuted copy of A, J = 0 at the truth) is recovered from the identity on a ResNet-20 and on
an 8-wide MLP, but not on 16- or 32-wide MLPs (tests and report of issue 20): there an
upstream group that is right makes X = 0 and silences the exactly linear output side of the
next layer, leaving only the quadratic input side, and the classifier sees the last group only
through its rank (the number of classes). The pair methods start from weight or activation
matching instead, and the descent lowers J from there.

Groups on no objective layer (a traced spec's attention-head factors inside a fused
projection, or a layer the moments cannot be read from: called more than once, a grouped
conv, string padding) keep the start permutation, listed in ``info["unmatched"]``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import sample_order
from ..features import capture
from ..models import modules_called_once
from .assignment import solve
from .spec import PermutationSpec, _permute

__all__ = ["commutativity_matching", "layer_rows"]

_UNFOLD_ELEMENTS = 1 << 24  # at most this many elements of one unfolded input at a time


@dataclass
class _Layer:
    """One objective layer: weight key, its view's axes and shapes, both weights as float64
    ``(o, d)`` matrices (B in its original unit order), the input moments ``(d, d)``."""

    module: str
    key: str
    axes: tuple
    split: int  # view axes [:split] index the output, [split:] the input
    out_view: tuple[int, ...]
    in_view: tuple[int, ...]
    wa: Tensor
    wb: Tensor
    saa: Tensor
    sab: Tensor
    sbb: Tensor
    norm_a: float = 0.0  # ‖W_A‖₂², ‖W_B‖₂² (spectral norms, for the majoriser)
    norm_b: float = 0.0

    @property
    def groups(self) -> set[str]:
        return {g for g in self.axes if g is not None}


def layer_rows(module: nn.Module, h: Tensor) -> Tensor:
    """The input ``h`` of a Linear/Conv2d as the rows its weight matrix multiplies: Linear
    ``(..., in) -> (N, in)``; Conv2d ``(B, C, H, W) -> (B*L, C*kh*kw)`` (F.unfold with the
    conv's stride, padding and dilation: row b*L + l is output position l of sample b, its
    columns in the order of ``weight.reshape(o, -1)``)."""
    if isinstance(module, nn.Linear):
        return h.reshape(-1, h.shape[-1])
    cols = F.unfold(h, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride)  # (B, C*kh*kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _readable(module: nn.Module) -> str | None:
    """Why the moments of ``module``'s input cannot be read as :func:`layer_rows` does, or
    None."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "a grouped conv"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding {module.padding!r}"
        if module.padding_mode != "zeros":
            return f"padding_mode {module.padding_mode!r}"
    return None


def _objective_layers(model: nn.Module, spec: PermutationSpec, log) -> tuple[list, list]:
    """(module, key, split) of the layers in the objective, and (module, reason) of the Linear
    / Conv2d modules left out."""
    modules = dict(model.named_modules())
    layers, skipped = [], []
    for name in modules_called_once(model, (nn.Linear, nn.Conv2d)):
        key = f"{name}.weight" if name else "weight"
        module = modules[name]
        reason = _readable(module)
        if key not in spec.cost_keys:
            reason = reason or "its weight is not permuted by the spec"
        if reason is None:
            view = spec.reshape.get(key, spec.shapes[key])
            outs = [m for m in range(1, len(view)) if math.prod(view[:m]) == module.weight.shape[0]]
            if not outs:
                reason = f"its view {view} does not split into output and input"
        if reason is not None:
            skipped.append((name, reason))
            continue
        layers.append((name, key, outs[0]))
    if skipped and log:
        log("commutativity matching: left out " + ", ".join(f"{n} ({r})" for n, r in skipped))
    return layers, skipped


@torch.no_grad()
def _moments(model_a, model_b, spec, layers, x_all, normalize, batch_size, device, log
             ) -> list[_Layer]:
    """Both weights and the float64 input moments of every layer, one batch at a time."""
    mods = dict(model_a.named_modules())
    out = []
    for name, key, split in layers:
        view = spec.reshape.get(key, spec.shapes[key])
        d = math.prod(view[split:])
        z = lambda: torch.zeros(d, d, dtype=torch.float64, device=device)  # noqa: E731
        wa = model_a.state_dict()[key].to(device, torch.float64).reshape(-1, d)
        wb = model_b.state_dict()[key].to(device, torch.float64).reshape(-1, d)
        out.append(_Layer(name, key, spec.axes[key], split, tuple(view[:split]),
                          tuple(view[split:]), wa, wb, z(), z(), z(),
                          float(torch.linalg.matrix_norm(wa, ord=2)) ** 2,
                          float(torch.linalg.matrix_norm(wb, ord=2)) ** 2))
    names = [layer.module for layer in out]
    for i, start in enumerate(range(0, len(x_all), batch_size), start=1):
        x = normalize(x_all[start:start + batch_size].to(device))
        with capture(model_a, names, inputs=True) as h_a:
            model_a(x)
        with capture(model_b, names, inputs=True) as h_b:
            model_b(x)
        for layer in out:
            module, ha, hb = mods[layer.module], h_a.pop(layer.module), h_b.pop(layer.module)
            per_sample = max(1, ha[:1].numel() * math.prod(getattr(module, "kernel_size", (1,))))
            step = max(1, _UNFOLD_ELEMENTS // per_sample)
            for s in range(0, len(ha), step):  # a chunk of samples unfolded at a time
                ra = layer_rows(module, ha[s:s + step]).double()
                rb = layer_rows(module, hb[s:s + step]).double()
                layer.saa.addmm_(ra.T, ra)
                layer.sab.addmm_(ra.T, rb)
                layer.sbb.addmm_(rb.T, rb)
        if log:
            log(f"commutativity matching: moments of batch {i}, "
                f"{min(start + batch_size, len(x_all))}/{len(x_all)} samples")
    return out


def _in_index(layer: _Layer, perm: Mapping[str, Tensor]) -> Tensor:
    """Flat input index of B' (π(B)): input unit u of B' is input unit idx[u] of B."""
    d = math.prod(layer.in_view)
    grid = torch.arange(d, device=layer.wa.device).reshape(layer.in_view)
    return _permute(grid, layer.axes[layer.split:], perm).reshape(-1)


def _primed(layer: _Layer, perm: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """W_B', Σ_AB', Σ_BB' under ``perm``."""
    view = layer.out_view + layer.in_view
    wb = _permute(layer.wb.reshape(view), layer.axes, perm).reshape(layer.wb.shape)
    idx = _in_index(layer, perm)
    sab = layer.sab.index_select(1, idx)
    sbb = layer.sbb.index_select(0, idx).index_select(1, idx)
    return wb, sab, sbb


def _layer_objective(layer: _Layer, perm: Mapping[str, Tensor]) -> float:
    """``‖(W_A − W_B')(H_A − H_B')‖²`` = tr(V S Vᵀ), from the moments, in float64."""
    wb, sab, sbb = _primed(layer, perm)
    v = layer.wa - wb
    s = layer.saa - sab - sab.T + sbb
    return float(((v @ s) * v).sum())


def _pair(u: Tensor, w: Tensor, view: tuple[int, ...], axis: int) -> Tensor:
    """``G[c, c'] = Σ_r Σ_rest u[r, (.., c, ..)] w[r, (.., c', ..)]``: u, w ``(R, prod(view))``,
    c indexing ``view[axis]``, rest the other axes of ``view`` (equal in both)."""
    n = view[axis]
    u = u.reshape(-1, *view).movedim(axis + 1, 0).reshape(n, -1)
    w = w.reshape(-1, *view).movedim(axis + 1, 0).reshape(n, -1)
    return u @ w.T


def _diag_blocks(m: Tensor, view: tuple[int, ...], axis: int) -> Tensor:
    """``G[c, c'] = Σ_rest m[(.., c, ..), (.., c', ..)]`` for a square ``m`` over ``view``."""
    n = view[axis]
    m = m.reshape(*view, *view).movedim((axis, len(view) + axis), (0, len(view)))
    rest = math.prod(view) // n
    return m.reshape(n, rest, n, rest).diagonal(dim1=1, dim2=3).sum(-1)


def _gradient(layer: _Layer, perm: Mapping[str, Tensor], group: str) -> tuple[Tensor, Tensor]:
    """Linear model of J_ℓ in a relative permutation R of ``group`` (n × n each): the
    gradient at R = I (exact linear coefficients on output axes, the linearisation on input
    axes) and, on input axes, the proximal term of a majoriser (see :func:`commutativity_matching`);
    ``⟨gradient + prox, R⟩`` plus a constant bounds J_ℓ from above on permutations and equals
    it at R = I."""
    wb, sab, sbb = _primed(layer, perm)
    v = layer.wa - wb
    n = perm[group].numel()
    grad = torch.zeros(n, n, dtype=torch.float64, device=layer.wa.device)
    prox = torch.zeros_like(grad)
    for axis, g in enumerate(layer.axes):
        if g != group:
            continue
        if axis < layer.split:  # rows: J = const − 2⟨R, W_A S W_B'ᵀ⟩
            s = layer.saa - sab - sab.T + sbb
            grad -= 2 * _pair((layer.wa @ s).T, wb.T, layer.out_view, axis)
        else:  # inputs: −2[W_Aᵀ V (Σ_AB' − Σ_BB') + (Σ_AA − Σ_AB') Vᵀ W_B'], block sums
            a = axis - layer.split
            z = v @ (sab - sbb)
            yt = v @ (layer.saa - sab.T)
            grad -= 2 * (_pair(layer.wa, z, layer.in_view, a) + _pair(yt, wb, layer.in_view, a))
            prox -= 4 * (layer.norm_a * _diag_blocks(sbb, layer.in_view, a)
                         + layer.norm_b * _diag_blocks(layer.saa, layer.in_view, a))
    return grad, prox


def _cycles(r: np.ndarray) -> list[np.ndarray]:
    """The non-trivial cycles of the permutation ``r`` (positions i with r[i] != i)."""
    seen, cycles = np.zeros(len(r), dtype=bool), []
    for i in np.flatnonzero(r != np.arange(len(r))):
        if seen[i]:
            continue
        cycle, j = [], i
        while not seen[j]:
            seen[j] = True
            cycle.append(j)
            j = r[j]
        cycles.append(np.array(cycle))
    return cycles


@torch.no_grad()
def commutativity_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, data,
                           num_batches: int, batch_size: int,
                           start: Mapping[str, Tensor] | None = None, max_sweeps: int = 100,
                           seed: int = 0, max_cycles: int = 8,
                           steps_prox: tuple[float, ...] = (0.0, 0.0625, 0.25, 1.0), device="cpu",
                           log: Callable[[str], None] | None = None
                           ) -> tuple[dict[str, Tensor], dict]:
    """Permutation of B minimising the commutativity residual J (module docstring).

    The moments are read with both models in eval mode (BN with running stats; modes restored
    afterwards) on ``num_batches * batch_size`` training images in the seeded order
    ``data.sample_order(n, seed)``, normalised with ``data.normalize``. ``start`` (default:
    the identity) is the permutation the descent starts from (weight or activation matching in
    the pair methods); ``seed`` also orders the groups of each sweep. ``steps_prox``: the
    weights λ of the proximal term tried at each step (1 = the majoriser); a step none of
    whose candidates lowers J is retried cycle by cycle, at most ``max_cycles`` cycles.
    With ``max_sweeps=0`` it only evaluates J at ``start`` (``info["objective"]``).

    Returns ``(perm, info)`` with perm as :func:`weight_matching` (``apply_permutation(spec,
    perm, state_b)`` is the aligned B) and ``info = {"objective": final J, "start_objective": J
    at ``start``, "sweeps", "history": J at the start and after each sweep, "steps": kept
    steps (whole assignments / single cycles), "rejected": steps none of whose candidates
    decreased J,
    "layers": objective layers, "skipped": left-out modules with reasons, "unmatched": groups
    on no objective layer, "per_layer": final J per layer, "samples", "seconds",
    "seconds_moments"}``.
    """
    tic = time.perf_counter()
    spec.check_state(model_a.state_dict())
    spec.check_state(model_b.state_dict())
    perm = {g: torch.arange(n) for g, n in sorted(spec.sizes.items())}
    if start is not None:
        unknown = sorted(set(start) - set(perm))
        if unknown:
            raise ValueError(f"start permutation has groups not in the spec: {unknown}")
        perm |= {g: torch.as_tensor(p).long().cpu() for g, p in start.items()}
    order = sample_order(len(data.train_x), seed)[: int(num_batches) * int(batch_size)]
    x_all = data.train_x[order.to(data.train_x.device)]
    if len(x_all) == 0:
        raise ValueError("no training samples (num_batches * batch_size == 0)")
    modes = (model_a.training, model_b.training)
    model_a.to(device).eval()
    model_b.to(device).eval()
    try:
        specs, skipped = _objective_layers(model_a, spec, log)
        layers = _moments(model_a, model_b, spec, specs, x_all, data.normalize, int(batch_size),
                          device, log)
    finally:
        model_a.train(modes[0])
        model_b.train(modes[1])
    if not layers:
        raise ValueError("no Linear/Conv2d layer of the model can enter the objective")
    seconds_moments = time.perf_counter() - tic
    touching = {g: [i for i, layer in enumerate(layers) if g in layer.groups] for g in perm}
    names = sorted(g for g, ls in touching.items() if ls)
    unmatched = sorted(set(perm) - set(names))
    if unmatched and log:
        log(f"commutativity matching: {unmatched} on no objective layer; they keep the start")
    dev = {g: p.to(device) for g, p in perm.items()}
    per_layer = [_layer_objective(layer, dev) for layer in layers]
    history = [sum(per_layer)]
    if log:
        log(f"commutativity matching: {len(layers)} layers, {len(names)} groups, start "
            f"objective {history[0]:.6g}")
    gen = torch.Generator().manual_seed(int(seed))
    dirty, steps, rejected, sweeps = set(names), {"full": 0, "cycle": 0}, 0, 0

    def trial(group: str, candidate: Tensor) -> tuple[float, list[float]] | None:
        """J over the layers of ``group`` with ``candidate``, if it decreases."""
        trial_perm = dict(dev, **{group: candidate})
        new = [_layer_objective(layers[i], trial_perm) for i in touching[group]]
        old = sum(per_layer[i] for i in touching[group])
        return (sum(new), new) if sum(new) < old - 1e-12 * abs(old) else None

    def keep(group: str, candidate: Tensor, new: list[float]) -> None:
        dev[group] = candidate
        for i, value in zip(touching[group], new):
            per_layer[i] = value
        for i in touching[group]:
            dirty.update(layers[i].groups)

    for sweeps in range(1, int(max_sweeps) + 1):
        changed = 0
        for gi in torch.randperm(len(names), generator=gen).tolist():
            group = names[gi]
            if group not in dirty:
                continue
            dirty.discard(group)
            grad, prox = (sum(t) for t in zip(*(_gradient(layers[i], dev, group)
                                                 for i in touching[group])))
            current, best, c, r = dev[group], None, None, None
            tried = set()
            for weight in steps_prox:  # 0: the linearisation; 1: the majoriser (never worse)
                cc = (grad + weight * prox).cpu().numpy()
                rr = solve(cc, maximize=False)
                if not cc[np.arange(len(rr)), rr].sum() < np.trace(cc):  # no predicted decrease
                    continue
                if c is None:
                    c, r = cc, rr
                if tuple(rr) in tried:
                    continue
                tried.add(tuple(rr))
                candidate = current[torch.from_numpy(rr).to(device)]
                found = trial(group, candidate)
                if found is not None and (best is None or found[0] < best[1][0]):
                    best = (candidate, found)
            if c is None:
                continue
            if best is not None:
                keep(group, best[0], best[1][1])
                steps["full"] += 1
                changed += 1
                continue
            diag = np.diag(c)
            rejected += 1
            # retry one cycle of R at a time, largest linear gain (decrease) first
            gains = [(float(c[cy, r[cy]].sum() - diag[cy].sum()), i, cy)
                     for i, cy in enumerate(_cycles(r))]
            cycles = [cy for gain, _, cy in sorted(gains) if gain < 0]
            for cycle in cycles[:int(max_cycles)]:
                step = np.arange(len(r))
                step[cycle] = r[cycle]
                candidate = dev[group][torch.from_numpy(step).to(device)]
                kept = trial(group, candidate)
                if kept is not None:
                    keep(group, candidate, kept[1])
                    steps["cycle"] += 1
                    changed += 1
        history.append(sum(per_layer))
        if log:
            log(f"commutativity matching sweep {sweeps}: objective {history[-1]:.6g}, "
                f"{changed} steps kept")
        if not changed:
            break
    final = {g: p.cpu() for g, p in dev.items()}
    info = {"objective": history[-1], "start_objective": history[0], "sweeps": sweeps,
            "history": history, "steps": steps, "rejected": rejected,
            "layers": [layer.module for layer in layers], "skipped": skipped,
            "unmatched": unmatched,
            "per_layer": {layer.module: v for layer, v in zip(layers, per_layer)},
            "samples": int(len(x_all)), "seconds": time.perf_counter() - tic,
            "seconds_moments": seconds_moments}
    return final, info
