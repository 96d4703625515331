"""Loss and error of θ_α = α·A + (1−α)·B along the α grid, train and test: lmc.parquet."""

import json

from lmcflow import jobs
from lmcflow.config import LmcSetting
from lmcflow.interpolation import lmc_curve
from lmcflow.io import load_torch, save_parquet
from lmcflow.models import has_batchnorm

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
lmc = LmcSetting(**setting["lmc"])
data = jobs.load_dataset(**setting["data"])
model = jobs.build(json.loads(open(snakemake.input.info).read())["spec"], device)
bn = lmc.bn if has_batchnorm(model) else "none"
curve = lmc_curve(model, load_torch(snakemake.input.a), load_torch(snakemake.input.b), data,
                  lmc.alphas, bn="interpolate" if bn == "none" else bn,
                  batch_size=lmc.batch_size, device=device, log=log)
save_parquet(jobs.with_ids(curve, snakemake.wildcards, bn=bn), snakemake.output[0])
