"""Modulated deformable convolution (DCNv2) in plain PyTorch.

Why hand-written: the official VQFR code calls ``torchvision.ops.deform_conv2d``
(or a CUDA extension), and frvideo does not depend on torchvision (it is not
available for every CPU build of torch we target). This module reproduces the
same operator with ``F.grid_sample`` + one matrix product, so it runs on any
device and dtype torch supports.

Semantics (identical to torchvision / mmcv ``ModulatedDeformConv2d``):

* ``offset`` has ``2 * dg * kh * kw`` channels. For deformable group ``g``
  (input channels ``[g*C/dg, (g+1)*C/dg)``) and kernel tap ``k = i*kw + j``
  (row-major) the displacement is ``dy = offset[:, g*2*K + 2*k]``,
  ``dx = offset[:, g*2*K + 2*k + 1]`` (K = kh*kw): (dy, dx) interleaved per tap.
* ``mask`` has ``dg * K`` channels, ``mask[:, g*K + k]``.
* The tap samples the input at ``py = oy*stride - pad + i*dilation + dy``,
  ``px = ox*stride - pad + j*dilation + dx`` bilinearly; a corner outside the
  image reads 0 (so a point with ``py <= -1``, ``py >= H``, ... reads 0).
* ``out = weight.view(Cout, C*K) @ (mask * sample) + bias``.

Bilinear sampling with zero-valued out-of-image corners is exactly what
``grid_sample(mode='bilinear', padding_mode='zeros')`` does; the positions are
normalised with the ``align_corners=False`` convention (which also works for
1-pixel-wide maps) so that grid_sample recovers the same pixel coordinates.

Cost: per block of output rows, one grid_sample over all taps and groups,
one in-place multiply by the mask and one matrix product; chunking keeps the
sampled-column buffer bounded (a 128-channel 512x512 map would otherwise need
1.2 GB of columns) and cache-sized.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

_Pair = Union[int, tuple[int, int]]

# Upper bound on the number of elements of the sampled-column buffer per chunk
# (16 MB in float32: small enough to stay in cache between sampling and matmul,
# measured ~1.7x faster than 64 MB chunks on a 128-channel 512x512 map).
_MAX_COLUMN_ELEMENTS = 1 << 22


def _pair(v: _Pair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def modulated_deform_conv2d(
    x: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: _Pair = 1,
    padding: _Pair = 0,
    dilation: _Pair = 1,
) -> torch.Tensor:
    """DCNv2: ``x`` (B,C,H,W), ``offset`` (B,2*dg*K,Ho,Wo), ``mask`` (B,dg*K,Ho,Wo) or None.

    ``weight`` is (Cout, C, kh, kw) (no grouped convolution), the number of
    deformable groups ``dg`` is read from the offset's channel count.
    Computation happens in float32 at least (pixel coordinates in half
    precision would be off by a fraction of a pixel); the result has x's dtype.
    """
    b, c, h, w = x.shape
    cout, cin, kh, kw = weight.shape
    if cin != c:
        raise ValueError(f"weight expects {cin} input channels, got {c}")
    k = kh * kw
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    ho, wo = offset.shape[-2:]
    if offset.shape[1] % (2 * k):
        raise ValueError(f"offset has {offset.shape[1]} channels, not a multiple of 2*{k}")
    dg = offset.shape[1] // (2 * k)
    if c % dg:
        raise ValueError(f"{c} channels do not split into {dg} deformable groups")
    cg = c // dg

    out_dtype = x.dtype
    cdtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(cdtype)
    offset = offset.to(cdtype).view(b, dg, k, 2, ho, wo)
    if mask is not None:
        mask = mask.to(cdtype).view(b, dg, 1, k, ho, wo)
    wmat = weight.to(cdtype).reshape(cout, c * k)  # column c*K + k

    # Sampling positions of every (group, tap, output pixel), normalised to
    # [-1, 1] with the align_corners=False convention that grid_sample undoes.
    dev = x.device
    tap_y = (torch.arange(kh, device=dev, dtype=cdtype) * dh).repeat_interleave(kw)  # (K,)
    tap_x = (torch.arange(kw, device=dev, dtype=cdtype) * dw).repeat(kh)  # (K,)
    out_y = torch.arange(ho, device=dev, dtype=cdtype) * sh - ph  # (Ho,)
    out_x = torch.arange(wo, device=dev, dtype=cdtype) * sw - pw  # (Wo,)
    py = out_y.view(ho, 1) + tap_y.view(k, 1, 1) + offset[:, :, :, 0]  # b, dg, K, Ho, Wo
    px = out_x + tap_x.view(k, 1, 1) + offset[:, :, :, 1]
    grid = torch.stack(((2.0 * px + 1.0) / w - 1.0, (2.0 * py + 1.0) / h - 1.0), dim=-1)
    grid = grid.view(b * dg, k, ho, wo, 2)

    # One block of output rows at a time: sample all groups and taps, modulate,
    # multiply by the weight matrix.
    x_groups = x.reshape(b * dg, cg, h, w)
    rows = max(1, min(ho, _MAX_COLUMN_ELEMENTS // max(1, b * c * k * wo)))
    out = x.new_empty(b, cout, ho, wo)
    for r0 in range(0, ho, rows):
        r1 = min(ho, r0 + rows)
        cols = F.grid_sample(x_groups, grid[:, :, r0:r1].reshape(b * dg, k * (r1 - r0), wo, 2),
                             mode="bilinear", padding_mode="zeros", align_corners=False)
        cols = cols.view(b, dg, cg, k, r1 - r0, wo)
        if mask is not None:
            cols.mul_(mask[..., r0:r1, :])
        # row (g*Cg + cg)*K + k of the columns: the order of weight.view(Cout, C*K)
        res = torch.matmul(wmat, cols.view(b, c * k, (r1 - r0) * wo))
        out[:, :, r0:r1] = res.view(b, cout, r1 - r0, wo)
    if bias is not None:
        out += bias.to(cdtype).view(1, -1, 1, 1)
    return out.to(out_dtype)


class DCNv2Pack(nn.Module):
    """Modulated deformable conv whose offsets and mask come from a conditioning feature.

    ``conv_offset`` (a regular conv over ``cond``) predicts ``3 * dg * K``
    channels split into three equal chunks o1, o2, m; the offset is
    ``cat(o1, o2)`` (interpreted with the interleaved (dy, dx) layout described
    in the module docstring) and the mask ``sigmoid(m)``. State-dict keys:
    ``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias`` (the
    layout of basicsr/VQFR ``DCNv2Pack``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair = 3, stride: _Pair = 1,
                 padding: _Pair = 0, dilation: _Pair = 1, deformable_groups: int = 1, bias: bool = True,
                 cond_channels: int | None = None):
        super().__init__()
        kh, kw = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kh, kw))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.conv_offset = nn.Conv2d(
            in_channels if cond_channels is None else cond_channels, deformable_groups * 3 * kh * kw,
            (kh, kw), self.stride, self.padding, self.dilation, bias=True)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o1, o2, m = torch.chunk(self.conv_offset(cond), 3, dim=1)
        return torch.cat((o1, o2), dim=1), torch.sigmoid(m)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_and_mask(cond)
        return modulated_deform_conv2d(x, offset, mask, self.weight, self.bias,
                                       self.stride, self.padding, self.dilation)
