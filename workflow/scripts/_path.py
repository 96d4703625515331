"""Makes the package importable in a job: Snakemake puts this folder on sys.path, the package
lives one level up (workflow/lmcflow), and no install step or PYTHONPATH is needed. The folder
goes first, ahead of any other copy of lmcflow on the path (an installed one, or the path
Snakemake itself appends), so a job always runs the package beside its script."""

import sys
from pathlib import Path

_WORKFLOW = str(Path(__file__).resolve().parents[1])
if sys.path[:1] != [_WORKFLOW]:
    sys.path = [_WORKFLOW] + [p for p in sys.path if p != _WORKFLOW]
