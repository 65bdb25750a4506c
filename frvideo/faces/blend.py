"""Paste restored faces back: inverse affine into the face's region only,
with a soft feathered mask so there is no square seam.

Only the bounding box of the warped crop is touched, so every pixel outside it
stays exactly as decoded (the writer copies those pixels from the original
planes; see pipeline).
"""
from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from .align import invert_affine


@lru_cache(maxsize=4)
def crop_mask(size: int = 512, margin: float = 0.06, feather: float = 0.05) -> np.ndarray:
    """Soft mask in crop space: 1 inside, falling to 0 over the outer border.

    A rounded square rather than a face-parsing mask (no parsing weights are
    available offline); the FFHQ crop keeps the face well inside this area.
    """
    m = np.zeros((size, size), np.float32)
    inset = int(round(size * margin))
    radius = int(round(size * 0.12))
    cv2.rectangle(m, (inset + radius, inset), (size - 1 - inset - radius, size - 1 - inset), 1.0, -1)
    cv2.rectangle(m, (inset, inset + radius), (size - 1 - inset, size - 1 - inset - radius), 1.0, -1)
    for cx in (inset + radius, size - 1 - inset - radius):
        for cy in (inset + radius, size - 1 - inset - radius):
            cv2.circle(m, (cx, cy), radius, 1.0, -1)
    sigma = size * feather / 2
    k = int(sigma * 3) * 2 + 1
    return cv2.GaussianBlur(m, (k, k), sigma)


def face_roi(transform: np.ndarray, size: int, frame_hw: tuple[int, int], pad: int = 2,
             inv: np.ndarray | None = None) -> tuple[int, int, int, int]:
    """Frame-space box (x0, y0, x1, y1) covered by the crop of ``transform``, clipped to the frame."""
    if inv is None:
        inv = invert_affine(transform)
    corners = np.array([[0, 0, 1], [size, 0, 1], [0, size, 1], [size, size, 1]], np.float64)
    pts = corners @ inv.T
    h, w = frame_hw
    x0 = max(int(np.floor(pts[:, 0].min())) - pad, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - pad, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + pad, w)
    y1 = min(int(np.ceil(pts[:, 1].max())) + pad, h)
    return x0, y0, x1, y1


def paste_face(frame: np.ndarray, face: np.ndarray, transform: np.ndarray, mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Blend ``face`` (S x S x C, same dtype as frame) into ``frame`` in place.

    Returns the ROI that was touched, or None if the face lies outside the frame.
    """
    size = face.shape[0]
    inv = invert_affine(transform)
    x0, y0, x1, y1 = face_roi(transform, size, frame.shape[:2], inv=inv)
    if x1 <= x0 or y1 <= y0:
        return None
    inv[:, 2] -= (x0, y0)  # warp straight into the ROI, not the whole frame
    roi_size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(face, inv, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    alpha = cv2.warpAffine(mask, inv, roi_size, flags=cv2.INTER_LINEAR, borderValue=0.0)[..., None]
    region = frame[y0:y1, x0:x1]
    blended = region.astype(np.float32) * (1.0 - alpha) + warped.astype(np.float32) * alpha
    if np.issubdtype(frame.dtype, np.integer):
        info = np.iinfo(frame.dtype)
        blended = np.clip(np.rint(blended), info.min, info.max)
    region[...] = blended.astype(frame.dtype)
    return x0, y0, x1, y1
