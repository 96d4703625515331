"""The analysis: a ``torch.fx`` Interpreter that runs every node of the traced graph and applies
its rule (:mod:`.tables`), tying slots; it then reads the groups off the slots.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn

from ..spec import PermutationSpec
from .slots import PRIMES, ROWS, _Call, _Slots, _T, _Unsupported, _flat, _has_tensor, _tensors


# What the interpreter itself knows about operations (the rules for each are in .tables).
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.CELU,
    nn.SELU, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Threshold, nn.LogSigmoid, nn.Softshrink, nn.Hardshrink,
)
CONSTANT_FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.zeros_like,
                      torch.ones_like, torch.full_like, torch.empty_like}
SHAPE_QUERIES = {"size", "dim", "numel", "nelement", "get_device", "is_contiguous",
                 "is_floating_point", builtins.len, builtins.getattr, builtins.isinstance,
                 torch._assert, operator.getitem}
TUPLE_GETTERS = {operator.getitem}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                     operator.ipow, operator.iand, operator.ior}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm,
          nn.LayerNorm)


def _feature_rank(m: nn.Module) -> int:
    """Preference among feature modules: post-activation, then norm, then Linear/Conv."""
    if isinstance(m, ELEMENTWISE_MODULES):
        return 0
    if isinstance(m, _NORMS):
        return 1
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        return 2
    return 3


@dataclass(frozen=True)
class Rules:
    """Which rule handles a call: by module class (first match in order), tensor method name,
    or function. :data:`.tables.RULES` is the tracer's."""

    modules: list[tuple[type | tuple, Callable]]
    methods: dict[str, Callable]
    functions: dict[Any, Callable]
    # for calls with no rule of their own: a Python function torch.fx kept as one node, or a
    # submodule kept as a leaf because fx cannot trace it (:func:`.through.r_through`)
    through: Callable | None = None


class _Analysis(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, model: nn.Module, rules: Rules,
                 leaves: dict[str, str] | None = None):
        super().__init__(gm)
        self.rules = rules
        self.leaves = dict(leaves or {})  # submodules fx could not trace -> why
        self.opaque: dict[str, str] = {}  # leaves that could not be traced through -> why
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
            m = self.fetch_attr(n.target)
            return f"{type(m).__name__} " + \
                ("(the model's forward)" if m is self.model else f"'{n.target}'")
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
            if c.node.target in self.leaves:  # its class's rule would assume its usual forward
                return self.rules.through
            for types, rule in self.rules.modules:
                if isinstance(c.module, types):
                    return rule
            return None
        if c.node.op == "call_method":
            return self.rules.methods.get(c.node.target)
        try:
            rule = self.rules.functions.get(c.node.target)
        except TypeError:  # unhashable target
            return None
        return rule if rule is not None else self.rules.through

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
            self.slots.silent_fixed(s) for s in self.slots.units(sources)))
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
        self.slots.settle()
        leaf_roots = {leaf for dims in self.params.values() for d in dims
                      for leaf in self.slots.units(d) if not self.slots.fixed(leaf)}
        names = self._group_names(leaf_roots)
        axes, shapes, reshape, segments, lost = {}, {}, {}, {}, {}
        for key, t in self.state.items():
            shape = tuple(t.shape)
            shapes[key] = shape
            dims = self.params.get(self.alias[key])
            if dims is None:
                axes[key] = (None,) * len(shape)
                continue
            view, ax = [], []
            for axis, (n, d) in enumerate(zip(shape, dims)):
                where, why = f"{key}[{axis}]", {}
                entries: list[list] = []  # [size, group, stretches]
                for leaf in self.slots.leaves(d):
                    size, r = self.slots.size[leaf], self.slots.find(leaf)
                    stretches = self._stretches(r, names, where, why)
                    group = names.get(r)
                    if group is None and stretches is None:
                        self._lost(r, where, why)
                        if entries and entries[-1][1:] == [None, None]:  # adjacent unpermuted
                            entries[-1][0] *= size
                            continue
                    entries.append([size, group, stretches])
                if any(g is not None or st is not None for _, g, st in entries):
                    why.pop(ROWS, None)  # a structural factor beside permuted units
                for reason, at in why.items():
                    lost.setdefault(reason, []).extend(at)
                for size, group, stretches in entries or [[n, None, None]]:
                    if stretches is not None:
                        segments.setdefault(key, {})[len(view)] = stretches
                    view.append(size)
                    ax.append(group)
            axes[key] = tuple(ax)
            if tuple(view) != shape:
                reshape[key] = tuple(view)
        spec = PermutationSpec(axes, shapes, reshape, *self._features(names), segments)
        return spec, {r: sorted(set(v), key=v.index) for r, v in lost.items()}

    def _lost(self, r: int, where: str, lost: dict[str, list[str]]) -> None:
        """Record, per reason, that the fixed class ``r`` leaves ``where`` unpermuted."""
        for u in self.slots.units([r]):
            if u not in self.slots.silent:
                for reason in self.slots.reasons.get(u, []):
                    lost.setdefault(reason, []).append(where)

    def _stretches(self, r: int, names: dict[int, str], where: str, lost) -> tuple | None:
        """The spec's segments of the concatenation ``r`` (adjacent fixed parts merged), or
        None when ``r`` is no concatenation or none of its parts is permuted."""
        if r not in self.slots.concat:
            return None
        out: list[list] = []
        for p in self.slots.parts([r]):
            group = names.get(p)
            if group is None:
                if p in self.slots.split and not all(self.slots.fixed(u)
                                                     for u in self.slots.units([p])):
                    raise AssertionError(f"{where}: a factorised part survived settle()")
                self._lost(p, where, lost)
                if out and out[-1][0] is None:
                    out[-1][1] += self.slots.size[p]
                    continue
            out.append([group, self.slots.size[p]])
        if all(g is None for g, _ in out):
            return None
        return tuple((g, n) for g, n in out)

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
                    elif lab[0] == "part":
                        memo[r] = f"{name(self.slots.find(lab[1]))}.part{lab[2]}"
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
