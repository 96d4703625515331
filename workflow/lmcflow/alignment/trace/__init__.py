"""Permutation specs of any ``nn.Module`` from a ``torch.fx`` trace, and a check that a spec
keeps the function.

:func:`trace_spec` traces the model (``torch.fx.symbolic_trace``), runs the graph once on an
example input and derives, from the operations, which tensor axes must carry the same
permutation of hidden units. The result is a :class:`lmcflow.alignment.spec.PermutationSpec` like the
hand-written ones (which stay the ground truth the tracer is tested against).
:func:`check_equivalence` applies a seeded random permutation through a spec and checks that the
outputs do not change, naming the first tensor that breaks it.

How the tracer reasons
----------------------
Every dimension of every tensor in the graph, and every axis of every ``state_dict`` tensor, is
a *slot*. An operation says which slots must be permuted together (union-find), e.g. a Linear
ties its input's last dimension to ``weight`` axis 1 and its output's last dimension to
``weight`` axis 0 and ``bias`` axis 0; an addition ties its operands' dimensions (one group per
residual stream). A dimension may be a row-major product of slots: flattening ``(C, H, W)``
gives one dimension ``[C, H, W]``, so the Linear reading it sees its weight axis 1 as
``(C, H*W)`` (the spec's ``reshape`` view), and splitting ``H*d`` into ``(H, d)`` for attention
heads refines the slot into two factors (heads, units within a head): a permutation of the
product is then a permutation of heads times one permutation within every head. A dimension
may also be a *concatenation* of slots: ``torch.cat`` of two branches along the channels gives
one dimension whose units are the first branch's, then the second's, each with its own
permutation, so the conv reading it sees its weight axis 1 as stretches of two groups (the
spec's ``segments``: a block-diagonal permutation of the axis); ``chunk``/``split`` cut a
dimension into such parts, and cut it back where it already is a concatenation.

A slot is *fixed* (unpermuted) when it touches the model's inputs or outputs (logits), is a
spatial or token position mixed by a convolution, pooling or position embedding, is a kernel
tap, or when an operation is not known to commute with permutations of it. A fixed slot fixes
every slot it is tied to. Every ``state_dict`` axis whose slot is not fixed lands in a group;
a permutation group is never made up: an operation the tracer does not know fixes all of its
inputs and outputs, with a :class:`SpecWarning` naming it whenever that leaves a group of
parameters unpermuted that otherwise would have been permuted.

Supported (module, functional and method forms): Linear; Conv1d/2d/3d including grouped and
depthwise (``groups`` splits the channels into (groups, channels per group); depthwise: the
input channel permutation passes through to the output); ConvTranspose with ``groups=1``;
BatchNorm, InstanceNorm (per channel, running stats with their channels); LayerNorm and
RMSNorm (over their normalised dimensions, whichever they are); GroupNorm (``num_groups`` 1 or
C: any channel permutation; otherwise only permutations of whole groups times one permutation
within every group); elementwise activations (ReLU, GELU, SiLU, ..., in place too), dropout,
identity, softmax along any dimension; arithmetic with broadcasting (residual additions,
layer scales, gating); pooling and interpolation (channels pass, positions fixed); flatten,
view, reshape, (un)squeeze, permute, transpose, movedim, expand, repeat; symmetric reductions
(sum, mean, amax, var, norm...); matmul, bmm, einsum and ``scaled_dot_product_attention``
(scores contract the query/key units, so Q and K share one within-head permutation and V/out
another); ``nn.MultiheadAttention`` (packed ``in_proj_weight (3E, E)`` viewed ``(3, H, d, E)``:
one head permutation and one within-head permutation shared by q, k and v, the out projection
reading ``(E, H, d)``); embeddings (vocabulary fixed); ``cat`` along any dimension
(segments); ``chunk``/``split``/``tensor_split`` into equal or uneven parts (each part its own
units; parts that a consumer ties, as a gate multiplying one half by the other, share them);
slicing and ``narrow`` that take whole parts of a concatenation; ``stack`` (operands tied);
indexing with full slices, slices that are one of equal consecutive blocks (``qkv[..., C:2*C]``:
block index fixed, units within it pass), gathering rows with an integer index tensor (the
rows fixed); ``torch.roll`` (rolled dimensions fixed); torchvision Swin's
``_patch_merging_pad`` (channels viewed ``(4, C)``). A concatenation that cannot be stretches
of groups is rewritten before the spec is read: one reshaped into equal rows (a view
``(k, n/k)``: ShuffleNet's channel shuffle, q/k/v chunked from one projection and split into
heads) ties its rows and fixes the row index (which part a unit is in); one of flattened maps
``(C_i, H*W)`` becomes ``(concatenated channels, H*W)``; a part with factors (heads) in any
other concatenation is fixed.

Traced through (:mod:`.through`): a Python function that torch.fx keeps as one node
(``torch.fx.wrap``, e.g. torchvision Swin's ``shifted_window_attention`` and
``_get_relative_position_bias``) is run again under a ``TorchFunctionMode`` that hands every
torch call of its body to the same rules; so is a submodule that ``symbolic_trace`` cannot
trace, kept as a leaf (:mod:`.fallback`), and the model's own forward where fx fails outside
any submodule. A body that reads tensor values (``bool``, ``item``...) is unknown instead.

Conservatively unpermuted, with a warning: indexing or slicing a permuted dimension other
than whole parts of a concatenation (only the parts the slice touches), the row index of a
concatenation read as rows where it leaves an axis without a group (the stream of a channel
shuffle), reshapes that cut across units, sort/top-k/cumulative ops, reductions returning
indices (max/min with ``dim``, argmax), ``unbind`` of a permuted dimension, constant tensors
that are not in the ``state_dict``, and any unknown module or function.

``features`` (group -> module names, for activation matching) lists, per group, the leaf
modules called once whose output carries exactly that group on dim 1 (``(B, C, ...)`` layout):
post-activation modules when there are any, else norms, else Linear/Conv outputs; modules that
work in place or whose output is later modified in place are skipped (hooks would read a
changed tensor). Token tensors ``(B, T, D)`` carry units on the last dimension: their modules
are listed with ``feature_dims[module] = -1``. A group split into factors (attention heads and
the units within a head) has no single unit axis and no feature modules; so has a
concatenation (a module whose output is two branches' channels is not read: the branches'
own modules, before the ``cat``, are).

Group names are ``P_`` + the name of the module that first creates the units (``P_fc1``,
``P_layer1.0.conv1``; a residual stream is named after its first writer, e.g.
``P_stem.conv``); a refined slot's factors append ``#i`` (``P_blocks.0.attn.q#0`` = heads,
``#1`` = units within a head).
"""

from .equivalence import check_equivalence
from .slots import EquivalenceError, SpecWarning, TraceError
from .tracer import trace_spec

__all__ = ["trace_spec", "check_equivalence", "TraceError", "EquivalenceError", "SpecWarning"]
