"""Model zoo of the papers: MLP, LeNet-5, VGG-11/16, CIFAR ResNet-20 and CIFAR ResNet-18, plus
a small ViT (lmcflow.vit) for the any-model experiments.

Every model takes ``(in_shape, num_classes, **its own args)`` with ``in_shape = (C, H, W)``
and returns logits of shape ``(B, num_classes)`` for inputs ``(B, C, H, W)``.

Every model also names its *feature layers* (``model.feature_layers()``): module names, keys
of ``model.named_modules()``, in forward order, whose outputs are the layer features used by
LLFC and layer-wise LMC. Features are read with forward hooks, hence two rules:

* every ReLU is its own ``nn.ReLU()`` module (``inplace=False``, never re-used), so a hook on
  it sees exactly one activation and a hook on the preceding layer sees the pre-activation
  unchanged;
* no dropout, except in VGG's optional hidden classifier (``dropout``, training only), so eval
  forward passes are deterministic.

Module names are stable (``fc1``, ``features.conv3``, ``layer2.0.conv1``...) because the
permutation-alignment code (Git Re-Basin) addresses parameters by these names.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import sys
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["MLP", "LeNet", "VGG", "ResNet20", "ChannelLayerNorm", "MODELS", "EXTERNAL", "model_class",
           "external_factory", "build_model", "call_counts", "modules_called_once",
           "default_feature_layers", "logits_module", "FIRST_FEATURES",
           "feature_layers", "has_batchnorm"]


def _check_in_shape(in_shape) -> tuple[int, int, int]:
    """Validate ``(C, H, W)``; models need it to size their first and last layers."""
    shape = tuple(int(s) for s in in_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"in_shape must be (C, H, W) with positive sizes, got {in_shape!r}")
    return shape


class MLP(nn.Module):
    """Fully connected ReLU network ``in -> width x depth -> num_classes``.

    The paper model is 784-512-512-512-10 (``width=512, depth=3`` on MNIST). The input
    ``(B, C, H, W)`` is flattened to ``(B, C*H*W)``; hidden layers are ``fc{i}`` followed by
    ``relu{i}``, the classifier is ``out``.
    """

    def __init__(self, in_shape, num_classes: int, width: int = 512, depth: int = 3):
        super().__init__()
        c, h, w = _check_in_shape(in_shape)
        if int(depth) < 1:
            raise ValueError(f"MLP depth must be >= 1, got {depth!r}")
        if int(width) < 1:
            raise ValueError(f"MLP width must be >= 1, got {width!r}")
        self.depth = int(depth)
        self.flatten = nn.Flatten()
        fan_in = c * h * w
        for i in range(1, self.depth + 1):
            setattr(self, f"fc{i}", nn.Linear(fan_in, int(width)))
            setattr(self, f"relu{i}", nn.ReLU())
            fan_in = int(width)
        self.out = nn.Linear(fan_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)  # (B, C*H*W)
        for i in range(1, self.depth + 1):
            x = getattr(self, f"relu{i}")(getattr(self, f"fc{i}")(x))  # (B, width)
        return self.out(x)  # (B, num_classes)

    def feature_layers(self) -> list[str]:
        """Every Linear output (pre-activation) and every ReLU output, then the logits."""
        names = [n for i in range(1, self.depth + 1) for n in (f"fc{i}", f"relu{i}")]
        return names + ["out"]


class LeNet(nn.Module):
    """LeNet-5 as in the LLFC paper's MNIST experiments (zzp1012/LLFC ``mnist_lenet.py``).

    ``conv1`` (5x5, padding 2, 6·width channels) ``relu1 pool1``, ``conv2`` (5x5, 16·width)
    ``relu2 pool2``, flatten, ``fc1`` (120·width) ``relu3``, ``fc2`` (84·width) ``relu4``,
    ``out``. 28x28 inputs: 28 -> 14 -> 10 -> 5, so fc1 reads 16·5·5 = 400 features.
    """

    def __init__(self, in_shape, num_classes: int, width: float = 1.0):
        super().__init__()
        c, h, w = _check_in_shape(in_shape)
        if not float(width) > 0:
            raise ValueError(f"LeNet width must be > 0, got {width!r}")
        size = lambda n: max(1, round(n * float(width)))  # noqa: E731
        self.conv1 = nn.Conv2d(c, size(6), 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(size(6), size(16), 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        h, w = (h // 2 - 4) // 2, (w // 2 - 4) // 2
        if min(h, w) < 1:
            raise ValueError(f"LeNet needs inputs of at least 12x12, got {in_shape!r}")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(size(16) * h * w, size(120))
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(size(120), size(84))
        self.relu4 = nn.ReLU()
        self.out = nn.Linear(size(84), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))  # (B, 6w, H/2, W/2)
        x = self.pool2(self.relu2(self.conv2(x)))  # (B, 16w, 5, 5) for 28x28
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.out(self.relu4(self.fc2(x)))  # (B, num_classes)

    def feature_layers(self) -> list[str]:
        """Every conv/Linear output and every ReLU output, then the logits."""
        return ["conv1", "relu1", "conv2", "relu2", "fc1", "relu3", "fc2", "relu4", "out"]


VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-11/16: ``features`` (conv3x3 [+BN] + ReLU blocks and 2x2 max pools), an optional
    hidden ``classifier``, then ``out``.

    Channels are the standard ones times ``width`` (rounded, at least 1). A pool is skipped
    when the feature map is already smaller than 2x2, so 28x28 inputs work
    (28 -> 14 -> 7 -> 3 -> 1, last pool skipped) as well as 32x32 (32 -> ... -> 1). The
    classifier reads the flattened final map ``(B, C_last*H_last*W_last)`` (1x1 for these
    inputs): with ``classifier=[]`` it is the single Linear ``out``; with hidden widths, e.g.
    the LLFC paper's ``[4096, 4096]`` (512 -> 4096 -> 4096 -> classes), it is
    ``classifier.fc{i} classifier.relu{i} [classifier.drop{i}]`` per hidden layer, then ``out``.
    ``dropout`` (LLFC: 0.5) acts in training only.
    """

    def __init__(self, in_shape, num_classes: int, depth: int = 11, batch_norm: bool = True,
                 width: float = 1.0, classifier: list[int] | tuple[int, ...] = (),
                 dropout: float = 0.0):
        super().__init__()
        c, h, w = _check_in_shape(in_shape)
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}")
        if not float(width) > 0:
            raise ValueError(f"VGG width must be > 0, got {width!r}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        n_conv = n_pool = 0
        for item in VGG_CONFIGS[depth]:
            if item == "M":
                if min(h, w) < 2:  # nothing left to pool (e.g. 28x28 input reaches 1x1 early)
                    continue
                n_pool += 1
                layers[f"pool{n_pool}"] = nn.MaxPool2d(2)
                h, w = h // 2, w // 2
                continue
            n_conv += 1
            out_c = max(1, round(item * float(width)))
            layers[f"conv{n_conv}"] = nn.Conv2d(c, out_c, 3, padding=1)
            if batch_norm:
                layers[f"bn{n_conv}"] = nn.BatchNorm2d(out_c)
            layers[f"relu{n_conv}"] = nn.ReLU()
            c = out_c
        self.n_conv = n_conv
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten()
        if any(int(n) < 1 for n in classifier) or not 0 <= float(dropout) < 1:
            raise ValueError(f"VGG classifier widths must be >= 1 and 0 <= dropout < 1, got "
                             f"{list(classifier)!r}, {dropout!r}")
        self.n_hidden = len(classifier)
        hidden: OrderedDict[str, nn.Module] = OrderedDict()
        fan_in = c * h * w
        for i, n in enumerate(classifier, start=1):
            hidden[f"fc{i}"] = nn.Linear(fan_in, int(n))
            hidden[f"relu{i}"] = nn.ReLU()
            if dropout:
                hidden[f"drop{i}"] = nn.Dropout(float(dropout))
            fan_in = int(n)
        self.classifier = nn.Sequential(hidden)  # empty: the identity
        self.out = nn.Linear(fan_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, C_last, H_last, W_last)
        return self.out(self.classifier(self.flatten(x)))  # (B, num_classes)

    def feature_layers(self) -> list[str]:
        """Every conv output (pre-BN) and every ReLU output, the hidden classifier's Linear and
        ReLU outputs, then the logits; no BN/pools/dropout."""
        names = [f"features.{n}{i}" for i in range(1, self.n_conv + 1) for n in ("conv", "relu")]
        names += [f"classifier.{n}{i}" for i in range(1, self.n_hidden + 1) for n in ("fc", "relu")]
        return names + ["out"]


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels at every position of a ``(B, C, H, W)`` map, with a
    per-channel affine: the "LayerNorm" of Git Re-Basin's and REPAIR's ResNet-20 (flax
    LayerNorm on NHWC). Its state is ``weight`` and ``bias`` of shape ``(C,)``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


NORMS = ("bn", "ln", "gn")


def _norm(kind: str, channels: int) -> nn.Module:
    """``"bn"``: BatchNorm2d; ``"ln"``: LayerNorm over the channels at each position
    (:class:`ChannelLayerNorm`); ``"gn"``: GroupNorm(1, C), a LayerNorm over (C, H, W) with a
    per-channel affine. All commute with channel permutations."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return ChannelLayerNorm(channels)
    if kind == "gn":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"ResNet20 norm must be one of {NORMS}, got {kind!r}")


class BasicBlock(nn.Module):
    """``relu2(norm2(conv2(relu1(norm1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is a conv (``shortcut_kernel`` 1 or 3) + norm when stride or channels change,
    else the identity (no module, so no parameters to permute).
    ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)``.
    """

    def __init__(self, in_c: int, out_c: int, stride: int, norm: str, shortcut_kernel: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_c, out_c, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, out_c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_c, out_c, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_c)
        self.relu2 = nn.ReLU()
        self.shortcut = None
        if stride != 1 or in_c != out_c:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_c, out_c, shortcut_kernel, stride=stride,
                               padding=shortcut_kernel // 2, bias=False),
                norm=_norm(norm, out_c)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + skip)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): stem, 3 stages x 3 BasicBlocks, global pool, ``fc``.

    Stage channels are ``round(16w), round(32w), round(64w)``; stages 2 and 3 halve the
    spatial size. ``(B, C, H, W) -> stem (B, 16w, H, W) -> ... -> (B, 64w, H/4, W/4)
    -> mean over space (B, 64w) -> fc (B, num_classes)``. ``norm``: see :func:`_norm`
    (Git Re-Basin and REPAIR use "ln"); the downsampling shortcuts are convs with
    ``shortcut_kernel`` 1 (option B) or 3 (the references' Git Re-Basin ResNet-20).
    """

    def __init__(self, in_shape, num_classes: int, width: float = 1, norm: str = "bn",
                 shortcut_kernel: int = 1):
        super().__init__()
        c, _, _ = _check_in_shape(in_shape)
        if not float(width) > 0:
            raise ValueError(f"ResNet20 width must be > 0, got {width!r}")
        if shortcut_kernel not in (1, 3):
            raise ValueError(f"ResNet20 shortcut_kernel must be 1 or 3, got {shortcut_kernel!r}")
        _norm(norm, 1)  # fail early with a clear message on a bad norm
        chans = [max(1, round(base * float(width))) for base in (16, 32, 64)]
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(c, chans[0], 3, padding=1, bias=False),
            norm=_norm(norm, chans[0]),
            relu=nn.ReLU()))
        in_c = chans[0]
        for i, out_c in enumerate(chans, start=1):
            blocks = []
            for j in range(3):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(BasicBlock(in_c, out_c, stride, norm, shortcut_kernel))
                in_c = out_c
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))  # (B, 64w, H/4, W/4)
        return self.fc(self.flatten(self.pool(x)))  # (B, num_classes)

    def feature_layers(self, first_feature: str = "stem") -> list[str]:
        """Stem output (after its ReLU; with ``first_feature="conv1"`` the stem's conv output,
        before its norm, as the official LLFC code reads a ResNet), every residual block output
        (after its final ReLU), then the logits."""
        first = {"stem": "stem", "conv1": "stem.conv"}[_first_feature(first_feature)]
        return [first] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)] + ["fc"]


