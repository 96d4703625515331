"""Tests of the tracer on models in the wild: torchvision's Swin (helpers wrapped with
torch.fx.wrap, traced through), and models torch.fx.symbolic_trace cannot trace (submodules kept
as leaves, traced through unless they read tensor values).
"""

import warnings

import pytest
import torch
from torch import nn
from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer,
                                                 SwinTransformerBlockV2)

from lmcflow.alignment import SpecWarning, check_equivalence, trace_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def trace(model, x):
    """(spec, SpecWarning messages) of ``model`` traced at ``x``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SpecWarning)
        spec = trace_spec(model, x)
    return spec, [str(w.message) for w in caught if issubclass(w.category, SpecWarning)]


def permuted_share(model, spec) -> float:
    """Share of the parameters (elements) that lie in a tensor with a permuted axis."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    return sum(p.numel() for k, p in params.items()
               if any(g is not None for g in spec.axes[k])) / total


# --- 1. Swin: windowed attention and patch merging ---------------------------------------------


def tiny_swin(v2: bool) -> nn.Module:
    torch.manual_seed(0)
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                           window_size=[4, 4], num_classes=5, **extra).eval()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_is_permuted_whole_and_keeps_its_function(v2):
    # 64x64: 16x16 then 8x8 tokens, so both stages use shifted windows (and their mask)
    model, x = tiny_swin(v2), torch.randn(2, 3, 64, 64)
    spec, _ = trace(model, x)
    assert permuted_share(model, spec) >= 0.99
    assert check_equivalence(model, spec, x)["max_rel_error"] < 1e-4


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_attention_permutes_heads_like_attention(v2):
    model = tiny_swin(v2)
    spec, _ = trace(model, torch.zeros(1, 3, 64, 64))
    attn = "features.3.1.attn"  # stage 2: 64 channels, 4 heads of 16
    stream = spec.axes["features.3.1.norm1.weight"][0]
    # qkv packed as (q/k/v, heads, units within a head): one head and one within-head
    # permutation shared by q, k and v; the projection reads (heads, units within a head)
    assert spec.reshape[f"{attn}.qkv.weight"] == (3, 4, 16, 64)
    none, heads, within, into = spec.axes[f"{attn}.qkv.weight"]
    assert none is None and into == stream and None not in (heads, within, stream)
    assert spec.sizes[heads] == 4 and spec.sizes[within] == 16
    assert spec.axes[f"{attn}.qkv.bias"] == (None, heads, within)
    assert spec.reshape[f"{attn}.proj.weight"] == (64, 4, 16)
    assert spec.axes[f"{attn}.proj.weight"] == (stream, heads, within)
    if v2:  # the bias comes from an MLP with one output per head; cosine attention scales
        assert spec.axes[f"{attn}.cpb_mlp.2.weight"][0] == heads
        assert spec.axes[f"{attn}.cpb_mlp.0.weight"][0] is not None  # its hidden units too
        assert spec.axes[f"{attn}.logit_scale"] == (heads, None, None)
    else:  # the table's rows are looked up by position: fixed; its columns are heads
        assert spec.axes[f"{attn}.relative_position_bias_table"] == (None, heads)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_swin_patch_merging_is_four_copies_of_the_stream(v2):
    model = tiny_swin(v2)
    spec, _ = trace(model, torch.zeros(1, 3, 64, 64))
    stream = spec.axes["features.1.1.norm1.weight"][0]  # stage 1: 32 channels
    assert spec.reshape["features.2.reduction.weight"] == (64, 4, 32)
    out, neighbour, into = spec.axes["features.2.reduction.weight"]
    assert neighbour is None and into == stream and out is not None
    if v2:  # the norm comes after the reduction
        assert spec.axes["features.2.norm.weight"] == (out,)
    else:  # LayerNorm over the 4*C concatenation: statistics over all four copies
        assert spec.reshape["features.2.norm.weight"] == (4, 32)
        assert spec.axes["features.2.norm.weight"] == (None, stream)


# --- 2. wrapped functions traced through ---------------------------------------------------------


def scaled_heads(x: torch.Tensor, w: torch.Tensor, heads: int) -> torch.Tensor:
    """A helper with shape-dependent Python control flow: symbolic_trace fails in it, so it
    is wrapped; q and k as two of three equal blocks of one projection."""
    if x.shape[-1] % heads:  # on shapes: fine to trace through
        raise ValueError("heads")
    qkv = nn.functional.linear(x, w)
    c = qkv.shape[-1] // 3
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    b, t = x.shape[0], x.shape[1]
    q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)).softmax(-1)
    return torch.roll((att @ v).transpose(1, 2).reshape(b, t, c), 1, dims=1)


