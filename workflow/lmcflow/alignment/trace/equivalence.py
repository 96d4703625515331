"""A check that a spec keeps the function: :func:`check_equivalence`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..spec import PermutationSpec, apply_permutation, axis_index
from .slots import EquivalenceError
from .tracer import _as_tuple


def _nontrivial_permutation(spec: PermutationSpec, seed: int) -> dict[str, Tensor]:
    """One random permutation per group (sorted group order), redrawn until it moves a unit."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = {}
    for g, n in sorted(spec.sizes.items()):
        p = torch.randperm(n, generator=gen)
        while n > 1 and torch.equal(p, torch.arange(n)):
            p = torch.randperm(n, generator=gen)
        perm[g] = p
    return perm


def _out_tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _out_tensors(o)]
    return []


def _rel_error(a, b) -> float:
    """max |b - a| / max |a| over the tensors of two outputs of the same structure."""
    ta, tb = _out_tensors(a), _out_tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    err = 0.0
    for x, y in zip(ta, tb):
        if x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        err = max(err, float((y - x).abs().max()) / max(float(x.abs().max()), 1e-12))
    return err


def _axis_groups(spec: PermutationSpec, key: str, axis: int) -> list[tuple[int, Any]]:
    """(size, group, None or segments) of the view axes that make up stored axis ``axis`` of
    ``key``."""
    shape, ax = spec.shapes[key], spec.entries(key)
    view = spec.reshape.get(key, shape)
    j = 0
    for i, n in enumerate(shape):
        span, prod = [], 1
        while j < len(view) and (prod < n or (n == 1 and not span)):
            span.append(j)
            prod *= view[j]
            j += 1
        if i == axis:
            return [(view[k], ax[k]) for k in span]
    return []


def _permute_dim(t: Tensor, dim: int, groups, perm) -> Tensor:
    """``t`` with dim ``dim`` permuted as the factors ``groups`` [(size, group)] say."""
    sizes = [n for n, _ in groups]
    x = t.movedim(dim, -1).unflatten(-1, sizes)
    for i, (_, g) in enumerate(groups):
        index = axis_index(g, perm)
        if index is not None:
            x = x.index_select(x.ndim - len(sizes) + i, index.to(x.device))
    return x.flatten(-len(sizes)).movedim(-1, dim)


def _output_axes(name: str, m: nn.Module, spec: PermutationSpec) -> list[tuple[str, int, int]]:
    """(key, stored axis, usual output dim) of the tensors that define a module's output units."""
    def key(s):
        return f"{name}.{s}" if name else s
    if isinstance(m, nn.MultiheadAttention):
        return [(key("out_proj.weight"), 0, -1)]
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and key("weight") in spec.axes:
        k = len(m.normalized_shape)
        return [(key("weight"), i, i - k) for i in range(k)]
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return [(key("weight"), 1, 1)]
    if isinstance(m, nn.Embedding):
        return [(key("weight"), 1, -1)]
    if isinstance(m, nn.Linear):
        return [(key("weight"), 0, -1)]
    for s in ("weight", "running_mean", "bias"):
        if key(s) in spec.axes and len(spec.shapes[key(s)]) >= 1:
            return [(key(s), 0, 1)]
    return []


def _expected(out: Tensor, name: str, m: nn.Module, spec: PermutationSpec, perm) -> list[Tensor]:
    """Candidate permuted outputs of ``m`` (usual output dim first, then other dims of the
    same size: custom modules such as a channel LayerNorm put units elsewhere)."""
    axes = _output_axes(name, m, spec)
    if not axes:
        return []
    if len(axes) > 1:  # several normalised dims
        for key, axis, dim in axes:
            out = _permute_dim(out, dim % out.ndim, _axis_groups(spec, key, axis), perm)
        return [out]
    key, axis, dim = axes[0]
    groups = _axis_groups(spec, key, axis)
    n = math.prod(s for s, _ in groups)
    dims = [d for d in [dim % out.ndim] + list(range(out.ndim)) if out.shape[d] == n]
    return [_permute_dim(out, d, groups, perm) for d in dict.fromkeys(dims)]


def _module_keys(name: str, m: nn.Module, spec) -> list[str]:
    keys = [f"{name}.{k}" if name else k for k, _ in
            list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))]
    return [k for k in keys if k in spec.axes]


