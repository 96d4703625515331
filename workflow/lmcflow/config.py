"""Configuration: validated once against the JSON schema, then frozen dataclasses per section.

`validate(config)` first expands every experiment's `sweep:` grid into one experiment per point
(`expand_sweeps`), then fills the schema's defaults in place and raises `ConfigError` naming the
bad key (as a dotted path), the value and what is allowed. Rules hand each job only its own
experiment's sections as plain dicts through `params:`, so Snakemake's params trigger re-runs
exactly the jobs whose values changed; scripts rebuild the dataclasses from those dicts.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import itertools
import re
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
    """Expand sweeps, check `config` against the schema (filling defaults in place) and
    cross-field rules. An error in a sweep's point names the sweep's key
    (``experiments.<name>.sweep.<key>``) or the experiment as written (``experiments.<name>``)."""
    schema = yaml.safe_load(Path(schema_path).read_text())
    origins: dict[str, tuple[str, dict]] = {}
    if isinstance(config.get("experiments"), dict):
        config["experiments"], origins = expand_sweeps(config["experiments"])
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(_explain(error, lambda path: _origin(path, origins)))
    for name, exp in config["experiments"].items():
        if name in RESERVED_NAMES:
            raise ConfigError(f"config key experiments.{name}: the name is taken by the output folder "
                              f"{config['results']}/{name}/; rename the experiment")
        try:
            _check_experiment(name, exp, _builtin_archs(schema))
            _check_finetune(f"experiments.{name}", exp, schema)
        except ConfigError as err:
            if name not in origins:
                raise
            raise ConfigError(f"{err} (in {name}, a point of experiments.{origins[name][0]}.sweep)"
                              ) from None
    return config


# ---------------------------------------------------------------- sweeps

SWEEP_TOKEN = re.compile(r"[^A-Za-z0-9.-]")  # characters a value may not bring into a name
NOT_SWEPT = ("sweep", "family", "swept")  # keys of an experiment that a sweep cannot set


def expand_sweeps(experiments: dict) -> tuple[dict, dict]:
    """Experiments with every ``sweep:`` grid replaced by one experiment per point.

    ``sweep`` maps dotted setting keys (``model.width``, ``seed``, ``train.lr``) to lists of
    values (numbers, strings, booleans); the points are every combination. A key's values may
    instead be a mapping value -> {dotted key: setting}: settings that go with that value (a
    smaller probe set for a wider network). A point is named
    ``<name>_<label><value>[_<label><value>…]``, keys in sorted order (so the order in the
    file does not matter), label = the key's last part (the whole key, dots as '-', where two
    swept keys share it), value as written (floats in their shortest form, booleans
    true/false, in strings every character but letters, digits, '.' and '-' replaced by '-').
    Each point also gets ``family`` (the sweep's name, unless the experiment sets one) and
    ``swept`` ({key: value}), the tables' columns. Returns the experiments in their order and,
    per point, (the sweep's name, {key path: config key}) for naming errors.
    """
    explicit = {n for n, e in experiments.items() if not (isinstance(e, dict) and "sweep" in e)}
    expanded: dict = {}
    origins: dict[str, tuple[str, dict]] = {}
    for name, exp in experiments.items():
        if name in explicit:
            expanded[name] = exp
            continue
        for point, setting, where in _sweep_points(name, exp):
            if point in explicit or point in expanded:
                raise ConfigError(f"config key experiments.{name}.sweep: its point {point} is also "
                                  f"the name of another experiment; rename one of them")
            expanded[point], origins[point] = setting, (name, where)
    return expanded, origins


def _sweep_points(name: str, exp: dict):
    """(point name, its experiment, {key path: config key}) for every point of ``exp``'s grid."""
    where = f"experiments.{name}.sweep"
    grid = exp["sweep"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"config key {where}: a sweep maps setting keys (dotted, e.g. "
                          f"model.width) to lists of values; got {grid!r}")
    keys = sorted(grid, key=str)
    axes = [_sweep_axis(f"{where}.{key}", key, grid[key]) for key in keys]
    labels = _sweep_labels(keys)
    base = {k: v for k, v in exp.items() if k != "sweep"}
    names: dict[str, tuple] = {}
    for combo in itertools.product(*axes):
        point, paths = copy.deepcopy(base), {}
        for key, (value, settings) in zip(keys, combo):
            paths[_set(point, key, value, f"{where}.{key}", paths)] = f"{where}.{key}"
            for skey, setting in settings.items():
                at = f"{where}.{key}.{_token(value)}.{skey}"
                paths[_set(point, skey, setting, at, paths)] = at
        values = {key: value for key, (value, _) in zip(keys, combo)}
        pname = "_".join([name, *(f"{labels[k]}{_token(v)}" for k, v in values.items())])
        if pname in names:
            raise ConfigError(f"config key {where}: the points {names[pname]} and "
                              f"{tuple(values.values())} would both be named {pname}; "
                              "use values that differ in letters, digits, '.' or '-'")
        names[pname] = tuple(values.values())
        point.setdefault("family", name)
        point["swept"] = values
        yield pname, point, paths


def _sweep_axis(where: str, key, values) -> list[tuple]:
    """[(value, {dotted key: setting that goes with it}), …] of one swept key."""
    parts = key.split(".") if isinstance(key, str) else []
    if not parts or not all(parts) or parts[0] in NOT_SWEPT:
        raise ConfigError(f"config key {where}: not a setting a sweep can set; keys are dotted "
                          "paths such as model.width, seed, train.lr")
    settings = {}
    if isinstance(values, dict):  # value -> settings of the points with that value
        settings, values = values, list(values)
    if not isinstance(values, list) or not values:
        raise ConfigError(f"config key {where}: {values!r} is not a list of values "
                          "(e.g. [1, 2, 4])")
    for i, value in enumerate(values):
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ConfigError(f"config key {where}: {value!r} is not a number, string or boolean "
                              "(a point is named after its values)")
        if value in values[:i]:
            raise ConfigError(f"config key {where}: {value!r} is listed twice")
        extra = settings.get(value) or {}
        if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
            raise ConfigError(f"config key {where}.{_token(value)}: the settings that go with a "
                              f"value are a mapping of dotted keys to values; got {extra!r}")
    return [(v, settings.get(v) or {}) for v in values]


def _sweep_labels(keys: list[str]) -> dict[str, str]:
    """Each swept key's label in point names: its last part, or the whole key (dots as '-')
    where two keys share their last part."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (k.replace(".", "-") if last.count(t) > 1 else t) for k, t in zip(keys, last)}


def _token(value) -> str:
    """A swept value as it appears in an experiment name (a path component and a wildcard)."""
    if value is None or isinstance(value, bool):
        text = {None: "none", True: "true", False: "false"}[value]
    elif isinstance(value, float):
        text = f"{value:g}" if float(f"{value:g}") == value else repr(value)
    else:
        text = str(value)
    return SWEEP_TOKEN.sub("-", text)


def _set(exp: dict, key: str, value, where: str, taken: dict) -> tuple:
    """Set the dotted ``key`` of ``exp`` to ``value`` (mappings on the way created); returns its
    path. ``taken``: paths already set for this point (a key set twice is refused)."""
    path = tuple(key.split("."))
    if not all(path) or path[0] in NOT_SWEPT:
        raise ConfigError(f"config key {where}: not a setting a sweep can set; keys are dotted "
                          "paths such as llfc.probe_size")
    if path in taken:
        raise ConfigError(f"config key {where}: {key} is already set by {taken[path]}")
    node = exp
    for i, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {where}: {'.'.join(path[:i + 1])} is not a mapping")
    node[path[-1]] = copy.deepcopy(value)
    return path


def _origin(path: list, origins: dict) -> str:
    """The config key the user wrote for the key ``path`` of the expanded config: in a sweep's
    point, the sweep's key that set it (``experiments.<sweep>.sweep.<key>``), else the key in
    the experiment as written (``experiments.<sweep>.<key>``)."""
    if len(path) < 2 or path[0] != "experiments" or path[1] not in origins:
        return _dotted(path)
    name, paths = origins[path[1]]
    rest = tuple(str(p) for p in path[2:])
    for key, where in paths.items():
        if rest[:len(key)] == key:
            return ".".join([where, *rest[len(key):]])
        if key[:len(rest)] == rest and rest:  # an error at a mapping on the way (unknown key)
            return where
    return _dotted(["experiments", name, *rest])


def _explain(error: jsonschema.ValidationError, name=_dotted) -> str:
    """A schema error in the user's words: the key as a dotted path (``name(path)``), an unknown
    key with the close matches among the keys allowed there, a range as the interval it is."""
    key, schema, value = name(list(error.absolute_path)), error.schema, error.instance
    if error.validator == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        unknown = sorted(set(value) - set(allowed))
        where = name([*error.absolute_path, unknown[0]])
        return (f"config key {where}: unknown key{_suggest(unknown[0], allowed)} "
                f"(keys allowed here: {', '.join(allowed)})")
    if error.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"config key {key}: {value!r} is out of range; it must be {_interval(schema)}"
    message = error.message
    if error.validator == "enum" and isinstance(value, str):
        message += _suggest(value, [str(v) for v in error.validator_value])
    about = schema.get("description", "") if error.absolute_path else ""
    hint = f" ({about.strip()})" if about else ""
    return f"config key {key}: {message}{hint}"


def _interval(schema: dict) -> str:
    """The allowed range of a number as words: 'strictly between 0 and 1', 'at least 1', ..."""
    low = ("strictly above", schema["exclusiveMinimum"]) if "exclusiveMinimum" in schema else \
        ("at least", schema["minimum"]) if "minimum" in schema else None
    high = ("strictly below", schema["exclusiveMaximum"]) if "exclusiveMaximum" in schema else \
        ("at most", schema["maximum"]) if "maximum" in schema else None
    if low and high:
        strict = low[0].startswith("strictly") and high[0].startswith("strictly")
        inclusive = not low[0].startswith("strictly") and not high[0].startswith("strictly")
        if strict or inclusive:
            return f"{'strictly ' if strict else ''}between {low[1]} and {high[1]}" + \
                ("" if strict else " (both included)")
        return f"{low[0]} {low[1]} and {high[0]} {high[1]}"
    return " ".join(str(w) for w in (low or high))


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
        _check_kwargs(where, model, _torchvision_parameters(tvm.get_model_builder(name)))
        return
    if kind == "timm" and name:
        try:
            import timm
        except ImportError:
            from .models import TIMM_MISSING

            raise ConfigError(f"{key}: {arch} {TIMM_MISSING}") from None
        if not timm.is_model(name):
            raise ConfigError(f"{key}: timm has no model {name!r}"
                              f"{_suggest(name, timm.list_models())}")
        _check_kwargs(where, model, _timm_parameters(timm, name))
        return
    if kind == "python" and name:
        module, _, attr = name.partition(":")
        origin = python_model_source(model, where)
        tree = ast.parse(Path(origin).read_text())
        defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names = [*defs, *(t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                          if isinstance(t, ast.Name))]
        if not attr or attr not in names:
            raise ConfigError(f"{key}: {origin} defines no {attr!r} at its top level"
                              f"{_suggest(attr, names)}")
        if attr in defs:
            _check_kwargs(where, model, _ast_parameters(defs[attr]))
        return
    raise ConfigError(f"{key}: {arch!r} is not one of the built-in models {sorted(builtins)}"
                      f"{_suggest(arch, builtins)} (or torchvision:<name>, timm:<name>, "
                      "python:<module>:<callable>)")


def python_model_source(model: dict, where: str = "experiments.<name>") -> str:
    """The source file of a ``python:<module>:<callable>`` model: ``<module>.py`` (or a package's
    ``__init__.py``) in the folder ``model.path``, else on the Python path. Found without
    importing it, so a broken or slow module cannot stop the start-up check."""
    module = model["arch"].split(":")[1]
    folder = model.get("path")
    key = f"config key {where}.model"
    if folder and Path(folder).is_file():
        raise ConfigError(f"{key}.path: {folder} is a file; path is the folder that holds "
                          f"{module}.py: set path: {Path(folder).parent or '.'}")
    if folder and not Path(folder).is_dir():
        raise ConfigError(f"{key}.path: the folder {folder} does not exist (relative paths start "
                          "from the directory you run snakemake in)")
    found = importlib.machinery.PathFinder.find_spec(module, [folder] if folder else None)
    found = found or importlib.util.find_spec(module) if not folder else found
    if found is None or not found.origin or not found.origin.endswith(".py"):
        raise ConfigError(f"{key}.arch: python module {module!r} not found "
                          + (f"in {folder}" if folder else "on the Python path")
                          + "; set model.path to the folder that holds it")
    return found.origin


def python_model_files(model: dict) -> list[str]:
    """The files a ``python:`` model's code lies in: its module and, recursively, every module of
    the same folder that it imports (``import helpers``, ``from helpers import x``, ``from . import
    x``). Editing any of them changes the model, so the jobs that build it depend on them all."""
    first = Path(python_model_source(model))
    folder, todo, seen = first.parent, [first], []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.append(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or "", *(a.name for a in node.names)] \
                if isinstance(node, ast.ImportFrom) else []
            for name in names:
                top = name.split(".")[0]
                for candidate in (folder / f"{top}.py", folder / top / "__init__.py"):
                    if top and candidate.is_file():
                        todo.append(candidate)
    return sorted(_relative(f) for f in seen)


def _relative(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (results then do not
    depend on where the project folder is), else absolute."""
    path, here = path.resolve(), Path.cwd().resolve()
    return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)


def _ast_parameters(node) -> list[str] | None:
    """Keyword parameters a top-level function or class (its own ``__init__``) takes; None when
    it takes any (``**kwargs``) or the class inherits its constructor."""
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
                    None)
        if init is None:
            return None
        node = init
    args = node.args
    if args.kwarg is not None:
        return None
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg != "self"]


