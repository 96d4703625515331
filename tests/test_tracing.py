"""Tests of lmcflow.alignment.trace: permutation specs traced with torch.fx, and the equivalence check.

The hand-written specs of lmcflow.alignment.builders are the ground truth: the traced spec of every
built-in model must be the same partition of (tensor, axis) pairs into groups, with the same
view shapes, up to the names of the groups. Over a zoo (built-ins, torchvision models, the
ViT, concatenation, depthwise and grouped convolutions, packed attention) a random
permutation through the traced spec keeps the outputs, weight matching recovers a planted
permutation, and the equivalence check names the tensor of a deliberately broken spec.
"""

import copy
import dataclasses
import warnings

import pytest
import torch
import torchvision
from torch import nn
from test_matching import assert_same_function, make_model, nontrivial_permutation

from lmcflow.alignment import (apply_permutation, matching_objective, permutation_spec,
                              weight_matching)
from lmcflow.models import build_model, feature_layers
from lmcflow.alignment import EquivalenceError, SpecWarning, TraceError, check_equivalence, trace_spec
from lmcflow.vit import ViT

NUM_CLASSES = 7


pytestmark = pytest.mark.usefixtures("one_thread")


def traced(model, x):
    """trace_spec that turns any SpecWarning into an error (for models that need none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpecWarning)
        return trace_spec(model, x)


def partition(spec):
    """Per key: [(view size, group)] with size-1 unpermuted axes dropped (the hand-written
    VGG views a 1x1 map as (out, C, 1), the tracer as (out, C))."""
    out = {}
    for key, axes in spec.axes.items():
        view = spec.reshape.get(key, spec.shapes[key])
        out[key] = [(n, g) for n, g in zip(view, axes) if not (n == 1 and g is None)]
    return out


def renaming(a, b):
    """The bijection of group names under which specs a and b are equal, or AssertionError."""
    pa, pb = partition(a), partition(b)
    assert pa.keys() == pb.keys()
    names = {}
    for key in pa:
        assert [n for n, _ in pa[key]] == [n for n, _ in pb[key]], (key, pa[key], pb[key])
        for (_, ga), (_, gb) in zip(pa[key], pb[key]):
            assert (ga is None) == (gb is None), (key, pa[key], pb[key])
            if ga is not None:
                assert names.setdefault(ga, gb) == gb, (key, ga, gb, names[ga])
    assert len(set(names.values())) == len(names) == len(a.sizes) == len(b.sizes)
    return names


# --- 1. the hand-written specs are the ground truth ------------------------------------------

BUILTINS = [
    ("mlp", {"width": 32, "depth": 1}, (1, 28, 28)),
    ("mlp", {"width": 32, "depth": 3}, (1, 28, 28)),
    ("lenet", {}, (1, 28, 28)),
    ("lenet", {"width": 0.5}, (3, 32, 32)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, (1, 28, 28)),
    ("vgg", {"depth": 11, "batch_norm": False, "width": 0.125}, (3, 32, 32)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125}, (3, 64, 64)),  # 2x2 last map
    ("vgg", {"depth": 16, "batch_norm": False, "width": 0.125}, (3, 32, 32)),
    ("vgg", {"depth": 11, "batch_norm": True, "width": 0.125, "classifier": [24, 16],
             "dropout": 0.5}, (3, 32, 32)),
    ("vgg", {"depth": 11, "batch_norm": False, "width": 0.125, "classifier": [24]}, (3, 64, 64)),
    ("resnet20", {"width": 0.25, "norm": "bn"}, (3, 32, 32)),
    ("resnet20", {"width": 0.25, "norm": "ln"}, (3, 32, 32)),
    ("resnet20", {"width": 0.25, "norm": "gn", "shortcut_kernel": 3}, (3, 32, 32)),
    ("resnet20", {"width": 0.5, "norm": "bn", "shortcut_kernel": 3}, (1, 28, 28)),
    ("resnet18", {"width": 0.125, "norm": "none"}, (3, 32, 32)),
    ("resnet18", {"width": 0.125, "norm": "bn"}, (3, 32, 32)),
]
BUILTIN_IDS = [f"{a}-" + "-".join(f"{k}{v}" for k, v in kw.items()) + f"-{s[1]}"
               for a, kw, s in BUILTINS]


@torch.no_grad()
def feature_observations(model, spec, x):
    """group -> its feature modules' outputs, stacked in forward order."""
    modules = dict(model.named_modules())
    got = {g: [] for g in spec.features}
    hooks = [modules[m].register_forward_hook(lambda _m, _i, o, g=g: got[g].append(o.clone()))
             for g, ms in spec.features.items() for m in ms]
    model(x)
    for h in hooks:
        h.remove()
    return {g: torch.cat([o.flatten() for o in v]) for g, v in got.items()}


