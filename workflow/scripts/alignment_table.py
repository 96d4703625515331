"""Barriers per pair, method and BatchNorm mode (fig2's table), from the LMC table."""

import pandas as pd

from lmcflow import jobs
from lmcflow.figures import alignment_table
from lmcflow.io import save_parquet

log, _ = jobs.start(snakemake, "cpu")
table = alignment_table(pd.read_parquet(snakemake.input[0]))
save_parquet(table, snakemake.output[0])
log(table.to_string())