def _torchvision_parameters(builder) -> list[str] | None:
    """Keyword arguments a torchvision builder passes on: its own and those of the class it
    returns (builders take ``**kwargs`` for the class's constructor)."""
    import inspect

    own = [p for p in inspect.signature(builder).parameters.values() if p.kind != p.VAR_KEYWORD]
    cls = inspect.signature(builder).return_annotation
    if not isinstance(cls, type):
        return None
    init = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in init):
        return None
    return [p.name for p in own if p.name != "weights"] + [p.name for p in init if p.name != "self"]


def _timm_parameters(timm, name: str) -> list[str] | None:
    """Keyword arguments a timm model takes: those of the class ``create_model`` returns (built
    on the meta device: no memory, no weights), without ``pretrained`` (models are built
    untrained); None (any) when its constructor takes ``**kwargs`` or it cannot be built so."""
    import inspect

    import torch

    try:
        with torch.device("meta"):
            cls = type(timm.create_model(name, pretrained=False))
    except Exception:
        return None
    init = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in init):
        return None
    return [p.name for p in init if p.name not in ("self", "pretrained")]


def _check_kwargs(where: str, model: dict, accepted: list[str] | None) -> None:
    """Refuse a ``kwargs`` key the model's factory does not take (None: it takes any)."""
    unknown = sorted(set(model.get("kwargs") or {}) - set(accepted or ()))
    if accepted is not None and unknown:
        raise ConfigError(f"config key {where}.model.kwargs.{unknown[0]}: {model['arch']} takes no "
                          f"argument {unknown[0]!r}{_suggest(unknown[0], accepted)} "
                          f"(it takes: {', '.join(accepted)})")


