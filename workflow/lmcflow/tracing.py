"""Permutation specs of any ``nn.Module`` from a ``torch.fx`` trace, and a check that a spec
keeps the function.

:func:`trace_spec` traces the model (``torch.fx.symbolic_trace``), runs the graph once on an
example input and derives, from the operations, which tensor axes must carry the same
permutation of hidden units. The result is a :class:`lmcflow.matching.PermutationSpec` like the
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
product is then a permutation of heads times one permutation within every head.

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
reading ``(E, H, d)``); embeddings (vocabulary fixed); ``chunk``/``split`` into equal parts
(the part index is a fixed factor); ``stack``; indexing with full slices.

Conservatively unpermuted, with a warning: concatenation along a permuted dimension (a
consumer would need a block-diagonal permutation of its input axis, which a view cannot
express), indexing or slicing a permuted dimension, uneven splits, reshapes that cut across
units, sort/top-k/cumulative ops, reductions returning indices (max/min with ``dim``, argmax),
constant tensors that are not in the ``state_dict``, and any unknown module or function.

``features`` (group -> module names, for activation matching) lists, per group, the leaf
modules called once whose output carries exactly that group on dim 1 (``(B, C, ...)`` layout):
post-activation modules when there are any, else norms, else Linear/Conv outputs; modules that
work in place or whose output is later modified in place are skipped (hooks would read a
changed tensor). Token tensors ``(B, T, D)`` carry units on the last dimension: their modules
are listed with ``feature_dims[module] = -1``. A group split into factors (attention heads and
the units within a head) has no single unit axis and no feature modules.

Group names are ``P_`` + the name of the module that first creates the units (``P_fc1``,
``P_layer1.0.conv1``; a residual stream is named after its first writer, e.g.
``P_stem.conv``); a refined slot's factors append ``#i`` (``P_blocks.0.attn.q#0`` = heads,
``#1`` = units within a head).
"""

from __future__ import annotations

import builtins
import math
import operator
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call

from .matching import PermutationSpec, apply_permutation

__all__ = ["trace_spec", "check_equivalence", "TraceError", "EquivalenceError", "SpecWarning"]


class TraceError(RuntimeError):
    """The model cannot be traced by torch.fx or run on the example input."""


class SpecWarning(UserWarning):
    """The tracer left parameter axes unpermuted that a finer analysis might permute."""


class EquivalenceError(ValueError):
    """Permuting by the spec changes the model's outputs. ``key``: the tensor named as the
    culprit; ``module``: the first module whose output disagrees (or None); ``group``: the
    permutation group that breaks the function on its own (or None)."""

    def __init__(self, message: str, key: str | None = None, module: str | None = None,
                 group: str | None = None, error: float = float("nan")):
        super().__init__(message)
        self.key, self.module, self.group, self.error = key, module, group, error


class _Unsupported(Exception):
    """Raised by a rule that cannot handle this particular call."""


# ---------------------------------------------------------------------------------------------
# Slots: union-find over tensor dimensions and parameter axes.


