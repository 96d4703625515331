"""How a pair of endpoints is made: a registry of methods.

A method names the two training runs whose final weights are its endpoints and, optionally, an
`align` step applied to them (the permutation methods of Git Re-Basin plug in here). Run names
are paths under results/{experiment}/runs/:
- `seed{s}`: trained from scratch, init seed s and SGD-noise seed s;
- `spawn{s}/parent`: the same as `seed{s}`, stopped at `spawn_epoch`;
- `spawn{s}/child{k}`: the parent's checkpoint (weights and optimizer state) trained to the end
  with SGD-noise seed derive_seed(s, k + 1).
Pair p of an experiment with base seed S uses s = S + 2p (and S + 2p + 1 for a second
independent run), so pairs never share a run within a method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str
    endpoints: Callable[[int, int], tuple[str, str]]  # (base seed, pair index) -> runs of A and B
    description: str
    align: Callable | None = None  # (model_a, model_b, data, setting) -> (state_b, extra)


def independent_runs(seed: int, pair: int) -> tuple[str, str]:
    return f"seed{seed + 2 * pair}", f"seed{seed + 2 * pair + 1}"


def spawned_runs(seed: int, pair: int) -> tuple[str, str]:
    return f"spawn{seed + 2 * pair}/child0", f"spawn{seed + 2 * pair}/child1"


METHODS: dict[str, Method] = {
    "naive": Method("naive", independent_runs,
                    "two networks trained independently, interpolated as they are (negative control)"),
    "spawning": Method("spawning", spawned_runs,
                       "two children forked from one parent at spawn_epoch, different SGD noise"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def pair_name(index: int) -> str:
    return f"pair{index}"


def pair_index(name: str) -> int:
    if not name.startswith("pair") or not name[4:].isdigit():
        raise ValueError(f"pair names look like pair0, pair1, ...; got {name!r}")
    return int(name[4:])