def _check_experiment(name: str, exp: dict, builtins: list[str] = ()) -> None:
    train = exp["train"]
    where = f"experiments.{name}"
    _check_model(where, exp["model"], list(builtins))
    if "runs" in exp:
        trained = sorted(set(exp["methods"]) - {"naive", "weight_matching", "activation_matching",
                                                 "commutativity_matching"})
        if trained:
            raise ConfigError(f"config key {where}.methods: {trained} need runs the workflow trains; "
                              "with runs: (your own checkpoints) use naive, weight_matching, "
                              "activation_matching, commutativity_matching")
        if exp["pairs"] != 1:
            raise ConfigError(f"config key {where}.pairs: runs: names one pair, set pairs: 1")
        if exp["merge"]["k"]:
            raise ConfigError(f"config key {where}.merge.k: merging needs runs the workflow "
                              "trains (seed{s}); runs: brings two files")
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
    _check_federated(where, exp)


# fewest training samples of a class, per dataset (imagefolder: checked by the job)
MIN_CLASS_SAMPLES = {"mnist5k": 400, "mnist": 5421, "fashion_mnist": 6000, "cifar10": 5000}
IMAGE_SHAPES = {"mnist5k": (1, 28, 28), "mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28),
                "cifar10": (3, 32, 32)}