@pytest.mark.parametrize("arch,kwargs,in_shape", BUILTINS, ids=BUILTIN_IDS)
def test_traced_spec_equals_hand_written(arch, kwargs, in_shape):
    model = make_model(arch, kwargs, in_shape)
    x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(0))
    hand, spec = permutation_spec(model), traced(model, x)
    names = renaming(spec, hand)
    assert spec.cost_keys == hand.cost_keys
    # Features: the same observations per group (the tracer names post-ReLU modules where
    # the hand-written ResNet specs name the blocks whose output they are).
    assert {names[g] for g in spec.features} == set(hand.features)
    ours, theirs = feature_observations(model, spec, x), feature_observations(model, hand, x)
    for g in spec.features:
        torch.testing.assert_close(ours[g], theirs[names[g]], rtol=0, atol=0)
    assert check_equivalence(model, spec, x)["max_rel_error"] < 1e-5


def test_group_names_follow_the_modules_that_create_the_units():
    spec = traced(build_model("resnet20", (3, 32, 32), 10, width=0.25, norm="ln"),
                  torch.zeros(1, 3, 32, 32))
    ax = spec.axes
    assert ax["stem.conv.weight"] == ("P_stem.conv", None, None, None)  # stream: first writer
    assert ax["layer1.0.conv1.weight"] == ("P_layer1.0.conv1", "P_stem.conv", None, None)
    assert ax["layer2.0.shortcut.conv.weight"] == ("P_layer2.0.conv2", "P_stem.conv", None, None)
    assert ax["fc.weight"] == (None, "P_layer3.0.conv2")
    mlp = build_model("mlp", (1, 28, 28), 10, width=16, depth=2)
    assert traced(mlp, torch.zeros(1, 1, 28, 28)).axes == permutation_spec(mlp).axes


# --- 2. the zoo --------------------------------------------------------------------------------


