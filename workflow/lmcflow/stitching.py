"""Model stitching (LLFC appendix): one network's feature at layer ℓ fed into the rest of the other.

If LLFC holds, A's and B's features at every layer are nearly interchangeable (for permutation
methods B is π(B), whose units are aligned with A's), so replacing B's output of layer ℓ by A's
for the same input ("A into B") barely changes B's predictions, and vice versa. The official
code overwrites the output of the same module of B with A's; so does this one, with a forward
hook that returns A's output of the module in place of B's.

Stitch points: the model's feature layers (`models.feature_layers`) except activation modules
(stitching a ReLU's output equals stitching its input) and the logits (stitching there is just
the other network): Linear/Conv outputs of MLP, LeNet and VGG, stem and block outputs of the
ResNets (with ``first_feature="conv1"`` the stem's conv output before its norm, as the official
code's ``conv1``, instead of the stem's output after its ReLU).
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import feature_layers

NONE = "(none)"  # the `layer` of the rows that evaluate a network on its own


def stitch_points(model: nn.Module, first_feature: str = "stem") -> list[str]:
    """The feature layers (`models.feature_layers` with ``first_feature``) but activation
    modules and the logits."""
    modules = dict(model.named_modules())
    layers = feature_layers(model, first_feature)[:-1]
    return [n for n in layers if not isinstance(modules[n], (nn.ReLU, nn.GELU))]


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the stitched layer is recorded."""


def _output_of(model: nn.Module, layer: str, x: Tensor) -> Tensor:
    """The output of module ``layer`` of ``model`` on ``x`` (the forward stops there)."""
    store = {}

    def hook(_m, _i, out):
        store["out"] = out
        raise _Stop

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    return store["out"]


def _stitched(model: nn.Module, layer: str, feature: Tensor, x: Tensor) -> Tensor:
    """Logits of ``model`` on ``x`` with the output of ``layer`` replaced by ``feature``."""
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, _o: feature)
    try:
        return model(x)
    finally:
        handle.remove()


@torch.no_grad()
def stitching(model_a: nn.Module, model_b: nn.Module, x: Tensor, y: Tensor, normalize: Callable,
              batch_size: int = 1000, device="cpu", log: Callable[[str], None] = print,
              first_feature: str = "stem") -> pd.DataFrame:
    """Loss and error of every stitched network on (x, y), and of A and B on their own.

    Rows: for each stitch point ℓ (``layer``, ``layer_index`` in forward order) and
    ``into`` ∈ {a, b}: the network ``into`` with its output of ℓ replaced by the other
    network's ("into b" = A's feature fed into the rest of B); and rows with layer "(none)",
    layer_index −1: A (into a) and B (into b) themselves. Columns: layer, layer_index, into,
    loss (mean cross-entropy), error (fraction). Both models in eval mode, as given (apply the
    pair's BatchNorm policy before). ``first_feature``: see :func:`stitch_points`.
    """
    model_a.eval(), model_b.eval()
    nets = {"a": model_a, "b": model_b}
    other = {"a": model_b, "b": model_a}
    points = stitch_points(model_a, first_feature)
    keys = [(NONE, -1, into) for into in nets] + [(layer, i, into) for i, layer in enumerate(points)
                                                  for into in nets]
    # sums stay on the device until the end: one sync per table, not two per batch and key
    loss = {k: torch.zeros((), dtype=torch.float64, device=device) for k in keys}
    wrong = {k: torch.zeros((), dtype=torch.int64, device=device) for k in keys}
    for start in range(0, len(y), batch_size):
        xb = normalize(x[start:start + batch_size].to(device))
        yb = y[start:start + batch_size].to(device)
        for key in keys:
            layer, _, into = key
            if layer == NONE:
                logits = nets[into](xb)
            else:
                logits = _stitched(nets[into], layer, _output_of(other[into], layer, xb), xb)
            loss[key] += F.cross_entropy(logits.double(), yb, reduction="sum")
            wrong[key] += (logits.argmax(1) != yb).sum()
    rows = [{"layer": layer, "layer_index": i, "into": into, "loss": loss[k].item() / len(y),
             "error": wrong[k].item() / len(y)} for k in keys for layer, i, into in [k]]
    table = pd.DataFrame(rows)
    log("stitching (test error %):\n" + (100 * table.pivot(index="layer", columns="into",
                                                           values="error")).to_string())
    return table