class _Slots:
    """Union-find of slots (hidden dimensions of one size) with refinement and fixing.

    A class may be *split* into factors (row-major): its permutation is then the product of
    its factors' permutations. A class is *fixed* silently (inputs, outputs, kernel taps:
    structure, never reported) or with reasons (reported when they cost a parameter group).
    Labels name the groups: a module name (slot created by that module), ``("param", key,
    axis)`` or ``("sub", parent, i)`` (factor i of a split).
    """

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.label: list[Any] = []
        self.split: dict[int, list[int]] = {}
        self.silent: set[int] = set()
        self.reasons: dict[int, list[str]] = {}

    def new(self, size: int, label: Any = None) -> int:
        s = len(self.parent)
        self.parent.append(s)
        self.size.append(int(size))
        self.label.append(label)
        return s

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def fixed(self, s: int) -> bool:
        r = self.find(s)
        return r in self.silent or bool(self.reasons.get(r))

    def silent_fixed(self, s: int) -> bool:
        return self.find(s) in self.silent

    def fix(self, slots, reason: str | None = None) -> None:
        """Fix the classes of ``slots``: silently (reason None) or for ``reason``."""
        for s in slots:
            self._flag(s, reason is None, [reason] if reason else [])

    def _flag(self, s: int, silent: bool, reasons: list[str]) -> None:
        r = self.find(s)
        changed = False
        if silent and r not in self.silent:
            self.silent.add(r)
            changed = True
        have = self.reasons.setdefault(r, [])
        for x in reasons:
            if x not in have and len(have) < 4:
                have.append(x)
                changed = True
        if changed:  # the factors of a fixed class are fixed too
            for sub in self.split.get(r, ()):
                self._flag(sub, r in self.silent, list(have))

    def _push(self, r: int) -> None:
        r = self.find(r)
        for sub in self.split.get(r, ()):
            self._flag(sub, r in self.silent, list(self.reasons.get(r, [])))

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise AssertionError(f"slot sizes differ: {self.size[ra]} != {self.size[rb]}")
        keep, gone = min(ra, rb), max(ra, rb)
        self.parent[gone] = keep
        silent = gone in self.silent
        self.silent.discard(gone)
        reasons = self.reasons.pop(gone, [])
        split_keep, split_gone = self.split.get(keep), self.split.pop(gone, None)
        if split_gone is not None:
            if split_keep is None:
                self.split[keep] = split_gone
            else:  # two factorisations of one class: their common refinement
                self.unify(split_keep, split_gone, "incompatible factorisations")
        self._flag(keep, silent, reasons)
        self._push(keep)

    def leaves(self, slots) -> list[int]:
        """Roots of the finest factors of ``slots``, in row-major order."""
        out: list[int] = []
        for s in slots:
            r = self.find(s)
            sub = self.split.get(r)
            if sub is None:
                out.append(r)
            else:
                out.extend(self.leaves(sub))
        return out

    def split_slot(self, s: int, sizes: list[int]) -> list[int]:
        """Refine the (unsplit) class of ``s`` into factors of ``sizes`` (each > 1)."""
        r = self.find(s)
        if r in self.split or math.prod(sizes) != self.size[r] or min(sizes) < 2:
            raise AssertionError(f"bad split of slot {r} ({self.size[r]}) into {sizes}")
        subs = [self.new(n, ("sub", r, i)) for i, n in enumerate(sizes)]
        self.split[r] = subs
        self._push(r)
        return subs

    def unify(self, a, b, reason: str) -> bool:
        """Tie two factor lists of equal total size factor by factor, refining where their
        factor boundaries differ; where they cannot be aligned, fix both for ``reason``."""
        A, B = self.leaves(a), self.leaves(b)
        if math.prod(self.size[s] for s in A) != math.prod(self.size[s] for s in B):
            self.fix(A + B, f"{reason} (sizes differ)")
            return False
        i = j = 0
        while i < len(A) and j < len(B):
            x, y = self.find(A[i]), self.find(B[j])
            if x in self.split:
                A[i:i + 1] = self.leaves([x])
                continue
            if y in self.split:
                B[j:j + 1] = self.leaves([y])
                continue
            sx, sy = self.size[x], self.size[y]
            if sx == sy:
                self.union(x, y)
                i, j = i + 1, j + 1
            elif sx > sy and sx % sy == 0:
                A[i:i + 1] = self.split_slot(x, [sy, sx // sy])
            elif sy > sx and sy % sx == 0:
                B[j:j + 1] = self.split_slot(y, [sx, sy // sx])
            else:
                self.fix(A + B, reason)
                return False
        return True


@dataclass(frozen=True)
class _T:
    """Slots of one tensor: per dimension a tuple of slots (row-major factors; size-1
    dimensions and factors have none)."""

    dims: tuple[tuple[int, ...], ...]
    shape: tuple[int, ...]


def _tensors(info) -> Iterator[_T]:
    if isinstance(info, _T):
        yield info
    elif isinstance(info, (list, tuple)):
        for x in info:
            yield from _tensors(x)
    elif isinstance(info, dict):
        for x in info.values():
            yield from _tensors(x)


def _has_tensor(value) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _flat(dims) -> list[int]:
    return [s for d in dims for s in d]


@dataclass
class _Call:
    """One graph node being analysed: concrete args and value, and the args' slot infos."""

    node: fx.Node
    args: tuple
    kwargs: dict
    ia: tuple
    ika: dict
    value: Any
    where: str
    module: nn.Module | None = None

    def bind(self, names: list[str]) -> dict[str, tuple[Any, Any]]:
        """name -> (value, info) for a callable whose parameters are ``names`` in order."""
        out = {n: (v, i) for n, v, i in zip(names, self.args, self.ia)}
        for k, v in self.kwargs.items():
            out[k] = (v, self.ika.get(k))
        return out


PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


# ---------------------------------------------------------------------------------------------
# The analysis: an fx Interpreter that runs every node and applies its rule.


class _Analysis(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, model: nn.Module):
        super().__init__(gm)
        self.model = model
        self.state = model.state_dict(keep_vars=True)
        self.modules = dict(model.named_modules())
        self.slots = _Slots()
        self.info: dict[fx.Node, Any] = {}
        self.params: dict[str, tuple[tuple[int, ...], ...]] = {}
        self.module_calls: list[tuple[fx.Node, str, nn.Module]] = []
        # tied tensors (one tensor under two keys) must share their slots
        first: dict[int, str] = {}
        self.alias = {}
        for key, t in self.state.items():
            self.alias[key] = first.setdefault(id(t), key)

    # -- driving ------------------------------------------------------------------------------

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        value = getattr(self, n.op)(n.target, args, kwargs)
        ia = tuple(self._arg_info(a) for a in n.args)
        ika = {k: self._arg_info(v) for k, v in n.kwargs.items()}
        c = _Call(n, args, kwargs, ia, ika, value, self._where(n))
        if n.op == "call_module":
            c.module = self.fetch_attr(n.target)
            self.module_calls.append((n, n.target, c.module))
        self.info[n] = self._analyse(c)
        return value

    def _arg_info(self, a):
        if isinstance(a, fx.Node):
            return self.info.get(a)
        if isinstance(a, (list, tuple)):
            return tuple(self._arg_info(x) for x in a)
        if isinstance(a, dict):
            return {k: self._arg_info(v) for k, v in a.items()}
        return None

    def _where(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return f"{type(self.modules.get(n.target)).__name__} '{n.target}'"
        stack = n.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else ""
        target = n.target if isinstance(n.target, str) else \
            getattr(n.target, "__name__", str(n.target))
        return f"{target} (node '{n.name}'" + (f" in '{owner}')" if owner else ")")

    def _analyse(self, c: _Call):
        op = c.node.op
        if op == "placeholder":  # model inputs: never permuted
            return self.new_fixed(c.value, None)
        if op == "output":  # model outputs (logits): never permuted
            self.slots.fix(_flat(d for t in _tensors(c.ia) for d in t.dims))
            return None
        if op == "get_attr":
            return self._get_attr(c)
        tensors_in = list(_tensors((c.ia, c.ika)))
        if op != "call_module" and not tensors_in:  # shape arithmetic or a factory function
            if not _has_tensor(c.value):
                return None
            if c.node.target in CONSTANT_FACTORIES:  # constant along every dimension
                return self.fresh(c.value)
            return self.new_fixed(c.value, f"constant tensor from {c.where}")
        if op != "call_module" and not _has_tensor(c.value) and c.node.target not in TUPLE_GETTERS:
            if c.node.target in SHAPE_QUERIES:
                return None
            self.slots.fix(_flat(d for t in tensors_in for d in t.dims),
                           f"values read by {c.where}")
            return None
        rule = self._rule_for(c)
        if rule is None:
            return self.unsupported(c)
        try:
            return rule(self, c)
        except _Unsupported as e:
            return self.unsupported(c, str(e))
        except Exception as e:  # a case the rule does not foresee: still sound, since a
            # partly applied rule only ties slots, and the fallback fixes the whole call
            return self.unsupported(c, f"{type(e).__name__}: {e}")

    def _rule_for(self, c: _Call) -> Callable | None:
        if c.node.op == "call_module":
            for types, rule in MODULE_RULES:
                if isinstance(c.module, types):
                    return rule
            return None
        if c.node.op == "call_method":
            return METHOD_RULES.get(c.node.target)
        try:
            return FUNCTION_RULES.get(c.node.target)
        except TypeError:  # unhashable target
            return None

    # -- helpers ------------------------------------------------------------------------------

    def param(self, key: str) -> _T | None:
        """Slots of ``state_dict[key]`` (created on first use), or None if there is none."""
        if key not in self.state:
            return None
        key = self.alias[key]
        shape = tuple(self.state[key].shape)
        if key not in self.params:
            self.params[key] = tuple((self.slots.new(n, ("param", key, i)),) if n > 1 else ()
                                     for i, n in enumerate(shape))
        return _T(self.params[key], shape)

    def module_param(self, c: _Call, name: str) -> _T | None:
        return self.param(f"{c.node.target}.{name}")

    def fresh(self, value, label=None):
        """New, unconstrained slots for every dimension of every tensor in ``value``."""
        if isinstance(value, Tensor):
            shape = tuple(value.shape)
            return _T(tuple((self.slots.new(n, label),) if n > 1 else () for n in shape), shape)
        if isinstance(value, (list, tuple)):
            return tuple(self.fresh(v, label) for v in value)
        return None

    def new_fixed(self, value, reason: str | None, sources=None):
        """New fixed slots for ``value``: silently when ``reason`` is None or every slot of
        ``sources`` (the inputs it derives from) is silently fixed, else for ``reason``."""
        info = self.fresh(value)
        silent = reason is None or (sources is not None and all(
            self.slots.silent_fixed(s) for s in self.slots.leaves(sources)))
        self.slots.fix(_flat(d for t in _tensors(info) for d in t.dims), None if silent else reason)
        return info

    def unify(self, a, b, c: _Call) -> bool:
        return self.slots.unify(a, b, f"incompatible units at {c.where}")

    def labelled(self, dim: tuple[int, ...], label: str) -> tuple[int, ...]:
        """A new slot named ``label`` tied to ``dim`` (the units a module creates)."""
        if not dim:
            return ()
        s = self.slots.new(math.prod(self.slots.size[x] for x in dim), label)
        self.slots.unify((s,), dim, "internal")
        return (s,)

    def broadcast(self, operands: list[_T], shape: tuple[int, ...], c: _Call):
        """Dimensions of an elementwise result: operands aligned from the right; an operand
        of size 1 along a dimension is constant along it and constrains nothing."""
        nd = len(shape)
        out: list = [None] * nd
        for t in operands:
            off = nd - len(t.shape)
            if off < 0:
                raise _Unsupported("operand has more dimensions than the result")
            for i, (d, n) in enumerate(zip(t.dims, t.shape)):
                j = off + i
                if n == shape[j] and n > 1:
                    if out[j] is None:
                        out[j] = d
                    else:
                        self.unify(out[j], d, c)
                elif n != 1 and n != shape[j]:
                    raise _Unsupported(f"shapes {t.shape} and {shape} do not broadcast")
        return tuple(d if d is not None else ((self.slots.new(n),) if n > 1 else ())
                     for d, n in zip(out, shape))

    def unsupported(self, c: _Call, detail: str = ""):
        """Fix everything the call touches: inputs, its module's tensors, outputs."""
        reason = f"unsupported {c.where}" + (f": {detail}" if detail else "")
        sources = _flat(d for t in _tensors((c.ia, c.ika)) for d in t.dims)
        if c.module is not None:
            prefix = f"{c.node.target}."
            for key in self.state:
                if key.startswith(prefix):
                    sources += _flat(self.param(key).dims)
        self.slots.fix(sources, reason)
        return self.new_fixed(c.value, reason, sources)

    def _get_attr(self, c: _Call):
        if not isinstance(c.value, Tensor):
            return None
        p = self.param(c.node.target)
        if p is not None:
            return p
        return self.new_fixed(c.value, f"constant tensor '{c.node.target}' (not in the state_dict)")

    def dim_map(self, c: _Call) -> list[int | None]:
        """For each output dimension, the input dimension it is (None: new or size 1):
        the same call on a meta tensor whose sizes are distinct primes."""
        x = c.args[0]
        others = list(_tensors((c.ia[1:], c.ika)))
        if not isinstance(x, Tensor) or x.ndim > len(PRIMES) or others:
            raise _Unsupported("cannot map dimensions")
        sizes = PRIMES[:x.ndim]
        meta = torch.empty(sizes, device="meta")
        fn = getattr(meta, c.node.target) if c.node.op == "call_method" else \
            (lambda *a, **k: c.node.target(meta, *a, **k))
        out = fn(*c.args[1:], **c.kwargs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return [sizes.index(n) if n in sizes else None for n in out.shape]

    # -- spec ---------------------------------------------------------------------------------

    def build(self) -> tuple[PermutationSpec, dict[str, list[str]]]:
        """The spec and, per reason, the parameter axes that reason left unpermuted."""
        leaf_roots = {leaf for dims in self.params.values() for d in dims
                      for leaf in self.slots.leaves(d) if not self.slots.fixed(leaf)}
        names = self._group_names(leaf_roots)
        axes, shapes, reshape, lost = {}, {}, {}, {}
        for key, t in self.state.items():
            shape = tuple(t.shape)
            shapes[key] = shape
            dims = self.params.get(self.alias[key])
            if dims is None:
                axes[key] = (None,) * len(shape)
                continue
            view, ax = [], []
            for axis, (n, d) in enumerate(zip(shape, dims)):
                entries: list[list] = []
                for leaf in self.slots.leaves(d):
                    size, group = self.slots.size[leaf], names.get(self.slots.find(leaf))
                    if group is None:
                        r = self.slots.find(leaf)
                        if r not in self.slots.silent:
                            for reason in self.slots.reasons.get(r, []):
                                lost.setdefault(reason, []).append(f"{key}[{axis}]")
                        if entries and entries[-1][1] is None:  # adjacent unpermuted: merge
                            entries[-1][0] *= size
                            continue
                    entries.append([size, group])
                entries = entries or [[n, None]]
                view += [e[0] for e in entries]
                ax += [e[1] for e in entries]
            axes[key] = tuple(ax)
            if tuple(view) != shape:
                reshape[key] = tuple(view)
        spec = PermutationSpec(axes, shapes, reshape, *self._features(names))
        return spec, {r: sorted(set(v), key=v.index) for r, v in lost.items()}

    def _group_names(self, roots: set[int]) -> dict[int, str]:
        """root -> ``P_<label>`` from the earliest module-labelled member (parameter labels
        only where no module label exists); factors append ``#i``."""
        best: dict[int, tuple[int, int]] = {}
        for s, lab in enumerate(self.slots.label):
            if lab is None:
                continue
            r = self.slots.find(s)
            rank = (1 if isinstance(lab, tuple) and lab[0] == "param" else 0, s)
            if r not in best or rank < best[r]:
                best[r] = rank
        memo: dict[int, str] = {}

        def name(r: int) -> str:
            if r not in memo:
                if r not in best:
                    memo[r] = f"slot{r}"
                else:
                    lab = self.slots.label[best[r][1]]
                    if isinstance(lab, str):
                        memo[r] = lab
                    elif lab[0] == "sub":
                        memo[r] = f"{name(self.slots.find(lab[1]))}#{lab[2]}"
                    else:
                        memo[r] = f"{lab[1]}:{lab[2]}"
            return memo[r]

        out, used = {}, set()
        for r in sorted(roots, key=lambda r: best.get(r, (2, r))):
            base = f"P_{name(r)}"
            nm, i = base, 2
            while nm in used:
                nm, i = f"{base}'{i}", i + 1
            used.add(nm)
            out[r] = nm
        return out

    def _features(self, names: dict[int, str]) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
        """(group -> feature modules, module -> units dim where it is -1): units on dim 1, or on
        the last dim of a token tensor (B, T, D) whose dim 1 carries no group."""
        calls: dict[str, int] = {}
        for _, name, _ in self.module_calls:
            calls[name] = calls.get(name, 0) + 1
        cands: dict[str, list[tuple[int, int, str]]] = {}
        dims: dict[str, int] = {}
        for order, (node, name, m) in enumerate(self.module_calls):
            info = self.info.get(node)
            if (calls[name] > 1 or getattr(m, "inplace", False) or _mutated(node)
                    or not isinstance(info, _T) or len(info.shape) < 2):
                continue
            for dim in (1, -1) if len(info.shape) == 3 else (1,):
                leaves = self.slots.leaves(info.dims[dim])
                if len(leaves) == 1 and self.slots.find(leaves[0]) in names:
                    cands.setdefault(names[self.slots.find(leaves[0])], []).append(
                        (_feature_rank(m), order, name))
                    if dim == -1:
                        dims[name] = -1
                    break
        features = {g: tuple(n for rank, _, n in sorted(v) if rank == min(v)[0])
                    for g, v in cands.items()}
        listed = {n for ms in features.values() for n in ms}
        return features, {n: d for n, d in dims.items() if n in listed}


def _mutated(node: fx.Node) -> bool:
    """Whether a later node modifies ``node``'s output in place."""
    for u in node.users:
        if not u.args or u.args[0] is not node:
            continue
        if u.op == "call_method" and u.target.endswith("_") and not u.target.startswith("__"):
            return True
        if u.op == "call_function" and (u.target in INPLACE_OPERATORS or u.kwargs.get("inplace")
                                        or getattr(u.target, "__name__", "").endswith("_")):
            return True
        if u.op == "call_module" and getattr(u.graph.owning_module.get_submodule(u.target),
                                             "inplace", False):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Rules. Each takes (analysis, call) and returns the slot info of the call's value.


def _x(c: _Call, i: int = 0) -> _T:
    info = c.ia[i] if i < len(c.ia) else None
    if not isinstance(info, _T):
        raise _Unsupported("expected a tensor argument")
    return info


def r_elementwise(a: _Analysis, c: _Call):
    """Same function at every position (with broadcasting): every permutation commutes."""
    if not isinstance(c.value, Tensor):
        raise _Unsupported("no tensor result")
    shape = tuple(c.value.shape)
    return _T(a.broadcast(list(_tensors((c.ia, c.ika))), shape, c), shape)


def r_self(a: _Analysis, c: _Call):
    """Unary op on the first argument that keeps its shape (dtype/device casts, ``type_as``)."""
    x = _x(c)
    if not isinstance(c.value, Tensor) or tuple(c.value.shape) != x.shape:
        raise _Unsupported("shape changes")
    return x


def r_reshape(a: _Analysis, c: _Call):
    """Row-major reinterpretation: regroup the input's factors into the output dimensions,
    refining a factor that an output dimension boundary cuts."""
    x, shape = _x(c), tuple(c.value.shape)
    S = a.slots
    factors = S.leaves(_flat(x.dims))
    dims = []
    for n in shape:
        dim, rem = [], n
        while rem > 1:
            if not factors:
                return _reshape_failed(a, c, x)
            f = S.find(factors[0])
            if f in S.split:
                factors[0:1] = S.leaves([f])
                continue
            s = S.size[f]
            if rem % s == 0:
                dim.append(f)
                factors.pop(0)
                rem //= s
            elif s % rem == 0:
                factors[0:1] = S.split_slot(f, [rem, s // rem])
            else:
                return _reshape_failed(a, c, x)
        dims.append(tuple(dim))
    if factors:
        return _reshape_failed(a, c, x)
    return _T(tuple(dims), shape)


def _reshape_failed(a: _Analysis, c: _Call, x: _T):
    reason = f"{c.where} reshapes across units"
    a.slots.fix(_flat(x.dims), reason)
    return a.new_fixed(c.value, reason, _flat(x.dims))


def r_reorder(a: _Analysis, c: _Call):
    """permute / transpose / movedim / .T: the same dimensions in another order."""
    x = _x(c)
    m = a.dim_map(c)
    if None in m or sorted(m) != list(range(len(x.shape))):
        raise _Unsupported("not a reordering")
    return _T(tuple(x.dims[i] for i in m), tuple(c.value.shape))


def _reduce(a: _Analysis, c: _Call, fix_reduced: bool):
    x = _x(c)
    m = a.dim_map(c)
    reduced = [i for i in range(len(x.shape)) if i not in m]
    if fix_reduced:  # indices along the reduced dimension would move with a permutation
        a.slots.fix(_flat(x.dims[i] for i in reduced), f"indices along a dimension from {c.where}")
    out = lambda v: _T(tuple(x.dims[i] if i is not None else () for i in m),  # noqa: E731
                       tuple(v.shape))
    if isinstance(c.value, Tensor):
        return out(c.value)
    return tuple(out(v) for v in c.value)


def r_reduce(a: _Analysis, c: _Call):
    """Symmetric reductions (sum, mean, amax, var, norm...) are invariant to any
    permutation of the reduced dimensions; kept dimensions pass through."""
    return _reduce(a, c, fix_reduced=False)


def r_max_min(a: _Analysis, c: _Call):
    """``max(x, other)`` is elementwise; ``max(x, dim)`` also returns indices."""
    other = c.args[1] if len(c.args) > 1 else c.kwargs.get("other")
    if isinstance(other, Tensor):
        return r_elementwise(a, c)
    return _reduce(a, c, fix_reduced=not isinstance(c.value, Tensor))


def r_arg_reduce(a: _Analysis, c: _Call):
    return _reduce(a, c, fix_reduced=True)


def r_expand(a: _Analysis, c: _Call):
    """Expanded dimensions are constant along themselves: new unconstrained slots."""
    x, shape = _x(c), tuple(c.value.shape)
    off = len(shape) - len(x.shape)
    dims = []
    for j, n in enumerate(shape):
        i = j - off
        if i >= 0 and x.shape[i] == n:
            dims.append(x.dims[i])
        else:
            dims.append((a.slots.new(n),) if n > 1 else ())
    return _T(tuple(dims), shape)


def r_repeat(a: _Analysis, c: _Call):
    """Tiling: each output dimension is (copy index, input units); copies are identical."""
    x, shape = _x(c), tuple(c.value.shape)
    off = len(shape) - len(x.shape)
    dims = []
    for j, n in enumerate(shape):
        inner = x.dims[j - off] if j >= off else ()
        k = n // (x.shape[j - off] if j >= off else 1)
        dims.append(((a.slots.new(k),) if k > 1 else ()) + inner)
    return _T(tuple(dims), shape)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def r_cat(a: _Analysis, c: _Call):
    """Other dimensions are tied across the operands; the concatenated dimension is fixed
    (with a warning if it carried units): a consumer reading it would need a block-diagonal
    permutation of one axis, which the spec format cannot express."""
    b = c.bind(["tensors", "dim"])
    parts = [t for t in b["tensors"][1] if isinstance(t, _T)] if b["tensors"][1] else []
    if not parts or len(parts) != len(b["tensors"][0]):
        raise _Unsupported("operands")
    shape = tuple(c.value.shape)
    dim = _norm_dim(b.get("dim", (0, None))[0] or 0, len(shape))
    reason = f"concatenated by {c.where} (a block-diagonal permutation is not expressible)"
    sources = []
    for t in parts:
        if len(t.shape) != len(shape):
            raise _Unsupported("operand ranks differ")
        sources += list(t.dims[dim])
        a.slots.fix(t.dims[dim], reason)
    dims = list(a.broadcast([_T(t.dims[:dim] + ((),) + t.dims[dim + 1:],
                                t.shape[:dim] + (1,) + t.shape[dim + 1:]) for t in parts],
                            shape[:dim] + (1,) + shape[dim + 1:], c))
    dims[dim] = a.new_fixed(torch.empty(shape[dim]), reason, sources).dims[0]
    return _T(tuple(dims), shape)


def r_stack(a: _Analysis, c: _Call):
    """Stacking: operands tied dimension by dimension; the new dimension is fixed."""
    b = c.bind(["tensors", "dim"])
    parts = b["tensors"][1]
    if not parts or not all(isinstance(t, _T) for t in parts):
        raise _Unsupported("operands")
    shape = tuple(c.value.shape)
    dim = _norm_dim(b.get("dim", (0, None))[0] or 0, len(shape))
    dims = list(a.broadcast(list(parts), shape[:dim] + shape[dim + 1:], c))
    dims.insert(dim, a.new_fixed(torch.empty(shape[dim]), None).dims[0])
    return _T(tuple(dims), shape)


def r_chunk(a: _Analysis, c: _Call):
    """chunk / split / unbind: equal parts refine the dimension into (part index, units),
    the part index fixed; uneven parts fix the dimension."""
    x = _x(c)
    pieces = list(c.value)
    if c.node.target == "unbind" or getattr(c.node.target, "__name__", "") == "unbind":
        dim = _norm_dim(c.args[1] if len(c.args) > 1 else c.kwargs.get("dim", 0), len(x.shape))
        a.slots.fix(x.dims[dim], f"unbound by {c.where}")
        return tuple(_T(x.dims[:dim] + x.dims[dim + 1:], tuple(p.shape)) for p in pieces)
    dim = next((d for d in range(len(x.shape)) if pieces[0].shape[d] != x.shape[d]), None)
    if dim is None:
        return tuple(x for _ in pieces)
    sizes = [p.shape[dim] for p in pieces]
    n, k = len(pieces), sizes[0]
    if all(s == k for s in sizes) and n * k == x.shape[dim]:
        part = (a.slots.new(n),) if n > 1 else ()
        rest = (a.slots.new(k),) if k > 1 else ()
        a.slots.fix(part)  # which part is structure, not units
        a.unify(x.dims[dim], part + rest, c)
        inner = rest
    else:
        reason = f"split unevenly by {c.where}"
        a.slots.fix(x.dims[dim], reason)
        return tuple(_T(x.dims[:dim] + a.new_fixed(torch.empty(s), reason, x.dims[dim]).dims
                        + x.dims[dim + 1:], tuple(p.shape)) for p, s in zip(pieces, sizes))
    return tuple(_T(x.dims[:dim] + (inner,) + x.dims[dim + 1:], tuple(p.shape)) for p in pieces)


def r_getitem(a: _Analysis, c: _Call):
    """Items of tuples pass their info; tensor indexing keeps full slices, fixes indexed or
    sliced dimensions (an index picks a unit) and inserts size-1 dimensions for None."""
    obj, idx = c.ia[0], c.args[1]
    if not isinstance(obj, _T):
        if isinstance(obj, (list, tuple)):
            return obj[idx]
        raise _Unsupported("item of an untracked value")
    x = obj
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (Tensor, list, bool)) for i in items):
        raise _Unsupported("advanced indexing")
    used = sum(1 for i in items if i is not None and i is not Ellipsis)
    dims, d = [], 0
    reason = f"indexed by {c.where}"
    for item in items:
        if item is None:
            dims.append(())
        elif item is Ellipsis:
            for _ in range(len(x.shape) - used):
                dims.append(x.dims[d])
                d += 1
        elif isinstance(item, int):
            a.slots.fix(x.dims[d], reason)
            d += 1
        elif isinstance(item, slice):
            n = x.shape[d]
            r = range(*item.indices(n))
            if len(r) == n and r.step == 1:
                dims.append(x.dims[d])
            else:
                a.slots.fix(x.dims[d], reason)
                dims.append(a.new_fixed(torch.empty(len(r)), reason, x.dims[d]).dims[0])
            d += 1
        else:
            raise _Unsupported(f"index {item!r}")
    dims += list(x.dims[d:])
    shape = tuple(c.value.shape)
    if len(dims) != len(shape):
        raise _Unsupported("index result")
    return _T(tuple(dims), shape)


def r_matmul(a: _Analysis, c: _Call):
    """Contracted dimensions are tied (a sum over one index is invariant to permuting it);
    batch dimensions broadcast; the result has the left rows and the right columns."""
    x, y = _x(c, 0), _x(c, 1)
    shape = tuple(c.value.shape)
    if len(x.shape) == 1 and len(y.shape) == 1:
        a.unify(x.dims[0], y.dims[0], c)
        return _T((), shape)
    if len(x.shape) == 1:
        a.unify(x.dims[0], y.dims[-2], c)
        return _T(y.dims[:-2] + (y.dims[-1],), shape)
    if len(y.shape) == 1:
        a.unify(x.dims[-1], y.dims[0], c)
        return _T(x.dims[:-1], shape)
    a.unify(x.dims[-1], y.dims[-2], c)
    batch = a.broadcast([_T(x.dims[:-2], x.shape[:-2]), _T(y.dims[:-2], y.shape[:-2])],
                        shape[:-2], c)
    return _T(tuple(batch) + (x.dims[-2], y.dims[-1]), shape)


def r_einsum(a: _Analysis, c: _Call):
    """Dimensions with the same label are tied (contracted or kept alike)."""
    eq = c.args[0].replace(" ", "")
    ops = c.ia[1:] if len(c.ia) > 2 or not isinstance(c.ia[1], (list, tuple)) else c.ia[1]
    if "..." in eq or not all(isinstance(t, _T) for t in ops):
        raise _Unsupported("ellipsis or operands")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not rhs and "->" not in eq:
        rhs = "".join(sorted(ch for ch in set(lhs) if ch.isalpha() and lhs.count(ch) == 1))
    label: dict[str, tuple] = {}
    for term, t in zip(terms, ops):
        for ch, d, n in zip(term, t.dims, t.shape):
            if n == 1:
                continue
            if ch in label:
                a.unify(label[ch], d, c)
            else:
                label[ch] = d
    return _T(tuple(label.get(ch, ()) for ch in rhs), tuple(c.value.shape))


def r_sdpa(a: _Analysis, c: _Call):
    """softmax(q kᵀ) v: q and k share their last dimension; keys and values share their
    sequence dimension (attention is invariant to permuting key/value pairs); batch/head
    dimensions broadcast. A causal mask ties positions to their order: fixed."""
    b = c.bind(["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa"])
    q, k, v = (b[n][1] for n in ("query", "key", "value"))
    if not all(isinstance(t, _T) for t in (q, k, v)) or b.get("enable_gqa", (False,))[0]:
        raise _Unsupported("operands")
    shape = tuple(c.value.shape)
    a.unify(q.dims[-1], k.dims[-1], c)
    a.unify(k.dims[-2], v.dims[-2], c)
    parts = [_T(t.dims[:-2], t.shape[:-2]) for t in (q, k, v)]
    mask = b.get("attn_mask", (None, None))[1]
    if isinstance(mask, _T):
        full = shape[:-1] + (k.shape[-2],)
        dims = a.broadcast([mask, _T(tuple(p for p in a.broadcast(parts, shape[:-2], c))
                                     + (q.dims[-2], k.dims[-2]), full)], full, c)
        batch = dims[:-2]
    else:
        batch = a.broadcast(parts, shape[:-2], c)
    if b.get("is_causal", (False,))[0]:
        a.slots.fix(q.dims[-2] + k.dims[-2], f"causal mask of {c.where}")
    return _T(tuple(batch) + (q.dims[-2], v.dims[-1]), shape)


def r_pad(a: _Analysis, c: _Call):
    """Padded dimensions are fixed (the pad sits at one end of the units)."""
    x, pad = _x(c), c.args[1] if len(c.args) > 1 else c.kwargs["pad"]
    dims = list(x.dims)
    shape = tuple(c.value.shape)
    for k in range(len(pad) // 2):
        d = len(dims) - 1 - k
        if pad[2 * k] or pad[2 * k + 1]:
            reason = f"padded by {c.where}"
            a.slots.fix(dims[d], reason)
            dims[d] = a.new_fixed(torch.empty(shape[d]), reason, dims[d]).dims[0]
    return _T(tuple(dims), shape)


def _pool(a: _Analysis, c: _Call, n_spatial: int | None):
    """Channels pass; the last ``n_spatial`` dimensions (positions) are fixed."""
    x = _x(c)
    value = c.value[0] if isinstance(c.value, (tuple, list)) else c.value
    k = n_spatial if n_spatial is not None else len(x.shape) - 2
    if k <= 0 or k >= len(x.shape):
        raise _Unsupported("spatial dimensions")
    spatial = _flat(x.dims[-k:])
    a.slots.fix(spatial, f"pooled or resampled by {c.where}")
    shape = tuple(value.shape)
    pos = a.new_fixed(torch.empty(shape[-k:]), f"pooled by {c.where}", spatial).dims
    out = _T(x.dims[:-k] + pos, shape)
    return tuple(out for _ in c.value) if isinstance(c.value, (tuple, list)) else out


def _spatial_rank(obj) -> int | None:
    m = re.search(r"([123])d$", type(obj).__name__ if isinstance(obj, nn.Module) else obj.__name__)
    return int(m.group(1)) if m else None


def r_pool(a: _Analysis, c: _Call):
    return _pool(a, c, _spatial_rank(c.module if c.module is not None else c.node.target))


def r_interpolate(a: _Analysis, c: _Call):
    return _pool(a, c, None)


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


ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.CELU,
    nn.SELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink,
)
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
    torch.chunk: r_chunk, torch.split: r_chunk, torch.unbind: r_chunk,
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
    torch.broadcast_to: r_expand,
})


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
                     "split": r_chunk, "unbind": r_chunk, "matmul": r_matmul, "bmm": r_matmul,
                     "mm": r_matmul, "__matmul__": r_matmul})

CONSTANT_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.zeros_like,
                      torch.ones_like, torch.full_like, torch.empty_like}


def r_constant(a: _Analysis, c: _Call):
    """A constant tensor (zeros_like, new_ones...): constant along every dimension, so any
    permutation leaves it unchanged; it depends on its argument's shape only."""
    return a.fresh(c.value)


FUNCTION_RULES.update({f: r_constant for f in CONSTANT_FACTORIES})
METHOD_RULES.update({n: r_constant for n in ("new_zeros", "new_ones", "new_full", "new_empty")})
SHAPE_QUERIES = {"size", "dim", "numel", "nelement", "get_device", "is_contiguous",
                 "is_floating_point", builtins.len, builtins.getattr, builtins.isinstance,
                 torch._assert, operator.getitem}
TUPLE_GETTERS = {operator.getitem}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                     operator.ipow, operator.iand, operator.ior}
_ACTIVATIONS = ELEMENTWISE_MODULES
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
          nn.LayerNorm)


