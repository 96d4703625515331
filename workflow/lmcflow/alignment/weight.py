"""Weight matching (Git Re-Basin's algorithm 1): coordinate ascent over permutation groups, each
step a linear assignment that maximises ``sum_k <A[k], perm(B)[k]>``; float64 objective, exact
gains, stop after a sweep without improvement. Groups that factor one axis (attention heads x
units within a head) are also moved together where single moves stop short (``_joint_step``).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from .assignment import solve
from .spec import PermutationSpec, _permute

__all__ = ["weight_matching", "matching_objective"]

# Layout (why it is fast): for group g every cost entry (key, axis) becomes a block of rows of two
# (R_g, n) matrices, A_g and B_g, holding the tensor with ``axis`` last and the key's *other*
# grouped axes first (a conv weight (o, i, kh, kw) is stored (i, kh, kw, o) for its output group
# and (o, kh, kw, i) for its input group). Then g's cost is one matmul, ``A_g^T @ B_g`` (n x n),
# on contiguous operands. A group's own axis is never permuted in its matrices (the cost is in
# B's original unit order, as in the reference code); B_g holds the other groups' current
# permutations on the leading axes, so when group h moves some units, only their rows move in
# the blocks that lead with h (``index_copy_`` of those rows), and the neighbour's cost, next
# time it is needed, is updated through those rows alone unless many moved. Only groups whose
# neighbours changed are solved again; every accepted change is checked by its exact float64
# gain, read from the moving units' columns.


def _cost_tensors(spec: PermutationSpec, state: Mapping[str, Tensor], device) -> dict[str, Tensor]:
    """Cost tensors of ``state`` in their view shapes on ``device``, dtype unchanged."""
    return {k: spec.view(k, state[k]).to(device) for k in spec.cost_keys}


def _chunk(device: torch.device) -> int:
    """Elements per chunk of float64 temporaries: cache-sized on the CPU (10x faster than
    chunks of tens of MB), larger on a GPU (fewer kernel launches)."""
    return 1 << 17 if device.type == "cpu" else 1 << 22


def _dot64(a: Tensor, b: Tensor) -> float:
    """``<a, b>`` with float64 products and sums, in chunks (no float64 copy of whole tensors)."""
    a, b = a.reshape(-1), b.reshape(-1).to(a.device)
    chunk = min(_chunk(a.device), a.numel())
    buf = torch.empty(2, chunk, dtype=torch.float64, device=a.device)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for s in range(0, a.numel(), chunk):
        k = min(chunk, a.numel() - s)
        buf[0, :k].copy_(a[s:s + k])
        buf[1, :k].copy_(b[s:s + k])
        total += torch.dot(buf[0, :k], buf[1, :k])
    return float(total)


def matching_objective(spec: PermutationSpec, state_a: Mapping[str, Tensor],
                       state_b: Mapping[str, Tensor], perm: Mapping[str, Tensor] | None = None
                       ) -> float:
    """``sum over cost keys <A[k], perm(B)[k]>`` in float64, the weight-matching objective."""
    perm = {} if perm is None else perm
    total = 0.0
    for k in spec.cost_keys:
        a = spec.view(k, state_a[k])
        b = _permute(spec.view(k, state_b[k]).to(a.device), spec.entries(k), perm)
        total += _dot64(a, b)
    return total


def _unsegmented(spec: PermutationSpec, A: dict[str, Tensor], B: dict[str, Tensor]
                 ) -> tuple[PermutationSpec, dict[str, Tensor], dict[str, Tensor]]:
    """A spec without segments and the cost tensors it describes: a tensor with concatenated
    axes (``spec.segments``) is cut into pieces, one per combination of the stretches of those
    axes, each a plain tensor whose axis carries its stretch's group (pieces without any group
    are left out). The objective is a sum over elements, so it is the same sum over the pieces,
    and a group meets a concatenated axis only through its own stretch."""
    if not spec.segments:
        return spec, A, B
    axes, shapes, a_out, b_out = {}, {}, {}, {}
    for key in spec.cost_keys:
        segs = spec.segments.get(key, {})
        dims = sorted(segs)
        choices = []
        for d in dims:
            starts = itertools.accumulate([0] + [n for _, n in segs[d]])
            choices.append([(g, s, n) for (g, n), s in zip(segs[d], starts)])
        for combo in itertools.product(*choices):
            ax, index = list(spec.axes[key]), [slice(None)] * len(spec.axes[key])
            for d, (g, s, n) in zip(dims, combo):
                ax[d], index[d] = g, slice(s, s + n)
            if all(g is None for g in ax):
                continue
            name = key + "".join(f"[{d}:{s}:{s + n}]" for d, (_, s, n) in zip(dims, combo))
            index = tuple(index)
            axes[name], a_out[name], b_out[name] = tuple(ax), A[key][index], B[key][index]
            shapes[name] = tuple(a_out[name].shape)
    return PermutationSpec(axes, shapes), a_out, b_out


@dataclass
class _Block:
    """Rows ``rows`` of a group's matrices: tensor ``key`` with its axes in ``order`` (the
    group's axis last), reshaped ``(prod(shape[:-1]), n)``; ``others`` = (group, dim) of the
    layout's other grouped axes, which are its leading dims."""

    key: str
    rows: slice
    shape: tuple[int, ...]
    order: tuple[int, ...]
    others: tuple[tuple[str, int], ...]


