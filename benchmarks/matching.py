"""Benchmark Git Re-Basin weight matching against its own matmul floor.

Two independently initialised networks (seeds 0 and 1, PyTorch default init) per row, matched
with :func:`lmcflow.alignment.weight_matching` (float32 costs, linear assignments on the CPU by
:func:`lmcflow.alignment.assignment.solve`: lap where installed, else scipy). Models: the paper MLP 784-(512w)x3-10 and ResNet-20 ("ln": LayerNorm over channels at every position) on 3x32x32, at width
multipliers 1, 4, 16, 32. Each row runs in its own subprocess, so the peak memory is that row's
alone (CPU: VmHWM, read right after the matching, including both float32 models; GPU:
torch.cuda.max_memory_allocated of the matching).

The floor is the matmuls one sweep cannot avoid: for every group, for every (tensor, axis) of
it, ``A(axis first, flattened) @ B(axis first, flattened)^T`` with contiguous float32 operands
made beforehand, one torch.mm each. It is timed in the same process right after the matching,
best of repetitions as the matching is (repeated while under --min-seconds), so the ratio
holds up on a loaded machine even where the seconds do not;
``--clock cpu --threads 1`` times both in process CPU time, which other load barely touches.

    python benchmarks/matching.py                      # CPU table (+ GPU table when present)
    python benchmarks/matching.py --widths 1 4 --models mlp
    python benchmarks/matching.py --max-sweeps-above 100000000 2   # cap the MLP x16/x32 rows
    python benchmarks/matching.py --trained            # float32 vs float64 costs, trained pairs

The MLP x16/x32 rows are dominated by the assignments (scipy on 8192^2 / 16384^2 matrices takes
about 10 s / 1 min each) and need about 10 / 20 GB of memory; cap their sweeps.

Columns: floor = matmul floor of one sweep; s/sweep = matching time per sweep (setup excluded:
the copies into the matmul layouts and the start objective), ratio = s/sweep / floor; sweep1 =
the first sweep, where every group is solved and nearly every unit moves (later sweeps solve
only the groups whose neighbours changed, and update costs through the moved units' rows),
and its ratio; no LSA = (s/sweep - assignment time per sweep) / floor; sweeps (* = stopped at
the cap), solves = assignments solved; total = one weight_matching call (setup included); cost /
lsa / upd = wall seconds in cost matrices, assignments, exact gains and row moves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _rss import peak_rss_mb  # benchmarks/ is on sys.path: scripts run from it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))


def build(model: str, width: int, seed: int, in_shape=None):
    import torch

    from lmcflow.models import build_model

    torch.manual_seed(seed)
    if model == "mlp":
        return build_model("mlp", in_shape or (1, 28, 28), 10, width=512 * width, depth=3)
    if model == "resnet20":
        return build_model("resnet20", in_shape or (3, 32, 32), 10, width=width, norm="ln")
    raise ValueError(model)


def floor_operands(spec, state_a, state_b, device):
    """Per (group, key, axis): contiguous float32 (n, rest) operands of A and B."""
    import torch

    ops = []
    for group in sorted(spec.groups):
        for key, axis in spec.groups[group]:
            if key not in spec.cost_keys:
                continue
            a, b = (spec.view(key, s[key]).to(device, torch.float32).movedim(axis, 0)
                    .reshape(spec.sizes[group], -1).contiguous() for s in (state_a, state_b))
            ops.append((a, b))
    return ops


def clock_fn(name: str):
    return time.process_time if name == "cpu" else time.perf_counter


def timed(fn, device, min_seconds: float, max_reps: int, clock):
    """Best time of ``fn()`` over repetitions (until min_seconds spent, at most max_reps),
    with the result of the best run."""
    import torch

    best, spent, reps, result = float("inf"), 0.0, 0, None
    while reps < 1 or (spent < min_seconds and reps < max_reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = clock()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = clock() - tic
        spent, reps = spent + elapsed, reps + 1
        if elapsed < best:
            best, result = elapsed, out
    return best, result


def matmul_floor(spec, state_a, state_b, device, min_seconds: float, clock) -> tuple[float, float]:
    """(seconds, GFLOP) of one sweep's matmuls on pre-made contiguous float32 operands."""
    import torch

    ops = floor_operands(spec, state_a, state_b, device)
    flops = sum(2 * a.shape[0] * a.shape[0] * a.shape[1] for a, _ in ops)
    seconds, _ = timed(lambda: [torch.mm(a, b.T) for a, b in ops], device, min_seconds, 20, clock)
    return seconds, flops / 1e9


