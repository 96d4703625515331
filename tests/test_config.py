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
    """fig7 needs epochs and the training subspace of fig10 the weights along training (at
    least three points: the kept ones and the final weights)."""
    for path in [REPO / "config.yaml", *sorted((REPO / "workflow/configs").glob("*.yaml"))]:
        for name, exp in load_yaml(path)["experiments"].items():
            if exp["layerwise"]["enabled"]:  # federated runs keep rounds instead of epochs
                if all(m.startswith("federated_") for m in exp["methods"]):
                    fed = exp["federated"]
                    points = set(fed["keep_rounds"]) | {exp["train"]["epochs"] // fed["local_epochs"]}
                else:
                    points = set(exp["train"]["checkpoint_epochs"]) | {exp["train"]["epochs"]}
                assert len(points) >= 3, (path.name, name)


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


# ---------------------------------------------------------------- sweeps

SWEEP = {"experiments": {"r20": {"model": {"arch": "resnet20", "norm": "ln"},
                                 "sweep": {"seed": [0, 1], "model.width": [1, 2, 4]}},
                         "mlp": {"model": {"arch": "mlp"}}}}


def test_a_sweep_expands_into_one_experiment_per_point_named_after_its_values():
    cfg = validate(copy.deepcopy(SWEEP))
    names = list(cfg["experiments"])
    assert names == [f"r20_width{w}_seed{s}" for w in (1, 2, 4) for s in (0, 1)] + ["mlp"]
    point = cfg["experiments"]["r20_width4_seed1"]
    assert point["model"] == {"arch": "resnet20", "norm": "ln", "width": 4, "shortcut_kernel": 1}
    assert point["seed"] == 1 and point["family"] == "r20"
    assert point["swept"] == {"model.width": 4, "seed": 1} and "sweep" not in point
    assert "swept" not in cfg["experiments"]["mlp"] and "family" not in cfg["experiments"]["mlp"]
    # validated like any experiment (defaults filled), and validating again changes nothing
    assert point["llfc"]["probe_size"] == 500
    again = validate(copy.deepcopy(cfg))
    assert again == cfg
    # the names do not depend on the order of the keys in the file
    reordered = copy.deepcopy(SWEEP)
    reordered["experiments"]["r20"]["sweep"] = {"model.width": [1, 2, 4], "seed": [0, 1]}
    assert list(validate(reordered)["experiments"]) == names


@pytest.mark.parametrize("sweep, names", [
    ({"train.lr": [0.05, 1e-5, 0.1234567891]}, ["lr0.05", "lr1e-05", "lr0.1234567891"]),
    ({"train.augment": [True, False]}, ["augmenttrue", "augmentfalse"]),
    ({"model.width": [0.5, 2.0]}, ["width0.5", "width2"]),
    ({"lmc.batch_size": [10], "llfc.batch_size": [20]}, ["llfc-batch_size20_lmc-batch_size10"]),
    ({"data.name": ["mnist5k", "fashion_mnist"]}, ["namemnist5k", "namefashion-mnist"]),
])
def test_point_names_are_safe_path_components_and_wildcards(sweep, names):
    import re

    cfg = validate({"experiments": {"e": {"model": {"arch": "vgg"}, "sweep": sweep}}})
    assert list(cfg["experiments"]) == [f"e_{n}" for n in names]
    for name in cfg["experiments"]:  # the experiment wildcard's pattern (rules/common.smk)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name), name


def test_settings_that_go_with_a_swept_value():
    sweep = {"model.width": {1: {"llfc.probe_size": 1000}, 8: {"llfc.probe_size": 100,
                                                               "layerwise.enabled": False}, 2: None}}
    cfg = validate({"experiments": {"r": {"model": {"arch": "resnet20"}, "sweep": sweep,
                                          "llfc": {"probe_size": 250}}}})
    got = {n: (e["model"]["width"], e["llfc"]["probe_size"], e["layerwise"]["enabled"])
           for n, e in cfg["experiments"].items()}
    assert got == {"r_width1": (1, 1000, True), "r_width8": (8, 100, False),
                   "r_width2": (2, 250, True)}
    assert cfg["experiments"]["r_width8"]["swept"] == {"model.width": 8}


@pytest.mark.parametrize("sweep, key, words", [
    ({"model.widht": [1, 2]}, "experiments.r20.sweep.model.widht", ["unknown key", "did you mean width?"]),
    ({"trian.lr": [0.1]}, "experiments.r20.sweep.trian.lr", ["unknown key", "did you mean train"]),
    ({"model.width": [1, -2]}, "experiments.r20.sweep.model.width", ["-2", "strictly above 0"]),
    ({"model.norm": ["ln", "lnn"]}, "experiments.r20.sweep.model.norm", ["'lnn'", "'ln'"]),
    ({"model.width": 4}, "experiments.r20.sweep.model.width", ["not a list of values"]),
    ({"model.width": []}, "experiments.r20.sweep.model.width", ["not a list of values"]),
    ({"model.width": [[1, 2]]}, "experiments.r20.sweep.model.width", ["not a number, string or boolean"]),
    ({"seed": [0, 0]}, "experiments.r20.sweep.seed", ["listed twice"]),
    ({"model..width": [1]}, "experiments.r20.sweep.model..width", ["dotted paths"]),
    ({"sweep": [1]}, "experiments.r20.sweep.sweep", ["not a setting a sweep can set"]),
    ({"seed.x": [1]}, "experiments.r20.sweep.seed.x", ["not of type 'integer'"]),
    ({"model.arch.x": [1]}, "experiments.r20.sweep.model.arch.x", ["model.arch is not a mapping"]),
    ({"model.width": {1: {"llfc.probe_sise": 3}}}, "experiments.r20.sweep.model.width.1.llfc.probe_sise",
     ["did you mean probe_size?"]),
    ({"model.width": {1: {"seed": 3}}, "seed": [1]}, "experiments.r20.sweep.seed",
     ["already set by experiments.r20.sweep.model.width.1.seed"]),
    ({"model.arch": ["mlp", "torchvision:resnet18", "torchvision/resnet18"]}, "experiments.r20.sweep",
     ["both be named r20_archtorchvision-resnet18"]),
    ([1, 2], "experiments.r20.sweep", ["a sweep maps setting keys"]),
    ({"train.epochs": [1, 4]}, "experiments.r20_epochs1.spawn_epoch", ["a point of experiments.r20.sweep"]),
])
def test_a_bad_sweep_names_its_key(sweep, key, words):
    cfg = copy.deepcopy(SWEEP)
    cfg["experiments"]["r20"]["sweep"] = sweep
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert f"config key {key}:" in str(err.value), str(err.value)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_an_error_outside_the_swept_keys_names_the_experiment_as_written():
    cfg = copy.deepcopy(SWEEP)
    cfg["experiments"]["r20"]["llfc"] = {"probe_sise": 3}
    with pytest.raises(ConfigError, match="config key experiments.r20.llfc.probe_sise: unknown key"):
        validate(cfg)


def test_a_point_may_not_take_the_name_of_another_experiment():
    cfg = copy.deepcopy(SWEEP)
    cfg["experiments"]["r20_width2_seed0"] = {"model": {"arch": "mlp"}}
    with pytest.raises(ConfigError, match="experiments.r20.sweep: its point r20_width2_seed0 is also"):
        validate(cfg)


@pytest.mark.parametrize("model, words", [
    ({"arch": "timm:resnet10"}, ["config key experiments.e.model.arch", "timm has no model "
                                 "'resnet10'", "did you mean resnet10t"]),
    ({"arch": "timm:vit_tiny_patch16_224", "kwargs": {"img_sise": 32}},
     ["config key experiments.e.model.kwargs.img_sise", "did you mean img_size?"]),
    ({"arch": "timm:resnet10t", "kwargs": {"pretrained": True}},
     ["config key experiments.e.model.kwargs.pretrained", "takes no argument 'pretrained'"]),
])
def test_timm_models_are_checked_at_start_up(model, words):
    pytest.importorskip("timm")
    with pytest.raises(ConfigError) as err:
        validate({"experiments": {"e": {"model": model}}})
    for word in words:
        assert word in str(err.value), str(err.value)
    ok = {"arch": "timm:vit_tiny_patch16_224", "kwargs": {"img_size": 32, "depth": 2}}
    assert validate({"experiments": {"e": {"model": ok}}})["experiments"]["e"]["model"] == ok


def test_timm_is_an_optional_dependency(monkeypatch):
    """Without timm a timm: model is refused at start-up, saying how to install it."""
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # import timm fails
    with pytest.raises(ConfigError, match=r"experiments\.e\.model\.arch: timm:resnet10t needs the "
                                          r"optional package timm.*pip install timm"):
        validate({"experiments": {"e": {"model": {"arch": "timm:resnet10t"}}}})
    with pytest.raises(ConfigError, match=r"or torchvision:<name>, timm:<name>, python:"):
        validate({"experiments": {"e": {"model": {"arch": "tim:resnet10t"}}}})