@dataclass
class _Group:
    """Group g's matrices ``a``, ``b`` (R, n) and its cost ``a^T b`` (n, n) in the matmul
    dtype once computed (None: to compute).

    ``seen`` holds, per group leading one of its blocks, that group's permutation when
    ``cost`` was last brought up to date; ``stale`` counts the rows updated since ``cost`` was
    last computed in full."""

    n: int
    blocks: list[_Block]
    a: Tensor
    b: Tensor
    cost: Tensor | None = None
    seen: dict[int, Tensor] = field(default_factory=dict)
    stale: int = 0


def _blocks(spec: PermutationSpec, group: str) -> list[_Block]:
    blocks, start = [], 0
    for key, axis in spec.groups[group]:
        if key not in spec.cost_keys:
            continue
        axes, view = spec.axes[key], spec.reshape.get(key, spec.shapes[key])
        others = [d for d, g in enumerate(axes) if g is not None and d != axis]
        if group in (axes[d] for d in others):
            raise ValueError(f"{key}: group {group} acts on two of its axes; weight matching "
                             f"needs distinct groups on the axes of a tensor")
        order = tuple(others + [d for d, g in enumerate(axes) if g is None] + [axis])
        shape = tuple(view[d] for d in order)
        rows = math.prod(shape[:-1])
        blocks.append(_Block(key, slice(start, start + rows), shape, order,
                             tuple((axes[d], i) for i, d in enumerate(others))))
        start += rows
    return blocks


def _build_groups(spec: PermutationSpec, a_views: Mapping[str, Tensor],
                  b_views: Mapping[str, Tensor], dtype: torch.dtype, device) -> dict[str, _Group]:
    groups = {}
    for g in sorted(spec.groups):
        blocks = _blocks(spec, g)
        rows = blocks[-1].rows.stop if blocks else 0
        a = torch.empty(rows, spec.sizes[g], dtype=dtype, device=device)
        b = torch.empty_like(a)
        for blk in blocks:
            _permuted_copy(a[blk.rows], a_views[blk.key], blk.order)
            _permuted_copy(b[blk.rows], b_views[blk.key], blk.order)
        groups[g] = _Group(spec.sizes[g], blocks, a, b)
    return groups


def _permuted_copy(out: Tensor, src: Tensor, order: tuple[int, ...]) -> None:
    """``out`` (contiguous) = ``src.permute(order)``, with the source dims that stay adjacent
    merged first: a conv weight's (o, i, kh, kw) -> (i, kh, kw, o) is then a 2-D transpose,
    several times faster than torch's copy through the 4-D permuted view."""
    runs: list[list[int]] = []
    for d in order:
        if runs and runs[-1][-1] + 1 == d:
            runs[-1].append(d)
        else:
            runs.append([d])
    by_start = sorted(runs)
    merged = src.reshape([math.prod(src.shape[d] for d in run) for run in by_start])
    order = [by_start.index(run) for run in runs]
    out.view([merged.shape[d] for d in order]).copy_(merged.permute(order))


