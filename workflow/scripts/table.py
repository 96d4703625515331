"""Concatenate the per-pair tables of one analysis into {root}/tables/{table}.parquet, with the
family and sweep columns of every experiment (params.sweeps) and its HTML preview for the
report; for the LMC table also the barriers of every curve (fig2's alignment table).
Torch-free: pandas and pyarrow only."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from pathlib import Path

import pandas as pd

from lmcflow import logs
from lmcflow.barriers import alignment_table
from lmcflow.io import save_parquet
from lmcflow.report import write_preview
from lmcflow.summary import add_sweep_columns

log, _ = logs.start(snakemake)
pairs = pd.concat([pd.read_parquet(path) for path in snakemake.input.tables], ignore_index=True)
table = add_sweep_columns(pairs, snakemake.params.sweeps)
save_parquet(table, snakemake.output.parquet)
write_preview(table, Path(snakemake.output.parquet).stem, snakemake.output.html)
log(f"{len(table)} rows from {len(snakemake.input.tables)} files -> {snakemake.output.parquet}")
if "alignment" in snakemake.output.keys():
    barriers = add_sweep_columns(alignment_table(pairs), snakemake.params.sweeps)
    save_parquet(barriers, snakemake.output.alignment)
    write_preview(barriers, "alignment", snakemake.output.alignment_html)
    log(barriers.to_string())
