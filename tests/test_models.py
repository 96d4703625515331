"""Tests of lmcflow.models: shapes, feature-layer hooks, determinism, argument checking."""

import pytest
import torch
from torch import nn

from lmcflow.models import (MLP, MODELS, VGG, ChannelLayerNorm, ResNet20, build_model,
                            feature_layers, has_batchnorm, model_class)

SHAPES = [(1, 28, 28), (3, 32, 32)]
CASES = [
    ("mlp", {"width": 32, "depth": 1}, False),
    ("mlp", {"width": 32, "depth": 3}, False),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, True),
    ("vgg", {"depth": 11, "batch_norm": False, "width": 0.125}, False),
    ("vgg", {"depth": 16, "batch_norm": True, "width": 0.125}, True),
    ("vgg", {"depth": 16, "batch_norm": False, "width": 0.125}, False),
    ("resnet20", {"width": 1, "norm": "bn"}, True),
    ("resnet20", {"width": 1, "norm": "ln"}, False),
    ("resnet20", {"width": 2, "norm": "bn"}, True),
    ("resnet20", {"width": 2, "norm": "ln"}, False),
    ("resnet20", {"width": 1, "norm": "gn", "shortcut_kernel": 3}, False),
    ("lenet", {}, False),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125, "classifier": [32, 16]}, True),
    ("resnet18", {"width": 0.125, "norm": "none"}, False),
    ("resnet18", {"width": 0.125, "norm": "bn"}, True),
]
IDS = [f"{a}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for a, kw, _ in CASES]


@pytest.mark.parametrize("in_shape", SHAPES, ids=["28", "32"])
@pytest.mark.parametrize("arch,kwargs,bn", CASES, ids=IDS)
def test_forward_hooks_and_batchnorm(arch, kwargs, bn, in_shape):
    torch.manual_seed(0)
    model = build_model(arch, in_shape, 7, **kwargs)
    assert isinstance(model, model_class(arch))
    assert has_batchnorm(model) is bn

    names = feature_layers(model)
    assert names == model.feature_layers()
    assert len(names) == len(set(names))
    modules = dict(model.named_modules())
    fired = []
    for name in names:
        assert name in modules, name
        modules[name].register_forward_hook(lambda m, i, o, name=name: fired.append(name))

    x = torch.randn(2, *in_shape)
    for mode in (model.train, model.eval):
        mode()
        fired.clear()
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
        assert fired == names  # each exactly once, in the listed (forward) order
    assert names[-1] in ("out", "fc")


def test_relus_are_distinct_and_not_inplace():
    for model in (MLP((1, 28, 28), 10, width=16), VGG((3, 32, 32), 10, width=0.125),
                  ResNet20((3, 32, 32), 10), build_model("lenet", (1, 28, 28), 10),
                  build_model("resnet18", (3, 32, 32), 10, width=0.125)):
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        assert relus and all(not r.inplace for r in relus)
        assert len({id(r) for r in relus}) == len(relus)
        named = [n for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
        assert len(named) == len(relus)  # no module registered at two positions


def test_no_dropout_unless_asked_for():
    for arch, kw, _ in CASES:
        model = build_model(arch, (3, 32, 32), 10, **kw)
        assert not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
    vgg = build_model("vgg", (3, 32, 32), 10, width=0.125, classifier=[16, 16], dropout=0.5)
    assert [n for n, m in vgg.named_modules() if isinstance(m, nn.Dropout)] == \
        ["classifier.drop1", "classifier.drop2"]
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(vgg.eval()(x), vgg(x))  # eval: deterministic


def test_lenet_is_the_llfc_papers():
    m = build_model("lenet", (1, 28, 28), 10)
    assert sum(p.numel() for p in m.parameters()) == 61706  # LeNet-5
    assert m.fc1.in_features == 16 * 5 * 5 and m.conv1.padding == (2, 2)
    assert feature_layers(m) == ["conv1", "relu1", "conv2", "relu2", "fc1", "relu3", "fc2", "relu4",
                                 "out"]


def test_vgg_llfc_classifier():
    m = VGG((3, 32, 32), 10, depth=16, batch_norm=True, classifier=[4096, 4096], dropout=0.5)
    assert [(m.classifier.fc1.in_features, m.classifier.fc1.out_features),
            (m.classifier.fc2.in_features, m.classifier.fc2.out_features),
            (m.out.in_features, m.out.out_features)] == [(512, 4096), (4096, 4096), (4096, 10)]
    assert feature_layers(m)[-5:] == ["classifier.fc1", "classifier.relu1", "classifier.fc2",
                                      "classifier.relu2", "out"]


def test_resnet18_is_torchvisions_cifar_variant():
    from torchvision.models.resnet import BasicBlock, ResNet

    m = build_model("resnet18", (3, 32, 32), 10)
    assert isinstance(m, ResNet) and all(isinstance(b, BasicBlock) for b in m.layer1)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity) and isinstance(m.bn1, nn.Identity)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())
    assert [b.conv2.out_channels for b in (m.layer1[0], m.layer2[0], m.layer3[0], m.layer4[0])] == \
        [64, 128, 256, 512]
    # the official code's network: same tensors, names and shapes
    from torchvision.models import resnet18

    official = resnet18(norm_layer=nn.Identity, num_classes=10)
    official.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    official.maxpool = nn.Identity()
    assert {k: v.shape for k, v in m.state_dict().items()} == \
        {k: v.shape for k, v in official.state_dict().items()}
    feats = {}
    for n in m.feature_layers():
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o))
    m(torch.randn(2, 3, 32, 32))
    assert feats["relu"].shape == (2, 64, 32, 32) and feats["layer4.1"].shape == (2, 512, 4, 4)
    half = build_model("resnet18", (3, 32, 32), 10, width=0.5, norm="bn")
    assert half.conv1.out_channels == 32 and half.fc.in_features == 256
    assert isinstance(half.layer2[0].downsample[1], nn.BatchNorm2d)


