"""The deep linear toy: full vs single-layer interpolation between two minima (fig11)."""

from lmcflow import jobs
from lmcflow.io import save_parquet
from lmcflow.layerwise import linear_toy

log, _ = jobs.start(snakemake, "cpu")
table = linear_toy()
save_parquet(table, snakemake.output[0])
log(table.groupby(["path", "into"])["barrier"].first().to_string())
