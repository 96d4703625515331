"""The `slurm` profile on a real one-node SLURM cluster (tests/slurm/cluster.py sets it up: munge,
slurmctld, slurmd, one fake GPU; apt-get installs the packages where they are missing).

- A small config runs through `snakemake --profile slurm`, typed in the repository root, so the
  repository's slurm/config.v8+.yaml is the profile used. Every job must have gone through sbatch
  (slurmctld lists it, completed, with the profile's memory and time limits) and the tables must
  equal, exactly, those of the same config run locally with --cores 2 (CPU, one thread per job).
- A job with a GPU request (`--set-resources train:gpu=1`, what `device: cuda` makes the heavy
  rules ask for) is submitted with --gpus=1, gets the fake GPU, and still trains on the CPU.

- A training job cancelled mid-run (scancel, once its first epoch checkpoint exists) is
  submitted again by the profile's `retries`, resumes from that checkpoint, and the run ends by
  itself with the final weights of an uninterrupted run, tensor for tensor.
- Without SLURM (no sbatch/squeue on PATH) `--profile slurm` stops at start-up with a message
  that names what is missing, instead of failing at its first submission 40 s later; a dry run
  still plans the SLURM run. These tests are fast and need no cluster.

Every run is wrapped in `timeout`, so a run that loses track of its jobs fails instead of
hanging; leftover jobs are cancelled and the daemons stopped at the end.
"""

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
PROFILE = yaml.safe_load((REPO / "slurm" / "config.v8+.yaml").read_text())
TIMEOUT = 900  # seconds for one snakemake run; the module takes minutes (job start-up, polling)


