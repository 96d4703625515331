"""The public entry: :func:`trace_spec`.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call

from ..spec import PermutationSpec
from .analysis import _Analysis
from .fallback import ROOT, symbolic_trace_with_leaves, whole_model_graph
from .slots import SpecWarning, TraceError
from .tables import RULES

log = logging.getLogger(__name__)


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


def _run_on_meta(gm: fx.GraphModule, model: nn.Module, inputs: tuple,
                 leaves: dict[str, str]) -> _Analysis:
    """Analyse the graph with parameters, buffers and inputs on the meta device: the rules
    need shapes only, and meta tensors cost no arithmetic (ResNet-50 at 224x224: ~0.1 s)."""
    analysis = _Analysis(gm, model, RULES, leaves)
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
    Submodules torch.fx cannot trace (data-dependent control flow, ``len`` of a tensor...)
    are kept as leaves and traced through on the example input (:mod:`.fallback`,
    :mod:`.through`); one that reads tensor values stays unpermuted with its inputs and
    outputs, with a warning saying why; so is the model's own forward, as a whole, where fx
    fails outside any submodule. Raises :class:`TraceError` when that forward reads tensor
    values, or the traced graph fails on the input; warns (:class:`SpecWarning`, one
    warning per reason) when a rule leaves parameter axes unpermuted.
    """
    inputs = _as_tuple(example_input)
    was_training = model.training
    model.eval()
    try:
        untraceable = None
        try:
            gm, leaves = symbolic_trace_with_leaves(model)
        except Exception as e:  # the model's own forward: trace through it as a whole
            untraceable = TraceError(
                f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {e}); "
                "models with data-dependent control flow need a hand-written spec "
                "(lmcflow.alignment.builders.SPEC_BUILDERS)")
            untraceable.__cause__ = e
            gm = whole_model_graph(model, len(inputs))
            leaves = {ROOT: f"{type(e).__name__}: {str(e).strip()[:160]}"}
        if leaves:
            log.info("%s: torch.fx cannot trace %s; traced with them as leaves, each traced "
                     "through on the example input", type(model).__name__, "; ".join(
                         f"{'its own forward' if k == ROOT else repr(k)} ({v})"
                         for k, v in leaves.items()))
        try:
            analysis = _run_on_meta(gm, model, inputs, leaves)
        except Exception:  # an op without a meta kernel, or one that reads values: run for real
            analysis = _Analysis(gm, model, RULES, leaves)
            try:
                with torch.no_grad():
                    analysis.run(*inputs)
            except Exception as e:
                if untraceable is not None:
                    raise untraceable from e
                raise TraceError(f"the traced graph of {type(model).__name__} failed on the "
                                 f"example input ({type(e).__name__}: {e})") from e
    finally:
        model.train(was_training)
    if untraceable is not None and ROOT in analysis.opaque:  # nothing could be permuted
        raise TraceError(f"{untraceable}; tracing through its forward: "
                         f"{analysis.opaque[ROOT]}") from untraceable.__cause__
    spec, lost = analysis.build()
    if warn:
        for reason, where in lost.items():
            more = f" and {len(where) - 8} more" if len(where) > 8 else ""
            warnings.warn(f"{type(model).__name__}: {reason}; left unpermuted: "
                          f"{', '.join(where[:8])}{more}", SpecWarning, stacklevel=2)
    return spec