def _rewrite(group: _Group, i: int, h: str, moved: Tensor, source: Tensor) -> None:
    """Group h, a leading axis of block i, changed: the units now at positions ``moved`` were
    at positions ``source``; move those rows of ``group.b`` (all of h's axis when the block
    has several permuted axes, and then the cost is recomputed)."""
    blk = group.blocks[i]
    b = group.b[blk.rows].view(blk.shape)
    if len(blk.others) == 1:
        b.index_copy_(0, moved, b.index_select(0, source))
        return
    dim = next(d for g, d in blk.others if g == h)
    order = torch.arange(blk.shape[dim], device=moved.device).index_copy_(0, moved, source)
    b.copy_(b.index_select(dim, order))
    group.cost = None


def _cost(group: _Group, perm: Mapping[str, Tensor], inverse: Mapping[str, Tensor],
          dtype: torch.dtype) -> Tensor:
    """``a^T b`` (n, n) in ``dtype``. Where the leading groups of its blocks moved few units
    since the last call, only the rows of those units enter: ``cost += a_rows^T (b_rows now -
    b_rows then)`` (the rows then are those of the units seen then, wherever they are now);
    a full matmul when that would be a third of the rows or more, or the updates since the
    last full one would exceed all rows (their rounding stays below one full matmul's)."""
    leads = [(i, blk.others[0][0]) for i, blk in enumerate(group.blocks)
             if len(blk.others) == 1]
    moves, rows = {}, 0
    if group.cost is not None:
        moves = {h: torch.nonzero(perm[h] != old).view(-1) for h, old in group.seen.items()}
        for i, h in leads:  # rows of the moved units: rows per unit of h in block i
            blk = group.blocks[i]
            rows += len(moves[h]) * (blk.rows.stop - blk.rows.start) // blk.shape[0]
    n_rows = group.a.shape[0]
    if group.cost is None or 3 * rows > n_rows or group.stale + rows > n_rows:
        group.cost, group.stale = torch.mm(group.a.T.to(dtype), group.b.to(dtype)), 0
    else:
        for i, h in leads:
            moved = moves[h]
            if len(moved):
                blk, shape = group.blocks[i], (group.blocks[i].shape[0], -1, group.n)
                a = group.a[blk.rows].view(shape).index_select(0, moved).view(-1, group.n)
                b = group.b[blk.rows].view(shape)
                then = inverse[h].index_select(0, group.seen[h].index_select(0, moved))
                diff = b.index_select(0, moved) - b.index_select(0, then)
                group.cost.addmm_(a.T.to(dtype), diff.view(-1, group.n).to(dtype))
        group.stale += rows
    group.seen = {h: perm[h] for _, h in leads}  # (permutations are replaced, never modified)
    return group.cost


def _seen_rows(group: _Group, unseen: set[str]) -> int:
    """Rows of the blocks none of whose other groups is in ``unseen``."""
    return sum(blk.rows.stop - blk.rows.start for blk in group.blocks
               if not any(h in unseen for h, _ in blk.others))


def _seen_cost(group: _Group, unseen: set[str], dtype: torch.dtype) -> Tensor:
    """``a^T b`` over the blocks none of whose other groups is in ``unseen`` (not cached)."""
    c = torch.zeros(group.n, group.n, dtype=dtype, device=group.a.device)
    for blk in group.blocks:
        if not any(h in unseen for h, _ in blk.others):
            c.addmm_(group.a[blk.rows].T.to(dtype), group.b[blk.rows].to(dtype))
    return c