def merge_runs(exp: dict) -> list[str]:
    """The independent runs an experiment's merges need: seed{S}..seed{S + max(k) - 1}."""
    k = max(exp["merge"]["k"], default=0)
    return [f"seed{exp['seed'] + i}" for i in range(k)]


def federated_aggregations(exp: dict) -> list[str]:
    """The aggregations whose federated runs an experiment's methods need (federated_<agg>,
    federated_global_<agg>), in a fixed order."""
    wanted = {m.rpartition("_")[2] for m in exp["methods"] if m.startswith("federated_")}
    return [a for a in ("full", "layers", "aligned") if a in wanted]


def _check_federated(where: str, exp: dict) -> None:
    aggregations = federated_aggregations(exp)
    if not aggregations:
        return
    fed, epochs, key = exp["federated"], exp["train"]["epochs"], f"config key {where}.federated"
    if epochs % fed["local_epochs"]:
        raise ConfigError(f"{key}.local_epochs: {fed['local_epochs']} does not divide "
                          f"train.epochs ({epochs}); rounds are train.epochs / local_epochs")
    rounds = epochs // fed["local_epochs"]
    late = sorted(r for r in fed["keep_rounds"] if r > rounds)
    if late:
        raise ConfigError(f"{key}.keep_rounds: rounds {late} lie after the last of the "
                          f"{rounds} rounds (train.epochs / local_epochs)")
    fewest = MIN_CLASS_SAMPLES.get(exp["data"]["name"])
    if fed["shards"] == "dirichlet" and fewest is not None and fed["clients"] > fewest:
        raise ConfigError(f"{key}.clients: {fed['clients']} clients, but a class of "
                          f"{exp['data']['name']} has only {fewest} training samples; non-IID "
                          "(dirichlet) shards need at most that many clients")
    if "layers" in aggregations and not fed["layers"]:
        methods = [m for m in exp["methods"] if m.endswith("_layers")]
        raise ConfigError(f"{key}.layers: methods {methods} average a subset of layer "
                          "groups; list them here")
    # the names themselves need the model: lmcflow.federated.check_layer_names, at start-up


