"""The public entry: :func:`trace_spec`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call

from ..spec import PermutationSpec
from .analysis import _Analysis
from .slots import SpecWarning, TraceError
from .summary import summarize
from .tables import RULES


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
    analysis = _Analysis(gm, model, RULES)
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
    flow, ...) or the traced graph fails on the input; warns once (:class:`SpecWarning`, a
    summary: groups, the permuted share of the parameters, what stayed unpermuted grouped by
    reason) when parameter axes lost all their units.
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
                "(lmcflow.alignment.builders.SPEC_BUILDERS)") from e
        try:
            analysis = _run_on_meta(gm, model, inputs)
        except Exception:  # an op without a meta kernel, or one that reads values: run for real
            analysis = _Analysis(gm, model, RULES)
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
        _warn_summary(model, spec, lost, analysis)
    return spec


def _warn_summary(model: nn.Module, spec: PermutationSpec, lost: dict[str, list[str]],
                  analysis: _Analysis) -> None:
    """One :class:`SpecWarning` for the model (:func:`summary.summarize`: groups, permuted
    share of the parameters, what stayed unpermuted grouped by reason), none when nothing
    that matters stayed unpermuted."""
    unused = [k for k in analysis.state if analysis.alias[k] not in analysis.params]
    summary = summarize(model, spec, lost, unused)
    if summary.lost:
        warnings.warn(summary.text(), SpecWarning, stacklevel=3)