def _feature_rank(m: nn.Module) -> int:
    """Preference among feature modules: post-activation, then norm, then Linear/Conv."""
    if isinstance(m, _ACTIVATIONS):
        return 0
    if isinstance(m, _NORMS):
        return 1
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        return 2
    return 3


# ---------------------------------------------------------------------------------------------
# Public API.


def _as_tuple(example_input) -> tuple:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


class _Runner(nn.Module):
    """Holds the traced graph as a submodule so functional_call can swap its tensors."""

    def __init__(self, gm: fx.GraphModule, analysis: _Analysis):
        super().__init__()
        self.gm = gm
        self.analysis = [analysis]  # a list: not a submodule

    def forward(self, *inputs):
        return self.analysis[0].run(*inputs)


def _run_on_meta(gm: fx.GraphModule, model: nn.Module, inputs: tuple) -> _Analysis:
    """Analyse the graph with parameters, buffers and inputs on the meta device: the rules
    need shapes only, and meta tensors cost no arithmetic (ResNet-50 at 224x224: ~0.1 s)."""
    analysis = _Analysis(gm, model)
    meta = {f"gm.{k}": torch.empty_like(v, device="meta")
            for k, v in list(gm.named_parameters()) + list(gm.named_buffers())}
    args = tuple(x.to("meta") if isinstance(x, Tensor) else x for x in inputs)
    with torch.no_grad():
        functional_call(_Runner(gm, analysis), meta, args)
    return analysis