def finetune_methods(exp: dict) -> list[str]:
    return [m for m in exp["methods"] if m.startswith("finetune_")]


def _check_finetune(where: str, exp: dict, schema: dict) -> None:
    """Tasks exist, each task's merged training setting is valid (filled in as its ``train``),
    the methods have the tasks and runs their pairs need, and files a user brings come with the
    pretrained model they were fine-tuned from."""
    from .finetune_plan import most_pairs, parse_method
    from .tasks import check_task

    fine, key = exp["finetune"], f"config key {where}"
    for task_key, name in [("pretrain.task", exp["pretrain"]["task"]),
                           *((f"finetune.tasks.{t}", t) for t in fine["tasks"])]:
        try:
            check_task(name)
        except ValueError as err:
            raise ConfigError(f"{key}.{task_key}: {err}") from None
    train_schema = schema["$defs"]["experiment"]["properties"]["train"]
    validator = _with_defaults(jsonschema.Draft202012Validator)(train_schema)
    for task, setting in fine["tasks"].items():
        setting = fine["tasks"][task] = dict(setting or {})
        merged = {**copy.deepcopy(fine["train"]), **setting.get("train", {})}
        error = jsonschema.exceptions.best_match(validator.iter_errors(merged))
        if error is not None:
            path = ".".join(str(p) for p in error.absolute_path)
            raise ConfigError(f"{key}.finetune.tasks.{task}.train{'.' + path if path else ''}: "
                              f"{error.message}")
        setting["train"] = merged
        if setting.get("checkpoints") and "checkpoint" not in exp["pretrain"]:
            raise ConfigError(
                f"{key}.finetune.tasks.{task}.checkpoints: fine-tuned files need the pretrained "
                f"model they were fine-tuned from (task vectors are θ_i − θ_0): set "
                f"{where}.pretrain.checkpoint to that file")
    for name in ("train", *(f"tasks.{t}.train" for t in fine["tasks"])):
        train = fine["train"] if name == "train" else fine["tasks"][name.split(".")[1]]["train"]
        late = [e for e in (*train["milestones"], *train["checkpoint_epochs"]) if e > train["epochs"]]
        if late:
            raise ConfigError(f"{key}.finetune.{name}: epochs {late} lie after its epochs "
                              f"({train['epochs']})")
    methods = finetune_methods(exp)
    if not methods:
        return
    if not fine["tasks"]:
        raise ConfigError(f"{key}.finetune.tasks: methods {methods} fine-tune named tasks; list "
                          "at least one (two for finetune_cross_task), e.g. tasks: {rotated: {}, "
                          "inverted: {}}")
    own = sorted(t for t, s in fine["tasks"].items() if s.get("checkpoints"))
    randoms = [m for m in methods if m.endswith("_random")]
    if own and randoms:
        raise ConfigError(f"{key}.methods: {randoms} fine-tune from a random initialisation, which "
                          f"the files of finetune.tasks ({', '.join(own)}) cannot give; drop them")
    for method in methods:
        kind, _ = parse_method(method)
        if kind == "cross_task" and len(fine["tasks"]) < 2:
            raise ConfigError(f"{key}.finetune.tasks: {method} pairs fine-tunings of two different "
                              "tasks; list at least two")
        most = most_pairs(exp, method)
        if exp["pairs"] > most:
            what = ("two fine-tunings of a task per pair" if kind == "same_task"
                    else "one fine-tuning of each task per pair")
            raise ConfigError(f"{key}.pairs: {exp['pairs']} pairs of {method}, but the tasks' "
                              f"runs give {most} ({what}); lower pairs or raise finetune.runs")


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
    precision: str = "fp32"
    channels_last: bool = False
    warmup_steps: int = 0

    def __post_init__(self):  # lists from YAML/params become tuples: hashable, immutable
        object.__setattr__(self, "milestones", tuple(self.milestones))
        object.__setattr__(self, "checkpoint_epochs", tuple(self.checkpoint_epochs))


