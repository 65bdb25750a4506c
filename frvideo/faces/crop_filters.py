"""Gaussian blurs and Laplacian-pyramid steps on batches of face crops, run by OpenCV.

The blend (detail.py) and the temporal filter (temporal.py) blur and pyramid every
restored face a few dozen times. kornia's filters do it as torch convolutions, which on
a CPU cost several milliseconds per call at 256² from per-operator overhead alone (the
blend took ~90 ms a face, more than the ``lite`` model); OpenCV's separable SIMD filters
do the same arithmetic in a fraction of a millisecond. These wrappers keep kornia's exact
definitions (its Gaussian kernel, its 5-tap pyramid kernel, bilinear down- and up-sampling
with half-pixel centres, the same borders), so results agree with kornia to float32
rounding, and take and return B x C x H x W float32 tensors (shared with numpy, no copies
for contiguous input). No gradients: these run on restored outputs only.
"""
from __future__ import annotations

import math
from functools import lru_cache

import cv2
import numpy as np
import torch

BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE}


@lru_cache(maxsize=64)
def _gaussian_kernel(k: int, sigma: float) -> np.ndarray:
    return cv2.getGaussianKernel(k, sigma, cv2.CV_32F)


# the pyramid's 5-tap binomial kernel (kornia's _get_pyramid_gaussian_kernel is its outer product)
PYRAMID_KERNEL = np.array([1, 4, 6, 4, 1], np.float32).reshape(5, 1) / 16


def _planes(x: torch.Tensor) -> np.ndarray:
    """B x C x H x W tensor -> (B*C) x H x W float32 array sharing its memory where it can."""
    h, w = x.shape[-2:]
    return x.detach().to(torch.float32).contiguous().numpy().reshape(-1, h, w)


def _filter(x: torch.Tensor, kernel: np.ndarray, border: str) -> torch.Tensor:
    planes = _planes(x)
    out = np.empty_like(planes)
    mode = BORDERS[border]
    for src, dst in zip(planes, out):
        cv2.sepFilter2D(src, cv2.CV_32F, kernel, kernel, dst=dst, borderType=mode)
    return torch.from_numpy(out).reshape(x.shape)


def gaussian_blur(x: torch.Tensor, sigma: float, border: str = "reflect", truncate: float = 3.0) -> torch.Tensor:
    """Gaussian blur of std ``sigma`` pixels over a (2 * ceil(truncate * sigma) + 1)² window;
    sigma <= 0: x itself."""
    if sigma <= 0:
        return x
    k = 2 * int(math.ceil(truncate * sigma)) + 1
    return _filter(x, _gaussian_kernel(k, float(sigma)), border)


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    planes = _planes(x)
    out = np.empty((planes.shape[0], h, w), np.float32)
    for src, dst in zip(planes, out):
        cv2.resize(src, (w, h), dst=dst, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(out).reshape(*x.shape[:-2], h, w)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur with the pyramid kernel, then halve (bilinear: a 2 x 2 mean for even sizes)."""
    h, w = x.shape[-2:]
    return _resize(_filter(x, PYRAMID_KERNEL, "reflect"), h // 2, w // 2)


def pyr_up(x: torch.Tensor) -> torch.Tensor:
    """Double (bilinear), then blur with the pyramid kernel."""
    h, w = x.shape[-2:]
    return _filter(_resize(x, 2 * h, 2 * w), PYRAMID_KERNEL, "reflect")