def trace_spec(model: nn.Module, example_input, warn: bool = True) -> PermutationSpec:
    """The permutation spec of ``model`` derived from a torch.fx trace (rules: module doc).

    ``example_input``: a tensor or a tuple of positional inputs, e.g. ``torch.zeros(1, C, H,
    W)``; only its shapes matter: the graph runs once in eval mode on meta tensors (on the
    real tensors, without grad, if an op has no meta kernel).
    Every ``state_dict`` key is in the spec; keys the graph never uses are unpermuted.
    Raises :class:`TraceError` when torch.fx cannot trace the model (data-dependent control
    flow, ...) or the traced graph fails on the input; warns (:class:`SpecWarning`, one
    warning per reason) when a rule leaves parameter axes unpermuted.
    """
    inputs = _as_tuple(example_input)
    was_training = model.training
    model.eval()
    try:
        try:
            gm = fx.symbolic_trace(model)
        except Exception as e:
            raise TraceError(
                f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); "
                "models with data-dependent control flow need a hand-written spec "
                "(lmcflow.matching.SPEC_BUILDERS)") from e
        try:
            analysis = _run_on_meta(gm, model, inputs)
        except Exception:  # an op without a meta kernel, or one that reads values: run for real
            analysis = _Analysis(gm, model)
            try:
                with torch.no_grad():
                    analysis.run(*inputs)
            except Exception as e:
                raise TraceError(f"the traced graph of {type(model).__name__} failed on the "
                                 f"example input ({type(e).__name__}: {e})") from e
    finally:
        model.train(was_training)
    spec, lost = analysis.build()
    if warn:
        for reason, where in lost.items():
            more = f" and {len(where) - 8} more" if len(where) > 8 else ""
            warnings.warn(f"{type(model).__name__}: {reason}; left unpermuted: "
                          f"{', '.join(where[:8])}{more}", SpecWarning, stacklevel=2)
    return spec