def _exact_gain(a: Tensor, b: Tensor, units: Tensor, new: Tensor, old: Tensor) -> float:
    """``sum_i <a[:, units_i], b[:, new_i] - b[:, old_i]>`` in float64: the exact change of the
    objective when the units ``units`` of A are matched to ``new`` instead of ``old``. Only the
    changed columns are read, in row chunks through preallocated buffers (fresh temporaries
    cost more than the arithmetic here)."""
    m = len(units)
    step = min(max(1, _chunk(a.device) // m), a.shape[0])
    gathered = torch.empty(3, step, m, dtype=a.dtype, device=a.device)
    wide = torch.empty(3, step, m, dtype=torch.float64, device=a.device)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for r in range(0, a.shape[0], step):
        k = min(step, a.shape[0] - r)
        torch.index_select(a[r:r + k], 1, units, out=gathered[0, :k])
        torch.index_select(b[r:r + k], 1, new, out=gathered[1, :k])
        torch.index_select(b[r:r + k], 1, old, out=gathered[2, :k])
        w = wide[:, :k].copy_(gathered[:, :k])
        w[1].sub_(w[2])
        total += torch.dot(w[0].view(-1), w[1].view(-1))
    return float(total)


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, Tensor],
                    state_b: Mapping[str, Tensor], max_sweeps: int = 100, seed: int = 0,
                    log: Callable[[str], None] | None = None, dtype: torch.dtype = torch.float32,
                    device=None, first_solve: str = "all") -> tuple[dict[str, Tensor], dict]:
    """Permutation of B maximising ``sum_k <A[k], perm(B)[k]>`` by coordinate ascent.

    Starting from the identity, each sweep visits every group once, in an order drawn from a
    generator seeded with ``seed``; for group P, with all other groups fixed,
    ``C = sum_{(k, axis) in P} A_k(axis first, flattened) @ B'_k(axis first, flattened)^T``
    (``B'`` = B with the other groups' current permutations) is a linear assignment problem
    solved exactly (:func:`.assignment.solve` on the CPU: lap or scipy); an axis concatenated
    from several groups' units (``spec.segments``) enters each group's C through that group's
    stretch only (the tensor is cut into pieces, :func:`_unsegmented`). A group is solved
    again only once a group sharing a tensor with it has changed (otherwise its C, hence its
    answer, is the same). A sweep in which no group changes ends with one joint step per
    family of factor groups (a major group such as attention heads and the minor groups that
    split each of its units row-major, read from the spec's views, see :func:`_factor_groups`)
    whose tensors' groups moved since its last try:
    heads matched as blocks, each pair's score the best within-head assignment, then each
    within-head group given the new heads (:func:`_joint_step`); a step is kept only when its
    exact float64 gain is positive, and the sweep then counts as changed. Stops after a sweep
    without change or ``max_sweeps`` sweeps.

    ``first_solve``: ``"all"`` (Git Re-Basin) solves every group on all its tensors from the
    first sweep on; ``"visited"`` solves a group's first visit on the tensors whose other groups
    have been visited already (see :func:`_solve`), which finds the residual stream of an
    untrained ViT or Swin where "all" stops with every group wrong, at the price of departing
    from the reference algorithm (so it is not the default).

    C is computed in ``dtype`` (float32 by default, float64 for the reference computation),
    one matmul per group on ``device`` (default: ``state_a``'s). P changes only if the change
    of the objective, recomputed exactly in float64 from the weights of the units that move,
    exceeds 1e-12 of the assignment's value, so the objective never decreases; the objective
    is evaluated in float64 at the start and updated by these exact changes.

    Returns ``(perm, info)``: perm maps B onto A (``apply_permutation(spec, perm, state_b)``
    is the aligned B), long tensors on the CPU; ``info = {"objective": final objective,
    "sweeps": sweeps run, "history": objective at start and after each sweep,
    "seconds": wall time, "seconds_cost"/"seconds_assignment"/"seconds_update": time building
    the cost matrices / solving the assignments / applying accepted changes (exact gain and
    permuted copies), "seconds_joint": time in joint steps (included in the sweeps' times),
    "joint_steps": joint steps kept, "sweep_seconds": wall time of each sweep, "solves":
    assignments solved, "dtype", "device"}``.
    """
    start_time = time.perf_counter()
    spec.check_state(state_a)
    spec.check_state(state_b)
    if not spec.cost_keys:
        raise ValueError("the spec has no permuted tensors")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    if first_solve not in ("all", "visited"):
        raise ValueError(f"first_solve must be 'all' or 'visited', got {first_solve!r}")
    device = torch.device(state_a[spec.cost_keys[0]].device if device is None else device)
    A, B = _cost_tensors(spec, state_a, device), _cost_tensors(spec, state_b, device)
    # Stored in a dtype that holds the weights exactly, so that gains are exact; the matmul
    # runs in ``dtype`` (a float64 state with float32 costs is converted at every matmul).
    store = dtype
    for t in (*A.values(), *B.values()):
        store = torch.promote_types(store, t.dtype)
    objective = sum(_dot64(A[k], B[k]) for k in spec.cost_keys)
    groups = _build_groups(*_unsegmented(spec, A, B), store, device)
    names = sorted(groups)
    users = {g: [] for g in names}  # group -> blocks (group, index) that lead with it
    for g, grp in groups.items():
        for i, blk in enumerate(grp.blocks):
            for h, _ in blk.others:
                users[h].append((g, i))
    perm = {g: np.arange(spec.sizes[g]) for g in names}
    perm_dev = {g: torch.arange(spec.sizes[g], device=device) for g in names}
    inverse = dict(perm_dev)  # positions of B's units
    gen = torch.Generator().manual_seed(int(seed))
    del A, B
    history, sweep_seconds = [objective], []
    seconds = {"cost": 0.0, "assignment": 0.0, "update": 0.0, "joint": 0.0}
    solves = 0
    dirty = {g for g in names if groups[g].a.shape[0]}
    if log:
        log(f"weight matching: {len(names)} groups, {dtype} costs on {device}, "
            f"start objective {objective:.6g}")

    def move(group: str, cols: np.ndarray) -> None:
        """Give ``group`` the permutation ``cols``: move the rows of its units that moved in the
        blocks that lead with it, and mark the groups of those blocks to solve again."""
        moved = torch.from_numpy(np.flatnonzero(cols != perm[group])).to(device)
        perm[group] = cols
        perm_dev[group] = torch.from_numpy(cols).to(device)
        source = inverse[group].index_select(0, perm_dev[group].index_select(0, moved))
        inverse[group] = torch.from_numpy(np.argsort(cols)).to(device)
        version[group] += 1
        for g, i in users[group]:
            _rewrite(groups[g], i, group, moved, source)
            dirty.add(g)

    factors = _factor_groups(spec)
    # a family's joint step depends only on the groups of the tensors it reads: it is tried
    # again only once one of them has moved since its last try
    watched = {m: _family_groups(spec, (m, *us)) for m, us in factors.items()}
    version, tried = dict.fromkeys(names, 0), {}
    joint_steps = 0
    visited: set[str] = set()
    sweeps = 0
    for sweeps in range(1, int(max_sweeps) + 1):
        tic_sweep, changed = time.perf_counter(), []
        for gi in torch.randperm(len(names), generator=gen).tolist():
            group = names[gi]
            if group not in dirty:
                continue
            dirty.discard(group)
            solves += 1
            # first_solve="visited", first visit: leave out the tensors through groups not
            # visited yet (see _solve); where fewer rows than units remain (a bias alone: a
            # degenerate assignment, and slow), the group waits at the identity for the next
            # sweep, solved on all tensors
            unseen = None if first_solve == "all" or group in visited \
                else set(names) - visited - {group}
            visited.add(group)
            if unseen is not None and _seen_rows(groups[group], unseen) < groups[group].n:
                dirty.add(group)
                continue
            solved = _solve(groups[group], perm[group], perm_dev, inverse, dtype, seconds, unseen)
            if solved is None:
                continue
            tic = time.perf_counter()
            cols, gain, _ = solved
            objective += gain
            move(group, cols)
            changed.append(group)
            seconds["update"] += time.perf_counter() - tic
        joint = []
        if not changed and not dirty and factors:  # single moves stop: try factors together
            tic = time.perf_counter()
            for major in sorted(factors):
                stamp = tuple(version[g] for g in watched[major])
                if tried.get(major) == stamp:
                    continue
                tried[major] = stamp
                step = _joint_step(spec, major, factors[major], state_a, state_b, perm_dev,
                                   dtype, device)
                if step is not None:
                    new, gain = step
                    objective += gain
                    for g, cols in new.items():
                        move(g, cols)
                    joint.append(major)
            joint_steps += len(joint)
            seconds["joint"] += time.perf_counter() - tic
        history.append(objective)
        sweep_seconds.append(time.perf_counter() - tic_sweep)
        if log:
            log(f"weight matching sweep {sweeps}: objective {objective:.6g}, "
                f"{len(changed)}/{len(names)} groups changed"
                + (f", {len(joint)} joint steps of factor groups" if joint else ""))
        if not changed and not joint and not dirty:
            break
    info = {"objective": objective, "sweeps": sweeps, "history": history,
            "seconds": time.perf_counter() - start_time, "seconds_cost": seconds["cost"],
            "seconds_assignment": seconds["assignment"], "seconds_update": seconds["update"],
            "seconds_joint": seconds["joint"], "joint_steps": joint_steps,
            "sweep_seconds": sweep_seconds, "solves": solves, "dtype": str(dtype).split(".")[-1],
            "device": str(device)}
    out = {g: torch.arange(n) for g, n in sorted(spec.sizes.items())}  # no cost: identity
    return out | {g: torch.from_numpy(p).long() for g, p in perm.items()}, info


