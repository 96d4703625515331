"""Files: atomic writes (a killed job never leaves a half-written artifact) and safe loads."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The file ends up with the mode a plain open() would give it (0o666 minus the umask), not
    the 0o600 of a temporary file, so results can be shared (a group on a cluster).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_torch(obj, path: str | os.PathLike) -> None:
    import torch  # here, not at the top: table and figure jobs use this module without torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location="cpu", hint: str | None = None):
    """`torch.load(weights_only=True)` with an error that names the file, the likely cause and
    what to do: `hint` for a file the user brings, else how to make the workflow remake it."""
    import torch
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; "
                                + (hint or f"make it with: {rebuild_command(path)}"))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, pickle of foreign classes, not a torch file, ...
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
            + (hint or f"rebuild it with: {rebuild_command(path)}")
        ) from err


def rebuild_command(path: str | os.PathLike) -> str:
    """What to type to remake one file (and then what depends on it). Deleting it is not enough:
    Snakemake does not remake a missing intermediate file whose dependents are up to date."""
    return (f"snakemake --cores 1 --force {path}  (add the --configfile/--profile options of "
            "your run), then re-run your usual command to update what depends on it")


def save_json(obj, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")


def save_parquet(df, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
