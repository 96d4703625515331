"""Layer-wise LMC of one pair: layer_barriers (final models and every epoch kept along training),
cumulative_barriers, layer_robustness and subspace perturbations."""

import dataclasses
import json

import pandas as pd
import torch

from lmcflow import jobs, layerwise
from lmcflow.features import probe_indices
from lmcflow.io import load_torch, save_parquet

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
lw = setting["layerwise"]
data = jobs.load_dataset(**setting["data"])
if lw["eval_samples"]:  # a fixed subset of each split: every variant is one pass over it
    pick = {s: torch.as_tensor(probe_indices(len(data.split(s)[1]), lw["eval_samples"], setting["seed"]))
            for s in ("train", "test")}
    data = dataclasses.replace(data, train_x=data.train_x[pick["train"]], train_y=data.train_y[pick["train"]],
                               test_x=data.test_x[pick["test"]], test_y=data.test_y[pick["test"]])
spec, state_a, state_b = jobs.load_pair(snakemake.input, device)
run_a, run_b = load_torch(snakemake.input.run_a, device), load_torch(snakemake.input.run_b, device)
model = jobs.build(spec, device)
common = dict(splits=lw["splits"], device=device, bn=lw["bn"], log=log)
ids = lambda df, **extra: jobs.with_ids(df, snakemake.wildcards, **extra)  # noqa: E731

# single-layer barriers of the final pair and of the pairs kept along training (B aligned by
# the final pair's permutation, if any)
align = lambda state: state  # noqa: E731
if "permutation" in snakemake.input.keys():
    from lmcflow.matching import apply_permutation, permutation_spec

    perm = {g: torch.tensor(p) for g, p in json.loads(open(snakemake.input.permutation).read()).items()}
    align = lambda state: apply_permutation(permutation_spec(model), perm, state)  # noqa: E731
epochs = sorted(set(run_a["history"]) & set(run_b["history"]))
frames = [ids(layerwise.single_layer_barriers(model, run_a["history"][e], align(run_b["history"][e]),
                                              data, **common), epoch=e) for e in epochs]
frames.append(ids(layerwise.single_layer_barriers(model, state_a, state_b, data, **common),
                  epoch=run_a["epoch"]))
save_parquet(pd.concat(frames, ignore_index=True), snakemake.output.layer_barriers)

save_parquet(ids(layerwise.cumulative_barriers(model, state_a, state_b, data, **common)),
             snakemake.output.cumulative_barriers)
save_parquet(ids(layerwise.layer_robustness(model, state_a, state_b, data, draws=lw["draws"],
                                            seed=setting["seed"], steps=lw["steps"], **common)),
             snakemake.output.layer_robustness)

# subspace perturbations: step lengths relative to the distance between the endpoints
keys = [k for k, _ in model.named_parameters()]
distance = float(torch.sqrt(sum((state_b[k] - state_a[k]).double().square().sum() for k in keys)))
checkpoints = [run_a["history"][e] for e in sorted(run_a["history"])]
sub = layerwise.subspace_perturbations(model, state_a, checkpoints, state_b, data,
                                       norms=[f * distance for f in lw["norms"]], draws=lw["draws"],
                                       seed=setting["seed"], per_layer=lw["per_layer"], **common)
sub["norm_fraction"] = sub["norm"] / distance
save_parquet(ids(sub), snakemake.output.subspace)
