"""Transformer self-attention block in the DETR / CodeFormer style.

Sequence-first tensors (L x B x C), as ``nn.MultiheadAttention`` defaults to.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttentionLayer(nn.Module):
    """Pre-LayerNorm self-attention + GELU MLP, each with a residual.

    The positional embedding is added to queries and keys only, never to the
    values, so it steers where to attend without being mixed into the features.
    Dropout is left out (inference only; CodeFormer trains with 0 anyway).
    Checkpoint keys: ``self_attn.*``, ``linear1/2.*``, ``norm1/2.*``.
    """

    def __init__(self, dim: int, n_head: int = 8, dim_mlp: int = 2048):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_head)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: L x B x C; pos: L x B x C or L x 1 x C (broadcast over the batch)."""
        y = self.norm1(x)
        qk = y if pos is None else y + pos
        x = x + self.self_attn(qk, qk, value=y, need_weights=False)[0]
        y = self.norm2(x)
        return x + self.linear2(F.gelu(self.linear1(y)))
