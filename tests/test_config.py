"""The config schema: defaults filled, bad values rejected with the key named."""

import copy

import pytest
import yaml

from lmcflow.config import ConfigError, LmcSetting, TrainSetting, as_dict, load_yaml, validate

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"experiments": {"e": {"model": {"arch": "mlp"}}}}


def test_defaults_are_filled_and_build_the_dataclasses():
    cfg = validate(copy.deepcopy(MINIMAL))
    exp = cfg["experiments"]["e"]
    assert exp["model"] == {"arch": "mlp", "width": 512, "depth": 3}
    assert exp["data"]["name"] == "mnist5k" and exp["methods"] == ["spawning", "naive"]
    assert TrainSetting(**exp["train"]) == TrainSetting()
    assert as_dict(TrainSetting(**exp["train"])) == exp["train"]
    assert LmcSetting(**exp["lmc"]).alphas[5] == 0.5 and len(LmcSetting().alphas) == 11


def test_defaults_are_not_shared_between_experiments():
    cfg = validate({"experiments": {"a": {"model": {"arch": "mlp"}}, "b": {"model": {"arch": "mlp"}}}})
    cfg["experiments"]["a"]["llfc"]["alphas"].append(0.9)
    assert cfg["experiments"]["b"]["llfc"]["alphas"] == [0.25, 0.5, 0.75]


@pytest.mark.parametrize("patch, key, words", [
    ({"model": {"arch": "mlpp"}}, "experiments.e.model.arch", ["'mlp'", "'vgg'", "'resnet20'"]),
    ({"model": {"arch": "mlp", "norm": "bn"}}, "experiments.e.model", ["norm"]),
    ({"model": {"arch": "resnet20", "norm": "gn"}}, "experiments.e.model.norm", ["'bn'", "'ln'"]),
    ({"lmc": {"bn": "rest"}}, "experiments.e.lmc.bn", ["'interpolate'", "'reset'"]),
    ({"train": {"lr": "fast"}}, "experiments.e.train.lr", ["number"]),
    ({"train": {"schedule": "step"}}, "experiments.e.train.schedule", ["multistep"]),
    ({"trian": {}}, "experiments.e", ["trian"]),
    ({"methods": ["spawn"]}, "experiments.e.methods.0", ["spawning"]),
    ({"data": {"name": "imagenet"}}, "experiments.e.data.name", ["cifar10"]),
    ({"spawn_epoch": 10}, "experiments.e.spawn_epoch", ["train.epochs"]),
    ({"train": {"epochs": 5, "milestones": [8]}}, "experiments.e.train.milestones", ["[8]"]),
    ({"train": {"schedule": "multistep"}}, "experiments.e.train.milestones", ["multistep"]),
    ({"llfc": {"alphas": [0.5, 1.0]}}, "experiments.e.llfc.alphas.1", ["1.0"]),
])
def test_bad_values_name_the_key(patch, key, words):
    cfg = copy.deepcopy(MINIMAL)
    cfg["experiments"]["e"].update(patch)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert f"config key {key}:" in message
    for word in words:
        assert word in message


def test_missing_or_empty_experiments():
    with pytest.raises(ConfigError, match="'experiments' is a required property"):
        validate({})
    with pytest.raises(ConfigError, match="config key experiments:"):
        validate({"experiments": {}})
    with pytest.raises(ConfigError, match="config key experiments"):
        validate({"experiments": {"bad/name": {"model": {"arch": "mlp"}}}})


def test_shipped_configs_validate():
    for path in [REPO / "config.yaml", *sorted((REPO / "workflow/configs").glob("*.yaml"))]:
        load_yaml(path)


def test_load_yaml_names_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(MINIMAL))
    assert load_yaml(tmp_path / "c.yaml")["experiments"]["e"]["seed"] == 0
