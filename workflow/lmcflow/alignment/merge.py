"""Merging many models (Git Re-Basin's MergeMany): align K >= 2 runs to one another, then average.

First (``init="anchor"``, the default) every run is aligned to run 0 by pair matching; from
the identity instead (``init="identity"``, Git Re-Basin's start) the passes can stop at a
fixed point where runs agree with one another but not with run 0 (seen with activation matching
on planted permutations: two copies matched to each other's average, not to the original).
Then each pass visits runs 1..K-1 in an order drawn from a generator seeded with ``seed`` (+ pass);
run i is matched, by the chosen matcher, to the uniform average of the *other* runs as they are
now (already permuted), and its permutation (always from its original units) is replaced by the
answer. Passes repeat until one changes no permutation, or ``max_passes``.

Run 0 is the anchor and is never permuted: the merged model is defined only up to one global
permutation, and fixing run 0 picks one (Git Re-Basin permutes every run; its merged model is
then a permutation of ours). With it, K = 2 is exactly pair alignment: the average of the
others of run 1 is run 0 itself, so pass 1 matches B to A and pass 2 finds the same answer.

Weight matching reads the states alone; a new permutation of run i is kept only if it raises
the objective against the same target (so the passes end); the other matchers' answers are
taken as they come, and ``max_passes`` bounds them. Activation and commutativity matching need a network
holding the average of the others: ``prepare(state)`` builds it (the caller decides what its
BatchNorm statistics are; :func:`lmcflow.merging` resets them on the training data, since the
averaged running statistics do not describe the average's activations).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .spec import PermutationSpec, apply_permutation, identity_permutation
from .weight import matching_objective, weight_matching

__all__ = ["average_states", "merge_many"]


def average_states(states: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The uniform average of ``states`` in float64, cast back; integer buffers from the first."""
    first = states[0]
    return {k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
                if v.is_floating_point() else v.clone()) for k, v in first.items()}


def _same(p: Mapping[str, Tensor], q: Mapping[str, Tensor]) -> bool:
    return p.keys() == q.keys() and all(torch.equal(p[g].cpu(), q[g].cpu()) for g in p)


def merge_many(spec: PermutationSpec, states: Sequence[Mapping[str, Tensor]],
               matcher: str = "weight", options: Mapping | None = None,
               prepare: Callable[[Mapping[str, Tensor]], torch.nn.Module] | None = None,
               data=None, device="cpu", max_passes: int = 20, seed: int = 0,
               log: Callable[[str], None] | None = None, init: str = "anchor"
               ) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], dict]:
    """Align ``states`` (K >= 2 runs of one architecture) to one another by MergeMany.

    ``matcher``: a name in ``alignment.MATCHERS``; "weight" calls :func:`weight_matching`
    (``options["max_sweeps"]``, ``options["seed"]``) on the states; the others call
    ``MATCHERS[matcher].match(spec, prepare(average of others), prepare(run i), options, data,
    device, log)`` (``prepare`` and ``data``, the matchers' data loader, are then required).

    Returns ``(aligned, perms, info)``: ``aligned[i] = apply_permutation(spec, perms[i],
    states[i])`` (``perms[0]`` the identity), and ``info = {"passes", "converged", "objective":
    per pass the sum over the runs visited of their matching objective, "changed": per pass
    how many runs' permutations changed, "init"}``; with ``init="anchor"`` the first entries of
    "objective" and "changed" are the initial alignment to run 0 (not counted in "passes").
    """
    from .methods import MATCHERS

    k = len(states)
    if k < 2:
        raise ValueError(f"merging needs at least 2 runs, got {k}")
    if matcher not in MATCHERS:
        raise KeyError(f"unknown matcher {matcher!r}; choose from {sorted(MATCHERS)}")
    if matcher != "weight" and (prepare is None or data is None):
        raise ValueError(f"{matcher} matching needs prepare (a network from a state) and data")
    if init not in ("anchor", "identity"):
        raise ValueError(f"init must be 'anchor' or 'identity', got {init!r}")
    options = dict(options or {})
    log = log or (lambda message: None)

    def match(target, i):
        if matcher == "weight":
            perm, result = weight_matching(spec, target, states[i],
                                           max_sweeps=options.get("max_sweeps", 100),
                                           seed=options.get("seed", 0))
        else:
            perm, result = MATCHERS[matcher].match(spec, prepare(target), prepare(states[i]),
                                                   options, data, device, log)
        return {g: t.cpu() for g, t in perm.items()}, float(result["objective"])

    perms = [identity_permutation(spec) for _ in range(k)]
    aligned = [dict(s) for s in states]
    info = {"init": init, "passes": 0, "converged": False, "objective": [], "changed": []}
    for p in range(-1 if init == "anchor" else 0, max_passes):
        order = torch.randperm(k - 1, generator=torch.Generator().manual_seed(seed + p + 1)) + 1
        objective, changed = 0.0, 0
        for i in order.tolist():
            others = [0] if p < 0 else [j for j in range(k) if j != i]
            target = average_states([aligned[j] for j in others])
            perm, value = match(target, i)
            if matcher == "weight" and p >= 0:
                # weight matching restarts from the identity and can land on another local
                # optimum: keep run i's permutation unless the new one is strictly better
                # against the same target, so Σ_{i<j} <π_i θ_i, π_j θ_j> never decreases and
                # the passes end (without this, seen cycling for 20 passes on MLPs at K = 3)
                current = matching_objective(spec, target, states[i], perms[i])
                if value <= current + 1e-12 * abs(current):
                    perm, value = perms[i], current
            objective += value
            if not _same(perm, perms[i]):
                changed += 1
                perms[i] = perm
                aligned[i] = apply_permutation(spec, perm, states[i])
        info["objective"].append(objective)
        info["changed"].append(changed)
        log(f"merge {'initial alignment to run 0' if p < 0 else f'pass {p + 1}'}: {changed} of "
            f"{k - 1} runs changed, objective {objective:.6g}")
        if p >= 0:
            info["passes"] = p + 1
            if changed == 0:
                info["converged"] = True
                break
    return aligned, perms, info
