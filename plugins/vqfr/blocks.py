"""Pieces shared by the VQFR v1 and v2 networks.

The main ("fidelity") decoder of both versions warps the texture decoder's
features towards the degraded input with deformable convolutions: at every
level a ``TextureWarpingModule`` predicts an offset feature from the
(resized) input feature and the texture feature, refined with the upsampled
offset feature of the coarser level, and a ``DCNv2Pack`` samples the texture
feature with the offsets/mask predicted from it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from frvideo.nn.dcn import DCNv2Pack


def group_norm(channels: int) -> nn.GroupNorm:
    """The normalisation used throughout VQFR: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class TextureWarpingModule(nn.Module):
    """One level of the deformable alignment.

    ``cond_resize`` brings the full-resolution input feature to this level's
    size (v1: bilinear resize + conv, stored as ``downsample``; v2: a bare
    bilinear resize with no parameters).
    """

    def __init__(self, channel: int, cond_channels: int, deformable_groups: int, previous_offset_channel: int,
                 cond_resize: nn.Module):
        super().__init__()
        self.downsample = cond_resize
        self.offset_conv1 = nn.Sequential(
            nn.Conv2d(channel + cond_channels, channel, kernel_size=1),
            group_norm(channel), nn.SiLU(inplace=True),
            nn.Conv2d(channel, channel, kernel_size=7, padding=3, groups=channel),
            group_norm(channel), nn.SiLU(inplace=True),
            nn.Conv2d(channel, channel, kernel_size=1))
        self.offset_conv2 = nn.Sequential(
            nn.Conv2d(channel + previous_offset_channel, channel, kernel_size=3, padding=1),
            group_norm(channel), nn.SiLU(inplace=True))
        self.dcn = DCNv2Pack(channel, channel, 3, padding=1, deformable_groups=deformable_groups)

    def forward(self, x_main: torch.Tensor, cond: torch.Tensor,
                previous_offset: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.downsample(cond)
        offset_feat = self.offset_conv1(torch.cat([cond, x_main], dim=1))
        if previous_offset is not None:
            offset_feat = torch.cat([offset_feat, previous_offset], dim=1)
        offset_feat = self.offset_conv2(offset_feat)
        return self.dcn(x_main, offset_feat), offset_feat


def upsample_offset(offset_feat: torch.Tensor) -> torch.Tensor:
    """The coarser level's offset feature, doubled in size and magnitude."""
    return F.interpolate(offset_feat, scale_factor=2, mode="bilinear", align_corners=False) * 2


def nearest_code_scores(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Negative squared L2 distance of every feature vector to every code.

    ``z`` is B x C x h x w, the result B x (h*w) x K. The distance is computed
    exactly as the official quantizers do (on the flattened (B*h*w) x C matrix,
    |z|^2 + |e|^2 - 2 z.e), so ``argmax`` equals their ``argmin``. Always in
    fp32: in bf16 the expansion loses the small gaps between codes (64% token
    agreement with fp32 for VQFR v1, measured in bench/backends.py).
    """
    b, c = z.shape[:2]
    flat = z.permute(0, 2, 3, 1).reshape(-1, c).float()
    codebook = codebook.float()
    distance = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(codebook ** 2, dim=1)
                - 2 * torch.einsum("nc,kc->nk", flat, codebook))
    return (-distance).view(b, -1, codebook.shape[0])
