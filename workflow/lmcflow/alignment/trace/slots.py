"""The tracer's bookkeeping: errors, slots (union-find over tensor dimensions and parameter
axes, with refinement into row-major factors or into concatenated parts, and fixing), and the
per-call records rules read.
"""

from __future__ import annotations

import itertools
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


# Why the row index of a concatenation read as equal rows is fixed (see _Slots._rows): which
# part a unit is in is structure. Reported only where it leaves an axis without any group
# (a channel shuffle interleaving the parts), not where the rows keep one (chunk of q/k/v).
ROWS = "the part index of a concatenation read as equal rows (e.g. a channel shuffle)"


class _Unsupported(Exception):
    """Raised by a rule that cannot handle this particular call."""


# ---------------------------------------------------------------------------------------------
# Slots: union-find over tensor dimensions and parameter axes.


class _Slots:
    """Union-find of slots (hidden dimensions of one size) with refinement and fixing.

    A class may be *split* into factors (row-major): its permutation is then the product of
    its factors' permutations. A class may instead be a *concatenation* of parts (``torch.cat``
    along it, or ``chunk``/``split`` of it): its permutation is then block-diagonal, every part
    permuted by its own class. A part may be split (heads x units) while the analysis runs;
    :meth:`settle` rewrites such concatenations before groups are read, since a stretch of a
    spec's axis carries one group. A class is *fixed* silently (inputs, outputs, kernel taps:
    structure, never reported) or with reasons (reported when they cost a parameter group);
    fixing a class fixes its factors or parts. Labels name the groups: a module name (slot
    created by that module), ``("param", key, axis)``, ``("sub", parent, i)`` (factor i of a
    split) or ``("part", parent, i)`` (part i of a class cut into parts).
    """

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.label: list[Any] = []
        self.split: dict[int, list[int]] = {}
        self.concat: dict[int, list[int]] = {}
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
        if changed:  # the factors or parts of a fixed class are fixed too
            for sub in self.split.get(r, []) + self.concat.get(r, []):
                self._flag(sub, r in self.silent, list(have))

    def _push(self, r: int) -> None:
        r = self.find(r)
        for sub in self.split.get(r, []) + self.concat.get(r, []):
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
        splits = [x for x in (self.split.pop(keep, None), self.split.pop(gone, None)) if x]
        cats = [x for x in (self.concat.pop(keep, None), self.concat.pop(gone, None)) if x]
        if splits and cats:  # a concatenation read as a product: equal rows, or nothing
            k = self.size[self.leaves(splits[0])[0]]
            rows = [self._rows(parts, k) for parts in cats]
            if None in rows:
                self.fix(self.units([s for x in splits + cats for s in x]),
                         "a concatenation reshaped across its parts")
            else:
                splits += rows
            cats = []
        if splits:  # two factorisations of one class: their common refinement
            self.split[keep] = splits[0]
            for other in splits[1:]:
                self.unify(splits[0], other, "incompatible factorisations")
        elif cats:  # two concatenations of one class: their common refinement
            self.concat[keep] = cats[0]
            for other in cats[1:]:
                self._align(cats[0], other)
        self._flag(keep, silent, reasons)
        self._push(keep)

    def leaves(self, slots) -> list[int]:
        """Roots of the finest factors of ``slots``, in row-major order (a concatenation is
        one factor)."""
        out: list[int] = []
        for s in slots:
            r = self.find(s)
            sub = self.split.get(r)
            if sub is None:
                out.append(r)
            else:
                out.extend(self.leaves(sub))
        return out

    def parts(self, slots) -> list[int]:
        """Roots of the parts of the concatenations in ``slots``, in order (nested ones
        expanded; a class that is no concatenation is its own part)."""
        out: list[int] = []
        for s in slots:
            r = self.find(s)
            out.extend(self.parts(self.concat[r]) if r in self.concat else [r])
        return out

    def units(self, slots) -> list[int]:
        """Roots of the finest classes under ``slots`` (factors and parts expanded)."""
        out: list[int] = []
        for s in slots:
            r = self.find(s)
            sub = self.split.get(r, self.concat.get(r))
            out.extend([r] if sub is None else self.units(sub))
        return out

    def split_slot(self, s: int, sizes: list[int]) -> list[int] | None:
        """Refine the (unsplit) class of ``s`` into factors of ``sizes`` (each > 1). A
        concatenation becomes ``sizes[0]`` equal rows (see :meth:`_rows`); None if it
        cannot."""
        r = self.find(s)
        if r in self.split or math.prod(sizes) != self.size[r] or min(sizes) < 2:
            raise AssertionError(f"bad split of slot {r} ({self.size[r]}) into {sizes}")
        if r in self.concat:
            rows = self._rows(self.concat[r], sizes[0])
            if rows is None:
                return None
            del self.concat[r]
            self.split[r] = rows
            self._push(r)
            return rows
        subs = [self.new(n, ("sub", r, i)) for i, n in enumerate(sizes)]
        self.split[r] = subs
        self._push(r)
        return subs

    # -- concatenations -------------------------------------------------------------------------

    def concat_of(self, parts: list[int], label: Any = None) -> int:
        """A new slot whose units are those of ``parts`` one after the other."""
        s = self.new(sum(self.size[self.find(p)] for p in parts), label)
        self.concat[s] = list(parts)
        return s

    def _cut(self, parts: list[int], bounds) -> list[int] | None:
        """``parts`` (no concatenations among them) with every offset of ``bounds`` that falls
        inside one made a part boundary: a plain class is cut into consecutive parts (a
        block-diagonal refinement); None if a factorised class would have to be cut."""
        out, start, work = [], 0, list(parts)[::-1]
        while work:
            r = self.find(work.pop())
            if r in self.concat:  # cut meanwhile (a class met twice)
                work.extend(self.concat[r][::-1])
                continue
            n = self.size[r]
            inner = sorted({b - start for b in bounds if start < b < start + n})
            if inner:
                if r in self.split:
                    return None
                sizes = [y - x for x, y in zip([0] + inner, inner + [n])]
                self.concat[r] = [self.new(m, ("part", r, i)) for i, m in enumerate(sizes)]
                self.silent.update(p for p in self.concat[r] if self.size[p] == 1)  # no units
                self._push(r)
                out.extend(self.concat[r])
            else:
                out.append(r)
            start += n
        return out

    def _align(self, a: list[int], b: list[int]) -> bool:
        """Tie two concatenations of equal size part by part, cutting parts where the other
        has a boundary; where a factorised part would have to be cut, fix both."""
        for _ in range(64):
            A, B = self.parts(a), self.parts(b)
            bounds = set(itertools.accumulate(self.size[p] for p in A)) | \
                set(itertools.accumulate(self.size[p] for p in B))
            A, B = self._cut(A, bounds), self._cut(B, bounds)
            if A is None or B is None:
                break
            A, B = self.parts(A), self.parts(B)
            if [self.size[p] for p in A] == [self.size[p] for p in B]:
                for x, y in zip(A, B):
                    self.union(x, y)
                return True
        self.fix(self.units(a + b), "concatenations with parts that do not line up")
        return False

    def _rows(self, parts: list[int], k: int) -> list[int] | None:
        """The concatenation ``parts`` as a product (k rows, row units): its parts cut at the
        row boundaries, the rows tied to each other (one permutation for all rows) and the row
        index fixed (which part is structure, as for ``chunk`` into k equal parts). None when a
        factorised part would have to be cut or a row has a single unit."""
        n = sum(self.size[p] for p in self.parts(parts))
        if k < 2 or n % k or n // k < 2:
            return None
        w = n // k
        cut = self._cut(self.parts(parts), range(w, n, w))
        if cut is None:
            return None
        rows, row, filled = [], [], 0
        for p in self.parts(cut):
            row.append(p)
            filled += self.size[p]
            if filled == w:
                rows.append(row[0] if len(row) == 1 else self.concat_of(row))
                row, filled = [], 0
        for r in rows[1:]:
            self.union(rows[0], r)
        index = self.new(k)
        self.fix([index], ROWS)
        return [index, rows[0]]

    def settle(self) -> None:
        """Rewrite the concatenations that a spec cannot express as stretches of groups.

        One with factorised parts: parts that end in factors of one size (flattened maps
        ``(C_i, H*W)``, heads ``(H, d)``) become ``(concatenation of the leading factors,
        trailing factor)``, the trailing factors tied; else equal parts become rows (one
        permutation shared by the parts, as for ``chunk``); else the factorised parts are
        fixed. One whose parts are all one class becomes rows too (the same permutation,
        written as a view rather than as stretches)."""
        changed = True
        while changed:
            changed = False
            for r in list(self.concat):
                if self.find(r) != r or r not in self.concat:
                    continue
                parts = self.parts([r])
                split = [p for p in parts if p in self.split
                         and not all(self.fixed(u) for u in self.units([p]))]
                same = len(set(parts)) == 1 and not self.fixed(parts[0]) and \
                    self.size[parts[0]] > 1
                if not split and not same:
                    continue
                if split and self._factor_out(r, parts):
                    changed = True
                    continue
                rows = self._rows(self.concat[r], len(parts)) \
                    if len({self.size[p] for p in parts}) == 1 else None
                if rows is not None:
                    del self.concat[r]
                    self.split[r] = rows
                    self._push(r)
                    changed = True
                elif split:
                    self.fix(split, "a concatenated part has factors (e.g. heads) that a "
                             "stretch of units cannot carry")
                    changed = True

    def _factor_out(self, r: int, parts: list[int]) -> bool:
        """Rewrite the concatenation ``r`` of ``parts`` whose factorised parts end in factors
        of one size m as ``(concatenation of the parts' leading units, m)``: row-major, parts
        ``(a_i, m)`` one after the other are ``(sum a_i, m)``. The trailing factors are tied
        (one permutation for all parts); plain parts are split the same way. False when the
        parts do not end alike."""
        tails = [self.leaves([p])[-1] if p in self.split else None for p in parts]
        m = {self.size[t] for t in tails if t is not None}
        if len(m) != 1:
            return False
        m = m.pop()
        if any(self.size[p] % m or self.size[p] == m for p in parts):
            return False
        leads = []
        for p, t in zip(parts, tails):
            lead = self.new(self.size[p] // m)
            self.unify((p,), (lead, self.new(m) if t is None else t), "internal")
            leads.append(lead)
        tails = [self.leaves([p])[-1] for p in parts]
        for t in tails[1:]:
            self.union(tails[0], t)
        if self.find(r) not in self.concat:  # rewritten meanwhile
            return True
        r = self.find(r)
        del self.concat[r]
        self.split[r] = [self.concat_of(leads), tails[0]]
        self._push(r)
        return True

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
                continue
            if sx > sy and sx % sy == 0:
                subs = self.split_slot(x, [sy, sx // sy])
                if subs:
                    A[i:i + 1] = subs
                    continue
            elif sy > sx and sy % sx == 0:
                subs = self.split_slot(y, [sx, sy // sx])
                if subs:
                    B[j:j + 1] = subs
                    continue
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
