"""Model zoo of the papers: MLP, VGG-11/16 and CIFAR ResNet-20.

Every model takes ``(in_shape, num_classes, **its own args)`` with ``in_shape = (C, H, W)``
and returns logits of shape ``(B, num_classes)`` for inputs ``(B, C, H, W)``.

Every model also names its *feature layers* (``model.feature_layers()``): module names, keys
of ``model.named_modules()``, in forward order, whose outputs are the layer features used by
LLFC and layer-wise LMC. Features are read with forward hooks, hence two rules:

* every ReLU is its own ``nn.ReLU()`` module (``inplace=False``, never re-used), so a hook on
  it sees exactly one activation and a hook on the preceding layer sees the pre-activation
  unchanged;
* no dropout, so forward passes are deterministic in train and eval mode alike.

Module names are stable (``fc1``, ``features.conv3``, ``layer2.0.conv1``...) because the
permutation-alignment code (Git Re-Basin) addresses parameters by these names.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["MLP", "VGG", "ResNet20", "MODELS", "build_model", "feature_layers", "has_batchnorm"]


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


VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG-11/16: ``features`` (conv3x3 [+BN] + ReLU blocks and 2x2 max pools), then ``out``.

    Channels are the standard ones times ``width`` (rounded, at least 1). A pool is skipped
    when the feature map is already smaller than 2x2, so 28x28 inputs work
    (28 -> 14 -> 7 -> 3 -> 1, last pool skipped) as well as 32x32 (32 -> ... -> 1). The
    classifier is a single Linear on the flattened final map ``(B, C_last*H_last*W_last)``,
    which need not be 1x1 in general.
    """

    def __init__(self, in_shape, num_classes: int, depth: int = 11, batch_norm: bool = True,
                 width: float = 1.0):
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
        self.out = nn.Linear(c * h * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, C_last, H_last, W_last)
        return self.out(self.flatten(x))  # (B, num_classes)

    def feature_layers(self) -> list[str]:
        """Every conv output (pre-BN) and every ReLU output, then the logits; no BN/pools."""
        names = [f"features.{n}{i}" for i in range(1, self.n_conv + 1) for n in ("conv", "relu")]
        return names + ["out"]


def _norm(kind: str, channels: int) -> nn.Module:
    """``"bn"``: BatchNorm2d; ``"ln"``: GroupNorm(1, C), i.e. LayerNorm over (C, H, W) with a
    per-channel affine, which (unlike nn.LayerNorm over C*H*W) commutes with channel
    permutations."""
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"ResNet20 norm must be 'bn' or 'ln', got {kind!r}")


class BasicBlock(nn.Module):
    """``relu2(norm2(conv2(relu1(norm1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is a 1x1 conv + norm (option B) when stride or channels change, else the
    identity (no module, so no parameters to permute). ``(B, C_in, H, W) -> (B, C_out, H/s, W/s)``.
    """

    def __init__(self, in_c: int, out_c: int, stride: int, norm: str):
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
                conv=nn.Conv2d(in_c, out_c, 1, stride=stride, bias=False),
                norm=_norm(norm, out_c)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.relu1(self.norm1(self.conv1(x)))))
        skip = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + skip)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): stem, 3 stages x 3 BasicBlocks, global pool, ``fc``.

    Stage channels are ``round(16w), round(32w), round(64w)``; stages 2 and 3 halve the
    spatial size. ``(B, C, H, W) -> stem (B, 16w, H, W) -> ... -> (B, 64w, H/4, W/4)
    -> mean over space (B, 64w) -> fc (B, num_classes)``.
    """

    def __init__(self, in_shape, num_classes: int, width: float = 1, norm: str = "bn"):
        super().__init__()
        c, _, _ = _check_in_shape(in_shape)
        if not float(width) > 0:
            raise ValueError(f"ResNet20 width must be > 0, got {width!r}")
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
                blocks.append(BasicBlock(in_c, out_c, stride, norm))
                in_c = out_c
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))  # (B, 64w, H/4, W/4)
        return self.fc(self.flatten(self.pool(x)))  # (B, num_classes)

    def feature_layers(self) -> list[str]:
        """Stem output, every residual block output (after its final ReLU), then the logits."""
        return ["stem"] + [f"layer{i}.{j}" for i in (1, 2, 3) for j in range(3)] + ["fc"]


MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "vgg": VGG, "resnet20": ResNet20}


def build_model(arch: str, in_shape: tuple[int, int, int], num_classes: int, **args) -> nn.Module:
    """Instantiate ``MODELS[arch](in_shape, num_classes, **args)``.

    Arguments are checked against the constructor signature first, so a typo in a config
    (``widht: 2``) fails loudly instead of silently using a default.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown arch {arch!r}; choices: {sorted(MODELS)}")
    cls = MODELS[arch]
    accepted = [p for p in inspect.signature(cls.__init__).parameters
                if p not in ("self", "in_shape", "num_classes")]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for arch {arch!r}; accepted: {accepted}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    try:
        return cls(in_shape, int(num_classes), **args)
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid argument for arch {arch!r} ({e}); accepted: {accepted}") from e


def feature_layers(model: nn.Module) -> list[str]:
    """Module names whose outputs are the layer features, in forward order."""
    return model.feature_layers()


def has_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorm layers (their running stats need a reset after
    interpolating or permuting weights)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