def _solve(group: _Group, current: np.ndarray, perm: Mapping[str, Tensor],
           inverse: Mapping[str, Tensor], dtype: torch.dtype, seconds: dict,
           unseen: set[str] | None = None) -> tuple[np.ndarray, float, np.ndarray] | None:
    """Best assignment for ``group``, its exact gain over ``current`` and the positions that
    move; None unless the assignment is a strict improvement (then ``current`` stays).

    With ``unseen`` (a group's first visit: the groups not visited yet), the assignment is
    solved on the tensors whose other groups have all been visited: a not yet visited group
    is at the identity, an arbitrary order, so tensors through it are noise; worse, groups
    solved against it agree with that order and, summed over many tensors, outvote the few
    that carry the true order (an untrained ViT's residual stream, solved after its blocks,
    stays at the identity). The gain is still the exact one, over all tensors."""
    tic = time.perf_counter()
    if unseen is None:
        c = _cost(group, perm, inverse, dtype)
    else:
        c = _seen_cost(group, unseen, dtype)
    c = c.to("cpu", torch.float64).numpy()  # B's unit order
    toc = time.perf_counter()
    cols = solve(c, maximize=True)
    seconds["cost"] += toc - tic
    seconds["assignment"] += time.perf_counter() - toc
    moved = np.flatnonzero(cols != current)
    if not len(moved):
        return None
    rows = np.arange(group.n)
    old, new = float(c[rows, current].sum()), float(c[rows, cols].sum())
    if not new > old:
        return None
    tic = time.perf_counter()
    idx = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(group.a.device)  # noqa: E731
    gain = _exact_gain(group.a, group.b, idx(moved), idx(cols[moved]), idx(current[moved]))
    seconds["update"] += time.perf_counter() - tic
    if not gain > 1e-12 * max(abs(old), abs(new)):
        return None
    return cols, gain, moved


