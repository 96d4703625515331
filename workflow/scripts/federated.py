"""One federated run, every round: client{k}.pt and global.pt (the format of a training run's
final.pt, `epoch` = the last round, `history` = the kept rounds) and rounds.parquet."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from pathlib import Path

import pandas as pd

from lmcflow import jobs
from lmcflow.config import TrainSetting
from lmcflow.federated import final_files, run_federated
from lmcflow.io import save_parquet, save_torch

run = snakemake.params.run
out_dir = Path(snakemake.output.rounds).parent
ckpt_dir = out_dir / "checkpoints"
# every attempt's lines, beside the checkpoints it resumes from
log, device = jobs.start(snakemake, run["device"],
                         attempts=jobs.attempts_log(ckpt_dir, "round_*.pt"))
data = jobs.load_dataset(**run["data"])
spec = jobs.model_spec(data, run["model"])
model = jobs.build(spec, device, seed=run["seed"])  # the clients' common initialisation
timer = jobs.Timer()
fed = run["federated"]
result = run_federated(model, data, TrainSetting(**run["train"]), fed, run["aggregation"],
                       seed=run["seed"], ckpt_dir=ckpt_dir, meta=run, matching=run.get("matching"),
                       device=device, log=log)
for name, file in final_files(result, ckpt_dir, run, spec, fed["keep_rounds"]).items():
    save_torch(file, out_dir / f"{name}.pt")
rows = pd.DataFrame(result["rows"])
rows.insert(0, "experiment", snakemake.wildcards.experiment)
rows.insert(1, "aggregation", run["aggregation"])
rows.insert(2, "pair", f"pair{(run['seed'] - snakemake.params.base_seed) // 2}")
rows.insert(3, "seed", run["seed"])
rows.insert(4, "shards", fed["shards"] + (f" β={fed['beta']:g}" if fed["shards"] == "dirichlet" else ""))
rows["label_entropy"] = rows["client"].map(dict(enumerate(result["entropy"])))  # NaN: global
save_parquet(rows, snakemake.output.rounds)
log(f"done in {timer}: {out_dir}")