# arch -> class, or "module:Class" for models kept in their own module (loaded on use)
MODELS: dict[str, type[nn.Module] | str] = {"mlp": MLP, "lenet": LeNet, "vgg": VGG,
                                            "resnet20": ResNet20, "resnet18": "resnet18:ResNet18",
                                            "vit": "vit:ViT"}


def model_class(arch: str) -> type[nn.Module]:
    """The class registered for ``arch`` (imported on first use where it is lazy)."""
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; choices: {sorted(MODELS)}")
    cls = MODELS[arch]
    if isinstance(cls, str):
        module, name = cls.split(":")
        cls = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    return cls


EXTERNAL = ("torchvision:", "timm:", "python:")  # arch prefixes of models from elsewhere
TIMM_MISSING = "needs the optional package timm, which is not installed: pip install timm"


def import_timm(arch: str = "timm:<name>"):
    """The optional ``timm`` package, or an ImportError that says how to install it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"{arch} {TIMM_MISSING}") from err
    return timm


def _signature_accepts(fn: Callable, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def external_factory(arch: str, path: str | None = None) -> Callable[..., nn.Module]:
    """The factory of ``torchvision:<name>`` (``torchvision.models.get_model(name)``, untrained),
    ``timm:<name>`` (``timm.create_model(name, pretrained=False)``: timm is an optional
    dependency, never asked for weights) or ``python:<module>:<callable>`` (the module found on
    sys.path or in the directory ``path``). Errors name what was looked for and suggest close
    matches."""
    kind, _, name = arch.partition(":")
    if kind == "torchvision":
        import torchvision.models as tvm

        if name not in tvm.list_models():
            close = difflib.get_close_matches(name, tvm.list_models(), n=3)
            raise ValueError(f"unknown torchvision model {name!r}" +
                             (f"; did you mean {', '.join(close)}?" if close else ""))
        return lambda **kwargs: tvm.get_model(name, weights=None, **kwargs)
    if kind == "timm":
        timm = import_timm(arch)
        if not name or not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise ValueError(f"unknown timm model {name!r}" +
                             (f"; did you mean {', '.join(close)}?" if close else ""))

        def create(**kwargs):
            if kwargs.get("pretrained"):
                raise ValueError(f"{arch}: models are built untrained (pretrained weights would "
                                 "need the network); drop pretrained from kwargs")
            kwargs.pop("pretrained", None)
            return timm.create_model(name, pretrained=False, **kwargs)
        return create
    if kind == "python":
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise ValueError(f"a python model is named python:<module>:<callable>, got {arch!r}")
        if path and str(path) not in sys.path:
            sys.path.insert(0, str(path))
        factory = getattr(importlib.import_module(module), attr, None)
        if not callable(factory):
            raise ValueError(f"{module} has no callable {attr!r}")
        return factory
    raise ValueError(f"unknown model source {kind!r}; use torchvision:<name>, timm:<name> or "
                     "python:<module>:<callable>")


def _build_external(arch: str, in_shape, num_classes: int, kwargs: dict | None,
                    path: str | None) -> nn.Module:
    """Call the factory with the config's kwargs, plus ``num_classes`` and ``in_shape`` where it
    accepts them (timm: ``num_classes`` and ``in_chans``, the images' channels); check that it
    takes a batch of the dataset's images."""
    factory = external_factory(arch, path)
    kwargs = dict(kwargs or {})
    given = {"num_classes": int(num_classes), "in_shape": tuple(in_shape)}
    if arch.startswith("torchvision:"):  # every classification builder takes num_classes
        accepts = {"num_classes"}
    elif arch.startswith("timm:"):  # create_model passes both to every model
        given = {"num_classes": int(num_classes), "in_chans": int(in_shape[0])}
        accepts = set(given)
    else:
        target = factory.__init__ if isinstance(factory, type) else factory
        accepts = {k for k in given if _signature_accepts(target, k)}
    kwargs = {**{k: v for k, v in given.items() if k in accepts}, **kwargs}
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{arch} returned a {type(model).__name__}, not an nn.Module")
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *in_shape))
    except Exception as err:
        hint = ("; a model with a fixed input size takes the dataset's in kwargs (img_size)"
                if arch.startswith("timm:") else "")
        raise ValueError(f"{arch} cannot take a batch of the dataset's images {tuple(in_shape)} "
                         f"({type(err).__name__}: {err}){hint}") from err
    if tuple(out.shape) != (2, int(num_classes)):
        raise ValueError(f"{arch} returns outputs of shape {tuple(out.shape[1:])} per image, not "
                         f"({num_classes},) logits of the dataset's classes")
    return model


