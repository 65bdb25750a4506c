"""VQGAN convolutional building blocks (the "taming transformers" family).

CodeFormer's encoder and generator are made of these; other codebook backends
(LD-BFR, ...) reuse them. Submodule names (``norm1``, ``conv1``, ``q``,
``proj_out``, ``blocks.N`` ...) are part of the checkpoint format: keep them.

All blocks work on B x C x H x W tensors. Channel counts given to ``Normalize``
(and so to every block) must be divisible by ``groups`` (32 by default).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """The VQGAN normalisation: affine GroupNorm with eps 1e-6 (not torch's 1e-5)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    # Written out rather than F.silu so results match the reference code bit for bit.
    return x * torch.sigmoid(x)


class ResBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, swish, 3x3 conv) twice.

    When the channel count changes, the skip path goes through a 1x1 ``conv_out``.
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_out = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.conv_out is None else self.conv_out(x)
        return h + skip


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions, with a residual.

    q, k, v and the output projection are 1x1 convolutions; scores are scaled by
    1/sqrt(C).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q = self.q(y).reshape(b, c, h * w)
        k = self.k(y).reshape(b, c, h * w)
        v = self.v(y).reshape(b, c, h * w)
        # attn[b, i, j]: how much position i attends to position j
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * (int(c) ** -0.5), dim=2)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; pads right/bottom only (asymmetric), as VQGAN does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """Image (B x in_channels x R x R) -> latent (B x emb_dim x r x r), r = R / 2^(levels-1).

    ``blocks`` layout: stem conv; per level (resolution R, R/2, ...): ``res_blocks``
    ResBlocks (each followed by an AttnBlock at ``attn_resolutions``) and a
    Downsample except after the last level; then ResBlock, AttnBlock, ResBlock,
    GroupNorm and a 3x3 conv to ``emb_dim`` (no activation before it).

    ``level_resblocks[res]`` lists the ``blocks`` indices of the ResBlocks of the
    level at resolution ``res`` (not the bottleneck ones), for callers that tap
    intermediate features with :meth:`features`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        nf: int = 64,
        emb_dim: int = 256,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        resolution: int = 512,
        attn_resolutions: Iterable[int] = (16,),
    ):
        super().__init__()
        attn_resolutions = set(attn_resolutions)
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, nf, kernel_size=3, padding=1)]
        self.level_resblocks: dict[int, list[int]] = {}
        ch, res = nf, resolution
        for level, mult in enumerate(ch_mult):
            self.level_resblocks[res] = []
            for _ in range(res_blocks):
                self.level_resblocks[res].append(len(blocks))
                blocks.append(ResBlock(ch, nf * mult))
                ch = nf * mult
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(ch))
                res //= 2
        blocks += [ResBlock(ch), AttnBlock(ch), ResBlock(ch)]
        blocks += [Normalize(ch), nn.Conv2d(ch, emb_dim, kernel_size=3, padding=1)]
        self.blocks = nn.ModuleList(blocks)
        self.out_resolution = res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def features(self, x: torch.Tensor, taps: Iterable[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The latent plus the outputs of the blocks whose indices are in ``taps``."""
        taps = set(taps)
        tapped = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in taps:
                tapped[i] = x
        return x, tapped