def test_channel_layernorm_normalises_the_channels_at_each_position():
    torch.manual_seed(0)
    norm = ChannelLayerNorm(6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 3, 4)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    want = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, -1, 1, 1) + \
        norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), want)
    assert isinstance(ResNet20((3, 32, 32), 10, norm="ln").layer1[0].norm1, ChannelLayerNorm)
    assert isinstance(ResNet20((3, 32, 32), 10, norm="gn").layer1[0].norm1, nn.GroupNorm)


def test_mlp_feature_layers_and_names():
    m = build_model("mlp", (1, 28, 28), 10, width=512, depth=3)
    assert feature_layers(m) == ["fc1", "relu1", "fc2", "relu2", "fc3", "relu3", "out"]
    assert list(m.state_dict()) == [f"{n}.{p}" for n in ("fc1", "fc2", "fc3", "out")
                                    for p in ("weight", "bias")]
    assert feature_layers(build_model("mlp", (1, 28, 28), 10, depth=1)) == ["fc1", "relu1", "out"]


def test_mlp_paper_parameter_count():
    m = build_model("mlp", (1, 28, 28), 10)
    expected = 784 * 512 + 512 + 2 * (512 * 512 + 512) + 512 * 10 + 10
    assert sum(p.numel() for p in m.parameters()) == expected


def test_mlp_features_are_pre_and_post_relu():
    torch.manual_seed(0)
    m = MLP((1, 4, 4), 3, width=8, depth=2)
    feats = {}
    for n in m.feature_layers():
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o))
    m(torch.randn(5, 1, 4, 4))
    assert (feats["fc1"] < 0).any()  # pre-activation not clobbered by an in-place ReLU
    torch.testing.assert_close(feats["relu1"], feats["fc1"].clamp(min=0))
    torch.testing.assert_close(feats["relu2"], feats["fc2"].clamp(min=0))


def test_vgg_layout_and_pool_skipping():
    m28 = VGG((1, 28, 28), 10, depth=11, batch_norm=True, width=0.125)
    names = [n for n, _ in m28.features.named_children()]
    assert names[:5] == ["conv1", "bn1", "relu1", "pool1", "conv2"]
    assert [n for n in names if n.startswith("pool")] == ["pool1", "pool2", "pool3", "pool4"]
    assert m28.out.in_features == 64  # 28->14->7->3->1, 5th pool skipped: 64 ch x 1 x 1
    assert [m.out_channels for m in m28.features if isinstance(m, nn.Conv2d)] == \
        [8, 16, 32, 32, 64, 64, 64, 64]
    assert all(m.bias is not None for m in m28.features if isinstance(m, nn.Conv2d))

    m32 = VGG((3, 32, 32), 10, depth=16, batch_norm=False, width=0.125)
    names = [n for n, _ in m32.features.named_children()]
    assert sum(n.startswith("pool") for n in names) == 5
    assert not any(n.startswith("bn") for n in names)
    assert sum(n.startswith("conv") for n in names) == 13
    fl = m32.feature_layers()
    assert fl[:2] == ["features.conv1", "features.relu1"] and fl[-3:] == \
        ["features.conv13", "features.relu13", "out"]

    # An input too large for the pools: the classifier sees a 2x2 map.
    big = VGG((3, 64, 64), 4, depth=11, batch_norm=False, width=0.125)
    assert big.out.in_features == 64 * 2 * 2
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 4)

    m_full = VGG((3, 32, 32), 10, depth=11)
    assert [m.out_channels for m in m_full.features if isinstance(m, nn.Conv2d)] == \
        [64, 128, 256, 256, 512, 512, 512, 512]


