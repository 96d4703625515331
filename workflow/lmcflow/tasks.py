"""Tasks: named variants of a dataset that share its label space (one registry).

A task is a fixed, label-preserving transform of the images, applied to the train and the test
split alike, so every task has its own train and test split (the test split is the base test
split transformed). All transforms are exact on uint8 pixels (no interpolation, no randomness):
- ``original``: the images as they are;
- ``rotated``: turned 90° counter-clockwise (``torch.rot90`` over H, W);
- ``inverted``: 255 − x (white digits on black become black on white);
- ``flipped``: mirrored left–right;
- ``transposed``: rows and columns swapped (a mirror about the main diagonal).
Inputs keep the base dataset's normalisation (its mean and std), so a task changes what the
network sees, not how it is preprocessed.

A dataset spec (the ``data`` mapping jobs get through ``params:``) may carry ``tasks``: a list of
task names; :func:`load_task_data` loads the base dataset and returns the tasks' splits
concatenated (train with train, test with test, in the listed order), the data a pair of two
tasks is analysed on.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Callable

import torch

from .data import Data, load_dataset

TASKS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "original": (lambda x: x, "the images as they are"),
    "rotated": (lambda x: torch.rot90(x, 1, dims=(-2, -1)), "turned 90° counter-clockwise"),
    "inverted": (lambda x: 255 - x, "255 − x: dark digits on a light background"),
    "flipped": (lambda x: torch.flip(x, dims=(-1,)), "mirrored left–right"),
    "transposed": (lambda x: x.transpose(-2, -1), "rows and columns swapped"),
}
DEFAULT_TASK = "original"


def check_task(name: str) -> None:
    """Raise ValueError naming the choices (and close matches) unless ``name`` is a task."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} (tasks: {', '.join(TASKS)})")


def apply_task(data: Data, name: str) -> Data:
    """``data`` with both splits transformed by task ``name``; square images for the rotation
    and transposition (MNIST-like data)."""
    check_task(name)
    transform = TASKS[name][0]
    if name in ("rotated", "transposed") and data.shape[1] != data.shape[2]:
        raise ValueError(f"task {name!r} needs square images; {data.name} has {data.shape[1:]}")
    return dataclasses.replace(data, name=f"{data.name}:{name}",
                               train_x=transform(data.train_x).contiguous(),
                               test_x=transform(data.test_x).contiguous())


def task_data(data: Data, tasks: list[str]) -> Data:
    """The splits of every task in ``tasks`` concatenated (train with train, test with test)."""
    if not tasks:
        return data
    parts = [apply_task(data, t) for t in tasks]
    if len(parts) == 1:
        return parts[0]
    cat = lambda key: torch.cat([getattr(p, key) for p in parts])  # noqa: E731
    return dataclasses.replace(data, name=f"{data.name}:{'+'.join(tasks)}",
                               **{k: cat(k) for k in ("train_x", "train_y", "test_x", "test_y")})


def task_offsets(data: Data, tasks: list[str]) -> dict[str, tuple[int, int]]:
    """Where each task's test samples lie in ``task_data(data, tasks).test_x``: task ->
    (start, stop)."""
    n = len(data.test_y)
    return {t: (i * n, (i + 1) * n) for i, t in enumerate(tasks)}


def load_task_data(name: str, tasks: list[str] | None = None, **spec) -> Data:
    """`data.load_dataset` plus the tasks of the spec (see the module docstring)."""
    return task_data(load_dataset(name, **spec), list(tasks or []))
