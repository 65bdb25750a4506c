"""EntedNet: reference-based face restoration (ENTED, ../shared/papers/ented.txt).

    I_LQ --E_c--> Z_LQ (h x w latent) --VQ--> Z^_LQ --------------------------+
      |  encoder features per level (skips, "residual connections")         |
      v                                                                     v
    G: StyleGAN2-style decoder (modulated convs, style omega) from Z^_LQ, at every level
       + skip from E_c, + neural texture distribution (Eq. 2) of the textures
       extracted (Eq. 1) from E_ref's feature of that level; ToRGB skips.
    I_ref --E_ref--> features at every decoder level + Z_ref (h x w latent)
    omega = LatentRefinement(Z^_LQ, Z_ref)  (Eq. 5-8)

* ``encoder`` (E_c) and ``ref_encoder`` (E_ref) share a design (:class:`frvideo.nn.vqgan.UnshuffleEncoder`):
  pixel-unshuffle by ``shuffle``, then VQGAN ResBlocks (``frvideo.nn.vqgan``) per
  level with stride-2 Downsamples, a mid ResBlock and a conv to ``emb_dim``;
  compression = shuffle * 2^(levels-1) (16 for the shipped 256 card: 16 x 16
  latent; the paper card: 512 / 32 = 16 x 16).
* ``quantize``: ``frvideo.nn.quantizer.VectorQuantizer`` (K x emb_dim); the
  restorer's ``encode`` scores are its negative squared distances, so the
  pipeline's token smoother can choose the tokens.
* ``decoder``: :class:`StyleDecoder`, levels from h up to S / shuffle, each
  ``StyleConv`` (x2 upsampling except the first), + 1x1 projection of E_c's
  feature, ``StyleConv``, + texture distribution, ``ToRGB`` (StyleGAN2 skip
  image); at the end the RGB is upsampled by ``shuffle`` and a pixel-shuffled
  detail conv adds the full-resolution part. Decoder noise is zero (a video
  restorer must be deterministic).
* :meth:`reference` computes everything that depends on the reference alone
  (E_ref features, the extracted textures F_tex and C~_e of Eq. 1, Z_ref): the
  restorer caches it per reference, so a keyframe costs one E_ref pass, not one
  per frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frvideo.nn.quantizer import VectorQuantizer
from frvideo.nn.stylegan2 import StyleConv, ToRGB
from frvideo.nn.texture import LatentRefinement, NeuralTextureAttention
from frvideo.nn.vqgan import UnshuffleEncoder


def channels_last_convs(net: nn.Module) -> nn.Module:
    """NHWC for every plain conv (oneDNN runs them several times faster on CPU). A whole-module
    ``.to(memory_format=channels_last)`` fails on the 5-D modulated-conv weights."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.to(memory_format=torch.channels_last)
    return net


@dataclass
class ReferenceFeatures:
    """What depends on the reference alone (cacheable). Lists are per decoder level, coarsest first."""

    z_ref: torch.Tensor  # B x emb_dim x h x w
    textures: list[torch.Tensor]  # F_tex, B x k x c per level
    extract_attn: list[torch.Tensor]  # C~_e, B x k x hw per level (rows sum to 1)

    def index(self, i: int) -> "ReferenceFeatures":
        return ReferenceFeatures(self.z_ref[i:i + 1], [t[i:i + 1] for t in self.textures],
                                 [a[i:i + 1] for a in self.extract_attn])

    @staticmethod
    def cat(items: list["ReferenceFeatures"]) -> "ReferenceFeatures":
        return ReferenceFeatures(torch.cat([r.z_ref for r in items]),
                                 [torch.cat(ts) for ts in zip(*[r.textures for r in items])],
                                 [torch.cat(ts) for ts in zip(*[r.extract_attn for r in items])])


@dataclass
class DecodeAux:
    """Attention maps of one decode, for the losses and tests (coarsest level first)."""

    distribute_attn: list[torch.Tensor] = field(default_factory=list)  # C~_d, B x k x hw (columns sum to 1)
    refine_attn: tuple = ()  # (LQ -> ref, ref -> LQ), B x hw x hw (rows sum to 1)
    omega: Optional[torch.Tensor] = None


