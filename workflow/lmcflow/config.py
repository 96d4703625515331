"""Configuration: validated once against the JSON schema, then frozen dataclasses per section.

`validate(config)` fills the schema's defaults in place and raises `ConfigError` naming the bad
key (as a dotted path), the value and what is allowed. Rules hand each job only its own
experiment's sections as plain dicts through `params:`, so Snakemake's params trigger re-runs
exactly the jobs whose values changed; scripts rebuild the dataclasses from those dicts.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import importlib.machinery
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


RESERVED_NAMES = ("tables", "figures", "logs", "benchmarks")  # folders beside the experiments'


class ConfigError(ValueError):
    """A config value the workflow cannot run with; the message names the key."""


def _with_defaults(validator_class):
    """A validator that fills `default:` values of missing properties before checking them."""
    check_properties = validator_class.VALIDATORS["properties"]

    def properties(validator, props, instance, schema):
        if isinstance(instance, dict):
            for key, sub in props.items():
                if isinstance(sub, dict) and "default" in sub and key not in instance:
                    instance[key] = _copy(sub["default"])
        yield from check_properties(validator, props, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": properties})


def _copy(value):
    return copy.deepcopy(value)  # defaults must not be shared between experiments


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def validate(config: dict, schema_path: Path = SCHEMA_PATH) -> dict:
    """Check `config` against the schema (filling defaults in place) and cross-field rules."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        about = error.schema.get("description", "") if error.absolute_path else ""
        hint = f" ({about.strip()})" if about else ""
        raise ConfigError(f"config key {_dotted(error.absolute_path)}: {error.message}{hint}")
    for name, exp in config["experiments"].items():
        if name in RESERVED_NAMES:
            raise ConfigError(f"config key experiments.{name}: the name is taken by the output folder "
                              f"{config['results']}/{name}/; rename the experiment")
        _check_experiment(name, exp, _builtin_archs(schema))
    return config


def _builtin_archs(schema: dict) -> list[str]:
    """The built-in architectures: the ``const`` of every per-arch block of the schema."""
    blocks = schema["$defs"]["experiment"]["properties"]["model"]["allOf"]
    return [b["if"]["properties"]["arch"]["const"] for b in blocks
            if "const" in b["if"]["properties"]["arch"]]


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _check_model(where: str, model: dict, builtins: list[str]) -> None:
    """A built-in arch, an existing torchvision model or an importable python factory. The
    python check reads the module's source (no import): the callable must be defined at its
    top level."""
    arch, key = model["arch"], f"config key {where}.model.arch"
    kind, _, name = arch.partition(":")
    if arch in builtins:
        return
    if kind == "torchvision" and name:
        import torchvision.models as tvm

        if name not in tvm.list_models():
            raise ConfigError(f"{key}: torchvision has no model {name!r}"
                              f"{_suggest(name, tvm.list_models())}")
        return
    if kind == "python" and name:
        module, _, attr = name.partition(":")
        folder = model.get("path")
        found = importlib.machinery.PathFinder.find_spec(module, [folder] if folder else None)
        found = found or importlib.util.find_spec(module) if not folder else found
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise ConfigError(f"{key}: python module {module!r} not found "
                              + (f"in {folder}" if folder else "on the Python path")
                              + "; set model.path to the directory that holds it")
        tree = ast.parse(Path(found.origin).read_text())
        names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        names += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                  if isinstance(t, ast.Name)]
        if not attr or attr not in names:
            raise ConfigError(f"{key}: {found.origin} defines no {attr!r} at its top level"
                              f"{_suggest(attr, names)}")
        return
    raise ConfigError(f"{key}: {arch!r} is not one of the built-in models {sorted(builtins)}"
                      f"{_suggest(arch, builtins)} (or torchvision:<name>, "
                      "python:<module>:<callable>)")


def _check_experiment(name: str, exp: dict, builtins: list[str] = ()) -> None:
    train = exp["train"]
    where = f"experiments.{name}"
    _check_model(where, exp["model"], list(builtins))
    if "runs" in exp:
        trained = sorted(set(exp["methods"]) - {"naive", "weight_matching", "activation_matching"})
        if trained:
            raise ConfigError(f"config key {where}.methods: {trained} need runs the workflow trains; "
                              "with runs: (your own checkpoints) use naive, weight_matching, "
                              "activation_matching")
        if exp["pairs"] != 1:
            raise ConfigError(f"config key {where}.pairs: runs: names one pair, set pairs: 1")
    if "spawning" in exp["methods"] and not exp["spawn_epoch"] < train["epochs"]:
        raise ConfigError(
            f"config key {where}.spawn_epoch: {exp['spawn_epoch']} must be below "
            f"train.epochs ({train['epochs']}) so that spawned children train after the fork"
        )
    for key in ("milestones", "checkpoint_epochs"):
        late = [e for e in train[key] if e > train["epochs"]]
        if late:
            raise ConfigError(
                f"config key {where}.train.{key}: epochs {late} lie after train.epochs "
                f"({train['epochs']})"
            )
    if train["schedule"] == "multistep" and not train["milestones"]:
        raise ConfigError(f"config key {where}.train.milestones: multistep needs at least one")


# ---------------------------------------------------------------- typed sections for scripts


@dataclass(frozen=True)
class DataSetting:
    name: str = "mnist5k"
    data_dir: str = "data"
    download: bool = False


@dataclass(frozen=True)
class TrainSetting:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    augment: bool = False
    checkpoint_epochs: tuple[int, ...] = ()

    def __post_init__(self):  # lists from YAML/params become tuples: hashable, immutable
        object.__setattr__(self, "milestones", tuple(self.milestones))
        object.__setattr__(self, "checkpoint_epochs", tuple(self.checkpoint_epochs))


@dataclass(frozen=True)
class LmcSetting:
    points: int = 11
    bn: str = "reset"
    batch_size: int = 1000
    policies: tuple[str, ...] = ("interpolate", "reset", "repair")

    def __post_init__(self):
        object.__setattr__(self, "policies", tuple(self.policies))

    @property
    def alphas(self) -> list[float]:
        return [i / (self.points - 1) for i in range(self.points)]


@dataclass(frozen=True)
class LlfcSetting:
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    probe_size: int = 500
    batch_size: int = 100

    def __post_init__(self):
        object.__setattr__(self, "alphas", tuple(self.alphas))


def canonical(value):
    """`value` with every mapping's keys sorted, recursively (lists keep their order).

    Snakemake's params trigger compares params by their repr, and a dict's repr follows its key
    order: without this, the same config with its keys in another order (a tool that sorts
    them, a tidied file, defaults filled after the user's keys) would re-run every job.
    """
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def as_dict(setting) -> dict:
    """Plain dict of a dataclass (tuples as lists), as passed through `params:`."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(setting).items()}


def load_yaml(path: str | Path) -> dict:
    """Read and validate a config file (for notebooks and tests; Snakemake reads its own)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    return validate(yaml.safe_load(path.read_text()) or {})
