"""VQFR v1 (TencentARC/VQFR ``VQFRv1``), re-implemented with the official state-dict layout.

Structure: a multi-level VQGAN encoder (levels 'Level_1' .. 'Level_<proj_patch_size>',
each with its own resolution rate); the coarsest level is projected by the
quantizer's ``quant_conv`` and snapped to the nearest of 1024 codes (L2), then
``post_quant_conv`` and the VQGAN decoder produce the texture image ``dec``.
The main decoder warps the decoder's per-level features towards the input
with deformable convolutions and ends with a conv over cat(features, input),
giving ``main_dec``. v1 has no fidelity control.

The released weights correspond to the ``L2VectorQuantizerKmeans`` quantizer
(keys ``quant_conv``, ``post_quant_conv``, ``embedding``); the k-means
re-estimation and reservoir are training-only and not reproduced.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import TextureWarpingModule, group_norm, nearest_code_scores, upsample_offset


class UpDownSample(nn.Module):
    """Bilinear resize by ``scale_factor`` with a 3x3 conv (before upsampling / after downsampling).

    A factor of 1 is the identity and has no conv.
    """

    def __init__(self, in_channels: int, out_channels: int, scale_factor, direction: str):
        super().__init__()
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', not {direction!r}")
        self.scale_factor, self.direction = scale_factor, direction
        if scale_factor != 1:
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x):
        if self.scale_factor == 1:
            return x
        h, w = x.shape[-2:]
        if self.direction == "up":
            size = (int(self.scale_factor * h), int(self.scale_factor * w))
            return F.interpolate(self.conv(x), size=size, mode="bilinear", align_corners=False)
        size = (int(h / self.scale_factor), int(w / self.scale_factor))
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.act = nn.SiLU(inplace=True)
        if in_channels != out_channels:
            self.shortcut_conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        shortcut = self.shortcut_conv(x) if hasattr(self, "shortcut_conv") else x
        return shortcut + h


class _Levels:
    """Channel count and resolution rate per level name, as the official modules derive them."""

    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers, reverse_rates):
        self.log_size = int(math.log(proj_patch_size, 2))
        rates = list(resolution_scale_rates)[::-1] if reverse_rates else list(resolution_scale_rates)
        self.names = [f"Level_{2 ** s}" for s in range(self.log_size + 1)]
        self.channels = {n: channel_multipliers[s] * base_channels for s, n in enumerate(self.names)}
        self.rate = {n: rates[s] for s, n in enumerate(self.names)}


class VQGANEncoder(nn.Module):
    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                 encoder_num_blocks, quant_level):
        super().__init__()
        lv = _Levels(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers, False)
        self.names = lv.names
        self.conv_in = nn.Conv2d(3, lv.channels["Level_1"], kernel_size=3, padding=1)
        self.encoder_dict = nn.ModuleDict()
        self.pre_downsample_dict = nn.ModuleDict()
        for s, name in enumerate(lv.names):
            ch, prev = lv.channels[name], lv.channels[lv.names[max(s - 1, 0)]]
            self.encoder_dict[name] = nn.Sequential(*[ResnetBlock(ch, ch) for _ in range(encoder_num_blocks)])
            self.pre_downsample_dict[name] = UpDownSample(prev, ch, lv.rate[name], direction="down")
        self.quant_level = list(quant_level)
        self.enc_convout_dict = nn.ModuleDict()
        for name in self.quant_level:
            ch = lv.channels[name]
            self.enc_convout_dict[name] = nn.Sequential(group_norm(ch), nn.SiLU(inplace=True),
                                                        nn.Conv2d(ch, ch, kernel_size=3, padding=1))

    def forward(self, x) -> dict[str, torch.Tensor]:
        out = {}
        x = self.conv_in(x)
        for name in self.names:
            x = self.encoder_dict[name](self.pre_downsample_dict[name](x))
            if name in self.quant_level:
                out[name] = x
        return {name: self.enc_convout_dict[name](feat) for name, feat in out.items()}


class VQGANDecoder(nn.Module):
    """Returns the image and the features after each level."""

    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                 decoder_num_blocks):
        super().__init__()
        lv = _Levels(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers, True)
        self.names = lv.names[::-1]  # coarse to fine
        self.decoder_dict = nn.ModuleDict()
        self.pre_upsample_dict = nn.ModuleDict()
        for s, name in enumerate(self.names):
            ch, prev = lv.channels[name], lv.channels[self.names[max(s - 1, 0)]]
            self.decoder_dict[name] = nn.Sequential(*[ResnetBlock(ch, ch) for _ in range(decoder_num_blocks)])
            self.pre_upsample_dict[name] = UpDownSample(prev, ch, lv.rate[name], direction="up")
        ch0 = lv.channels["Level_1"]
        self.conv_out = nn.Sequential(group_norm(ch0), nn.SiLU(inplace=True),
                                      nn.Conv2d(ch0, 3, kernel_size=3, padding=1))

    def forward(self, x) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        feats = {}
        for name in self.names:
            x = self.decoder_dict[name](self.pre_upsample_dict[name](x))
            feats[name] = x
        return self.conv_out(x), feats


class MainDecoder(nn.Module):
    def __init__(self, base_channels, resolution_scale_rates, channel_multipliers, align_opt, align_from_patch):
        super().__init__()
        lv = _Levels(base_channels, align_from_patch, resolution_scale_rates, channel_multipliers, True)
        self.names = lv.names[::-1]  # coarse to fine, starting at Level_<align_from_patch>
        self.decoder_dict = nn.ModuleDict()
        self.pre_upsample_dict = nn.ModuleDict()
        for s, name in enumerate(self.names[1:], start=1):
            ch, prev = lv.channels[name], lv.channels[self.names[s - 1]]
            self.decoder_dict[name] = ResnetBlock(2 * ch, ch)
            self.pre_upsample_dict[name] = UpDownSample(prev, ch, lv.rate[name], direction="up")
        self.align_func_dict = nn.ModuleDict()
        for name, cfg in (align_opt or {}).items():  # official order: that of align_opt
            size = int(name.split("_")[1])
            previous = 0 if size == align_from_patch else lv.channels[f"Level_{2 * size}"]
            self.align_func_dict[name] = TextureWarpingModule(
                channel=lv.channels[name], cond_channels=cfg["cond_channels"],
                deformable_groups=cfg["deformable_groups"], previous_offset_channel=previous,
                cond_resize=UpDownSample(cfg["cond_channels"], cfg["cond_channels"], cfg["cond_downscale_rate"],
                                         direction="down"))
        ch0 = lv.channels["Level_1"]
        self.conv_out_1 = nn.Sequential(group_norm(ch0), nn.SiLU(inplace=True))
        self.conv_out = nn.Sequential(nn.Conv2d(ch0 + 3, 3, kernel_size=3, padding=1))

    def forward(self, feats: dict[str, torch.Tensor], inpfeat: torch.Tensor, x_lq: torch.Tensor) -> torch.Tensor:
        top = self.names[0]
        x, offset = self.align_func_dict[top](feats[top], inpfeat)
        for name in self.names[1:]:
            x = self.pre_upsample_dict[name](x)
            warp_feat, offset = self.align_func_dict[name](feats[name], inpfeat, upsample_offset(offset))
            x = self.decoder_dict[name](torch.cat([x, warp_feat], dim=1))
        return self.conv_out(torch.cat([self.conv_out_1(x), x_lq], dim=1))


class L2Quantizer(nn.Module):
    """The v1 quantizer at one level: 1x1 projection, nearest code, 1x1 projection back."""

    def __init__(self, num_code, in_dim, code_dim, **training_only):
        super().__init__()
        self.num_code, self.code_dim = num_code, code_dim
        self.quant_conv = nn.Conv2d(in_dim, code_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(code_dim, in_dim, kernel_size=1)
        self.embedding = nn.Embedding(num_code, code_dim)

    def scores(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x h*w x K negative squared distances, ``z_conv`` = quant_conv(z))."""
        z_conv = self.quant_conv(z)
        return nearest_code_scores(z_conv, self.embedding.weight), z_conv

    def lookup(self, tokens: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b = tokens.shape[0]
        quant = self.embedding(tokens).view(b, hw[0], hw[1], self.code_dim).permute(0, 3, 1, 2).contiguous()
        return self.post_quant_conv(quant)


class GeneralizedQuantizer(nn.Module):
    """``quantize_dict`` of per-level quantizers (the layout of the official module)."""

    _TYPES = ("L2VectorQuantizerKmeans", "L2VectorQuantizer")  # the latter: the pre-v2 name of the same class

    def __init__(self, quantizer_opt: dict):
        super().__init__()
        self.quantize_dict = nn.ModuleDict()
        for name, opt in quantizer_opt.items():
            opt = dict(opt)
            qtype = opt.pop("type")
            if qtype not in self._TYPES or "in_dim" not in opt:
                raise ValueError(f"VQFR v1 needs an L2VectorQuantizerKmeans quantizer, got {qtype!r}")
            self.quantize_dict[name] = L2Quantizer(**opt)


class InpFeatConv(nn.Module):
    """The input feature that conditions the deformable alignment (a 3x3 conv of the image)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, padding=1)

    def forward(self, x):
        return self.conv(x)


class VQFRv1(nn.Module):
    """Same constructor arguments as the official ``VQFRv1`` (``align_opt`` is not modified)."""

    def __init__(self, base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                 encoder_num_blocks, decoder_num_blocks, quant_level, inpfeat_extraction_opt, align_opt,
                 align_from_patch, quantizer_opt, fix_keys=()):
        super().__init__()
        self.level = f"Level_{proj_patch_size}"
        if list(quant_level) != [self.level] or list(quantizer_opt) != [self.level]:
            raise ValueError(f"VQFR v1 decodes from one quantized level, {self.level}; got {quant_level}")
        self.downscale = math.prod(resolution_scale_rates[:int(math.log(proj_patch_size, 2)) + 1])

        self.inpfeat_extraction = InpFeatConv(**inpfeat_extraction_opt)
        self.encoder = VQGANEncoder(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                                    encoder_num_blocks, quant_level)
        self.decoder = VQGANDecoder(base_channels, proj_patch_size, resolution_scale_rates, channel_multipliers,
                                    decoder_num_blocks)
        self.main_decoder = MainDecoder(base_channels, resolution_scale_rates, channel_multipliers, align_opt,
                                        align_from_patch)
        self.quantizer = GeneralizedQuantizer(quantizer_opt)

    @property
    def _quant(self) -> L2Quantizer:
        return self.quantizer.quantize_dict[self.level]

    @property
    def num_code(self) -> int:
        return self._quant.num_code

    def token_grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.downscale, x.shape[-1] // self.downscale

    # -- the token interface ------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``scores``: negative squared L2 distance to every code (argmax = official argmin); ``z_conv``."""
        scores, z_conv = self._quant.scores(self.encoder(x)[self.level])
        return {"scores": scores, "z_conv": z_conv}

    def decode(self, x: torch.Tensor, tokens: torch.Tensor, fidelity_ratio=None) -> dict[str, torch.Tensor]:
        """``dec`` (texture branch) and ``main_dec`` from token indices and the input image ``x``."""
        dec, feats = self.decoder(self._quant.lookup(tokens, self.token_grid(x)))
        inpfeat = self.inpfeat_extraction(x)
        return {"dec": dec, "main_dec": self.main_decoder(feats, inpfeat, x)}

    def forward(self, x_lq: torch.Tensor, fidelity_ratio=None) -> dict[str, torch.Tensor]:
        """The official output dict (``return_keys=('dec')``): dec, main_dec. ``fidelity_ratio`` is ignored."""
        enc = self.encode(x_lq)
        return self.decode(x_lq, enc["scores"].argmax(-1))
