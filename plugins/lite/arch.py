"""LiteNet: a small codebook face restorer that runs on a laptop CPU.

The CodeFormer recipe, scaled down and made fully convolutional (so it trains on
random patches and runs on any size that is a multiple of the compression):

* ``encoder``: pixel-unshuffle x2, then VQGAN ResBlocks / Downsamples
  (``frvideo.nn.vqgan``) to a latent of ``emb_dim`` channels at 1/``compression``
  of the input (256 -> 32 x 32 = 1024 tokens with the shipped card).
* ``quantize``: a ``frvideo.nn.quantizer.VectorQuantizer`` (K x emb_dim).
* ``predictor``: a few conv ResBlocks on the encoder latent and a 1x1 conv to K
  logits per position - the token prediction (CodeFormer uses a transformer; a
  conv keeps lite patch-trainable and fast).
* ``decoder``: the mirror of the encoder ending in pixel-shuffle x2.
* ``fuse``: CodeFormer's controllable feature transformation (CFT) at every
  decoder level: ``dec + w * (dec * scale(enc, dec) + shift(enc, dec))`` with the
  encoder feature of the same resolution; ``w`` = fidelity (0 = pure codebook
  prior, 1 = most faithful to the input).
* ``decoder.gate``: a fidelity gate at the output, ``out + w * g * (input - out)``
  with ``g`` predicted per pixel from the last decoder features: where the input
  is already good (mild damage) the output may keep it instead of re-rendering
  it through the codebook; zero-initialised, so ``w = 0`` and an untrained gate
  give the plain decoder output.

Stage 1 (codebook) trains encoder + quantize + decoder on clean faces; stage 2
(restoration) freezes quantize + decoder and trains encoder, predictor and
fuse on degraded faces; stage 3 (fidelity) also unfreezes the decoder (and so
trains the gate) (``frvideo.train.trainer``, configs/train/lite_*.yaml).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frvideo.nn.quantizer import VectorQuantizer
from frvideo.nn.vqgan import Normalize, ResBlock, UnshuffleEncoder, Upsample, swish


class FuseSFT(nn.Module):
    """CFT block (CodeFormer's ``Fuse_sft_block``, lightened: one 3x3 conv for the
    condition and one for scale and shift together): a spatial feature transform
    of decoder features conditioned on the encoder feature, scaled by ``w``."""

    def __init__(self, channels: int):
        super().__init__()
        self.cond = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.scale_shift = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        # start as the identity (w has no effect until trained)
        nn.init.zeros_(self.scale_shift.weight)
        nn.init.zeros_(self.scale_shift.bias)

    def forward(self, enc_feat: torch.Tensor, dec_feat: torch.Tensor, w) -> torch.Tensor:
        cond = F.leaky_relu(self.cond(torch.cat([enc_feat, dec_feat], dim=1)), 0.2)
        scale, shift = self.scale_shift(cond).chunk(2, dim=1)
        return dec_feat + w * (dec_feat * scale + shift)


class LiteDecoder(nn.Module):
    """Latent -> image, mirror of its encoder (:class:`frvideo.nn.vqgan.UnshuffleEncoder`). ``level_channels`` (coarsest
    first) are the channels where the CFT blocks act (after each level's blocks)."""

    def __init__(self, nf: int, ch_mult: Sequence[int], res_blocks: int, emb_dim: int, shuffle: int = 2):
        super().__init__()
        self.shuffle = shuffle
        ch = nf * ch_mult[-1]
        self.conv_in = nn.Conv2d(emb_dim, ch, 3, padding=1)
        self.mid = ResBlock(ch)
        self.levels = nn.ModuleList()
        self.ups = nn.ModuleList()
        self.level_channels = []
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(res_blocks):
                blocks.append(ResBlock(ch, nf * ch_mult[i]))
                ch = nf * ch_mult[i]
            self.levels.append(nn.Sequential(*blocks))
            self.level_channels.append(ch)
            if i != 0:
                self.ups.append(Upsample(ch))
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, 3 * shuffle * shuffle, 3, padding=1)  # then pixel-shuffle
        # fidelity gate: per-pixel weight of the input image in the output (zero at init)
        self.gate = nn.Conv2d(ch, 3 * shuffle * shuffle, 3, padding=1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def forward(self, z: torch.Tensor, fuse=None, image: torch.Tensor | None = None, w=0.0) -> torch.Tensor:
        """``fuse(level_index, h) -> h`` is called after each level (coarsest = 0). With
        ``image`` (the input) and ``w`` != 0 the output moves toward the input by
        ``w * gate``: ``out + w * g * (image - out)``, g predicted per pixel."""
        h = self.mid(self.conv_in(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if fuse is not None:
                h = fuse(i, h)
            if i < len(self.ups):
                h = self.ups[i](h)
        feat = swish(self.norm_out(h))
        out = F.pixel_shuffle(self.conv_out(feat), self.shuffle)
        if image is not None and (not isinstance(w, (int, float)) or w != 0):
            g = F.pixel_shuffle(self.gate(feat), self.shuffle)
            out = out + w * g * (image - out)
        return out


class TokenPredictor(nn.Module):
    """Encoder latent -> B x K x h x w codebook logits (fully convolutional)."""

    def __init__(self, emb_dim: int, channels: int, blocks: int, codebook_size: int):
        super().__init__()
        self.conv_in = nn.Conv2d(emb_dim, channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.norm_out = Normalize(channels)
        self.conv_out = nn.Conv2d(channels, codebook_size, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(swish(self.norm_out(self.blocks(self.conv_in(z)))))


@dataclass
class LiteEncoding:
    logits: torch.Tensor  # B x N x K token scores (argmax = the model's choice)
    lq_feat: torch.Tensor  # B x emb_dim x h x w encoder latent
    skips: list[torch.Tensor]  # encoder features per level, finest first
    image: torch.Tensor | None = None  # the input (for the fidelity gate)


class LiteNet(nn.Module):
    def __init__(self, img_size: int = 256, nf: int = 32, ch_mult: Sequence[int] = (2, 2, 4), res_blocks: int = 1,
                 emb_dim: int = 64, codebook_size: int = 512, predictor_channels: int = 128,
                 predictor_blocks: int = 2, shuffle: int = 2):
        super().__init__()
        self.img_size = img_size
        self.compression = shuffle * 2 ** (len(ch_mult) - 1)
        self.codebook_size = codebook_size
        self.encoder = UnshuffleEncoder(nf, ch_mult, res_blocks, emb_dim, shuffle)
        self.quantize = VectorQuantizer(codebook_size, emb_dim)
        self.predictor = TokenPredictor(emb_dim, predictor_channels, predictor_blocks, codebook_size)
        self.decoder = LiteDecoder(nf, ch_mult, res_blocks, emb_dim, shuffle)
        self.fuse = nn.ModuleList([FuseSFT(c) for c in self.decoder.level_channels])
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    # -- stage-1 pieces -----------------------------------------------------------
    def encode_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.encoder(x)

    def decode_latent(self, z: torch.Tensor, skips=None, w=0.0, image=None) -> torch.Tensor:
        fuse = None
        if skips is not None and (not isinstance(w, (int, float)) or w != 0):
            ordered = skips[::-1]  # coarsest first, as the decoder's levels

            def fuse(i, h):
                return self.fuse[i](ordered[i], h, w)
        return self.decoder(z, fuse, image, w)

    # -- the restorer ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> LiteEncoding:
        """x: B x 3 x S x S RGB in [-1, 1]; S a multiple of ``compression``."""
        lq_feat, skips = self.encoder(x)
        logits = self.predictor(lq_feat).flatten(2).transpose(1, 2)  # B x N x K
        return LiteEncoding(logits, lq_feat, skips, x)

    def decode(self, tokens: torch.Tensor, enc: LiteEncoding, w=0.0) -> torch.Tensor:
        quant = self.quantize.lookup(tokens, tuple(enc.lq_feat.shape[-2:]))
        return self.decode_latent(quant, enc.skips, w, enc.image)

    def forward(self, x: torch.Tensor, w: float = 0.5) -> torch.Tensor:
        enc = self.encode(x)
        return self.decode(enc.logits.argmax(-1), enc, w)
