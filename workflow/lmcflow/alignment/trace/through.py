"""Tracing through what torch.fx leaves opaque: Python functions kept as one node by
``torch.fx.wrap`` (torchvision Swin's ``shifted_window_attention``, ``_get_relative_position_bias``)
and submodules that ``symbolic_trace`` cannot trace, kept as leaves (:mod:`.fallback`).

Such a call is run again on its concrete arguments under a ``TorchFunctionMode`` that hands
every torch operation of the body to the analysis as a node of a scratch graph, analysed by
the same rules as the traced graph. Shape arithmetic and Python control flow on shapes are
evaluated, so the analysis sees the body as it runs on inputs of the example's shapes.
Tensors are matched by identity: the call's tensor arguments keep their slots, the model's
parameters and buffers (a leaf's own included) are read as ``get_attr`` nodes of their
``state_dict`` key (so units keep their modules' names), any other tensor is a fixed constant.
Submodules called inside are recorded as module calls, so they can be feature modules.

That is sound only if the body does the same thing on every input of these shapes: a body
that reads tensor values into Python (``bool``, ``item``, ``tolist``, ``int``...: control flow
on data) is unknown instead, so its inputs, its module's tensors and its outputs stay
unpermuted, and the reason says so.
"""

from __future__ import annotations

import builtins
import operator

import torch
from torch import Tensor, fx
from torch.nn.modules.module import register_module_forward_hook
from torch.overrides import TorchFunctionMode

from .slots import _Call

# Tensor methods that read metadata, never values (not recorded).
_META_QUERIES = {"size", "dim", "ndimension", "numel", "nelement", "stride", "storage_offset",
                 "element_size", "is_contiguous", "is_floating_point", "is_complex",
                 "is_signed", "get_device", "__len__", "dim_order", "data_ptr"}


def traceable_function(target) -> bool:
    """A Python function defined outside torch: one that torch.fx kept as a single node.
    (torch's own Python functions dispatch back to the mode on entry; not traceable.)"""
    module = getattr(target, "__module__", None) or ""
    return (hasattr(target, "__code__") and callable(target)
            and module != "torch" and not module.startswith("torch."))


def _normalize(func, args) -> tuple | None:
    """(op, target, args) of a torch API call the way torch.fx records it, None for a
    metadata query."""
    name = getattr(func, "__name__", "")
    owner = getattr(func, "__self__", None)
    if name == "__get__" and owner is not None:  # a Tensor property (shape, T, data...)
        return ("call_function", builtins.getattr, (args[0], getattr(owner, "__name__", "")))
    if name in _META_QUERIES:  # x.size(), torch.numel(x), torch.is_floating_point(x)...
        return None
    qual = getattr(func, "__qualname__", "") or ""
    if not qual.startswith(("TensorBase.", "Tensor.")):
        return ("call_function", func, tuple(args))
    if name == "__getitem__":
        return ("call_function", operator.getitem, tuple(args))
    if name == "__setitem__":
        return ("call_function", operator.setitem, tuple(args))
    return ("call_method", name, tuple(args))


def _reads_values(target, value) -> bool:
    """A call that turns tensor values into Python values (attributes are metadata)."""
    if (value is None or isinstance(value, (Tensor, str, torch.dtype, torch.device))
            or target is builtins.getattr):  # x.type() is a string
        return False
    if isinstance(value, (list, tuple)):
        return not all(isinstance(v, Tensor) for v in value)
    return True


