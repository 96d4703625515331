"""Per sample and layer: 1 − cos_α, 1 − cos_AB and the scale c, read back in row groups."""

from lmcflow import jobs
from lmcflow.io import save_parquet
from lmcflow.metrics import llfc_table

log, _ = jobs.start(snakemake, "cpu")
table = llfc_table(snakemake.input[0])
save_parquet(jobs.with_ids(table, snakemake.wildcards), snakemake.output[0])
summary = table.groupby(["alpha", "layer_index", "layer"])[["one_minus_cos_alpha", "one_minus_cos_ab"]]
log("mean over samples:\n" + summary.mean().to_string())
