"""Training: SGD with a per-epoch lr schedule, seeded SGD noise, per-epoch checkpoints, resume.

Randomness is split into two seeds (DESIGN: "separate init and data-order seeds"):
- `init_seed` seeds the weights (torch.manual_seed right before the model is built);
- `noise_seed` seeds the SGD noise: for epoch e, data order and augmentation draw from a generator
  seeded with derive_seed(noise_seed, e), and the global RNG (dropout) is reseeded the same way.
Because every epoch's noise depends only on (noise_seed, epoch), a run resumed from its epoch-k
checkpoint continues exactly as an uninterrupted run (bit-for-bit on CPU), and a spawned child is
a parent checkpoint continued with another noise_seed.

The lr schedule is a pure function of the epoch (`lr_at`) and, during an optional linear warm-up
(`train.warmup_steps`), of the step (`lr_at_step`), so the "scheduler state" of a checkpoint is
its epoch counter; checkpoints hold only tensors and plain values and load with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainSetting
from .data import Data
from .io import load_torch, save_torch
from .seeds import derive_seed  # noqa: F401  (re-exported: training's seeds are derived ones)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no GPU; use device: auto or cpu")
    return torch.device(device)


def lr_at(s: TrainSetting, epoch: int) -> float:
    """Learning rate used during epoch `epoch` (0-based)."""
    if s.schedule == "constant":
        return s.lr
    if s.schedule == "multistep":
        return s.lr * s.gamma ** sum(epoch >= m for m in s.milestones)
    if s.schedule == "cosine":
        return 0.5 * s.lr * (1 + math.cos(math.pi * epoch / s.epochs))
    raise ValueError(f"unknown schedule {s.schedule!r}; choose constant, multistep or cosine")


def lr_at_step(s: TrainSetting, epoch: int, step: int) -> float:
    """Learning rate of global step `step` (0-based, counted over the run's batches) in epoch
    `epoch`: `lr_at(s, epoch)` scaled by (step + 1) / warmup_steps during the first
    `s.warmup_steps` steps (a linear warm-up from lr / warmup_steps to lr), `lr_at` after. The
    official layer-wise federated code warms up linearly from 1e-4 to its lr 0.01 over 100 steps
    (`warmup_scheduler_pytorch`): the same start, lr / 100, and the same end."""
    scale = min(1.0, (step + 1) / s.warmup_steps) if s.warmup_steps else 1.0
    return lr_at(s, epoch) * scale


def make_optimizer(model: nn.Module, s: TrainSetting) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                           nesterov=s.nesterov, weight_decay=s.weight_decay)


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip on a uint8 batch (B, C, H, W)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].to(x.device)  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].to(x.device)  # (B, 1, 1, W)
    cols = torch.where(flip.to(x.device)[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def train_epoch(model, opt, data: Data, s: TrainSetting, epoch: int, noise_seed: int,
                device: torch.device) -> tuple[float, float]:
    """One epoch of SGD; returns (mean train loss, train error) over the batches seen.

    Kept free of host-device round trips, so a GPU is never idle waiting for the host: the
    batches are indexed where ``data`` lies (a job moves it to the device once, `Data.to`), the
    random draws of order and augmentation come from the seeded CPU generator and travel as
    small index tensors, and loss and error accumulate on the device (float64) with one sync at
    the end. On the CPU every step is the same computation as a plain loop, bit for bit.
    """
    device = torch.device(device)
    steps = -(-len(data.train_y) // s.batch_size)  # batches per epoch
    warm = s.warmup_steps > epoch * steps  # some step of this epoch is in the warm-up
    gen = torch.Generator().manual_seed(derive_seed(noise_seed, epoch))
    torch.manual_seed(derive_seed(noise_seed, epoch, 1))  # dropout and any other global draw
    for group in opt.param_groups:
        group["lr"] = lr_at(s, epoch)
    model.train()
    x_all, y_all = data.train_x, data.train_y
    order = torch.randperm(len(y_all), generator=gen)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")
    for i, idx in enumerate(order.split(s.batch_size)):
        if warm:  # a pure function of the step, like the epoch's lr
            for group in opt.param_groups:
                group["lr"] = lr_at_step(s, epoch, epoch * steps + i)
        idx_here = idx.to(x_all.device)
        x = x_all[idx_here]
        if s.augment:
            x = augment(x, gen)
        x, y = data.normalize(x.to(device)), y_all[idx_here].to(device)
        if s.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total_loss += loss.detach().double() * len(idx)
        wrong += (logits.argmax(1) != y).sum()
    return total_loss.item() / len(order), wrong.item() / len(order)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Callable,
             batch_size: int = 1000, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(mean cross-entropy, error rate) of `model` in eval mode on uint8 inputs x; sums stay on
    the device until the end (one sync per evaluation)."""
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    wrong = torch.zeros((), dtype=torch.int64, device=device)
    for start in range(0, len(y), batch_size):
        xb = normalize(x[start:start + batch_size].to(device))
        yb = y[start:start + batch_size].to(device)
        logits = model(xb).double()
        loss += F.cross_entropy(logits, yb, reduction="sum")
        wrong += (logits.argmax(1) != yb).sum()
    return loss.item() / len(y), wrong.item() / len(y)


# ------------------------------------------------------------------------ checkpoints and runs


def checkpoint(model, opt, epoch: int, meta: dict) -> dict:
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch, "meta": meta}


def _ckpt_path(ckpt_dir: Path, epoch: int) -> Path:
    return ckpt_dir / f"epoch_{epoch:04d}.pt"


