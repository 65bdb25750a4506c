"""The embedded detector: needs no download at all.

Two stages:

1. **Boxes** from OpenCV's Haar cascade ``haarcascade_frontalface_default.xml``
   (it ships with opencv-python(-headless) 4.x under ``cv2.data.haarcascades``;
   it is not copied into this repository). The frame is shrunk so its longer
   side is at most ``max_size`` and turned grey (and shrunk further for the
   cascade so that ``min_face`` maps to its 24-pixel window); ``detectMultiScale3`` runs with
   ``minNeighbors=0`` and ``outputRejectLevels=True`` so every raw window comes
   back with its final-stage weight; the windows are grouped as OpenCV groups
   them (``cv2.groupRectangles``, eps 0.2), a group needs more than
   ``min_neighbors`` windows, and among heavily overlapping groups only the best
   supported (most windows) is kept.
2. **Landmarks and a refined box** from a small CNN (``LandmarkNet``, ~200k
   parameters, trained by ``frvideo.train.landmarks`` on RetinaFace MobileNet's
   output for Haar boxes of the training clips and still images; the landmarks
   are the soft-argmax of heatmaps). Input: a 64 x 64 grey crop,
   centred on the Haar box, ``CONTEXT`` x its side, normalised to zero mean and
   unit std. Output (crop units, (p - centre) / crop side): the five landmarks,
   a RetinaFace-like box, and a face / not-face logit.

Landmark order as everywhere in frvideo: image-left eye, image-right eye, nose,
image-left mouth corner, image-right mouth corner.

Score in [0, 1]: ``p_face * (0.5 + 0.5 * p_cascade)``, where p_face is the
CNN's face probability and p_cascade the cascade's confidence, a logistic map
of the group's final-stage weight (``levelWeights``) and support (windows),
fitted on the training set and stored in the checkpoint's ``meta``. So a
strong cascade hit (p_cascade 1) needs p_face >= 0.5 to pass the default
threshold 0.5, a weak one (p_cascade 0.2) p_face >= 0.83. Faces below ``score_threshold``
are dropped.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import torch
import torch.nn as nn

from ..errors import WeightsError
from .detect import Detections, FaceDetector
from .retinaface import shrink_for_detection

CASCADE_FILE = "haarcascade_frontalface_default.xml"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "embedded_landmarks.pth"
INPUT = 64  # network input side (pixels)
CONTEXT = 1.5  # crop side / Haar box side
FLIP_ORDER = (1, 0, 2, 4, 3)  # landmark index after a horizontal mirror
N_OUT = 10 + 4 + 1  # landmarks, box, face logit


# ----------------------------------------------------------------------------
# the network

def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class LandmarkNet(nn.Module):
    """64 x 64 x 1 -> 15 numbers: 5 landmarks (x, y), box (x1, y1, x2, y2), face logit,
    all but the logit in crop units ((p - crop centre) / crop side).

    ``arch="heatmap"``: the landmarks are the soft-argmax of 5 heatmaps on a
    16 x 16 grid (features at 1/8 upsampled and merged with those at 1/4), so
    the landmark branch is translation-equivariant; box and logit come from a
    small fully connected head on the 1/16 features. ``arch="fc"``: all 15
    from the fully connected head."""

    def __init__(self, width: int = 16, arch: str = "heatmap", size: int = INPUT):
        super().__init__()
        w = width
        self.arch = arch
        self.down4 = nn.Sequential(*_block(1, w, 1), *_block(w, w, 2), *_block(w, 2 * w, 1), *_block(2 * w, 2 * w, 2))
        self.down8 = nn.Sequential(*_block(2 * w, 4 * w, 1), *_block(4 * w, 4 * w, 2), *_block(4 * w, 4 * w, 1))
        self.down16 = nn.Sequential(*_block(4 * w, 2 * w, 2))
        n_fc = 5 if arch == "heatmap" else N_OUT
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * (size // 16) ** 2, 64), nn.ReLU(inplace=True), nn.Linear(64, n_fc))
        if arch == "heatmap":
            self.up = nn.Sequential(*_block(6 * w, 2 * w, 1), *_block(2 * w, 2 * w, 1))
            self.heat = nn.Conv2d(2 * w, 5, 1)
            side = size // 4
            grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side - 0.5
            self.register_buffer("grid", grid, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f4 = self.down4(x)
        f8 = self.down8(f4)
        g = self.head(self.down16(f8))
        if self.arch != "heatmap":
            return g
        up = torch.nn.functional.interpolate(f8, size=f4.shape[-2:], mode="bilinear", align_corners=False)
        h = self.heat(self.up(torch.cat([f4, up], 1)))  # B x 5 x S x S
        b, _, sy, sx = h.shape
        p = torch.softmax(h.reshape(b, 5, -1), -1).reshape(b, 5, sy, sx)
        xs = (p.sum(2) * self.grid).sum(-1)
        ys = (p.sum(3) * self.grid).sum(-1)
        lm = torch.stack([xs, ys], -1).reshape(b, 10)
        return torch.cat([lm, g], 1)


def split_output(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B x 15) -> landmarks B x 5 x 2, boxes B x 4, face logits B (crop units)."""
    return out[:, :10].reshape(-1, 5, 2), out[:, 10:14], out[:, 14]


