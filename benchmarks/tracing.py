"""Benchmark permutation-spec tracing (lmcflow.alignment.trace_spec) over the model zoo.

    python benchmarks/tracing.py                  # every model
    python benchmarks/tracing.py --models resnet50 vit_b_16 --reps 5 --check

Per model: parameters, the wall time of ``trace_spec`` on a batch-1 example input (median
over ``--reps`` runs after one warm-up: symbolic trace + a pass over the graph on meta
tensors + building the spec), the plain eval forward pass on real tensors for scale, and the
spec's size: groups, state_dict keys, keys with a permuted axis, permuted axis entries (a
concatenated axis counts once), the largest group, SpecWarnings raised. ``--check`` also
times ``check_equivalence``.
Models: the built-ins at their paper sizes, torchvision's resnet18 (with and without
BatchNorm), vgg11_bn, mobilenet_v2 (depthwise), squeezenet1_1 (concatenation), vit_b_16
(packed nn.MultiheadAttention) and resnet50.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from lmcflow.models import build_model  # noqa: E402
from lmcflow.alignment import SpecWarning, check_equivalence, trace_spec  # noqa: E402


def zoo() -> dict:
    """name -> (constructor, input shape)."""
    import torchvision.models as tv

    return {
        "mlp": (lambda: build_model("mlp", (1, 28, 28), 10, width=512, depth=3), (1, 28, 28)),
        "lenet": (lambda: build_model("lenet", (1, 28, 28), 10), (1, 28, 28)),
        "vgg16_bn": (lambda: build_model("vgg", (3, 32, 32), 10, depth=16,
                                         classifier=[4096, 4096]), (3, 32, 32)),
        "resnet20": (lambda: build_model("resnet20", (3, 32, 32), 10, norm="ln"), (3, 32, 32)),
        "resnet18": (lambda: build_model("resnet18", (3, 32, 32), 10), (3, 32, 32)),
        "vit": (lambda: build_model("vit", (1, 28, 28), 10), (1, 28, 28)),
        "tv_resnet18": (lambda: tv.resnet18(num_classes=10), (3, 32, 32)),
        "tv_resnet18_no_norm": (lambda: tv.resnet18(num_classes=10, norm_layer=nn.Identity),
                                (3, 32, 32)),
        "tv_vgg11_bn": (lambda: tv.vgg11_bn(num_classes=10), (3, 32, 32)),
        "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), (3, 224, 224)),
        "squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), (3, 224, 224)),
        "vit_b_16": (lambda: tv.vit_b_16(num_classes=10), (3, 224, 224)),
        "resnet50": (lambda: tv.resnet50(num_classes=10), (3, 224, 224)),
    }


def run(name: str, make, shape, reps: int, check: bool) -> dict:
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(1, *shape)
    times = []
    for _ in range(reps + 1):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SpecWarning)
            start = time.perf_counter()
            spec = trace_spec(model, x)
            times.append(time.perf_counter() - start)
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    forward = time.perf_counter() - start
    row = {
        "model": name, "params": sum(p.numel() for p in model.parameters()),
        "input": "x".join(map(str, shape)), "trace_s": statistics.median(times[1:]),
        "forward_s": forward, "groups": len(spec.sizes), "keys": len(spec.axes),
        "permuted_keys": sum(any(e is not None for e in spec.entries(k)) for k in spec.axes),
        "permuted_axes": sum(e is not None for k in spec.axes for e in spec.entries(k)),
        "max_group": max(spec.sizes.values(), default=0),
        "warnings": sum(issubclass(w.category, SpecWarning) for w in caught),
    }
    if check:
        start = time.perf_counter()
        row["check_err"] = check_equivalence(model, spec, x)["max_rel_error"]
        row["check_s"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = zoo()
    parser.add_argument("--models", nargs="+", default=list(models), choices=list(models))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="also time check_equivalence")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    header = (f"{'model':<20} {'params':>12} {'input':>10} {'trace s':>8} {'fwd s':>7} "
              f"{'groups':>6} {'keys':>5} {'perm keys':>9} {'perm axes':>9} {'max n':>6} "
              f"{'warn':>4}" + (f" {'check s':>8} {'check err':>9}" if args.check else ""))
    print(f"trace_spec, CPU, torch threads = {args.threads}, batch-1 input, median of "
          f"{args.reps} runs after a warm-up", flush=True)
    print(header)
    print("-" * len(header), flush=True)
    for name in args.models:
        make, shape = models[name]
        r = run(name, make, shape, args.reps, args.check)
        line = (f"{r['model']:<20} {r['params']:>12,} {r['input']:>10} {r['trace_s']:>8.3f} "
                f"{r['forward_s']:>7.3f} {r['groups']:>6} {r['keys']:>5} "
                f"{r['permuted_keys']:>9} {r['permuted_axes']:>9} {r['max_group']:>6} "
                f"{r['warnings']:>4}")
        if args.check:
            line += f" {r['check_s']:>8.2f} {r['check_err']:>9.1e}"
        print(line, flush=True)
    print("trace s: trace_spec wall time (fx trace + meta pass + spec); fwd s: one real eval "
          "forward pass on the same input, for scale")


if __name__ == "__main__":
    main()
