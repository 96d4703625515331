"""One row per pair from the lmc, llfc and commutativity tables: test barriers, LLFC ratio and
Dist_com over the hidden layers ({root}/tables/pair_summary.parquet, fig13 and fig14), with its
HTML preview for the report. Torch-free."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from pathlib import Path

import pandas as pd

from lmcflow import logs
from lmcflow.io import save_parquet
from lmcflow.report import write_preview
from lmcflow.summary import pair_summary

log, _ = logs.start(snakemake)
tables = {k: pd.read_parquet(snakemake.input[k]) for k in ("lmc", "llfc", "commutativity")}
summary = pair_summary(tables["lmc"], tables["llfc"], tables["commutativity"])
save_parquet(summary, snakemake.output.parquet)
write_preview(summary, Path(snakemake.output.parquet).stem, snakemake.output.html)
log(summary.to_string())