# ----------------------------------------------------------------------------
# Haar stage and crops, shared with the trainer so both see the same boxes

def load_cascade() -> cv2.CascadeClassifier:
    path = Path(cv2.data.haarcascades) / CASCADE_FILE
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise WeightsError(f"OpenCV's Haar cascade {path} is missing or unreadable "
                           f"(it ships with opencv-python 4.x)")
    return cascade


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(IoU, intersection / smaller area) of two x1 y1 x2 y2 boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    aa, ab = (a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1])
    return inter / max(aa + ab - inter, 1e-9), inter / max(min(aa, ab), 1e-9)


def haar_boxes(cascade: cv2.CascadeClassifier, grey: np.ndarray, scale_factor: float = 1.2,
               min_neighbors: int = 3, min_size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grouped cascade hits on a grey uint8 image: boxes N x 4 (x1 y1 x2 y2,
    float32, that image's pixels), support N (raw windows in the group) and
    weight N (the largest final-stage weight among them); best supported first."""
    empty = np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.float32)
    raw, _, weights = cascade.detectMultiScale3(grey, scaleFactor=scale_factor, minNeighbors=0,
                                                minSize=(min_size, min_size), outputRejectLevels=True)
    if len(raw) == 0:
        return empty
    raw = np.asarray(raw, np.int32).reshape(-1, 4)
    weights = np.asarray(weights, np.float32).ravel()
    groups, support = cv2.groupRectangles(raw.tolist(), max(0, int(min_neighbors)), 0.2)
    if len(groups) == 0:
        return empty
    groups = np.asarray(groups, np.float32).reshape(-1, 4)
    support = np.asarray(support, np.float32).ravel()
    boxes = np.concatenate([groups[:, :2], groups[:, :2] + groups[:, 2:]], axis=1)
    raw_boxes = np.concatenate([raw[:, :2], raw[:, :2] + raw[:, 2:]], axis=1).astype(np.float32)
    # a group's weight: the best window that belongs to it (same similarity as
    # groupRectangles: every side within eps * mean size)
    best = np.full(len(boxes), -np.inf, np.float32)
    for i, g in enumerate(groups):
        delta = 0.2 * 0.5 * (np.minimum(g[2], raw[:, 2]) + np.minimum(g[3], raw[:, 3]))
        near = np.all(np.abs(raw_boxes - boxes[i]) <= delta[:, None], axis=1)
        if near.any():
            best[i] = weights[near].max()
        else:
            best[i] = float(np.median(weights))
    order = np.lexsort((-best, -support))  # most windows first, then the higher weight
    keep: list[int] = []  # drop a group overlapping a better supported one (IoU >= 0.3 or 60% of the smaller)
    for i in order:
        overlaps = [_overlap(boxes[i], boxes[k]) for k in keep]
        if all(iou < 0.3 and inside < 0.6 for iou, inside in overlaps):
            keep.append(i)
    keep_a = np.asarray(keep, np.int64)
    return boxes[keep_a], support[keep_a], best[keep_a]


def cascade_boxes(cascade: cv2.CascadeClassifier, grey: np.ndarray, scale_factor: float = 1.2,
                  min_neighbors: int = 3, min_face: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``haar_boxes`` for faces of at least ``min_face`` pixels of ``grey``: the
    image is first shrunk so that size becomes the cascade's own window (24),
    which is faster than a larger ``minSize`` on the full image; boxes are in
    ``grey``'s pixels."""
    window = max(cascade.getOriginalWindowSize())
    s = min(1.0, window / max(min_face, 1))
    if s < 1.0:
        small = cv2.resize(grey, (max(1, round(grey.shape[1] * s)), max(1, round(grey.shape[0] * s))),
                           interpolation=cv2.INTER_AREA)
        sx, sy = grey.shape[1] / small.shape[1], grey.shape[0] / small.shape[0]
    else:
        small, sx, sy = grey, 1.0, 1.0
    boxes, support, weight = haar_boxes(cascade, small, scale_factor, min_neighbors, window)
    return boxes * np.array([sx, sy, sx, sy], np.float32), support, weight


def crop_params(box: np.ndarray, context: float = CONTEXT) -> tuple[float, float, float]:
    """Centre (x, y) and side of the square network crop for a Haar box."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = context * max(box[2] - box[0], box[3] - box[1])
    return float(cx), float(cy), float(side)


def crop_patch(grey: np.ndarray, cx: float, cy: float, side: float, out: int = INPUT) -> np.ndarray:
    """A square ``out`` x ``out`` uint8 crop of ``grey`` (side ``side`` pixels
    centred on (cx, cy)); outside the image: edge pixels repeated. Shrinks by
    area averaging first when the crop is much larger than ``out``."""
    scale = out / side
    src = grey
    if scale < 0.5:  # area-average to about twice the output size first, then bilinear
        pre = min(1.0, 2 * scale)
        x0 = max(0, int(math.floor(cx - side / 2 - 2)))
        y0 = max(0, int(math.floor(cy - side / 2 - 2)))
        x1 = min(grey.shape[1], int(math.ceil(cx + side / 2 + 2)))
        y1 = min(grey.shape[0], int(math.ceil(cy + side / 2 + 2)))
        if x1 > x0 and y1 > y0:
            roi = grey[y0:y1, x0:x1]
            nw, nh = max(1, round(roi.shape[1] * pre)), max(1, round(roi.shape[0] * pre))
            src = cv2.resize(roi, (nw, nh), interpolation=cv2.INTER_AREA)
            sx, sy = nw / roi.shape[1], nh / roi.shape[0]
            cx, cy, side = (cx - x0) * sx, (cy - y0) * sy, side * (sx + sy) / 2
            scale = out / side
    # continuous coordinates (pixel i spans [i, i + 1]): output pixel u's centre
    # u + 0.5 sits at cx + (u + 0.5 - out / 2) / scale in the source
    m = np.array([[scale, 0.0, out / 2 - cx * scale - 0.5 + 0.5 * scale],
                  [0.0, scale, out / 2 - cy * scale - 0.5 + 0.5 * scale]], np.float64)
    return cv2.warpAffine(src, m, (out, out), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def normalise_patches(patches: np.ndarray) -> torch.Tensor:
    """N x S x S uint8 -> N x 1 x S x S float, each patch to zero mean, unit std."""
    x = torch.from_numpy(np.ascontiguousarray(patches)).float().unsqueeze(1)
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True).clamp_min(4.0)
    return (x - mean) / std


def cascade_confidence(support: np.ndarray, weight: np.ndarray, coef) -> np.ndarray:
    """Logistic map of (log support, weight) to [0, 1] with ``coef`` = (a, b, c)."""
    a, b, c = (float(v) for v in coef)
    z = a * np.log(np.maximum(support, 1.0)) + b * weight + c
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


# ----------------------------------------------------------------------------

class EmbeddedDetector(FaceDetector):
    """Haar cascade + shipped landmark CNN; see the module docstring.

    ``weights``: the landmark CNN checkpoint (default: the shipped file).
    ``max_size``: the frame's longer side is shrunk to this first (0 / None:
    full resolution); the crops for the CNN come from that image.
    ``min_face``: smallest face, in pixels of that image; the cascade runs on
    it shrunk so that ``min_face`` becomes the cascade's 24-pixel window
    (faster than a larger minSize). ``scale_factor`` 1.2 and ``min_neighbors``
    3: on eval frames they found the same RetinaFace faces as 1.1 with fewer
    false hits and in about 60% of the time. ``flip_average``: run the CNN on
    the crop and its mirror and average (mirrored back), which lowered the
    landmark error on the eval clips by ~6%.
    """

    name = "embedded"

    def __init__(self, weights: Optional[Path] = None, device: str | torch.device = "cpu",
                 max_size: Optional[int] = 640, score_threshold: float = 0.5, min_face: int = 40,
                 scale_factor: float = 1.2, min_neighbors: int = 3, flip_average: bool = True):
        from ..restore import load_state_dict_strict, read_checkpoint

        path = Path(weights) if weights else SHIPPED_WEIGHTS
        state = read_checkpoint(path, ["params"])
        meta = {}
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {}) or {}
        except Exception:  # a bare state dict: defaults below
            meta = {}
        self.meta = meta
        net = LandmarkNet(int(meta.get("width", 16)), str(meta.get("arch", "heatmap")), int(meta.get("input", INPUT)))
        load_state_dict_strict(net, state, path)
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.context = float(meta.get("context", CONTEXT))
        self.input = int(meta.get("input", INPUT))
        self.cascade_coef = tuple(meta.get("cascade_coef", (1.0, 0.5, -2.0)))
        self.max_size = max_size or None
        self.score_threshold = float(score_threshold)
        self.min_face = int(min_face)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.flip_average = bool(flip_average)
        self.cascade = load_cascade()

    @torch.inference_mode()
    def _regress(self, patches: np.ndarray) -> np.ndarray:
        """N x 15 network outputs; with ``flip_average`` the mean of the crop's and
        its mirror's (mirrored back: x negated, left/right landmarks swapped)."""
        x = normalise_patches(patches).to(self.device)
        if not self.flip_average:
            return self.net(x).float().cpu().numpy()
        out = self.net(torch.cat([x, x.flip(-1)])).float().cpu().numpy()
        a, b = out[:len(x)], out[len(x):]
        lm = b[:, :10].reshape(-1, 5, 2)[:, list(FLIP_ORDER)] * np.array([-1, 1], np.float32)
        box = b[:, [12, 11, 10, 13]] * np.array([-1, 1, -1, 1], np.float32)
        b = np.concatenate([lm.reshape(-1, 10), box, b[:, 14:]], 1)
        return (a + b) / 2

    def detect(self, image_rgb: np.ndarray) -> Detections:
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 RGB image, got shape {image_rgb.shape}")
        if image_rgb.dtype != np.uint8:
            image_rgb = (image_rgb >> 8).astype(np.uint8) if image_rgb.dtype == np.uint16 else \
                np.clip(image_rgb, 0, 255).astype(np.uint8)
        small, sx, sy = shrink_for_detection(image_rgb, self.max_size)
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        boxes, support, weight = cascade_boxes(self.cascade, grey, self.scale_factor, self.min_neighbors,
                                               self.min_face)
        if len(boxes) == 0:
            return Detections.empty()
        crops = [crop_params(b, self.context) for b in boxes]
        patches = np.stack([crop_patch(grey, cx, cy, side, self.input) for cx, cy, side in crops])
        out = torch.from_numpy(self._regress(patches))
        lm, bx, logit = (t.numpy() for t in split_output(out))
        centre = np.array([[c[0], c[1]] for c in crops], np.float32)
        side = np.array([c[2] for c in crops], np.float32)
        landmarks = lm * side[:, None, None] + centre[:, None, :]
        rboxes = bx.reshape(-1, 2, 2) * side[:, None, None] + centre[:, None, :]
        rboxes = rboxes.reshape(-1, 4)
        p_face = 1.0 / (1.0 + np.exp(-logit))
        p_casc = cascade_confidence(support, weight, self.cascade_coef)
        scores = (p_face * (0.5 + 0.5 * p_casc)).astype(np.float32)
        keep = scores >= self.score_threshold
        if not keep.any():
            return Detections.empty()
        scale = np.array([sx, sy], np.float32)
        landmarks = (landmarks[keep] * scale).astype(np.float32)
        rboxes = (rboxes[keep].reshape(-1, 2, 2) * scale).reshape(-1, 4).astype(np.float32)
        scores = scores[keep]
        order = np.argsort(-scores, kind="stable")
        return Detections(rboxes[order], landmarks[order], scores[order])
