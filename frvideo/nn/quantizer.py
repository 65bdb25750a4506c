"""Nearest-neighbour vector quantizer: a codebook of K vectors of size D.

Token layout everywhere in frvideo: a B x D x H x W latent becomes B x (H*W)
tokens in row-major order (position p = row * W + col).
"""
from __future__ import annotations

import torch
from torch import nn


class VectorQuantizer(nn.Module):
    """Holds the codebook as ``embedding`` (an ``nn.Embedding`` K x D, checkpoint key
    ``embedding.weight``); inference only (no losses, no straight-through)."""

    def __init__(self, codebook_size: int, emb_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.emb_dim = emb_dim
        self.embedding = nn.Embedding(codebook_size, emb_dim)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        """B x D x H x W latent -> B x (H*W) x K negative squared distances to each code."""
        flat = z.flatten(2).transpose(1, 2)  # B x N x D
        # in the latent's precision: callers pass float latents so that near-ties between codes are
        # decided in fp32 even when the network runs in bf16
        codes = self.embedding.weight.to(z.dtype)
        # |z - e|^2 expanded, so no B x N x K x D tensor is formed
        dist = (flat**2).sum(-1, keepdim=True) + (codes**2).sum(-1) - 2 * flat @ codes.t()
        return -dist

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """B x D x H x W latent -> B x (H*W) indices of the closest codes."""
        return self.scores(z).argmax(-1)

    def lookup(self, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        """B x (H*W) token indices -> B x D x H x W latent, ``shape`` = (H, W)."""
        h, w = shape
        b = indices.shape[0]
        codes = self.embedding(indices.reshape(b, h * w).long())  # B x N x D
        return codes.transpose(1, 2).reshape(b, self.emb_dim, h, w).contiguous()
