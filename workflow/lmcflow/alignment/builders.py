"""Hand-written permutation specs of the built-in architectures (the tracer's test oracle),
and :func:`permutation_spec`, which picks one or traces the model.

Conventions (PyTorch layouts): Linear weight ``(out, in)``, Conv2d weight
``(out, in, kh, kw)``, BatchNorm/GroupNorm weight, bias and running stats ``(C,)``,
``num_batches_tracked`` a scalar (no axis, never permuted). A tensor whose axis mixes a
channel with other dimensions (the classifier after ``flatten`` of a ``C x H x W`` map,
input index ``c*H*W + hw``) is listed with a *view shape* in ``spec.reshape``
(``(num_classes, C, H*W)``); its axes refer to that view.

Group names: MLP ``P_fc{i}``; VGG ``P_conv{i}`` (the conv's BN shares it); ResNet20 one group
per residual stream ``P_res{l}`` (stem and layer1 share ``P_res1``; the first block of
layer 2/3 maps the stream through its shortcut conv) and one per block's inner channels
``P_layer{l}.{b}.inner`` (conv1/norm1 output, conv2 input).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .spec import Axes, PermutationSpec

__all__ = ["SpecBuilder", "permutation_spec", "mlp_spec", "lenet_spec", "vgg_spec",
           "resnet20_spec", "resnet18_spec", "SPEC_BUILDERS"]


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
    else one traced with torch.fx (:func:`.trace.trace_spec`) on ``example_input``,
    or, without one, on ``torch.zeros(1, *model.in_shape)`` where the model has ``in_shape``
    (the built-in ViT). Raises TypeError when there is neither a builder nor an input."""
    for cls in type(model).__mro__:
        if cls.__name__ in SPEC_BUILDERS and cls.__module__.startswith("lmcflow"):
            return SPEC_BUILDERS[cls.__name__](model)
    if example_input is None and getattr(model, "in_shape", None) is not None:
        example_input = torch.zeros(1, *model.in_shape)
    if example_input is None:
        raise TypeError(f"no permutation spec for {type(model).__name__}: no hand-written builder "
                        f"(known: {sorted(SPEC_BUILDERS)}) and no example input to trace it with")
    from .trace import trace_spec

    return trace_spec(model, example_input)
