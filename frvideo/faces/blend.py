"""Paste a face's change back: a crop-space change warped into the face's region only,
under a soft mask that follows the face outline.

The pipeline does not paste the restored crop itself: it pastes the *change* the
restorer made (restored - input crop, after the blend of ``detail.py``), warped
back with the inverse affine and added to the decoded frame. So

* a pixel the restorer did not change is not re-sampled at all (an identity
  restorer gives back the decoded frame bit for bit), and
* the input's own detail finer than the model's crop resolution (a 400-px face
  restored at 256 px) stays in the frame: the change carries only what the
  model did at its scale.

Only the bounding box of the warped crop is touched; every other pixel stays
exactly as decoded.
"""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np

from .align import invert_affine, template


def outline_mask(landmarks: np.ndarray, size: int, feather: float = 0.06) -> np.ndarray:
    """Soft mask (size x size float32, 1 on the face, 0 outside) in crop space, following the
    face outline estimated from the 5 landmarks (in crop pixels).

    Five points give no jaw line, so the outline is an ellipse fitted to where the FFHQ
    template puts forehead, cheeks and chin relative to eyes and mouth: centred a little
    below the eyes, 1.37 eye-to-mouth distances high and 1.35 eye distances wide each side,
    turned with the eye line and shifted with the landmarks (a turned head moves them).
    No face-parsing model is available offline; this keeps the change off hair, background
    and shoulders, where a face restorer has nothing to add.
    """
    p = np.asarray(landmarks, np.float64).reshape(5, 2)
    eyes, mouth = p[:2].mean(0), p[3:].mean(0)
    down = mouth - eyes
    em = max(float(np.linalg.norm(down)), 1e-3)
    ee = max(float(np.linalg.norm(p[1] - p[0])), 1e-3)
    centre = eyes + 0.375 * down
    centre[0] = 0.5 * centre[0] + 0.5 * p[:, 0].mean()  # follow the nose and mouth on a turned head
    angle = float(np.degrees(np.arctan2(p[1, 1] - p[0, 1], p[1, 0] - p[0, 0])))
    axes = (1.35 * ee, 1.37 * em)
    m = np.zeros((size, size), np.float32)
    shift = 4  # sub-pixel precision for cv2.ellipse
    cv2.ellipse(m, (int(round(centre[0] * (1 << shift))), int(round(centre[1] * (1 << shift)))),
                (int(round(axes[0] * (1 << shift))), int(round(axes[1] * (1 << shift)))),
                angle, 0, 360, 1.0, -1, cv2.LINE_AA, shift)
    sigma = size * feather / 2
    k = int(sigma * 3) * 2 + 1
    return cv2.GaussianBlur(m, (k, k), sigma)


def template_mask(size: int) -> np.ndarray:
    """The outline mask of the template face itself (a face aligned exactly)."""
    return outline_mask(template(size), size)


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


def change_to_frame(change: np.ndarray, mask: np.ndarray, transform: np.ndarray,
                    frame_hw: tuple[int, int]) -> Optional[tuple[int, int, np.ndarray]]:
    """A crop-space change (S x S x 3 float32) under ``mask`` (S x S), warped into the frame.

    Returns (x0, y0, change in the face's frame box) for
    :func:`frvideo.io.frames.add_rgb_deltas`, or None if nothing of it lands in the frame.
    """
    size = change.shape[0]
    inv = invert_affine(transform)
    x0, y0, x1, y1 = face_roi(transform, size, frame_hw, inv=inv)
    if x1 <= x0 or y1 <= y0:
        return None
    inv[:, 2] -= (x0, y0)  # warp straight into the box, not the whole frame
    masked = change * mask[..., None]
    warped = cv2.warpAffine(masked, inv, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    return x0, y0, warped.reshape(y1 - y0, x1 - x0, -1)
