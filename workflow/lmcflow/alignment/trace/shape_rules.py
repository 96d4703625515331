"""Rules for tensor operations (elementwise, reshapes, reductions, concatenation, indexing,
matmul, einsum, attention, padding, pooling). Each takes (analysis, call) and returns the slot
info of the call's value.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from .analysis import _Analysis
from .slots import _Call, _T, _Unsupported, _flat, _tensors


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
            elif s % rem == 0 and (subs := S.split_slot(f, [rem, s // rem])):
                factors[0:1] = subs
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


def _part(a: _Analysis, dim: tuple[int, ...], n: int) -> int:
    """One slot for a dimension of size ``n`` with slots ``dim`` (its factors tied to it): a
    part of a concatenation. A single unit has nothing to permute: fixed."""
    if n == 1:
        s = a.slots.new(1)
        a.slots.fix([s])
        return s
    if len(dim) == 1:
        return dim[0]
    s = a.slots.new(n)
    a.slots.unify((s,), dim, "internal")
    return s


def _dim_of(a: _Analysis, parts: list[int]) -> tuple[int, ...]:
    """The slots of a dimension made of ``parts`` (a concatenation unless there is one)."""
    if len(parts) == 1:
        return (parts[0],) if a.slots.size[a.slots.find(parts[0])] > 1 else ()
    return (a.slots.concat_of(parts),)


def r_cat(a: _Analysis, c: _Call):
    """Other dimensions are tied across the operands; the concatenated dimension is the
    concatenation of the operands' units (each operand keeps its own permutation: a consumer
    sees a block-diagonal permutation, the spec's segments)."""
    b = c.bind(["tensors", "dim"])
    parts = [t for t in b["tensors"][1] if isinstance(t, _T)] if b["tensors"][1] else []
    if not parts or len(parts) != len(b["tensors"][0]):
        raise _Unsupported("operands")
    shape = tuple(c.value.shape)
    dim = _norm_dim(b.get("dim", (0, None))[0] or 0, len(shape))
    if any(len(t.shape) != len(shape) for t in parts):
        raise _Unsupported("operand ranks differ")
    dims = list(a.broadcast([_T(t.dims[:dim] + ((),) + t.dims[dim + 1:],
                                t.shape[:dim] + (1,) + t.shape[dim + 1:]) for t in parts],
                            shape[:dim] + (1,) + shape[dim + 1:], c))
    dims[dim] = _dim_of(a, [_part(a, t.dims[dim], t.shape[dim]) for t in parts if t.shape[dim]])
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


def _split_dim(a: _Analysis, dim: tuple[int, ...], sizes: list[int], c: _Call
               ) -> list[tuple[int, ...]]:
    """Slots of the consecutive parts of sizes ``sizes`` of a dimension with slots ``dim``:
    the dimension becomes their concatenation (a plain class is cut into parts, each with
    its own permutation; a concatenation is cut where the parts fall inside its parts)."""
    S = a.slots
    roots = [S.find(s) for s in dim]  # parts of a plain class are named after it
    parent = roots[0] if len(roots) == 1 and roots[0] not in S.concat else None
    parts = [S.new(n, ("part", parent, i) if parent is not None else None) if n else None
             for i, n in enumerate(sizes)]
    for p, n in zip(parts, sizes):
        if n == 1:
            S.fix([p])
    a.unify((S.concat_of([p for p in parts if p is not None]),), dim, c)
    return [(p,) if n > 1 else () for p, n in zip(parts, sizes)]


