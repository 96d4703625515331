"""Which rule handles which module class, function or tensor method.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .analysis import CONSTANT_FACTORIES, ELEMENTWISE_MODULES, Rules, _Analysis
from .layer_rules import (
    f_batch_norm, f_conv, f_embedding, f_group_norm, f_instance_norm, f_layer_norm, f_linear,
    f_rms_norm, m_batchnorm, m_conv, m_embedding, m_groupnorm, m_instancenorm, m_layernorm,
    m_linear, m_mha, m_prelu,
)
from .shape_rules import (
    _x, r_arg_reduce, r_cat, r_chunk, r_einsum, r_elementwise, r_expand, r_getitem,
    r_interpolate, r_matmul, r_max_min, r_narrow, r_pad, r_pool, r_reduce, r_reorder, r_repeat,
    r_patch_merging_pad, r_reshape, r_roll, r_sdpa, r_self, r_stack,
)
from .slots import _Call, _Unsupported
from .through import r_through


PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                nn.AlphaDropout, nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmin,
                nn.Softmax2d)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d,
                nn.LPPool2d)

MODULE_RULES: list[tuple[type | tuple, Callable]] = [
    (nn.Linear, m_linear),
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
      nn.ConvTranspose3d), m_conv),
    (nn.modules.batchnorm._BatchNorm, m_batchnorm),
    (nn.modules.instancenorm._InstanceNorm, m_instancenorm),
    (nn.GroupNorm, m_groupnorm),
    ((nn.LayerNorm, nn.RMSNorm), m_layernorm),
    (nn.MultiheadAttention, m_mha),
    (nn.Embedding, m_embedding),
    (nn.PReLU, m_prelu),
    (POOL_MODULES, r_pool),
    (nn.Upsample, r_interpolate),
    ((nn.Flatten, nn.Unflatten), r_reshape),
    (ELEMENTWISE_MODULES + PASS_MODULES, r_elementwise),
]

_ELEMENTWISE_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
    operator.pow, operator.neg, operator.pos, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.gt, operator.lt, operator.ge, operator.le, operator.eq,
    operator.ne, operator.and_, operator.or_, operator.invert,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.maximum, torch.minimum, torch.where, torch.lerp, torch.addcmul,
    torch.addcdiv, torch.pow, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.relu_, torch.erf, torch.sin,
    torch.cos, torch.square, torch.clamp, torch.clip, torch.sign, torch.reciprocal,
    torch.softmax, torch.log_softmax, torch.masked_fill, torch.gt, torch.lt, torch.eq,
    torch.ne, torch.ge, torch.le, torch.logical_and, torch.logical_or, torch.logical_not,
    torch.nan_to_num,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.sigmoid, F.tanh, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu, F.celu, F.softplus, F.logsigmoid,
    F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, F.softmax, F.log_softmax, F.softmin, F.normalize, F.threshold,
]
try:  # torchvision's stochastic depth: identity in eval, a per-sample scale in training
    from torchvision.ops import stochastic_depth as _stochastic_depth

    _ELEMENTWISE_FUNCTIONS.append(_stochastic_depth)
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass

FUNCTION_RULES: dict[Any, Callable] = {f: r_elementwise for f in _ELEMENTWISE_FUNCTIONS}
FUNCTION_RULES.update({
    torch.flatten: r_reshape, torch.reshape: r_reshape, torch.squeeze: r_reshape,
    torch.unsqueeze: r_reshape, torch.unflatten: r_reshape,
    torch.permute: r_reorder, torch.transpose: r_reorder, torch.movedim: r_reorder,
    torch.moveaxis: r_reorder, torch.swapaxes: r_reorder, torch.swapdims: r_reorder,
    torch.t: r_reorder,
    torch.sum: r_reduce, torch.mean: r_reduce, torch.amax: r_reduce, torch.amin: r_reduce,
    torch.std: r_reduce, torch.var: r_reduce, torch.norm: r_reduce, torch.logsumexp: r_reduce,
    torch.prod: r_reduce, torch.all: r_reduce, torch.any: r_reduce, torch.nansum: r_reduce,
    torch.nanmean: r_reduce, torch.linalg.vector_norm: r_reduce,
    torch.max: r_max_min, torch.min: r_max_min, torch.argmax: r_arg_reduce,
    torch.argmin: r_arg_reduce,
    torch.cat: r_cat, torch.concat: r_cat, torch.concatenate: r_cat, torch.stack: r_stack,
    torch.chunk: r_chunk, torch.split: r_chunk, torch.tensor_split: r_chunk,
    torch.unbind: r_chunk, torch.narrow: r_narrow,
    operator.getitem: r_getitem,
    operator.matmul: r_matmul, torch.matmul: r_matmul, torch.bmm: r_matmul, torch.mm: r_matmul,
    torch.einsum: r_einsum, F.scaled_dot_product_attention: r_sdpa,
    F.linear: f_linear, F.conv1d: f_conv, F.conv2d: f_conv, F.conv3d: f_conv,
    F.batch_norm: f_batch_norm, F.instance_norm: f_instance_norm, F.layer_norm: f_layer_norm,
    F.rms_norm: f_rms_norm, F.group_norm: f_group_norm, F.embedding: f_embedding,
    F.max_pool1d: r_pool, F.max_pool2d: r_pool, F.max_pool3d: r_pool, F.avg_pool1d: r_pool,
    F.avg_pool2d: r_pool, F.avg_pool3d: r_pool, F.adaptive_avg_pool1d: r_pool,
    F.adaptive_avg_pool2d: r_pool, F.adaptive_avg_pool3d: r_pool,
    F.adaptive_max_pool1d: r_pool, F.adaptive_max_pool2d: r_pool,
    F.adaptive_max_pool3d: r_pool, F.interpolate: r_interpolate, F.pad: r_pad,
    torch.broadcast_to: r_expand, torch.roll: r_roll,
})
try:  # torchvision Swin's patch merging, kept as one node by torch.fx.wrap (its attention
    # functions are traced through instead: .through)
    from torchvision.models.swin_transformer import _patch_merging_pad

    FUNCTION_RULES[_patch_merging_pad] = r_patch_merging_pad
except ImportError:  # pragma: no cover - torchvision is a dependency
    pass


def _getattr_rule(a, c):
    """``x.T`` / ``x.mT`` reorder; ``x.data`` is x; shape/dtype queries are not tensors."""
    attr = c.args[1]
    if attr in ("T", "mT"):
        return r_reorder(a, c)
    if attr == "data":
        return _x(c)
    raise _Unsupported(f"attribute {attr!r}")


FUNCTION_RULES[builtins.getattr] = _getattr_rule

METHOD_RULES: dict[str, Callable] = {}
for _name in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "log",
              "sqrt", "rsqrt", "abs", "neg", "clamp", "clamp_", "clip", "clamp_min", "clamp_max",
              "softmax", "log_softmax", "add", "add_", "sub", "sub_", "mul", "mul_", "div",
              "div_", "pow", "pow_", "masked_fill", "masked_fill_", "where", "lerp", "sign",
              "square", "erf", "sin", "cos", "reciprocal", "gt", "lt", "ge", "le", "eq", "ne",
              "maximum", "minimum", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__",
              "__rmul__", "__truediv__", "__rtruediv__", "__neg__", "nan_to_num", "addcmul"):
    METHOD_RULES[_name] = r_elementwise
for _name in ("float", "double", "half", "bfloat16", "to", "type", "type_as", "contiguous",
              "clone", "detach", "detach_", "requires_grad_", "cpu", "cuda"):
    METHOD_RULES[_name] = r_self
# (in-place reshapes such as transpose_ are left out on purpose: other users of the tensor
# would keep its old dimensions; the fallback fixes them instead)
for _name in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
              "reshape_as"):
    METHOD_RULES[_name] = r_reshape
for _name in ("permute", "transpose", "movedim", "moveaxis", "swapaxes", "swapdims", "t"):
    METHOD_RULES[_name] = r_reorder
for _name in ("sum", "mean", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "all",
              "any", "nansum", "nanmean"):
    METHOD_RULES[_name] = r_reduce
METHOD_RULES.update({"max": r_max_min, "min": r_max_min, "argmax": r_arg_reduce,
                     "argmin": r_arg_reduce, "expand": r_expand, "expand_as": r_expand,
                     "broadcast_to": r_expand, "repeat": r_repeat, "chunk": r_chunk,
                     "split": r_chunk, "tensor_split": r_chunk, "unbind": r_chunk,
                     "narrow": r_narrow, "matmul": r_matmul, "bmm": r_matmul,
                     "mm": r_matmul, "__matmul__": r_matmul, "roll": r_roll,
                     # in place, values constant along every dimension
                     "zero_": r_self, "fill_": r_self})



def r_constant(a: _Analysis, c: _Call):
    """A constant tensor (zeros_like, new_ones...): constant along every dimension, so any
    permutation leaves it unchanged; it depends on its argument's shape only."""
    return a.fresh(c.value)


FUNCTION_RULES.update({f: r_constant for f in CONSTANT_FACTORIES})
METHOD_RULES.update({n: r_constant for n in ("new_zeros", "new_ones", "new_full", "new_empty")})

RULES = Rules(MODULE_RULES, METHOD_RULES, FUNCTION_RULES, r_through)
