"""The permutation spec type and permutations (Git Re-Basin, Ainsworth et al. 2023).

Hidden units of a network can be permuted without changing its function, provided every
tensor that touches a unit is permuted consistently. A :class:`PermutationSpec` describes
which axes of which tensors move together: for every ``state_dict`` key (parameters *and*
buffers) one entry per tensor axis, the name of the permutation group acting on that axis or
``None``. Specs come from the hand-written builders (:mod:`.builders`) or the tracer
(:mod:`.trace`); the matching methods (:mod:`.weight`, :mod:`.activation`) only read them.

Conventions (PyTorch layouts): Linear weight ``(out, in)``, Conv2d weight
``(out, in, kh, kw)``, BatchNorm/GroupNorm weight, bias and running stats ``(C,)``,
``num_batches_tracked`` a scalar (no axis, never permuted). A tensor whose axis mixes a
channel with other dimensions (the classifier after ``flatten`` of a ``C x H x W`` map,
input index ``c*H*W + hw``) is listed with a *view shape* in ``spec.reshape``
(``(num_classes, C, H*W)``); its axes refer to that view.

A view axis may also be a concatenation of several groups' units (``torch.cat`` of two branches
along the channels, read by one conv): ``spec.segments[key][axis]`` lists its stretches in order,
``((group or None, length), ...)`` (None: a fixed stretch), and ``axes[key][axis]`` is None.
Permuting it permutes every stretch by its own group (a block-diagonal permutation of the axis).

A permutation is ``{group: LongTensor (n,)}``; applying it sets, along every axis of the
group, ``new[i] = old[perm[i]]`` (``index_select``). :func:`weight_matching` and
:func:`activation_matching` return the permutation of B that aligns B to A, i.e.
``apply_permutation(spec, perm, state_b)`` is the aligned B (equal to A when B is a permuted
copy of A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

__all__ = ["PermutationSpec", "Axes", "Segments", "NON_COST_SUFFIXES", "apply_permutation",
           "axis_index", "identity_permutation", "random_permutation", "invert_permutation"]

# Buffers that are permuted with their channels but carry no signal for weight matching.
NON_COST_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

Axes = tuple[str | None, ...]
# the stretches of a concatenated axis, in order: (group or None = fixed, length)
Segments = tuple[tuple[str | None, int], ...]


@dataclass(frozen=True)
class PermutationSpec:
    """Which permutation group acts on which axis of which ``state_dict`` tensor.

    * ``axes``: key -> one entry per axis of the tensor's (view) shape, a group name or None;
    * ``shapes``: key -> the tensor's shape as stored in the state dict;
    * ``reshape``: key -> view shape for tensors whose axes are listed on a view (e.g. a
      classifier after flatten, ``(num_classes, C, H*W)``); the view must hold the same
      number of elements;
    * ``features``: group -> module names (keys of ``named_modules()``) whose outputs
      ``(B, n, ...)`` carry the group's units on dim 1 (used by activation matching; the
      samples of several modules are pooled as extra observations);
    * ``feature_dims``: module -> the dim of its output that carries the units, where it is not
      1: -1 for token tensors ``(B, T, n)`` of transformers;
    * ``segments``: key -> {view axis: ((group or None, length), ...)} for axes that are a
      concatenation of stretches (lengths sum to the axis size; None = a fixed stretch; at least
      one group); such an axis has None in ``axes``. Specs without concatenations leave it empty.

    Derived: ``sizes`` (group -> n), ``groups`` (group -> [(key, axis), ...] in key order; a
    segmented axis is listed once per group of its stretches: see :meth:`entries`)
    and ``cost_keys`` (keys with at least one group, minus BN running stats and
    ``num_batches_tracked``, which are permuted but do not enter weight-matching costs).
    """

    axes: Mapping[str, Axes]
    shapes: Mapping[str, tuple[int, ...]]
    reshape: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    feature_dims: Mapping[str, int] = field(default_factory=dict)
    segments: Mapping[str, Mapping[int, Segments]] = field(default_factory=dict)
    sizes: dict[str, int] = field(init=False, repr=False, compare=False)
    groups: dict[str, list[tuple[str, int]]] = field(init=False, repr=False, compare=False)
    cost_keys: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        axes = {k: tuple(v) for k, v in self.axes.items()}
        shapes = {k: tuple(int(s) for s in v) for k, v in self.shapes.items()}
        reshape = {k: tuple(int(s) for s in v) for k, v in self.reshape.items()}
        if set(axes) != set(shapes):
            raise ValueError(f"axes and shapes list different keys: "
                             f"{sorted(set(axes) ^ set(shapes))}")
        unknown = sorted(set(reshape) - set(axes))
        if unknown:
            raise ValueError(f"reshape lists keys without axes: {unknown}")
        segments = {k: {int(d): tuple((g, int(n)) for g, n in segs)
                        for d, segs in sorted(v.items())} for k, v in self.segments.items()}
        segments = {k: v for k, v in segments.items() if v}
        unknown = sorted(set(segments) - set(axes))
        if unknown:
            raise ValueError(f"segments lists keys without axes: {unknown}")
        sizes: dict[str, int] = {}
        groups: dict[str, list[tuple[str, int]]] = {}
        for key, ax in axes.items():
            view = reshape.get(key, shapes[key])
            if math.prod(view) != math.prod(shapes[key]):
                raise ValueError(f"{key}: view {view} does not match shape {shapes[key]}")
            if len(ax) != len(view):
                raise ValueError(f"{key}: {len(ax)} axis entries for shape {view}")
            for axis, entry in enumerate(_entries(ax, segments.get(key, {}), view, key)):
                for group, n in ((entry, view[axis]),) if not isinstance(entry, tuple) else entry:
                    if group is None:
                        continue
                    if sizes.setdefault(group, n) != n:
                        raise ValueError(f"{key} axis {axis}: group {group} has size "
                                         f"{sizes[group]}, tensor has {n}")
                    if (key, axis) not in groups.setdefault(group, []):
                        groups[group].append((key, axis))
        features = {g: tuple(m) for g, m in self.features.items()}
        unknown = sorted(set(features) - set(groups))
        if unknown:
            raise ValueError(f"features listed for unknown groups: {unknown}")
        feature_dims = {m: int(d) for m, d in self.feature_dims.items()}
        listed = {m for ms in features.values() for m in ms}
        if not set(feature_dims) <= listed or not set(feature_dims.values()) <= {1, -1}:
            raise ValueError(f"feature_dims must give dim 1 or -1 of feature modules: {feature_dims}")
        cost_keys = tuple(k for k, ax in axes.items()
                          if (any(g is not None for g in ax) or k in segments)
                          and not k.endswith(NON_COST_SUFFIXES))
        for name, value in (("axes", axes), ("shapes", shapes), ("reshape", reshape),
                            ("features", features), ("feature_dims", feature_dims),
                            ("segments", segments), ("sizes", sizes), ("groups", groups),
                            ("cost_keys", cost_keys)):
            object.__setattr__(self, name, value)

    def entries(self, key: str) -> tuple[str | Segments | None, ...]:
        """Per view axis of ``key``: its group, None, or its :data:`Segments`."""
        segs = self.segments.get(key, {})
        return tuple(segs.get(d, g) for d, g in enumerate(self.axes[key]))

    def view(self, key: str, tensor: Tensor) -> Tensor:
        """``tensor`` (stored shape) as the shape its axes refer to."""
        return tensor.reshape(self.reshape[key]) if key in self.reshape else tensor

    def check_state(self, state: Mapping[str, Tensor]) -> None:
        """Raise ValueError unless ``state`` has exactly the spec's keys with its shapes."""
        missing, extra = sorted(set(self.axes) - set(state)), sorted(set(state) - set(self.axes))
        if missing or extra:
            raise ValueError(f"state does not match the spec: missing {missing}, extra {extra}")
        bad = [k for k in self.axes if tuple(state[k].shape) != self.shapes[k]]
        if bad:
            raise ValueError("shape mismatch: " + ", ".join(
                f"{k} {tuple(state[k].shape)} != {self.shapes[k]}" for k in bad))


