"""CIFAR ResNet-18 of the layer-wise LMC paper, built on torchvision's ResNet.

The official code (link-er/layer-wise-lmc) uses ``torchvision.models.resnet18(norm_layer=
nn.Identity, num_classes=10)`` with a 3x3 stride-1 stem convolution and no max-pool. This
module makes the same network from torchvision's classes, with two changes our hooks need
(see lmcflow.models): every ReLU is its own non-in-place module (torchvision's BasicBlock calls
one in-place ReLU twice), and a width multiplier. Kept in its own module so that importing
lmcflow.models does not import torchvision.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet


class _Block(resnet.BasicBlock):
    """torchvision's BasicBlock with its ReLU split into ``relu1`` and ``relu2`` (not in place)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.relu
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + skip)


class ResNet18(resnet.ResNet):
    """CIFAR ResNet-18: stem ``conv1`` (3x3, stride 1) ``bn1 relu``, no max-pool, four stages
    ``layer1..layer4`` of two BasicBlocks (channels 64w, 128w, 256w, 512w; stages 2-4 halve the
    size, their first block has a 1x1 ``downsample`` conv + norm), global average pool, ``fc``.

    ``norm``: "none" (the layer-wise paper: ``nn.Identity``, no state) or "bn" (BatchNorm2d).
    Module names are torchvision's (``layer2.0.downsample.0``...).
    """

    def __init__(self, in_shape, num_classes: int, width: float = 1.0, norm: str = "none"):
        from .models import _check_in_shape

        c, _, _ = _check_in_shape(in_shape)
        if norm not in ("none", "bn"):
            raise ValueError(f"ResNet18 norm must be 'none' or 'bn', got {norm!r}")
        if not float(width) > 0:
            raise ValueError(f"ResNet18 width must be > 0, got {width!r}")
        self._width = float(width)
        self._stem_set = False
        super().__init__(_Block, [2, 2, 2, 2], num_classes=num_classes,
                         norm_layer=nn.Identity if norm == "none" else nn.BatchNorm2d)
        stem = self._channels(64)
        self.conv1 = nn.Conv2d(c, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = self._norm_layer(stem)
        self.relu = nn.ReLU()
        self.maxpool = nn.Identity()
        self.fc = nn.Linear(self._channels(512), num_classes)

    def _channels(self, n: int) -> int:
        return max(1, round(n * self._width))

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False):
        if not self._stem_set:  # torchvision sets inplanes = 64 for the stem before layer1
            self.inplanes, self._stem_set = self._channels(64), True
        return super()._make_layer(block, self._channels(planes), blocks, stride, dilate)

    def feature_layers(self, first_feature: str = "stem") -> list[str]:
        """Stem output (after its ReLU; with ``first_feature="conv1"`` the stem conv ``conv1``,
        before its norm, as the official LLFC code reads a ResNet), every residual block output,
        then the logits."""
        from .models import _first_feature

        first = {"stem": "relu", "conv1": "conv1"}[_first_feature(first_feature)]
        return [first] + [f"layer{i}.{j}" for i in (1, 2, 3, 4) for j in (0, 1)] + ["fc"]
