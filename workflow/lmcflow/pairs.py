"""How a pair of endpoints is made: a registry of methods.

A method names the two training runs whose final weights are its endpoints and, optionally, an
`align` step applied to them (the permutation methods of Git Re-Basin plug in here). Run names
are paths under results/{experiment}/runs/:
- `seed{s}`: trained from scratch, init seed s and SGD-noise seed s;
- `spawn{s}/parent`: the same as `seed{s}`, stopped at `spawn_epoch`;
- `spawn{s}/child{k}`: the parent's checkpoint (weights and optimizer state) trained to the end
  with SGD-noise seed derive_seed(s, k + 1).
Fine-tuning methods (`lmcflow.finetune`: finetune_same_task, finetune_cross_task and their
`_random` controls) name runs `pretrain` and `finetune/{start}/{task}/run{r}`, chosen from the
experiment's tasks (`pair_runs`).
Federated methods (`lmcflow.federated`) name files of a federated run instead,
`federated/{aggregation}/seed{s}/client{k}` and `.../global` (a Method's `path` says where a
run's file lies under results/{experiment}/): `federated_<aggregation>` pairs clients 0 and 1,
`federated_global_<aggregation>` the global model (A) with client 0 (B), at the last round and,
along training, at the kept rounds.
Pair p of an experiment with base seed S uses s = S + 2p (and S + 2p + 1 for a second
independent run), so pairs never share a run within a method. naive, weight_matching and
activation_matching share the same two independent runs: the permutation methods differ from
naive only by their alignment of B.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable



@dataclass(frozen=True)
class Method:
    name: str
    endpoints: Callable[[int, int], tuple[str, str]]  # (base seed, pair index) -> runs of A and B
    description: str
    # (run_a, run_b, setting, device, log) -> (state of π(B), extra info incl. "permutation")
    align: Callable | None = None
    # run name -> its file under results/{experiment}/
    path: Callable[[str], str] = lambda run: f"runs/{run}/final.pt"
    # (experiment's config, pair index) -> runs of A and B, for methods whose runs depend on
    # more than the base seed (fine-tuning: the tasks); replaces `endpoints` where given
    experiment_endpoints: Callable[[dict, int], tuple[str, str]] | None = None


def pair_runs(method: Method, exp: dict, pair: int) -> tuple[str, str]:
    """The run names of a pair's endpoints A and B."""
    if method.experiment_endpoints is not None:
        return method.experiment_endpoints(exp, pair)
    return method.endpoints(exp["seed"], pair)


def independent_runs(seed: int, pair: int) -> tuple[str, str]:
    return f"seed{seed + 2 * pair}", f"seed{seed + 2 * pair + 1}"


def spawned_runs(seed: int, pair: int) -> tuple[str, str]:
    return f"spawn{seed + 2 * pair}/child0", f"spawn{seed + 2 * pair}/child1"


def _aligned(matcher: str) -> Callable:
    """The align step of a permutation method: rebuild both models, check that the permutation
    spec keeps A's function (a seeded random permutation through it changes no output;
    otherwise the job stops naming the tensor that breaks it), match B to A with
    ``alignment.MATCHERS[matcher]``, apply π to B."""

    def align(run_a, run_b, setting, device="cpu", log=print) -> tuple[dict, dict]:
        import torch

        from . import jobs
        from .alignment import MATCHERS, apply_permutation, check_equivalence, permutation_spec

        model_a, model_b = jobs.build(run_a["spec"], device), jobs.build(run_b["spec"], device)
        model_a.load_state_dict(run_a["model"])
        model_b.load_state_dict(run_b["model"])
        spec = permutation_spec(model_a)
        example = torch.randn(4, *model_a.in_shape, generator=torch.Generator().manual_seed(0))
        check = check_equivalence(model_a, spec, example.to(device))
        log(f"permutation spec: {len(spec.groups)} groups; a random permutation through it keeps "
            f"the outputs (max relative change {check['max_rel_error']:.1e})")
        data = lambda: jobs.load_dataset(**setting["data"])  # noqa: E731
        perm, info = MATCHERS[matcher].match(spec, model_a, model_b, setting["matching"], data,
                                             device, log)
        state_b = apply_permutation(spec, perm,
                                    {k: v.to(device) for k, v in run_b["model"].items()})
        log(f"matched {len(perm)} groups: objective {info['objective']:.6g}, "
            f"sweeps {info['sweeps']}")
        extra = {"objective": float(info["objective"]), "sweeps": int(info["sweeps"]),
                 "permutation": {g: p.tolist() for g, p in perm.items()}}
        return {k: v.cpu() for k, v in state_b.items()}, extra

    return align