# ---------------------------------------------------------------------------------------------
# Factor groups (attention heads).
#
# An axis of a stored tensor may be the row-major product of two groups: the tracer views an
# attention projection's output axis ``q.weight (H*d, E)`` as ``(H, d, E)``, heads x units within
# a head, so that its permutations are those that keep heads whole (one permutation of heads and
# one within-head permutation shared by every head). Coordinate ascent moves one factor at a
# time and can stop where neither move pays alone: heads in the wrong order make every
# within-head assignment look bad, and the reverse. The joint step moves a major factor
# (heads) and its minor factors (the within-head groups) together:
#   1. for every pair (A's head i, B's head j) and every minor U (size d), the d x d similarity
#      S_U[i, j] of their units, summed over the tensors that carry both (the other groups at
#      their current permutations); tensors that carry the heads without a minor add an h x h
#      term T;
#   2. block score V[i, j] = T[i, j] + sum_U (value of the best assignment on S_U[i, j]); the heads
#      by one assignment on V (h x h);
#   3. each minor U by one assignment on its cost given the new heads (sum_i S_U[i, pi(i)], plus
#      the tensors that carry U without the heads);
#   4. kept only if the exact float64 change of the objective is a gain.


def _split_dims(view: tuple[int, ...], shape: tuple[int, ...]) -> list[list[int]] | None:
    """For each stored dim, the view dims that split it row-major (a size-1 view dim goes with
    the stored dim before it); None where the view merges stored dims."""
    out, v = [], 0
    for size in shape:
        dims, p = [], 1
        while v < len(view) and (p < size or view[v] == 1):
            p *= view[v]
            dims.append(v)
            v += 1
        if p != size:
            return None
        out.append(dims)
    return out if all(view[d] == 1 for d in range(v, len(view))) else None


