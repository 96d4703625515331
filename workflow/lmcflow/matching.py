"""Permutation alignment of two networks (Git Re-Basin, Ainsworth et al. 2023).

Hidden units of a network can be permuted without changing its function, provided every
tensor that touches a unit is permuted consistently. A :class:`PermutationSpec` describes
which axes of which tensors move together: for every ``state_dict`` key (parameters *and*
buffers) one entry per tensor axis, the name of the permutation group acting on that axis or
``None``. The architecture lives entirely in the spec builders (:func:`mlp_spec`,
:func:`vgg_spec`, :func:`resnet20_spec`, composed from the tiny helpers of
:class:`SpecBuilder`); the matching algorithms only read specs.

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

Group names: MLP ``P_fc{i}``; VGG ``P_conv{i}`` (the conv's BN shares it); ResNet20 one group
per residual stream ``P_res{l}`` (stem and layer1 share ``P_res1``; the first block of
layer 2/3 maps the stream through its shortcut conv) and one per block's inner channels
``P_layer{l}.{b}.inner`` (conv1/norm1 output, conv2 input).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .data import sample_order
from .features import capture

__all__ = [
    "PermutationSpec", "SpecBuilder", "permutation_spec", "mlp_spec", "lenet_spec", "vgg_spec",
    "resnet20_spec", "resnet18_spec",
    "SPEC_BUILDERS", "apply_permutation", "identity_permutation", "random_permutation",
    "invert_permutation", "weight_matching", "activation_matching", "feature_modules",
    "matching_objective",
]

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
# Spec builders: the only place that knows architectures.


class SpecBuilder:
    """Collect axis entries for a model's ``state_dict`` with layer-sized helpers.

    Each helper lists every tensor of one layer that exists (a conv without bias, a BN with
    running stats...), reading shapes from the model, so specs cannot drift from the models.
    """

    def __init__(self, model: nn.Module):
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.axes: dict[str, Axes] = {}
        self.reshape: dict[str, tuple[int, ...]] = {}
        self.features: dict[str, list[str]] = {}

    def add(self, key: str, *axes, view: tuple[int, ...] | None = None) -> None:
        if key not in self.shapes:
            raise KeyError(f"{key} is not in the model's state_dict")
        if key in self.axes:
            raise KeyError(f"{key} listed twice")
        self.axes[key] = tuple(axes)
        if view is not None:
            self.reshape[key] = tuple(view)

    def has(self, key: str) -> bool:
        return key in self.shapes

    def dense(self, name: str, out: str | None, inp: str | None) -> None:
        """Linear ``name``: weight (out, in), optional bias (out,)."""
        self.add(f"{name}.weight", out, inp)
        if self.has(f"{name}.bias"):
            self.add(f"{name}.bias", out)

    def dense_from_map(self, name: str, out: str | None, channels: str, n_channels: int) -> None:
        """Linear reading a flattened ``(C, H, W)`` map: weight viewed ``(out, C, H*W)``."""
        n_out, n_in = self.shapes[f"{name}.weight"]
        if n_in % n_channels:
            raise ValueError(f"{name}: {n_in} inputs is not a multiple of {n_channels} channels")
        self.add(f"{name}.weight", out, channels, None, view=(n_out, n_channels, n_in // n_channels))
        if self.has(f"{name}.bias"):
            self.add(f"{name}.bias", out)

    def conv(self, name: str, out: str | None, inp: str | None) -> None:
        """Conv2d ``name``: weight (out, in, kh, kw), optional bias (out,)."""
        self.add(f"{name}.weight", out, inp, None, None)
        if self.has(f"{name}.bias"):
            self.add(f"{name}.bias", out)

    def norm(self, name: str, group: str) -> None:
        """BatchNorm/GroupNorm ``name``: per-channel affine and running stats, scalar counter."""
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            if self.has(f"{name}.{suffix}"):
                self.add(f"{name}.{suffix}", group)
        if self.has(f"{name}.num_batches_tracked"):
            self.add(f"{name}.num_batches_tracked")

    def feature(self, group: str, module: str) -> None:
        """The output of ``module`` carries ``group``'s units on dim 1."""
        self.features.setdefault(group, []).append(module)

    def n_out(self, name: str) -> int:
        return self.shapes[f"{name}.weight"][0]

    def build(self) -> PermutationSpec:
        missing = sorted(set(self.shapes) - set(self.axes))
        if missing:
            raise ValueError(f"spec misses state_dict keys: {missing}")
        return PermutationSpec(self.axes, self.shapes, self.reshape,
                               {g: tuple(m) for g, m in self.features.items()})


