"""Federated averaging (McMahan et al. 2017) as the layer-wise LMC paper runs it (official
``LLMC/federated_train.py``): K clients start from one initialisation, each trains on its own
shard of the training split, and every E local epochs the weights are averaged in proportion to
the shard sizes.

Aggregations (``AGGREGATIONS``):
- ``full``: every floating tensor (BatchNorm running statistics included, see ``bn``) is
  averaged and every client continues from the average, the global model.
- ``layers``: only the listed layer groups (``lmcflow.layerwise.layer_groups`` names) are
  averaged; every client keeps its own values of the others (the official ``layer_avg``,
  personalised). The global model of a round is then the average of *every* tensor of the
  clients, a model that no client holds (evaluated and kept for the ``federated_global_layers``
  pair, never sent to the clients).
- ``aligned`` (beyond the paper): each client is permuted to the current global model by weight
  matching (``lmcflow.alignment``; its momentum buffers with it) before ``full`` averaging.

Conventions:
- Round r = 1..R, R = train.epochs / E. Client k *at round r* is its weights at the end of its
  local epochs of round r, before that round's aggregation (after a ``full`` aggregation all
  clients are equal, so this is where two clients differ); the global model at round r is that
  round's average. Round 0 is the common initialisation.
- Client k trains epoch (r − 1)·E + e of the run with ``lmcflow.training.train_epoch`` on a
  ``Data`` view holding its shard (the same hot loop as every run); its SGD noise seed is
  ``derive_seed(seed, NOISE_KEY, k)``, so the lr schedule and warm-up follow the run's epochs,
  and a client's optimizer (momentum) persists across rounds, as in the official code.
- Shards are sorted index sets of the training split (``make_shards``): a single client's shard
  is the whole split in its order, so K = 1, E = 1 is plain training, bit for bit.
- Averages are Σ_k n_k θ_k / Σ_k n_k accumulated in float64 (exact for identical clients);
  ``num_batches_tracked`` (an integer) is never averaged: each client keeps its own, the global
  model takes client 0's. ``bn: local`` leaves every client its own BatchNorm running statistics.
- After every round a checkpoint holds every client's weights and optimizer state, the global
  model and the metrics so far (the newest one is kept), and the rounds of ``keep_rounds`` (and
  the last) keep the clients' and global weights in ``kept/``: a killed run resumes from its
  newest checkpoint to the same final weights.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .config import TrainSetting
from .data import Data, sample_order
from .io import load_torch, save_torch
from .seeds import derive_seed
from .training import _prune, evaluate, latest_checkpoint, make_optimizer, train_epoch

AGGREGATIONS = ("full", "layers", "aligned")
NOISE_KEY, SHARD_KEY = 3, 4  # derive_seed(seed, KEY, ...): client noise, shard draws
GLOBAL = "global"


def client_noise_seed(seed: int, client: int) -> int:
    return derive_seed(seed, NOISE_KEY, client)


# ------------------------------------------------------------------------------------ shards


def make_shards(labels: Tensor, clients: int, kind: str = "iid", beta: float = 0.5,
                seed: int = 0, min_size: int = 1) -> list[Tensor]:
    """Split the training indices into ``clients`` disjoint shards covering all of them, each
    sorted (so a Data view keeps the split's order).

    ``iid``: a seeded random order cut into near-equal parts. ``dirichlet``: for every class,
    its samples in a seeded random order cut by proportions p ~ Dirichlet(β·1_K) over the
    clients; the whole draw is repeated (same generator) until every client has ``min_size``
    samples, as the usual non-IID partitioners (PFL-Non-IID) do."""
    n = len(labels)
    if kind == "iid":
        if clients > n:
            raise ValueError(f"{clients} clients but only {n} training samples")
        order = sample_order(n, derive_seed(seed, SHARD_KEY))
        return [part.sort().values for part in order.tensor_split(clients)]
    if kind != "dirichlet":
        raise ValueError(f"unknown shards {kind!r}; choose iid or dirichlet")
    y = labels.cpu().numpy()
    classes, counts = np.unique(y, return_counts=True)
    if clients > counts.min():
        raise ValueError(f"{clients} clients but class {classes[counts.argmin()]} has only "
                         f"{counts.min()} training samples: lower federated.clients")
    rng = np.random.default_rng(derive_seed(seed, SHARD_KEY))
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = np.round(np.cumsum(rng.dirichlet(np.full(clients, beta)))[:-1] * len(idx))
            for k, chunk in enumerate(np.split(idx, cuts.astype(int))):
                parts[k].append(chunk)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_size:
            return [torch.from_numpy(s).long() for s in shards]
    raise ValueError(f"no Dirichlet({beta}) split in 1000 draws gives each of {clients} clients "
                     f"{min_size} samples: raise federated.beta, or lower federated.clients or "
                     "federated.min_shard")


def label_entropy(labels: Tensor, shard: Tensor, num_classes: int) -> float:
    """Entropy (nats) of the label distribution of one shard: log(classes) for a balanced
    shard, 0 for a shard of one class."""
    p = torch.bincount(labels[shard.to(labels.device)].cpu(), minlength=num_classes).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def shard_data(data: Data, shard: Tensor) -> Data:
    """``data`` with only the shard's training samples (a copy, made once per client, where
    the data lies); the test split is shared."""
    idx = shard.to(data.train_x.device)
    return dataclasses.replace(data, train_x=data.train_x[idx], train_y=data.train_y[idx])


# ------------------------------------------------------------------------------- aggregation


def check_layers(model: nn.Module, layers: Sequence[str]) -> None:
    """Raise ValueError naming the first of ``layers`` that is no layer group of ``model``."""
    from .layerwise import layer_groups

    names = [name for name, _ in layer_groups(model)]
    for layer in layers:
        if layer not in names:
            close = difflib.get_close_matches(layer, names, n=3)
            raise ValueError(f"{layer!r} is no layer group of the model"
                             + (f"; did you mean {', '.join(close)}?" if close else "")
                             + f" (its groups: {', '.join(names)})")


def check_layer_names(name: str, exp: dict) -> None:
    """Start-up check of experiment ``name``'s ``federated.layers``: every listed layer must be
    a layer group of the configured model, which is built for it (so torch is imported at
    start-up only for experiments that average a layer subset). Raises ConfigError naming the
    key."""
    from .config import IMAGE_SHAPES, ConfigError
    from .models import build_model

    key, data = f"config key experiments.{name}.federated.layers", exp["data"]
    shape = IMAGE_SHAPES.get(data["name"]) or (data.get("channels", 3),
                                               *data.get("image_size", (32, 32)))
    args = {k: v for k, v in exp["model"].items() if k != "arch"}
    try:
        model = build_model(exp["model"]["arch"], tuple(shape), 10, **args)
    except Exception as err:  # noqa: BLE001  (the model's own error, reported with the key)
        raise ConfigError(f"{key}: the model could not be built to check the layer names: "
                          f"{type(err).__name__}: {err}") from None
    try:
        check_layers(model, exp["federated"]["layers"])
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from None


def averaged_keys(model: nn.Module, aggregation: str, layers: Sequence[str] = (),
                  bn: str = "average") -> list[str]:
    """State-dict keys that an aggregation averages into the clients: every floating tensor
    (``full``, ``aligned``) or those of the listed layer groups (``layers``); without
    BatchNorm running statistics under ``bn: local``. Integer buffers never."""
    from .layerwise import layer_groups

    state = model.state_dict()
    if aggregation == "layers":
        check_layers(model, layers)
        keys = [k for name, ks in layer_groups(model) if name in layers for k in ks]
    elif aggregation in ("full", "aligned"):
        keys = list(state)
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    if bn == "local":
        stats = {f"{name}.{b}" if name else b for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for b in ("running_mean", "running_var")}
        keys = [k for k in keys if k not in stats]
    elif bn != "average":
        raise ValueError(f"unknown bn {bn!r}; choose average or local")
    return [k for k in keys if state[k].is_floating_point()]


def weighted_average(states: Sequence[dict], sizes: Sequence[int], keys: Sequence[str]) -> dict:
    """Σ_k n_k·θ_k / Σ_k n_k of the tensors ``keys``, accumulated in float64 (n_k·θ_k and their
    sums are exact there, so identical clients give their own weights back exactly)."""
    total = sum(sizes)
    out = {}
    for key in keys:
        acc = torch.zeros_like(states[0][key], dtype=torch.float64)
        for state, n in zip(states, sizes):
            acc.add_(state[key].double(), alpha=int(n))
        out[key] = acc.div_(total).to(states[0][key].dtype)
    return out


def _momentum(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    return {name: opt.state[p]["momentum_buffer"] for name, p in model.named_parameters()
            if opt.state.get(p, {}).get("momentum_buffer") is not None}


def aggregate(clients: Sequence[nn.Module], opts: Sequence[torch.optim.Optimizer],
              local: Sequence[dict], sizes: Sequence[int], previous_global: dict,
              aggregation: str, keys: Sequence[str], spec=None, matching: dict | None = None,
              log: Callable[[str], None] = print) -> dict:
    """One aggregation: load the averaged ``keys`` into every client (in place) and return the
    round's global model (a state dict). ``local`` are the clients' states before it."""
    from .alignment import apply_permutation, weight_matching

    states = list(local)
    if aggregation == "aligned":  # each client permuted onto the current global model
        m = matching or {}
        for k, (model, opt) in enumerate(zip(clients, opts)):
            perm, info = weight_matching(spec, previous_global, states[k],
                                         max_sweeps=m.get("max_sweeps", 100), seed=m.get("seed", 0),
                                         first_solve=m.get("first_solve", "all"))
            states[k] = apply_permutation(spec, perm, states[k])
            model.load_state_dict(states[k])  # what the client keeps (bn: local) is permuted too
            moved = sum(int((p != torch.arange(len(p))).sum()) for p in perm.values())
            log(f"client {k}: {moved} units permuted onto the global model "
                f"({info['sweeps']} sweeps)")
            buffers = _momentum(model, opt)  # the momentum follows its weights
            for name, buf in apply_permutation(spec, perm, buffers).items():
                buffers[name].copy_(buf)
    floating = [k for k, v in states[0].items() if v.is_floating_point()]
    new_global = {**states[0], **weighted_average(states, sizes, floating)}
    with torch.no_grad():
        for model in clients:
            own = model.state_dict()
            for key in keys:
                own[key].copy_(new_global[key])
    return {k: v.clone() for k, v in new_global.items()}


# ------------------------------------------------------------------------------------- the run


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def kept_path(ckpt_dir: Path, round_: int) -> Path:
    return Path(ckpt_dir) / "kept" / f"round_{round_:04d}.pt"


def _ckpt_path(ckpt_dir: Path, round_: int) -> Path:
    return Path(ckpt_dir) / f"round_{round_:04d}.pt"


def _evaluate_round(scratch: nn.Module, round_: int, epoch: int, global_state: dict,
                    local: Sequence[dict], sizes: Sequence[int], train_loss: Sequence[float],
                    data: Data, device) -> list[dict]:
    """Test loss and error of the global model and of every client (before aggregation)."""
    rows = []
    for k, state in [(-1, global_state), *enumerate(local)]:
        scratch.load_state_dict(state)
        loss, error = evaluate(scratch, data.test_x, data.test_y, data.normalize, device=device)
        rows.append({"round": round_, "epoch": epoch, "model": GLOBAL if k < 0 else f"client{k}",
                     "client": k, "shard_size": sum(sizes) if k < 0 else sizes[k],
                     "split": "test", "loss": loss, "error": error,
                     "train_loss": math.nan if k < 0 else train_loss[k]})
    return rows


def run_federated(model: nn.Module, data: Data, s: TrainSetting, fed: dict, aggregation: str, *,
                  seed: int, ckpt_dir: str | Path, meta: dict, matching: dict | None = None,
                  stop_round: int | None = None, device="cpu",
                  log: Callable[[str], None] = print) -> dict:
    """Run federated averaging from ``model`` (the common initialisation) up to ``stop_round``
    (default: every round), resuming from the newest checkpoint of the same ``meta`` in
    ``ckpt_dir``. Returns {"round", "rows" (metrics per round and model), "sizes", "entropy",
    "clients" (states after the last aggregation), "optimizers"}; the weights of the kept
    rounds are in ``kept_path(ckpt_dir, r)``: {"clients": [states before aggregation],
    "global": state}."""
    device = torch.device(device)
    ckpt_dir = Path(ckpt_dir)
    epochs_per_round = fed["local_epochs"]
    if s.epochs % epochs_per_round:
        raise ValueError(f"local_epochs {epochs_per_round} does not divide epochs {s.epochs}")
    rounds = s.epochs // epochs_per_round
    stop_round = rounds if stop_round is None else stop_round
    keep = set(fed.get("keep_rounds", ())) | {rounds}
    data = data.to(device)
    model.to(device)
    shards = make_shards(data.train_y, fed["clients"], fed["shards"], fed.get("beta", 0.5), seed,
                         fed.get("min_shard", 1))
    sizes = [len(sh) for sh in shards]
    entropy = [label_entropy(data.train_y, sh, data.num_classes) for sh in shards]
    log(f"{len(shards)} {fed['shards']} shards: sizes {sizes}, label entropy "
        + " ".join(f"{h:.2f}" for h in entropy) + " nats")
    views = [shard_data(data, sh) for sh in shards]
    keys = averaged_keys(model, aggregation, fed.get("layers", ()), fed.get("bn", "average"))
    spec = None
    if aggregation == "aligned":
        from .alignment import permutation_spec

        spec = permutation_spec(model)
    clients = [copy.deepcopy(model) for _ in shards]
    opts = [make_optimizer(c, s) for c in clients]
    noise = [client_noise_seed(seed, k) for k in range(len(shards))]
    resume = latest_checkpoint(ckpt_dir, meta, log, prefix="round")
    if resume is not None:
        for client, opt, state, opt_state in zip(clients, opts, resume["clients"],
                                                 resume["optimizers"]):
            client.load_state_dict(state)
            opt.load_state_dict(copy.deepcopy(opt_state))
        global_state, rows, round_ = _clone(resume["global"]), list(resume["rows"]), resume["round"]
        log(f"resuming at round {round_}")
    else:
        round_, global_state = 0, _clone(model.state_dict())
        local = [global_state] * len(clients)
        rows = _evaluate_round(model, 0, 0, global_state, local, sizes,
                               [math.nan] * len(clients), data, device)
        if 0 in keep:
            save_torch({"clients": local, "global": global_state}, kept_path(ckpt_dir, 0))
    while round_ < stop_round:
        t0 = time.perf_counter()
        round_ += 1
        train_loss = []
        for client, opt, view, seed_k in zip(clients, opts, views, noise):
            for e in range(epochs_per_round):
                loss, _ = train_epoch(client, opt, view, s, (round_ - 1) * epochs_per_round + e,
                                      seed_k, device)
            train_loss.append(loss)
        local = [_clone(c.state_dict()) for c in clients]
        global_state = aggregate(clients, opts, local, sizes, global_state, aggregation, keys,
                                 spec, matching, log)
        new = _evaluate_round(model, round_, round_ * epochs_per_round, global_state, local,
                              sizes, train_loss, data, device)
        rows += new
        clients_err = [r["error"] for r in new if r["client"] >= 0]
        log(f"round {round_}/{stop_round} ({aggregation}): global test err "
            f"{100 * new[0]['error']:.2f}% loss {new[0]['loss']:.4f} | clients test err "
            f"{100 * min(clients_err):.2f}-{100 * max(clients_err):.2f}% | "
            f"{time.perf_counter() - t0:.1f}s")
        if round_ in keep:  # before the checkpoint: a resumed run finds it
            save_torch({"clients": local, "global": global_state}, kept_path(ckpt_dir, round_))
        save_torch({"round": round_, "clients": [c.state_dict() for c in clients],
                    "optimizers": [o.state_dict() for o in opts], "global": global_state,
                    "rows": rows, "meta": meta}, _ckpt_path(ckpt_dir, round_))
        _prune(ckpt_dir, keep={round_}, prefix="round")
    return {"round": round_, "rows": rows, "sizes": sizes, "entropy": entropy,
            "clients": [_clone(c.state_dict()) for c in clients],
            "optimizers": [copy.deepcopy(o.state_dict()) for o in opts]}


def final_files(result: dict, ckpt_dir: str | Path, meta: dict, spec: dict,
                keep_rounds: Sequence[int]) -> dict[str, dict]:
    """The run's endpoint files, in the format of a training run's ``final.pt``: ``client{k}``
    and ``global`` -> {"model" (client: before the last aggregation), "optimizer", "epoch"
    (the last round), "meta", "spec", "history" (round -> weights, ``keep_rounds``)}."""
    round_ = result["round"]
    last = load_torch(kept_path(ckpt_dir, round_))
    history = {r: load_torch(kept_path(ckpt_dir, r)) for r in sorted(keep_rounds) if r != round_}
    history[round_] = last
    kept = {r: history[r] for r in keep_rounds}
    files = {}
    for k, state in enumerate(last["clients"]):
        files[f"client{k}"] = {"model": state, "optimizer": result["optimizers"][k],
                               "epoch": round_, "meta": meta, "spec": spec,
                               "history": {r: w["clients"][k] for r, w in kept.items()}}
    files[GLOBAL] = {"model": last["global"], "optimizer": {}, "epoch": round_, "meta": meta,
                     "spec": spec, "history": {r: w["global"] for r, w in kept.items()}}
    return files
