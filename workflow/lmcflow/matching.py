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

from .features import capture
from .models import MLP, VGG, ResNet20

__all__ = [
    "PermutationSpec", "SpecBuilder", "permutation_spec", "mlp_spec", "vgg_spec", "resnet20_spec",
    "SPEC_BUILDERS", "apply_permutation", "identity_permutation", "random_permutation",
    "invert_permutation", "weight_matching", "activation_matching", "matching_objective",
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
      samples of several modules are pooled as extra observations).

    Derived: ``sizes`` (group -> n), ``groups`` (group -> [(key, axis), ...] in key order)
    and ``cost_keys`` (keys with at least one group, minus BN running stats and
    ``num_batches_tracked``, which are permuted but do not enter weight-matching costs).
    """

    axes: Mapping[str, Axes]
    shapes: Mapping[str, tuple[int, ...]]
    reshape: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    features: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
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
        cost_keys = tuple(k for k, ax in axes.items()
                          if any(g is not None for g in ax) and not k.endswith(NON_COST_SUFFIXES))
        for name, value in (("axes", axes), ("shapes", shapes), ("reshape", reshape),
                            ("features", features), ("sizes", sizes), ("groups", groups),
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


def mlp_spec(model: MLP) -> PermutationSpec:
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


def vgg_spec(model: VGG) -> PermutationSpec:
    """``features.conv{i}`` (and its BN) outputs are ``P_conv{i}``; the classifier reads the
    flattened last map, viewed per channel."""
    b = SpecBuilder(model)
    prev = None
    for i in range(1, model.n_conv + 1):
        group = f"P_conv{i}"
        b.conv(f"features.conv{i}", group, prev)
        if b.has(f"features.bn{i}.weight"):
            b.norm(f"features.bn{i}", group)
        b.feature(group, f"features.relu{i}")
        prev = group
    b.dense_from_map("out", None, prev, b.n_out(f"features.conv{model.n_conv}"))
    return b.build()


def _basic_block(b: SpecBuilder, name: str, inp: str, out: str) -> None:
    """``name`` = ``layer{l}.{j}``: conv1/norm1 -> inner group; conv2/norm2 and the shortcut
    write the residual stream ``out``. Without a shortcut conv the stream passes through
    unchanged, so ``inp`` must be ``out``."""
    inner = f"P_{name}.inner"
    b.conv(f"{name}.conv1", inner, inp)
    b.norm(f"{name}.norm1", inner)
    b.conv(f"{name}.conv2", out, inner)
    b.norm(f"{name}.norm2", out)
    if b.has(f"{name}.shortcut.conv.weight"):
        b.conv(f"{name}.shortcut.conv", out, inp)
        b.norm(f"{name}.shortcut.norm", out)
    elif inp != out:
        raise ValueError(f"{name} has an identity shortcut but changes stream {inp} -> {out}")
    b.feature(inner, f"{name}.relu1")
    b.feature(out, name)


def resnet20_spec(model: ResNet20) -> PermutationSpec:
    """One group per residual stream (``P_res{l}``, the stem writes ``P_res1``) and one per
    block's inner channels (``P_layer{l}.{j}.inner``); ``fc`` reads ``P_res3``."""
    b = SpecBuilder(model)
    stream = "P_res1"
    b.conv("stem.conv", stream, None)
    b.norm("stem.norm", stream)
    b.feature(stream, "stem")
    stage = 1
    while hasattr(model, f"layer{stage}"):
        out = f"P_res{stage}"
        for j in range(len(getattr(model, f"layer{stage}"))):
            _basic_block(b, f"layer{stage}.{j}", stream, out)
            stream = out
        stage += 1
    b.dense("fc", None, stream)
    return b.build()


