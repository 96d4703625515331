"""Every analysis of one pair's interpolation path but the layer-wise ones, in one job (the
data, the pair and its networks are loaded once):

- lmc.parquet: loss and error of θ_α along the α grid, train and test, under the configured
  normalisation policy and every one of `lmc.policies`;
- LLFC on the probe set: A, B (π(B)) and θ_α for α in the llfc setting, all under the
  configured policy (A and B are θ_1 and θ_0), computed batch by batch as their features stream
  by into llfc.parquet (1 − cos_α, 1 − cos_AB and c); the features of a seeded subset of the
  probe (llfc.stored_samples) are kept in features.parquet;
- the LLFC paper's analyses of the endpoints: weak additivity and commutativity on the same
  probe set, model stitching on the test split."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from lmcflow import jobs
from lmcflow.config import LlfcSetting, LmcSetting
from lmcflow.features import alpha_network, probe_indices, stored_subset, write_features
from lmcflow.interpolation import lmc_table, pair_networks
from lmcflow.io import save_parquet
from lmcflow.mechanisms import commutativity, weak_additivity
from lmcflow.metrics import LlfcRows
from lmcflow.models import feature_layers
from lmcflow.stitching import stitching

setting, out = snakemake.params.setting, snakemake.output
log, device = jobs.start(snakemake, setting["device"])
lmc, llfc = LmcSetting(**setting["lmc"]), LlfcSetting(**setting["llfc"])
data = jobs.load_dataset(**setting["data"]).to(device)  # once: batches are indexed on the device
spec, state_a, state_b = jobs.load_pair(snakemake.input, device)
ids = lambda df, **extra: jobs.with_ids(df, snakemake.wildcards, **extra)  # noqa: E731

save_parquet(ids(lmc_table(jobs.build(spec, device), state_a, state_b, data, lmc, device, log)),
             out.lmc)

bn = lmc.bn
nets = pair_networks(lambda: jobs.build(spec, device), state_a, state_b, [1.0, 0.0, *llfc.alphas],
                     data, bn, lmc.batch_size, device, repair_logits=lmc.repair_logits)
a, b = nets[1.0], nets[0.0]
networks = {"A": a, "B": b, **{alpha_network(alpha): nets[alpha] for alpha in llfc.alphas}}
samples = probe_indices(len(data.test_y), llfc.probe_size, seed=setting["seed"])

# one pass over the probe: LLFC of every sample computed as the features stream by, the
# features of a subset (llfc.stored_samples) kept in features.parquet
layers = feature_layers(a, llfc.first_feature)
rows = LlfcRows(layers, llfc.alphas)
write_features(out.features, networks, layers, data.test_x, samples, data.normalize,
               llfc.batch_size, device=device, log=log, on_batch=rows,
               store=stored_subset(samples, llfc.stored_samples, seed=setting["seed"]),
               metadata={**dict(snakemake.wildcards.items()), "split": "test", "bn": bn})
table = rows.table()
save_parquet(ids(table), out.llfc)
means = table.groupby(["alpha", "layer_index", "layer"])[["one_minus_cos_alpha", "one_minus_cos_ab"]]
log("LLFC, mean over samples:\n" + means.mean().to_string())

probe = (data.test_x, samples, data.normalize)
save_parquet(ids(weak_additivity(a, b, *probe, alphas=llfc.alphas, batch_size=llfc.batch_size,
                                 device=device, seed=setting["seed"])), out.weak_additivity)
com = commutativity(a, b, *probe, batch_size=llfc.batch_size, device=device)
save_parquet(ids(com), out.commutativity)
log("commutativity:\n" + com.to_string())
stitched = stitching(a, b, data.test_x, data.test_y, data.normalize, lmc.batch_size, device, log=log,
                     first_feature=llfc.first_feature)
save_parquet(ids(stitched, split="test"), out.stitching)