def r_chunk(a: _Analysis, c: _Call):
    """chunk / split / tensor_split (equal or uneven parts, a list of sizes): the dimension
    becomes the concatenation of the parts, each part with its own units (where a consumer
    ties them, as a gate multiplying one half by the other does, they share them); unbind
    fixes the dimension (its parts are single units)."""
    x = _x(c)
    pieces = list(c.value)
    if c.node.target == "unbind" or getattr(c.node.target, "__name__", "") == "unbind":
        dim = _norm_dim(c.args[1] if len(c.args) > 1 else c.kwargs.get("dim", 0), len(x.shape))
        a.slots.fix(x.dims[dim], f"unbound by {c.where}")
        return tuple(_T(x.dims[:dim] + x.dims[dim + 1:], tuple(p.shape)) for p in pieces)
    dim = next((d for d in range(len(x.shape))
                if any(p.shape[d] != x.shape[d] for p in pieces)), None)
    if dim is None:
        return tuple(x for _ in pieces)
    sizes = [p.shape[dim] for p in pieces]
    if sum(sizes) != x.shape[dim]:
        raise _Unsupported("parts do not cover the dimension")
    return tuple(_T(x.dims[:dim] + (d,) + x.dims[dim + 1:], tuple(p.shape))
                 for p, d in zip(pieces, _split_dim(a, x.dims[dim], sizes, c)))


def _whole_parts(a: _Analysis, dim: tuple[int, ...], start: int, stop: int
                 ) -> tuple[int, ...] | None:
    """Slots of units ``start:stop`` of a dimension with slots ``dim`` when they are whole
    parts of a concatenation (a slice of a branch's channels); None otherwise."""
    S = a.slots
    if len(dim) != 1 or S.find(dim[0]) not in S.concat:
        return None
    taken, offset = [], 0
    for p in S.parts(dim):
        if start <= offset and offset + S.size[p] <= stop:
            taken.append(p)
        elif offset < stop and start < offset + S.size[p]:
            return None  # a part cut by the slice
        offset += S.size[p]
    return _dim_of(a, taken) if taken else None


def _sliced(a: _Analysis, dim: tuple[int, ...], n: int, r: range, reason: str, c: _Call):
    """Slots of the slice ``r`` of a dimension of size ``n``: the same (everything), whole
    parts of a concatenation, one of equal consecutive blocks of a dimension that is no
    concatenation (:func:`_block`), else fixed (picking units pins them; only the parts of a
    concatenation it touches) for ``reason``."""
    if len(r) == n and r.step == 1:
        return dim
    taken = _whole_parts(a, dim, r.start, r.stop) if r.step == 1 and len(r) else None
    if taken is not None:
        return taken
    concat = len(dim) == 1 and a.slots.find(dim[0]) in a.slots.concat
    if not concat and r.step == 1 and len(r) > 1 and n % len(r) == 0 and r.start % len(r) == 0:
        return _block(a, c, dim, n // len(r), len(r))
    a.slots.fix(_touched(a, dim, r), reason)
    return a.new_fixed(torch.empty(len(r)), reason, dim).dims[0]


def _touched(a: _Analysis, dim: tuple[int, ...], r: range) -> list[int]:
    """The slots that the units ``r`` of a dimension lie in: the parts they touch when the
    dimension is a concatenation, else the whole dimension."""
    S = a.slots
    if len(dim) != 1 or S.find(dim[0]) not in S.concat or not len(r):
        return list(dim)
    lo, hi, out, offset = min(r), max(r), [], 0
    for p in S.parts(dim):
        if offset <= hi and lo < offset + S.size[p]:
            out.append(p)
        offset += S.size[p]
    return out


def r_narrow(a: _Analysis, c: _Call):
    """``narrow(dim, start, length)``: a slice of one dimension (see :func:`_sliced`)."""
    b = c.bind(["input", "dim", "start", "length"])
    x = _x(c)
    d, start, length = (b[k][0] for k in ("dim", "start", "length"))
    if not all(isinstance(v, int) for v in (d, start, length)):
        raise _Unsupported("arguments")
    d = _norm_dim(d, len(x.shape))
    start = start + x.shape[d] if start < 0 else start
    dims = list(x.dims)
    dims[d] = _sliced(a, x.dims[d], x.shape[d], range(start, start + length),
                      f"narrowed by {c.where}", c)
    return _T(tuple(dims), tuple(c.value.shape))


def r_getitem(a: _Analysis, c: _Call):
    """Items of tuples pass their info; tensor indexing keeps full slices and slices of whole
    parts of a concatenation, fixes other indexed or sliced dimensions (an index picks a unit)
    and inserts size-1 dimensions for None. A slice that is one of equal consecutive blocks
    keeps the units within the block (:func:`_block`); one integer index tensor gathers rows
    (:func:`_index_rows`)."""
    obj, idx = c.ia[0], c.args[1]
    if not isinstance(obj, _T):
        if isinstance(obj, (list, tuple)):
            return obj[idx]
        raise _Unsupported("item of an untracked value")
    x = obj
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (Tensor, list, bool)) for i in items):
        return _index_rows(a, c, x, items)
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
            dims.append(_sliced(a, x.dims[d], n, range(*item.indices(n)), reason, c))
            d += 1
        else:
            raise _Unsupported(f"index {item!r}")
    dims += list(x.dims[d:])
    shape = tuple(c.value.shape)
    if len(dims) != len(shape):
        raise _Unsupported("index result")
    return _T(tuple(dims), shape)