def test_resnet20_structure():
    m = ResNet20((3, 32, 32), 10, width=2, norm="gn")
    assert [n for n, _ in m.stem.named_children()] == ["conv", "norm", "relu"]
    assert m.stem.conv.out_channels == 32 and m.fc.in_features == 128
    assert isinstance(m.layer1[0].norm1, nn.GroupNorm) and m.layer1[0].norm1.num_groups == 1
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem + 2 per block + 2 projection shortcuts
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, nn.Conv2d))
    assert m.layer1[0].shortcut is None and m.layer2[1].shortcut is None
    for name in ("layer2", "layer3"):
        sc = getattr(m, name)[0].shortcut
        assert isinstance(sc.conv, nn.Conv2d) and sc.conv.kernel_size == (1, 1)
        assert sc.conv.stride == (2, 2)
    feats = {}
    for n in m.feature_layers():
        m.get_submodule(n).register_forward_hook(lambda mod, i, o, n=n: feats.__setitem__(n, o))
    m(torch.randn(2, 3, 32, 32))
    assert feats["stem"].shape == (2, 32, 32, 32)
    assert feats["layer2.0"].shape == (2, 64, 16, 16)
    assert feats["layer3.2"].shape == (2, 128, 8, 8)
    assert all((feats[n] >= 0).all() for n in m.feature_layers()[:-1])  # post-ReLU
    # Float widths round: 16 * 0.5 = 8 channels.
    assert ResNet20((3, 32, 32), 10, width=0.5).stem.conv.out_channels == 8
    sc = ResNet20((3, 32, 32), 10, shortcut_kernel=3).layer2[0].shortcut.conv
    assert sc.kernel_size == (3, 3) and sc.padding == (1, 1) and sc.stride == (2, 2)


