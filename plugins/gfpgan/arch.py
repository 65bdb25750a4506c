"""GFPGAN v1 "clean" architecture (GFPGANv1Clean; GFPGAN v1.3 / v1.4 checkpoints).

A U-Net whose bottleneck predicts the StyleGAN2 latents and whose decoder
levels predict spatial (scale, shift) conditions; a StyleGAN2 generator then
synthesizes the face from those latents, modulated by the conditions (SFT).

    x (b,3,S,S) -> conv_body_first (1x1) -> conv_body_down (ResBlocks, /2 each, to 4x4)
                -> final_conv -> final_linear -> style code (b, num_latent, F)
    4x4 feature -> conv_body_up (ResBlocks, x2 each, adding the matching encoder feature
                first) -> per level: condition_scale / condition_shift convs
    stylegan_decoder(style code, [(scale_k, shift_k)]) -> image (b,3,S,S)

State-dict keys and shapes equal the official module's (including the unused
``toRGB`` heads, the ``stylegan_decoder.style_mlp`` weights and the
``stylegan_decoder.noises.noise*`` buffers), so released files load strictly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from frvideo.nn.stylegan2 import StyleGAN2Generator, stylegan2_channels

_LEAKY_SLOPE = 0.2


class ResBlock(nn.Module):
    """conv3x3 -> lrelu -> resize -> conv3x3 -> lrelu, plus a resized 1x1-conv skip.

    ``mode`` 'down' halves, 'up' doubles the resolution (bilinear, align_corners=False).
    """

    def __init__(self, in_channels: int, out_channels: int, mode: str = "down"):
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"mode must be 'down' or 'up', not {mode!r}")
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2.0

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu_(self.conv1(x), _LEAKY_SLOPE)
        out = F.leaky_relu_(self.conv2(self._resize(out)), _LEAKY_SLOPE)
        return out + self.skip(self._resize(x))


def _condition_branch(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1),
        nn.LeakyReLU(_LEAKY_SLOPE, inplace=True),
        nn.Conv2d(channels, out_channels, 3, 1, 1),
    )


class GFPGANv1Clean(nn.Module):
    """GFPGAN: U-Net + StyleGAN2 decoder with spatial feature transform (SFT).

    Constructor arguments are the official ones. ``decoder_load_path`` (loading a
    pre-trained StyleGAN2 into the decoder, a training step) is not supported and
    must be None; ``fix_decoder`` only freezes the decoder's parameters.
    The U-Net uses half the decoder's channels (``narrow * 0.5``); with
    ``sft_half`` the conditions modulate half of the decoder channels.
    """

    def __init__(self, out_size: int, num_style_feat: int = 512, channel_multiplier: float = 1,
                 decoder_load_path: Optional[str] = None, fix_decoder: bool = True, num_mlp: int = 8,
                 input_is_latent: bool = False, different_w: bool = False, narrow: float = 1,
                 sft_half: bool = False):
        super().__init__()
        if decoder_load_path:
            raise ValueError("decoder_load_path is a training option and is not supported (leave it None)")
        self.input_is_latent = input_is_latent
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        self.log_size = int(math.log2(out_size))
        ch = stylegan2_channels(channel_multiplier, narrow * 0.5)  # U-Net channels per resolution
        levels = range(3, self.log_size + 1)  # resolutions 8 .. out_size as powers of two

        self.conv_body_first = nn.Conv2d(3, ch[2**self.log_size], 1)
        self.conv_body_down = nn.ModuleList(
            ResBlock(ch[2**lv], ch[2 ** (lv - 1)], mode="down") for lv in reversed(levels))
        self.final_conv = nn.Conv2d(ch[4], ch[4], 3, 1, 1)
        self.conv_body_up = nn.ModuleList(
            ResBlock(ch[2 ** (lv - 1)], ch[2**lv], mode="up") for lv in levels)
        # Intermediate RGB heads (training losses); only used with return_rgb=True.
        self.toRGB = nn.ModuleList(nn.Conv2d(ch[2**lv], 3, 1) for lv in levels)

        num_latent = self.log_size * 2 - 2
        self.final_linear = nn.Linear(ch[4] * 4 * 4, num_latent * num_style_feat if different_w else num_style_feat)

        self.stylegan_decoder = StyleGAN2Generator(
            out_size=out_size, num_style_feat=num_style_feat, num_mlp=num_mlp,
            channel_multiplier=channel_multiplier, narrow=narrow, sft_half=sft_half)
        if fix_decoder:
            self.stylegan_decoder.requires_grad_(False)

        # SFT (scale, shift) heads per level; with sft_half they cover half the decoder channels
        # (= the U-Net's channel count), otherwise all of them.
        sft_factor = 1 if sft_half else 2
        self.condition_scale = nn.ModuleList(_condition_branch(ch[2**lv], sft_factor * ch[2**lv]) for lv in levels)
        self.condition_shift = nn.ModuleList(_condition_branch(ch[2**lv], sft_factor * ch[2**lv]) for lv in levels)

    def encode(self, x: torch.Tensor, return_rgb: bool = False):
        """U-Net pass: ``(style_code, conditions, out_rgbs)``.

        style_code: (b, num_latent, F) with ``different_w``, else (b, F);
        conditions: one (scale, shift) pair per resolution 8 .. out_size.
        """
        feat = F.leaky_relu_(self.conv_body_first(x), _LEAKY_SLOPE)
        skips = []
        for block in self.conv_body_down:
            feat = block(feat)
            skips.append(feat)
        feat = F.leaky_relu_(self.final_conv(feat), _LEAKY_SLOPE)

        style_code = self.final_linear(feat.flatten(1))
        if self.different_w:
            style_code = style_code.view(style_code.shape[0], -1, self.num_style_feat)

        conditions, out_rgbs = [], []
        for i, up in enumerate(self.conv_body_up):
            feat = up(feat + skips[-1 - i])
            conditions.append((self.condition_scale[i](feat), self.condition_shift[i](feat)))
            if return_rgb:
                out_rgbs.append(self.toRGB[i](feat))
        return style_code, conditions, out_rgbs

    def forward(self, x: torch.Tensor, return_latents: bool = False, return_rgb: bool = True,
                randomize_noise: bool = True):
        """Official call: returns ``(image, out_rgbs)`` (out_rgbs empty unless ``return_rgb``).

        ``randomize_noise=True`` draws fresh decoder noise on every call (the
        official default); False uses the stored ``noises`` buffers.
        ``return_latents`` is accepted for compatibility and, as officially, unused.
        """
        style_code, conditions, out_rgbs = self.encode(x, return_rgb)
        image, _ = self.stylegan_decoder([style_code], conditions, input_is_latent=self.input_is_latent,
                                         randomize_noise=randomize_noise)
        return image, out_rgbs
