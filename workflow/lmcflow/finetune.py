"""The cross-task linearity analyses (CTL, Zhou et al., ICML 2024; official
zzp1012/Cross-Task-Linearity) of fine-tuned runs: weight arithmetic, CTL per layer, task
arithmetic, model averaging against logit ensembling. Which runs and pairs exist is planned in
`lmcflow.finetune_plan` (re-exported here).

Weight arithmetic is done in float64 and cast back, so θ_0 + (θ_i − θ_0) is θ_i bit for bit;
integer buffers (``num_batches_tracked``) are θ_0's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .finetune_plan import (FINETUNE_KEY, KINDS, METHOD_NAMES, PRETRAIN_RUN, STARTS,  # noqa: F401
                            averaging_groups, averaging_starts, combos, method_name, most_pairs,
                            noise_seed, pair_runs, pair_tasks, parse_method, run_name, run_task,
                            task_names, task_runs, task_train, user_file)

# ------------------------------------------------------------------------- weight arithmetic


def combine(base: dict, terms: Sequence[tuple[float, dict]]) -> dict:
    """base + Σ coef · (state − base) for every floating tensor, in float64 then cast back to
    the base's dtype; other tensors are the base's. ``terms``: (coef, fine-tuned state)."""
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        acc = b.double()
        for coef, state in terms:
            acc = acc + coef * (state[key].double() - b.double())
        out[key] = acc.to(b.dtype)
    return out


def average(states: Sequence[dict]) -> dict:
    """The uniform average of states, in float64; integer buffers from the first."""
    first = states[0]
    return {k: (torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype)
                if v.is_floating_point() else v.clone()) for k, v in first.items()}


def scaled_sum(states: Sequence[dict], coefs: Sequence[float]) -> dict:
    """Σ coef_i · state_i (α θ_A + β θ_B of the official CTL code; α + β need not be 1)."""
    first = states[0]
    out = {}
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        out[k] = sum(c * s[k].double() for c, s in zip(coefs, states)).to(v.dtype)
    return out


# ------------------------------------------------------------------------ feature comparisons


def compare(f: Tensor, target: Tensor) -> dict[str, np.ndarray]:
    """Per sample: 1 − cos⟨f, target⟩ (signed) and the scale c with c·f ≈ target, float64."""
    from .metrics import coef_c, cosine

    return {"one_minus_cos": (1.0 - cosine(f, target)).cpu().numpy(),
            "coef_c": coef_c(f, target).cpu().numpy()}


def summarise(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: mean and sd over samples of 1 − cos and c, and the sample count."""
    g = frame.groupby(keys, sort=False)
    out = g.agg(one_minus_cos=("one_minus_cos", "mean"), one_minus_cos_sd=("one_minus_cos", "std"),
                coef_c=("coef_c", "mean"), coef_c_sd=("coef_c", "std"),
                samples=("one_minus_cos", "size"))
    return out.reset_index()


# ------------------------------------------------------------------------------- networks


def prepare(model, state: dict, data, bn: str, batch_size: int = 1000, device="cpu"):
    """``state`` loaded into ``model`` in eval mode; with ``bn`` reset or repair (repair is the
    reset here) BatchNorm statistics are recomputed on ``data``'s training split, as
    `interpolation.load_interpolated` does for every network an analysis compares."""
    from .interpolation import reset_bn

    model.load_state_dict(state)
    if bn in ("reset", "repair"):
        reset_bn(model, data.train_x, data.normalize, batch_size, device)
    return model.eval()


@torch.no_grad()
def feature_batches(networks: dict, layers: list[str], data, samples: np.ndarray,
                    batch_size: int, device="cpu"):
    """Per batch of test samples: (indices, {network: {layer: (B, D) features}}); every network
    in eval mode, on ``data.test_x[samples]``."""
    from .features import capture

    for start in range(0, len(samples), batch_size):
        idx = np.asarray(samples[start:start + batch_size])
        xb = data.normalize(data.test_x[torch.as_tensor(idx, device=data.test_x.device)].to(device))
        out = {}
        for name, net in networks.items():
            net.eval()
            with capture(net, layers) as store:
                net(xb)
            out[name] = dict(store)
        yield idx, out