def mlp_spec(model: nn.Module) -> PermutationSpec:
    """``fc{i}`` outputs are ``P_fc{i}``; ``out`` reads the last one."""
    b = SpecBuilder(model)
    prev = None
    for i in range(1, model.depth + 1):
        group = f"P_fc{i}"
        b.dense(f"fc{i}", group, prev)
        b.feature(group, f"relu{i}")
        prev = group
    b.dense("out", None, prev)
    return b.build()


def _dense_stack(b: SpecBuilder, layers: list[tuple[str, str]], first_from_map: tuple[str, int]
                 ) -> str:
    """Hidden Linear layers ``(linear, its ReLU)`` each writing ``P_<linear>``, read by the
    next; the first reads a flattened map of ``first_from_map = (group, channels)``. Returns
    the last group."""
    prev = None
    for i, (name, relu) in enumerate(layers):
        group = f"P_{name}"
        if i == 0:
            b.dense_from_map(name, group, *first_from_map)
        else:
            b.dense(name, group, prev)
        b.feature(group, relu)
        prev = group
    return prev


def lenet_spec(model: nn.Module) -> PermutationSpec:
    """``conv1``/``conv2`` outputs are ``P_conv1``/``P_conv2``; ``fc1`` reads the flattened
    conv2 map per channel; ``fc1``/``fc2`` write ``P_fc1``/``P_fc2``; ``out`` reads the last."""
    b = SpecBuilder(model)
    b.conv("conv1", "P_conv1", None)
    b.feature("P_conv1", "relu1")
    b.conv("conv2", "P_conv2", "P_conv1")
    b.feature("P_conv2", "relu2")
    prev = _dense_stack(b, [("fc1", "relu3"), ("fc2", "relu4")], ("P_conv2", b.n_out("conv2")))
    b.dense("out", None, prev)
    return b.build()


def vgg_spec(model: nn.Module) -> PermutationSpec:
    """``features.conv{i}`` (and its BN) outputs are ``P_conv{i}``; the classifier (the hidden
    ``classifier.fc{i}``, groups ``P_classifier.fc{i}``, then ``out``) reads the flattened last
    map, viewed per channel."""
    b = SpecBuilder(model)
    prev = None
    for i in range(1, model.n_conv + 1):
        group = f"P_conv{i}"
        b.conv(f"features.conv{i}", group, prev)
        if b.has(f"features.bn{i}.weight"):
            b.norm(f"features.bn{i}", group)
        b.feature(group, f"features.relu{i}")
        prev = group
    last = (prev, b.n_out(f"features.conv{model.n_conv}"))
    hidden = [(f"classifier.fc{i}", f"classifier.relu{i}") for i in range(1, model.n_hidden + 1)]
    if hidden:
        b.dense("out", None, _dense_stack(b, hidden, last))
    else:
        b.dense_from_map("out", None, *last)
    return b.build()


# the tensor names of a residual block: (conv1, norm1, conv2, norm2, shortcut conv, shortcut norm)
RESNET20_BLOCK = ("conv1", "norm1", "conv2", "norm2", "shortcut.conv", "shortcut.norm")
RESNET18_BLOCK = ("conv1", "bn1", "conv2", "bn2", "downsample.0", "downsample.1")


