"""Fine-tune one run: the task's data and training setting, from θ_0 (input `pretrained`: the
pretraining run or the user's file) or from θ_0's random initialisation (the model built with the
experiment's seed), a fresh optimizer from epoch 0. Writes a final.pt like every training run."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from pathlib import Path

from lmcflow import jobs
from lmcflow.config import TrainSetting
from lmcflow.io import save_torch
from lmcflow.training import check_fits, evaluate, kept_weights, load_run, run_training

run = snakemake.params.run
ckpt_dir = Path(snakemake.output[0]).parent / "checkpoints"
log, device = jobs.start(snakemake, run["device"], attempts=jobs.attempts_log(ckpt_dir))
data = jobs.load_dataset(**run["data"]).to(device)
spec = jobs.model_spec(data, run["model"])
model = jobs.build(spec, device, seed=run["init_seed"])  # θ_0's initialisation: the control's start
if "pretrained" in snakemake.input.keys():
    path = snakemake.input.pretrained
    theta0 = load_run(path, device)["model"]
    check_fits(theta0, model, path, f"{spec['arch']}, the configured model",
               "point pretrain.checkpoint at a checkpoint of the configured model")
    model.load_state_dict(theta0)
loss, error = evaluate(model, data.test_x, data.test_y, data.normalize, device=device)
log(f"start ({run['start']}) on task {run['data']['tasks'][0]}: test loss {loss:.4f}, "
    f"error {100 * error:.2f}% before fine-tuning")
timer = jobs.Timer()
final = run_training(model, data, TrainSetting(**run["train"]), noise_seed=run["noise_seed"],
                     ckpt_dir=ckpt_dir, meta=run, device=device, log=log)
final["spec"] = spec
final["history"] = kept_weights(final["meta"], ckpt_dir)
save_torch(final, snakemake.output[0])
log(f"done in {timer}: {snakemake.output[0]}")
