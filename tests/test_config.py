"""The config schema: defaults filled, bad values rejected with the key named."""

import copy

import pytest
import yaml

from lmcflow.config import (ConfigError, LmcSetting, TrainSetting, as_dict, canonical, load_yaml,
                            validate)

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {"experiments": {"e": {"model": {"arch": "mlp"}}}}


def test_defaults_are_filled_and_build_the_dataclasses():
    cfg = validate(copy.deepcopy(MINIMAL))
    exp = cfg["experiments"]["e"]
    assert exp["model"] == {"arch": "mlp", "width": 512, "depth": 3}
    assert exp["data"]["name"] == "mnist5k" and exp["methods"] == ["spawning", "naive"]
    assert TrainSetting(**exp["train"]) == TrainSetting()
    # warmup_steps has no schema default (unset = 0), so adding it re-ran no existing training job
    assert as_dict(TrainSetting(**exp["train"])) == {**exp["train"], "warmup_steps": 0}
    assert LmcSetting(**exp["lmc"]).alphas[5] == 0.5 and len(LmcSetting().alphas) == 11


def test_defaults_are_not_shared_between_experiments():
    cfg = validate({"experiments": {"a": {"model": {"arch": "mlp"}}, "b": {"model": {"arch": "mlp"}}}})
    cfg["experiments"]["a"]["llfc"]["alphas"].append(0.9)
    assert cfg["experiments"]["b"]["llfc"]["alphas"] == [0.25, 0.5, 0.75]