def latest_checkpoint(ckpt_dir: Path, meta: dict, log=print, prefix: str = "epoch") -> dict | None:
    """The newest readable checkpoint `{prefix}_NNNN.pt` in `ckpt_dir` made with the same `meta`,
    else None.

    A checkpoint of another setting (the config changed) or a truncated file is skipped with a
    message, never resumed from.
    """
    for path in sorted(Path(ckpt_dir).glob(f"{prefix}_*.pt"), reverse=True):
        try:
            ckpt = load_torch(path)
        except ValueError as err:
            log(f"skipping unreadable checkpoint: {err}")
            continue
        if ckpt.get("meta") == meta:
            return ckpt
        log(f"ignoring {path}: made with another setting")
    return None


def run_training(model: nn.Module, data: Data, s: TrainSetting, *, noise_seed: int,
                 ckpt_dir: str | Path, meta: dict, stop_epoch: int | None = None,
                 start: dict | None = None, device: torch.device | str = "cpu",
                 log: Callable[[str], None] = print) -> dict:
    """Train `model` from epoch 0 (or from the checkpoint `start`) up to `stop_epoch`.

    Saves a checkpoint after every epoch into `ckpt_dir` (keeping the newest one and those listed
    in `s.checkpoint_epochs`) and resumes from the newest matching one found there. Returns the
    final checkpoint dict (model, optimizer, epoch, meta).
    """
    device = torch.device(device)
    stop_epoch = s.epochs if stop_epoch is None else stop_epoch
    ckpt_dir = Path(ckpt_dir)
    data = data.to(device)
    model.to(device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, s)
    resume = latest_checkpoint(ckpt_dir, meta, log) or start
    epoch = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        # a copy: load_state_dict may keep the given tensors, and SGD updates them in place
        opt.load_state_dict(copy.deepcopy(resume["optimizer"]))
        epoch = resume["epoch"]
        log(f"resuming at epoch {epoch}" + (" (from the parent)" if resume is start else ""))
    if epoch == 0 and 0 in s.checkpoint_epochs:  # the initialisation, for analyses along training
        save_torch(checkpoint(model, opt, 0, meta), _ckpt_path(ckpt_dir, 0))
    while epoch < stop_epoch:
        t0 = time.perf_counter()
        loss, err = train_epoch(model, opt, data, s, epoch, noise_seed, device)
        epoch += 1
        test_loss, test_err = evaluate(model, data.test_x, data.test_y, data.normalize, device=device)
        log(f"epoch {epoch}/{stop_epoch} lr {lr_at(s, epoch - 1):.4g} train loss {loss:.4f} "
            f"err {100 * err:.2f}% | test loss {test_loss:.4f} err {100 * test_err:.2f}% "
            f"| {time.perf_counter() - t0:.1f}s")
        save_torch(checkpoint(model, opt, epoch, meta), _ckpt_path(ckpt_dir, epoch))
        _prune(ckpt_dir, keep={epoch, *s.checkpoint_epochs})
    return copy.deepcopy(checkpoint(model, opt, epoch, meta))


STATE_KEYS = ("model", "state_dict", "model_state_dict")  # where checkpoints keep the weights
UNKNOWN_EPOCH = -1  # the epoch of an endpoint read from a file that does not say


def load_run(path: str | Path, device="cpu", hint: str | None = None) -> dict:
    """A training run's final weights as this workflow's runs hold them: ``{"model": state
    dict, "epoch", "history": epoch -> state dict, ...}``.

    Reads our own ``final.pt`` as it is, and a file a user brings: a state dict, or a checkpoint
    holding one under "model", "state_dict" or "model_state_dict" (a "module." prefix that
    DataParallel adds is dropped); its epoch is UNKNOWN_EPOCH and it has no history.
    """
    obj = load_torch(path, device, hint)
    if isinstance(obj, dict) and "history" in obj and "model" in obj:
        run = obj
    else:
        state = next((obj[k] for k in STATE_KEYS if isinstance(obj, dict) and isinstance(
            obj.get(k), dict)), obj)
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError(f"{path} holds no state dict (a dict of tensors, or one under "
                             f"{', '.join(STATE_KEYS)}); save torch.save(model.state_dict(), path)")
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        run = {"model": state, "epoch": UNKNOWN_EPOCH, "history": {}}
    return run


def check_fits(state: dict, model: nn.Module, path: str | Path, what: str = "the model",
               hint: str = "") -> None:
    """Raise naming the missing, unexpected or misshapen keys unless ``state`` loads into
    ``model`` (``what`` names the model in the message, ``hint`` says what to do)."""
    want = model.state_dict()
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(want[k].shape)})"
              for k in sorted(want.keys() & state.keys()) if want[k].shape != state[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"{path} does not fit {what}: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, other shapes {shapes[:5]}" + (f"; {hint}" if hint else ""))


def kept_weights(meta: dict, ckpt_dir: str | Path) -> dict[int, dict]:
    """Model weights of the checkpoints kept at `train.checkpoint_epochs`: epoch -> state dict."""
    out = {}
    for epoch in meta["train"]["checkpoint_epochs"]:
        path = _ckpt_path(Path(ckpt_dir), epoch)
        if path.exists():
            out[epoch] = load_torch(path)["model"]
    return out


def _prune(ckpt_dir: Path, keep: set[int], prefix: str = "epoch") -> None:
    for path in ckpt_dir.glob(f"{prefix}_*.pt"):
        if int(path.stem.split("_")[1]) not in keep:
            path.unlink()