class Generator(nn.Module):
    """Latent (B x emb_dim x r x r) -> image (B x out_channels x R x R); mirror of :class:`Encoder`.

    ``blocks`` layout: 3x3 conv from ``emb_dim``; ResBlock, AttnBlock, ResBlock;
    per level from the coarsest up: ``res_blocks`` ResBlocks (each followed by an
    AttnBlock at ``attn_resolutions``) and an Upsample except after the finest
    level; GroupNorm and a 3x3 conv to ``out_channels``.

    ``level_resblocks[res]`` as in :class:`Encoder`; ``forward``'s ``after_block``
    hook (``(index, x) -> x``) lets a caller modify features between blocks.
    """

    def __init__(
        self,
        nf: int = 64,
        emb_dim: int = 256,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        resolution: int = 512,
        attn_resolutions: Iterable[int] = (16,),
        out_channels: int = 3,
    ):
        super().__init__()
        attn_resolutions = set(attn_resolutions)
        ch = nf * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        blocks: list[nn.Module] = [nn.Conv2d(emb_dim, ch, kernel_size=3, padding=1)]
        blocks += [ResBlock(ch), AttnBlock(ch), ResBlock(ch)]
        self.level_resblocks: dict[int, list[int]] = {}
        for level in reversed(range(len(ch_mult))):
            self.level_resblocks[res] = []
            for _ in range(res_blocks):
                self.level_resblocks[res].append(len(blocks))
                blocks.append(ResBlock(ch, nf * ch_mult[level]))
                ch = nf * ch_mult[level]
                if res in attn_resolutions:
                    blocks.append(AttnBlock(ch))
            if level != 0:
                blocks.append(Upsample(ch))
                res *= 2
        blocks += [Normalize(ch), nn.Conv2d(ch, out_channels, kernel_size=3, padding=1)]
        self.blocks = nn.ModuleList(blocks)

    def forward(
        self, x: torch.Tensor, after_block: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None
    ) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if after_block is not None:
                x = after_block(i, x)
        return x


class UnshuffleEncoder(nn.Module):
    """B x 3 x S x S -> (latent B x emb_dim x S/c x S/c, the feature after each level, finest
    first), c = shuffle * 2^(len(ch_mult)-1): pixel-unshuffle, then ResBlocks per level with a
    Downsample between levels. Fully convolutional, so it trains on patches. frvideo's own
    models (lite, ENTED's E_c / E_ref, LD-BFR's E_LQ) share it; ``channels`` lists each level's
    feature channels (finest first) for the skips built on top."""

    def __init__(self, nf: int, ch_mult: Sequence[int], res_blocks: int, emb_dim: int, shuffle: int = 2):
        super().__init__()
        self.shuffle = shuffle
        self.stem = nn.Conv2d(3 * shuffle * shuffle, nf * ch_mult[0], 3, padding=1)
        self.levels = nn.ModuleList()
        self.downs = nn.ModuleList()
        self.channels: list[int] = []
        ch = nf * ch_mult[0]
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(res_blocks):
                blocks.append(ResBlock(ch, nf * mult))
                ch = nf * mult
            self.levels.append(nn.Sequential(*blocks))
            self.channels.append(ch)
            if i != len(ch_mult) - 1:
                self.downs.append(Downsample(ch))
        self.mid = ResBlock(ch)
        self.norm_out = Normalize(ch)
        self.conv_out = nn.Conv2d(ch, emb_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.stem(F.pixel_unshuffle(x, self.shuffle))
        feats = []
        for i, level in enumerate(self.levels):
            h = level(h)
            if i == len(self.levels) - 1:
                h = self.mid(h)
            feats.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return self.conv_out(swish(self.norm_out(h))), feats


class LightCFT(nn.Module):
    """CFT block (CodeFormer's ``Fuse_sft_block``, lightened for lite and LD-BFR: one 3x3 conv for the
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


class UnshuffleDecoder(nn.Module):
    """Latent -> image, mirror of :class:`UnshuffleEncoder`. ``level_channels`` (coarsest
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

def decode_fused(decoder: "UnshuffleDecoder", fuse: nn.ModuleList, z: torch.Tensor, skips=None, w=0.0,
                 image: torch.Tensor | None = None) -> torch.Tensor:
    """Decode ``z`` with the encoder features ``skips`` (finest first, as
    :class:`UnshuffleEncoder` returns them) fused in by the CFT blocks ``fuse`` (coarsest first)
    at fidelity ``w``; w = 0 or no skips: the plain decoder."""
    if skips is None or (isinstance(w, (int, float)) and w == 0):
        return decoder(z, None, image, w)
    ordered = skips[::-1]  # coarsest first, as the decoder's levels
    return decoder(z, lambda i, h: fuse[i](ordered[i], h, w), image, w)
