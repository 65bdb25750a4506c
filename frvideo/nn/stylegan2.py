"""StyleGAN2 building blocks ("clean" variant: plain PyTorch, no custom CUDA ops).

Shared by the backends that decode through a StyleGAN2 generator (GFPGAN, later
ENTED). Parameter and buffer names follow the official "clean" generator
(``StyleGAN2GeneratorClean`` in GFPGAN / BasicSR), so released checkpoints load
strictly:

* ``ModulatedConv2d``  - ``modulation`` (Linear: style -> per-input-channel scale),
  ``weight`` (1, C_out, C_in, k, k).
* ``StyleConv``        - ``modulated_conv``, ``weight`` (1,) noise strength,
  ``bias`` (1, C_out, 1, 1).
* ``ToRGB``            - ``modulated_conv`` (1x1, no demodulation), ``bias`` (1, 3, 1, 1).
* ``ConstantInput``    - ``weight`` (1, C, 4, 4).
* ``StyleGAN2Generator`` - ``style_mlp`` (Sequential: [NormStyleCode, (Linear, LeakyReLU) x num_mlp],
  so the Linear layers sit at odd indices), ``constant_input``, ``style_conv1``,
  ``to_rgb1``, ``style_convs`` (two per resolution 8..out_size, the first upsamples),
  ``to_rgbs`` (one per resolution 8..out_size), ``noises.noise{i}`` (persistent
  buffers, one per style conv).

Conventions of the clean variant that matter numerically: up-sampling is
``F.interpolate(scale_factor=2, mode='bilinear', align_corners=False)`` (no
blur kernel), the style conv output is multiplied by sqrt(2) before the noise
and bias are added, and activations are LeakyReLU(0.2) without extra gain.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

_LEAKY_SLOPE = 0.2


def stylegan2_channels(channel_multiplier: float = 2, narrow: float = 1.0) -> dict[int, int]:
    """Feature channels per resolution (4 .. 1024) of the StyleGAN2 generator."""
    base = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
    return {
        res: int(ch * narrow) if res <= 32 else int(ch * channel_multiplier * narrow)
        for res, ch in base.items()
    }


def _resample(x: torch.Tensor, mode: Optional[str]) -> torch.Tensor:
    if mode is None:
        return x
    factor = {"upsample": 2.0, "downsample": 0.5}[mode]
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


class NormStyleCode(nn.Module):
    """Pixel-norm of style codes (b, c): divide by the RMS over c."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """Convolution whose weight is scaled per input channel by a style (no bias).

    Effective weight for sample b: ``w'[b,o,i] = w[o,i] * s[b,i]`` with
    ``s = modulation(style)``; with ``demodulate`` each output filter is then
    rescaled to unit L2 norm: ``w''[b,o] = w'[b,o] / sqrt(sum_i,k w'[b,o,i,k]^2 + eps)``.
    ``sample_mode`` 'upsample' / 'downsample' resizes the input bilinearly
    (x2 / x0.5, align_corners=False) before the convolution.

    The forward pass does not build the per-sample weights: it scales the input
    by s, convolves with the shared weight and scales the output by the
    demodulation factor. This equals the grouped convolution with
    ``modulated_weight(style)`` (convolution and bilinear resizing are linear per
    channel) and runs as one ordinary convolution for the whole batch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, sample_mode: Optional[str] = None, eps: float = 1e-8):
        super().__init__()
        if sample_mode not in (None, "upsample", "downsample"):
            raise ValueError(f"sample_mode must be None, 'upsample' or 'downsample', not {sample_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.demodulate = demodulate
        self.sample_mode = sample_mode
        self.eps = eps
        self.padding = kernel_size // 2

        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        nn.init.normal_(self.modulation.weight, std=1.0 / math.sqrt(num_style_feat))
        nn.init.ones_(self.modulation.bias)
        self.weight = nn.Parameter(
            torch.randn(1, out_channels, in_channels, kernel_size, kernel_size)
            / math.sqrt(in_channels * kernel_size**2))

    def _demodulation(self, scales: torch.Tensor) -> torch.Tensor:
        """(b, C_in) input scales -> (b, C_out) factors giving unit-norm filters."""
        w2 = self.weight[0].float().square().sum(dim=(2, 3))  # (C_out, C_in)
        return torch.rsqrt(scales.float().square() @ w2.t() + self.eps).to(scales.dtype)

    def modulated_weight(self, style: torch.Tensor) -> torch.Tensor:
        """The effective per-sample weights, (b, C_out, C_in, k, k)."""
        scales = self.modulation(style)
        weight = self.weight * scales[:, None, :, None, None]
        if self.demodulate:
            weight = weight * self._demodulation(scales)[:, :, None, None, None]
        return weight

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        scales = self.modulation(style)  # (b, C_in)
        x = _resample(x, self.sample_mode)
        out = F.conv2d(x * scales.view(b, -1, 1, 1), self.weight[0], padding=self.padding)
        if self.demodulate:
            out = out * self._demodulation(scales).view(b, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, demodulate={self.demodulate}, sample_mode={self.sample_mode}")


class StyleConv(nn.Module):
    """Modulated 3x3 conv (x sqrt 2) + per-pixel noise + bias + LeakyReLU(0.2).

    ``noise`` (broadcastable to (b, 1, h, w)) is scaled by the learned scalar
    ``weight``; when it is None fresh N(0, 1) noise is drawn for every sample.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, sample_mode: Optional[str] = None):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, kernel_size, num_style_feat,
                                              demodulate=demodulate, sample_mode=sample_mode)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2.0)
        if noise is None:
            b, _, h, w = out.shape
            noise = out.new_empty(b, 1, h, w).normal_()
        out = out + self.weight * noise
        out = out + self.bias
        return F.leaky_relu_(out, _LEAKY_SLOPE)


class ToRGB(nn.Module):
    """Features -> RGB by a modulated 1x1 conv (no demodulation) + bias.

    With ``skip`` (the RGB image of the previous, half resolution when
    ``upsample``) the skip is resized bilinearly x2 and added.
    """

    def __init__(self, in_channels: int, num_style_feat: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = _resample(skip, "upsample")
            out = out + skip
        return out


class ConstantInput(nn.Module):
    """The learned 4x4 input of the generator, repeated over the batch."""

    def __init__(self, num_channel: int, size: int = 4):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


def apply_sft(feat: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, half: bool) -> torch.Tensor:
    """Spatial feature transform ``feat * scale + shift``.

    With ``half`` only the second half of the channels is transformed (the
    first half passes unchanged); scale/shift then have C/2 channels.
    """
    if not half:
        return feat * scale + shift
    keep, mod = torch.split(feat, feat.shape[1] // 2, dim=1)
    return torch.cat([keep, mod * scale + shift], dim=1)


class StyleGAN2Generator(nn.Module):
    """The StyleGAN2 generator, clean variant (``StyleGAN2GeneratorClean`` equivalent).

    Structure for ``out_size = 2**L``: constant 4x4 input -> ``style_conv1`` ->
    ``to_rgb1``; then for each resolution 8, 16, .., out_size two style convs
    (the first upsamples) and a ToRGB that adds onto the upsampled previous RGB.
    It has ``num_layers = 2L - 3`` style convs (noise i feeds style conv i:
    ``style_conv1`` is 0, ``style_convs[j]`` is j + 1) and consumes
    ``num_latent = 2L - 2`` latents (one per style conv and one per final ToRGB;
    a ToRGB shares the latent index of the next resolution's first conv).

    Optional SFT conditions (GFPGAN): a list of (scale, shift) pairs, pair k is
    applied after the first (upsampling) style conv of resolution 8 * 2**k
    (``sft_half``: to the second half of its channels only). Fewer pairs than
    resolutions leave the remaining levels untouched.
    """

    def __init__(self, out_size: int, num_style_feat: int = 512, num_mlp: int = 8,
                 channel_multiplier: float = 2, narrow: float = 1.0, sft_half: bool = False):
        super().__init__()
        log_size = int(math.log2(out_size))
        if 2**log_size != out_size or log_size < 3:
            raise ValueError(f"out_size must be a power of two >= 8, not {out_size}")
        self.out_size = out_size
        self.num_style_feat = num_style_feat
        self.log_size = log_size
        self.num_layers = (log_size - 2) * 2 + 1
        self.num_latent = log_size * 2 - 2
        self.sft_half = sft_half
        self.channels = channels = stylegan2_channels(channel_multiplier, narrow)

        mlp: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            linear = nn.Linear(num_style_feat, num_style_feat)
            nn.init.kaiming_normal_(linear.weight, a=_LEAKY_SLOPE, mode="fan_in", nonlinearity="leaky_relu")
            nn.init.zeros_(linear.bias)
            mlp += [linear, nn.LeakyReLU(_LEAKY_SLOPE, inplace=True)]
        self.style_mlp = nn.Sequential(*mlp)

        self.constant_input = ConstantInput(channels[4], size=4)
        self.style_conv1 = StyleConv(channels[4], channels[4], 3, num_style_feat)
        self.to_rgb1 = ToRGB(channels[4], num_style_feat, upsample=False)

        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()  # holds persistent buffers noise0 .. noise{num_layers-1}
        for i, shape in enumerate(self.noise_shapes()):
            self.noises.register_buffer(f"noise{i}", torch.randn(1, 1, *shape))

        in_channels = channels[4]
        for level in range(3, log_size + 1):
            out_channels = channels[2**level]
            self.style_convs.append(StyleConv(in_channels, out_channels, 3, num_style_feat, sample_mode="upsample"))
            self.style_convs.append(StyleConv(out_channels, out_channels, 3, num_style_feat))
            self.to_rgbs.append(ToRGB(out_channels, num_style_feat, upsample=True))
            in_channels = out_channels

    # -- noise ------------------------------------------------------------------
    def noise_shapes(self) -> list[tuple[int, int]]:
        """Spatial size of each style conv's noise: 4, 8, 8, 16, 16, .., out_size, out_size."""
        return [(2 ** ((i + 5) // 2),) * 2 for i in range(self.num_layers)]

    def stored_noise(self) -> list[torch.Tensor]:
        """The fixed noise buffers (1, 1, h, w), one per style conv."""
        return [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]

    def make_noise(self, batch: int = 1, generator: Optional[torch.Generator] = None) -> list[torch.Tensor]:
        """Fresh N(0, 1) noise, one (batch, 1, h, w) tensor per style conv (seedable)."""
        ref = self.constant_input.weight
        return [torch.randn(batch, 1, *shape, generator=generator, device=ref.device, dtype=ref.dtype)
                for shape in self.noise_shapes()]

    # -- styles -> per-layer latents ----------------------------------------------
    def get_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self.style_mlp(z)

    def latents(self, styles: Sequence[torch.Tensor], input_is_latent: bool = False, truncation: float = 1.0,
                truncation_latent: Optional[torch.Tensor] = None,
                inject_index: Optional[int] = None) -> torch.Tensor:
        """Style codes -> latents (b, num_latent, num_style_feat).

        One style: a (b, F) code is repeated for every layer, a (b, num_latent, F)
        code is used as is. Two styles (style mixing): the first feeds layers
        < inject_index (random when None), the second the rest.
        """
        if not input_is_latent:
            styles = [self.style_mlp(s) for s in styles]
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) == 1:
            s = styles[0]
            return s if s.ndim == 3 else s.unsqueeze(1).repeat(1, self.num_latent, 1)
        if len(styles) == 2:
            if inject_index is None:
                inject_index = random.randint(1, self.num_latent - 1)
            first = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
            second = styles[1].unsqueeze(1).repeat(1, self.num_latent - inject_index, 1)
            return torch.cat([first, second], dim=1)
        raise ValueError(f"expected one or two style codes, got {len(styles)}")

    # -- synthesis ---------------------------------------------------------------
    def synthesize(self, latent: torch.Tensor, noise: Sequence[Optional[torch.Tensor]],
                   conditions: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None) -> torch.Tensor:
        """Latents (b, num_latent, F) + per-layer noise (None = fresh) -> image (b, 3, out_size, out_size)."""
        conditions = list(conditions or [])
        out = self.constant_input(latent.shape[0])
        out = self.style_conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        for level, to_rgb in enumerate(self.to_rgbs):
            i = 2 * level + 1  # latent / noise index of this resolution's first conv
            out = self.style_convs[2 * level](out, latent[:, i], noise=noise[i])
            if level < len(conditions):
                scale, shift = conditions[level]
                out = apply_sft(out, scale, shift, self.sft_half)
            out = self.style_convs[2 * level + 1](out, latent[:, i + 1], noise=noise[i + 1])
            skip = to_rgb(out, latent[:, i + 2], skip)
        return skip

    def forward(self, styles: Sequence[torch.Tensor] | torch.Tensor,
                conditions: Optional[Sequence[tuple[torch.Tensor, torch.Tensor]]] = None,
                input_is_latent: bool = False, noise: Optional[Sequence[Optional[torch.Tensor]]] = None,
                randomize_noise: bool = True, truncation: float = 1.0,
                truncation_latent: Optional[torch.Tensor] = None, inject_index: Optional[int] = None,
                return_latents: bool = False):
        """Official call signature: returns ``(image, latent if return_latents else None)``.

        ``noise``: explicit per-layer noise; otherwise fresh noise for every call
        when ``randomize_noise``, the stored ``noises.noise{i}`` buffers when not.
        """
        if isinstance(styles, torch.Tensor):
            styles = [styles]
        if noise is None:
            noise = [None] * self.num_layers if randomize_noise else self.stored_noise()
        latent = self.latents(styles, input_is_latent, truncation, truncation_latent, inject_index)
        image = self.synthesize(latent, noise, conditions)
        return image, (latent if return_latents else None)
