"""Reference-based building blocks: neural texture extraction / distribution
(NTED, Ren et al. 2022, as ENTED uses it) and ENTED's latent-space refinement.

Notation follows ../shared/papers/ented.txt (Eq. 1, 2, 5-8). Feature maps are
B x C x H x W; "hw" is the flattened spatial axis (row-major, as everywhere in
frvideo).

* :func:`feature_norm` - Eq. 6: centre along an axis and divide by the L2 norm.
* :class:`NeuralTextureAttention` - ``extract`` (Eq. 1): k texture extraction
  kernels W_e give a k x hw map, softmax over the *spatial* axis (each of the k
  rows sums to 1), so each of the k "neural textures" is a weighted average of
  reference positions; ``distribute`` (Eq. 2): k distribution kernels W_d on the
  decoder feature, softmax over the *k* axis (each position's column sums to 1),
  so each decoder position is a convex mix of the k textures.
* :class:`LatentRefinement` - Eq. 5-8: two-way scaled dot-product cross
  attention between the (normalised) LQ latent and the reference latent, softmax
  over the key positions (rows sum to 1), learnable per-channel scales gamma,
  and a linear map Psi of both refined latents to the style code omega.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["feature_norm", "NeuralTextureAttention", "LatentRefinement"]


def feature_norm(x: torch.Tensor, dim: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """Eq. 6: (x - E_dim[x]) / sqrt(sum_dim x^2 + eps) (the paper's FN, channel axis by default).

    Scale-free, so the attention logits do not grow with the feature magnitude
    (the "more stable training" the paper gives as the reason)."""
    return (x - x.mean(dim=dim, keepdim=True)) / torch.sqrt(x.square().sum(dim=dim, keepdim=True) + eps)


class NeuralTextureAttention(nn.Module):
    """Texture extraction (from reference features, ``ref_channels``) and
    distribution (onto decoder features, ``channels``) with ``k`` kernels.

    The result is added to the decoder feature through a 1x1 projection
    (``out``): the reference contributes texture on top of what the decoder
    already has, so an unhelpful reference can be ignored by learning small
    weights there.
    """

    def __init__(self, ref_channels: int, channels: int, k: int = 16):
        super().__init__()
        self.k = k
        self.extract_kernel = nn.Conv2d(ref_channels, k, 1)  # W_e  (k x c)
        self.value = nn.Conv2d(ref_channels, channels, 1)  # f_1x1 of Eq. 1
        self.distribute_kernel = nn.Conv2d(channels, k, 1)  # W_d  (k x c)
        self.out = nn.Conv2d(channels, channels, 1)

    def extract(self, f_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1. f_ref: B x c_ref x h x w -> (F_tex: B x k x c, C~_e: B x k x hw, rows sum to 1)."""
        c_e = self.extract_kernel(f_ref).flatten(2)  # B x k x hw
        attn = torch.softmax(c_e.float(), dim=2).to(f_ref.dtype)
        values = self.value(f_ref).flatten(2)  # B x c x hw
        f_tex = torch.bmm(attn, values.transpose(1, 2))  # B x k x c
        return f_tex, attn

    def distribute(self, f_d: torch.Tensor, f_tex: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 2. f_d: B x c x h x w decoder feature, f_tex: B x k x c ->
        (f_d + out(F_o): B x c x h x w, C~_d: B x k x hw, columns sum to 1)."""
        b, c, h, w = f_d.shape
        c_d = self.distribute_kernel(f_d).flatten(2)  # B x k x hw
        attn = torch.softmax(c_d.float(), dim=1).to(f_d.dtype)
        f_o = torch.bmm(f_tex.transpose(1, 2).to(f_d.dtype), attn).reshape(b, c, h, w)  # (F_tex)^T C~_d
        return f_d + self.out(f_o), attn


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 on B x c x n matrices: softmax over the key positions. -> (B x c x n_q, B x n_q x n_k)."""
    logits = torch.bmm(q.transpose(1, 2), k) / math.sqrt(q.shape[1])  # B x n_q x n_k
    attn = torch.softmax(logits.float(), dim=2).to(v.dtype)
    return torch.bmm(v, attn.transpose(1, 2)), attn


class LatentRefinement(nn.Module):
    """Eq. 5-8: omega = Psi(concat[gamma_LQ V_LQ + Z_LQ, gamma_ref V_ref + Z_ref]).

    ``Psi`` is one linear layer. The paper does not say how the c x h x w map
    becomes a c-vector; here the concatenated refined latents are averaged over
    the positions first (a linear map of the whole 2c x hw map would need
    2c * hw * c weights: 33 M at the paper's size). The gammas start at zero
    (the refinement starts as the identity and learns how much to exchange).
    """

    def __init__(self, channels: int, style_dim: int):
        super().__init__()
        self.proj_lq = nn.Conv2d(channels, channels, 1)
        self.proj_ref = nn.Conv2d(channels, channels, 1)
        self.gamma_lq = nn.Parameter(torch.zeros(channels))
        self.gamma_ref = nn.Parameter(torch.zeros(channels))
        self.psi = nn.Linear(2 * channels, style_dim)

    def forward(self, z_lq: torch.Tensor, z_ref: torch.Tensor,
                return_attention: bool = False):
        """z_lq (the quantized LQ latent), z_ref: B x c x h x w -> omega B x style_dim
        (and the two B x hw x hw attention matrices, rows summing to 1)."""
        b, c, h, w = z_lq.shape
        q_lq = self.proj_lq(feature_norm(z_lq)).flatten(2)  # Z~_LQ
        q_ref = self.proj_ref(feature_norm(z_ref)).flatten(2)  # Z~_ref
        v_lq, a_lq = _attention(q_lq, q_ref, q_ref)  # LQ positions look up the reference
        v_ref, a_ref = _attention(q_ref, q_lq, q_lq)  # and the reference looks up the LQ latent
        r_lq = self.gamma_lq.view(1, c, 1) * v_lq + z_lq.flatten(2)
        r_ref = self.gamma_ref.view(1, c, 1) * v_ref + z_ref.flatten(2)
        omega = self.psi(torch.cat([r_lq, r_ref], dim=1).mean(dim=2))
        if return_attention:
            return omega, (a_lq, a_ref)
        return omega