class ConcatNet(nn.Module):
    """Two branches concatenated along the channels (Inception/SqueezeNet style)."""

    def __init__(self):
        super().__init__()
        self.stem, self.relu0 = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.a, self.relu_a = nn.Conv2d(8, 6, 1), nn.ReLU()
        self.b, self.relu_b = nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()
        self.mix, self.relu1 = nn.Conv2d(10, 12, 1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(12, NUM_CLASSES)

    def forward(self, x):
        x = self.relu0(self.stem(x))
        x = torch.cat([self.relu_a(self.a(x)), self.relu_b(self.b(x))], dim=1)
        return self.fc(torch.flatten(self.pool(self.relu1(self.mix(x))), 1))


class DepthwiseNet(nn.Module):
    """Depthwise conv (channels pass through), GroupNorm with 3 groups, a grouped conv with 3
    groups, a depthwise conv with multiplier 2 and a residual back to the stem."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0, self.act0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), \
            nn.ReLU6()
        self.dw, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.act1 = nn.ReLU6()
        self.pw, self.gn, self.act2 = nn.Conv2d(8, 12, 1), nn.GroupNorm(3, 12), nn.SiLU()
        self.grouped, self.act3 = nn.Conv2d(12, 12, 3, padding=1, groups=3), nn.Hardswish()
        self.dw2, self.act4 = nn.Conv2d(12, 24, 3, padding=1, groups=12), nn.GELU()
        self.proj = nn.Conv2d(24, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, NUM_CLASSES)

    def forward(self, x):
        s = self.act0(self.bn0(self.stem(x)))
        y = self.act2(self.gn(self.pw(self.act1(self.bn1(self.dw(s))))))
        y = self.proj(self.act4(self.dw2(self.act3(self.grouped(y))))) + s
        return self.fc(nn.functional.adaptive_avg_pool2d(y, 2).flatten(1))


def small_vgg11_bn():
    """torchvision's VGG class with narrow features and classifier (same layout as vgg11_bn:
    features, AdaptiveAvgPool2d((7, 7)), flatten, classifier with dropout)."""
    cfg = [8, "M", 16, "M", 16, 16, "M", 32, 32, "M", 32, 32, "M"]
    model = torchvision.models.VGG(torchvision.models.vgg.make_layers(cfg, batch_norm=True))
    model.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 24), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(24, 24), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(24, NUM_CLASSES))
    return model


ZOO = {  # name -> (constructor, input shape, expected group count)
    "mlp": (lambda: build_model("mlp", (1, 28, 28), NUM_CLASSES, width=16, depth=2),
            (1, 28, 28), 2),
    "vgg": (lambda: build_model("vgg", (3, 32, 32), NUM_CLASSES, width=0.125, classifier=[16]),
            (3, 32, 32), 9),
    "resnet20": (lambda: build_model("resnet20", (3, 32, 32), NUM_CLASSES, width=0.25, norm="ln"),
                 (3, 32, 32), 12),
    "lenet": (lambda: build_model("lenet", (1, 28, 28), NUM_CLASSES, width=0.5), (1, 28, 28), 4),
    "resnet18": (lambda: build_model("resnet18", (3, 32, 32), NUM_CLASSES, width=0.125),
                 (3, 32, 32), 12),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), 12),
    "tv_resnet18_no_norm": (lambda: torchvision.models.resnet18(num_classes=10,
                                                                norm_layer=nn.Identity),
                            (3, 32, 32), 12),
    "tv_vgg11_bn_small": (small_vgg11_bn, (3, 32, 32), 10),
    "vit": (lambda: ViT((1, 28, 28), NUM_CLASSES, dim=16, depth=2, heads=4), (1, 28, 28), 9),
    "tv_vit": (lambda: torchvision.models.VisionTransformer(16, 8, 2, 2, 16, 24,
                                                            num_classes=NUM_CLASSES),
               (3, 16, 16), 7),
    "concat": (ConcatNet, (3, 12, 12), 4),
    "depthwise": (DepthwiseNet, (3, 8, 8), 5),
}


def randomized(model, in_shape, seed=0):
    """Every tensor carries signal: He-initialised weights, random biases, norm affines,
    attention projections and embeddings; BN statistics from train-mode passes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("weight") or "embed" in name or "token" in name \
                    or "in_proj_weight" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        for m in bns:
            m.momentum = None
        model.train()
        with torch.no_grad():
            model(torch.randn(8, *in_shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def zoo():
    """name -> (model, input, traced spec); built once for the module."""
    out = {}
    for name, (make, in_shape, _) in ZOO.items():
        torch.manual_seed(0)
        model = randomized(make(), in_shape)
        x = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SpecWarning)  # (tested below)
            out[name] = (model, x, trace_spec(model, x))
    return out


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_random_permutation_preserves_outputs(name, zoo):
    model, x, spec = zoo[name]
    assert len(spec.sizes) == ZOO[name][2]
    state = model.state_dict()
    spec.check_state(state)
    perm = nontrivial_permutation(spec, seed=3)
    permuted = apply_permutation(spec, perm, state)
    for key, t in state.items():  # every permuted tensor moves (no vacuous group)
        if any(g is not None and spec.sizes[g] > 1 for g in spec.axes[key]):
            assert not torch.equal(permuted[key], t), key
    other = copy.deepcopy(model)
    other.load_state_dict(permuted)
    with torch.no_grad():
        assert_same_function(model(x), other.eval()(x))
    assert check_equivalence(model, spec, x, seed=4)["groups"] == len(spec.sizes)


def test_real_vgg11_bn():
    """torchvision's vgg11_bn at 32x32: the 1x1 map is pooled to 7x7 (each value copied 49
    times) before Linear(512*7*7, 4096), which reads it viewed (4096, 512, 49)."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11_bn(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    spec = traced(model, x)
    assert len(spec.sizes) == 10  # 8 conv widths, 2 hidden classifier widths
    assert spec.reshape == {"classifier.0.weight": (4096, 512, 49)}
    assert spec.axes["classifier.0.weight"][1:] == (spec.axes["features.25.weight"][0], None)
    assert spec.axes["classifier.6.weight"] == (None, spec.axes["classifier.3.weight"][0])
    assert check_equivalence(model, spec, x)["max_rel_error"] < 1e-4


def test_vit_attention_spec(zoo):
    """Heads permuted as blocks (q, k, v, out share them), Q/K one within-head permutation,
    V/out another, via views (H, d, E); the residual stream is one group from the patch
    embedding (and class token, position embedding, every LayerNorm) to the head."""
    model, _, spec = zoo["vit"]
    ax, rs = spec.axes, spec.reshape
    stream = ax["patch_embed.weight"][0]
    heads, qk, _ = ax["blocks.0.attn.q.weight"]
    vd = ax["blocks.0.attn.v.weight"][1]
    assert rs["blocks.0.attn.q.weight"] == (4, 4, 16) and rs["blocks.0.attn.q.bias"] == (4, 4)
    assert ax["blocks.0.attn.q.weight"] == (heads, qk, stream)
    assert ax["blocks.0.attn.k.weight"] == (heads, qk, stream)
    assert ax["blocks.0.attn.v.weight"] == (heads, vd, stream)
    assert rs["blocks.0.attn.out.weight"] == (16, 4, 4)
    assert ax["blocks.0.attn.out.weight"] == (stream, heads, vd)
    assert len({heads, qk, vd, stream}) == 4 and spec.sizes[heads] == 4
    assert ax["cls_token"] == ax["pos_embed"] == (None, None, stream)
    assert ax["norm.weight"] == ax["blocks.1.norm2.bias"] == (stream,)
    assert ax["head.weight"] == (None, stream) and ax["head.bias"] == (None,)
    assert ax["blocks.1.attn.q.weight"][0] not in (heads, qk, vd)  # per block
    # token tensors (B, T, D) carry their units last: the stream's LayerNorm outputs and the
    # MLP's GELU are features on dim -1; heads and within-head units have none
    norms = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm))
    gelus = [n for n, m in model.named_modules() if isinstance(m, torch.nn.GELU)]
    assert spec.features[stream] == norms and len(norms) > 2
    assert spec.features["P_blocks.0.fc1"] == ("blocks.0.gelu",)
    assert spec.feature_dims == dict.fromkeys([*norms, *gelus], -1)
    assert not {heads, qk, vd} & set(spec.features)


def test_packed_multihead_attention_spec(zoo):
    """nn.MultiheadAttention: in_proj (3E, E) viewed (3, H, d, E), q/k/v sharing one
    within-head permutation; the out projection reads (H, d)."""
    _, _, spec = zoo["tv_vit"]
    pre = "encoder.layers.encoder_layer_0.self_attention."
    stream = spec.axes["conv_proj.weight"][0]
    assert spec.reshape[pre + "in_proj_weight"] == (3, 2, 8, 16)
    none, heads, within, inp = spec.axes[pre + "in_proj_weight"]
    assert none is None and inp == stream and spec.sizes[heads] == 2 and spec.sizes[within] == 8
    assert spec.axes[pre + "in_proj_bias"] == (None, heads, within)
    assert spec.reshape[pre + "out_proj.weight"] == (16, 2, 8)
    assert spec.axes[pre + "out_proj.weight"] == (stream, heads, within)
    assert spec.axes["encoder.pos_embedding"] == (None, None, stream)


def test_concat_reads_as_segments():
    """Each branch keeps its own units; the conv reading the concatenation sees them as
    stretches of its input axis (test_concat.py has the rest)."""
    spec = traced(ConcatNet(), torch.zeros(1, 3, 12, 12))
    assert spec.axes["a.weight"] == ("P_a", "P_stem", None, None)
    assert spec.axes["b.bias"] == ("P_b",)
    assert spec.axes["mix.weight"] == ("P_mix", None, None, None)
    assert spec.segments == {"mix.weight": {1: (("P_a", 6), ("P_b", 4))}}
    assert spec.features == {"P_stem": ("relu0",), "P_a": ("relu_a",), "P_b": ("relu_b",),
                             "P_mix": ("relu1",)}


def test_depthwise_and_grouped_convolutions(zoo):
    """Depthwise: the channel permutation passes through (in/out tied). GroupNorm(3, 12)
    and a 3-group conv: whole groups move as blocks, one permutation within every group;
    a depthwise conv with multiplier 2 adds a permutation of the copies of each channel."""
    _, _, spec = zoo["depthwise"]
    ax, rs = spec.axes, spec.reshape
    stream = ax["stem.weight"][0]
    assert ax["dw.weight"] == (stream, None, None, None) and ax["bn1.running_var"] == (stream,)
    assert ax["proj.weight"][0] == stream  # the residual
    blocks, within = ax["pw.weight"][:2]
    assert rs["pw.weight"] == (3, 4, 8, 1, 1) and ax["pw.weight"][2] == stream
    assert rs["gn.weight"] == (3, 4) and ax["gn.weight"] == (blocks, within)
    assert rs["grouped.weight"] == (3, 4, 4, 3, 3)
    g_out = ax["grouped.weight"][1]
    assert ax["grouped.weight"] == (blocks, g_out, within, None, None)
    assert rs["dw2.weight"] == (3, 4, 2, 1, 3, 3)
    assert ax["dw2.weight"][:3] == (blocks, g_out, ax["dw2.weight"][2])
    assert rs["proj.weight"] == (8, 3, 4, 2, 1, 1)
    assert ax["proj.weight"][1:4] == ax["dw2.weight"][:3]
    assert sorted(spec.sizes.values()) == [2, 3, 4, 4, 8]


# --- 3. weight matching on traced specs -----------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "tv_vit", "concat", "depthwise", "resnet18", "vgg"])
def test_weight_matching_recovers_planted_permutation(name, zoo):
    model, _, spec = zoo[name]
    state_a = model.state_dict()
    pi = nontrivial_permutation(spec, seed=2)
    state_b = apply_permutation(spec, pi, state_a)
    perm, info = weight_matching(spec, state_a, state_b, seed=3)
    for g, p in perm.items():
        assert torch.equal(p, torch.argsort(pi[g])), g
    aligned = apply_permutation(spec, perm, state_b)
    assert all(torch.equal(aligned[k], state_a[k]) for k in state_a)
    assert info["objective"] == pytest.approx(matching_objective(spec, state_a, state_a), rel=1e-12)


# --- 4. the equivalence check ------------------------------------------------------------------


def broken(spec, key, axis, group=None):
    axes = dict(spec.axes)
    axes[key] = tuple(group if i == axis else g for i, g in enumerate(axes[key]))
    return dataclasses.replace(spec, axes=axes, features={}, feature_dims={})


BREAKS = [  # (zoo model, key, view axis, new group or None, expected culprit)
    ("mlp", "fc2.weight", 1, None, "fc2.weight"),  # a consumer misses its input group
    ("mlp", "fc1.bias", 0, None, "fc1.bias"),
    ("mlp", "fc2.weight", 0, None, "fc2.weight"),  # weight disagrees with its bias
    ("resnet20", "layer1.0.norm1.bias", 0, None, "layer1.0.norm1.bias"),
    ("resnet20", "layer2.0.shortcut.conv.weight", 1, None, "layer2.0.shortcut.conv.weight"),
    ("resnet20", "layer1.1.conv2.weight", 0, "P_layer1.1.conv1", "layer1.1.conv2.weight"),
    ("vit", "blocks.0.attn.k.weight", 1, None, "blocks.0.attn.k.weight"),  # Q/K within-head
    ("vit", "pos_embed", 2, None, "pos_embed"),
    ("tv_resnet18", "layer3.0.downsample.1.running_mean", 0, None,
     "layer3.0.downsample.1.running_mean"),
]


@pytest.mark.parametrize("name,key,axis,group,culprit", BREAKS,
                         ids=[f"{b[0]}-{b[1]}-{b[2]}" for b in BREAKS])
def test_equivalence_check_rejects_a_broken_spec_and_names_the_tensor(
        name, key, axis, group, culprit, zoo):
    model, x, spec = zoo[name]
    with pytest.raises(EquivalenceError, match=culprit.replace(".", r"\.")) as e:
        check_equivalence(model, broken(spec, key, axis, group), x)
    assert e.value.key == culprit
    assert e.value.error > 1e-4
    assert model.training is False  # mode restored


def test_equivalence_check_restores_the_mode_and_accepts_the_identity():
    model = build_model("mlp", (1, 8, 8), 3, width=8, depth=2).train()
    spec = permutation_spec(model)
    info = check_equivalence(model, spec, torch.randn(2, 1, 8, 8), seed=5)
    assert info == {"max_rel_error": info["max_rel_error"], "groups": 2, "seed": 5}
    assert model.training


# --- 5. conservative fallbacks -----------------------------------------------------------------


class SliceNet(nn.Module):
    """Keeps half of a conv's channels: a channel slice picks units, so it pins them."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 6, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))[:, :4]
        return self.fc(y.mean((2, 3)))


class CumsumNet(nn.Module):
    """A cumulative sum over the channels: order matters, the tracer has no rule for it."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 5, 3), nn.Linear(5, 2)

    def forward(self, x):
        return self.fc(torch.cumsum(self.conv(x), dim=1).mean((2, 3)))


def test_unprovable_axes_stay_unpermuted_with_a_warning_naming_them():
    with pytest.warns(SpecWarning, match=r"indexed by getitem.*conv2\.weight\[0\]"):
        spec = trace_spec(SliceNet(), torch.zeros(1, 1, 8, 8))
    assert spec.axes["conv2.weight"] == (None, "P_conv1", None, None)
    assert spec.axes["fc.weight"] == (None, None)
    with pytest.warns(SpecWarning, match=r"unsupported cumsum.*conv\.weight\[0\]"):
        spec = trace_spec(CumsumNet(), torch.zeros(1, 1, 8, 8))
    assert spec.sizes == {} and all(set(a) <= {None} for a in spec.axes.values())


class TiedLM(nn.Module):
    """Token embedding tied to the output projection (one tensor under two keys), an MLP
    residual, and a constant added with zeros_like (it must not pin anything)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)  # (B, T, 8)
        h = h + self.fc2(self.act(self.fc1(h))) + torch.zeros_like(h)
        return self.head(self.norm(h))  # (B, T, 11)


