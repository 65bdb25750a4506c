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
from torch import nn

from frvideo.nn.quantizer import VectorQuantizer
from frvideo.nn.vqgan import LightCFT, Normalize, ResBlock, UnshuffleDecoder, UnshuffleEncoder, decode_fused, swish


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
        self.decoder = UnshuffleDecoder(nf, ch_mult, res_blocks, emb_dim, shuffle)
        self.fuse = nn.ModuleList([LightCFT(c) for c in self.decoder.level_channels])
        nn.init.uniform_(self.quantize.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    # -- stage-1 pieces -----------------------------------------------------------
    def encode_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.encoder(x)

    def decode_latent(self, z: torch.Tensor, skips=None, w=0.0, image=None) -> torch.Tensor:
        return decode_fused(self.decoder, self.fuse, z, skips, w, image)

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