def _basic_block(b: SpecBuilder, name: str, inp: str, out: str, keys=RESNET20_BLOCK) -> None:
    """``name`` = ``layer{l}.{j}``: conv1/norm1 -> inner group; conv2/norm2 and the shortcut
    write the residual stream ``out``. Without a shortcut conv the stream passes through
    unchanged, so ``inp`` must be ``out``. A norm without state (nn.Identity) adds nothing."""
    conv1, norm1, conv2, norm2, sc_conv, sc_norm = (f"{name}.{k}" for k in keys)
    inner = f"P_{name}.inner"
    b.conv(conv1, inner, inp)
    b.norm(norm1, inner)
    b.conv(conv2, out, inner)
    b.norm(norm2, out)
    if b.has(f"{sc_conv}.weight"):
        b.conv(sc_conv, out, inp)
        b.norm(sc_norm, out)
    elif inp != out:
        raise ValueError(f"{name} has an identity shortcut but changes stream {inp} -> {out}")
    b.feature(inner, f"{name}.relu1")
    b.feature(out, name)


def _residual_stages(b: SpecBuilder, model: nn.Module, keys) -> str:
    """Blocks of ``layer1``, ``layer2``, …: stage l writes ``P_res{l}`` (stage 1 continues the
    stem's ``P_res1``); returns the last stream."""
    stream, stage = "P_res1", 1
    while hasattr(model, f"layer{stage}"):
        out = f"P_res{stage}"
        for j in range(len(getattr(model, f"layer{stage}"))):
            _basic_block(b, f"layer{stage}.{j}", stream, out, keys)
            stream = out
        stage += 1
    return stream


def resnet20_spec(model: nn.Module) -> PermutationSpec:
    """One group per residual stream (``P_res{l}``, the stem writes ``P_res1``) and one per
    block's inner channels (``P_layer{l}.{j}.inner``); ``fc`` reads ``P_res3``."""
    b = SpecBuilder(model)
    b.conv("stem.conv", "P_res1", None)
    b.norm("stem.norm", "P_res1")
    b.feature("P_res1", "stem")
    b.dense("fc", None, _residual_stages(b, model, RESNET20_BLOCK))
    return b.build()


def resnet18_spec(model: nn.Module) -> PermutationSpec:
    """As ResNet-20 with torchvision's names: the stem ``conv1``/``bn1`` writes ``P_res1``,
    stage l writes ``P_res{l}`` (its first block maps the stream through ``downsample``),
    ``P_layer{l}.{j}.inner`` inside each block; ``fc`` reads ``P_res4``."""
    b = SpecBuilder(model)
    b.conv("conv1", "P_res1", None)
    b.norm("bn1", "P_res1")
    b.feature("P_res1", "relu")
    b.dense("fc", None, _residual_stages(b, model, RESNET18_BLOCK))
    return b.build()


# model class name -> spec builder (by name: ResNet18 lives in a module that imports torchvision)
SPEC_BUILDERS: dict[str, Callable[[nn.Module], PermutationSpec]] = {
    "MLP": mlp_spec, "LeNet": lenet_spec, "VGG": vgg_spec, "ResNet20": resnet20_spec,
    "ResNet18": resnet18_spec,
}


def permutation_spec(model: nn.Module, example_input: Tensor | tuple | None = None
                     ) -> PermutationSpec:
    """The spec of ``model``: its hand-written builder (by class, see :data:`SPEC_BUILDERS`),
    else one traced with torch.fx (:func:`lmcflow.tracing.trace_spec`) on ``example_input``,
    or, without one, on ``torch.zeros(1, *model.in_shape)`` where the model has ``in_shape``
    (the built-in ViT). Raises TypeError when there is neither a builder nor an input."""
    for cls in type(model).__mro__:
        if cls.__name__ in SPEC_BUILDERS and cls.__module__.startswith(__package__):
            return SPEC_BUILDERS[cls.__name__](model)
    if example_input is None and getattr(model, "in_shape", None) is not None:
        example_input = torch.zeros(1, *model.in_shape)
    if example_input is None:
        raise TypeError(f"no permutation spec for {type(model).__name__}: no hand-written builder "
                        f"(known: {sorted(SPEC_BUILDERS)}) and no example input to trace it with")
    from .tracing import trace_spec  # the tracer builds on this module

    return trace_spec(model, example_input)


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