@dataclass(frozen=True)
class LmcSetting:
    points: int = 11
    bn: str = "reset"
    batch_size: int = 1000
    policies: tuple[str, ...] = ("interpolate", "reset", "repair")
    repair_logits: bool = False

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
    stored_samples: int = 500
    first_feature: str = "stem"

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


def describe_params_change(before, now) -> str:
    """The keys that differ between a job's recorded params and its new ones, e.g.
    ``llfc.probe_size: 500 -> 400``. ``before`` and ``now`` are the reprs of the params that
    differ (as Snakemake records them); mappings are compared key by key, so a change of one
    setting names that setting, not the whole dictionary around it."""
    old, new = _flat_params(before), _flat_params(now)
    missing = "(unset)"
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
    return "; ".join(f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}" for k in keys)


def _flat_params(reprs) -> dict[str, str]:
    """Dotted key -> repr of the leaves of every mapping among the params' reprs (a param that
    is not a mapping is one leaf, keyed by its position)."""
    flat: dict[str, str] = {}

    def walk(prefix, value):
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = repr(value)

    for i, text in enumerate(sorted(reprs)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        walk("" if isinstance(value, dict) else f"param{i}", value)
    return flat


def as_dict(setting) -> dict:
    """Plain dict of a dataclass (tuples as lists), as passed through `params:`."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(setting).items()}


def load_yaml(path: str | Path) -> dict:
    """Read and validate a config file (for notebooks and tests; Snakemake reads its own)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    return validate(yaml.safe_load(path.read_text()) or {})