class _Recorder(TorchFunctionMode):
    """Hands every torch call of a body to the analysis ``a`` as a node of a scratch graph."""

    def __init__(self, a, outer: fx.Node):
        super().__init__()
        self.a, self.outer = a, outer
        self.graph = fx.Graph()
        self.known: dict[int, tuple] = {}  # id(tensor) -> (node, info)
        self.alive: list = []  # keeps the ids unique while recording
        self.reads: list[str] = []
        self.error: Exception | None = None
        self.stack = dict(outer.meta.get("nn_module_stack") or {})
        self.where = a._where(outer)

    def bind(self, value, node, info) -> None:
        if isinstance(value, Tensor) and info is not None:
            self.known[id(value)] = (node, info)
            self.alive.append(value)
        elif isinstance(value, (list, tuple)) and isinstance(info, (list, tuple)):
            for v, i in zip(value, info):
                self.bind(v, node, i)

    def state_tensor(self, t: Tensor, key: str) -> None:
        self.bind(t, self.graph.get_attr(key), self.a.param(key))

    def lookup(self, value) -> tuple:
        """(graph argument, slot info) of an argument; tensors the body did not make nor
        receive are fixed constants."""
        if isinstance(value, Tensor):
            if id(value) not in self.known:
                self.bind(value, self.graph.placeholder(f"constant{len(self.alive)}"),
                          self.a.new_fixed(value, f"constant tensor inside {self.where} "
                                                  "(not in the state_dict)"))
            return self.known[id(value)]
        if isinstance(value, (list, tuple)):
            pairs = [self.lookup(v) for v in value]
            return type(value)(p[0] for p in pairs), tuple(p[1] for p in pairs)
        if isinstance(value, dict):
            pairs = {k: self.lookup(v) for k, v in value.items()}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        return value, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        value = func(*args, **kwargs)  # the mode is off inside: nested calls are not seen
        if self.error is None:
            try:
                self.record(func, args, kwargs, value)
            except Exception as e:  # noqa: BLE001 - the whole call becomes unknown
                self.error = e
        return value

    def record(self, func, args, kwargs, value) -> None:
        norm = _normalize(func, args)
        if norm is None:
            return
        op, target, args = norm
        pa = [self.lookup(x) for x in args]
        pk = {k: self.lookup(v) for k, v in kwargs.items()}
        name = getattr(target, "__name__", target)
        node = self.graph.create_node(op, target, tuple(p[0] for p in pa),
                                      {k: p[0] for k, p in pk.items()},
                                      name=f"{self.outer.name}_{name}")
        node.meta["nn_module_stack"] = self.stack
        c = _Call(node, args, dict(kwargs), tuple(p[1] for p in pa),
                  {k: p[1] for k, p in pk.items()}, value, self.a._where(node))
        if _reads_values(target, value):
            self.reads.append(c.where)
        self.bind(value, node, self.a._analyse(c))


def _through(a, c: _Call, call, state: dict, why: str):
    """Info of ``c.value`` from running ``call()`` (the body of ``c``) under a recorder;
    ``state``: key -> tensor of model tensors the body reads without receiving them."""
    rec = _Recorder(a, c.node)
    kw = [(c.kwargs[k], c.node.kwargs.get(k), c.ika.get(k)) for k in c.kwargs]
    for value, node, info in [*zip(c.args, c.node.args, c.ia), *kw]:
        if isinstance(node, fx.Node) and node.op == "get_attr" and node.target in a.state:
            rec.state_tensor(value, node.target)
        else:
            rec.bind(value, rec.graph.placeholder(f"arg{len(rec.alive)}"), info)
    for key, t in state.items():
        rec.state_tensor(t, key)
    names = {id(m): n for n, m in a.model.named_modules()}

    def module_called(m, _args, out):  # modules called inside: feature candidates, as in fx
        if m is not c.module and id(m) in names and isinstance(out, Tensor) \
                and id(out) in rec.known:
            node, info = rec.known[id(out)]
            a.module_calls.append((node, names[id(m)], m))
            a.info[node] = info

    hook = register_module_forward_hook(module_called)
    try:
        with rec:
            value = call()
    finally:
        hook.remove()
    if rec.error is not None:
        detail = f"tracing through it failed ({type(rec.error).__name__}: {rec.error})"
    elif rec.reads:
        detail = f"it reads tensor values ({rec.reads[0]}), so what it computes may depend on them"
    else:
        return rec.lookup(value)[1]
    if c.node.op == "call_module":
        a.opaque[c.node.target] = detail
    return a.unsupported(c, f"{why}; {detail}" if why else detail)


def r_through(a, c: _Call):
    """The rule for calls without a rule of their own that can be traced through: a Python
    function kept as one node by ``torch.fx.wrap``, or a submodule kept as a leaf because
    torch.fx cannot trace it (``a.leaves``: name -> why)."""
    if c.node.op == "call_module":
        why = a.leaves.get(c.node.target)
        if why is None:
            return a.unsupported(c)
        prefix = "" if c.module is a.model else f"{c.node.target}."
        tensors = list(c.module.named_parameters(remove_duplicate=False)) + \
            list(c.module.named_buffers(remove_duplicate=False))
        state = {prefix + n: t for n, t in tensors if prefix + n in a.state}
        return _through(a, c, lambda: c.module(*c.args, **c.kwargs), state,
                        f"torch.fx cannot trace it ({why})")
    if c.node.op != "call_function" or not traceable_function(c.node.target):
        return a.unsupported(c)
    return _through(a, c, lambda: c.node.target(*c.args, **c.kwargs), {}, "")
