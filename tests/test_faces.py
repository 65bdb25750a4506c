"""Tracker, alignment and blending on synthetic faces with known answers."""
import os
import signal
import subprocess
import sys
import time

import numpy as np

from clips import make_clip
from frvideo.faces.align import FFHQ_TEMPLATE_512, invert_affine, similarity_transforms, template, warp_faces
from frvideo.faces.blend import change_to_frame, face_roi, outline_mask
from frvideo.faces.detect import Detections
from frvideo.faces.tracker import FaceTracker, SceneCutDetector, select_faces


def dets(*centres, size=60.0):
    boxes, lms = [], []
    for cx, cy in centres:
        boxes.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
        lm = (FFHQ_TEMPLATE_512 - 256) / 512 * size + [cx, cy]
        lms.append(lm)
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(lms, np.float32).reshape(-1, 5, 2),
                      np.full(len(centres), 0.9, np.float32))


def test_tracker_keeps_ids_bridges_misses_and_resets():
    t = FaceTracker(max_missed=2)
    a = t.update(dets((100, 100), (300, 100)))
    assert [f.track_id for f in a] == [0, 1] and all(f.new_track for f in a)
    b = t.update(dets((305, 102), (104, 99)))  # order swapped, small motion
    assert [f.track_id for f in b] == [1, 0] and not any(f.new_track for f in b)
    t.update(dets((306, 103)))  # face 0 missed twice: bridged
    t.update(dets((307, 104)))
    c = t.update(dets((106, 100), (308, 104)))
    assert [f.track_id for f in c] == [0, 1]
    for _ in range(3):  # missed longer than max_missed: its track ends
        t.update(dets((308, 104)))
    assert t.update(dets((106, 100), (308, 104)))[0].track_id == 2
    t.reset()  # scene cut
    d = t.update(dets((308, 104)))
    assert d[0].track_id == 3 and d[0].new_track


def test_select_faces():
    boxes = np.array([[0, 0, 20, 20], [50, 50, 150, 150], [200, 0, 260, 60]], np.float32)
    faces = FaceTracker().update(Detections(boxes, np.zeros((3, 5, 2), np.float32), np.ones(3, np.float32)))
    assert [f.track_id for f in select_faces(faces, min_face=30)] == [1, 2]
    assert [f.track_id for f in select_faces(faces, only_largest=True)] == [1]
    assert [f.track_id for f in select_faces(faces, track_ids={0, 2})] == [0, 2]


def test_scene_cut_detector():
    cut = SceneCutDetector()
    a = np.full((64, 64, 3), 30, np.uint8)
    b = np.full((64, 64, 3), 220, np.uint8)
    assert [cut(a), cut(a + 2), cut(b), cut(b)] == [False, False, True, False]


def test_similarity_maps_landmarks_to_template():
    angle, scale, shift = 0.3, 0.37, np.array([40.0, -12.0])
    R = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    lm = (np.linalg.inv(R) @ (FFHQ_TEMPLATE_512 - shift).T).T  # a face the transform below maps exactly
    A = similarity_transforms(lm[None], 512)[0]
    mapped = lm @ A[:, :2].T + A[:, 2]
    assert np.abs(mapped - FFHQ_TEMPLATE_512).max() < 1e-6
    assert np.allclose(invert_affine(invert_affine(A)), A)
    assert np.allclose(similarity_transforms(template(256)[None], 256)[0], [[1, 0, 0], [0, 1, 0]], atol=1e-9)


def test_change_pasted_into_face_region_only():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (200, 300, 3), np.uint8)
    lm = dets((150, 100), size=80).landmarks
    A = similarity_transforms(lm, 128)
    mask = outline_mask(lm[0] @ A[0][:, :2].T + A[0][:, 2], 128)
    x0, y0, d = change_to_frame(np.full((128, 128, 3), 0.5, np.float32), mask, A[0], frame.shape[:2])
    x1, y1 = x0 + d.shape[1], y0 + d.shape[0]
    assert (x0, y0, x1, y1) == face_roi(A[0], 128, frame.shape[:2])
    assert d[100 - y0, 150 - x0].min() > 0.49  # the face centre gets the whole change
    # the outline mask keeps the change off the corners of the crop (hair, background) ...
    corner = A[0][:, :2] @ np.zeros(2) + A[0][:, 2]  # where frame (0, 0) lands: far outside
    assert mask.max() <= 1 and mask[0, 0] < 0.01 and mask[64, 64] > 0.99 and corner[0] < 0
    # ... and is soft: no step at its edge
    row = mask[64]
    assert np.abs(np.diff(row)).max() < 0.15


def test_outline_mask_follows_landmarks():
    t = template(256)
    m = outline_mask(t, 256)
    shifted = outline_mask(t + [30, 0], 256)  # a head turned: the landmarks move right
    cols = lambda a: (a > 0.5).any(0).nonzero()[0]  # noqa: E731
    assert cols(shifted)[0] > cols(m)[0] + 15 and cols(shifted)[-1] > cols(m)[-1] + 15
    assert m[150, 128] > 0.99  # between the eyes and mouth: inside
    assert m[8, 128] < 0.01 and m[128, 4] < 0.01  # top of the crop (hair) and its side: outside


def test_ctrl_c_leaves_no_output(tmp_path, home_with_detectors):
    src = make_clip(tmp_path / "long.mkv", n=400, size=(320, 240))
    dst = tmp_path / "out.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "frvideo", str(src), str(dst), "--model", "none",
                             "--detector", "yunet", "--preset", "veryslow", "-q"],
                            stderr=subprocess.PIPE, env=dict(os.environ),
                            # a shell starts background jobs with SIGINT ignored, and a child inherits that:
                            # give the run the default disposition, as a terminal's Ctrl-C would find it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "the run never started writing"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frvideo_home", "long.mkv"]