def ctl_table(build, state_a: dict, state_b: dict, coefficients, data, samples, layers,
              bn: str = "reset", batch_size: int = 100, device="cpu") -> pd.DataFrame:
    """Cross-task linearity per sample and layer: for every (α, β) in ``coefficients``,
    1 − cos⟨f(α θ_A + β θ_B), α f(θ_A) + β f(θ_B)⟩ and its scale c, beside 1 − cos⟨f(θ_A), f(θ_B)⟩.
    Columns: alpha, beta, layer, layer_index, sample, one_minus_cos, coef_c, one_minus_cos_ab."""
    from .metrics import cosine

    nets = {"A": prepare(build(), state_a, data, bn, device=device),
            "B": prepare(build(), state_b, data, bn, device=device)}
    for alpha, beta in coefficients:
        nets[(alpha, beta)] = prepare(build(), scaled_sum([state_a, state_b], [alpha, beta]), data,
                                      bn, device=device)
    frames = []
    for idx, feats in feature_batches(nets, layers, data, samples, batch_size, device):
        for i, layer in enumerate(layers):
            f_a, f_b = feats["A"][layer].double(), feats["B"][layer].double()
            ab = (1.0 - cosine(f_a, f_b)).cpu().numpy()
            for alpha, beta in coefficients:
                values = compare(feats[(alpha, beta)][layer], alpha * f_a + beta * f_b)
                frames.append(pd.DataFrame({"alpha": alpha, "beta": beta, "layer": layer,
                                            "layer_index": i, "sample": idx, **values,
                                            "one_minus_cos_ab": ab}))
    return pd.concat(frames, ignore_index=True).sort_values(
        ["alpha", "beta", "layer_index", "sample"], kind="stable", ignore_index=True)


def arithmetic_state(base: dict, state_a: dict, state_b: dict, operation: str, lam: float) -> dict:
    """Task arithmetic: addition θ_0 + λ(τ_A + τ_B), negation θ_0 − λ τ_A (τ_i = θ_i − θ_0)."""
    if operation == "addition":
        return combine(base, [(lam, state_a), (lam, state_b)])
    if operation == "negation":
        return combine(base, [(-lam, state_a)])
    raise ValueError(f"unknown operation {operation!r}; choose addition or negation")


def arithmetic_target(f0: Tensor, fa: Tensor, fb: Tensor, operation: str, lam: float) -> Tensor:
    """The feature arithmetic that CTL predicts for `arithmetic_state` (float64)."""
    f0, fa, fb = f0.double(), fa.double(), fb.double()
    if operation == "addition":
        return f0 + lam * ((fa - f0) + (fb - f0))
    return f0 - lam * (fa - f0)


OPERATIONS = ("addition", "negation")


def evaluate_tasks(model, task_sets: dict, batch_size: int = 1000, device="cpu") -> list[dict]:
    """Loss and error of ``model`` on the test split of every task (task -> Data)."""
    from .training import evaluate

    rows = []
    for task, d in task_sets.items():
        loss, error = evaluate(model, d.test_x, d.test_y, d.normalize, batch_size, device)
        rows.append({"task": task, "split": "test", "loss": loss, "error": error})
    return rows


