"""Links per-frame detections into tracks; detects scene cuts.

A track keeps its id across short detector misses (``max_missed`` frames) and
ends at a scene cut, so per-track state (smoothed landmarks, codebook token
history, reference keyframe) never leaks from one shot or person to another.
A face found again after a miss reports how many frames it was missed
(``TrackedFace.gap``), so the pipeline can fill those frames in (bridging).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from .detect import Detections


@dataclass
class Track:
    id: int
    box: np.ndarray
    landmarks: np.ndarray
    score: float
    missed: int = 0
    hits: int = 1
    last_frame: int = 0  # frame number of the last detection
    velocity: Optional[np.ndarray] = None  # landmark motion per frame at the last detection


@dataclass
class TrackedFace:
    """One face of one frame, with the id of the track it belongs to."""

    track_id: int
    box: np.ndarray  # x1 y1 x2 y2
    landmarks: np.ndarray  # 5 x 2
    score: float
    new_track: bool = False  # first frame of this track (per-track state must reset)
    gap: int = 0  # frames this track was missed just before this detection
    bridged: bool = False  # not detected here: filled in between detections (or predicted)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between M x 4 and N x 4 boxes."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


class FaceTracker:
    def __init__(self, iou_threshold: float = 0.3, landmark_threshold: float = 0.35, max_missed: int = 5):
        self.iou_threshold = iou_threshold
        self.landmark_threshold = landmark_threshold  # mean landmark distance / face size
        self.max_missed = max_missed
        self.tracks: list[Track] = []
        self.next_id = 0
        self.frame = -1  # number of the frame of the last update

    def reset(self) -> None:
        """Scene cut: every track ends; ids keep counting up so they stay unique."""
        self.tracks = []

    def missing(self) -> list[Track]:
        """Tracks alive but not detected in the last update (candidates for a predicted face)."""
        return [t for t in self.tracks if t.last_frame != self.frame]

    def update(self, dets: Detections) -> list[TrackedFace]:
        self.frame += 1
        n = len(dets)
        matched_det: dict[int, Track] = {}
        if self.tracks and n:
            boxes = np.stack([t.box for t in self.tracks])
            iou = box_iou(boxes, dets.boxes)
            lm_prev = np.stack([t.landmarks for t in self.tracks])
            size = np.maximum(boxes[:, 2:] - boxes[:, :2], 1).mean(1)
            lm_dist = np.linalg.norm(lm_prev[:, None] - dets.landmarks[None], axis=3).mean(2) / size[:, None]
            ok = (iou >= self.iou_threshold) | (lm_dist <= self.landmark_threshold)
            cost = (1.0 - iou) + lm_dist
            # greedy by cost: few faces per frame, and it is stable and explainable
            for ti, di in sorted(zip(*np.nonzero(ok)), key=lambda p: cost[p]):
                track = self.tracks[ti]
                if di in matched_det or any(t is track for t in matched_det.values()):
                    continue
                matched_det[di] = track
        out = []
        for di in range(n):
            track = matched_det.get(di)
            new = track is None
            gap = 0
            if new:
                track = Track(self.next_id, dets.boxes[di], dets.landmarks[di], float(dets.scores[di]),
                              last_frame=self.frame)
                self.next_id += 1
                self.tracks.append(track)
            else:
                gap = self.frame - track.last_frame - 1
                track.velocity = (dets.landmarks[di] - track.landmarks) / (gap + 1)
                track.box, track.landmarks, track.score = dets.boxes[di], dets.landmarks[di], float(dets.scores[di])
                track.missed = 0
                track.hits += 1
                track.last_frame = self.frame
            out.append(TrackedFace(track.id, dets.boxes[di], dets.landmarks[di], float(dets.scores[di]), new, gap))
        updated = {f.track_id for f in out}
        for t in self.tracks:
            if t.id not in updated:
                t.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        return out


class SceneCutDetector:
    """Flags a hard cut when consecutive frames differ a lot in a tiny grey thumbnail.

    Cheap enough to run on every frame; a cut resets tracks and temporal state.
    """

    def __init__(self, threshold: float = 40.0, size: int = 32):
        self.threshold = threshold
        self.size = size
        self.prev: np.ndarray | None = None

    def __call__(self, image_rgb: np.ndarray) -> bool:
        thumb = cv2.resize(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY), (self.size, self.size),
                           interpolation=cv2.INTER_AREA).astype(np.float32)
        cut = self.prev is not None and float(np.abs(thumb - self.prev).mean()) > self.threshold
        self.prev = thumb
        return cut


def select_faces(faces: list[TrackedFace], min_face: int = 0, only_largest: bool = False,
                 track_ids: set[int] | None = None) -> list[TrackedFace]:
    """Apply the user's choice of which faces to restore."""
    keep = [f for f in faces if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= min_face]
    if track_ids is not None:
        keep = [f for f in keep if f.track_id in track_ids]
    if only_largest and keep:
        keep = [max(keep, key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))]
    return keep