def _load_cluster_module():
    # loaded by path: a package named `slurm` would clash with the profile folder slurm/
    spec = importlib.util.spec_from_file_location("lmcflow_test_cluster",
                                                  Path(__file__).parent / "slurm" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cluster_lib = _load_cluster_module()

SMALL = {
    "experiments": {
        "mlp": {
            "model": {"arch": "mlp", "width": 64, "depth": 2},
            "train": {"epochs": 2},
            "spawn_epoch": 1,
            "llfc": {"probe_size": 50},
            "methods": ["spawning", "naive"],
        }
    }
}
TABLES = ["results/tables/lmc.parquet", "results/tables/llfc.parquet"]
RULES = {"train", "train_parent", "train_child", "make_pair", "analyse_pair", "lmc_table", "table"}
# The plugin first checks job status 40 s after a submission; a test run polls sooner. MinJobAge
# (600 s) stays far above the 3 x this that the plugin requires for squeue.
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    slurm = cluster_lib.LocalSlurm(tmp_path_factory.mktemp("lmcflow-slurm"))
    try:
        slurm.start()
    except cluster_lib.ClusterUnavailable as err:
        pytest.skip(f"no one-node SLURM cluster on this machine: {err}")
    try:
        yield slurm
    finally:
        slurm.stop()


def start_snakemake(workdir: Path, *args: str, cwd: Path) -> subprocess.Popen:
    cmd = ["timeout", "-k", "10", str(TIMEOUT), SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(workdir), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate(timeout=TIMEOUT + 30)
    if proc.returncode in (124, 137):
        pytest.fail(f"{what} did not finish within {TIMEOUT} s (lost track of its jobs?):\n"
                    f"{out[-4000:]}")
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def steps_done(out: str) -> int:
    done = re.findall(r"(\d+) of (\d+) steps \(100%\) done", out)
    assert done, out[-3000:]
    return int(done[-1][1])


def write_config(workdir: Path, config: dict) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


def rule_of(job: dict) -> str:
    """The plugin's sbatch --comment is rule_<rule>[_wildcards_<values>]."""
    return re.fullmatch(r"rule_(.+?)(_wildcards_.*)?", job["Comment"]).group(1)


def minutes(limit: str) -> int:
    """SLURM's [D-]HH:MM:SS time limit in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = map(int, hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (s > 0)


def profile_resource(rule: str, name: str):
    return PROFILE.get("set-resources", {}).get(rule, {}).get(name,
                                                              PROFILE["default-resources"][name])


@pytest.mark.slow
def test_profile_runs_the_workflow_through_sbatch_with_the_local_results(cluster, tmp_path):
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    write_config(on_slurm, SMALL)
    write_config(local, SMALL)
    before = {job["JobId"] for job in cluster.jobs()}

    start = time.monotonic()
    try:
        # both at once: the SLURM run mostly waits between status checks
        slurm_run = start_snakemake(on_slurm, "--profile", "slurm", *FAST_STATUS, *TABLES, cwd=REPO)
        local_run = start_snakemake(local, "--cores", "2", *TABLES, cwd=local)
        out = finish(slurm_run, "snakemake --profile slurm")
        local_out = finish(local_run, "snakemake --cores 2")
    finally:
        cluster.cancel_all()
    print(f"\nSLURM and local runs: {time.monotonic() - start:.0f} s")

    assert "Using profiles slurm and workflow specific profile" in out, out[:2000]
    assert "Falling back to 'sacct'" not in out
    n_jobs = steps_done(out)
    assert n_jobs == steps_done(local_out)

    # every job of the run went through sbatch: slurmctld still lists it (MinJobAge 600 s)
    jobs = [job for job in cluster.jobs() if job["JobId"] not in before]
    assert len(jobs) == n_jobs, [job.get("Comment") for job in jobs]
    assert len({job["JobName"] for job in jobs}) == 1  # the run's uuid, which squeue filters by
    assert RULES <= {rule_of(job) for job in jobs}
    for job in jobs:
        rule = rule_of(job)
        assert (job["JobState"], job["ExitCode"], job["NodeList"]) == ("COMPLETED", "0:0",
                                                                       "localhost"), job
        assert job["WorkDir"] == str(on_slurm)
        assert job["NumCPUs"] == "1"  # threads: 1
        # the profile's resources reached sbatch (--mem, -t)
        assert job["MinMemoryNode"] == f"{profile_resource(rule, 'mem_mb')}M", job
        assert minutes(job["TimeLimit"]) == profile_resource(rule, "runtime"), (rule, job)
        assert job["JOB_GRES"] == "(null)", job  # device auto -> cpu: no GPU asked for

    for table in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(on_slurm / table),
                                      pd.read_parquet(local / table), check_exact=True)


@pytest.mark.slow
def test_a_gpu_request_reaches_sbatch_and_the_job_still_runs_on_cpu(cluster, tmp_path):
    # the workflow's own request: device cuda -> gpu=1 on the heavy rules (dry run, no submission)
    cuda = {"experiments": {"mlp": {**SMALL["experiments"]["mlp"], "device": "cuda"}}}
    write_config(tmp_path / "dry", cuda)
    dry = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path / "dry"), "--profile", "slurm", "-n", *TABLES], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr[-3000:]
    gpus = {}
    for rule, block in re.findall(r"^rule (\w+):\n(.*?)(?=^\S|\Z)", dry.stdout, re.M | re.S):
        found = re.search(r"resources: .*?\bgpu=(\d+)", block)
        gpus.setdefault(rule, set()).add(found.group(1) if found else "0")
    heavy = {"train", "train_parent", "train_child", "analyse_pair"}
    assert {rule: gpus[rule] for rule in heavy} == dict.fromkeys(heavy, {"1"}), gpus
    assert gpus["table"] == {"0"}, gpus

    # a real submission with the same request, on the fake-GPU node
    workdir = tmp_path / "gpu"
    write_config(workdir, SMALL)
    before = {job["JobId"] for job in cluster.jobs()}
    try:
        proc = start_snakemake(workdir, "results/mlp/runs/seed0/final.pt", "--profile", "slurm",
                               *FAST_STATUS, "--set-resources", "train:gpu=1", cwd=REPO)
        finish(proc, "snakemake --profile slurm --set-resources train:gpu=1")
    finally:
        cluster.cancel_all()
    [job] = [job for job in cluster.jobs() if job["JobId"] not in before]
    assert rule_of(job) == "train"
    assert job["JobState"] == "COMPLETED", job
    assert job["TresPerJob"] == "gres:gpu:1", job  # sbatch --gpus=1
    assert job["JOB_GRES"] == "gpu:1", job  # and the scheduler gave it the (fake) GPU
    assert " on cpu, 1 threads" in (workdir / "results/logs/mlp/runs/seed0.log").read_text()


# Long enough (about 7 s of training on one core) that the job is still training when the test
# sees its first epoch checkpoint and cancels it, short enough to keep the test near a minute
# (most of which is the wait for the plugin's status checks, at growing intervals).
RESUMED = {"experiments": {"m": {"model": {"arch": "mlp", "width": 64, "depth": 2},
                                 "train": {"epochs": 100}}}}


def cancel_after_first_epoch(cluster: cluster_lib.LocalSlurm, checkpoints: Path,
                             before: set[str]) -> dict:
    """scancel the running training job once it has written its first epoch checkpoint (the
    checkpoint of epoch 0 is kept only on request); return the job as it was then."""
    cluster_lib.wait_for("the first epoch checkpoint",
                         lambda: any(p.name != "epoch_0000.pt" for p in checkpoints.glob("*.pt")),
                         timeout=300, interval=0.1)
    [job] = [job for job in cluster.jobs()
             if job["JobId"] not in before and job["JobState"] == "RUNNING"]
    cluster.cancel(job["JobId"])
    return job


@pytest.mark.slow
def test_a_cancelled_training_job_is_retried_and_ends_with_the_uninterrupted_weights(cluster,
                                                                                     tmp_path):
    import torch

    target = "results/m/runs/seed0/final.pt"
    cancelled, clean = tmp_path / "cancelled", tmp_path / "clean"
    write_config(cancelled, RESUMED)
    write_config(clean, RESUMED)
    before = {job["JobId"] for job in cluster.jobs()}
    start = time.monotonic()
    try:
        slurm_run = start_snakemake(cancelled, target, "--profile", "slurm", *FAST_STATUS,
                                    cwd=REPO)
        local_run = start_snakemake(clean, "--cores", "1", target, cwd=clean)
        victim = cancel_after_first_epoch(cluster, cancelled / "results/m/runs/seed0/checkpoints",
                                          before)
        out = finish(slurm_run, "snakemake --profile slurm with a cancelled job")
        finish(local_run, "snakemake --cores 1")
    finally:
        cluster.cancel_all()
    elapsed = time.monotonic() - start

    assert rule_of(victim) == "train"
    jobs = sorted((job for job in cluster.jobs() if job["JobId"] not in before),
                  key=lambda job: int(job["JobId"]))
    assert [(job["JobId"], rule_of(job), job["JobState"]) for job in jobs] == [
        (victim["JobId"], "train", "CANCELLED"), (jobs[-1]["JobId"], "train", "COMPLETED")]
    assert "Trying to restart job" in out  # Snakemake's retry, not a second run of ours
    resumed = re.search(r"resuming at epoch (\d+)",
                        (cancelled / "results/logs/m/runs/seed0.log").read_text())
    assert resumed and 1 <= int(resumed.group(1)) < 100, "cancelled too late: training had ended"
    print(f"\nSLURM run with a job cancelled and resumed at epoch {resumed.group(1)}: "
          f"{elapsed:.0f} s")
    a, b = (torch.load(d / target, weights_only=True)["model"] for d in (cancelled, clean))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


# What Snakemake itself runs before the first job (its shell, and `which` to find it).
BASICS = ("bash", "sh", "which")


def path_without_slurm(bin_dir: Path, fake: tuple[str, ...] = ()) -> str:
    """A PATH with only BASICS and, for each name in `fake`, a stand-in that records that it ran:
    no sbatch/squeue even where SLURM is installed (after the cluster tests, /usr/bin has them)."""
    bin_dir.mkdir()
    for name in BASICS:
        (bin_dir / name).symlink_to(cluster_lib.which(name))
    for name in fake:
        (bin_dir / name).write_text(f"#!/bin/sh\necho {name} >> {bin_dir}/ran\nexit 1\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("present, missing", [((), "sbatch and squeue are"),
                                              (("sbatch",), "squeue is")])
def test_without_slurm_the_profile_stops_at_start_up_naming_what_is_missing(tmp_path, present,
                                                                           missing):
    write_config(tmp_path / "run", SMALL)
    env = {**os.environ, "PATH": path_without_slurm(tmp_path / "bin", present)}
    out = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path / "run"), "--profile", "slurm", *TABLES], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    # before: "No such file or directory: 'sacct'" at the first submission, after 40 s
    assert f"but {missing} not on PATH" in out.stderr, out.stderr[-3000:]
    assert "without --profile slurm" in out.stderr and "module load slurm" in out.stderr
    # it stopped at start-up (no timing: a loaded machine is slow either way)
    assert not (tmp_path / "bin" / "ran").exists()  # no sbatch was tried
    assert not (tmp_path / "run" / "results").exists()


def test_a_dry_run_with_the_profile_needs_no_slurm(tmp_path):
    write_config(tmp_path / "run", SMALL)
    env = {**os.environ, "PATH": path_without_slurm(tmp_path / "bin")}
    out = subprocess.run([SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path / "run"), "--profile", "slurm", "-n", *TABLES], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "rule train:" in out.stdout
