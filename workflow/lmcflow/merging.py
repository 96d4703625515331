"""Merging many models: the K-way average of K independent runs, unaligned ("none") or aligned
to one another by MergeMany (:func:`lmcflow.alignment.merge.merge_many`), evaluated under a
normalisation policy as every compared network is:

- loss and error of the average, train and test, against the K runs' own (their mean) and,
  on the test split, the ensemble of their logits;
- the K-way LLFC per layer on the probe set: 1 − cos and the scale c between f(mean θ_i) and
  mean f(θ_i) (:func:`lmcflow.finetune.compare`, as model averaging of fine-tuned runs does).

Policies for K networks: interpolate (the average's BN statistics are the averaged ones), reset
(recomputed on the training split), repair (reset, then every unit rescaled to the mean over
the K runs of their units' mean and std: REPAIR's interpolated target with weights 1/K).
The runs themselves get the same policy (reset for reset and repair), as
:func:`lmcflow.interpolation.load_interpolated` gives A and B.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from .alignment.merge import average_states, merge_many
from .finetune import compare, ensemble_evaluate, feature_batches, summarise
from .interpolation import BN_POLICIES, reset_bn
from .repair import remove_repair, repair, unit_statistics
from .training import evaluate

MERGE_METHODS = ("none", "weight", "activation", "commutativity")


def merge_runs(spec, build: Callable, states: Sequence[dict], method: str, options: dict, data,
               max_passes: int = 20, init: str = "anchor", device="cpu", log=print):
    """The K runs aligned by ``method`` (``none``: as they are) and MergeMany's info. The
    network holding an average of others that activation/commutativity matching read has its
    BN statistics reset on the training split (the averaged ones do not describe it)."""
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose from {MERGE_METHODS}")
    if method == "none":
        return list(states), {"passes": 0, "converged": True, "objective": [], "changed": []}

    def prepare(state):
        model = build()
        model.load_state_dict(state)
        reset_bn(model, data.train_x, data.normalize, device=device)
        return model.eval()

    aligned, _, info = merge_many(spec, states, method, options, prepare=prepare,
                                  data=lambda: data, device=device, max_passes=max_passes,
                                  init=init, log=log)
    return aligned, info


def _policy_networks(build, states, data, bn, batch_size, device, repair_logits):
    """(the average, the K runs), each under the policy ``bn``."""
    if bn not in BN_POLICIES:
        raise ValueError(f"bn must be one of {BN_POLICIES}, got {bn!r}")

    def load(state):
        model = build()
        model.load_state_dict(state)
        if bn in ("reset", "repair"):
            reset_bn(model, data.train_x, data.normalize, batch_size, device)
        return model.eval()

    members = [load(s) for s in states]
    average = load(average_states(states))
    if bn == "repair":
        stats = [unit_statistics(m, data.train_x, data.normalize, batch_size, device,
                                 logits=repair_logits) for m in members]
        target = {k: (torch.stack([s[k][0] for s in stats]).mean(0),
                      torch.stack([s[k][1] for s in stats]).mean(0)) for k in stats[0]}
        remove_repair(average)
        # α = 1 with stats_a = target: the target itself
        repair(average, target, target, 1.0, data.train_x, data.normalize, batch_size, device,
               logits=repair_logits)
    return average, members


def evaluate_merge(build, states: Sequence[dict], data, samples: np.ndarray, layers: list[str],
                   bn: str, batch_size: int = 100, eval_batch_size: int = 1000, device="cpu",
                   repair_logits: bool = False) -> pd.DataFrame:
    """Rows of ``kind`` evaluation (``model``: average, members = the K runs' mean, ensemble;
    ``split``; loss, error) and ``kind`` features (per layer: mean and sd over the probe
    samples of 1 − cos and c between f(average) and the mean of the K runs' features)."""
    average, members = _policy_networks(build, states, data, bn, eval_batch_size, device,
                                        repair_logits)
    rows = []
    for split in ("train", "test"):
        x, y = data.split(split)
        loss, error = evaluate(average, x, y, data.normalize, eval_batch_size, device)
        rows.append({"split": split, "model": "average", "loss": loss, "error": error})
        each = [evaluate(m, x, y, data.normalize, eval_batch_size, device) for m in members]
        rows.append({"split": split, "model": "members", "loss": float(np.mean([e[0] for e in each])),
                     "error": float(np.mean([e[1] for e in each]))})
    rows.append({"split": "test", "model": "ensemble",
                 **ensemble_evaluate(members, data, eval_batch_size, device)})
    nets = {"average": average, **dict(enumerate(members))}
    frames = []
    for idx, feats in feature_batches(nets, layers, data, samples, batch_size, device):
        for i, layer in enumerate(layers):
            mean = torch.stack([feats[k][layer].double() for k in range(len(members))]).mean(0)
            frames.append(pd.DataFrame({"layer": layer, "layer_index": i, "sample": idx,
                                        **compare(feats["average"][layer], mean)}))
    feats = summarise(pd.concat(frames, ignore_index=True), ["layer", "layer_index"])
    return pd.concat([pd.DataFrame(rows).assign(kind="evaluation"), feats.assign(kind="features")],
                     ignore_index=True)
