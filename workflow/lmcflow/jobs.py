"""Glue between a Snakemake job and the package: logging, threads, device, rebuilding models.

Every script that computes with torch starts with `log, device = jobs.start(snakemake)`: its
messages go to the rule's log file (and stderr), torch uses the rule's `threads`, and the
device follows the experiment's `device` setting (table and figure scripts use the torch-free
`logs.start`). Scripts then call package functions and write their artifacts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from . import logs
from .data import Data
from .models import build_model
from .tasks import load_task_data as load_dataset  # a data spec may name tasks (lmcflow.tasks)
from .training import resolve_device


def start(snakemake, device: str = "auto", attempts=None) -> tuple:
    """`logs.start` (the job's log, its exception, CPU accounting; `attempts` keeps earlier
    attempts' lines) plus torch's threads (the rule's `threads`) and the device; return (log,
    device)."""
    log, logger = logs.start(snakemake, attempts)
    torch.set_num_threads(max(1, snakemake.threads))
    device = resolve_device(device)
    log(f"on {device}, {torch.get_num_threads()} threads")
    return log, device


def attempts_log(ckpt_dir: str | Path, pattern: str = "epoch_*.pt") -> Path:
    """The file that keeps every attempt's log lines of a resumable job, beside its checkpoints
    (``pattern``): emptied when the job starts afresh (no checkpoint to resume from)."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "attempts.log"
    if not any(ckpt_dir.glob(pattern)):
        path.unlink(missing_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return path


def model_spec(data: Data, model_args: dict) -> dict:
    """Everything needed to rebuild a network: arch, its args, input shape, classes."""
    args = dict(model_args)
    return {"arch": args.pop("arch"), "args": args, "in_shape": list(data.shape),
            "num_classes": data.num_classes}


def build(spec: dict, device="cpu", seed: int | None = None) -> nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    model = build_model(spec["arch"], tuple(spec["in_shape"]), spec["num_classes"], **spec["args"])
    return model.to(device)


def load_pair(inputs, device="cpu") -> tuple[dict, dict, dict]:
    """(model spec, state of A, state of B) of a pair directory's files (input.info/a/b)."""
    from .io import load_torch

    spec = json.loads(Path(inputs.info).read_text())["spec"]
    return spec, load_torch(inputs.a, device), load_torch(inputs.b, device)


def load_network(spec: dict, state: dict, device="cpu") -> nn.Module:
    model = build(spec, device)
    model.load_state_dict(state)
    return model.eval()


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __str__(self):
        return f"{time.perf_counter() - self.t0:.1f}s"




def with_ids(df, wildcards, **extra):
    """Prefix a table with the identity columns every table shares: experiment, method, pair."""
    ids = {k: wildcards[k] for k in ("experiment", "method", "pair")} | extra
    for i, (key, value) in enumerate(ids.items()):
        df.insert(i, key, value)
    return df


__all__ = ["start", "model_spec", "build", "load_dataset", "load_pair", "load_network", "Timer",
           "with_ids"]
