"""torch.fx tracing that survives submodules it cannot trace.

``fx.symbolic_trace`` fails on the whole model when one submodule's forward has Python control
flow on tensor values (``if x.sum() > 0``), takes ``len`` of a tensor, or builds shapes from
values. :func:`symbolic_trace_with_leaves` traces again with the innermost submodule whose forward
failed kept as a leaf (one ``call_module`` node), until the trace succeeds; the analysis then
traces through each leaf on its concrete input (:mod:`.through`), or, where the leaf reads
tensor values, keeps its inputs, tensors and outputs unpermuted and says why. When the model's
own forward fails, the whole model is one leaf (:func:`whole_model_graph`), traced through
unless it reads tensor values.
"""

from __future__ import annotations

from torch import fx, nn


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with extra leaves; remembers the innermost module that failed."""

    def __init__(self, leaves):
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the first handler to run is the innermost one
                self.failed_in = self.path_of_module(m)
            raise


def symbolic_trace_with_leaves(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    """``(graph module, leaves)``: ``fx.symbolic_trace(model)`` with no leaves where it works;
    else traced with the smallest failing submodules as leaves, ``leaves`` mapping each one's
    name to why torch.fx failed in it. Raises the first error when the model's own forward
    (outside any submodule) cannot be traced."""
    leaves: dict[str, str] = {}
    first: Exception | None = None
    while True:
        tracer = _LeafTracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as e:
            first = first or e
            if not tracer.failed_in or tracer.failed_in in leaves:
                raise first
            message = str(e).strip().splitlines()[0] if str(e).strip() else ""
            leaves[tracer.failed_in] = f"{type(e).__name__}: {message[:160]}"
            continue
        return fx.GraphModule(tracer.root, graph, type(model).__name__), leaves


ROOT = "_traced_model"  # the name of the model inside :func:`whole_model_graph`'s wrapper


class _Whole(nn.Module):
    """The model as the one submodule of a wrapper, so that its own forward can be a leaf."""

    def __init__(self, model: nn.Module):
        super().__init__()
        setattr(self, ROOT, model)


def whole_model_graph(model: nn.Module, n_inputs: int) -> fx.GraphModule:
    """A graph of one node, ``model(*inputs)`` as a leaf named :data:`ROOT`: for a model whose
    own forward torch.fx cannot trace, so that it is traced through as a whole."""
    graph = fx.Graph()
    inputs = tuple(graph.placeholder(f"input{i}") for i in range(n_inputs))
    graph.output(graph.call_module(ROOT, inputs))
    return fx.GraphModule(_Whole(model), graph, type(model).__name__)
