"""Layer-wise LMC of one pair: layer_barriers, cumulative_barriers and layer_robustness of the
final pair and of the pair at every epoch kept along training (both runs), and subspace
perturbations of the final pair."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
import dataclasses
import json

import pandas as pd
import torch

from lmcflow import jobs, layerwise
from lmcflow.features import probe_indices
from lmcflow.io import save_parquet
from lmcflow.training import load_run

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
lw = setting["layerwise"]
data = jobs.load_dataset(**setting["data"])
if lw["eval_samples"]:  # a fixed subset of each split: every variant is one pass over it
    pick = {s: torch.as_tensor(probe_indices(len(data.split(s)[1]), lw["eval_samples"], setting["seed"]))
            for s in ("train", "test")}
    data = dataclasses.replace(data, train_x=data.train_x[pick["train"]], train_y=data.train_y[pick["train"]],
                               test_x=data.test_x[pick["test"]], test_y=data.test_y[pick["test"]])
data = data.to(device)  # once: batches are indexed on the device
spec, state_a, state_b = jobs.load_pair(snakemake.input, device)
run_a, run_b = load_run(snakemake.input.run_a, device), load_run(snakemake.input.run_b, device)
model = jobs.build(spec, device)
common = dict(splits=lw["splits"], device=device, bn=lw["bn"], log=log)
ids = lambda df, **extra: jobs.with_ids(df, snakemake.wildcards, **extra)  # noqa: E731

# the pair at every epoch kept in both runs (B aligned by the final pair's permutation, if any)
# and the final pair
align = lambda state: state  # noqa: E731
if "permutation" in snakemake.input.keys():
    from lmcflow.alignment import apply_permutation, permutation_spec

    perm = {g: torch.tensor(p) for g, p in json.loads(open(snakemake.input.permutation).read()).items()}
    align = lambda state: apply_permutation(permutation_spec(model), perm, state)  # noqa: E731
epochs = sorted(set(run_a["history"]) & set(run_b["history"]))
pairs = [(e, run_a["history"][e], align(run_b["history"][e])) for e in epochs]
pairs.append((run_a["epoch"], state_a, state_b))
analyses = {
    "layer_barriers": lambda a, b: layerwise.single_layer_barriers(model, a, b, data, **common),
    "cumulative_barriers": lambda a, b: layerwise.cumulative_barriers(
        model, a, b, data, random_orders=lw["random_orders"], seed=setting["seed"], **common),
    "layer_robustness": lambda a, b: layerwise.layer_robustness(
        model, a, b, data, draws=lw["draws"], seed=setting["seed"], steps=lw["steps"], **common),
}
for name, analysis in analyses.items():
    frames = []
    for epoch, a, b in pairs:
        log(f"{name}, epoch {epoch}")
        frames.append(ids(analysis(a, b), epoch=epoch))
    save_parquet(pd.concat(frames, ignore_index=True), getattr(snakemake.output, name))

# subspace perturbations of both endpoints: the subspace is spanned by the weights of both
# networks along training (B's aligned like B) and the endpoints; step lengths are fractions of
# the distance between the endpoints
keys = [k for k, _ in model.named_parameters()]
distance = float(torch.sqrt(sum((state_b[k] - state_a[k]).double().square().sum() for k in keys)))
along_training = ([run_a["history"][e] for e in sorted(run_a["history"])]
                  + [align(run_b["history"][e]) for e in sorted(run_b["history"])])
sub = layerwise.subspace_perturbations(model, state_a, state_b, along_training, data,
                                       norms=[f * distance for f in lw["norms"]], draws=lw["draws"],
                                       seed=setting["seed"], per_layer=lw["per_layer"], **common)
sub["norm_fraction"] = sub["norm"] / distance
save_parquet(ids(sub), snakemake.output.subspace)