@pytest.mark.parametrize("norm", ["ln", "gn"])
def test_layernorm_variants_are_batch_independent(norm):
    torch.manual_seed(0)
    m = build_model("resnet20", (3, 32, 32), 10, width=1, norm=norm).train()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(m(x)[:1], m(x[:1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,kwargs,_bn", CASES[::2], ids=IDS[::2])
def test_same_seed_same_weights(arch, kwargs, _bn):
    sds = []
    for _ in range(2):
        torch.manual_seed(123)
        sds.append(build_model(arch, (3, 32, 32), 10, **kwargs).state_dict())
    assert sds[0].keys() == sds[1].keys()
    assert all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
    torch.manual_seed(124)
    other = build_model(arch, (3, 32, 32), 10, **kwargs).state_dict()
    assert any(not torch.equal(sds[0][k], other[k]) for k in other if other[k].is_floating_point())


def test_bad_arch():
    with pytest.raises(ValueError, match="resnet50") as e:
        build_model("resnet50", (3, 32, 32), 10)
    for name in MODELS:
        assert name in str(e.value)


@pytest.mark.parametrize("arch,args,needle", [
    ("mlp", {"widht": 2}, "widht"),
    ("vgg", {"depth": 13}, "depth"),
    ("vgg", {"norm": "bn"}, "norm"),
    ("resnet20", {"norm": "in"}, "norm"),
    ("resnet20", {"depth": 20}, "depth"),
    ("mlp", {"depth": 0}, "depth"),
])
def test_bad_args(arch, args, needle):
    with pytest.raises(ValueError, match=needle) as e:
        build_model(arch, (3, 32, 32), 10, **args)
    msg = str(e.value)
    accepted = {"mlp": ["width", "depth"], "vgg": ["depth", "batch_norm", "width"],
                "resnet20": ["width", "norm"]}[arch]
    assert all(a in msg for a in accepted), msg


def test_bad_in_shape():
    with pytest.raises(ValueError, match="in_shape"):
        build_model("mlp", (28, 28), 10)


def test_torchvision_and_python_models(tmp_path):
    m = build_model("torchvision:resnet18", (3, 32, 32), 7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7) and m.in_shape == (3, 32, 32)
    layers = feature_layers(m)  # every Linear/Conv called once, in forward order
    assert layers[0] == "conv1" and layers[-1] == "fc" and "layer2.0.downsample.0" in layers
    with pytest.raises(ValueError, match="cannot take a batch"):
        build_model("torchvision:resnet18", (1, 28, 28), 10)  # 3-channel stem, 1-channel data
    (tmp_path / "mine.py").write_text(
        "from torch import nn\n"
        "def net(in_shape, num_classes, hidden=5):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2],"
        " hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n"
        "def bad(num_classes):\n    return nn.Linear(3, 4)\n")
    net = build_model("python:mine:net", (1, 4, 4), 3, path=str(tmp_path), kwargs={"hidden": 6})
    assert net[1].out_features == 6 and feature_layers(net) == ["1", "3"]
    net = build_model("python:mine:net", (1, 4, 4), 3, path=str(tmp_path), feature_layers=["2"])
    assert feature_layers(net) == ["2"]
    with pytest.raises(ValueError, match="cannot take a batch"):
        build_model("python:mine:bad", (1, 4, 4), 3, path=str(tmp_path))


@pytest.mark.parametrize("arch, kwargs, conv1", [("resnet20", {"width": 0.25, "norm": "bn"}, "stem.conv"),
                                                 ("resnet18", {"width": 0.125, "norm": "bn"}, "conv1")])
def test_first_feature_conv1_is_the_stem_conv_before_its_norm_as_the_official_llfc_code(
        arch, kwargs, conv1):
    """llfc.first_feature: conv1 reads a ResNet's stem conv output (before BatchNorm), as
    zzp1012/LLFC's featuremap.py reads ``conv1``; the rest of the list is unchanged. Its output
    is linear in the weights (no bias, before the norm), so θ_α's feature there is exactly the
    interpolation of A's and B's: 1 − cos_α = 0 for any pair, unlike the stem's ReLU output."""
    from lmcflow.features import capture
    from lmcflow.interpolation import lerp_state
    from lmcflow.metrics import llfc_batch

    a = build_model(arch, (3, 32, 32), 10, **kwargs).eval()
    stem = feature_layers(a)
    assert feature_layers(a, "stem") == stem and stem[0] != conv1
    first = feature_layers(a, "conv1")
    assert first == [conv1, *stem[1:]]
    assert isinstance(a.get_submodule(conv1), nn.Conv2d) and a.get_submodule(conv1).bias is None
    for other in (build_model("mlp", (1, 28, 28), 10, width=8, depth=1),
                  build_model("vgg", (3, 32, 32), 10, width=0.125)):
        assert feature_layers(other, "conv1") == feature_layers(other)  # already a Linear/Conv
    with pytest.raises(ValueError, match="first_feature"):
        feature_layers(a, "conv")
    torch.manual_seed(1)
    b = build_model(arch, (3, 32, 32), 10, **kwargs).eval()
    with torch.no_grad():  # B with other BN statistics, so that the stem's output differs more
        for m in b.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    mid = build_model(arch, (3, 32, 32), 10, **kwargs).eval()
    mid.load_state_dict(lerp_state(a.state_dict(), b.state_dict(), 0.5))
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = {}
    for name, model in (("a", a), ("b", b), ("mid", mid)):
        with torch.no_grad(), capture(model, [conv1, stem[0]]) as store:
            model(x)
        feats[name] = dict(store)
    exact = llfc_batch(feats["a"][conv1], feats["b"][conv1], feats["mid"][conv1], 0.5)
    assert exact["one_minus_cos_alpha"].abs().max() < 1e-12
    assert exact["one_minus_cos_ab"].min() > 1e-3
    relu = llfc_batch(feats["a"][stem[0]], feats["b"][stem[0]], feats["mid"][stem[0]], 0.5)
    assert relu["one_minus_cos_alpha"].min() > 1e-6


def test_timm_models_are_built_untrained_for_the_dataset():
    """timm:<name>: num_classes and in_chans from the data, kwargs passed on, never pretrained."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    net = build_model("timm:resnet10t", (1, 28, 28), 7)
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 7) and net.in_shape == (1, 28, 28)
    assert feature_layers(net)[0] == "conv1.0" and feature_layers(net)[-1] == "fc"
    vit = build_model("timm:vit_tiny_patch16_224", (3, 32, 32), 5,
                      kwargs={"img_size": 32, "depth": 2})
    assert len(vit.blocks) == 2 and vit(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"cannot take a batch.*takes the dataset's in kwargs "
                                         r"\(img_size\)"):
        build_model("timm:vit_tiny_patch16_224", (3, 32, 32), 5, kwargs={"depth": 1})
    with pytest.raises(ValueError, match="untrained"):
        build_model("timm:resnet10t", (3, 32, 32), 5, kwargs={"pretrained": True})
    with pytest.raises(ValueError, match="unknown timm model 'resnet10'; did you mean resnet10t"):
        build_model("timm:resnet10", (3, 32, 32), 5)


def test_timm_is_an_optional_dependency(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # import timm fails
    with pytest.raises(ImportError, match="timm:resnet10t needs the optional package timm.*"
                                          "pip install timm"):
        build_model("timm:resnet10t", (3, 32, 32), 5)
