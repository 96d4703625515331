"""Rules for layers: Linear, convolutions, norms, attention, embeddings, in module and functional
form.
"""

from __future__ import annotations


import torch
from torch import nn

from .analysis import _Analysis
from .shape_rules import _spatial_rank, _x
from .slots import _Call, _T, _Unsupported, _flat


def _linear(a: _Analysis, c: _Call, x: _T, w: _T, b: _T | None, label: str) -> _T:
    """x (..., in) · weight (out, in)ᵀ + bias (out,)."""
    if len(w.shape) != 2:
        raise _Unsupported("weight")
    a.unify(x.dims[-1], w.dims[1], c)
    if b is not None:
        a.unify(b.dims[0], w.dims[0], c)
    return _T(x.dims[:-1] + (a.labelled(w.dims[0], label),), tuple(c.value.shape))


def _conv(a: _Analysis, c: _Call, x: _T, w: _T, b: _T | None, groups: int, label: str,
          transposed: bool = False) -> _T:
    """Conv weight (out, in/groups, *kernel) [transposed: (in, out/groups, *kernel)]: input
    channels tied to the weight's input axis, output channels created; with groups > 1 the
    channels are (group, channel in group) and groups move as blocks."""
    k = len(w.shape) - 2
    ch = len(x.shape) - k - 1
    if ch not in (0, 1) or (transposed and groups != 1):
        raise _Unsupported("layout or groups")
    a.slots.fix(_flat(w.dims[2:]))  # kernel taps are positions, not units
    spatial = _flat(x.dims[ch + 1:])
    a.slots.fix(spatial, f"convolved by {c.where}")
    w_in, w_out = (w.dims[0], w.dims[1]) if transposed else (w.dims[1], w.dims[0])
    if groups == 1:
        a.unify(x.dims[ch], w_in, c)
        out = a.labelled(w_out, label)
    else:
        per_out = w.shape[0] // groups
        blocks = (a.slots.new(groups, f"{label}.groups"),)
        a.unify(x.dims[ch], blocks + w_in, c)
        a.unify(w_out, blocks + ((a.slots.new(per_out, label),) if per_out > 1 else ()), c)
        out = w_out
    if b is not None:
        a.unify(b.dims[0], w_out, c)
    shape = tuple(c.value.shape)
    pos = a.new_fixed(torch.empty(shape[ch + 1:]), f"convolved by {c.where}", spatial).dims
    return _T(x.dims[:ch] + (out,) + pos, shape)


def _channel_norm(a: _Analysis, c: _Call, x: _T, ch: int, params) -> _T:
    """Statistics per channel (over batch/positions): per-channel tensors follow dim ``ch``."""
    for p in params:
        if p is not None and p.dims:
            a.unify(p.dims[0], x.dims[ch], c)
    return _T(x.dims, tuple(c.value.shape))


def _layer_norm(a: _Analysis, c: _Call, x: _T, k: int, params) -> _T:
    """Statistics over the last ``k`` dimensions (invariant to permuting them); the affine
    tensors have those dimensions."""
    for p in params:
        if p is not None:
            for i in range(k):
                a.unify(p.dims[i], x.dims[len(x.dims) - k + i], c)
    return _T(x.dims, tuple(c.value.shape))


