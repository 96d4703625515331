"""Draw one figure (PDF and PNG) from its table."""

import pandas as pd

from lmcflow import jobs
from lmcflow.figures import FIGURES

log, _ = jobs.start(snakemake, "cpu")
FIGURES[snakemake.wildcards.fig](pd.read_parquet(snakemake.input[0]), snakemake.output.pdf)
log(f"wrote {snakemake.output.pdf}")
