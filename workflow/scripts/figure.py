"""Draw one figure (PDF and PNG) from its table."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
import pandas as pd

from lmcflow import logs
from lmcflow.figures import FIGURES

log, _ = logs.start(snakemake)
FIGURES[snakemake.wildcards.fig](pd.read_parquet(snakemake.input[0]), snakemake.output.pdf)
log(f"wrote {snakemake.output.pdf}")
