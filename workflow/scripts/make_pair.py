"""Make one pair's endpoints: model_a.pt, model_b.pt (plain state dicts), pair.json and, for
permutation methods, permutation.json (group -> indices; model_b.pt is then π(B))."""

import _path  # noqa: F401  (puts the lmcflow package on sys.path)
from lmcflow import jobs
from lmcflow.io import save_json, save_torch
from lmcflow.pairs import endpoint_hint, get_method
from lmcflow.training import check_fits, load_run

setting = snakemake.params.setting
log, device = jobs.start(snakemake, setting["device"])
experiment = snakemake.wildcards.experiment
if "runs" in setting:  # files the user brings: always the configured model, never the file's own
    where = f"experiments.{experiment}"
    hints = {k: endpoint_hint(where, k, snakemake.input[k]) for k in ("a", "b")}
    run_a, run_b = (load_run(snakemake.input[k], hint=hints[k]) for k in ("a", "b"))
    spec = jobs.model_spec(jobs.load_dataset(**setting["data"]), setting["model"])
    for key, run in (("a", run_a), ("b", run_b)):
        check_fits(run["model"], jobs.build(spec), snakemake.input[key],
                   f"{setting['model']['arch']}, the model of experiment {experiment}",
                   f"{hints[key]}; or set {where}.model to the architecture the file holds")
        run["spec"] = spec
else:  # the workflow's own runs, which carry their model spec, or fine-tuned files a user brings
    run_a, run_b = load_run(snakemake.input.a), load_run(snakemake.input.b)
    for key, run in (("a", run_a), ("b", run_b)):
        if "spec" not in run:  # a plain state dict (finetune.tasks.<task>.checkpoints)
            spec = jobs.model_spec(jobs.load_dataset(**setting["data"]), setting["model"])
            check_fits(run["model"], jobs.build(spec), snakemake.input[key],
                       f"{setting['model']['arch']}, the model of experiment {experiment}",
                       "point finetune.tasks.<task>.checkpoints at fine-tunings of the configured "
                       "model, or set model to the architecture the file holds")
            run["spec"] = spec
method = get_method(snakemake.wildcards.method)
state_b, extra = run_b["model"], {}
if method.align is not None:
    state_b, extra = method.align(run_a, run_b, setting, device=device, log=log)
    save_json(extra.pop("permutation"), snakemake.output.permutation)
save_torch(run_a["model"], snakemake.output.a)
save_torch(state_b, snakemake.output.b)
save_json({**dict(snakemake.wildcards.items()), "method_description": method.description,
           "runs": {"a": snakemake.input.a, "b": snakemake.input.b},
           "epochs": {"a": run_a["epoch"], "b": run_b["epoch"]}, "spec": run_a["spec"], **extra},
          snakemake.output.info)
log(f"pair written: {snakemake.output.a}, {snakemake.output.b}")