def _factor_groups(spec: PermutationSpec) -> dict[str, tuple[str, ...]]:
    """Major group -> its minor groups: ``(G, U)`` is a pair where some cost tensor's view
    splits one stored dim into consecutive dims of G then U (row-major: G's index varies
    slower), e.g. ``(heads, head units)``. Read from the spec's views, never from names."""
    pairs: dict[str, set[str]] = {}
    for key, view in spec.reshape.items():
        if key not in spec.cost_keys:
            continue
        axes = spec.axes[key]
        for dims in _split_dims(view, spec.shapes[key]) or ():
            for d, e in zip(dims, dims[1:]):
                if axes[d] is not None and axes[e] is not None and axes[d] != axes[e]:
                    pairs.setdefault(axes[d], set()).add(axes[e])
    return {g: tuple(sorted(us)) for g, us in sorted(pairs.items())}


def _key_groups(spec: PermutationSpec, key: str) -> set[str]:
    """The groups on the axes of ``key``, those of its concatenated axes (segments) included."""
    return {g for entry in spec.entries(key) if entry is not None
            for g in ((entry,) if isinstance(entry, str) else (g for g, _ in entry))
            if g is not None}


def _family_groups(spec: PermutationSpec, family: tuple[str, ...]) -> tuple[str, ...]:
    """Every group of a cost tensor that carries one of ``family``."""
    return tuple(sorted({g for k in spec.cost_keys if _key_groups(spec, k) & set(family)
                         for g in _key_groups(spec, k)}))


def _lsa(c: np.ndarray) -> tuple[np.ndarray, float]:
    """Maximising assignment of ``c`` (rows in order) and its value."""
    cols = solve(c, maximize=True)
    return cols, float(c[np.arange(len(cols)), cols].sum())


def _joint_step(spec: PermutationSpec, major: str, minors: tuple[str, ...],
                state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor],
                perm: Mapping[str, Tensor], dtype: torch.dtype, device
                ) -> tuple[dict[str, np.ndarray], float] | None:
    """Joint move of ``major`` and its ``minors`` (steps above) from the current permutations
    ``perm`` (long tensors on ``device``): ``({group: new permutation}, exact gain)`` for the
    groups that change, or None unless the objective strictly increases. Similarities in
    ``dtype``; assignments on float64 copies."""
    family = (major, *minors)
    keys = [k for k in spec.cost_keys if _key_groups(spec, k) & set(family)]
    a_views = {k: spec.view(k, state_a[k]).to(device) for k in keys}
    b_views = {k: spec.view(k, state_b[k]).to(device) for k in keys}
    h = spec.sizes[major]
    alone, sims, summed = _head_similarities(spec, major, minors, a_views, b_views, perm, dtype)
    score = alone.to("cpu", torch.float64).numpy().copy()
    sims = {u: s.to("cpu", torch.float64).numpy() for u, s in sims.items()}
    for s in sims.values():
        score += np.array([[_lsa(s[i, j])[1] for j in range(h)] for i in range(h)])
    new = {major: _lsa(score)[0]}
    trial = dict(perm)
    trial[major] = torch.from_numpy(new[major]).to(device)
    for u in minors:
        d = spec.sizes[u]
        cost = sims[u][np.arange(h), new[major]].sum(0)  # sum_i S_u[i, pi(i)], (d, d)
        for k in keys:  # tensors that carry u but were not summed into S_u
            axes = spec.axes[k]
            if u not in axes or (u, k) in summed:
                continue
            held = {g: trial[g] for g in _key_groups(spec, k) if g != u}
            a = a_views[k].movedim(axes.index(u), 0).reshape(d, -1).to(dtype)
            b = _permute(b_views[k], spec.entries(k), held).movedim(axes.index(u), 0)
            b = b.reshape(d, -1)
            cost = cost + (a @ b.to(dtype).T).to("cpu", torch.float64).numpy()
        new[u] = _lsa(cost)[0]
        trial[u] = torch.from_numpy(new[u]).to(device)
    changed = {g: p for g, p in new.items() if not np.array_equal(p, perm[g].cpu().numpy())}
    if not changed:
        return None
    gain = _family_gain(spec, keys, changed, a_views, b_views, perm, trial)
    return (changed, gain) if gain is not None else None