# -- equivalence --------------------------------------------------------------------------------


def _nontrivial_permutation(spec: PermutationSpec, seed: int) -> dict[str, Tensor]:
    """One random permutation per group (sorted group order), redrawn until it moves a unit."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = {}
    for g, n in sorted(spec.sizes.items()):
        p = torch.randperm(n, generator=gen)
        while n > 1 and torch.equal(p, torch.arange(n)):
            p = torch.randperm(n, generator=gen)
        perm[g] = p
    return perm


def _out_tensors(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _out_tensors(o)]
    return []


def _rel_error(a, b) -> float:
    """max |b - a| / max |a| over the tensors of two outputs of the same structure."""
    ta, tb = _out_tensors(a), _out_tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return float("inf")
    err = 0.0
    for x, y in zip(ta, tb):
        if x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        err = max(err, float((y - x).abs().max()) / max(float(x.abs().max()), 1e-12))
    return err


def _axis_groups(spec: PermutationSpec, key: str, axis: int) -> list[tuple[int, str | None]]:
    """(size, group) of the view axes that make up stored axis ``axis`` of ``key``."""
    shape, ax = spec.shapes[key], spec.axes[key]
    view = spec.reshape.get(key, shape)
    j = 0
    for i, n in enumerate(shape):
        span, prod = [], 1
        while j < len(view) and (prod < n or (n == 1 and not span)):
            span.append(j)
            prod *= view[j]
            j += 1
        if i == axis:
            return [(view[k], ax[k]) for k in span]
    return []


def _permute_dim(t: Tensor, dim: int, groups, perm) -> Tensor:
    """``t`` with dim ``dim`` permuted as the factors ``groups`` [(size, group)] say."""
    sizes = [n for n, _ in groups]
    x = t.movedim(dim, -1).unflatten(-1, sizes)
    for i, (_, g) in enumerate(groups):
        if g is not None and g in perm:
            x = x.index_select(x.ndim - len(sizes) + i, perm[g])
    return x.flatten(-len(sizes)).movedim(-1, dim)


def _output_axes(name: str, m: nn.Module, spec: PermutationSpec) -> list[tuple[str, int, int]]:
    """(key, stored axis, usual output dim) of the tensors that define a module's output units."""
    def key(s):
        return f"{name}.{s}" if name else s
    if isinstance(m, nn.MultiheadAttention):
        return [(key("out_proj.weight"), 0, -1)]
    if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and key("weight") in spec.axes:
        k = len(m.normalized_shape)
        return [(key("weight"), i, i - k) for i in range(k)]
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return [(key("weight"), 1, 1)]
    if isinstance(m, nn.Embedding):
        return [(key("weight"), 1, -1)]
    if isinstance(m, nn.Linear):
        return [(key("weight"), 0, -1)]
    for s in ("weight", "running_mean", "bias"):
        if key(s) in spec.axes and len(spec.shapes[key(s)]) >= 1:
            return [(key(s), 0, 1)]
    return []