# ---------------------------------------------------------------------------------------------
# Weight matching.
#
# Layout (why it is fast): for group g every cost entry (key, axis) becomes a block of rows of two
# (R_g, n) matrices, A_g and B_g, holding the tensor with ``axis`` last and the key's *other*
# grouped axes first (a conv weight (o, i, kh, kw) is stored (i, kh, kw, o) for its output group
# and (o, kh, kw, i) for its input group). Then g's cost is one matmul, ``A_g^T @ B_g`` (n x n),
# on contiguous operands. A group's own axis is never permuted in its matrices (the cost is in
# B's original unit order, as in the reference code); B_g holds the other groups' current
# permutations on the leading axes, so when group h moves some units, only their rows move in
# the blocks that lead with h (``index_copy_`` of those rows), and the neighbour's cost, next
# time it is needed, is updated through those rows alone unless many moved. Only groups whose
# neighbours changed are solved again; every accepted change is checked by its exact float64
# gain, read from the moving units' columns.


def _cost_tensors(spec: PermutationSpec, state: Mapping[str, Tensor], device) -> dict[str, Tensor]:
    """Cost tensors of ``state`` in their view shapes on ``device``, dtype unchanged."""
    return {k: spec.view(k, state[k]).to(device) for k in spec.cost_keys}


def _chunk(device: torch.device) -> int:
    """Elements per chunk of float64 temporaries: cache-sized on the CPU (10x faster than
    chunks of tens of MB), larger on a GPU (fewer kernel launches)."""
    return 1 << 17 if device.type == "cpu" else 1 << 22


def _dot64(a: Tensor, b: Tensor) -> float:
    """``<a, b>`` with float64 products and sums, in chunks (no float64 copy of whole tensors)."""
    a, b = a.reshape(-1), b.reshape(-1).to(a.device)
    chunk = min(_chunk(a.device), a.numel())
    buf = torch.empty(2, chunk, dtype=torch.float64, device=a.device)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, a.numel(), chunk):
        k = min(chunk, a.numel() - s)
        buf[0, :k].copy_(a[s:s + k])
        buf[1, :k].copy_(b[s:s + k])
        total += torch.dot(buf[0, :k], buf[1, :k])
    return float(total)


def matching_objective(spec: PermutationSpec, state_a: Mapping[str, Tensor],
                       state_b: Mapping[str, Tensor], perm: Mapping[str, Tensor] | None = None
                       ) -> float:
    """``sum over cost keys <A[k], perm(B)[k]>`` in float64, the weight-matching objective."""
    perm = {} if perm is None else perm
    total = 0.0
    for k in spec.cost_keys:
        a = spec.view(k, state_a[k])
        b = _permute(spec.view(k, state_b[k]).to(a.device), spec.axes[k], perm)
        total += _dot64(a, b)
    return total


@dataclass
class _Block:
    """Rows ``rows`` of a group's matrices: tensor ``key`` with its axes in ``order`` (the
    group's axis last), reshaped ``(prod(shape[:-1]), n)``; ``others`` = (group, dim) of the
    layout's other grouped axes, which are its leading dims."""

    key: str
    rows: slice
    shape: tuple[int, ...]
    order: tuple[int, ...]
    others: tuple[tuple[str, int], ...]


@dataclass
class _Group:
    """Group g's matrices ``a``, ``b`` (R, n) and its cost ``a^T b`` (n, n) in the matmul
    dtype once computed (None: to compute).

    ``seen`` holds, per group leading one of its blocks, that group's permutation when
    ``cost`` was last brought up to date; ``stale`` counts the rows updated since ``cost`` was
    last computed in full."""

    n: int
    blocks: list[_Block]
    a: Tensor
    b: Tensor
    cost: Tensor | None = None
    seen: dict[int, Tensor] = field(default_factory=dict)
    stale: int = 0


def _blocks(spec: PermutationSpec, group: str) -> list[_Block]:
    blocks, start = [], 0
    for key, axis in spec.groups[group]:
        if key not in spec.cost_keys:
            continue
        axes, view = spec.axes[key], spec.reshape.get(key, spec.shapes[key])
        others = [d for d, g in enumerate(axes) if g is not None and d != axis]
        if group in (axes[d] for d in others):
            raise ValueError(f"{key}: group {group} acts on two of its axes; weight matching "
                             f"needs distinct groups on the axes of a tensor")
        order = tuple(others + [d for d, g in enumerate(axes) if g is None] + [axis])
        shape = tuple(view[d] for d in order)
        rows = math.prod(shape[:-1])
        blocks.append(_Block(key, slice(start, start + rows), shape, order,
                             tuple((axes[d], i) for i, d in enumerate(others))))
        start += rows
    return blocks


