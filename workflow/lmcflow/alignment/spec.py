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

__all__ = ["PermutationSpec", "Axes", "NON_COST_SUFFIXES", "apply_permutation",
           "identity_permutation", "random_permutation", "invert_permutation"]

# Buffers that are permuted with their channels but carry no signal for weight matching.
NON_COST_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

Axes = tuple[str | None, ...]


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
      1: -1 for token tensors ``(B, T, n)`` of transformers.

    Derived: ``sizes`` (group -> n), ``groups`` (group -> [(key, axis), ...] in key order)
    and ``cost_keys`` (keys with at least one group, minus BN running stats and
    ``num_batches_tracked``, which are permuted but do not enter weight-matching costs).
    """

    axes: Mapping[str, Axes]
    shapes: Mapping[str, tuple[int, ...]]
    reshape: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    feature_dims: Mapping[str, int] = field(default_factory=dict)
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
        sizes: dict[str, int] = {}
        groups: dict[str, list[tuple[str, int]]] = {}
        for key, ax in axes.items():
            view = reshape.get(key, shapes[key])
            if math.prod(view) != math.prod(shapes[key]):
                raise ValueError(f"{key}: view {view} does not match shape {shapes[key]}")
            if len(ax) != len(view):
                raise ValueError(f"{key}: {len(ax)} axis entries for shape {view}")
            for axis, group in enumerate(ax):
                if group is None:
                    continue
                if sizes.setdefault(group, view[axis]) != view[axis]:
                    raise ValueError(f"{key} axis {axis}: group {group} has size {sizes[group]}, "
                                     f"tensor has {view[axis]}")
                groups.setdefault(group, []).append((key, axis))
        features = {g: tuple(m) for g, m in self.features.items()}
        unknown = sorted(set(features) - set(groups))
        if unknown:
            raise ValueError(f"features listed for unknown groups: {unknown}")
        feature_dims = {m: int(d) for m, d in self.feature_dims.items()}
        listed = {m for ms in features.values() for m in ms}
        if not set(feature_dims) <= listed or not set(feature_dims.values()) <= {1, -1}:
            raise ValueError(f"feature_dims must give dim 1 or -1 of feature modules: {feature_dims}")
        cost_keys = tuple(k for k, ax in axes.items()
                          if any(g is not None for g in ax) and not k.endswith(NON_COST_SUFFIXES))
        for name, value in (("axes", axes), ("shapes", shapes), ("reshape", reshape),
                            ("features", features), ("feature_dims", feature_dims),
                            ("sizes", sizes), ("groups", groups),
                            ("cost_keys", cost_keys)):
            object.__setattr__(self, name, value)

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


def _permute(t: Tensor, axes: Axes, perm: Mapping[str, Tensor], skip: int | None = None) -> Tensor:
    """Index every axis of ``t`` (already viewed) whose group is in ``perm``, except ``skip``."""
    for axis, group in enumerate(axes):
        if group is not None and axis != skip and group in perm:
            t = t.index_select(axis, perm[group].to(t.device))
    return t


def apply_permutation(spec: PermutationSpec, perm: Mapping[str, Tensor],
                      state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Permute every listed axis of every tensor: along group g, ``new[i] = old[perm[g][i]]``.

    Groups absent from ``perm`` are left as they are (identity). Every key of ``state`` must
    be in the spec; the result has the same keys, in the same order, shapes and dtypes.
    """
    _check_perm(spec, perm)
    unknown = [k for k in state if k not in spec.axes]
    if unknown:
        raise KeyError(f"state_dict keys not in the permutation spec: {unknown}")
    out = {}
    for key, t in state.items():
        out[key] = _permute(spec.view(key, t), spec.axes[key], perm).reshape(t.shape)
    return out