def _expected(out: Tensor, name: str, m: nn.Module, spec: PermutationSpec, perm) -> list[Tensor]:
    """Candidate permuted outputs of ``m`` (usual output dim first, then other dims of the
    same size: custom modules such as a channel LayerNorm put units elsewhere)."""
    axes = _output_axes(name, m, spec)
    if not axes:
        return []
    if len(axes) > 1:  # several normalised dims
        for key, axis, dim in axes:
            out = _permute_dim(out, dim % out.ndim, _axis_groups(spec, key, axis), perm)
        return [out]
    key, axis, dim = axes[0]
    groups = _axis_groups(spec, key, axis)
    n = math.prod(s for s, _ in groups)
    dims = [d for d in [dim % out.ndim] + list(range(out.ndim)) if out.shape[d] == n]
    return [_permute_dim(out, d, groups, perm) for d in dict.fromkeys(dims)]


def _module_keys(name: str, m: nn.Module, spec) -> list[str]:
    keys = [f"{name}.{k}" if name else k for k, _ in
            list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))]
    return [k for k in keys if k in spec.axes]


def _suspect(name: str, m: nn.Module, spec: PermutationSpec, group: str | None) -> str:
    """The module's tensor to blame when no single axis fix is found: among its tensors
    along the output units, the odd one out (the group's members outside the module vote
    with those that carry it), else its weight."""
    keys = _module_keys(name, m, spec)
    axes = _output_axes(name, m, spec)
    if not axes:
        return keys[0]
    main = axes[0][0]
    n = math.prod(s for s, _ in _axis_groups(spec, main, axes[0][1]))
    per_unit = [(main, axes[0][1])] + [(k, 0) for k in keys if k != main and spec.shapes[k] == (n,)]
    if group is not None:
        has = [k for k, ax in per_unit if group in [g for _, g in _axis_groups(spec, k, ax)]]
        lacks = [k for k, _ in per_unit if k not in has]
        outside = any(k not in keys and k != main for k, _ in spec.groups[group])
        if has and lacks:
            return lacks[0] if len(has) + outside >= len(lacks) else has[0]
    return main


