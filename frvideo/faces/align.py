"""5-point similarity alignment to the FFHQ template, and its inverse.

The template is the one facexlib/CodeFormer/GFPGAN use for 512x512 crops, so
official checkpoints see faces framed exactly as in their training.
"""
from __future__ import annotations

import cv2
import numpy as np

# right eye, left eye, nose, right mouth corner, left mouth corner (image order)
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.19360], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float64)


def template(size: int) -> np.ndarray:
    return FFHQ_TEMPLATE_512 * (size / 512.0)


def similarity_transforms(landmarks: np.ndarray, size: int = 512) -> np.ndarray:
    """Least-squares similarity (Umeyama) from N x 5 x 2 landmarks to the template.

    Returns N x 2 x 3 affine matrices (frame -> crop). Written out rather than
    cv2.estimateAffinePartial2D because that one is a robust (LMEDS/RANSAC)
    fit that can jump between frames for the same points, and is not batched.
    """
    src = np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
    dst = template(size)
    src_mean = src.mean(1, keepdims=True)
    dst_mean = dst.mean(0)
    s = src - src_mean
    d = dst - dst_mean
    # complex-number form of the 2-D similarity: z_dst = a * z_src + t, a = sum(conj(s) d) / sum(|s|^2)
    zs = s[..., 0] + 1j * s[..., 1]
    zd = d[:, 0] + 1j * d[:, 1]
    a = (np.conj(zs) * zd).sum(1) / np.maximum((np.abs(zs) ** 2).sum(1), 1e-12)
    A = np.zeros((len(src), 2, 3))
    A[:, 0, 0], A[:, 0, 1] = a.real, -a.imag
    A[:, 1, 0], A[:, 1, 1] = a.imag, a.real
    A[:, :, 2] = dst_mean - np.einsum("nij,nj->ni", A[:, :, :2], src_mean[:, 0])
    return A


def invert_affine(A: np.ndarray) -> np.ndarray:
    """Inverse of N x 2 x 3 (or 2 x 3) affine matrices."""
    A = np.asarray(A, np.float64)
    single = A.ndim == 2
    A = A.reshape(-1, 2, 3)
    M = A[:, :, :2]
    Minv = np.linalg.inv(M)
    out = np.concatenate([Minv, -np.einsum("nij,nj->ni", Minv, A[:, :, 2])[..., None]], axis=2)
    return out[0] if single else out


def warp_faces(image: np.ndarray, transforms: np.ndarray, size: int = 512) -> np.ndarray:
    """Crop N aligned faces (N x size x size x C) from one H x W x C image."""
    crops = [cv2.warpAffine(image, A, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
             for A in np.asarray(transforms).reshape(-1, 2, 3)]
    return np.stack(crops) if crops else np.zeros((0, size, size, image.shape[2]), image.dtype)
