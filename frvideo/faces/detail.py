"""What of a restoration reaches the video: a per-face strength, the input's colours,
and the input's own detail wherever the model has less of it.

A restorer is trusted only as far as it helps. For each face, in the aligned crop:

1. **Colour** from the input. The lowest band of the face (the residual of a Laplacian
   pyramid at S/16: skin tone, shading, lighting) is the input's; blur, noise and
   compression leave it intact, and a model trained on other faces can only get it
   wrong (a cast, a darker band at the paste edge).
2. **Detail** band by band (the pyramid's levels at S, S/2, S/4, S/8). Where the
   restoration has less signal energy in a band than the input has (signal = local
   energy minus the input's estimated noise in that band), the input's band is kept in
   proportion: a model that smooths lashes, catchlights or glasses rims away gives
   them back; where the input band is mostly noise or compression the restoration's
   (cleaner) band stays. This is the "never less real detail than the input" rule.
3. **Consistency** with the input, region by region. Blurred by the amount that best
   maps it onto the input (searched per face), a faithful restoration looks like the
   input up to its noise; where it does not (a changed eye shape, an invented blotch,
   lost teeth or glasses rims), the change is let through only in proportion
   ``exp(-(r / t)^2)``, r the local disagreement (the blurred signed difference, so
   noise and compression error average out and a structure does not), t = ``consistency_threshold``
   widened by the input's noise. This is what keeps a weak or wrong model from moving
   a face away from its person: only what agrees with the evidence reaches the video.
4. **Strength** per face: how degraded the input looks (sharpness, the fine-band
   energy the face has after noise is taken off, against the mid band; noise level).
   A clean face is left (almost) as it was, a blurred or noisy one gets the restoration.
   ``strength`` in [0, 1] fixes it instead (``--strength``).

The output is the *change* to the input crop, which the pipeline warps back and adds
to the decoded frame (``blend.py``), so what the model did not change stays bit-exact.
The blurs and pyramids are OpenCV's (crop_filters.py: kornia's definitions, a fraction of
the time); the band rule is written here because it is specific to restored-vs-input crops.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .crop_filters import gaussian_blur, pyr_down, pyr_up

LEVELS = 4  # detail levels of the Laplacian pyramid; the residual below them is the colour band
LUMA = (0.299, 0.587, 0.114)


@dataclass
class Degradation:
    """How degraded each face of a batch looks (B-vectors)."""

    noise: torch.Tensor  # estimated noise std of the input, 0-255 grey levels
    sharpness: torch.Tensor  # fine-band signal / mid-band signal (rms ratio); ~0 when blurred


@dataclass
class BlendSettings:
    strength: Optional[float] = None  # None = auto (from the input's degradation)
    # auto strength of a fully degraded face: the model card's ``max_strength``. Past it a model
    # moves faces away from their person faster than it brings them closer to the clean face
    # (bench/quality.py: identity distance), so auto never goes there
    max_strength: float = 1.0
    keep_detail: bool = True
    match_colour: bool = True
    # auto strength: full strength at or below sharp_lo, none at or above sharp_hi ...
    sharp_lo: float = 0.25
    sharp_hi: float = 0.45
    # ... or from the noise level (grey levels), whichever asks for more
    noise_lo: float = 2.5
    noise_hi: float = 6.0
    # consistency: local disagreement (0-1 units, blurred signed error) of the matched restoration at
    # which its change is let through at 1/e; widened by noise_allowance x the input's noise
    consistency: bool = True
    consistency_threshold: float = 0.01
    noise_allowance: float = 0.3


# blurs (pixels at half the crop size) tried when matching a restoration to its input
MATCH_SIGMAS = (0.0, 0.5, 1.0, 1.5, 2.25, 3.0, 4.5, 6.0)


def _window(x: torch.Tensor) -> torch.Tensor:
    """Local mean over a 5 x 5 Gaussian window (the pyramid's own kernel) at the band's scale."""
    return gaussian_blur(x, 1.0, "reflect")


def _pyramid(x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Laplacian pyramid: LEVELS detail bands (full size first) and the low-pass residual."""
    bands = []
    for _ in range(LEVELS):
        low = pyr_down(x)
        bands.append(x - pyr_up(low)[..., :x.shape[-2], :x.shape[-1]])
        x = low
    return bands, x


def _collapse(bands: list[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
    x = residual
    for b in reversed(bands):
        x = pyr_up(x)[..., :b.shape[-2], :b.shape[-1]] + b
    return x


@lru_cache(maxsize=1)
def _noise_gains() -> tuple[float, ...]:
    """rms of each pyramid band of unit white noise (to turn one noise estimate into a noise
    power per band; the same at every crop size, the pyramid being the same filters)."""
    g = torch.Generator().manual_seed(0)
    bands, _ = _pyramid(torch.randn(1, 1, 512, 512, generator=g))
    return tuple(float(b[..., 8:-8, 8:-8].std()) for b in bands)


def _downsized(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F
    return mask if mask.shape[-1] == like.shape[-1] else F.adaptive_avg_pool2d(mask, like.shape[-2:])


class FaceBlend:
    def __init__(self, size: int, settings: Optional[BlendSettings] = None):
        self.size = size
        self.scale = size / 256
        self.s = settings or BlendSettings()

    def degradation(self, x: torch.Tensor, mask: torch.Tensor) -> Degradation:
        """x: B x 3 x S x S in [0, 1]; mask: B x 1 x S x S weights of the face region."""
        luma = sum(w * x[:, i:i + 1] for i, w in enumerate(LUMA))
        bands, _ = _pyramid(luma)
        gains = _noise_gains()
        # noise: the finest band's rms in the flattest 8 x 8 blocks of the face (the 20th
        # percentile of block rms): lashes, teeth and hair are signal, flat skin shows the noise
        import torch.nn.functional as F
        block = max(4, self.size // 32)
        rms = F.avg_pool2d(bands[0] ** 2, block).sqrt().flatten(1)
        inside = F.avg_pool2d(mask, block).flatten(1) > 0.9
        low = torch.stack([r[m].quantile(0.2) if m.sum() >= 4 else r.quantile(0.2) for r, m in zip(rms, inside)])
        sigma = low / gains[0]
        power = []
        for b in bands:
            w = _downsized(mask, b)
            power.append((b * b * w).sum((1, 2, 3)) / w.sum((1, 2, 3)).clamp_min(1e-6))
        signal = [torch.clamp(p - (sigma * g) ** 2, min=0) for p, g in zip(power, gains)]
        sharp = torch.sqrt(signal[0] / signal[2].clamp_min(1e-10))
        return Degradation(noise=sigma * 255.0, sharpness=sharp)

    def strength(self, deg: Degradation) -> torch.Tensor:
        s = self.s
        if s.strength is not None:
            return torch.full_like(deg.noise, float(s.strength))
        blur = ((s.sharp_hi - deg.sharpness) / (s.sharp_hi - s.sharp_lo)).clamp(0, 1)
        noise = ((deg.noise - s.noise_lo) / (s.noise_hi - s.noise_lo)).clamp(0, 1)
        return torch.maximum(blur, noise) * s.max_strength

    def __call__(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        """x: input crops, y: restored crops (B x 3 x S x S in [-1, 1]); mask: B x 1 x S x S.

        Returns (change, strengths, degradation): the change to add to the input crop
        (B x 3 x S x S, [0, 1] units, not yet masked) and the strength used per face.
        """
        x = (x.float() + 1) * 0.5
        y = (y.float() + 1) * 0.5
        deg = self.degradation(x, mask)
        strength = self.strength(deg)
        xb, x_rest = _pyramid(x)
        yb, y_rest = _pyramid(y)
        rest = x_rest if self.s.match_colour else y_rest
        # judged before detail keeping: does what the model made agree with the evidence?
        agree = self.agreement(x, _collapse(yb, rest), mask, deg.noise / 255.0) if self.s.consistency else 1.0
        if self.s.keep_detail:
            yb = self._keep_detail(xb, yb, deg.noise / 255.0)
        out = _collapse(yb, rest)
        change = (out - x) * strength[:, None, None, None] * agree
        unchanged = (x == y).flatten(1).all(1)  # a face the restorer left alone stays as it was
        change[unchanged] = 0
        return change, strength, deg

    def agreement(self, x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """B x 1 x S x S weight in (0, 1]: how far ``out``, blurred to look like the input, agrees
        with the input ``x`` (both [0, 1]), region by region. Worked out at half size: the
        disagreement that matters is coarse."""
        import torch.nn.functional as F

        lx, lo, m = pyr_down(x), pyr_down(out), F.avg_pool2d(mask, 2)
        blurred = [gaussian_blur(lo, s) for s in MATCH_SIGMAS]
        errs = torch.stack([((b - lx) ** 2 * m).sum((1, 2, 3)) for b in blurred], 1)
        best = errs.argmin(1).tolist()
        matched = torch.cat([blurred[b][i:i + 1] for i, b in enumerate(best)])
        # the disagreement is blurred *signed*: noise and compression error (what even a perfect
        # restoration disagrees with the input by) average out over the window, an invented or
        # moved structure does not
        r = gaussian_blur(matched - lx, 1.5).abs().mean(1, keepdim=True)
        t = torch.sqrt(self.s.consistency_threshold ** 2 + (self.s.noise_allowance * noise) ** 2)
        w = torch.exp(-(r / t[:, None, None, None]) ** 2)
        return F.interpolate(w, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def _keep_detail(self, xb: list[torch.Tensor], yb: list[torch.Tensor], noise: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for bx, by, g in zip(xb, yb, _noise_gains()):
            noise_power = ((noise * g) ** 2)[:, None, None, None]
            sx = (_window((bx * bx).mean(1, keepdim=True)) - noise_power).clamp_min(0)
            ey = _window((by * by).mean(1, keepdim=True))
            # the share of the input's band to keep: what the restoration lacks of its signal
            keep = ((sx - ey) / (sx + noise_power + 1e-8)).clamp(0, 1)
            # the input band, Wiener-shrunk so its noise does not come back with it
            bx_clean = bx * (sx / (sx + noise_power + 1e-8))
            out.append(by + keep * (bx_clean - by))
        return out
