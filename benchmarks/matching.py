"""Benchmark Git Re-Basin weight matching on CPU.

Two independently initialised networks (seeds 0 and 1, PyTorch default init) per row, matched
with :func:`lmcflow.matching.weight_matching` (float64 costs, scipy linear_sum_assignment).
Models: the paper MLP 784-(512w)x3-10 and ResNet-20 (GroupNorm, "ln") on 3x32x32, at width
multipliers 1, 4, 16. Each row runs in its own subprocess so the peak RSS (ru_maxrss) is that
row's alone; it includes building the two float32 models.

    python benchmarks/matching.py                    # full table
    python benchmarks/matching.py --widths 1 4 --models mlp
    python benchmarks/matching.py --max-sweeps-above 50000000 1   # cap very large rows

Columns: cost_s / lsa_s split the matching time into building the cost matrices (torch
matmuls) and solving the assignments (scipy); s/sweep = time / sweeps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))


def build(model: str, width: int, seed: int):
    import torch

    from lmcflow.models import build_model

    torch.manual_seed(seed)
    if model == "mlp":
        return build_model("mlp", (1, 28, 28), 10, width=512 * width, depth=3)
    if model == "resnet20":
        return build_model("resnet20", (3, 32, 32), 10, width=width, norm="ln")
    raise ValueError(model)


def run_one(model: str, width: int, threads: int, max_sweeps: int) -> dict:
    import torch

    from lmcflow.matching import permutation_spec, weight_matching

    torch.set_num_threads(threads)
    net_a, net_b = build(model, width, 0), build(model, width, 1)
    spec = permutation_spec(net_a)
    params = sum(p.numel() for p in net_a.parameters())
    state_a, state_b = net_a.state_dict(), net_b.state_dict()
    del net_a, net_b
    start = time.perf_counter()
    _, info = weight_matching(spec, state_a, state_b, max_sweeps=max_sweeps, seed=0)
    wall = time.perf_counter() - start
    hist = info["history"]
    converged = info["sweeps"] < max_sweeps or (len(hist) > 1 and hist[-1] == hist[-2])
    return {
        "model": model, "width": width, "params": params,
        "groups": len(spec.sizes), "max_group": max(spec.sizes.values()),
        "seconds": wall, "sweeps": info["sweeps"], "converged": converged,
        "seconds_cost": info["seconds_cost"], "seconds_assignment": info["seconds_assignment"],
        "objective_start": hist[0], "objective": info["objective"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet20"])
    parser.add_argument("--widths", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-sweeps", type=int, default=100)
    parser.add_argument("--max-sweeps-above", nargs=2, type=int, metavar=("PARAMS", "SWEEPS"),
                        help="cap sweeps at SWEEPS for models with more than PARAMS parameters")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # "model,width,max_sweeps": one row
    args = parser.parse_args()

    if args.single:
        model, width, max_sweeps = args.single.split(",")
        print(json.dumps(run_one(model, int(width), args.threads, int(max_sweeps))))
        return

    header = (f"{'model':<9} {'width':>5} {'params':>12} {'groups':>6} {'max n':>6} "
              f"{'time s':>9} {'sweeps':>7} {'s/sweep':>8} {'cost_s':>9} {'lsa_s':>8} "
              f"{'obj start':>10} {'obj end':>10} {'peak RSS MB':>11}")
    print(f"weight_matching, CPU, torch threads = {args.threads}, float64 costs", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    for model in args.models:
        for width in args.widths:
            max_sweeps = args.max_sweeps
            if args.max_sweeps_above:
                params = sum(p.numel() for p in build(model, width, 0).parameters())
                if params > args.max_sweeps_above[0]:
                    max_sweeps = min(max_sweeps, args.max_sweeps_above[1])
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(
                [sys.executable, __file__, "--threads", str(args.threads),
                 "--single", f"{model},{width},{max_sweeps}"],
                capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            sweeps = f"{r['sweeps']}{'' if r['converged'] else '*'}"
            print(f"{r['model']:<9} {r['width']:>5} {r['params']:>12,} {r['groups']:>6} "
                  f"{r['max_group']:>6} {r['seconds']:>9.2f} {sweeps:>7} "
                  f"{r['seconds'] / r['sweeps']:>8.2f} {r['seconds_cost']:>9.2f} "
                  f"{r['seconds_assignment']:>8.2f} {r['objective_start']:>10.4g} "
                  f"{r['objective']:>10.4g} {r['peak_rss_mb']:>11.0f}   "
                  f"(load avg {os.getloadavg()[0]:.1f})",
                  flush=True)
    print("* = stopped at the sweep cap before converging; load avg = 1-min system load after "
          "the row (timings are wall clock, inflated when it exceeds the cores in use)")


if __name__ == "__main__":
    main()
