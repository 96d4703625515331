"""A throw-away one-node SLURM cluster on localhost (munge + slurmctld + slurmd), for tests.

    cluster = LocalSlurm(some_empty_dir)
    cluster.start()        # ClusterUnavailable: this machine can't have one; ClusterError: failed
    ...                    # sbatch/squeue/scontrol work; jobs run on node `localhost`
    cluster.stop()         # cancels jobs, stops what it started, restores /etc/slurm

It needs root (or password-less sudo) and the Debian/Ubuntu packages slurmctld, slurmd,
slurm-client and munge (`install()` gets them with apt-get). The cluster has no accounting
(sacct fails: job status comes from squeue, which keeps finished jobs for MinJobAge = 600 s),
`nproc` CPUs, 90 % of the memory, and one fake GPU (tests/slurm/gres.conf).

The config goes to /etc/slurm/slurm.conf because job steps read it from there (the jobstep
plugin drops SLURM_CONF); an existing slurm.conf/gres.conf is backed up and put back. Daemons
are started with `-f <dir>/etc/slurm.conf`, so one left behind by a killed test run (its command
line contains "lmcflow-slurm") is recognised and stopped by the next run; daemons started by
anyone else make `start()` refuse instead.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import string
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARKER = "lmcflow-slurm"
LOCK = Path("/tmp/lmcflow-slurm-test.lock")  # one test cluster per machine at a time
ETC = Path("/etc/slurm")
CONFIG_FILES = ("slurm.conf", "gres.conf")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo",
            "munged", "munge", "unmunge")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


class ClusterError(RuntimeError):
    """Setting up or talking to the cluster failed (a bug, or a broken installation)."""


class ClusterUnavailable(ClusterError):
    """This machine cannot have the test cluster: no apt-get/root to install SLURM, or another
    SLURM already runs here (the reason says which)."""


def which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def as_root(cmd: list[str]) -> list[str]:
    return cmd if os.geteuid() == 0 else ["sudo", "-n", *cmd]


def run(cmd: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed ({out.returncode}): "
                                 f"{(out.stderr or out.stdout).strip()[-2000:]}")
    return out


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def require_root(purpose: str) -> None:
    if os.geteuid() == 0:
        return
    if which("sudo") is None or run(["sudo", "-n", "true"], check=False).returncode != 0:
        raise ClusterUnavailable(f"neither root nor password-less sudo, needed to {purpose}")


def install() -> None:
    """apt-get the SLURM and munge packages if any binary is missing."""
    if not missing_binaries():
        return
    if which("apt-get") is None:
        raise ClusterUnavailable(f"SLURM is not installed ({', '.join(missing_binaries())} "
                                 "missing) and there is no apt-get to install it")
    require_root("install SLURM")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(as_root(["apt-get", "update", "-q"]), timeout=600, env=env)
        run(as_root(["apt-get", "install", "-y", "-q", *PACKAGES]),
            timeout=900, env=env)
    except (ClusterError, subprocess.TimeoutExpired) as err:
        raise ClusterUnavailable(f"apt-get could not install {' '.join(PACKAGES)}: {err}") from None
    if missing_binaries():
        raise ClusterUnavailable(f"still missing after apt-get: {', '.join(missing_binaries())}")


def parse_records(text: str) -> list[dict[str, str]]:
    """`scontrol show job -o` / `show node -o`: one record per line of Key=Value fields
    (values with spaces, which these tests don't read, are cut at the first space)."""
    records = []
    for line in text.splitlines():
        if "=" not in line:
            continue
        fields = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        records.append(fields)
    return records


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own exited child that nobody reaped) is gone for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def processes(names: tuple[str, ...]) -> dict[int, str]:
    """pid -> command line of running processes whose executable name is in `names`."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if comm in names and pid_alive(int(proc.name)):
            found[int(proc.name)] = cmdline
    return found


def signal_pid(pid: int, sig: int) -> None:
    if os.geteuid() == 0:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    else:
        run(["sudo", "-n", "kill", f"-{int(sig)}", str(pid)], check=False)


def stop_pid(pid: int, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still there after `timeout` seconds."""
    signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        signal_pid(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def detected_memory_mb() -> int:
    out = run([which("slurmd") or "slurmd", "-C"], check=False)
    found = re.search(r"RealMemory=(\d+)", out.stdout)
    if found:
        return int(found.group(1))
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1)) // 1024