def _build_groups(spec: PermutationSpec, a_views: Mapping[str, Tensor],
                  b_views: Mapping[str, Tensor], dtype: torch.dtype, device) -> dict[str, _Group]:
    groups = {}
    for g in sorted(spec.groups):
        blocks = _blocks(spec, g)
        rows = blocks[-1].rows.stop if blocks else 0
        a = torch.empty(rows, spec.sizes[g], dtype=dtype, device=device)
        b = torch.empty_like(a)
        for blk in blocks:
            _permuted_copy(a[blk.rows], a_views[blk.key], blk.order)
            _permuted_copy(b[blk.rows], b_views[blk.key], blk.order)
        groups[g] = _Group(spec.sizes[g], blocks, a, b)
    return groups


def _permuted_copy(out: Tensor, src: Tensor, order: tuple[int, ...]) -> None:
    """``out`` (contiguous) = ``src.permute(order)``, with the source dims that stay adjacent
    merged first: a conv weight's (o, i, kh, kw) -> (i, kh, kw, o) is then a 2-D transpose,
    several times faster than torch's copy through the 4-D permuted view."""
    runs: list[list[int]] = []
    for d in order:
        if runs and runs[-1][-1] + 1 == d:
            runs[-1].append(d)
        else:
            runs.append([d])
    by_start = sorted(runs)
    merged = src.reshape([math.prod(src.shape[d] for d in run) for run in by_start])
    order = [by_start.index(run) for run in runs]
    out.view([merged.shape[d] for d in order]).copy_(merged.permute(order))


def _rewrite(group: _Group, i: int, h: str, moved: Tensor, source: Tensor) -> None:
    """Group h, a leading axis of block i, changed: the units now at positions ``moved`` were
    at positions ``source``; move those rows of ``group.b`` (all of h's axis when the block
    has several permuted axes, and then the cost is recomputed)."""
    blk = group.blocks[i]
    b = group.b[blk.rows].view(blk.shape)
    if len(blk.others) == 1:
        b.index_copy_(0, moved, b.index_select(0, source))
        return
    dim = next(d for g, d in blk.others if g == h)
    order = torch.arange(blk.shape[dim], device=moved.device).index_copy_(0, moved, source)
    b.copy_(b.index_select(dim, order))
    group.cost = None


def _cost(group: _Group, perm: Mapping[str, Tensor], inverse: Mapping[str, Tensor],
          dtype: torch.dtype) -> Tensor:
    """``a^T b`` (n, n) in ``dtype``. Where the leading groups of its blocks moved few units
    since the last call, only the rows of those units enter: ``cost += a_rows^T (b_rows now -
    b_rows then)`` (the rows then are those of the units seen then, wherever they are now);
    a full matmul when that would be a third of the rows or more, or the updates since the
    last full one would exceed all rows (their rounding stays below one full matmul's)."""
    leads = [(i, blk.others[0][0]) for i, blk in enumerate(group.blocks)
             if len(blk.others) == 1]
    moves, rows = {}, 0
    if group.cost is not None:
        moves = {h: torch.nonzero(perm[h] != old).view(-1) for h, old in group.seen.items()}
        for i, h in leads:  # rows of the moved units: rows per unit of h in block i
            blk = group.blocks[i]
            rows += len(moves[h]) * (blk.rows.stop - blk.rows.start) // blk.shape[0]
    n_rows = group.a.shape[0]
    if group.cost is None or 3 * rows > n_rows or group.stale + rows > n_rows:
        group.cost, group.stale = torch.mm(group.a.T.to(dtype), group.b.to(dtype)), 0
    else:
        for i, h in leads:
            moved = moves[h]
            if len(moved):
                blk, shape = group.blocks[i], (group.blocks[i].shape[0], -1, group.n)
                a = group.a[blk.rows].view(shape).index_select(0, moved).view(-1, group.n)
                b = group.b[blk.rows].view(shape)
                then = inverse[h].index_select(0, group.seen[h].index_select(0, moved))
                diff = b.index_select(0, moved) - b.index_select(0, then)
                group.cost.addmm_(a.T.to(dtype), diff.view(-1, group.n).to(dtype))
        group.stale += rows
    group.seen = {h: perm[h] for _, h in leads}  # (permutations are replaced, never modified)
    return group.cost


