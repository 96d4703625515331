"""Loss and error of θ_α = α·A + (1−α)·B along the α grid, train and test: lmc.parquet.

Models with BatchNorm are evaluated twice, with reset and with interpolated statistics (column
`bn`), so that fig2 can show what the reset buys; other models once (bn = "none")."""

import pandas as pd

from lmcflow import jobs
from lmcflow.config import LmcSetting
from lmcflow.interpolation import lmc_curve
from lmcflow.io import save_parquet
from lmcflow.models import has_batchnorm

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
lmc = LmcSetting(**setting["lmc"])
data = jobs.load_dataset(**setting["data"])
spec, state_a, state_b = jobs.load_pair(snakemake.input, device)
model = jobs.build(spec, device)
modes = ["reset", "interpolate"] if has_batchnorm(model) else ["none"]
curves = []
for bn in modes:
    curve = lmc_curve(model, state_a, state_b, data, lmc.alphas,
                      bn="interpolate" if bn == "none" else bn,
                      batch_size=lmc.batch_size, device=device, log=log)
    curves.append(jobs.with_ids(curve, snakemake.wildcards, bn=bn))
save_parquet(pd.concat(curves, ignore_index=True), snakemake.output[0])