def _suspect(name: str, m: nn.Module, spec: PermutationSpec, group: str | None) -> str:
    """The module's tensor to blame when no single axis fix is found: among its tensors
    along the output units, the odd one out (the group's members outside the module vote
    with those that carry it), else its weight."""
    keys = _module_keys(name, m, spec)
    axes = _output_axes(name, m, spec)
    if not axes:
        return keys[0]
    main = axes[0][0]
    n = math.prod(s for s, _ in _axis_groups(spec, main, axes[0][1]))
    per_unit = [(main, axes[0][1])] + [(k, 0) for k in keys if k != main and spec.shapes[k] == (n,)]
    if group is not None:
        has = [k for k, ax in per_unit if any(_carries(g, group) for _, g in
                                              _axis_groups(spec, k, ax))]
        lacks = [k for k, _ in per_unit if k not in has]
        outside = any(k not in keys and k != main for k, _ in spec.groups[group])
        if has and lacks:
            return lacks[0] if len(has) + outside >= len(lacks) else has[0]
    return main


def _caller(model: nn.Module, inputs: tuple) -> Callable[[dict], Any]:
    """state -> model outputs on ``inputs`` with that state (functional_call), passing one
    key per tied tensor (functional_call refuses two values for one tensor)."""
    first: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        first.setdefault(id(t), key)
    keep = set(first.values())
    return lambda state: functional_call(model, {k: v for k, v in state.items() if k in keep},
                                         inputs)