def _entries(ax: Axes, segs: Mapping[int, Segments], view: tuple[int, ...], key: str
             ) -> tuple[str | Segments | None, ...]:
    """Check ``segs`` against the axes and view of ``key``; the entry of every view axis."""
    for d, stretches in segs.items():
        if not 0 <= d < len(view) or ax[d] is not None:
            raise ValueError(f"{key}: segments on axis {d}, which is not an unpermuted view axis")
        if sum(n for _, n in stretches) != view[d] or min(n for _, n in stretches) < 1:
            raise ValueError(f"{key} axis {d}: segment lengths {[n for _, n in stretches]} "
                             f"do not cover its {view[d]} units")
        if all(g is None for g, _ in stretches):
            raise ValueError(f"{key} axis {d}: segments without a group")
    return tuple(segs.get(d, g) for d, g in enumerate(ax))


# ---------------------------------------------------------------------------------------------
# Permutations.


def identity_permutation(spec: PermutationSpec) -> dict[str, Tensor]:
    return {g: torch.arange(n) for g, n in sorted(spec.sizes.items())}


def random_permutation(spec: PermutationSpec, generator: torch.Generator | None = None
                       ) -> dict[str, Tensor]:
    """One uniform random permutation per group, drawn in sorted group order."""
    return {g: torch.randperm(n, generator=generator) for g, n in sorted(spec.sizes.items())}


