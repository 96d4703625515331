"""Benchmark the workflow: run a config from scratch; wall time, memory and CPU per job and rule.

    python benchmarks/workflow.py [--config config.yaml] [--cores 8] [--keep DIR] [targets]

Runs `snakemake --cores N` on a copy of the config in a fresh directory (so nothing is reused),
then reads the `benchmark:` files every rule writes (results/benchmarks/**.tsv: wall seconds,
peak RSS) and the CPU line every job writes at exit to its log ("cpu: S s start-up, T s in
all": start-up is the interpreter, imports and unpacking the job before its first log line).
Prints one row per job, a sum per rule with its start-up and compute CPU, and for the whole run
its wall time and CPU (Snakemake itself and every job) with the share spent in the jobs' own
work.
"""

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

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
           "--directory", str(workdir), "--cores", args.cores, "--quiet=all",
           *(args.targets or ["all"])]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    subprocess.run(cmd, check=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0

    rows = []
    root = yaml.safe_load((workdir / "config.yaml").read_text()).get("results", "results")
    for tsv in sorted((workdir / root / "benchmarks").rglob("*.tsv")):
        job = tsv.relative_to(workdir / root / "benchmarks").with_suffix("")
        bench = pd.read_csv(tsv, sep="\t").iloc[-1]
        rows.append({"job": str(job), "rule": job.parts[-2], "wall_s": bench["s"],
                     "peak_rss_mb": bench["max_rss"], "cpu_s": bench["cpu_time"]})
    jobs = pd.DataFrame(rows).merge(_job_cpu(workdir / root / "logs"), on="job", how="left")
    pd.set_option("display.width", 120)
    print(jobs.to_string(index=False, float_format="%.1f"))
    per_rule = jobs.groupby("rule").agg(jobs=("job", "size"), wall_s=("wall_s", "sum"),
                                        max_wall_s=("wall_s", "max"),
                                        peak_rss_mb=("peak_rss_mb", "max"),
                                        startup_cpu_s=("startup_cpu_s", "sum"),
                                        work_cpu_s=("work_cpu_s", "sum"))
    print("\nper rule (sums over its jobs; jobs run in parallel):")
    print(per_rule.sort_values("wall_s", ascending=False).to_string(float_format="%.1f"))
    work, startup = jobs["work_cpu_s"].sum(), jobs["startup_cpu_s"].sum()
    print(f"\nwhole run: {wall:.1f} s wall with --cores {args.cores}, {len(jobs)} jobs, in {workdir}")
    print(f"CPU: {cpu:.1f} s in all (Snakemake and its jobs): {work:.1f} s ({100 * work / cpu:.0f} %) "
          f"in the jobs' own work, {startup:.1f} s ({100 * startup / cpu:.0f} %) in their start-up, "
          f"{cpu - work - startup:.1f} s in Snakemake")
    if not args.keep:
        shutil.rmtree(workdir)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _job_cpu(logs: Path) -> pd.DataFrame:
    """Start-up and own-work CPU seconds of every job, from the line its log ends with; the job
    name is that of its benchmark file (rule/wildcards), read from the log's first line."""
    rows = []
    for log in logs.rglob("*.log"):
        lines = log.read_text().splitlines()
        found = [re.search(r"cpu: ([\d.]+) s start-up, ([\d.]+) s in all", line) for line in lines]
        found = [m for m in found if m]
        if not lines or not found:
            continue
        rows.append({"log": str(log.relative_to(logs)), "startup_cpu_s": float(found[-1][1]),
                     "work_cpu_s": float(found[-1][2]) - float(found[-1][1])})
    table = pd.DataFrame(rows, columns=["log", "startup_cpu_s", "work_cpu_s"])
    table["job"] = table["log"].map(_job_of_log)
    return table.drop(columns="log")


def _job_of_log(log: str) -> str:
    """The benchmark name of a job from its log path (see the rules' log: and benchmark:)."""
    parts = Path(log).with_suffix("").parts
    if parts[0] in ("tables", "figures"):
        return "/".join(parts)
    if parts[1] == "runs":  # {exp}/runs/seed0 or {exp}/runs/spawn0/parent
        run = "-".join(parts[2:])
        return f"{parts[0]}/train/{run}"
    exp, _, method, pair, rule = parts  # {exp}/pairs/{method}/{pair}/{rule}
    return f"{exp}/{rule}/{method}-{pair}"


if __name__ == "__main__":
    main()
