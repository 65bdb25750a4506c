"""The embedded detector: Haar cascade (from OpenCV) + the shipped landmark CNN.

The checkpoint tests run anywhere; the accuracy tests use a frame of a held-out
eval clip from ../shared and RetinaFace MobileNet as the reference, and skip
without them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from frvideo.faces.embedded import FLIP_ORDER, SHIPPED_WEIGHTS, EmbeddedDetector, LandmarkNet
from frvideo.models import load_model_config
from frvideo.restore import load_state_dict_strict, read_checkpoint
from frvideo.weights import REPO_ROOT, find_local, sha256_file

from conftest import MEDIA, WEIGHTS, need

EVAL_CLIP = MEDIA / "videos" / "eval" / "retalk_2.mp4"
MOBILE = WEIGHTS / "detection_mobilenet0.25_Final.pth"


def test_shipped_checkpoint_loads_strict_and_matches_card():
    card = load_model_config("embedded")
    assert card.kind == "detector" and card.backend == "embedded"
    assert card.weights.url is None and card.weights.param_keys == ["params"]
    path = REPO_ROOT / card.weights.shipped
    assert path == SHIPPED_WEIGHTS and path.is_file()
    assert path.stat().st_size < 1_000_000
    assert sha256_file(path) == card.weights.sha256
    assert find_local(card) is not None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    meta = ckpt["meta"]
    net = LandmarkNet(meta["width"], meta["arch"])
    load_state_dict_strict(net, read_checkpoint(path, card.weights.param_keys), path)
    assert sum(p.numel() for p in net.parameters()) < 300_000
    EmbeddedDetector()  # default weights: the shipped file


@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(1)
    return EmbeddedDetector()


@pytest.fixture(scope="module")
def frame():
    from frvideo.io.frames import to_rgb, to_rgb8
    from frvideo.io.reader import open_reader

    for k, f in enumerate(open_reader(str(need(EVAL_CLIP, "eval clip")))):
        if k == 30:
            return np.ascontiguousarray(to_rgb8(to_rgb(f)))


def test_blank_frame_has_no_face(detector):
    assert len(detector.detect(np.full((360, 640, 3), 128, np.uint8))) == 0
    noise = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    assert len(detector.detect(noise)) == 0


def test_finds_face_and_landmarks_near_retinaface(detector, frame):
    from frvideo.faces.retinaface import RetinaFaceDetector

    ref = RetinaFaceDetector(need(MOBILE, "RetinaFace MobileNet weights")).detect(frame)
    assert len(ref) == 1
    det = detector.detect(frame)
    assert len(det) == 1 and 0.5 <= det.scores[0] <= 1.0
    face = ref.boxes[0, 2] - ref.boxes[0, 0]
    err = np.linalg.norm(det.landmarks[0] - ref.landmarks[0], axis=1)
    assert err.max() < 0.10 * face, (err / face).round(3)
    # the refined box resembles RetinaFace's
    b, r = det.boxes[0], ref.boxes[0]
    inter = max(0, min(b[2], r[2]) - max(b[0], r[0])) * max(0, min(b[3], r[3]) - max(b[1], r[1]))
    assert inter / ((b[2] - b[0]) * (b[3] - b[1]) + (r[2] - r[0]) * (r[3] - r[1]) - inter) > 0.7


def test_mirrored_frame_gives_mirrored_landmarks(detector, frame):
    det = detector.detect(frame)
    mirrored = detector.detect(np.ascontiguousarray(frame[:, ::-1]))
    assert len(det) == len(mirrored) == 1
    lm, lm_m = det.landmarks[0], mirrored.landmarks[0]
    for points in (lm, lm_m):  # image-left before image-right, eyes above mouth
        assert points[0, 0] < points[1, 0] and points[3, 0] < points[4, 0]
        assert max(points[0, 1], points[1, 1]) < points[2, 1] < min(points[3, 1], points[4, 1])
    back = lm_m[list(FLIP_ORDER)].copy()
    back[:, 0] = frame.shape[1] - back[:, 0]
    face = det.boxes[0, 2] - det.boxes[0, 0]
    assert np.linalg.norm(back - lm, axis=1).max() < 0.05 * face