def _exact_gain(a: Tensor, b: Tensor, units: Tensor, new: Tensor, old: Tensor) -> float:
    """``sum_i <a[:, units_i], b[:, new_i] - b[:, old_i]>`` in float64: the exact change of the
    objective when the units ``units`` of A are matched to ``new`` instead of ``old``. Only the
    changed columns are read, in row chunks through preallocated buffers (fresh temporaries
    cost more than the arithmetic here)."""
    m = len(units)
    step = min(max(1, _chunk(a.device) // m), a.shape[0])
    gathered = torch.empty(3, step, m, dtype=a.dtype, device=a.device)
    wide = torch.empty(3, step, m, dtype=torch.float64, device=a.device)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for r in range(0, a.shape[0], step):
        k = min(step, a.shape[0] - r)
        torch.index_select(a[r:r + k], 1, units, out=gathered[0, :k])
        torch.index_select(b[r:r + k], 1, new, out=gathered[1, :k])
        torch.index_select(b[r:r + k], 1, old, out=gathered[2, :k])
        w = wide[:, :k].copy_(gathered[:, :k])
        w[1].sub_(w[2])
        total += torch.dot(w[0].view(-1), w[1].view(-1))
    return float(total)


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, Tensor],
                    state_b: Mapping[str, Tensor], max_sweeps: int = 100, seed: int = 0,
                    log: Callable[[str], None] | None = None, dtype: torch.dtype = torch.float32,
                    device=None) -> tuple[dict[str, Tensor], dict]:
    """Permutation of B maximising ``sum_k <A[k], perm(B)[k]>`` by coordinate ascent.

    Starting from the identity, each sweep visits every group once, in an order drawn from a
    generator seeded with ``seed``; for group P, with all other groups fixed,
    ``C = sum_{(k, axis) in P} A_k(axis first, flattened) @ B'_k(axis first, flattened)^T``
    (``B'`` = B with the other groups' current permutations) is a linear assignment problem
    solved exactly (``scipy.optimize.linear_sum_assignment`` on the CPU). A group is solved
    again only once a group sharing a tensor with it has changed (otherwise its C, hence its
    answer, is the same). Stops after a sweep without change or ``max_sweeps`` sweeps.

    C is computed in ``dtype`` (float32 by default, float64 for the reference computation),
    one matmul per group on ``device`` (default: ``state_a``'s). P changes only if the change
    of the objective, recomputed exactly in float64 from the weights of the units that move,
    exceeds 1e-12 of the assignment's value, so the objective never decreases; the objective
    is evaluated in float64 at the start and updated by these exact changes.

    Returns ``(perm, info)``: perm maps B onto A (``apply_permutation(spec, perm, state_b)``
    is the aligned B), long tensors on the CPU; ``info = {"objective": final objective,
    "sweeps": sweeps run, "history": objective at start and after each sweep,
    "seconds": wall time, "seconds_cost"/"seconds_assignment"/"seconds_update": time building
    the cost matrices / solving the assignments / applying accepted changes (exact gain and
    permuted copies), "sweep_seconds": wall time of each sweep, "solves": assignments solved,
    "dtype", "device"}``.
    """
    start_time = time.perf_counter()
    spec.check_state(state_a)
    spec.check_state(state_b)
    if not spec.cost_keys:
        raise ValueError("the spec has no permuted tensors")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    device = torch.device(state_a[spec.cost_keys[0]].device if device is None else device)
    A, B = _cost_tensors(spec, state_a, device), _cost_tensors(spec, state_b, device)
    # Stored in a dtype that holds the weights exactly, so that gains are exact; the matmul
    # runs in ``dtype`` (a float64 state with float32 costs is converted at every matmul).
    store = dtype
    for t in (*A.values(), *B.values()):
        store = torch.promote_types(store, t.dtype)
    groups = _build_groups(spec, A, B, store, device)
    names = sorted(groups)
    users = {g: [] for g in names}  # group -> blocks (group, index) that lead with it
    for g, grp in groups.items():
        for i, blk in enumerate(grp.blocks):
            for h, _ in blk.others:
                users[h].append((g, i))
    perm = {g: np.arange(spec.sizes[g]) for g in names}
    perm_dev = {g: torch.arange(spec.sizes[g], device=device) for g in names}
    inverse = dict(perm_dev)  # positions of B's units
    gen = torch.Generator().manual_seed(int(seed))
    objective = sum(_dot64(A[k], B[k]) for k in spec.cost_keys)
    del A, B
    history, sweep_seconds = [objective], []
    seconds = {"cost": 0.0, "assignment": 0.0, "update": 0.0}
    solves = 0
    dirty = {g for g in names if groups[g].a.shape[0]}
    if log:
        log(f"weight matching: {len(names)} groups, {dtype} costs on {device}, "
            f"start objective {objective:.6g}")
    sweeps = 0
    for sweeps in range(1, int(max_sweeps) + 1):
        tic_sweep, changed = time.perf_counter(), []
        for gi in torch.randperm(len(names), generator=gen).tolist():
            group = names[gi]
            if group not in dirty:
                continue
            dirty.discard(group)
            solves += 1
            solved = _solve(groups[group], perm[group], perm_dev, inverse, dtype, seconds)
            if solved is None:
                continue
            tic = time.perf_counter()
            cols, gain, moved = solved
            objective += gain
            perm[group] = cols
            perm_dev[group] = torch.from_numpy(cols).to(device)
            moved = torch.from_numpy(moved).to(device)
            source = inverse[group].index_select(0, perm_dev[group].index_select(0, moved))
            inverse[group] = torch.from_numpy(np.argsort(cols)).to(device)
            for g, i in users[group]:
                _rewrite(groups[g], i, group, moved, source)
                dirty.add(g)
            changed.append(group)
            seconds["update"] += time.perf_counter() - tic
        history.append(objective)
        sweep_seconds.append(time.perf_counter() - tic_sweep)
        if log:
            log(f"weight matching sweep {sweeps}: objective {objective:.6g}, "
                f"{len(changed)}/{len(names)} groups changed")
        if not changed:
            break
    info = {"objective": objective, "sweeps": sweeps, "history": history,
            "seconds": time.perf_counter() - start_time, "seconds_cost": seconds["cost"],
            "seconds_assignment": seconds["assignment"], "seconds_update": seconds["update"],
            "sweep_seconds": sweep_seconds, "solves": solves, "dtype": str(dtype).split(".")[-1],
            "device": str(device)}
    return {g: torch.from_numpy(p).long() for g, p in perm.items()}, info


