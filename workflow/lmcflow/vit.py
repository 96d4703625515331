"""A small Vision Transformer (Dosovitskiy et al. 2021) for the any-model experiments.

Pre-LayerNorm blocks with multi-head self-attention and a GELU MLP, a class token and a learned
position embedding; small enough to train on mnist5k on a CPU in about a minute (28x28 inputs,
patch 7: 16 patches + the class token = 17 tokens of width 64).

Attention uses four separate Linear layers ``q``, ``k``, ``v``, ``out`` (not a packed
``(3E, E)`` projection), so a permutation spec can give Q/K one within-head permutation and
V/out another: ``q.weight (H*d, E)`` is viewed ``(H, d, E)``. There is no hand-written spec:
:func:`lmcflow.alignment.permutation_spec` traces it (:mod:`lmcflow.alignment.trace`), using
``in_shape`` for the example input.

As in :mod:`lmcflow.models`: every GELU is its own non-in-place module, no dropout.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ViT", "Attention", "Block"]


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, T, D)``: heads ``H``, head width ``d = D / H``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        split = (self.heads, self.head_dim)
        q = self.q(x).unflatten(-1, split).transpose(1, 2)  # (B, H, T, d)
        k = self.k(x).unflatten(-1, split).transpose(1, 2)
        v = self.v(x).unflatten(-1, split).transpose(1, 2)
        att = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, T, T)
        y = (att @ v).transpose(1, 2).flatten(2)  # (B, T, H*d)
        return self.out(y)


class Block(nn.Module):
    """``x + attn(norm1(x))``, then ``+ fc2(gelu(fc1(norm2(x))))``; ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.gelu = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch embedding (Conv2d, kernel = stride = ``patch``), class token, learned position
    embedding, ``depth`` pre-LN blocks (``dim`` wide, ``heads`` heads, MLP ``mlp_ratio * dim``),
    final LayerNorm ``norm``, linear ``head`` on the class token.

    ``(B, C, H, W) -> patches (B, N, D), N = (H/patch)(W/patch) -> tokens (B, 1+N, D)
    -> blocks -> norm -> head(token 0) (B, num_classes)``. H and W must be multiples of
    ``patch`` and ``dim`` a multiple of ``heads``.
    """

    def __init__(self, in_shape, num_classes: int, patch: int = 7, dim: int = 64, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 2):
        super().__init__()
        from .models import _check_in_shape

        c, h, w = _check_in_shape(in_shape)
        patch, dim, depth, heads = int(patch), int(dim), int(depth), int(heads)
        if patch < 1 or h % patch or w % patch:
            raise ValueError(f"ViT patch must divide the input size {h}x{w}, got {patch!r}")
        if heads < 1 or dim < 1 or dim % heads:
            raise ValueError(f"ViT dim must be a positive multiple of heads, got {dim!r}, "
                             f"{heads!r}")
        if depth < 1 or not float(mlp_ratio) > 0:
            raise ValueError(f"ViT depth must be >= 1 and mlp_ratio > 0, got {depth!r}, "
                             f"{mlp_ratio!r}")
        self.in_shape = (c, h, w)
        self.depth = depth
        n_tokens = (h // patch) * (w // patch) + 1
        self.patch_embed = nn.Conv2d(c, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n_tokens, dim))
        hidden = max(1, round(dim * float(mlp_ratio)))
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1+N, D)
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])  # (B, num_classes)

    def feature_layers(self) -> list[str]:
        """Every block output (the residual stream, ``(B, 1+N, D)``), then the logits."""
        return [f"blocks.{i}" for i in range(self.depth)] + ["head"]

    def layer_group_modules(self) -> list[str]:
        """Layer-wise analyses average whole blocks (attention, MLP and norms together): the
        unit of a transformer; the patch embedding, final norm and head stay groups of their
        own, the class token and position embedding form the "(root)" group."""
        return [f"blocks.{i}" for i in range(self.depth)]