METHODS: dict[str, Method] = {
    "naive": Method("naive", independent_runs,
                    "two networks trained independently, interpolated as they are "
                    "(negative control)"),
    "spawning": Method("spawning", spawned_runs,
                       "two children forked from one parent at spawn_epoch, different SGD noise"),
    "weight_matching": Method("weight_matching", independent_runs,
                              "the naive pair with B's units permuted to match A's weights",
                              _aligned("weight")),
    "activation_matching": Method("activation_matching", independent_runs,
                                  "the naive pair with B's units permuted to match A's activations",
                                  _aligned("activation")),
}
FEDERATED = "federated"


def federated_run(aggregation: str, seed: int) -> str:
    return f"{FEDERATED}/{aggregation}/seed{seed}"


def _federated_method(aggregation: str, with_global: bool) -> Method:
    def endpoints(seed: int, pair: int) -> tuple[str, str]:
        run = federated_run(aggregation, seed + 2 * pair)
        return (f"{run}/global", f"{run}/client0") if with_global else \
            (f"{run}/client0", f"{run}/client1")

    what = "the global model and client 0" if with_global else "clients 0 and 1"
    name = f"{FEDERATED}_global_{aggregation}" if with_global else f"{FEDERATED}_{aggregation}"
    return Method(name, endpoints, f"{what} of a federated run ({aggregation} aggregation), "
                  "clients before the round's aggregation", path=lambda run: f"{run}.pt")


for _agg in ("full", "layers", "aligned"):
    for _global in (False, True):
        _m = _federated_method(_agg, _global)
        METHODS[_m.name] = _m
FEDERATED_METHODS = [name for name in METHODS if name.startswith(f"{FEDERATED}_")]


def _finetune_method(name: str) -> Method:
    from . import finetune_plan as finetune

    kind, start = finetune.parse_method(name)
    what = ("two fine-tunings of one task with different seeds (model soup)" if kind == "same_task"
            else "fine-tunings of two different tasks (cross-task linearity)")
    origin = "the pretrained model" if start == "pretrained" else \
        "the pretrained model's random initialisation (the control)"
    return Method(name, lambda seed, pair: (_no_seed_endpoints(name)),
                  f"{what}, from {origin}",
                  experiment_endpoints=lambda exp, pair: finetune.pair_runs(exp, name, pair))


def _no_seed_endpoints(name: str):
    raise ValueError(f"{name}: its runs depend on the experiment's tasks; use pairs.pair_runs")


for _name in ("finetune_same_task", "finetune_cross_task", "finetune_same_task_random",
              "finetune_cross_task_random"):
    METHODS[_name] = _finetune_method(_name)
FINETUNE_METHODS = [name for name in METHODS if name.startswith("finetune_")]
PERMUTATION_METHODS = [name for name, m in METHODS.items() if m.align is not None]


def endpoint_hint(where: str, key: str, path: str) -> str:
    """What to do about an endpoint file the user brings (the workflow cannot remake it)."""
    return (f"replace {path} with a checkpoint of the configured model (config key "
            f"{where}.runs.{key} points at it), or point that key at another file")


def check_endpoint_files(name: str, exp: dict) -> None:
    """Start-up check of the endpoint files an experiment names (``runs:``): each must exist, be
    readable, and, if this workflow trained it (its ``final.pt`` stores its model spec), be of
    the configured model. Raises ConfigError naming the file, the experiment, both models and
    what to change. (Whether a plain state dict fits the model is checked by the pair's job,
    which builds the model.)"""
    from .config import ConfigError
    from .training import load_run

    where, model = f"experiments.{name}", exp["model"]
    _check_present([(f"{where}.runs.{key}", path) for key, path in exp["runs"].items()])
    for key, path in exp["runs"].items():
        try:
            spec = load_run(path, hint=endpoint_hint(where, key, path)).get("spec")
        except ValueError as err:
            raise ConfigError(f"config key {where}.runs.{key}: {err}") from None
        if spec is None:
            continue
        stored = {"arch": spec["arch"], **spec["args"]}
        if _architecture(stored) != _architecture(model):
            raise ConfigError(
                f"config key {where}.runs.{key}: {path} holds {_article(_describe(stored))}, but "
                f"experiment {name} is configured for {_article(_describe(model))}; to compare "
                f"these files set "
                f"{where}.model to {_architecture(stored)}, or point {where}.runs.{key} at a "
                f"checkpoint of {model['arch']}")