def _block(a: _Analysis, c: _Call, dim: tuple[int, ...], blocks: int, k: int):
    """One of ``blocks`` equal consecutive blocks of a dimension (``qkv[:, C:2*C]``): the
    dimension is (block index, units within a block), the block index fixed (which block is
    structure, as for ``chunk``), the units within a block pass to the result."""
    part = (a.slots.new(blocks),) if blocks > 1 else ()
    inner = (a.slots.new(k),) if k > 1 else ()
    a.slots.fix(part)
    a.unify(dim, part + inner, c)
    return inner


def _index_rows(a: _Analysis, c: _Call, x: _T, items):
    """``x[idx]`` with one integer index tensor (a gather of rows, e.g. a relative position
    bias table read at a buffer of positions): rows are picked by value, so x's first
    dimension is fixed (silently: like an embedding's vocabulary, it is addressed, not
    mixed); the result has the index's dimensions, then x's remaining ones."""
    idx, info = items[0], c.ia[1]
    if (len(items) != 1 or not isinstance(idx, Tensor) or idx.dtype in (torch.bool, torch.uint8)
            or idx.is_floating_point() or not isinstance(info, _T)):
        raise _Unsupported("advanced indexing")
    a.slots.fix(x.dims[0])
    return _T(info.dims + x.dims[1:], tuple(c.value.shape))


def r_roll(a: _Analysis, c: _Call):
    """A cyclic shift (``torch.roll``): the rolled dimensions are positions, fixed; the
    others pass."""
    x = _x(c)
    dims = c.bind(["input", "shifts", "dims"]).get("dims", (None,))[0]
    if dims is None or dims == ():
        raise _Unsupported("roll of the flattened tensor")
    for d in (dims,) if isinstance(dims, int) else dims:
        a.slots.fix(x.dims[_norm_dim(d, len(x.shape))], f"rolled by {c.where}")
    return _T(x.dims, tuple(c.value.shape))


def r_patch_merging_pad(a: _Analysis, c: _Call):
    """torchvision Swin's ``_patch_merging_pad`` (kept as one node by ``torch.fx.wrap``):
    ``(..., H, W, C) -> (..., H/2, W/2, 4*C)``, the 2x2 neighbours of every patch concatenated
    along channels. Positions are fixed; the channel dimension is (neighbour, C), the
    neighbour index fixed and C the input's units: all four copies are permuted alike, which
    a ``(4, C)`` view expresses (the LayerNorm over 4*C and the reduction Linear read it)."""
    x, shape = _x(c), tuple(c.value.shape)
    if len(x.shape) < 3 or shape[-1] != 4 * x.shape[-1]:
        raise _Unsupported("layout")
    pos = _flat(x.dims[-3:-1])
    a.slots.fix(pos, f"merged by {c.where}")
    hw = a.new_fixed(torch.empty(shape[-3:-1]), f"merged by {c.where}", pos).dims
    four = a.new_fixed(torch.empty(4), None).dims[0]
    return _T(x.dims[:-3] + hw + (four + x.dims[-1],), shape)


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