class StyleDecoder(nn.Module):
    """Quantized latent -> image through modulated convs; ``level_channels`` coarsest first."""

    def __init__(self, emb_dim: int, level_channels: Sequence[int], enc_channels: Sequence[int],
                 ref_channels: Sequence[int], style_dim: int, texture_kernels: int, shuffle: int):
        super().__init__()
        self.shuffle = shuffle
        self.conv_in = nn.Conv2d(emb_dim, level_channels[0], 3, padding=1)
        self.conv_a = nn.ModuleList()
        self.skip = nn.ModuleList()  # the residual connections from E_c
        self.conv_b = nn.ModuleList()
        self.texture = nn.ModuleList()
        self.to_rgb = nn.ModuleList()
        ch = level_channels[0]
        for i, out_ch in enumerate(level_channels):
            self.conv_a.append(StyleConv(ch, out_ch, 3, style_dim, sample_mode="upsample" if i else None))
            self.skip.append(nn.Conv2d(enc_channels[i], out_ch, 1))
            self.conv_b.append(StyleConv(out_ch, out_ch, 3, style_dim))
            self.texture.append(NeuralTextureAttention(ref_channels[i], out_ch, texture_kernels))
            self.to_rgb.append(ToRGB(out_ch, style_dim, upsample=i > 0))
            ch = out_ch
        # the full-resolution part the ToRGB chain (at S / shuffle) cannot express
        self.detail = nn.Conv2d(ch, 3 * shuffle * shuffle, 3, padding=1)
        nn.init.zeros_(self.detail.weight)
        nn.init.zeros_(self.detail.bias)

    def forward(self, z_q: torch.Tensor, enc_feats: list[torch.Tensor], ref: ReferenceFeatures,
                omega: torch.Tensor, aux: Optional[DecodeAux] = None) -> torch.Tensor:
        """enc_feats / ref lists coarsest first, one per level."""
        zero_noise = z_q.new_zeros(1, 1, 1, 1)
        h = self.conv_in(z_q)
        rgb = None
        for i in range(len(self.conv_a)):
            h = self.conv_a[i](h, omega, noise=zero_noise)
            h = h + self.skip[i](enc_feats[i])
            h = self.conv_b[i](h, omega, noise=zero_noise)
            h, attn = self.texture[i].distribute(h, ref.textures[i])
            if aux is not None:
                aux.distribute_attn.append(attn)
            rgb = self.to_rgb[i](h, omega, rgb)
        up = F.interpolate(rgb, scale_factor=float(self.shuffle), mode="bilinear", align_corners=False)
        return up + F.pixel_shuffle(self.detail(h), self.shuffle)


@dataclass
class EntedEncoding:
    z: torch.Tensor  # B x emb_dim x h x w content latent (before quantization)
    feats: list[torch.Tensor]  # E_c features per level, finest first


class EntedNet(nn.Module):
    def __init__(self, img_size: int = 256, nf: int = 32, ch_mult: Sequence[int] = (2, 2, 4), res_blocks: int = 1,
                 ref_nf: Optional[int] = None, emb_dim: int = 64, codebook_size: int = 512, style_dim: int = 128,
                 dec_channels: Optional[Sequence[int]] = None, texture_kernels: int = 16, shuffle: int = 4):
        super().__init__()
        self.img_size = img_size
        self.compression = shuffle * 2 ** (len(ch_mult) - 1)
        if img_size % self.compression:
            raise ValueError(f"img_size {img_size} is not a multiple of the compression {self.compression}")
        self.codebook_size = codebook_size
        self.encoder = UnshuffleEncoder(nf, ch_mult, res_blocks, emb_dim, shuffle)  # E_c
        self.ref_encoder = UnshuffleEncoder(ref_nf or nf, ch_mult, res_blocks, emb_dim, shuffle)  # E_ref
        self.quantize = VectorQuantizer(codebook_size, emb_dim)
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        enc_ch = self.encoder.channels[::-1]  # coarsest first, as the decoder's levels
        ref_ch = self.ref_encoder.channels[::-1]
        dec_ch = list(dec_channels) if dec_channels else enc_ch
        if len(dec_ch) != len(ch_mult):
            raise ValueError(f"dec_channels needs {len(ch_mult)} entries (one per level), got {len(dec_ch)}")
        self.refine = LatentRefinement(emb_dim, style_dim)
        self.decoder = StyleDecoder(emb_dim, dec_ch, enc_ch, ref_ch, style_dim, texture_kernels, shuffle)

    # -- pieces -------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> EntedEncoding:
        z, feats = self.encoder(x)
        return EntedEncoding(z, feats)

    def reference(self, ref: torch.Tensor) -> ReferenceFeatures:
        """E_ref and texture extraction (Eq. 1) of B x 3 x S x S references."""
        z_ref, feats = self.ref_encoder(ref)
        textures, attns = [], []
        for block, f in zip(self.decoder.texture, feats[::-1]):
            t, a = block.extract(f)
            textures.append(t)
            attns.append(a)
        return ReferenceFeatures(z_ref, textures, attns)

    def decode_latent(self, z_q: torch.Tensor, feats: list[torch.Tensor], ref: ReferenceFeatures,
                      aux: Optional[DecodeAux] = None) -> torch.Tensor:
        """Quantized latent + E_c features + reference features -> image."""
        if aux is not None:
            omega, aux.refine_attn = self.refine(z_q, ref.z_ref, return_attention=True)
            aux.omega = omega
        else:
            omega = self.refine(z_q, ref.z_ref)
        return self.decoder(z_q, feats[::-1], ref, omega, aux)

    def decode(self, tokens: torch.Tensor, enc: EntedEncoding, ref: ReferenceFeatures) -> torch.Tensor:
        z_q = self.quantize.lookup(tokens, tuple(enc.z.shape[-2:])).to(enc.z.dtype)
        return self.decode_latent(z_q, enc.feats, ref)

    def forward(self, x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        enc = self.encode(x)
        return self.decode(self.quantize.nearest(enc.z), enc, self.reference(ref))
