"""Weak additivity of ReLU and commutativity between A and B (π(B)) on the probe set."""

from lmcflow import jobs
from lmcflow.config import LlfcSetting
from lmcflow.features import probe_indices
from lmcflow.io import save_parquet
from lmcflow.mechanisms import commutativity, weak_additivity

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
llfc = LlfcSetting(**setting["llfc"])
data = jobs.load_dataset(**setting["data"])
spec, state_a, state_b = jobs.load_pair(snakemake.input, device)
a, b = jobs.load_network(spec, state_a, device), jobs.load_network(spec, state_b, device)
samples = probe_indices(len(data.test_y), llfc.probe_size, seed=setting["seed"])
probe = (data.test_x, samples, data.normalize)
weak = weak_additivity(a, b, *probe, alphas=llfc.alphas, batch_size=llfc.batch_size, device=device)
save_parquet(jobs.with_ids(weak, snakemake.wildcards), snakemake.output.weak_additivity)
com = commutativity(a, b, *probe, batch_size=llfc.batch_size, device=device)
save_parquet(jobs.with_ids(com, snakemake.wildcards), snakemake.output.commutativity)
log("commutativity:\n" + com.to_string())
