"""Activation matching of residual streams: every block output pooled (`matching.residual:
pooled`) vs the last block output of each stage (`last`, as the REPAIR notebooks match a
stream), on independently trained ResNet-20 pairs.

    python benchmarks/residual_matching.py [--pairs 2] [--first-pair 0] [--epochs 10] [--width 1]
                                           [--norm bn] [--data mnist5k] [--keep DIR] [--quick]

Trains 2·pairs runs with the workflow's own training (`train` settings below; pair p is seeds
2p and 2p + 1; `--keep` caches them), aligns B to A by activation matching both ways (and by
weight matching, for reference; `--quick`: activation matching only, BN reset only), and prints per pair and method: the share of each stream's units that both
ways assign alike, the mean matched correlation of the stream groups, and the loss and error
at α = ½ and the barrier against the mean of the endpoints (test split) under every
normalisation policy the model has (reset and REPAIR with BatchNorm; interpolate and REPAIR
without).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from lmcflow.config import TrainSetting  # noqa: E402
from lmcflow.data import load_dataset  # noqa: E402
from lmcflow.interpolation import lmc_curve  # noqa: E402
from lmcflow.alignment import (activation_matching, apply_permutation, permutation_spec,  # noqa: E402
                              weight_matching)
from lmcflow.models import build_model, has_batchnorm  # noqa: E402
from lmcflow.training import run_training  # noqa: E402


def train(data, args, seed: int, keep: Path) -> dict:
    path = keep / f"{args.data}_resnet20_{args.norm}_w{args.width:g}_e{args.epochs}_seed{seed}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    torch.manual_seed(seed)
    model = build_model("resnet20", data.shape, data.num_classes, width=args.width, norm=args.norm)
    s = TrainSetting(epochs=args.epochs, batch_size=64, lr=0.05, momentum=0.9,
                     weight_decay=5e-4, schedule="cosine")
    with tempfile.TemporaryDirectory() as tmp:
        run_training(model, data, s, noise_seed=seed, ckpt_dir=tmp, meta={"seed": seed},
                     log=lambda m: print(f"  seed {seed}: {m}", flush=True))
    torch.save(model.state_dict(), path)
    return model.state_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--first-pair", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="activation matching pooled vs last only, one policy (reset / interpolate)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--width", type=float, default=1)
    parser.add_argument("--norm", default="bn", choices=["bn", "ln"])
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--batches", type=int, default=20, help="activation matching: batches")
    parser.add_argument("--batch-size", type=int, default=200, help="activation matching")
    parser.add_argument("--keep", type=Path, default=None, help="cache trained runs here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    keep = args.keep or Path(tempfile.mkdtemp())
    keep.mkdir(parents=True, exist_ok=True)
    data = load_dataset(args.data)
    build = lambda: build_model("resnet20", data.shape, data.num_classes,  # noqa: E731
                                width=args.width, norm=args.norm)
    policies = ["reset", "repair"] if has_batchnorm(build()) else ["interpolate", "repair"]
    policies = policies[:1] if args.quick else policies
    rows, agree = [], []
    for p in range(args.first_pair, args.first_pair + args.pairs):
        state_a, state_b = train(data, args, 2 * p, keep), train(data, args, 2 * p + 1, keep)
        model_a, model_b = build(), build()
        model_a.load_state_dict(state_a)
        model_b.load_state_dict(state_b)
        spec = permutation_spec(model_a)
        perms, infos = {}, {}
        for residual in ("pooled", "last"):
            tic = time.perf_counter()
            perms[residual], infos[residual] = activation_matching(
                model_a, model_b, spec, data, args.batches, args.batch_size, seed=0,
                residual=residual)
            print(f"pair {p}: activation matching ({residual}) {time.perf_counter() - tic:.1f} s",
                  flush=True)
        if not args.quick:
            perms["weight_matching"], _ = weight_matching(spec, state_a, state_b)
        streams = sorted(g for g in spec.features if len(spec.features[g]) > 1)
        for g in streams:
            same = float((perms["pooled"][g] == perms["last"][g]).double().mean())
            agree.append({"pair": p, "group": g, "units": spec.sizes[g], "same_share": same,
                          "corr_pooled": infos["pooled"]["per_group"][g],
                          "corr_last": infos["last"]["per_group"][g]})
        methods = {"naive": None, "am_pooled": perms["pooled"], "am_last": perms["last"],
                   "weight_matching": perms.get("weight_matching")}
        if args.quick:
            methods = {k: methods[k] for k in ("am_pooled", "am_last")}
        for method, perm in methods.items():
            b = state_b if perm is None else apply_permutation(spec, perm, state_b)
            for bn in policies:
                curve = lmc_curve(build(), state_a, b, data, [0.0, 0.5, 1.0], bn=bn,
                                  batch_size=1000, log=lambda _: None)
                test = curve[curve.split == "test"].set_index("alpha")
                rows.append({"pair": p, "method": method, "bn": bn,
                             "loss_mid": test.loss[0.5],
                             "loss_barrier": test.loss[0.5] - (test.loss[0.0] + test.loss[1.0]) / 2,
                             "error_mid_pct": 100 * test.error[0.5],
                             "error_barrier_pp": 100 * (test.error[0.5]
                                                        - (test.error[0.0] + test.error[1.0]) / 2)})
            print(pd.DataFrame(rows[-len(policies):]).to_string(index=False), flush=True)
    pd.set_option("display.width", 200)
    print("\nunits assigned alike by pooled and last, per stream group:")
    print(pd.DataFrame(agree).to_string(index=False, float_format="%.3f"))
    table = pd.DataFrame(rows)
    print("\nα = ½ on the test split (per pair):")
    print(table.to_string(index=False, float_format="%.3f"))
    print("\nmean over pairs:")
    print(table.groupby(["method", "bn"], sort=False).mean(numeric_only=True)
          .drop(columns="pair").to_string(float_format="%.3f"))


if __name__ == "__main__":
    main()
