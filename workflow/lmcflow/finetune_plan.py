"""Which runs and pairs pretraining and fine-tuning make: names, seeds and the files a user
brings, from the config alone (torch-free: the Snakefile plans with it at start-up). The
computations on those runs are in `lmcflow.finetune`.

Runs (paths under results/{experiment}/runs/):
- ``pretrain``: θ_0, the experiment's ``train`` setting on task ``pretrain.task``, init and
  SGD-noise seed = the experiment's ``seed`` S (or the file ``pretrain.checkpoint`` a user
  brings);
- ``finetune/{start}/{task}/run{r}``: fine-tuning r = 0, 1, … on ``task`` with that task's
  training setting (a fresh optimizer, epoch 0), from ``start`` = ``pretrained`` (θ_0) or
  ``random`` (the control: θ_0's own initialisation, the model built with seed S, untrained);
  SGD-noise seed derive_seed(S, FINETUNE_KEY, r), the same for every task (or the files
  ``finetune.tasks.<task>.checkpoints`` a user brings, run r = file r).

Pairs (methods ``finetune_same_task``, ``finetune_cross_task`` and their ``_random`` controls):
tasks in sorted order; same-task pair p is task T[p mod n] with runs 2q and 2q + 1, q = p div n
(the model-soup setting); cross-task pair p is the task combination C[p mod m] (in
itertools.combinations order) with run q = p div m for both (the CTL setting). A pair is analysed
(LMC, LLFC, mechanisms, layer-wise) on its tasks' data: one task's splits, or both tasks' splits
concatenated.
"""

from __future__ import annotations

import itertools

from .seeds import derive_seed

FINETUNE_KEY = 5  # derive_seed(S, FINETUNE_KEY, r): SGD noise of fine-tuning run r
STARTS = ("pretrained", "random")
PRETRAIN_RUN = "pretrain"
KINDS = ("same_task", "cross_task")


def method_name(kind: str, start: str) -> str:
    return f"finetune_{kind}" + ("_random" if start == "random" else "")


def parse_method(name: str) -> tuple[str, str]:
    """``finetune_<kind>[_random]`` -> (kind, start)."""
    rest = name[len("finetune_"):]
    start = "random" if rest.endswith("_random") else "pretrained"
    return rest.removesuffix("_random"), start


METHOD_NAMES = [method_name(k, s) for k in KINDS for s in STARTS]


def task_names(exp: dict) -> list[str]:
    return sorted(exp["finetune"]["tasks"])


def task_runs(exp: dict, task: str) -> int:
    """Fine-tuning runs of ``task``: its checkpoint files, else ``runs`` (task, else finetune)."""
    t = exp["finetune"]["tasks"][task] or {}
    if t.get("checkpoints"):
        return len(t["checkpoints"])
    return t.get("runs", exp["finetune"]["runs"])


def combos(exp: dict, kind: str) -> list[tuple[str, ...]]:
    tasks = task_names(exp)
    return [(t,) for t in tasks] if kind == "same_task" else list(itertools.combinations(tasks, 2))


def run_name(start: str, task: str, r: int) -> str:
    return f"finetune/{start}/{task}/run{r}"


def pair_runs(exp: dict, method: str, pair: int) -> tuple[str, str]:
    """Run names of endpoints A and B of pair ``pair`` of a fine-tuning method."""
    kind, start = parse_method(method)
    options = combos(exp, kind)
    combo, q = options[pair % len(options)], pair // len(options)
    if kind == "same_task":
        return run_name(start, combo[0], 2 * q), run_name(start, combo[0], 2 * q + 1)
    return run_name(start, combo[0], q), run_name(start, combo[1], q)


def pair_tasks(exp: dict, method: str, pair: int) -> list[str]:
    """The distinct tasks of a pair's endpoints (A's first): the data it is analysed on."""
    a, b = (r.split("/")[2] for r in pair_runs(exp, method, pair))
    return [a] if a == b else [a, b]


def most_pairs(exp: dict, method: str) -> int:
    """How many pairs the runs allow (same-task: disjoint run pairs)."""
    kind, _ = parse_method(method)
    options = combos(exp, kind)
    if not options:
        return 0
    if kind == "same_task":
        return len(options) * min(task_runs(exp, t) // 2 for (t,) in options)
    return len(options) * min(task_runs(exp, t) for t in task_names(exp))


def user_file(exp: dict, run: str) -> str | None:
    """The file a user brings for ``run`` (pretrain.checkpoint, a task's checkpoints), else None."""
    if run == PRETRAIN_RUN:
        return exp.get("pretrain", {}).get("checkpoint")
    if run.startswith("finetune/pretrained/"):
        _, _, task, r = run.split("/")
        files = (exp["finetune"]["tasks"].get(task) or {}).get("checkpoints") or []
        return files[int(r[3:])] if files else None
    return None


def task_train(exp: dict, task: str) -> dict:
    """The training setting of ``task``'s fine-tunings (filled in by the config check)."""
    return (exp["finetune"]["tasks"][task] or {}).get("train") or exp["finetune"]["train"]


def noise_seed(seed: int, r: int) -> int:
    return derive_seed(seed, FINETUNE_KEY, r)


def averaging_starts(exp: dict) -> list[str]:
    """Starts whose fine-tunings are averaged: pretrained with any fine-tuning method, random
    where a ``_random`` method asks for those runs."""
    methods = [m for m in exp["methods"] if m.startswith("finetune_")]
    return [s for s in STARTS if any(parse_method(m)[1] == s for m in methods)] if methods else []


def averaging_groups(exp: dict, start: str) -> dict[str, list[str]]:
    """Groups of K ≥ 2 fine-tuned runs whose average is compared with their ensemble: ``tasks``
    (run 0 of every task: merging tasks, K = number of tasks) and ``same_task:<task>`` (every
    run of one task: a model soup, K = its runs)."""
    tasks = task_names(exp)
    groups = {}
    if len(tasks) >= 2:
        groups["tasks"] = [run_name(start, t, 0) for t in tasks]
    for t in tasks:
        if task_runs(exp, t) >= 2:
            groups[f"same_task:{t}"] = [run_name(start, t, r) for r in range(task_runs(exp, t))]
    return groups


def run_task(run: str) -> str:
    """The task of a fine-tuning run name."""
    return run.split("/")[2]
