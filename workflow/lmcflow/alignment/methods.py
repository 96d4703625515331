"""The registry of matching methods: one entry per method, each a function that returns the
permutation of B that aligns B to A (and a summary of the run), called by the pair methods
(:mod:`lmcflow.pairs`) and, for federated averaging, by :mod:`lmcflow.federated`.

A matcher is called as ``match(spec, model_a, model_b, options, data, device, log)``:
``options`` is the config's ``matching`` section, ``data`` a function that loads the training
data (only methods that need activations call it). It returns ``(perm, info)`` with at least
``info["objective"]`` and ``info["sweeps"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .activation import activation_matching
from .weight import weight_matching

__all__ = ["Matcher", "MATCHERS"]


@dataclass(frozen=True)
class Matcher:
    name: str
    description: str
    match: Callable


def _weight(spec, model_a, model_b, options, data, device, log):
    return weight_matching(spec, model_a.state_dict(), model_b.state_dict(),
                           max_sweeps=options["max_sweeps"], seed=options["seed"], log=log)


def _activation(spec, model_a, model_b, options, data, device, log):
    return activation_matching(model_a, model_b, spec, data().to(device),
                               num_batches=options["batches"], batch_size=options["batch_size"],
                               cost=options["cost"], device=device, log=log, seed=options["seed"],
                               residual=options["residual"])


MATCHERS: dict[str, Matcher] = {
    "weight": Matcher("weight", "B's units permuted to maximise the inner product of the weights "
                      "(Git Re-Basin, weight matching)", _weight),
    "activation": Matcher("activation", "B's units permuted to maximise the correlation of the "
                          "activations on training data (Git Re-Basin, activation matching)",
                          _activation),
}
