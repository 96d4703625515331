"""Peak memory and disk of the per-pair analysis job as the probe set grows: both must stay flat.

    python benchmarks/llfc_memory.py [--probes 100 1000] [--stored 100] [--width 512] [--batch 100]

Writes one pair (two MLPs of the default config's shape, untrained: memory does not depend on
the weights) and runs the workflow's own analyse_pair script (LMC on a 3-point grid, LLFC,
mechanisms, stitching) for every probe size, each in its own
process so that its peak RSS (VmHWM) is its own: A, B and θ_α for three α run batch by batch,
the per-sample LLFC rows computed as the features stream by, the features of `--stored`
samples kept in Parquet, then weak additivity, commutativity and stitching. Prints probe size,
the Parquet file's size, the LLFC table's rows, the job's peak RSS and wall time. The job holds
one batch of features at a time and the file keeps the stored subset only, so neither may
grow with the probe size (beyond the output tables: one row per sample, layer and α).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from _rss import peak_rss_mb  # benchmarks/ is on sys.path: scripts run from it

REPO = Path(__file__).resolve().parents[1]


def child(step: str, workdir: Path, probe: int, width: int, batch: int, stored: int) -> None:
    """One step in this process; prints a JSON line with its peak RSS and wall time."""
    sys.path[:0] = [str(REPO / "workflow"), str(REPO / "tests")]
    from scriptrun import run_script  # the workflow's script, as a job runs it

    spec = {"arch": "mlp", "args": {"width": width, "depth": 3}, "in_shape": [1, 28, 28],
            "num_classes": 10}
    pair = {"a": workdir / "model_a.pt", "b": workdir / "model_b.pt", "info": workdir / "pair.json"}
    if step == "pair":
        import torch

        from lmcflow.io import save_torch
        from lmcflow.models import build_model

        for seed, key in ((0, "a"), (1, "b")):
            torch.manual_seed(seed)
            save_torch(build_model("mlp", (1, 28, 28), 10, width=width, depth=3).state_dict(),
                       pair[key])
        pair["info"].write_text(json.dumps({"spec": spec}))
        return
    ids = {"experiment": "bench", "method": "naive", "pair": "pair0"}
    t0 = time.perf_counter()
    setting = {"data": {"name": "mnist5k", "data_dir": "data", "download": False},
               "device": "cpu", "seed": 0,
               "lmc": {"points": 3, "bn": "reset", "batch_size": 1000, "policies": ["reset"]},
               "llfc": {"alphas": [0.25, 0.5, 0.75], "probe_size": probe, "batch_size": batch,
                        "stored_samples": stored}}
    out = {name: workdir / f"{name}_{probe}.parquet" for name in
           ("lmc", "features", "llfc", "weak_additivity", "commutativity", "stitching")}
    run_script("analyse_pair", input=pair, output=out, params={"setting": setting}, wildcards=ids,
               threads=2)
    peak = peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "seconds": time.perf_counter() - t0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--stored", type=int, default=100, help="llfc.stored_samples")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # step (pair, llfc), workdir
    parser.add_argument("--probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), args.probe, args.width, args.batch, args.stored)
        return
    workdir = Path(tempfile.mkdtemp(prefix="lmcflow-llfc-mem-"))

    def run(step: str, probe: int = 0) -> dict:
        out = subprocess.run([sys.executable, __file__, "--child", step, str(workdir),
                              "--probe", str(probe), "--width", str(args.width),
                              "--batch", str(args.batch), "--stored", str(args.stored)],
                             capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        return json.loads(out.stdout.strip().splitlines()[-1]) if step != "pair" else {}

    run("pair")
    print(f"MLP 784-{args.width}x3-10, 5 networks (A, B, 3 alphas), batch {args.batch}, "
          f"features of {args.stored} samples stored")
    print(f"{'probe':>7} {'llfc_rows':>10} {'features_mb':>12} {'job_peak_mb':>12} {'job_s':>7}")
    for probe in args.probes:
        job = run("llfc", probe)
        size = (workdir / f"features_{probe}.parquet").stat().st_size / 2 ** 20
        rows = pq.read_metadata(workdir / f"llfc_{probe}.parquet").num_rows
        print(f"{probe:>7} {rows:>10} {size:>12.1f} {job['peak_mb']:>12.0f} {job['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