def _caller(model: nn.Module, inputs: tuple) -> Callable[[dict], Any]:
    """state -> model outputs on ``inputs`` with that state (functional_call), passing one
    key per tied tensor (functional_call refuses two values for one tensor)."""
    first: dict[int, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        first.setdefault(id(t), key)
    keep = set(first.values())
    return lambda state: functional_call(model, {k: v for k, v in state.items() if k in keep},
                                         inputs)


def _first_disagreement(model, spec, perm, state, inputs, rtol, call):
    """(module name, module, relative error, names of the modules called before it, nearest
    first) for the first module call, in forward order, whose output in the permuted model
    differs from its original output permuted by the groups of its output units."""
    hooked = [(n, m) for n, m in model.named_modules() if _module_keys(n, m, spec)]
    records: list[list] = [[], []]
    run = [0]

    def hook(name):
        def fn(_m, _i, out):
            t = _out_tensors(out)
            if t:
                records[run[0]].append((name, t[0].detach().clone()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in hooked]
    try:
        model(*inputs)
        run[0] = 1
        call(apply_permutation(spec, perm, state))
    finally:
        for h in handles:
            h.remove()
    modules = dict(hooked)
    before: list[str] = []
    for (name, a), (_, b) in zip(*records):
        cands = _expected(a, name, modules[name], spec, perm)
        if cands and min(_rel_error(e, b) for e in cands) > rtol:
            err = min(_rel_error(e, b) for e in cands)
            return name, modules[name], err, list(dict.fromkeys(reversed(before)))
        before.append(name)
    return None


def _with_axis(spec: PermutationSpec, key: str, axis: int, group: str | None) -> PermutationSpec:
    """``spec`` with view axis ``axis`` of ``key`` set to ``group``."""
    axes = dict(spec.axes)
    axes[key] = tuple(group if i == axis else g for i, g in enumerate(axes[key]))
    return PermutationSpec(axes, spec.shapes, spec.reshape)


def _fix_for_group(spec, group, perm, breaks, near, modules) -> tuple[str, int, str] | None:
    """(key, view axis, "remove" | "add"): one axis whose removal from / addition to
    ``group`` keeps the function when only ``group`` is permuted. Additions are tried on the
    tensors of ``near`` (module names, most suspect first), at most 64 of them."""
    members = spec.groups[group]
    p = {group: perm[group]}
    for key, axis in members:
        if len(members) == 1 or not breaks(_with_axis(spec, key, axis, None), p):
            return key, axis, "remove"
    n, tried = spec.sizes[group], 0
    for name in near:
        for key in _module_keys(name, modules[name], spec):
            view = spec.reshape.get(key, spec.shapes[key])
            for axis, size in enumerate(view):
                if size != n or spec.axes[key][axis] == group or tried >= 64:
                    continue
                tried += 1
                if not breaks(_with_axis(spec, key, axis, group), p):
                    return key, axis, "add"
    return None


@torch.no_grad()
def check_equivalence(model: nn.Module, spec: PermutationSpec, example_input, seed: int = 0,
                      rtol: float = 1e-4) -> dict:
    """Check that a seeded random permutation applied through ``spec`` keeps the outputs.

    The permutation is drawn per group (sorted order, generator seeded with ``seed``, redrawn
    until it is not the identity), applied with :func:`lmcflow.matching.apply_permutation`
    and run with ``torch.func.functional_call`` in eval mode on ``example_input``. Outputs
    agree when ``max |out' - out| <= rtol * max |out|`` (every output tensor).

    On failure raises :class:`EquivalenceError` naming the culprit tensor (``.key``):

    1. the group (in ``state_dict`` order of its first tensor) whose permutation alone
       changes the outputs;
    2. with only that group permuted, the first module call in forward order whose output
       differs from its original output permuted by the groups of its output units (a
       Linear's ``weight`` axis 0, a norm's per-channel tensors...);
    3. the axis that, removed from the group or added to it (tried on that module, the
       modules called just before it and its ancestors), makes the function whole again;
       failing that, the module's tensor that disagrees with the others on its output units,
       or its weight.

    Returns ``{"max_rel_error", "groups", "seed"}``.
    """
    inputs = _as_tuple(example_input)
    state = model.state_dict()
    spec.check_state(state)
    perm = _nontrivial_permutation(spec, seed)
    call = _caller(model, inputs)
    was_training = model.training
    model.eval()
    try:
        ref = model(*inputs)

        def breaks(sub_spec, sub_perm) -> bool:
            return _rel_error(ref, call(apply_permutation(sub_spec, sub_perm, state))) > rtol

        err = _rel_error(ref, call(apply_permutation(spec, perm, state)))
        if err <= rtol:
            return {"max_rel_error": err, "groups": len(perm), "seed": int(seed)}
        order = {k: i for i, k in enumerate(state)}
        groups = sorted(spec.groups, key=lambda g: min(order[k] for k, _ in spec.groups[g]))
        group = next((g for g in groups if breaks(spec, {g: perm[g]})), None)
        found = _first_disagreement(model, spec, {group: perm[group]} if group else perm,
                                    state, inputs, rtol, call)
        fix = None
        if group is not None:
            modules = dict(model.named_modules())
            owners = [n for n, m in modules.items() if _module_keys(n, m, spec)]
            if found:  # M, the modules called just before it, then its ancestors (they own
                # tensors used directly in their forward, e.g. a position embedding)
                near = [found[0]] + found[3][:8] + [
                    n for n in owners if n == "" or found[0].startswith(n + ".")][::-1]
            else:
                near = owners
            fix = _fix_for_group(spec, group, perm, breaks, near, modules)
    finally:
        model.train(was_training)
    head = (f"permuting {type(model).__name__} by the spec changes its outputs (max relative "
            f"error {err:.3g} > rtol {rtol:g})")
    if group is not None:
        entries = ", ".join(f"{k}[{a}]" for k, a in spec.groups[group][:6])
        more = ", ..." if len(spec.groups[group]) > 6 else ""
        head += f"; group {group} alone breaks it ({entries}{more})"
    where = f"; first disagreement at module '{found[0]}' (relative error {found[2]:.3g})" \
        if found else ""
    if fix is not None:
        key, axis, how = fix
        what = (f"{key} axis {axis} should not be permuted by {group}" if how == "remove" else
                f"{key} axis {axis} misses {group}")
        raise EquivalenceError(f"{head}{where}: {what} (the function is kept with that change)",
                               key=key, module=found[0] if found else None, group=group,
                               error=err)
    if found is not None:
        key = _suspect(found[0], found[1], spec, group)
        raise EquivalenceError(f"{head}{where}: check {key}", key=key, module=found[0],
                               group=group, error=err)
    key = spec.groups[group][0][0] if group else next(iter(spec.cost_keys), None)
    raise EquivalenceError(f"{head}; no module output pins it down: check {key}", key=key,
                           module=None, group=group, error=err)
