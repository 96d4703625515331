"""Merging many models: for every merge method and K in merge.k, the first K of the
experiment's independent runs aligned by MergeMany (method none: as they are), their average
evaluated under every policy of lmc.policies (lmcflow.merging) -> {experiment}/merge/merge.parquet."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
import pandas as pd

from lmcflow import jobs
from lmcflow.alignment import permutation_spec
from lmcflow.features import probe_indices
from lmcflow.io import save_parquet
from lmcflow.merging import evaluate_merge, merge_runs
from lmcflow.models import feature_layers
from lmcflow.training import check_fits, load_run

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
merge, lmc, llfc = setting["merge"], setting["lmc"], setting["llfc"]
data = jobs.load_dataset(**setting["data"]).to(device)
model_spec = jobs.model_spec(data, setting["model"])
build = lambda: jobs.build(model_spec, device)  # noqa: E731
states = []
for run, path in zip(setting["runs"], snakemake.input.runs):
    states.append(load_run(path, device)["model"])
    check_fits(states[-1], build(), path, f"{model_spec['arch']}, the configured model")
spec = permutation_spec(build())
layers = feature_layers(build(), llfc["first_feature"])
samples = probe_indices(len(data.test_y), llfc["probe_size"], seed=setting["seed"])
frames = []
for method in merge["methods"]:
    for k in sorted(merge["k"]):
        aligned, info = merge_runs(spec, build, states[:k], method, setting["matching"], data,
                                   merge["max_passes"], merge["init"], device, log)
        for bn in lmc["policies"]:
            table = evaluate_merge(build, aligned, data, samples, layers, bn, llfc["batch_size"],
                                   lmc["batch_size"], device, lmc["repair_logits"])
            frames.append(table.assign(method=method, k=k, bn=bn, runs="+".join(setting["runs"][:k]),
                                       passes=info["passes"], converged=info["converged"]))
            ev = table[(table["kind"] == "evaluation") & (table["split"] == "test")]
            log(f"{method} K={k} bn={bn}: test error (%) "
                + ", ".join(f"{m} {100 * e:.2f}" for m, e in zip(ev["model"], ev["error"]))
                + f"; passes {info['passes']}")
table = pd.concat(frames, ignore_index=True)
table.insert(0, "experiment", snakemake.wildcards.experiment)
save_parquet(table, snakemake.output[0])
