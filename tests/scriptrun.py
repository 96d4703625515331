"""Run a workflow script (workflow/scripts/*.py) in-process with a stand-in for Snakemake's
`snakemake` object, so tests exercise exactly the code a job runs without a DAG around it."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

from snakemake.iocontainers import Namedlist

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
if str(SCRIPTS) not in sys.path:  # as Snakemake does: scripts import their neighbour _path
    sys.path.append(str(SCRIPTS))


def _named(value) -> Namedlist:
    if isinstance(value, dict):
        return Namedlist(fromdict={k: str(v) if isinstance(v, Path) else v for k, v in value.items()})
    return Namedlist(toclone=[str(v) for v in value])


def run_script(name: str, *, input=(), output=(), params=None, wildcards=None, log=(),
               threads: int = 1) -> dict:
    """Execute workflow/scripts/{name}.py as the job with these files and values would."""
    job = SimpleNamespace(input=_named(input), output=_named(output),
                          params=_named(params or {}), wildcards=_named(wildcards or {}),
                          log=_named(log), threads=threads, rule=name)
    return runpy.run_path(str(SCRIPTS / f"{name}.py"), init_globals={"snakemake": job})