class LocalSlurm:
    """One-node cluster whose state, spool and logs live under `root` (an empty directory)."""

    def __init__(self, root: Path, ctld_port: int = 6817, slurmd_port: int = 6818):
        self.root = Path(root).resolve()
        if MARKER not in str(self.root):
            raise ValueError(f"root must contain {MARKER!r} (it marks the daemons as ours)")
        self.ports = (ctld_port, slurmd_port)
        self.config = self.root / "etc" / "slurm.conf"
        self.started: dict[str, int] = {}  # daemon -> pid, only those this object started
        self._lock = None
        self._installed: list[str] = []  # files written to /etc/slurm
        self._created_etc = False

    # ------------------------------------------------------------------------------- life cycle

    def start(self, timeout: float = 90) -> "LocalSlurm":
        install()
        require_root("write /etc/slurm and start the SLURM daemons")
        self._acquire_lock(timeout=900)
        try:
            self._refuse_foreign_daemons()
            self._start_munge()
            self._write_config()
            self._start_daemons(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons this object started, restore /etc/slurm."""
        try:
            if "slurmctld" in self.started and pid_alive(self.started["slurmctld"]):
                self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                pid = self.started.pop(name, None)
                if pid is not None:
                    stop_pid(pid)
            self._restore_config()
            self._release_lock()

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------------- queries

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones stay MinJobAge = 600 s), with details:
        JOB_GRES is what the job was allocated (gpu:1), TresPerJob what it asked for."""
        out = run(["scontrol", "show", "job", "-d", "-o"], check=False)
        return parse_records(out.stdout)

    def node(self) -> dict[str, str]:
        return parse_records(run(["scontrol", "show", "node", "-o", "localhost"]).stdout)[0]

    def cancel_all(self, timeout: float = 30) -> None:
        """scancel every queued or running job and wait until none is left running."""
        active = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED")
        ids = [j["JobId"] for j in self.jobs() if j.get("JobState") in active]
        if ids:
            self.cancel(*ids, check=False)
            try:
                wait_for("cancelled jobs to end",
                         lambda: not any(j.get("JobState") in active for j in self.jobs()),
                         timeout)
            except ClusterError:
                pass

    def cancel(self, *job_ids: str, check: bool = True) -> None:
        """scancel the jobs, as an administrator would (state CANCELLED)."""
        run(as_root(["scancel", *job_ids]), check=check)

    def log(self, daemon: str = "slurmctld") -> str:
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ------------------------------------------------------------------------------------ steps

    def _acquire_lock(self, timeout: float) -> None:
        self._lock = open(LOCK, "a+")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self._lock.close()
                    self._lock = None
                    raise ClusterUnavailable(f"another test cluster held {LOCK} for {timeout} s")
                time.sleep(2)

    def _release_lock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _refuse_foreign_daemons(self) -> None:
        for pid, cmdline in processes(("slurmctld", "slurmd")).items():
            if MARKER in cmdline:  # left behind by a killed run of this test (we hold the lock)
                stop_pid(pid)
            else:
                raise ClusterUnavailable(
                    f"a SLURM daemon not started by this test is running (pid {pid}: {cmdline}); "
                    "the test needs a machine where it can run its own one-node cluster")
        for port in self.ports:
            if run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], check=False).returncode == 0:
                raise ClusterUnavailable(f"port {port} (SLURM's) is in use by another program")

    def _munge_works(self) -> bool:
        cred = run(["munge", "-n"], check=False)
        return cred.returncode == 0 and run(["unmunge"], input=cred.stdout, check=False).returncode == 0

    def _start_munge(self) -> None:
        if self._munge_works():  # a munged is already running: use it, leave it alone
            return
        if not Path("/etc/munge/munge.key").exists():
            run(as_root(["mungekey", "--create"]))
            run(as_root(["chown", "munge:munge", "/etc/munge/munge.key"]))
        run(as_root(["mkdir", "-p", "/run/munge"]))
        run(as_root(["chown", "munge:munge", "/run/munge"]))
        run(as_root(["runuser", "-u", "munge", "--", which("munged")]))
        wait_for("munge credentials to work", self._munge_works, 10)
        pids = list(processes(("munged",)))
        if len(pids) == 1:  # the one just started (none ran before): stop() ends it
            self.started["munged"] = pids[0]

    def _write_config(self) -> None:
        for sub in ("etc", "state", "spool", "run", "log", "backup"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        template = string.Template((HERE / "slurm.conf.in").read_text())
        self.config.write_text(template.substitute(
            root=self.root, cpus=len(os.sched_getaffinity(0)),
            memory=int(0.9 * detected_memory_mb()),
            ctld_port=self.ports[0], slurmd_port=self.ports[1]))
        shutil.copy(HERE / "gres.conf", self.root / "etc" / "gres.conf")
        if not ETC.exists():
            run(as_root(["mkdir", "-p", str(ETC)]))
            self._created_etc = True
        # our own config, left because a test run was killed before stop(): not worth a backup
        left_by_killed_run = "ClusterName=lmcflow-test" in self._read(ETC / "slurm.conf")
        for name in CONFIG_FILES:
            if (ETC / name).exists() and not left_by_killed_run:
                run(as_root(["cp", "-p", str(ETC / name), str(self.root / "backup" / name)]))
            run(as_root(["cp", str(self.root / "etc" / name), str(ETC / name)]))
            self._installed.append(name)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text()
        except OSError:
            return ""

    def _restore_config(self) -> None:
        while self._installed:
            name = self._installed.pop()
            backup = self.root / "backup" / name
            if backup.exists():
                run(as_root(["cp", "-p", str(backup), str(ETC / name)]), check=False)
            else:
                run(as_root(["rm", "-f", str(ETC / name)]), check=False)
        if self._created_etc:
            run(as_root(["rmdir", str(ETC)]), check=False)
            self._created_etc = False

    def _start_daemons(self, timeout: float) -> None:
        for name, args in (("slurmctld", ["-c"]), ("slurmd", ["-N", "localhost"])):
            run(as_root([which(name), *args, "-f", str(self.config)]))
            pidfile = self.root / "run" / f"{name}.pid"
            wait_for(f"{name}'s pid file", lambda: pidfile.exists() and pidfile.read_text().strip(),
                     30, 0.2)
            self.started[name] = int(pidfile.read_text().split()[0])

        def node_ready():
            if not all(pid_alive(pid) for pid in self.started.values()):
                raise ClusterError(f"a SLURM daemon died:\n{self.log()[-3000:]}"
                                         f"\n{self.log('slurmd')[-3000:]}")
            out = run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            return out.returncode == 0 and out.stdout.split() == ["localhost", "idle"]

        wait_for("node localhost to be idle in sinfo", node_ready, timeout)
        if "gpu" not in self.node().get("Gres", ""):
            run(as_root(["scontrol", "update", "nodename=localhost", "gres=gpu:1"]))
        out = run(["srun", "-N1", "-t", "1", "hostname"], timeout=timeout, check=False)
        if out.returncode != 0:
            raise ClusterError(f"`srun -N1 hostname` failed: {out.stderr.strip()[-2000:]}")