def run_one(model: str, width: int, threads: int, max_sweeps: int, device_name: str,
            min_seconds: float, clock_name: str) -> dict:
    import torch

    from lmcflow.alignment import weight as matching
    from lmcflow.alignment import permutation_spec, weight_matching

    torch.set_num_threads(threads)
    device, clock = torch.device(device_name), clock_fn(clock_name)
    net_a, net_b = build(model, width, 0), build(model, width, 1)
    spec = permutation_spec(net_a)
    params = sum(p.numel() for p in net_a.parameters())
    state_a = {k: v.to(device) for k, v in net_a.state_dict().items()}
    state_b = {k: v.to(device) for k, v in net_b.state_dict().items()}
    del net_a, net_b
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    lsa = matching.solve

    def match():  # sweep times from the log calls (at the start and after each sweep)
        marks, lsa_time = [], [0.0]

        def timed_lsa(*args, **kwargs):
            tic = clock()
            out = lsa(*args, **kwargs)
            lsa_time[0] += clock() - tic
            return out

        matching.solve = timed_lsa
        try:
            _, info = weight_matching(spec, state_a, state_b, max_sweeps=max_sweeps, seed=0,
                                      log=lambda _: marks.append(clock()))
        finally:
            matching.solve = lsa
        return marks, lsa_time[0], info

    # Repeated while cheap (best run kept), like the floor: both are minima over repetitions.
    total, (marks, lsa_s, info) = timed(match, device, min_seconds, 10, clock)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = peak_rss_mb()
    floor, gflop = matmul_floor(spec, state_a, state_b, device, min_seconds, clock)
    sweeps, hist = info["sweeps"], info["history"]
    return {
        "model": model, "width": width, "params": params, "device": device_name,
        "groups": len(spec.sizes), "max_group": max(spec.sizes.values()),
        "floor": floor, "gflop": gflop, "seconds": total, "sweeps": sweeps,
        "converged": hist[-1] == hist[-2], "per_sweep": (marks[-1] - marks[0]) / sweeps,
        "first_sweep": marks[1] - marks[0], "lsa_per_sweep": lsa_s / sweeps,
        "solves": info["solves"], "seconds_cost": info["seconds_cost"],
        "seconds_assignment": info["seconds_assignment"], "seconds_update": info["seconds_update"],
        "objective_start": hist[0], "objective": info["objective"], "peak_mb": peak_mb,
    }


