"""Training losses for the codebook restorers (images in [-1, 1], B x 3 x H x W).

* pixel: :func:`l1_loss`;
* weight-free perceptual substitute: multi-scale SSIM (:func:`ms_ssim_loss`) and
  Laplacian-pyramid L1 (:func:`laplacian_l1_loss`), combined by
  :class:`PerceptualSubstitute` - no pretrained network needed;
* :class:`VGGPerceptualLoss`: the usual VGG16/19 feature L1, only when a VGG
  weight file is named (torchvision is not a dependency: the ``features`` layers
  are defined here with torchvision's indices, so a standard torchvision /
  BasicSR ``vgg19-dcbb9e9d.pth`` / ``vgg16-397923af.pth`` state dict loads);
* adversarial: :class:`PatchDiscriminator` (pix2pix PatchGAN) with
  :func:`d_loss` / :func:`g_loss` (``hinge`` or ``nsgan`` = non-saturating);
* codebook: :func:`codebook_loss`, :func:`commitment_loss`;
* stage 2: :func:`token_ce_loss` (B x N x K logits vs B x N tokens),
  :func:`feature_mse_loss`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WeightsError

__all__ = [
    "l1_loss", "ssim", "ms_ssim_loss", "laplacian_l1_loss", "PerceptualSubstitute", "VGGFeatures",
    "VGGPerceptualLoss", "PatchDiscriminator", "d_loss", "g_loss", "codebook_loss", "commitment_loss",
    "token_ce_loss", "feature_mse_loss",
]


def l1_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().mean()


# --------------------------------------------------------------------------- SSIM family

def _gauss_1d(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter per channel, reflect-padded ('same' size)."""
    c = x.shape[1]
    g = _gauss_1d(size, sigma, x.device, x.dtype)
    pad = size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if min(x.shape[-2:]) > pad else "replicate")
    x = F.conv2d(x, g.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, g.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, per_pixel: bool = False):
    """Gaussian-window SSIM of [0, 1] images ('same' reflect padding, so any size
    works). Returns the mean SSIM (and the contrast-structure term, for MS-SSIM)."""
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    window = min(window, 2 * (min(a.shape[-2:]) // 2) - 1) if min(a.shape[-2:]) < window else window
    mu_a, mu_b = _blur(a, window, sigma), _blur(b, window, sigma)
    aa, bb, ab = _blur(a * a, window, sigma), _blur(b * b, window, sigma), _blur(a * b, window, sigma)
    var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    if per_pixel:
        return lum * cs, cs
    return (lum * cs).mean(), cs.mean()


def ms_ssim_loss(a: torch.Tensor, b: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """1 - multi-scale SSIM of [-1, 1] images: the mean over ``scales`` dyadic
    scales of (1 - SSIM) (an additive MS-SSIM that stays well-behaved on small
    patches; scales stop where the image would be smaller than 8 px)."""
    a, b = (a.float() + 1) / 2, (b.float() + 1) / 2
    losses = []
    for s in range(scales):
        if s:
            if min(a.shape[-2:]) < 16:
                break
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        losses.append(1 - ssim(a, b)[0])
    return torch.stack(losses).mean()


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    bands = []
    for _ in range(levels - 1):
        if min(x.shape[-2:]) < 4:
            break
        low = _blur(x, 5, 1.0)
        down = F.avg_pool2d(low, 2)
        up = F.interpolate(down, size=x.shape[-2:], mode="bilinear", align_corners=False)
        bands.append(x - up)
        x = down
    bands.append(x)
    return bands


def laplacian_l1_loss(a: torch.Tensor, b: torch.Tensor, levels: int = 4) -> torch.Tensor:
    """L1 between Laplacian pyramids, coarser bands weighted 2^level (their pixels
    stand for 4^level input pixels; 2^level keeps fine detail important)."""
    pa, pb = laplacian_pyramid(a.float(), levels), laplacian_pyramid(b.float(), levels)
    return sum((2.0**i) * l1_loss(x, y) for i, (x, y) in enumerate(zip(pa, pb))) / len(pa)


class PerceptualSubstitute(nn.Module):
    """Weight-free stand-in for a perceptual loss: ``w_ssim * (1 - MS-SSIM) + w_lap * LapL1``."""

    def __init__(self, ms_ssim_weight: float = 1.0, laplacian_weight: float = 1.0, scales: int = 3,
                 levels: int = 4):
        super().__init__()
        self.ms_ssim_weight, self.laplacian_weight = ms_ssim_weight, laplacian_weight
        self.scales, self.levels = scales, levels

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        if self.ms_ssim_weight:
            out["ms_ssim"] = self.ms_ssim_weight * ms_ssim_loss(a, b, self.scales)
        if self.laplacian_weight:
            out["lap_l1"] = self.laplacian_weight * laplacian_l1_loss(a, b, self.levels)
        return out


# --------------------------------------------------------------------------- VGG

VGG_CFGS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}
# torchvision indices of the ReLU outputs, named as BasicSR's PerceptualLoss names them
VGG_LAYER_INDEX = {
    "vgg16": {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
              "relu3_3": 15, "relu4_1": 18, "relu4_2": 20, "relu4_3": 22, "relu5_1": 25, "relu5_2": 27,
              "relu5_3": 29},
    "vgg19": {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
              "relu3_3": 15, "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_3": 24, "relu4_4": 26,
              "relu5_1": 29, "relu5_2": 31, "relu5_3": 33, "relu5_4": 35},
}


class VGGFeatures(nn.Module):
    """torchvision's ``vgg16``/``vgg19`` ``features`` Sequential (same indices, so
    ``features.N.weight`` keys load), truncated after the deepest layer asked for."""

    def __init__(self, arch: str = "vgg19", layers: Sequence[str] = ("relu1_2", "relu2_2", "relu3_4", "relu4_4",
                                                                      "relu5_4")):
        super().__init__()
        if arch not in VGG_CFGS:
            raise ConfigError(f"unknown VGG arch {arch!r} (vgg16 or vgg19)")
        index = VGG_LAYER_INDEX[arch]
        bad = [n for n in layers if n not in index]
        if bad:
            raise ConfigError(f"unknown {arch} layer {bad[0]!r} (known: {', '.join(index)})")
        self.taps = {index[n]: n for n in layers}
        last = max(self.taps)
        mods: list[nn.Module] = []
        cin = 3
        for v in VGG_CFGS[arch]:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
        self.features = nn.Sequential(*mods[: last + 1])
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def load_weights(self, path: str | Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise WeightsError(f"VGG weight file not found: {path}") from None
        except Exception as exc:
            raise WeightsError(f"cannot read VGG weight file {path}: {type(exc).__name__}") from None
        from ..restore import reject_non_finite
        reject_non_finite(state, path)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        state = {k.replace("vgg_net.", "").replace("module.", ""): v for k, v in state.items()}
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        if missing:
            raise WeightsError(f"{path} is not a {len(own) // 2}-conv VGG features state dict "
                               f"(missing {missing[0]})")
        self.load_state_dict({k: state[k] for k in own}, strict=True)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x in [-1, 1] -> {layer name: feature}."""
        h = ((x + 1) / 2 - self.mean) / self.std
        out = {}
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.taps:
                out[self.taps[i]] = h
        return out


class VGGPerceptualLoss(nn.Module):
    """Sum over layers of ``weight * L1(vgg(a), vgg(b))``; the network is frozen."""

    def __init__(self, weights_path: str | Path, arch: str = "vgg19",
                 layer_weights: Optional[dict[str, float]] = None):
        super().__init__()
        layer_weights = layer_weights or {"relu1_2": 0.1, "relu2_2": 0.1, "relu3_4": 1.0, "relu4_4": 1.0,
                                          "relu5_4": 1.0}
        if arch == "vgg16":
            layer_weights = {k.replace("_4", "_3"): v for k, v in layer_weights.items()}
        self.layer_weights = dict(layer_weights)
        self.vgg = VGGFeatures(arch, list(self.layer_weights))
        self.vgg.load_weights(weights_path)
        self.vgg.requires_grad_(False).eval()

    def train(self, mode: bool = True):  # the VGG stays in eval mode
        super().train(mode)
        self.vgg.eval()
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self.vgg(a), self.vgg(b.detach())
        return sum(w * l1_loss(fa[k], fb[k]) for k, w in self.layer_weights.items())


class FaceFeatureLoss(nn.Module):
    """L1 between the backbone features of a pretrained *face* network: RetinaFace
    MobileNet-0.25's three stages (strides 8, 16, 32), each divided by the mean magnitude of the
    target's feature so the stages weigh alike. The one face network whose weights this project
    has offline (../shared/weights); trained to find faces, its features respond to eyes, brows,
    mouth and face outline, which is where a restoration loses its person. Frozen, eval mode."""

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from ..faces.retinaface import BGR_MEAN, RetinaFace, load_retinaface_weights
        net = RetinaFace("mobilenet0.25")
        load_retinaface_weights(net, Path(weights_path))
        self.body = net.body.requires_grad_(False).eval()
        # RetinaFace's input: BGR on 0-255 minus its per-channel means
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):  # the face network stays in eval mode (BatchNorm)
        super().train(mode)
        self.body.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(((x + 1) * 127.5).flip(1) - self.mean)  # RGB [-1, 1] -> BGR 0-255 - mean

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb = self._features(a), self._features(b.detach())
        return sum(l1_loss(x, y) / y.abs().mean().clamp_min(1e-6) for x, y in zip(fa, fb)) / len(fa)


# --------------------------------------------------------------------------- adversarial

class PatchDiscriminator(nn.Module):
    """pix2pix PatchGAN: 4x4 stride-2 convs, LeakyReLU 0.2, GroupNorm (batch-size
    independent), one logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                       nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    if kind in ("nsgan", "non-saturating", "vanilla"):
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    raise ConfigError(f"unknown GAN loss {kind!r} (hinge or nsgan)")


def g_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    if kind == "hinge":
        return -fake_logits.mean()
    if kind in ("nsgan", "non-saturating", "vanilla"):
        return F.softplus(-fake_logits).mean()
    raise ConfigError(f"unknown GAN loss {kind!r} (hinge or nsgan)")


# --------------------------------------------------------------------------- codebook / tokens

def codebook_loss(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Moves the chosen codes toward the (fixed) encoder outputs."""
    return F.mse_loss(z_q, z.detach())


def commitment_loss(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Keeps the encoder outputs near their (fixed) codes."""
    return F.mse_loss(z, z_q.detach())


def token_ce_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of B x N x K logits against B x N target token indices."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1).long())


def feature_mse_loss(feat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(feat, target.detach())