def test_tied_weights_share_their_axes():
    model = randomized(TiedLM(), None)
    ids = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(0))
    spec = traced(model, ids)
    assert spec.sizes == {"P_emb": 8, "P_fc1": 16}
    assert spec.axes["emb.weight"] == spec.axes["head.weight"] == (None, "P_emb")
    assert spec.axes["fc2.weight"] == ("P_emb", "P_fc1")
    check_equivalence(model, spec, ids)


class Functional(nn.Module):
    """Layers written with torch.nn.functional on root parameters, weights by keyword."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(6, 4, generator=g))
        self.b1 = nn.Parameter(torch.randn(6, generator=g))
        self.scale = nn.Parameter(torch.rand(6, generator=g) + 0.5)  # a layer scale
        self.w2 = nn.Parameter(torch.randn(3, 6, generator=g))

    def forward(self, x):
        h = nn.functional.linear(x, weight=self.w1, bias=self.b1)
        return nn.functional.linear(nn.functional.gelu(h) * self.scale, self.w2)


def test_functional_layers_on_root_parameters():
    model, x = Functional(), torch.randn(2, 4)
    spec = traced(model, x)
    assert spec.axes == {"w1": ("P_w1", None), "b1": ("P_w1",), "scale": ("P_w1",),
                         "w2": (None, "P_w1")}
    check_equivalence(model, spec, x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_untraceable_model_raises_a_clear_error():
    with pytest.raises(TraceError, match="torch.fx cannot trace DataDependent.*hand-written"):
        trace_spec(DataDependent(), torch.zeros(1, 4))


def test_permutation_spec_falls_back_to_the_tracer():
    vit = build_model("vit", (1, 28, 28), 10, dim=16, depth=1, heads=2)
    assert permutation_spec(vit) == traced(vit, torch.zeros(1, 1, 28, 28))  # in_shape
    net = ConcatNet()
    spec = permutation_spec(net, torch.zeros(1, 3, 12, 12))
    assert spec == traced(net, torch.zeros(1, 3, 12, 12))
    assert spec.sizes == {"P_stem": 8, "P_a": 6, "P_b": 4, "P_mix": 12}
    with pytest.raises(TypeError, match="no permutation spec for Linear"):
        permutation_spec(nn.Linear(2, 2))


# --- 6. the ViT as a model of the zoo ----------------------------------------------------------


def test_vit_model_layout_and_feature_layers():
    torch.manual_seed(0)
    model = build_model("vit", (1, 28, 28), 10)
    assert isinstance(model, ViT) and model.in_shape == (1, 28, 28)
    assert sum(p.numel() for p in model.parameters()) < 200_000  # CPU-trainable in a minute
    names = feature_layers(model)
    assert names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    gelus = [m for m in model.modules() if isinstance(m, nn.GELU)]
    assert len(gelus) == 4 and len(set(map(id, gelus))) == 4
    modules, fired = dict(model.named_modules()), []
    for n in names:
        modules[n].register_forward_hook(lambda m, i, o, n=n: fired.append((n, tuple(o.shape))))
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert fired == [(f"blocks.{i}", (3, 17, 64)) for i in range(4)] + [("head", (3, 10))]
    with pytest.raises(ValueError, match="patch"):
        build_model("vit", (1, 28, 28), 10, patch=5)
    with pytest.raises(ValueError, match="heads"):
        build_model("vit", (1, 28, 28), 10, dim=30, heads=4)