def _first_disagreement(model, spec, perm, state, inputs, rtol, call):
    """(module name, module, relative error, names of the modules called before it, nearest
    first) for the first module call, in forward order, whose output in the permuted model
    differs from its original output permuted by the groups of its output units."""
    hooked = [(n, m) for n, m in model.named_modules() if _module_keys(n, m, spec)]
    records: list[list] = [[], []]
    run = [0]

    def hook(name):
        def fn(_m, _i, out):
            t = _out_tensors(out)
            if t:
                records[run[0]].append((name, t[0].detach().clone()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in hooked]
    try:
        model(*inputs)
        run[0] = 1
        call(apply_permutation(spec, perm, state))
    finally:
        for h in handles:
            h.remove()
    modules = dict(hooked)
    before: list[str] = []
    for (name, a), (_, b) in zip(*records):
        cands = _expected(a, name, modules[name], spec, perm)
        if cands and min(_rel_error(e, b) for e in cands) > rtol:
            err = min(_rel_error(e, b) for e in cands)
            return name, modules[name], err, list(dict.fromkeys(reversed(before)))
        before.append(name)
    return None


def _carries(entry, group: str) -> bool:
    """Whether an axis entry (group, None or segments) carries ``group``."""
    return entry == group or isinstance(entry, tuple) and any(g == group for g, _ in entry)


def _with_axis(spec: PermutationSpec, key: str, axis: int, group: str | None,
               remove: str | None = None) -> PermutationSpec:
    """``spec`` with view axis ``axis`` of ``key`` set to ``group``; on a segmented axis, the
    stretches of group ``remove`` fixed instead."""
    axes, segments = dict(spec.axes), {k: dict(v) for k, v in spec.segments.items()}
    segs = segments.get(key, {}).get(axis)
    if segs is not None:
        segs = tuple((None if g == remove else g, n) for g, n in segs)
        if all(g is None for g, _ in segs):
            del segments[key][axis]
        else:
            segments[key][axis] = segs
    else:
        axes[key] = tuple(group if i == axis else g for i, g in enumerate(axes[key]))
    return PermutationSpec(axes, spec.shapes, spec.reshape, segments=segments)


def _fix_for_group(spec, group, perm, breaks, near, modules) -> tuple[str, int, str] | None:
    """(key, view axis, "remove" | "add"): one axis whose removal from / addition to
    ``group`` keeps the function when only ``group`` is permuted. Additions are tried on the
    tensors of ``near`` (module names, most suspect first), at most 64 of them."""
    members = spec.groups[group]
    p = {group: perm[group]}
    for key, axis in members:
        if len(members) == 1 or not breaks(_with_axis(spec, key, axis, None, group), p):
            return key, axis, "remove"
    n, tried = spec.sizes[group], 0
    for name in near:
        for key in _module_keys(name, modules[name], spec):
            view = spec.reshape.get(key, spec.shapes[key])
            for axis, size in enumerate(view):
                if (size != n or spec.axes[key][axis] == group or tried >= 64
                        or axis in spec.segments.get(key, {})):
                    continue
                tried += 1
                if not breaks(_with_axis(spec, key, axis, group), p):
                    return key, axis, "add"
    return None


@torch.no_grad()
def check_equivalence(model: nn.Module, spec: PermutationSpec, example_input, seed: int = 0,
                      rtol: float = 1e-4) -> dict:
    """Check that a seeded random permutation applied through ``spec`` keeps the outputs.

    The permutation is drawn per group (sorted order, generator seeded with ``seed``, redrawn
    until it is not the identity), applied with :func:`lmcflow.alignment.spec.apply_permutation`
    and run with ``torch.func.functional_call`` in eval mode on ``example_input``. Outputs
    agree when ``max |out' - out| <= rtol * max |out|`` (every output tensor).

    On failure raises :class:`EquivalenceError` naming the culprit tensor (``.key``):

    1. the group (in ``state_dict`` order of its first tensor) whose permutation alone
       changes the outputs;
    2. with only that group permuted, the first module call in forward order whose output
       differs from its original output permuted by the groups of its output units (a
       Linear's ``weight`` axis 0, a norm's per-channel tensors...);
    3. the axis that, removed from the group or added to it (tried on that module, the
       modules called just before it and its ancestors), makes the function whole again;
       failing that, the module's tensor that disagrees with the others on its output units,
       or its weight.

    Returns ``{"max_rel_error", "groups", "seed"}``.
    """
    inputs = _as_tuple(example_input)
    state = model.state_dict()
    spec.check_state(state)
    perm = _nontrivial_permutation(spec, seed)
    call = _caller(model, inputs)
    was_training = model.training
    model.eval()
    try:
        ref = model(*inputs)

        def breaks(sub_spec, sub_perm) -> bool:
            return _rel_error(ref, call(apply_permutation(sub_spec, sub_perm, state))) > rtol

        err = _rel_error(ref, call(apply_permutation(spec, perm, state)))
        if err <= rtol:
            return {"max_rel_error": err, "groups": len(perm), "seed": int(seed)}
        order = {k: i for i, k in enumerate(state)}
        groups = sorted(spec.groups, key=lambda g: min(order[k] for k, _ in spec.groups[g]))
        group = next((g for g in groups if breaks(spec, {g: perm[g]})), None)
        found = _first_disagreement(model, spec, {group: perm[group]} if group else perm,
                                    state, inputs, rtol, call)
        fix = None
        if group is not None:
            modules = dict(model.named_modules())
            owners = [n for n, m in modules.items() if _module_keys(n, m, spec)]
            if found:  # M, the modules called just before it, then its ancestors (they own
                # tensors used directly in their forward, e.g. a position embedding)
                near = [found[0]] + found[3][:8] + [
                    n for n in owners if n == "" or found[0].startswith(n + ".")][::-1]
            else:
                near = owners
            fix = _fix_for_group(spec, group, perm, breaks, near, modules)
    finally:
        model.train(was_training)
    head = (f"permuting {type(model).__name__} by the spec changes its outputs (max relative "
            f"error {err:.3g} > rtol {rtol:g})")
    if group is not None:
        entries = ", ".join(f"{k}[{a}]" for k, a in spec.groups[group][:6])
        more = ", ..." if len(spec.groups[group]) > 6 else ""
        head += f"; group {group} alone breaks it ({entries}{more})"
    where = f"; first disagreement at module '{found[0]}' (relative error {found[2]:.3g})" \
        if found else ""
    if fix is not None:
        key, axis, how = fix
        what = (f"{key} axis {axis} should not be permuted by {group}" if how == "remove" else
                f"{key} axis {axis} misses {group}")
        raise EquivalenceError(f"{head}{where}: {what} (the function is kept with that change)",
                               key=key, module=found[0] if found else None, group=group,
                               error=err)
    if found is not None:
        key = _suspect(found[0], found[1], spec, group)
        raise EquivalenceError(f"{head}{where}: check {key}", key=key, module=found[0],
                               group=group, error=err)
    key = spec.groups[group][0][0] if group else next(iter(spec.cost_keys), None)
    raise EquivalenceError(f"{head}; no module output pins it down: check {key}", key=key,
                           module=None, group=group, error=err)