def _group_norm(a: _Analysis, c: _Call, x: _T, groups: int, params) -> _T:
    """Statistics per group of C/G consecutive channels: with 1 < G < C only permutations of
    whole groups times one permutation within every group keep each group's channels."""
    n = x.shape[1]
    if 1 < groups < n:
        a.unify(x.dims[1], (a.slots.new(groups), a.slots.new(n // groups))
                if n // groups > 1 else (a.slots.new(groups),), c)
    return _channel_norm(a, c, x, 1, params)


# -- modules ----------------------------------------------------------------------------------


def m_linear(a, c):
    return _linear(a, c, _x(c), a.module_param(c, "weight"), a.module_param(c, "bias"),
                   c.node.target)


def m_conv(a, c):
    return _conv(a, c, _x(c), a.module_param(c, "weight"), a.module_param(c, "bias"),
                 c.module.groups, c.node.target,
                 isinstance(c.module, nn.modules.conv._ConvTransposeNd))


def m_batchnorm(a, c):
    x = _x(c)
    if len(x.shape) < 2:
        raise _Unsupported("no channel dimension")
    return _channel_norm(a, c, x, 1, [a.module_param(c, s) for s in
                                      ("weight", "bias", "running_mean", "running_var")])


def m_instancenorm(a, c):
    x = _x(c)
    ch = len(x.shape) - (_spatial_rank(c.module) or 2) - 1
    return _channel_norm(a, c, x, ch, [a.module_param(c, s) for s in
                                       ("weight", "bias", "running_mean", "running_var")])


def m_groupnorm(a, c):
    return _group_norm(a, c, _x(c), c.module.num_groups,
                       [a.module_param(c, "weight"), a.module_param(c, "bias")])


def m_layernorm(a, c):
    return _layer_norm(a, c, _x(c), len(c.module.normalized_shape),
                       [a.module_param(c, "weight"), a.module_param(c, "bias")])


def m_prelu(a, c):
    x, w = _x(c), a.module_param(c, "weight")
    if w.dims and len(x.shape) >= 2:
        a.unify(w.dims[0], x.dims[1], c)
    return _T(x.dims, tuple(c.value.shape))


def m_embedding(a, c):
    """Rows are addressed by input ids: fixed; the embedding axis creates units."""
    ids, w = _x(c), a.module_param(c, "weight")
    a.slots.fix(w.dims[0])
    return _T(ids.dims + (a.labelled(w.dims[1], c.node.target),), tuple(c.value.shape))


def m_mha(a, c):
    """nn.MultiheadAttention: q, k, v projections (packed or not) write (heads, head units),
    one head permutation and one within-head permutation for all three (the packed bias and
    weight hold q, k and v along one axis, which a view can only split uniformly); the
    output projection reads (heads, head units) and creates the output units; key and value
    sequences are tied, the query sequence passes to the output."""
    m, name = c.module, c.node.target
    b = c.bind(["query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                "average_attn_weights", "is_causal"])
    q, k, v = (b[n][1] for n in ("query", "key", "value"))
    if not all(isinstance(t, _T) for t in (q, k, v)):
        raise _Unsupported("operands")
    heads = (a.slots.new(m.num_heads, f"{name}.heads"),) if m.num_heads > 1 else ()
    within = (a.slots.new(m.head_dim, f"{name}.head_dim"),) if m.head_dim > 1 else ()
    units = heads + within
    three = (a.slots.new(3),)
    a.slots.fix(three)
    if m._qkv_same_embed_dim:
        w = a.module_param(c, "in_proj_weight")
        a.unify(w.dims[0], three + units, c)
        for t in (q, k, v):
            a.unify(t.dims[-1], w.dims[1], c)
    else:
        for t, pname in ((q, "q_proj_weight"), (k, "k_proj_weight"), (v, "v_proj_weight")):
            w = a.module_param(c, pname)
            a.unify(w.dims[0], units, c)
            a.unify(t.dims[-1], w.dims[1], c)
    bias = a.module_param(c, "in_proj_bias")
    if bias is not None:
        a.unify(bias.dims[0], three + units, c)
    for pname in ("bias_k", "bias_v"):
        p = a.module_param(c, pname)
        if p is not None:
            a.unify(p.dims[-1], units, c)
    ow, ob = a.module_param(c, "out_proj.weight"), a.module_param(c, "out_proj.bias")
    a.unify(ow.dims[1], units, c)
    if ob is not None:
        a.unify(ob.dims[0], ow.dims[0], c)
    out = a.labelled(ow.dims[0], f"{name}.out_proj")
    batched = len(q.shape) == 3
    bd, sd = (0, 1) if m.batch_first else (1, 0)
    if not batched:
        bd, sd = None, 0
    if bd is not None:
        a.unify(q.dims[bd], k.dims[bd], c)
        a.unify(q.dims[bd], v.dims[bd], c)
    a.unify(k.dims[sd], v.dims[sd], c)
    if any(isinstance(b.get(n, (None, None))[1], _T) for n in ("key_padding_mask", "attn_mask")) \
            or b.get("is_causal", (False,))[0]:
        a.slots.fix(q.dims[sd] + k.dims[sd], f"attention mask of {c.where}")
    attn_out, weights = c.value
    dims = list(q.dims)
    dims[-1] = out
    first = _T(tuple(dims), tuple(attn_out.shape))
    if weights is None:
        return (first, None)
    # weights: ([N,] [H,] L, S), H unless averaged over heads
    averaged = b.get("average_attn_weights", (True,))[0]
    w_dims = ((q.dims[bd],) if bd is not None else ()) + (() if averaged else (heads,)) \
        + (q.dims[sd], k.dims[sd])
    if len(w_dims) != weights.ndim:
        raise _Unsupported("attention weights layout")
    return (first, _T(w_dims, tuple(weights.shape)))


# -- functional forms --------------------------------------------------------------------------


def _owner(c: _Call) -> str:
    """Label for the units a functional layer creates: its weight's module (``a.b`` for a
    weight ``a.b.weight`` read with get_attr; the weight's name for a root tensor), else the
    graph node's name."""
    node = c.node.args[1] if len(c.node.args) > 1 else c.node.kwargs.get("weight")
    t = getattr(node, "target", None) if getattr(node, "op", None) == "get_attr" else None
    if isinstance(t, str):
        return t.rsplit(".", 1)[0] if "." in t else t
    return c.node.name


def f_linear(a, c):
    b = c.bind(["input", "weight", "bias"])
    w = b["weight"][1]
    if not isinstance(w, _T):
        raise _Unsupported("weight")
    return _linear(a, c, _x(c), w, b.get("bias", (None, None))[1], _owner(c))


def f_conv(a, c):
    b = c.bind(["input", "weight", "bias", "stride", "padding", "dilation", "groups"])
    if not isinstance(b["weight"][1], _T):
        raise _Unsupported("weight")
    return _conv(a, c, _x(c), b["weight"][1], b.get("bias", (None, None))[1],
                 b.get("groups", (1,))[0], _owner(c))


def f_batch_norm(a, c):
    b = c.bind(["input", "running_mean", "running_var", "weight", "bias"])
    return _channel_norm(a, c, _x(c), 1, [b.get(n, (None, None))[1] for n in
                                          ("running_mean", "running_var", "weight", "bias")])


def f_instance_norm(a, c):
    b = c.bind(["input", "running_mean", "running_var", "weight", "bias"])
    x = _x(c)
    ch = 1 if len(x.shape) > 2 else 0
    return _channel_norm(a, c, x, ch, [b.get(n, (None, None))[1] for n in
                                       ("running_mean", "running_var", "weight", "bias")])


def f_layer_norm(a, c):
    b = c.bind(["input", "normalized_shape", "weight", "bias"])
    shape = b["normalized_shape"][0]
    k = 1 if isinstance(shape, int) else len(shape)
    return _layer_norm(a, c, _x(c), k, [b.get(n, (None, None))[1] for n in ("weight", "bias")])


def f_rms_norm(a, c):
    b = c.bind(["input", "normalized_shape", "weight"])
    shape = b["normalized_shape"][0]
    k = 1 if isinstance(shape, int) else len(shape)
    return _layer_norm(a, c, _x(c), k, [b.get("weight", (None, None))[1]])


def f_group_norm(a, c):
    b = c.bind(["input", "num_groups", "weight", "bias"])
    return _group_norm(a, c, _x(c), b["num_groups"][0],
                       [b.get(n, (None, None))[1] for n in ("weight", "bias")])


def f_embedding(a, c):
    b = c.bind(["input", "weight"])
    w = b["weight"][1]
    if not isinstance(w, _T):
        raise _Unsupported("weight")
    a.slots.fix(w.dims[0])
    return _T(_x(c).dims + (a.labelled(w.dims[1], _owner(c)),),
              tuple(c.value.shape))
