"""The CodeFormer network (Zhou et al., NeurIPS 2022), split into encode / decode.

* encode: VQGAN encoder -> ``lq_feat`` (B x 256 x 16 x 16) and skip features at
  the resolutions in ``connect_list``; a transformer over the 256 latent positions
  predicts ``logits`` over the codebook (B x 256 x K).
* decode: tokens -> codebook vectors -> AdaIN to ``lq_feat``'s statistics ->
  VQGAN generator, where the controllable feature transformation (CFT) mixes the
  encoder skips back in with weight ``w`` (0 = pure codebook prior, 1 = most
  faithful to the input).

State-dict keys and shapes equal the official ``basicsr/archs/codeformer_arch.py``
checkpoint (``codeformer.pth``, ``params_ema``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

from frvideo.nn.quantizer import VectorQuantizer
from frvideo.nn.transformer import SelfAttentionLayer
from frvideo.nn.vqgan import Encoder, Generator, ResBlock


def _mean_std(feat: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std of B x C x H x W; unbiased variance + eps as upstream."""
    flat = feat.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give ``content`` the channel statistics of ``style`` (colour/illumination of the input)."""
    c_mean, c_std = _mean_std(content)
    s_mean, s_std = _mean_std(style)
    return (content - c_mean) / c_std * s_std + s_mean


class FuseSFT(nn.Module):
    """CFT block (upstream ``Fuse_sft_block``): spatial feature transform of decoder
    features conditioned on encoder features, scaled by the fidelity weight ``w``."""

    def __init__(self, channels: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * channels, channels)
        self.scale = self._head(channels)
        self.shift = self._head(channels)

    @staticmethod
    def _head(channels: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, enc_feat: torch.Tensor, dec_feat: torch.Tensor, w: float) -> torch.Tensor:
        cond = self.encode_enc(torch.cat([enc_feat, dec_feat], dim=1))
        return dec_feat + w * (dec_feat * self.scale(cond) + self.shift(cond))


@dataclass
class CodeFormerEncoding:
    """What ``CodeFormer.encode`` returns and ``decode`` needs."""

    logits: torch.Tensor  # B x N x K, N = latent H*W
    lq_feat: torch.Tensor  # B x emb_dim x h x w, encoder output
    skips: dict[str, torch.Tensor]  # resolution (str, as in connect_list) -> encoder feature


class CodeFormer(nn.Module):
    """Official constructor arguments first; the VQGAN shape arguments after them are
    fixed upstream (kept as defaults) and only changed for small test networks."""

    def __init__(
        self,
        dim_embd: int = 512,
        n_head: int = 8,
        n_layers: int = 9,
        codebook_size: int = 1024,
        *,
        connect_list: Iterable[str | int] = ("32", "64", "128", "256"),
        img_size: int = 512,
        nf: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        attn_resolutions: Iterable[int] = (16,),
        emb_dim: int = 256,
    ):
        super().__init__()
        self.connect_list = [str(r) for r in connect_list]
        self.latent_res = img_size // 2 ** (len(ch_mult) - 1)

        self.encoder = Encoder(3, nf, emb_dim, ch_mult, res_blocks, img_size, attn_resolutions)
        self.quantize = VectorQuantizer(codebook_size, emb_dim)
        self.generator = Generator(nf, emb_dim, ch_mult, res_blocks, img_size, attn_resolutions)

        self.position_emb = nn.Parameter(torch.zeros(self.latent_res**2, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(
            *[SelfAttentionLayer(dim_embd, n_head, 2 * dim_embd) for _ in range(n_layers)]
        )
        self.idx_pred_layer = nn.Sequential(
            nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False)
        )

        level_channels = {img_size >> i: nf * m for i, m in enumerate(ch_mult)}
        self.fuse_convs_dict = nn.ModuleDict(
            {r: FuseSFT(level_channels[int(r)]) for r in self.connect_list}
        )
        # Where the skips are taken and fused (upstream's fixed index tables, derived):
        # encoder: after the level's last ResBlock; generator: after the level's first
        # ResBlock, except at the latent resolution, where it is after the last.
        self.enc_taps = {r: self.encoder.level_resblocks[int(r)][-1] for r in self.connect_list}
        self.gen_taps = {
            self.generator.level_resblocks[int(r)][-1 if int(r) == self.latent_res else 0]: r
            for r in self.connect_list
        }

    def encode(self, x: torch.Tensor) -> CodeFormerEncoding:
        """x: B x 3 x S x S, RGB in [-1, 1]."""
        lq_feat, tapped = self.encoder.features(x, self.enc_taps.values())
        skips = {r: tapped[i] for r, i in self.enc_taps.items()}

        tokens = self.feat_emb(lq_feat.flatten(2).permute(2, 0, 1))  # N x B x C (sequence first)
        pos = self.position_emb.unsqueeze(1)
        for layer in self.ft_layers:
            tokens = layer(tokens, pos)
        logits = self.idx_pred_layer(tokens).permute(1, 0, 2)  # B x N x K
        return CodeFormerEncoding(logits, lq_feat, skips)

    def decode(
        self, tokens: torch.Tensor, enc: CodeFormerEncoding, w: float = 0.0, adain: bool = True
    ) -> torch.Tensor:
        """tokens: B x N codebook indices -> B x 3 x S x S image (not clamped)."""
        quant = self.quantize.lookup(tokens, tuple(enc.lq_feat.shape[-2:]))
        if adain:
            quant = adaptive_instance_norm(quant, enc.lq_feat)

        def fuse(i: int, x: torch.Tensor) -> torch.Tensor:
            r = self.gen_taps.get(i)
            return x if r is None else self.fuse_convs_dict[r](enc.skips[r], x, w)

        # w = 0 skips the fusion blocks altogether, as upstream does
        return self.generator(quant, fuse if w > 0 else None)

    def forward(self, x: torch.Tensor, w: float = 0.0, adain: bool = False):
        """The official call: ``out, logits, lq_feat = net(x, w=w, adain=True)``."""
        enc = self.encode(x)
        out = self.decode(enc.logits.argmax(-1), enc, w, adain)
        return out, enc.logits, enc.lq_feat
