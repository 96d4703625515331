"""The deep linear toy: full vs single-layer interpolation between two minima (fig11)."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from lmcflow import logs
from lmcflow.io import save_parquet
from lmcflow.toy import linear_toy
from lmcflow.report import write_preview

log, _ = logs.start(snakemake)
table = linear_toy()
save_parquet(table, snakemake.output.parquet)
write_preview(table, "linear_toy", snakemake.output.html)
log(table.groupby(["path", "into"])["barrier"].first().to_string())
