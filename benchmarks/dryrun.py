"""How long Snakemake takes to plan a large sweep: a dry run of a width × seed config.

    python benchmarks/dryrun.py [--experiments 100] [--repeats 3]

Writes a config of N MLP experiments (one sweep: widths × seeds, every method, layer-wise
analyses on, so about 17 jobs each) into a temporary directory and times `snakemake -n` on it (parse, config
validation, DAG of every job); prints the job count, the best wall time of the repeats, and
the time of `snakemake --version` (Python and Snakemake start-up) for comparison.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def sweep(n: int) -> dict:
    """One sweep of widths × seeds: n experiments (rounded up to a multiple of the widths)."""
    widths = [64, 128, 256, 512, 1024]
    seeds = [100 * i for i in range(-(-n // len(widths)))]
    return {"experiments": {"mlp": {
        "sweep": {"model.width": widths, "seed": seeds},
        "model": {"arch": "mlp", "depth": 3},
        "train": {"epochs": 10, "checkpoint_epochs": [1, 2, 5]},
        "methods": ["spawning", "naive", "weight_matching", "activation_matching"],
    }}}


def best(cmd: list[str], repeats: int, cwd: Path) -> tuple[float, str]:
    times, out = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lmcflow-dryrun-"))
    (workdir / "config.yaml").write_text(yaml.safe_dump(sweep(args.experiments)))
    dry, out = best([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "-n", "--cores", "2",
                     "--quiet=rules"], args.repeats, workdir)
    version, _ = best([SNAKEMAKE, "--version"], args.repeats, workdir)
    total = re.search(r"^total\s+(\d+)", out, re.M)
    print(f"{args.experiments} experiments, {total.group(1) if total else '?'} jobs: dry run "
          f"{dry:.2f} s (best of {args.repeats}); snakemake --version {version:.2f} s")


if __name__ == "__main__":
    main()
