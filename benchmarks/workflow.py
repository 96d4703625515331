"""Benchmark the workflow: run a config from scratch and print wall time and peak memory per job.

    python benchmarks/workflow.py [--config config.yaml] [--cores 8] [--keep DIR]

Runs `snakemake --cores N` on a copy of the config in a fresh directory (so nothing is reused),
then reads the `benchmark:` files every rule writes (results/benchmarks/**.tsv: wall seconds,
peak RSS) and prints one row per job, a sum per rule and the whole run's wall time.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config.yaml"))
    parser.add_argument("--cores", default="8")
    parser.add_argument("--keep", help="run in this directory and keep it (default: a temp dir)")
    parser.add_argument("targets", nargs="*", help="snakemake targets (default: all)")
    args = parser.parse_args()

    workdir = Path(args.keep or tempfile.mkdtemp(prefix="lmcflow-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.config, workdir / "config.yaml")
    cmd = [str(Path(sys.executable).parent / "snakemake"), "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--cores", args.cores, "--quiet", *(args.targets or ["all"])]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0

    rows = []
    for tsv in sorted((workdir / "results/benchmarks").rglob("*.tsv")):
        job = tsv.relative_to(workdir / "results/benchmarks").with_suffix("")
        bench = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"job": str(job), "rule": job.parts[-2], "wall_s": bench["s"],
                     "peak_rss_mb": bench["max_rss"], "cpu_s": bench["cpu_time"]})
    jobs = pd.DataFrame(rows)
    pd.set_option("display.width", 120)
    print(jobs.to_string(index=False, float_format="%.1f"))
    per_rule = jobs.groupby("rule").agg(jobs=("job", "size"), wall_s=("wall_s", "sum"),
                                        max_wall_s=("wall_s", "max"),
                                        peak_rss_mb=("peak_rss_mb", "max"), cpu_s=("cpu_s", "sum"))
    print("\nper rule (wall_s summed over its jobs; jobs run in parallel):")
    print(per_rule.sort_values("wall_s", ascending=False).to_string(float_format="%.1f"))
    print(f"\nwhole run: {wall:.1f} s wall with --cores {args.cores}, {len(jobs)} jobs, in {workdir}")
    if not args.keep:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