def task_arithmetic(build, base: dict, state_a: dict, state_b: dict, lambdas, task_sets: dict,
                    roles: dict, data, samples, layers, bn: str = "reset", batch_size: int = 100,
                    eval_batch_size: int = 1000, device="cpu", log=print) -> pd.DataFrame:
    """Addition and negation over the λ grid. Rows of ``kind`` ``evaluation``: loss and error of
    the arithmetic model on every task's test split (``task``, ``role``: a, b, pretraining or
    other); rows of ``kind`` ``features`` (λ ≠ 0 as well as 0): per layer, mean and sd over the
    probe samples of ``data`` of 1 − cos and the scale c between f(arithmetic model) and the
    feature arithmetic. ``base`` is θ_0 (the pretrained model, or the random initialisation of
    the control)."""
    prep = lambda state: prepare(build(), state, data, bn, eval_batch_size, device)  # noqa: E731
    ends = {"0": prep(base), "A": prep(state_a), "B": prep(state_b)}
    rows, frames = [], []
    for operation in OPERATIONS:
        nets = {}
        for lam in lambdas:
            model = prep(arithmetic_state(base, state_a, state_b, operation, lam))
            for row in evaluate_tasks(model, task_sets, eval_batch_size, device):
                rows.append({"kind": "evaluation", "operation": operation, "lambda": lam,
                             "role": roles.get(row["task"], "other"), **row})
            nets[lam] = model
        log(f"{operation}: " + ", ".join(
            f"λ={r['lambda']:g} {r['task']} err {100 * r['error']:.1f}%" for r in rows[-6:]))
        for idx, feats in feature_batches({**ends, **nets}, layers, data, samples, batch_size,
                                          device):
            for i, layer in enumerate(layers):
                f0, fa, fb = (feats[k][layer] for k in ("0", "A", "B"))
                for lam in lambdas:
                    values = compare(feats[lam][layer], arithmetic_target(f0, fa, fb, operation, lam))
                    frames.append(pd.DataFrame({"operation": operation, "lambda": lam,
                                                "layer": layer, "layer_index": i, "sample": idx,
                                                **values}))
    per_sample = pd.concat(frames, ignore_index=True)
    feats = summarise(per_sample, ["operation", "lambda", "layer", "layer_index"])
    return pd.concat([pd.DataFrame(rows), feats.assign(kind="features")], ignore_index=True)


@torch.no_grad()
def ensemble_evaluate(models: Sequence, d, batch_size: int = 1000, device="cpu") -> dict:
    """Loss and error of the ensemble that averages the models' logits, on ``d``'s test split."""
    import torch.nn.functional as F

    loss = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    x, y = d.test_x, d.test_y
    for start in range(0, len(y), batch_size):
        xb = d.normalize(x[start:start + batch_size].to(device))
        yb = y[start:start + batch_size].to(device)
        logits = torch.stack([m(xb).double() for m in models]).mean(0)
        loss += F.cross_entropy(logits, yb, reduction="sum")
        wrong += (logits.argmax(1) != yb).sum()
    return {"loss": loss.item() / len(y), "error": wrong.item() / len(y)}


def model_averaging(build, states: Sequence[dict], task_sets: dict, data, samples, layers,
                    bn: str = "reset", batch_size: int = 100, eval_batch_size: int = 1000,
                    device="cpu") -> pd.DataFrame:
    """K fine-tuned models: their uniform weight average against the ensemble of their logits.
    Rows of ``kind`` ``evaluation`` per task: ``model`` average, ensemble, or members (the mean
    of the K models' own loss and error); rows of ``kind`` ``features`` per layer: 1 − cos and
    the scale c between f(average) and the mean of the K models' features (mean and sd over the
    probe samples of ``data``)."""
    members = [prepare(build(), s, data, bn, eval_batch_size, device) for s in states]
    averaged = prepare(build(), average(states), data, bn, eval_batch_size, device)
    rows = []
    for task, d in task_sets.items():
        own = evaluate_tasks(averaged, {task: d}, eval_batch_size, device)[0]
        rows.append({**own, "model": "average"})
        rows.append({"task": task, "split": "test", "model": "ensemble",
                     **ensemble_evaluate(members, d, eval_batch_size, device)})
        each = [evaluate_tasks(m, {task: d}, eval_batch_size, device)[0] for m in members]
        rows.append({"task": task, "split": "test", "model": "members",
                     "loss": float(np.mean([r["loss"] for r in each])),
                     "error": float(np.mean([r["error"] for r in each]))})
    nets = {"average": averaged, **{k: m for k, m in enumerate(members)}}
    frames = []
    for idx, feats in feature_batches(nets, layers, data, samples, batch_size, device):
        for i, layer in enumerate(layers):
            mean = torch.stack([feats[k][layer].double() for k in range(len(members))]).mean(0)
            frames.append(pd.DataFrame({"layer": layer, "layer_index": i, "sample": idx,
                                        **compare(feats["average"][layer], mean)}))
    feats = summarise(pd.concat(frames, ignore_index=True), ["layer", "layer_index"])
    return pd.concat([pd.DataFrame(rows).assign(kind="evaluation"), feats.assign(kind="features")],
                     ignore_index=True)


# --------------------------------------------------------------------------- model averaging