def reads_values(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if float(x.mean()) > 0 else x


torch.fx.wrap("scaled_heads")
torch.fx.wrap("reads_values")


class WrappedNet(nn.Module):
    def __init__(self, d=12, heads=3):
        super().__init__()
        self.embed, self.heads = nn.Linear(4, d), heads
        self.qkv = nn.Parameter(torch.randn(3 * d, d) / d ** 0.5)
        self.proj, self.fc, self.out = nn.Linear(d, d), nn.Linear(d, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.proj(scaled_heads(h, self.qkv, self.heads))
        return self.out(reads_values(torch.relu(self.fc(h))).mean(1))


def test_wrapped_functions_are_traced_through_unless_they_read_values():
    torch.manual_seed(0)
    model, x = WrappedNet().eval(), torch.randn(2, 5, 4)
    spec, messages = trace(model, x)
    check_equivalence(model, spec, x)
    check_equivalence(model, spec, -x)  # reads_values takes its other branch
    stream = spec.axes["embed.weight"][0]
    assert stream is not None and spec.axes["proj.weight"][0] == stream
    # the parameter read by the traced-through helper: (q/k/v, heads, within) x stream
    assert spec.reshape["qkv"] == (3, 3, 4, 12)
    assert spec.axes["qkv"][0] is None and None not in spec.axes["qkv"][1:]
    assert spec.axes["proj.weight"][1:] == spec.axes["qkv"][1:3]
    # reads_values branches on a value: its input (fc's units) stays unpermuted, and says why
    assert spec.axes["fc.weight"] == (None, stream) and spec.axes["out.weight"] == (None, None)
    assert any("reads_values" in m and "reads tensor values" in m and "fc.weight[0]" in m
               for m in messages)


# --- 3. models torch.fx cannot trace -----------------------------------------------------------


class Gate(nn.Module):
    """Python control flow on a tensor value: cannot be traced, cannot be traced through
    (the branch not taken on the example input reverses the units)."""

    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, h, x):
        if x.sum() > 0:
            return self.fc(h)
        return self.fc(h).flip(-1)


class Rows(nn.Module):
    """``len`` of a tensor: symbolic_trace fails, but the body is the same for every input."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * (1.0 / len(x))


class Untraceable(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.stem = nn.Linear(5, d)
        self.rows = Rows(d)
        self.mid = nn.Linear(d, d)
        self.gate = Gate(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.rows(h)  # a residual stream through the traced-through leaf
        return self.head(torch.relu(self.gate(torch.relu(self.mid(h)), x)))


def test_untraceable_submodules_become_leaves_and_the_rest_is_permuted():
    torch.manual_seed(0)
    model, x = Untraceable().eval(), torch.randn(4, 5)
    x = x if x.sum() > 0 else -x
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(model)
    spec, messages = trace(model, x)
    # the len() leaf is traced through: its units are permuted, on the residual stream
    stream = spec.axes["stem.weight"][0]
    assert stream is not None
    assert spec.axes["rows.fc1.weight"][1] == stream and spec.axes["rows.fc2.weight"][0] == stream
    assert spec.axes["rows.fc1.weight"][0] is not None
    assert spec.axes["rows.fc2.weight"][1] == spec.axes["rows.fc1.weight"][0]
    assert spec.axes["mid.weight"] == (None, stream)  # mid's units feed the opaque gate
    # the value-dependent leaf stays unpermuted with its inputs and outputs, and says why
    assert all(set(spec.axes[k]) == {None} for k in spec.axes if k.startswith(("gate.", "head.")))
    assert any("'gate'" in m and "torch.fx cannot trace it" in m and "reads tensor values" in m
               for m in messages)
    assert not any("'rows'" in m for m in messages)
    assert spec.features[spec.axes["rows.fc1.weight"][0]] == ("rows.fc1",)
    check_equivalence(model, spec, x)
    check_equivalence(model, spec, -x)  # the gate takes its other branch


def test_leaf_of_a_known_class_is_not_trusted_to_be_that_class():
    """A Linear subclass fx cannot trace is a leaf, but not a Linear: traced through (and
    here, since it reads values, unpermuted)."""

    class OddLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else super().forward(x).flip(-1)

    torch.manual_seed(0)
    model = nn.Sequential(OddLinear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    x = torch.randn(3, 3)
    x = x if x.sum() > 0 else -x
    spec, _ = trace(model, x)
    assert spec.axes["0.weight"] == (None, None) and spec.sizes == {}
    check_equivalence(model, spec, x)


class ShapeBranching(nn.Module):
    """Its own forward branches on a shape (``x.dim()`` is a proxy to torch.fx) and takes
    ``len``: symbolic_trace fails outside any submodule."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        if x.dim() == 3:
            x = x.flatten(0, 1)
        if not torch.is_floating_point(x) or x.type() == "torch.HalfTensor":  # metadata only
            x = x.float()
        return self.fc2(torch.relu(self.fc1(x))) / len(x)


def test_a_model_whose_own_forward_fx_cannot_trace_is_traced_through_whole():
    torch.manual_seed(0)
    model, x = ShapeBranching().eval(), torch.randn(2, 3, 4)
    spec, messages = trace(model, x)
    assert spec.axes == {"fc1.weight": ("P_fc1", None), "fc1.bias": ("P_fc1",),
                         "fc2.weight": (None, "P_fc1"), "fc2.bias": (None,)}
    assert messages == []
    assert spec.features == {"P_fc1": ("fc1",)}  # modules called inside: activation matching
    check_equivalence(model, spec, x)
