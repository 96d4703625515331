"""Concatenate the per-pair tables of one analysis into results/tables/{table}.parquet."""

import pandas as pd

from lmcflow import jobs
from lmcflow.io import save_parquet

log, _ = jobs.start(snakemake, "cpu")
table = pd.concat([pd.read_parquet(path) for path in snakemake.input.tables], ignore_index=True)
save_parquet(table, snakemake.output[0])
log(f"{len(table)} rows from {len(snakemake.input.tables)} files -> {snakemake.output[0]}")
