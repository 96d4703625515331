"""Files a user brings (their model's source, their endpoint checkpoints): refused at start-up when
they do not fit the config, with hints that name the config key, and part of what the DAG
depends on, so editing one re-runs exactly what builds on it."""

import shutil

import pytest
import torch
import yaml
from torch import nn

from test_workflow import snakemake, write_config

USER_MODEL = """
from torch import nn
from blocks import head


def small_cnn(in_shape, num_classes, width=4):
    return nn.Sequential(nn.Conv2d(in_shape[0], width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), head(width, num_classes))
"""
BLOCKS = """
from torch import nn


def head(width, num_classes):
    return nn.Linear(width, num_classes)
"""
CNN = {"arch": "python:mynet:small_cnn", "path": "models"}
TINY = {"train": {"epochs": 1}, "methods": ["naive"], "layerwise": {"enabled": False},
        "llfc": {"probe_size": 16}}


def _user_model(workdir):
    (workdir / "models").mkdir()
    (workdir / "models/mynet.py").write_text(USER_MODEL)
    (workdir / "models/blocks.py").write_text(BLOCKS)


def _own_run_file(path, arch="mlp", args=None):
    """A final.pt as this workflow writes it: weights, epoch, history and the model spec."""
    args = args or {"width": 16, "depth": 1}
    state = nn.Linear(4, 4).state_dict()
    spec = {"arch": arch, "args": args, "in_shape": [1, 28, 28], "num_classes": 10}
    torch.save({"model": state, "epoch": 1, "history": {}, "spec": spec}, path)


def test_an_endpoint_of_another_architecture_is_refused_before_any_job(tmp_path):
    """runs: naming the workflow's own MLP final.pt files while the config names a CNN: the
    file's architecture must not silently replace the configured one."""
    _user_model(tmp_path)
    for name in ("a", "b"):
        _own_run_file(tmp_path / f"{name}.pt")
    write_config(tmp_path, {"experiments": {"mine": {**TINY, "model": CNN,
                                                     "runs": {"a": "a.pt", "b": "b.pt"}}}})
    out = snakemake(tmp_path, "--cores", "1")
    message = out.stdout + out.stderr
    assert out.returncode != 0
    for words in ("experiments.mine.runs.a", "a.pt", "mlp (depth=1, width=16)",
                  "python:mynet:small_cnn", "experiment mine", "set experiments.mine.model"):
        assert words in message, (words, message[-2000:])
    assert "<name>" not in message
    assert not (tmp_path / "results").exists()


def test_every_missing_endpoint_file_is_named_at_once(tmp_path):
    """Both endpoint files missing: one error lists both keys and paths, and says what to do."""
    from lmcflow.config import ConfigError
    from lmcflow.pairs import check_endpoint_files

    exp = {"model": {"arch": "mlp"}, "runs": {"a": str(tmp_path / "a.pt"), "b": str(tmp_path / "b.pt")}}
    with pytest.raises(ConfigError) as err:
        check_endpoint_files("mine", exp)
    for words in ("experiments.mine.runs.a", "experiments.mine.runs.b", "a.pt", "b.pt",
                  "change the paths"):
        assert words in str(err.value)


def test_a_truncated_endpoint_gets_a_hint_to_replace_it_not_to_force_it(tmp_path):
    _user_model(tmp_path)
    _own_run_file(tmp_path / "a.pt", "python:mynet:small_cnn", {"path": "models", "kwargs": {}})
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:200])
    write_config(tmp_path, {"experiments": {"mine": {**TINY, "model": CNN,
                                                     "runs": {"a": "a.pt", "b": "b.pt"}}}})
    out = snakemake(tmp_path, "-n", "--cores", "1")
    message = out.stdout + out.stderr
    assert out.returncode != 0
    assert "b.pt is not a readable checkpoint" in message, message[-2000:]
    assert "replace b.pt" in message and "experiments.mine.runs.b" in message
    assert "--force" not in message


def test_a_state_dict_that_does_not_fit_names_its_file_and_the_configured_model(tmp_path):
    """A plain state dict (no stored architecture) is checked by the pair's job against the
    configured model; the message blames that file, not the other one."""
    from scriptrun import run_script

    _user_model(tmp_path)
    import sys

    sys.path.insert(0, str(tmp_path / "models"))
    try:
        import mynet

        torch.save(mynet.small_cnn((1, 28, 28), 10).state_dict(), tmp_path / "a.pt")
    finally:
        sys.path.remove(str(tmp_path / "models"))
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).state_dict(), tmp_path / "b.pt")
    model = {**CNN, "path": str(tmp_path / "models"), "kwargs": {}}
    setting = {"data": {"name": "mnist5k", "data_dir": "data", "download": False},
               "device": "cpu", "matching": {}, "model": model, "runs": {"a": "a.pt", "b": "b.pt"}}
    with pytest.raises(ValueError) as err:
        run_script("make_pair", input={"a": tmp_path / "a.pt", "b": tmp_path / "b.pt"},
                   output={"a": tmp_path / "pa.pt", "b": tmp_path / "pb.pt", "info": tmp_path / "i.json"},
                   params={"setting": setting},
                   wildcards={"experiment": "mine", "method": "naive", "pair": "pair0"})
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'b.pt'} does not fit python:mynet:small_cnn, the model "
                              "of experiment mine"), message
    assert "experiments.mine.runs.b" in message and "experiments.mine.model" in message


@pytest.mark.slow
def test_editing_a_python_model_replans_its_runs_and_nothing_else(tmp_path):
    """The model's source file and the same-folder modules it imports are inputs of the jobs
    that build it, by content: an edit (even one that keeps the file's old timestamp) re-plans
    that experiment's training; the other experiment stays as it is."""
    _user_model(tmp_path)
    write_config(tmp_path, {"experiments": {
        "cnn": {**TINY, "model": CNN},
        "mlp": {**TINY, "model": {"arch": "mlp", "width": 16, "depth": 1}}}})
    targets = ["results/cnn/runs/seed0/final.pt", "results/mlp/runs/seed0/final.pt"]
    assert snakemake(tmp_path, "--cores", "2", *targets, timeout=300).returncode == 0
    plan = snakemake(tmp_path, "-n", "--cores", "2", *targets)
    assert "Nothing to be done" in plan.stdout + plan.stderr, plan.stdout

    blocks = tmp_path / "models/blocks.py"
    stamp = blocks.stat()
    blocks.write_text(BLOCKS.replace("nn.Linear(width, num_classes)",
                                     "nn.Sequential(nn.Linear(width, 8), nn.Linear(8, num_classes))"))
    shutil.copystat(tmp_path / "models/mynet.py", blocks)  # the edit keeps an old timestamp
    assert blocks.stat().st_mtime <= stamp.st_mtime
    plan = snakemake(tmp_path, "-n", "--cores", "2", *targets)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "output: results/cnn/runs/seed0/final.pt" in plan.stdout
    assert "output: results/mlp/runs/seed0/final.pt" not in plan.stdout
    assert "since last execution: model_code.models/blocks.py: '" in plan.stdout, plan.stdout

    # -n names the one key that changed, not the whole settings before and after
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config["experiments"]["mlp"]["train"]["lr"] = 0.1
    write_config(tmp_path, config)
    plan = snakemake(tmp_path, "-n", "--cores", "2", targets[1])
    reasons = [line for line in plan.stdout.splitlines() if "reason:" in line]
    assert reasons == ["    reason: Params have changed since last execution: train.lr: 0.05 -> 0.1"], \
        reasons
