"""Benchmark the training epoch and one LMC point against their floors.

    python benchmarks/training.py                          # CPU, or the GPU with --device cuda
    python benchmarks/training.py --device cuda --out training.tsv
    python benchmarks/training.py --models mlp resnet20x1 --steps 20 --reps 5

Models: the MLP 3x512 on 1x28x28 inputs; VGG-16-BN, ResNet-20 x1 and ResNet-20 x4 on 3x32x32
inputs with crop + flip augmentation; batch 128, SGD. The data are synthetic uint8 images in a
`lmcflow.data.Data` (10 classes), so nothing is downloaded.

- train_epoch: s/step of `training.train_epoch` on a training split of exactly `steps` batches,
  against its floor: the same forward, backward and optimizer steps (the same model and
  optimizer) on batches already on the device, normalised and augmented beforehand, with the
  loss and the error summed on the device and read once at the end.
- LMC point: one point of an LMC curve as the workflow computes it, `interpolation.
  load_interpolated(bn="reset")` (lerp, BN statistics reset over the training split) plus
  `training.evaluate` on the test split, against its floor: the same forward passes (train mode
  for the reset, eval mode for the test split) on batches prepared on the device beforehand.

Both are warmed up first (one batch) and timed best of `--reps` rounds, each round the
package then its floor in the same process; on CUDA the clock is read after a synchronisation. On the CPU the
clock is the process's CPU time (the machine may be busy with other work; one torch thread by
default, as the workflow's jobs), on a GPU wall time. The ratio is what the package
costs beyond the floor: data indexing, copies, normalisation and augmentation in the loop, and
host syncs. Targets: <= 1.1x on the CPU, <= 1.3x on a GPU.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from lmcflow import interpolation, training  # noqa: E402
from lmcflow.config import TrainSetting  # noqa: E402
from lmcflow.data import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, Data, sample_order  # noqa: E402
from lmcflow.models import build_model  # noqa: E402

BATCH = 128
TARGET = {"cpu": 1.1, "cuda": 1.3}


@dataclasses.dataclass(frozen=True)
class Bench:
    label: str
    arch: str
    args: dict
    in_shape: tuple[int, int, int]
    augment: bool
    cpu: tuple[int, int, int, int]  # CPU defaults: steps, LMC train and test samples, LMC batch


# CPU defaults keep the whole run under ~3 minutes on 2 cores (the big models get few steps and
# a small LMC split); a GPU runs every model with GPU_DEFAULTS.
MODELS = {
    "mlp": Bench("MLP 3×512", "mlp", {"width": 512, "depth": 3}, (1, 28, 28), False,
                 (100, 4000, 1000, 1000)),
    "vgg16": Bench("VGG-16-BN", "vgg", {"depth": 16, "batch_norm": True}, (3, 32, 32), True,
                   (3, 500, 250, 250)),
    "resnet20x1": Bench("ResNet-20 ×1", "resnet20", {"width": 1}, (3, 32, 32), True,
                        (10, 500, 500, 500)),
    "resnet20x4": Bench("ResNet-20 ×4", "resnet20", {"width": 4}, (3, 32, 32), True,
                        (2, 250, 250, 250)),
}
GPU_DEFAULTS = (50, 10000, 10000, 1000)  # the workflow's LMC batch (lmc.batch_size) is 1000


def synthetic_data(shape, n_train: int, n_test: int, seed: int = 0) -> Data:
    """Random uint8 images and labels of 10 classes, with the real datasets' mean and std."""
    g = torch.Generator().manual_seed(seed)
    mean, std = (MNIST_MEAN, MNIST_STD) if shape[0] == 1 else (CIFAR10_MEAN, CIFAR10_STD)
    x = torch.randint(0, 256, (n_train + n_test, *shape), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return Data("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], mean, std, 10)


def timed(fns, device: torch.device, reps: int, clock) -> list[float]:
    """Best time of each of ``fns`` over ``reps`` rounds, each round running them one after the
    other: drift (other load, an allocator still growing its pools: the first epochs of
    ResNet-20 x4 page-fault more) then hits the package and its floor alike. On CUDA
    synchronised before each clock read."""
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[i] = min(best[i], clock() - tic)
    return best


# ------------------------------------------------------------------------------ training step


def floor_batches(data: Data, s: TrainSetting, epoch: int, noise_seed: int, device):
    """The batches train_epoch draws for (noise_seed, epoch), normalised and augmented on the
    device beforehand (same generator, same order, same augmentation draws)."""
    gen = torch.Generator().manual_seed(training.derive_seed(noise_seed, epoch))
    order = torch.randperm(len(data.train_y), generator=gen)
    batches = []
    for idx in order.split(s.batch_size):
        x = data.train_x[idx]
        if s.augment:
            x = training.augment(x, gen)
        batches.append((data.normalize(x.to(device)), data.train_y[idx].to(device)))
    return batches


def floor_epoch(model, opt, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """train_epoch's forward/backward/step on prepared batches; loss and errors stay on the
    device (the one host sync is the caller's)."""
    model.train()
    total = wrong = torch.zeros((), device=batches[0][1].device)
    for x, y in batches:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = total + loss.detach() * len(y)
        wrong = wrong + (logits.argmax(1) != y).sum()
    return total, wrong


def bench_training(b: Bench, steps: int, device, reps: int, clock) -> dict:
    s = TrainSetting(batch_size=BATCH, lr=0.05, momentum=0.9, weight_decay=5e-4, augment=b.augment)
    data = synthetic_data(b.in_shape, steps * BATCH, BATCH)
    torch.manual_seed(0)
    model = build_model(b.arch, b.in_shape, 10, **b.args).to(device)
    opt = training.make_optimizer(model, s)
    warm = dataclasses.replace(data, train_x=data.train_x[:BATCH], train_y=data.train_y[:BATCH])
    training.train_epoch(model, opt, warm, s, 0, 0, device)  # one step: allocations, kernels
    batches = floor_batches(data, s, 1, 0, device)
    floor_epoch(model, opt, batches[:1])
    seconds, floor = timed([lambda: training.train_epoch(model, opt, data, s, 1, 0, device),
                            lambda: [t.item() for t in floor_epoch(model, opt, batches)]],
                           device, reps, clock)
    return {"what": "train_epoch", "model": b.label, "steps": steps, "reset_samples": "",
            "eval_samples": "", "batch": BATCH, "seconds": seconds / steps, "floor": floor / steps}


# ------------------------------------------------------------------------------ one LMC point


def lmc_point(model, state_a, state_b, data: Data, batch: int, device) -> tuple[float, float]:
    """θ_½ with its BN statistics reset on the training split, evaluated on the test split."""
    interpolation.load_interpolated(model, state_a, state_b, 0.5, data, "reset", batch, device)
    return training.evaluate(model, data.test_x, data.test_y, data.normalize, batch, device)


def lmc_floor_batches(data: Data, batch: int, device):
    """reset_bn's batches (its seeded order) and the test split's, normalised on the device."""
    order = sample_order(len(data.train_y), interpolation.RESET_SEED)
    reset = [data.normalize(data.train_x[idx].to(device)) for idx in order.split(batch)]
    test = [(data.normalize(x.to(device)), y.to(device))
            for x, y in zip(data.test_x.split(batch), data.test_y.split(batch))]
    return reset, test


@torch.no_grad()
def lmc_floor(model, reset, test) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward passes of one LMC point: train mode over the reset batches (none without
    BatchNorm), then eval mode over the test batches, loss and errors summed on the device."""
    bns = interpolation.batchnorm_modules(model)
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    if bns:
        model.train()
        for x in reset:
            model(x)
    model.eval()
    loss = wrong = torch.zeros((), device=test[0][1].device, dtype=torch.float64)
    for x, y in test:
        logits = model(x).double()  # as evaluate: the loss in float64
        loss = loss + F.cross_entropy(logits, y, reduction="sum")
        wrong = wrong + (logits.argmax(1) != y).sum()
    return loss, wrong


def bench_lmc(b: Bench, n_train: int, n_test: int, batch: int, device, reps: int, clock) -> dict:
    data = synthetic_data(b.in_shape, n_train, n_test, seed=1)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_model(b.arch, b.in_shape, 10, **b.args)
        states.append({k: v.to(device) for k, v in net.state_dict().items()})
    model = net.to(device)
    warm = dataclasses.replace(data, train_x=data.train_x[:batch], train_y=data.train_y[:batch],
                               test_x=data.test_x[:batch], test_y=data.test_y[:batch])
    lmc_point(model, *states, warm, batch, device)  # one batch of each: allocations, kernels
    reset, test = lmc_floor_batches(data, batch, device)
    lmc_floor(model, reset[:1], test[:1])
    seconds, floor = timed([lambda: lmc_point(model, *states, data, batch, device),
                            lambda: [t.item() for t in lmc_floor(model, reset, test)]],
                           device, reps, clock)
    has_bn = bool(interpolation.batchnorm_modules(model))
    return {"what": "lmc_point", "model": b.label, "steps": "",
            "reset_samples": n_train if has_bn else 0, "eval_samples": n_test, "batch": batch,
            "seconds": seconds, "floor": floor}


# ------------------------------------------------------------------------------ output


def markdown(rows: list[dict]) -> str:
    train = [r for r in rows if r["what"] == "train_epoch"]
    lmc = [r for r in rows if r["what"] == "lmc_point"]
    out = ["| model | device | steps | train_epoch s/step | floor s/step | ratio | target |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['device']} | {r['steps']} | {r['seconds']:.4g} | "
            f"{r['floor']:.4g} | {r['ratio']:.2f} | ≤ {r['target']} |" for r in train]
    out += ["", "| model | device | reset samples | test samples | batch | LMC point s | "
            "floor s | ratio | target |", "|---|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['model']} | {r['device']} | {r['reset_samples']} | {r['eval_samples']} | "
            f"{r['batch']} | {r['seconds']:.4g} | {r['floor']:.4g} | {r['ratio']:.2f} | "
            f"≤ {r['target']} |" for r in lmc]
    return "\n".join(out)


# seconds and floor: per step (train_epoch) or per point (lmc_point)
COLUMNS = ["what", "model", "device", "threads", "steps", "reset_samples", "eval_samples", "batch",
           "seconds", "floor", "ratio", "target"]


def write_tsv(rows: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()}
                         for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, help="train_epoch steps for every model (default: "
                        f"{GPU_DEFAULTS[0]} on a GPU; on the CPU per model, fewer for the big ones)")
    parser.add_argument("--lmc-samples", nargs=2, type=int, metavar=("TRAIN", "TEST"),
                        help=f"reset and test samples of the LMC point (GPU default "
                             f"{GPU_DEFAULTS[1]} {GPU_DEFAULTS[2]}; CPU: per model)")
    parser.add_argument("--lmc-batch", type=int, help="LMC batch size (GPU default 1000)")
    parser.add_argument("--reps", type=int, help="timed repetitions, the best counts (default "
                        "2 on the CPU, 5 on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the workflow's "
                        "jobs run 1 by default)")
    parser.add_argument("--clock", choices=["auto", "wall", "cpu"], default="auto",
                        help="cpu: process CPU time (CPU device only), robust to other load "
                             "with --threads 1; auto: cpu on the CPU, wall on a GPU")
    parser.add_argument("--out", help="also write the rows as TSV to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = training.resolve_device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        parser.error("--clock cpu measures nothing of the GPU's work; use --clock wall")
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" else "wall"
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    args.reps = args.reps or (2 if device.type == "cpu" else 5)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{args.clock} clock, best of {args.reps}", flush=True)
    rows = []
    for key in args.models:
        b = MODELS[key]
        steps, n_train, n_test, batch = b.cpu if device.type == "cpu" else GPU_DEFAULTS
        steps = args.steps or steps
        n_train, n_test = args.lmc_samples or (n_train, n_test)
        batch = args.lmc_batch or batch
        for row in (bench_training(b, steps, device, args.reps, clock),
                    bench_lmc(b, n_train, n_test, batch, device, args.reps, clock)):
            row.update(device=device.type, threads=args.threads,
                       ratio=row["seconds"] / row["floor"], target=TARGET[device.type])
            rows.append(row)
            print(f"{row['what']:<12} {b.label:<14} {row['seconds']:.4g} s vs floor "
                  f"{row['floor']:.4g} s: {row['ratio']:.2f}x", flush=True)
    print()
    print(markdown(rows))
    if args.out:
        write_tsv(rows, args.out)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
