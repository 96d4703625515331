"""lmcflow.io: atomic writes that honour the umask, loads that say what to type next."""

import os
import stat

import pytest
import torch

from lmcflow.io import load_torch, save_json, save_torch


@pytest.fixture
def umask():
    """Set a umask for one test and put the previous one back."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_a_plain_open_would(tmp_path, umask, mask, mode):
    umask(mask)
    save_json({"a": 1}, tmp_path / "x.json")
    save_torch({"w": torch.zeros(2)}, tmp_path / "sub" / "x.pt")
    with open(tmp_path / "plain", "w"):
        pass
    for name in ("x.json", "sub/x.pt", "plain"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_corrupt_or_missing_checkpoint_says_how_to_rebuild_it(tmp_path):
    path = tmp_path / "model_a.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"snakemake --cores 1 --force {path}"):
        load_torch(path)
    with pytest.raises(FileNotFoundError, match="--force"):
        load_torch(tmp_path / "missing.pt")
