"""A job's log: messages to snakemake.log[0], the exception that ends a job, CPU accounting.

Torch-free, so that table and figure jobs start quickly; `jobs.start` adds torch's threads and
device on top for the jobs that compute with it.
"""

from __future__ import annotations

import atexit
import logging
import os
import resource
import sys
import time
from pathlib import Path
from collections.abc import Callable


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start(snakemake, attempts: str | os.PathLike | None = None
          ) -> tuple[Callable[[str], None], logging.Logger]:
    """Set up logging to snakemake.log[0] (follow it with `tail -f`); return (log, logger).

    ``attempts``: a file beside a job's own resumable files (a run's checkpoints) that keeps the
    lines of every attempt. Snakemake deletes the log of an interrupted job before running it
    again; where that file exists, the new log starts with the earlier attempts' lines and a
    line that marks the new attempt. (The job deletes the file when it starts afresh.)

    An exception that ends the job is written to the log file too, message and traceback (it
    also goes to stderr as usual), so `show-failed-logs` and a look at the log show why a job
    failed. At exit the log gets the job's CPU time, split into start-up (interpreter, imports,
    reading the job's parameters: everything before this call) and the rest
    (`benchmarks/workflow.py` reads it)."""
    startup = cpu_seconds()
    logger = logging.getLogger(f"lmcflow.{snakemake.rule}")
    logger.setLevel(logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)  # progress goes to the log; only problems here
    console.setLevel(logging.INFO if not snakemake.log else logging.WARNING)
    earlier = Path(attempts).read_text() if attempts and Path(attempts).is_file() else ""
    if snakemake.log:
        Path(snakemake.log[0]).write_text(earlier)
    files = [logging.FileHandler(path, mode="a") for path in (*snakemake.log[:1], attempts)
             if path]
    for h in (console, *files):
        h.setFormatter(fmt)
        logger.addHandler(h)
    failed = _log_uncaught_exceptions(logger, files)
    log_path = snakemake.log[0] if snakemake.log else None
    # a real job (not a test running a script in its own process) ends without Python's
    # teardown: unloading torch & co. costs ~2 s of CPU per job and nothing a finished job needs
    fast_exit = type(snakemake).__module__.startswith("snakemake")
    atexit.register(_finish, log_path, startup, failed, fast_exit)
    wildcards = ", ".join(f"{k}={v}" for k, v in snakemake.wildcards.items())
    again = " - a new attempt (the lines above are from an earlier one)" if earlier else ""
    logger.info(f"{snakemake.rule} [{wildcards}]{again}")
    return logger.info, logger


def _finish(path: str | None, startup: float, failed: list, fast_exit: bool) -> None:
    """At exit: append the job's CPU time to its log, then, with ``fast_exit``, flush every
    stream and leave at once with the job's exit status (1 after an uncaught exception)."""
    logging.shutdown()
    if path:
        try:
            with open(path, "a") as fh:
                fh.write(f"{time.strftime('%H:%M:%S')} cpu: {startup:.2f} s start-up, "
                         f"{cpu_seconds():.2f} s in all\n")
        except OSError:
            pass
    if fast_exit:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if failed else 0)


def _log_uncaught_exceptions(logger: logging.Logger, handlers: list[logging.Handler]) -> list:
    """Write an exception that ends the script to `handlers` (the log file) before the usual
    traceback on stderr; return a list that gets an entry when that happens."""
    previous, failed = sys.excepthook, []

    def hook(kind, value, tb):
        failed.append(kind)
        record = logger.makeRecord(logger.name, logging.ERROR, "(job)", 0,
                                   f"job failed: {kind.__name__}: {value}", None, (kind, value, tb))
        for h in handlers:
            h.handle(record)
        previous(kind, value, tb)

    sys.excepthook = hook
    return failed