@pytest.mark.parametrize("patch, key, words", [
    ({"model": {"arch": "mlpp"}}, "experiments.e.model.arch", ["'mlp'", "'vgg'", "'resnet20'"]),
    ({"model": {"arch": "mlp", "norm": "bn"}}, "experiments.e.model.norm", ["unknown key"]),
    ({"model": {"arch": "resnet20", "norm": "in"}}, "experiments.e.model.norm", ["'bn'", "'ln'", "'gn'"]),
    ({"model": {"arch": "resnet18", "norm": "ln"}}, "experiments.e.model.norm", ["'none'"]),
    ({"lmc": {"bn": "rest"}}, "experiments.e.lmc.bn", ["'interpolate'", "'reset'"]),
    ({"train": {"lr": "fast"}}, "experiments.e.train.lr", ["number"]),
    ({"train": {"schedule": "step"}}, "experiments.e.train.schedule", ["multistep"]),
    ({"trian": {}}, "experiments.e.trian", ["did you mean train"]),
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


def test_shipped_configs_keep_weights_along_training_where_the_layerwise_analyses_run():
    """fig7 needs epochs and the training subspace of fig10 the weights along training."""
    for path in [REPO / "config.yaml", *sorted((REPO / "workflow/configs").glob("*.yaml"))]:
        for name, exp in load_yaml(path)["experiments"].items():
            if exp["layerwise"]["enabled"]:  # federated runs keep rounds instead of epochs
                kept = exp["federated"]["keep_rounds"] if all(
                    m.startswith("federated_") for m in exp["methods"]) else \
                    exp["train"]["checkpoint_epochs"]
                assert len(kept) >= 3, (path.name, name)


def test_canonical_sorts_every_mapping_and_keeps_lists():
    value = {"b": [{"z": 1, "a": 2}, 3], "a": {"y": (1, 2), "x": None}}
    out = canonical(value)
    assert list(out) == ["a", "b"] and list(out["a"]) == ["x", "y"]
    assert out["b"] == [{"a": 2, "z": 1}, 3] and list(out["b"][0]) == ["a", "z"]
    assert out["a"]["y"] == [1, 2]
    reordered = {"a": {"x": None, "y": (1, 2)}, "b": [{"a": 2, "z": 1}, 3]}
    assert repr(canonical(reordered)) == repr(out)


@pytest.mark.parametrize("arch, extra, words", [
    ("torchvision:resnt18", {}, ["torchvision has no model 'resnt18'", "resnet18"]),
    ("python:nomodule:make", {}, ["python module 'nomodule' not found", "model.path"]),
    ("python:nets:make_nett", {"path": "PATH"}, ["defines no 'make_nett'", "make_net"]),
    ("resnet_18", {}, ["not one of the built-in models", "resnet18"]),
])
def test_models_from_elsewhere_are_checked_at_start_up(tmp_path, arch, extra, words):
    (tmp_path / "nets.py").write_text("def make_net(num_classes, hidden=8):\n    pass\n")
    model = {"arch": arch, **{k: str(tmp_path) if v == "PATH" else v for k, v in extra.items()}}
    with pytest.raises(ConfigError) as err:
        validate({"experiments": {"e": {"model": model}}})
    assert "config key experiments.e.model.arch" in str(err.value)
    for word in words:
        assert word in str(err.value)
    ok = {"arch": "python:nets:make_net", "path": str(tmp_path), "kwargs": {"hidden": 3}}
    validate({"experiments": {"e": {"model": ok}}})
    validate({"experiments": {"e": {"model": {"arch": "torchvision:resnet18"}}}})


def test_own_checkpoints_need_methods_that_train_nothing():
    exp = {"model": {"arch": "mlp"}, "runs": {"a": "a.pt", "b": "b.pt"}}
    with pytest.raises(ConfigError, match="methods: \\['spawning'\\]"):
        validate({"experiments": {"e": {**exp, "methods": ["naive", "spawning"]}}})
    validate({"experiments": {"e": {**exp, "methods": ["naive", "weight_matching"]}}})


@pytest.mark.parametrize("where, value, words", [
    ("llfc", {"probe_sise": 3}, ["experiments.e.llfc.probe_sise: unknown key", "did you mean probe_size?"]),
    ("lmcc", {}, ["experiments.e.lmcc: unknown key", "did you mean lmc?"]),
    ("llfc", {"alphas": [0.5, 1.5]}, ["experiments.e.llfc.alphas.1: 1.5", "strictly between 0 and 1"]),
    ("train", {"momentum": 2}, ["experiments.e.train.momentum: 2", "between 0 and 1 (both included)"]),
    ("train", {"lr": 0}, ["experiments.e.train.lr: 0", "strictly above 0"]),
    ("lmc", {"bn": "rest"}, ["experiments.e.lmc.bn", "did you mean reset?"]),
])
def test_errors_suggest_close_keys_and_word_ranges_as_intervals(where, value, words):
    cfg = copy.deepcopy(MINIMAL)
    cfg["experiments"]["e"][where] = value
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for word in words:
        assert word in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="config key resuls: unknown key; did you mean results?"):
        validate({**copy.deepcopy(MINIMAL), "resuls": "out"})


@pytest.mark.parametrize("arch, kwargs, words", [
    ("torchvision:resnet18", {"widht_per_group": 32}, ["takes no argument 'widht_per_group'",
                                                      "did you mean width_per_group?"]),
    ("python:nets:make_net", {"widht": 2}, ["takes no argument 'widht'", "did you mean width?"]),
    ("python:nets:Net", {"deph": 2}, ["takes no argument 'deph'", "did you mean depth?"]),
])
def test_model_kwargs_are_checked_against_the_factory_at_start_up(tmp_path, arch, kwargs, words):
    """A typo inside kwargs is refused at start-up, not in every job with a TypeError."""
    (tmp_path / "nets.py").write_text(
        "def make_net(in_shape, num_classes, width=8):\n    pass\n\n\n"
        "class Net:\n    def __init__(self, num_classes, depth=2):\n        pass\n\n\n"
        "def anything(num_classes, **kwargs):\n    pass\n")
    model = {"arch": arch, "path": str(tmp_path), "kwargs": kwargs} if arch.startswith("python") \
        else {"arch": arch, "kwargs": kwargs}
    with pytest.raises(ConfigError) as err:
        validate({"experiments": {"e": {"model": model}}})
    assert f"config key experiments.e.model.kwargs.{next(iter(kwargs))}:" in str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)
    fixed = {k.replace("widht", "width").replace("deph", "depth"): v for k, v in kwargs.items()}
    validate({"experiments": {"e": {"model": {**model, "kwargs": fixed}}}})
    anything = {"arch": "python:nets:anything", "path": str(tmp_path), "kwargs": {"whatever": 1}}
    validate({"experiments": {"e": {"model": anything}}})  # **kwargs takes any name


def test_a_python_model_path_must_be_a_folder(tmp_path):
    (tmp_path / "nets.py").write_text("def make_net(num_classes):\n    pass\n")
    model = {"arch": "python:nets:make_net", "path": str(tmp_path / "nets.py")}
    with pytest.raises(ConfigError, match=f"model.path: .*nets.py is a file; .*set path: {tmp_path}"):
        validate({"experiments": {"e": {"model": model}}})
