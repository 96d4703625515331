"""Train one run (independent, spawning parent, or a child continuing from the parent)."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from pathlib import Path

from lmcflow import jobs
from lmcflow.config import TrainSetting
from lmcflow.io import load_torch, rebuild_command, save_torch
from lmcflow.training import kept_weights, run_training

run = snakemake.params.run
ckpt_dir = Path(snakemake.output[0]).parent / "checkpoints"
# every attempt's lines, beside the checkpoints it resumes from (Snakemake deletes the log of an
# interrupted job)
log, device = jobs.start(snakemake, run["device"], attempts=jobs.attempts_log(ckpt_dir))
data = jobs.load_dataset(**run["data"])
spec = jobs.model_spec(data, run["model"])
model = jobs.build(spec, device, seed=run["init_seed"])
parent = load_torch(snakemake.input.parent) if "parent" in snakemake.input.keys() else None
if parent is not None and parent["epoch"] != run["spawn_epoch"]:
    raise ValueError(f"{snakemake.input.parent} is at epoch {parent['epoch']}, not spawn_epoch "
                     f"{run['spawn_epoch']}; rebuild it with: {rebuild_command(snakemake.input.parent)}")
timer = jobs.Timer()
final = run_training(
    model, data, TrainSetting(**run["train"]), noise_seed=run["noise_seed"],
    ckpt_dir=ckpt_dir, meta=run,
    stop_epoch=run["stop_epoch"], start=parent, device=device, log=log,
)
final["spec"] = spec
# real copies of the weights at train.checkpoint_epochs (a child's earlier ones are its parent's)
final["history"] = {**(parent or {}).get("history", {}), **kept_weights(final["meta"], ckpt_dir)}
save_torch(final, snakemake.output[0])
log(f"done in {timer}: {snakemake.output[0]}")