def _check_present(files: list[tuple[str, str]]) -> None:
    """Raise ConfigError naming every (config key, path) whose file does not exist."""
    from .config import ConfigError

    missing = [(key, path) for key, path in files if not Path(path).is_file()]
    if missing:
        lines = "\n".join(f"  config key {key}: {path}" for key, path in missing)
        raise ConfigError(f"{len(missing)} checkpoint file(s) the config points at do not exist:\n"
                          f"{lines}\nput your checkpoints there or change the paths")


def check_finetune_files(name: str, exp: dict) -> None:
    """Start-up check of the files an experiment brings for fine-tuning (pretrain.checkpoint,
    finetune.tasks.<task>.checkpoints): each must exist, be readable and hold the configured
    model — a file of this workflow by its stored spec, a plain state dict by building the model
    (for datasets of known image shape) and comparing keys and shapes. Raises ConfigError naming
    the key, the file and what to change."""
    from .config import ConfigError

    where = f"experiments.{name}"
    files = [("pretrain.checkpoint", exp["pretrain"]["checkpoint"])] \
        if "checkpoint" in exp["pretrain"] else []
    for task, setting in exp["finetune"]["tasks"].items():
        files += [(f"finetune.tasks.{task}.checkpoints[{i}]", f)
                  for i, f in enumerate((setting or {}).get("checkpoints") or [])]
    _check_present([(f"{where}.{key}", path) for key, path in files])
    model = None
    for key, path in files:
        hint = (f"replace {path} with a checkpoint of the configured model (config key "
                f"{where}.{key} points at it), or point that key at another file")
        from .training import check_fits, load_run

        try:
            run = load_run(path, hint=hint)
        except ValueError as err:
            raise ConfigError(f"config key {where}.{key}: {err}") from None
        spec = run.get("spec")
        if spec is not None:
            stored = {"arch": spec["arch"], **spec["args"]}
            if _architecture(stored) != _architecture(exp["model"]):
                raise ConfigError(
                    f"config key {where}.{key}: {path} holds {_article(_describe(stored))}, but "
                    f"experiment {name} is configured for {_article(_describe(exp['model']))}; "
                    f"set {where}.model to "
                    f"{_architecture(stored)}, or point {where}.{key} at a checkpoint of "
                    f"{exp['model']['arch']}")
            continue
        model = model or _configured_model(exp)
        if model is None:
            continue
        try:
            check_fits(run["model"], model, path, f"{exp['model']['arch']}, the model of "
                       f"experiment {name}", f"{hint}; or set {where}.model to the architecture "
                       "the file holds")
        except ValueError as err:
            raise ConfigError(f"config key {where}.{key}: {err}") from None


def _configured_model(exp: dict):
    """The experiment's model, built for its dataset's image shape (None where that is only
    known from the data: imagefolder)."""
    from .config import IMAGE_SHAPES
    from .models import build_model

    shape = IMAGE_SHAPES.get(exp["data"]["name"])
    if shape is None:
        return None
    return build_model(exp["model"]["arch"], shape, 10,
                       **{k: v for k, v in exp["model"].items() if k != "arch"})


def _architecture(model: dict) -> dict:
    """What fixes a model's weights: arch and arguments (not which layers the analyses read)."""
    return {k: v for k, v in sorted(model.items()) if k not in ("feature_layers", "layer_groups")}


def _article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _describe(model: dict) -> str:
    args = ", ".join(f"{k}={v}" for k, v in _architecture(model).items() if k != "arch")
    return f"{model['arch']} ({args})" if args else model["arch"]


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def pair_name(index: int) -> str:
    return f"pair{index}"


def pair_index(name: str) -> int:
    if not name.startswith("pair") or not name[4:].isdigit():
        raise ValueError(f"pair names look like pair0, pair1, ...; got {name!r}")
    return int(name[4:])
