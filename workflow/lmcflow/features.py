"""Feature maps of named layers, streamed to Parquet batch by batch and read back the same way.

File layout (one file per pair): one row per probe sample, a `sample` column (index into the test
split) and one column per (network, layer) named "{network}/{layer}", where network is "A", "B"
or "alpha=0.25"-style; each cell is the layer's output for that sample flattened to float32
(a fixed-size list). One Parquet row group per forward batch, so writing holds one batch of
features in memory and readers iterate row groups (`iter_feature_batches`) instead of loading the
file. Schema metadata records the networks and layers in order.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from .io import atomic_path


def column(network: str, layer: str) -> str:
    return f"{network}/{layer}"


def alpha_network(alpha: float) -> str:
    return f"alpha={alpha:g}"


@contextmanager
def capture(model: nn.Module, layers: list[str], inputs: bool = False):
    """Record the outputs of `layers` (module names) during forward passes: name -> (B, D).

    With `inputs=True`, record each module's first input instead, unflattened (e.g. the
    pre-activation a ReLU receives, or the H a Linear/Conv2d multiplies).
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise KeyError(f"layers {missing} are not modules of {type(model).__name__}")
    store: dict[str, torch.Tensor] = {}

    def hook(name):
        # copies: a later in-place op (a ReLU with inplace=True) must not change what was read
        def output_hook(_module, _inputs, output):
            store[name] = output.detach().flatten(1).clone()

        def input_hook(_module, args):
            store[name] = args[0].detach().clone()

        return input_hook if inputs else output_hook

    register = "register_forward_pre_hook" if inputs else "register_forward_hook"
    handles = [getattr(modules[name], register)(hook(name)) for name in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def probe_indices(n: int, size: int, seed: int) -> np.ndarray:
    """A fixed, sorted random subset of `size` indices out of n (all of them if size >= n)."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def stored_subset(samples: np.ndarray, size: int, seed: int) -> np.ndarray:
    """The probe samples whose features are written to the file: a fixed seeded subset of
    ``size`` of them (sorted; all of them if size >= len(samples))."""
    samples = np.asarray(samples)
    return samples[probe_indices(len(samples), size, seed)]


@torch.no_grad()
def write_features(path: str | Path, networks: dict[str, nn.Module], layers: list[str],
                   x: torch.Tensor, samples: np.ndarray, normalize: Callable, batch_size: int,
                   device="cpu", metadata: dict | None = None, log=print,
                   store: np.ndarray | None = None,
                   on_batch: Callable[[np.ndarray, dict[str, torch.Tensor]], None] | None = None
                   ) -> None:
    """Run every network on x[samples] batch by batch; write the features of the samples in
    ``store`` (default: all) to ``path``, one row group per batch that has any.

    ``on_batch(idx, features)`` sees every batch's features of every sample, as tensors on the
    device keyed by `column(network, layer)` (B, D): metrics computed there cover the whole
    probe set, however few samples the file keeps (its size is that of ``store``).
    """
    keep = None if store is None else np.asarray(store)
    writer = None
    with atomic_path(path) as tmp:
        try:
            for start in range(0, len(samples), batch_size):
                idx = np.asarray(samples[start:start + batch_size])
                xb = normalize(x[torch.as_tensor(idx, device=x.device)].to(device))
                feats = {}
                for net_name, net in networks.items():
                    net.eval()
                    with capture(net, layers) as store_:
                        net(xb)
                    feats |= {column(net_name, layer): store_[layer] for layer in layers}
                if on_batch is not None:
                    on_batch(idx, feats)
                rows = np.ones(len(idx), bool) if keep is None else np.isin(idx, keep)
                table = _feature_table(idx[rows], {k: v[torch.as_tensor(rows, device=v.device)]
                                                   for k, v in feats.items()})
                if writer is None:  # the first batch fixes the schema, even if it stores nothing
                    meta = {"networks": list(networks), "layers": layers, **(metadata or {})}
                    schema = table.schema.with_metadata({"lmcflow": json.dumps(meta)})
                    writer = pq.ParquetWriter(tmp, schema)
                if table.num_rows:
                    writer.write_table(table.replace_schema_metadata(writer.schema.metadata))
                log(f"features: {start + len(idx)}/{len(samples)} samples")
        finally:
            if writer is not None:
                writer.close()


def _feature_table(idx: np.ndarray, feats: dict[str, torch.Tensor]) -> pa.Table:
    """One row per sample: its index and a fixed-size float32 list per (network, layer)."""
    arrays = {"sample": pa.array(idx, pa.int64())}
    for name, value in feats.items():
        value = value.float().cpu().numpy()  # (B, D)
        arrays[name] = pa.FixedSizeListArray.from_arrays(value.reshape(-1), value.shape[1])
    return pa.table(arrays)


def read_metadata(path: str | Path) -> dict:
    return json.loads(pq.read_schema(path).metadata[b"lmcflow"])


def iter_feature_batches(path: str | Path, columns: list[str]) -> Iterator[dict[str, np.ndarray]]:
    """Yield {column: array} one row group at a time; feature columns come as (B, D) float32."""
    file = pq.ParquetFile(path)
    for group in range(file.num_row_groups):
        table = file.read_row_group(group, columns=columns)
        out = {}
        for name in columns:
            col = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                out[name] = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
            else:
                out[name] = col.to_numpy()
        yield out