def _head_similarities(spec: PermutationSpec, major: str, minors: tuple[str, ...],
                       a_views: Mapping[str, Tensor], b_views: Mapping[str, Tensor],
                       perm: Mapping[str, Tensor], dtype: torch.dtype
                       ) -> tuple[Tensor, dict[str, Tensor], set[tuple[str, str]]]:
    """Step 1 over the tensors ``a_views`` (A) and ``b_views`` (B) that carry ``major`` (h
    units): ``T`` (h, h), ``{minor U: S_U (h, h, d, d)}``, ``S_U[i, j, u, v]`` = similarity of
    A's unit (i, u) and B's unit (j, v), and the (minor, key) pairs summed into S."""
    h = spec.sizes[major]
    device = next(iter(a_views.values())).device
    sims = {u: torch.zeros(h, h, spec.sizes[u], spec.sizes[u], dtype=dtype, device=device)
            for u in minors}
    alone = torch.zeros(h, h, dtype=dtype, device=device)
    summed: set[tuple[str, str]] = set()
    for k, a in a_views.items():
        axes = spec.axes[k]
        if major not in axes:
            continue
        minor = next((g for g in axes if g in minors), None)
        lead = [axes.index(major)] + ([axes.index(minor)] if minor else [])
        held = {g: perm[g] for g in _key_groups(spec, k) if g not in (major, minor)}
        a = a.movedim(lead, list(range(len(lead))))
        b = _permute(b_views[k], spec.entries(k), held).movedim(lead, list(range(len(lead))))
        n = math.prod(a.shape[:len(lead)])
        c = a.reshape(n, -1).to(dtype) @ b.reshape(n, -1).to(dtype).T  # (n, n), n = h or h*d
        if minor is None:
            alone += c
        else:
            d = spec.sizes[minor]
            sims[minor] += c.view(h, d, h, d).permute(0, 2, 1, 3)  # [i, j] = d x d of heads i, j
            summed.add((minor, k))
    return alone, sims, summed


def _family_gain(spec: PermutationSpec, keys: list[str], changed: Mapping[str, np.ndarray],
                 a_views: Mapping[str, Tensor], b_views: Mapping[str, Tensor],
                 perm: Mapping[str, Tensor], trial: Mapping[str, Tensor]) -> float | None:
    """Exact float64 change of the objective from ``perm`` to ``trial`` (which differ in the
    ``changed`` groups), over the tensors ``keys`` that carry them; None unless a gain (above
    1e-12 of the tensors' value)."""
    gain, scale = 0.0, 0.0
    for k in keys:
        groups = _key_groups(spec, k)
        if not groups & set(changed):
            continue
        old = _permute(b_views[k], spec.entries(k), {g: perm[g] for g in groups})
        moved = _permute(b_views[k], spec.entries(k), {g: trial[g] for g in groups})
        change, value = _dot_change64(a_views[k], moved, old)
        gain, scale = gain + change, scale + abs(value)
    return gain if gain > 1e-12 * scale else None


def _dot_change64(a: Tensor, new: Tensor, old: Tensor) -> tuple[float, float]:
    """``(<a, new - old>, <a, old>)`` with float64 products and sums, in chunks."""
    a, new, old = a.reshape(-1), new.reshape(-1), old.reshape(-1)
    chunk = min(_chunk(a.device), a.numel())
    buf = torch.empty(3, chunk, dtype=torch.float64, device=a.device)
    change, value = (torch.zeros((), dtype=torch.float64, device=a.device) for _ in range(2))
    for s in range(0, a.numel(), chunk):
        k = min(chunk, a.numel() - s)
        for row, t in enumerate((a, new, old)):
            buf[row, :k].copy_(t[s:s + k])
        value += torch.dot(buf[0, :k], buf[2, :k])
        change += torch.dot(buf[0, :k], buf[1, :k].sub_(buf[2, :k]))
    return float(change), float(value)
