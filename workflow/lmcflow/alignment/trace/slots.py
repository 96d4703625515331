"""The tracer's bookkeeping: errors, slots (union-find over tensor dimensions and parameter
axes, with refinement into row-major factors and fixing), and the per-call records rules read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

from torch import Tensor, fx, nn


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