def _solve(group: _Group, current: np.ndarray, perm: Mapping[str, Tensor],
           inverse: Mapping[str, Tensor], dtype: torch.dtype, seconds: dict
           ) -> tuple[np.ndarray, float, np.ndarray] | None:
    """Best assignment for ``group``, its exact gain over ``current`` and the positions that
    move; None unless the assignment is a strict improvement (then ``current`` stays)."""
    tic = time.perf_counter()
    c = _cost(group, perm, inverse, dtype).to("cpu", torch.float64).numpy()  # B's unit order
    toc = time.perf_counter()
    _, cols = linear_sum_assignment(c, maximize=True)
    seconds["cost"] += toc - tic
    seconds["assignment"] += time.perf_counter() - toc
    moved = np.flatnonzero(cols != current)
    if not len(moved):
        return None
    rows = np.arange(group.n)
    old, new = float(c[rows, current].sum()), float(c[rows, cols].sum())
    if not new > old:
        return None
    tic = time.perf_counter()
    idx = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(group.a.device)  # noqa: E731
    gain = _exact_gain(group.a, group.b, idx(moved), idx(cols[moved]), idx(current[moved]))
    seconds["update"] += time.perf_counter() - tic
    if not gain > 1e-12 * max(abs(old), abs(new)):
        return None
    return cols, gain, moved


# ---------------------------------------------------------------------------------------------
# Activation matching.


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
    heads) keeps the identity: listed in ``info["unmatched"]``.

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