def build_model(arch: str, in_shape: tuple[int, int, int], num_classes: int, **args) -> nn.Module:
    """A built-in ``model_class(arch)(in_shape, num_classes, **args)``, or for
    ``torchvision:``/``python:`` archs the factory's model (args ``kwargs``, ``path``).

    Built-in arguments are checked against the constructor signature first, so a typo in a
    config (``widht: 2``) fails loudly instead of silently using a default. Any model may name
    its feature layers (``feature_layers``: module names); otherwise built-ins name their own
    and other models use :func:`default_feature_layers`; and its layer-wise groups
    (``layer_groups``: modules whose subtree is one group, see `layerwise.layer_groups`). The
    model remembers ``in_shape``.
    """
    features = args.pop("feature_layers", None)
    groups = args.pop("layer_groups", None)
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    if arch.startswith(EXTERNAL):
        unknown = sorted(set(args) - {"kwargs", "path"})
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown} for arch {arch!r}; accepted: "
                             "kwargs, path, feature_layers, layer_groups")
        model = _build_external(arch, in_shape, num_classes, args.get("kwargs"), args.get("path"))
    else:
        cls = model_class(arch)
        accepted = [p for p in inspect.signature(cls.__init__).parameters
                    if p not in ("self", "in_shape", "num_classes")]
        unknown = sorted(set(args) - set(accepted))
        if unknown:
            raise ValueError(f"unknown argument(s) {unknown} for arch {arch!r}; accepted: "
                             f"{accepted}")
        try:
            model = cls(in_shape, int(num_classes), **args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid argument for arch {arch!r} ({e}); accepted: {accepted}") from e
    model.in_shape = tuple(int(s) for s in in_shape)
    if features is not None:
        modules = dict(model.named_modules())
        missing = [n for n in features if n not in modules]
        if missing:
            close = {n: difflib.get_close_matches(n, modules, n=2) for n in missing}
            raise ValueError(f"feature_layers {missing} are not modules of {arch}; close: {close}")
        model.lmcflow_feature_layers = list(features)
    if groups is not None:
        missing = [n for n in groups if n not in dict(model.named_modules())]
        if missing:
            raise ValueError(f"layer_groups {missing} are not modules of {arch}")
        model.lmcflow_layer_groups = list(groups)
    return model


def _zeros(model: nn.Module, in_shape) -> Tensor:
    """A batch of one zero input where the model's parameters lie."""
    param = next(model.parameters(), None)
    return torch.zeros(1, *in_shape, device=param.device if param is not None else "cpu")


def call_counts(model: nn.Module, in_shape=None) -> dict[str, int]:
    """How often each module is called in one forward pass (on zeros of ``in_shape``, default
    ``model.in_shape``), in the order of their first call. A module called more than once (a
    ReLU a block re-uses) has no single output or input to read, hook or rescale."""
    counts: dict[str, int] = {}
    handles = [m.register_forward_pre_hook(
        lambda _m, _a, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
        for name, m in model.named_modules() if name]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(_zeros(model, in_shape or model.in_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return counts


def modules_called_once(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """Modules of ``kinds`` (registration order) called exactly once per forward pass; all of
    them for a model that does not know its input shape (``model.in_shape``)."""
    once = ({n for n, c in call_counts(model).items() if c == 1} if hasattr(model, "in_shape")
            else None)
    return [name for name, m in model.named_modules()
            if isinstance(m, kinds) and (once is None or name in once)]


def logits_module(model: nn.Module, in_shape=None) -> str:
    """Name of the module whose output is the network's output (the logits): of the modules
    that return the very tensor the model returns in a forward pass (on zeros of ``in_shape``,
    default ``model.in_shape``), the leaf called last (``out``, ``fc``, ``head``...); ``""``
    (the model itself) when no module returns it (the output is made by a function after the
    last module). A model without ``in_shape`` falls back to its last leaf module that is a
    Linear."""
    shape = in_shape or getattr(model, "in_shape", None)
    if shape is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else ""
    outputs: list[tuple[str, object]] = []
    handles = [m.register_forward_hook(lambda _m, _i, out, n=name: outputs.append((n, out)))
               for name, m in model.named_modules() if name and not any(True for _ in m.children())]
    training = model.training
    try:
        with torch.no_grad():
            result = model.eval()(_zeros(model, shape))
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    names = [n for n, out in outputs if out is result]
    return names[-1] if names else ""


def default_feature_layers(model: nn.Module, in_shape=None) -> list[str]:
    """Every Linear/Conv module (leaves) called exactly once, in the order of the forward pass:
    the feature layers of a model that does not name its own (the last is usually the logits)."""
    modules = dict(model.named_modules())
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [n for n, c in call_counts(model, in_shape).items()
            if c == 1 and isinstance(modules[n], kinds)]


FIRST_FEATURES = ("stem", "conv1")


def _first_feature(value: str) -> str:
    if value not in FIRST_FEATURES:
        raise ValueError(f"first_feature must be one of {FIRST_FEATURES}, got {value!r}")
    return value


def feature_layers(model: nn.Module, first_feature: str = "stem") -> list[str]:
    """Module names whose outputs are the layer features, in forward order: those the config
    names, else the model's own ``feature_layers()``, else :func:`default_feature_layers`.

    ``first_feature`` ("stem" or "conv1", `llfc.first_feature`) is the first feature of a
    built-in ResNet: its stem after the ReLU, or the stem's conv before the norm (the official
    LLFC code's ``conv1``); the other models' first feature already is their first Linear/Conv
    output, and a list the config names is used as it is."""
    _first_feature(first_feature)
    if getattr(model, "lmcflow_feature_layers", None):
        return list(model.lmcflow_feature_layers)
    if hasattr(model, "feature_layers"):
        if "first_feature" in inspect.signature(model.feature_layers).parameters:
            return model.feature_layers(first_feature=first_feature)
        return model.feature_layers()
    return default_feature_layers(model)


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers (their running stats need a reset after
    interpolating or permuting weights)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