SPEC_BUILDERS: dict[type, Callable[[nn.Module], PermutationSpec]] = {
    MLP: mlp_spec, VGG: vgg_spec, ResNet20: resnet20_spec,
}


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The spec of ``model``, by its class (see :data:`SPEC_BUILDERS`)."""
    for cls, builder in SPEC_BUILDERS.items():
        if isinstance(model, cls):
            return builder(model)
    raise TypeError(f"no permutation spec for {type(model).__name__}; "
                    f"known: {[c.__name__ for c in SPEC_BUILDERS]}")


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


def _cost_tensors(spec: PermutationSpec, state: Mapping[str, Tensor], device) -> dict[str, Tensor]:
    return {k: spec.view(k, state[k]).to(device=device, dtype=torch.float64) for k in spec.cost_keys}


def matching_objective(spec: PermutationSpec, state_a: Mapping[str, Tensor],
                       state_b: Mapping[str, Tensor], perm: Mapping[str, Tensor] | None = None
                       ) -> float:
    """``sum over cost keys <A[k], perm(B)[k]>`` in float64, the weight-matching objective."""
    perm = {} if perm is None else perm
    total = 0.0
    for k in spec.cost_keys:
        a = spec.view(k, state_a[k]).double()
        b = _permute(spec.view(k, state_b[k]).to(a.device).double(), spec.axes[k], perm)
        total += float((a * b).sum())
    return total


def _flat_axis(t: Tensor, axis: int) -> Tensor:
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, Tensor],
                    state_b: Mapping[str, Tensor], max_sweeps: int = 100, seed: int = 0,
                    log: Callable[[str], None] | None = None) -> tuple[dict[str, Tensor], dict]:
    """Permutation of B maximising ``sum_k <A[k], perm(B)[k]>`` by coordinate ascent.

    Starting from the identity, each sweep visits every group once, in an order drawn from a
    generator seeded with ``seed``; for group P, with all other groups fixed,
    ``C = sum_{(k, axis) in P} A_k(axis first, flattened) @ B'_k(axis first, flattened)^T``
    (``B'`` = B with the other groups' current permutations) is a linear assignment problem
    solved exactly (``scipy.optimize.linear_sum_assignment``). P changes only if that
    improves ``<C, P>`` by more than 1e-12 relative, so the objective never decreases.
    Stops after a sweep without improvement or ``max_sweeps`` sweeps.

    Costs are float64 on ``state_a``'s device; only the n x n matrices go to the CPU.
    Returns ``(perm, info)``: perm maps B onto A (``apply_permutation(spec, perm, state_b)``
    is the aligned B), long tensors on the CPU; ``info = {"objective": final objective,
    "sweeps": sweeps run, "history": objective at start and after each sweep,
    "seconds": wall time, "seconds_cost"/"seconds_assignment": time building the cost
    matrices / solving the assignments}``.
    """
    start_time = time.perf_counter()
    spec.check_state(state_a)
    spec.check_state(state_b)
    if not spec.cost_keys:
        raise ValueError("the spec has no permuted tensors")
    device = state_a[spec.cost_keys[0]].device
    A = _cost_tensors(spec, state_a, device)
    B = _cost_tensors(spec, state_b, device)
    cost_set = set(spec.cost_keys)
    names = sorted(spec.groups)
    perm = {g: torch.arange(spec.sizes[g], device=device) for g in names}
    gen = torch.Generator().manual_seed(int(seed))

    def objective() -> float:
        return float(sum((A[k] * _permute(B[k], spec.axes[k], perm)).sum() for k in spec.cost_keys))

    history = [objective()]
    seconds_cost = seconds_assignment = 0.0
    if log:
        log(f"weight matching: {len(names)} groups, start objective {history[0]:.6g}")
    sweeps = 0
    for sweeps in range(1, int(max_sweeps) + 1):
        changed = []
        for gi in torch.randperm(len(names), generator=gen).tolist():
            group = names[gi]
            n = spec.sizes[group]
            tic = time.perf_counter()
            cost = torch.zeros(n, n, dtype=torch.float64, device=device)
            for key, axis in spec.groups[group]:
                if key not in cost_set:
                    continue
                b = _permute(B[key], spec.axes[key], perm, skip=axis)
                cost += _flat_axis(A[key], axis) @ _flat_axis(b, axis).T
            c = cost.cpu().numpy()
            toc = time.perf_counter()
            _, cols = linear_sum_assignment(c, maximize=True)
            seconds_cost += toc - tic
            seconds_assignment += time.perf_counter() - toc
            rows = np.arange(n)
            old = float(c[rows, perm[group].cpu().numpy()].sum())
            new = float(c[rows, cols].sum())
            if new - old > 1e-12 * max(abs(old), abs(new)):
                perm[group] = torch.from_numpy(cols).to(device=device, dtype=torch.long)
                changed.append(group)
        history.append(objective())
        if log:
            log(f"weight matching sweep {sweeps}: objective {history[-1]:.6g}, "
                f"{len(changed)}/{len(names)} groups changed")
        if not changed:
            break
    info = {"objective": history[-1], "sweeps": sweeps, "history": history,
            "seconds": time.perf_counter() - start_time, "seconds_cost": seconds_cost,
            "seconds_assignment": seconds_assignment}
    return {g: p.cpu() for g, p in perm.items()}, info


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


def _as_observations(feats: Tensor, n: int) -> Tensor:
    """Hooked output flattened ``(B, n*S)`` (NC... layout) -> ``(B*S, n)``."""
    batch = feats.shape[0]
    if feats.shape[1] % n:
        raise ValueError(f"feature width {feats.shape[1]} is not a multiple of {n} units")
    return feats.reshape(batch, n, -1).transpose(1, 2).reshape(-1, n)


@torch.no_grad()
def activation_matching(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec | None,
                        data, num_batches: int, batch_size: int, cost: str = "correlation",
                        device="cpu", log: Callable[[str], None] | None = None
                        ) -> tuple[dict[str, Tensor], dict]:
    """Match every group's units by the similarity of their activations on training data.

    Both models run in eval mode (BN with running stats) on
    ``data.train_x[:num_batches * batch_size]`` in order, normalized with
    ``data.normalize``. The outputs of the modules in ``spec.features[group]`` (post-ReLU
    features; conv maps count every spatial position as an observation, several modules of a
    group count as extra observations) are accumulated in one streaming float64 pass (sums,
    sums of squares, cross products). Each group is then one linear assignment maximising
    the Pearson correlation (``cost="correlation"``) or the inner product
    (``"inner_product"``) between A's unit i and B's unit perm[i].

    The models are moved to ``device``; their train/eval mode is restored afterwards.
    Returns ``(perm, info)`` with perm as in :func:`weight_matching` and
    ``info = {"objective": mean matched cost over all units, "sweeps": 0,
    "per_group": {group: mean matched cost}, "samples": images used}``.
    """
    if cost not in ("correlation", "inner_product"):
        raise ValueError(f"cost must be 'correlation' or 'inner_product', got {cost!r}")
    spec = permutation_spec(model_a) if spec is None else spec
    missing = sorted(set(spec.groups) - set(spec.features))
    if missing:
        raise ValueError(f"spec has no feature modules for groups {missing}")
    x_all = data.train_x[: int(num_batches) * int(batch_size)]
    if len(x_all) == 0:
        raise ValueError("no training samples (num_batches * batch_size == 0)")
    modes = (model_a.training, model_b.training)
    model_a.to(device).eval()
    model_b.to(device).eval()
    names = sorted(spec.groups)
    layers = sorted({m for g in names for m in spec.features[g]})
    moments = {g: _Moments(spec.sizes[g], device) for g in names}
    try:
        with capture(model_a, layers) as store_a, capture(model_b, layers) as store_b:
            for i, start in enumerate(range(0, len(x_all), int(batch_size)), start=1):
                x = data.normalize(x_all[start:start + int(batch_size)].to(device))
                model_a(x)
                model_b(x)
                for g in names:
                    n = spec.sizes[g]
                    for module in spec.features[g]:
                        moments[g].update(_as_observations(store_a[module], n),
                                          _as_observations(store_b[module], n))
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
    info = {"objective": total / units, "sweeps": 0, "per_group": per_group,
            "samples": int(len(x_all))}
    if log:
        log(f"activation matching ({cost}): mean matched {info['objective']:.6g}")
    return perm, info
