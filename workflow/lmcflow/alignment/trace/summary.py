"""One summary per traced model (:func:`summarize`): its groups, the share of its parameters
that lie on a permuted axis (:func:`permuted_share`), and what stayed unpermuted and why,
grouped by reason.

The analysis records, per reason, the ``state_dict`` axes that reason left unpermuted
(``"key[axis]"``). A reason names an operation and where it sits (``concatenated by cat (node
'cat_3' in 'features.denseblock1') ...``); the summary groups reasons by kind (the reason
without its place) with the number of axes, the places and a few example axes. Only axes
that lost all their units count: a stored axis of which a factor is permuted lost nothing
that matters (the packed ``qkv`` weight ``(3, heads, head units)`` after ``unbind``: its
size-3 q/k/v selector is structure, not units). Parameters the traced forward pass never
reads (auxiliary heads used in training only) are listed as such: they are unpermuted and
count against the share.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..spec import PermutationSpec

__all__ = ["SpecSummary", "summarize", "permuted_share"]

# the place in a reason: " (node 'cat_3' in 'features.denseblock1')" or " 'layer1.conv'"
_PLACE = re.compile(r" \(node '[^']*'(?: in '[^']*')?\)| '[^']*'")
UNUSED = "not read by the traced forward pass"


def permuted_share(spec: PermutationSpec, model: nn.Module) -> tuple[int, int]:
    """(parameters on at least one permuted axis, all parameters): elements of
    ``model.named_parameters()`` (a tied tensor counts once); buffers are left out."""
    permuted = total = 0
    for key, p in model.named_parameters():
        total += p.numel()
        if key in spec.axes and any(_permuted(e) for e in spec.entries(key)):
            permuted += p.numel()
    return permuted, total


def _permuted(entry) -> bool:
    """A view axis entry (group, None or segments) that moves some of its units."""
    if isinstance(entry, tuple):  # segments: ((group or None, length), ...)
        return any(g is not None for g, _ in entry)
    return entry is not None


def _whole(entry):
    """A view axis entry as the lost-axis report reads it: a concatenated axis counts as
    permuted only when every stretch is (a fixed stretch is reported, though the axis's
    other units move and count in the permuted share)."""
    if isinstance(entry, tuple):
        return entry if all(g is not None for g, _ in entry) else None
    return entry


def _stored_axis_groups(spec: PermutationSpec, key: str, axis: int) -> list[str | None]:
    """The groups of the view axes that make up stored axis ``axis`` of ``key``."""
    shape, ax = spec.shapes[key], [_whole(e) for e in spec.entries(key)]
    view = spec.reshape.get(key, shape)
    j = 0
    for i, n in enumerate(shape):
        span, prod = [], 1
        while j < len(view) and (prod < n or (n == 1 and not span)):
            span.append(j)
            prod *= view[j]
            j += 1
        if i == axis:
            return [ax[k] for k in span]
    return []


@dataclass(frozen=True)
class SpecSummary:
    """``lost``: reason kind -> (places, unpermuted entries ``"key[axis]"``, or keys for
    :data:`UNUSED`), entries in ``state_dict`` order, kinds with the most entries first."""

    model: str
    groups: int
    permuted: int
    params: int
    lost: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.permuted / self.params if self.params else 1.0

    def head(self) -> str:
        groups = f"{self.groups} permutation group{'' if self.groups == 1 else 's'}"
        return (f"{self.model}: {groups}, {_percent(self.share)} of "
                f"the parameters ({_count(self.permuted)} of {_count(self.params)}) on a "
                "permuted axis")

    def text(self, examples: int = 4) -> str:
        """The head, then per reason kind: how many axes, at how many places, examples."""
        parts = []
        for kind, (places, entries) in self.lost.items():
            where = (f" at {len(places)} places (e.g. {places[0]})" if len(places) > 1 else
                     f" at {places[0]}" if places else "")
            what = "tensors" if kind == UNUSED else "tensor axes"
            more = ", ..." if len(entries) > examples else ""
            parts.append(f"{kind}{where}: {len(entries)} {what} "
                         f"({', '.join(_examples(entries, examples))}{more})")
        return self.head() + ("; left unpermuted: " + "; ".join(parts) if parts else "")


def _percent(share: float) -> str:
    """One decimal, never rounded up to 100.0% (or down to 0.0%) unless exact."""
    text = f"{100 * share:.1f}%"
    if text == "100.0%" and share < 1:
        return ">99.9%"
    return "<0.1%" if text == "0.0%" and share > 0 else text


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def _examples(entries: tuple[str, ...], n: int) -> list[str]:
    """Up to ``n`` entries, weights first, shown in ``state_dict`` order."""
    weights = [e for e in entries if e.split("[")[0].endswith("weight")]
    pick = set((weights + [e for e in entries if e not in weights])[:n])
    return [e for e in entries if e in pick]


def summarize(model: nn.Module, spec: PermutationSpec, lost: dict[str, list[str]],
              unused: list[str] = ()) -> SpecSummary:
    """The summary of ``spec`` traced from ``model``. ``lost``: reason -> ``"key[axis]"``
    entries it left unpermuted (from the analysis); ``unused``: ``state_dict`` keys the traced
    graph never reads. Non-floating tensors (index buffers, counters) are never units and
    are left out."""
    floating = {k for k, t in model.state_dict().items() if t.is_floating_point()}
    order = {k: i for i, k in enumerate(spec.axes)}
    kinds: dict[str, tuple[dict, dict]] = {}
    for reason, entries in lost.items():
        keep = [e for e in entries if _wholly_unpermuted(spec, e, floating)]
        if keep:
            places, found = kinds.setdefault(_PLACE.sub("", reason), ({}, {}))
            for m in _PLACE.finditer(reason):
                places.setdefault(m.group(0).strip(" ()").replace("node ", ""), None)
            found.update(dict.fromkeys(keep))
    unused = [k for k in unused if k in floating and any(n > 1 for n in spec.shapes[k])]
    if unused:
        kinds[UNUSED] = ({}, dict.fromkeys(unused))
    key = lambda e: (order.get(e.split("[")[0], -1), len(e), e)  # noqa: E731 (axis 10 after 2)
    out = {kind: (tuple(places), tuple(sorted(found, key=key)))
           for kind, (places, found) in sorted(kinds.items(), key=lambda kv: -len(kv[1][1]))}
    permuted, total = permuted_share(spec, model)
    return SpecSummary(type(model).__name__, len(spec.sizes), permuted, total, out)


def _wholly_unpermuted(spec: PermutationSpec, entry: str, floating: set[str]) -> bool:
    key, _, axis = entry[:-1].rpartition("[")
    return key in floating and not any(_stored_axis_groups(spec, key, int(axis)))
