"""Benchmark the layer-wise analyses on a trained pair: one-by-one vs batched variant evaluation.

    python benchmarks/layerwise.py [PAIR_DIR] [--eval-samples 1000]

PAIR_DIR defaults to results/mlp/pairs/naive/pair0 of the default run. Prints, per analysis,
the number of evaluated variants and the wall time with variants evaluated one by one and
batched (torch.vmap over stacked weights, one pass over the data per chunk of variants).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from lmcflow import jobs, layerwise  # noqa: E402
from lmcflow.features import probe_indices  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pair", nargs="?", default="results/mlp/pairs/naive/pair0")
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pair = Path(args.pair)
    spec, a, b = jobs.load_pair(SimpleNamespace(info=pair / "pair.json", a=pair / "model_a.pt",
                                                b=pair / "model_b.pt"))
    data = jobs.load_dataset("mnist5k")
    pick = {s: torch.as_tensor(probe_indices(len(data.split(s)[1]), args.eval_samples, 0))
            for s in ("train", "test")}
    data = dataclasses.replace(data, train_x=data.train_x[pick["train"]], train_y=data.train_y[pick["train"]],
                               test_x=data.test_x[pick["test"]], test_y=data.test_y[pick["test"]])
    model = jobs.build(spec)
    quiet = dict(log=lambda _: None, bn="interpolate")
    analyses = {
        "single_layer_barriers": lambda: layerwise.single_layer_barriers(model, a, b, data, **quiet),
        "cumulative_barriers": lambda: layerwise.cumulative_barriers(model, a, b, data, **quiet),
        "layer_robustness": lambda: layerwise.layer_robustness(model, a, b, data, draws=3, **quiet),
    }
    print(f"{'analysis':<24}{'rows':>6}{'one by one s':>14}{'batched s':>11}{'speed-up':>10}")
    for name, run in analyses.items():
        times = {}
        for mode in ("one by one", "batched"):
            layerwise._Evaluator.MAX_STACKED = 0 if mode == "one by one" else 2 ** 26
            t0 = time.perf_counter()
            rows = len(run())
            times[mode] = time.perf_counter() - t0
        print(f"{name:<24}{rows:>6}{times['one by one']:>14.2f}{times['batched']:>11.2f}"
              f"{times['one by one'] / times['batched']:>9.1f}x")


if __name__ == "__main__":
    main()
