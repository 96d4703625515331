"""Features of A, B and θ_α (α from the llfc setting) on the probe set, streamed to Parquet."""

from lmcflow import jobs
from lmcflow.config import LlfcSetting
from lmcflow.features import alpha_network, probe_indices, write_features
from lmcflow.interpolation import load_interpolated
from lmcflow.models import feature_layers

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
llfc, bn = LlfcSetting(**setting["llfc"]), setting["bn"]
data = jobs.load_dataset(**setting["data"])
spec, state_a, state_b = jobs.load_pair(snakemake.input, device)
networks = {"A": jobs.load_network(spec, state_a, device), "B": jobs.load_network(spec, state_b, device)}
for alpha in llfc.alphas:
    networks[alpha_network(alpha)] = load_interpolated(
        jobs.build(spec, device), state_a, state_b, alpha, data, bn, device=device)
samples = probe_indices(len(data.test_y), llfc.probe_size, seed=setting["seed"])
write_features(snakemake.output[0], networks, feature_layers(networks["A"]), data.test_x, samples,
               data.normalize, llfc.batch_size, device=device, log=log,
               metadata={**dict(snakemake.wildcards.items()), "split": "test", "bn": bn})
