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
from .commutativity import commutativity_matching
from .weight import weight_matching

__all__ = ["Matcher", "MATCHERS"]


@dataclass(frozen=True)
class Matcher:
    name: str
    description: str
    match: Callable


def _weight(spec, model_a, model_b, options, data, device, log):
    return weight_matching(spec, model_a.state_dict(), model_b.state_dict(),
                           max_sweeps=options["max_sweeps"], seed=options["seed"], log=log,
                           first_solve=options.get("first_solve", "all"))


def _activation(spec, model_a, model_b, options, data, device, log):
    return activation_matching(model_a, model_b, spec, data().to(device),
                               num_batches=options["batches"], batch_size=options["batch_size"],
                               cost=options["cost"], device=device, log=log, seed=options["seed"],
                               residual=options["residual"])


def _commutativity(spec, model_a, model_b, options, data, device, log):
    """Weight or activation matching (``options["commutativity_start"]``), then the descent on
    the commutativity residual from there, on the images activation matching reads."""
    loaded = data().to(device)
    start = options["commutativity_start"]
    first, first_info = MATCHERS[start].match(spec, model_a, model_b, options, lambda: loaded,
                                              device, log)
    perm, info = commutativity_matching(model_a, model_b, spec, loaded,
                                        num_batches=options["batches"],
                                        batch_size=options["batch_size"], start=first,
                                        max_sweeps=options["max_sweeps"], seed=options["seed"],
                                        max_cycles=options["commutativity_cycles"],
                                        device=device, log=log)
    return perm, info | {"start": start, "start_matching_objective": first_info["objective"]}


MATCHERS: dict[str, Matcher] = {
    "weight": Matcher("weight", "B's units permuted to maximise the inner product of the weights "
                      "(Git Re-Basin, weight matching)", _weight),
    "activation": Matcher("activation", "B's units permuted to maximise the correlation of the "
                          "activations on training data (Git Re-Basin, activation matching)",
                          _activation),
    "commutativity": Matcher("commutativity", "B's units permuted to minimise the LLFC "
                             "commutativity residual sum_l ||(W_A - W_B)(H_A - H_B)||^2 over the "
                             "layer inputs of training images, by coordinate descent from weight "
                             "or activation matching", _commutativity),
}