def invert_permutation(perm: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per group inverse: ``apply(inv, apply(perm, s)) == s``."""
    return {g: torch.argsort(p) for g, p in perm.items()}


def _check_perm(spec: PermutationSpec, perm: Mapping[str, Tensor]) -> None:
    unknown = sorted(set(perm) - set(spec.sizes))
    if unknown:
        raise ValueError(f"permutation has groups not in the spec: {unknown}")
    for g, p in perm.items():
        if tuple(p.shape) != (spec.sizes[g],):
            raise ValueError(f"permutation of {g} has shape {tuple(p.shape)}, "
                             f"expected ({spec.sizes[g]},)")


def axis_index(entry: str | Segments | None, perm: Mapping[str, Tensor]) -> Tensor | None:
    """The index that permutes an axis whose entry (:meth:`PermutationSpec.entries`) is
    ``entry``: the group's permutation, or for segments the block-diagonal one (every stretch
    by its group, offset to its place); None where nothing moves (no group in ``perm``)."""
    if entry is None:
        return None
    if not isinstance(entry, tuple):
        return perm.get(entry)
    if not any(g in perm for g, _ in entry if g is not None):
        return None
    parts, start = [], 0
    for g, n in entry:
        parts.append(start + (perm[g].cpu() if g in perm else torch.arange(n)))
        start += n
    return torch.cat(parts)


def _permute(t: Tensor, entries, perm: Mapping[str, Tensor], skip: int | None = None) -> Tensor:
    """Index every axis of ``t`` (already viewed) whose entry (a group or segments) has a
    group in ``perm``, except ``skip``."""
    for axis, entry in enumerate(entries):
        index = axis_index(entry, perm) if axis != skip else None
        if index is not None:
            t = t.index_select(axis, index.to(t.device))
    return t


def apply_permutation(spec: PermutationSpec, perm: Mapping[str, Tensor],
                      state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Permute every listed axis of every tensor: along group g, ``new[i] = old[perm[g][i]]``;
    a segmented axis stretch by stretch (``new[o + i] = old[o + perm[g][i]]`` for the stretch
    of group g at offset o).

    Groups absent from ``perm`` are left as they are (identity). Every key of ``state`` must
    be in the spec; the result has the same keys, in the same order, shapes and dtypes.
    """
    _check_perm(spec, perm)
    unknown = [k for k in state if k not in spec.axes]
    if unknown:
        raise KeyError(f"state_dict keys not in the permutation spec: {unknown}")
    out = {}
    for key, t in state.items():
        out[key] = _permute(spec.view(key, t), spec.entries(key), perm).reshape(t.shape)
    return out