def print_table(rows_args, args, device: str) -> None:
    header = (f"{'model':<9} {'width':>5} {'params':>12} {'max n':>6} {'GFLOP':>7} "
              f"{'floor s':>8} {'s/sweep':>8} {'ratio':>5} {'sweep1':>8} {'ratio':>5} "
              f"{'no LSA':>6} {'sweeps':>6} {'solves':>6} {'total s':>8} {'cost':>7} {'lsa':>7} "
              f"{'upd':>6} {'obj start':>10} {'obj end':>10} {'peak MB':>8}")
    print(f"\nweight_matching on {device}, torch threads = {args.threads}, float32 costs, "
          f"{args.clock} clock", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    for model, width, max_sweeps in rows_args:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        out = subprocess.run(
            [sys.executable, __file__, "--threads", str(args.threads), "--min-seconds",
             str(args.min_seconds), "--clock", args.clock,
             "--single", f"{model},{width},{max_sweeps},{device}"],
            capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{model:<9} {width:>5} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        sweeps = f"{r['sweeps']}{'' if r['converged'] else '*'}"
        f = r["floor"]
        print(f"{r['model']:<9} {r['width']:>5} {r['params']:>12,} {r['max_group']:>6} "
              f"{r['gflop']:>7.1f} {f:>8.4f} {r['per_sweep']:>8.4f} {r['per_sweep'] / f:>5.2f} "
              f"{r['first_sweep']:>8.4f} {r['first_sweep'] / f:>5.2f} "
              f"{(r['per_sweep'] - r['lsa_per_sweep']) / f:>6.2f} {sweeps:>6} {r['solves']:>6} "
              f"{r['seconds']:>8.2f} {r['seconds_cost']:>7.2f} {r['seconds_assignment']:>7.2f} "
              f"{r['seconds_update']:>6.2f} {r['objective_start']:>10.4g} {r['objective']:>10.4g} "
              f"{r['peak_mb']:>8.0f}   (load {os.getloadavg()[0]:.1f})", flush=True)


# ---------------------------------------------------------------------------------------------
# float32 vs float64 costs on trained pairs.


def train(model: str, width: int, seed: int, data, epochs: int):
    """SGD (momentum 0.9, lr 0.05, batch 64) from init seed ``seed``, data order seeded too."""
    import torch
    import torch.nn.functional as F

    net = build(model, width, seed, in_shape=data.shape)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=gen)
        for s in range(0, len(order), 64):
            idx = order[s:s + 64]
            loss = F.cross_entropy(net(data.normalize(data.train_x[idx])), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def trained_check(args) -> None:
    import torch

    from lmcflow.data import load_dataset
    from lmcflow.alignment import matching_objective, permutation_spec, weight_matching

    torch.set_num_threads(args.threads)
    data = load_dataset("mnist5k")
    print(f"\nfloat32 vs float64 costs on pairs trained on mnist5k (seeds 0/1), "
          f"match seeds {args.match_seeds}")
    header = (f"{'model':<9} {'width':>5} {'epochs':>6} {'seed':>4} {'obj float64':>14} "
              f"{'obj float32':>14} {'rel diff':>9} {'same units':>10} {'sweeps 64/32':>12} "
              f"{'s 64/32':>12}")
    print(header)
    print("-" * len(header), flush=True)
    for model, width, epochs in ((m, w, args.epochs) for m in args.models for w in args.widths):
        net_a, net_b = (train(model, width, s, data, epochs) for s in (0, 1))
        spec = permutation_spec(net_a)
        state_a, state_b = net_a.state_dict(), net_b.state_dict()
        for seed in args.match_seeds:
            res = {dt: weight_matching(spec, state_a, state_b, seed=seed, dtype=dt)
                   for dt in (torch.float64, torch.float32)}
            (p64, i64), (p32, i32) = res[torch.float64], res[torch.float32]
            check = matching_objective(spec, state_a, state_b, p32)
            assert abs(check - i32["objective"]) <= 1e-9 * abs(check), (check, i32["objective"])
            same = sum(int((p64[g] == p32[g]).sum()) for g in p64) / sum(spec.sizes.values())
            rel = (i32["objective"] - i64["objective"]) / abs(i64["objective"])
            print(f"{model:<9} {width:>5} {epochs:>6} {seed:>4} {i64['objective']:>14.8g} "
                  f"{i32['objective']:>14.8g} {rel:>+9.1e} {same:>10.3f} "
                  f"{i64['sweeps']:>5}/{i32['sweeps']:<6} "
                  f"{i64['seconds']:>5.1f}/{i32['seconds']:<6.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet20"])
    parser.add_argument("--widths", nargs="+", type=int, default=None,
                        help="default 1 4 16 32 (--trained: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-sweeps", type=int, default=100)
    parser.add_argument("--max-sweeps-above", nargs=2, type=int, metavar=("PARAMS", "SWEEPS"),
                        help="cap sweeps at SWEEPS for models with more than PARAMS parameters")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="repeat the matching and the floor until this much time is spent "
                             "(at least twice each); the best run counts")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time for the matching and the floor, robust to "
                             "other load on the machine with --threads 1")
    parser.add_argument("--devices", nargs="+", default=None,
                        help="default: cpu, and cuda when available")
    parser.add_argument("--trained", action="store_true",
                        help="only the float32-vs-float64 check on trained pairs")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--match-seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--single", help=argparse.SUPPRESS)  # "model,width,max_sweeps,device"
    args = parser.parse_args()

    if args.single:
        model, width, max_sweeps, device = args.single.split(",")
        print(json.dumps(run_one(model, int(width), args.threads, int(max_sweeps), device,
                                 args.min_seconds, args.clock)))
        return
    if args.trained:
        args.widths = args.widths or [1]
        trained_check(args)
        return

    import torch

    args.widths = args.widths or [1, 4, 16, 32]
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for model in args.models:
        for width in args.widths:
            max_sweeps = args.max_sweeps
            if args.max_sweeps_above:
                params = sum(p.numel() for p in build(model, width, 0).parameters())
                if params > args.max_sweeps_above[0]:
                    max_sweeps = min(max_sweeps, args.max_sweeps_above[1])
            rows.append((model, width, max_sweeps))
    for device in devices:
        print_table(rows, args, device)
    clock = ("wall clock, inflated when the load exceeds the cores in use" if args.clock == "wall"
             else "process CPU time, except cost/lsa/upd (wall)")
    print(f"\n* = stopped at the sweep cap before converging; load = 1-min system load after the "
          f"row (seconds are {clock}; the ratios compare times taken in the same process)")


if __name__ == "__main__":
    main()
