"""CTL and task arithmetic of one cross-task pair (A fine-tuned on task a, B on task b, from θ_0
or, for the control, from θ_0's random initialisation):

- ctl.parquet: per (α, β), layer and probe sample, 1 − cos⟨f(αθ_A + βθ_B), αf(θ_A) + βf(θ_B)⟩,
  its scale c and 1 − cos⟨f(θ_A), f(θ_B)⟩, on the probe of the pair's data (both tasks' tests);
- task_arithmetic.parquet: addition θ_0 + λ(τ_A + τ_B) and negation θ_0 − λτ_A over the λ grid:
  loss and error on every task's test split, and per layer 1 − cos and c between the arithmetic
  model's features and the feature arithmetic (mean and sd over the same probe)."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from lmcflow import jobs
from lmcflow.features import probe_indices
from lmcflow.finetune import ctl_table, task_arithmetic
from lmcflow.io import save_parquet
from lmcflow.models import feature_layers
from lmcflow.tasks import apply_task, task_data
from lmcflow.training import load_run

setting, out = snakemake.params.setting, snakemake.output
log, device = jobs.start(snakemake, setting["device"])
base_data = jobs.load_dataset(**setting["data"]).to(device)
task_sets = {t: apply_task(base_data, t) for t in setting["tasks"]}
pair_tasks = setting["pair_tasks"]
data = task_data(base_data, pair_tasks)
spec, state_a, state_b = jobs.load_pair(snakemake.input, device)
build = lambda: jobs.build(spec, device)  # noqa: E731
if setting["start"] == "pretrained":
    base = load_run(snakemake.input.base, device)["model"]
else:  # the control's start: θ_0's initialisation, as the fine-tuning job built it
    base = jobs.build(spec, device, seed=setting["seed"]).state_dict()
layers = feature_layers(build())
samples = probe_indices(len(data.test_y), setting["llfc"]["probe_size"], seed=setting["seed"])
bn, batch, eval_batch = setting["lmc"]["bn"], setting["llfc"]["batch_size"], setting["lmc"]["batch_size"]
ids = dict(task_a=pair_tasks[0], task_b=pair_tasks[-1], start=setting["start"])

ctl = ctl_table(build, state_a, state_b, [tuple(c) for c in setting["finetune"]["ctl"]], data,
                samples, layers, bn, batch, device)
save_parquet(jobs.with_ids(ctl, snakemake.wildcards, **ids), out.ctl)
log("CTL, mean over samples:\n" + ctl.groupby(["alpha", "beta", "layer_index", "layer"])[
    ["one_minus_cos", "one_minus_cos_ab"]].mean().to_string())

roles = {setting["pretrain_task"]: "pretraining", pair_tasks[0]: "a", pair_tasks[-1]: "b"}
table = task_arithmetic(build, base, state_a, state_b, setting["finetune"]["lambdas"], task_sets,
                        roles, data, samples, layers, bn, batch, eval_batch, device, log)
save_parquet(jobs.with_ids(table, snakemake.wildcards, **ids), out.task_arithmetic)
