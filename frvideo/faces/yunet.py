"""YuNet (OpenCV's ``cv2.FaceDetectorYN``, opencv_zoo 2023mar ONNX) as a ``FaceDetector``.

YuNet rows are ``x, y, w, h, 5 x (x, y) landmarks, score``; its landmark order
(right eye, left eye, nose tip, right / left mouth corner, the subject's right
being the viewer's left) is already frvideo's order, so only the box is
converted to x1 y1 x2 y2. The network takes BGR uint8.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from ..errors import WeightsError
from .detect import Detections, FaceDetector
from .retinaface import shrink_for_detection


class YuNetDetector(FaceDetector):
    """``score_threshold`` 0.8 (as RetinaFace's): on the test images real faces
    score >= 0.90 and the false positives seen (tiny background blobs) <= 0.69;
    OpenCV's own default 0.9 would sit right at the real faces' scores.
    ``nms_threshold`` 0.3 and ``top_k`` 5000 are opencv_zoo's demo values."""

    name = "yunet"

    def __init__(self, weights: Path, score_threshold: float = 0.8, nms_threshold: float = 0.3,
                 max_size: Optional[int] = 640, top_k: int = 5000):
        weights = Path(weights)
        if not weights.is_file():
            raise WeightsError(f"YuNet weight file not found: {weights} (check --detector-weights)")
        self.max_size = max_size
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        try:
            self._net = cv2.FaceDetectorYN.create(str(weights), "", (320, 320), self.score_threshold,
                                                  self.nms_threshold, int(top_k))
        except cv2.error as exc:
            # "OpenCV(4.x) file.cpp:58: error: (-2:...) <message> in function 'f'" -> <message>
            found = re.search(r"error: \([^)]*\) (.*?)(?: in function .*)?$", " ".join(str(exc).split()))
            raise WeightsError(f"cannot load YuNet model {weights}: {found.group(1) if found else 'cv2.error'}") from None
        self._size: Optional[tuple[int, int]] = None

    def detect(self, image_rgb: np.ndarray) -> Detections:
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 RGB image, got shape {image_rgb.shape}")
        small, sx, sy = shrink_for_detection(image_rgb, self.max_size)
        h, w = small.shape[:2]
        if self._size != (w, h):
            self._net.setInputSize((w, h))
            self._size = (w, h)
        bgr = np.ascontiguousarray(small[..., ::-1])
        _, rows = self._net.detect(bgr)
        if rows is None or len(rows) == 0:
            return Detections.empty()
        rows = rows.astype(np.float32)
        rows = rows[np.isfinite(rows).all(axis=1)]  # tiny frames (1x1) give NaN rows
        if len(rows) == 0:
            return Detections.empty()
        boxes = np.stack([rows[:, 0], rows[:, 1], rows[:, 0] + rows[:, 2], rows[:, 1] + rows[:, 3]], axis=1)
        boxes *= np.array([sx, sy, sx, sy], np.float32)
        landmarks = rows[:, 4:14].reshape(-1, 5, 2) * np.array([sx, sy], np.float32)
        scores = rows[:, 14].copy()
        order = np.argsort(-scores, kind="stable")
        return Detections(boxes[order], landmarks[order], scores[order])
