"""Label frames with the teacher (RetinaFace MobileNet-0.25) once, for
``frvideo.train.detector``: the training frames and stills, and every frame of
the eval clips (the reference of ``bench/embedded_detector.py``).

Each image is shrunk so its longer side is at most 640 (as every frvideo
detector sees it by default) and stored as JPEG (quality 95) bytes; the
teacher runs on that shrunk image with score threshold 0.3, so faces it is
unsure of (0.3-0.97) are kept with their score and the trainer can ignore them
rather than call them background.

    python -m frvideo.train.detector_labels --out /tmp/det/labels.npz
    python -m frvideo.train.detector_labels --eval --out /tmp/det/eval_labels.npz
"""
from __future__ import annotations

import argparse
import glob
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ..faces.retinaface import RetinaFaceDetector, shrink_for_detection

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
MAX_SIZE = 640
TEACHER_MIN_SCORE = 0.3
STILL_FOLDERS = ("whole", "old_photos", "gray_faces", "cropped_faces")
STILL_ANGLES = (-20.0, 0.0, 20.0)  # degrees: rolled heads
STILL_SIZES = (640, 360)  # longer side of each still's variants


def clip_frames(path: str, stride: int = 1):
    from ..io.frames import to_rgb, to_rgb8
    from ..io.reader import open_reader

    for k, frame in enumerate(open_reader(path)):
        if k % stride == 0:
            yield np.ascontiguousarray(to_rgb8(to_rgb(frame)))


def still_variants(bgr: np.ndarray, aligned: bool):
    """RGB variants of a still: rotations x sizes (an aligned 512 face crop is
    first padded by reflection so the face is not the whole image)."""
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    if aligned:
        pad = rgb.shape[0] * 3 // 10
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT101)
    h, w = rgb.shape[:2]
    for size in STILL_SIZES:
        s = min(1.0, size / max(h, w))
        for angle in STILL_ANGLES:
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, s)
            m[:, 2] += [w * s / 2 - w / 2, h * s / 2 - h / 2]
            out = (max(1, round(w * s)), max(1, round(h * s)))
            yield cv2.warpAffine(rgb, m, out, flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT101)


class LabelStore:
    """Images (JPEG bytes of the 640-shrunk image) and their teacher faces."""

    def __init__(self, teacher: Path):
        self.rf = RetinaFaceDetector(teacher, max_size=None, score_threshold=TEACHER_MIN_SCORE)
        self.jpeg: list[bytes] = []
        self.src: list[int] = []
        self.frame: list[int] = []
        self.boxes, self.lms, self.scores, self.owner = [], [], [], []

    def add(self, rgb: np.ndarray, src: int, frame: int) -> None:
        small, _, _ = shrink_for_detection(rgb, MAX_SIZE)
        det = self.rf.detect(small)
        i = len(self.jpeg)
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(small[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok
        self.jpeg.append(buf.tobytes())
        self.src.append(src)
        self.frame.append(frame)
        self.boxes.append(det.boxes.reshape(-1, 4))
        self.lms.append(det.landmarks.reshape(-1, 5, 2))
        self.scores.append(det.scores.reshape(-1))
        self.owner.append(np.full(len(det), i, np.int32))

    def save(self, path: Path, names: list[str]) -> None:
        lengths = np.array([len(b) for b in self.jpeg], np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, jpeg=np.frombuffer(b"".join(self.jpeg), np.uint8),
                 offsets=np.concatenate([[0], np.cumsum(lengths)]),
                 src=np.asarray(self.src, np.int32), frame=np.asarray(self.frame, np.int32),
                 boxes=np.concatenate(self.boxes).astype(np.float32),
                 landmarks=np.concatenate(self.lms).astype(np.float32),
                 scores=np.concatenate(self.scores).astype(np.float32),
                 owner=np.concatenate(self.owner).astype(np.int32), names=np.asarray(names))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Label frames with RetinaFace MobileNet-0.25 for the detector trainer")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--eval", action="store_true", help="every frame of the eval clips instead of the training data")
    ap.add_argument("--stride", type=int, default=2, help="training clips: every n-th frame")
    ap.add_argument("--teacher", type=Path, default=SHARED / "weights" / "detection_mobilenet0.25_Final.pth")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    store = LabelStore(args.teacher)
    names: list[str] = []
    kind = "eval" if args.eval else "train"
    for clip in sorted(glob.glob(str(SHARED / "media" / "videos" / kind / "*.mp4"))):
        t0, n = time.perf_counter(), 0
        for k, rgb in enumerate(clip_frames(clip, 1 if args.eval else args.stride)):
            store.add(rgb, len(names), k * (1 if args.eval else args.stride))
            n += 1
        print(f"{Path(clip).name}: {n} frames ({time.perf_counter() - t0:.0f} s)", flush=True)
        names.append(Path(clip).name)
    if not args.eval:
        for folder in STILL_FOLDERS:
            t0, n = time.perf_counter(), 0
            for path in sorted((SHARED / "media" / "images" / folder).rglob("*")):
                bgr = cv2.imread(str(path)) if path.suffix.lower() in (".png", ".jpg", ".jpeg") else None
                if bgr is None:
                    continue
                for rgb in still_variants(bgr, aligned=folder.endswith("faces")):
                    store.add(rgb, len(names), n)
                    n += 1
            print(f"{folder}/: {n} image variants ({time.perf_counter() - t0:.0f} s)", flush=True)
            names.append(folder + "/")
    store.save(args.out, names)
    print(f"wrote {args.out}: {len(store.jpeg)} images, {sum(len(s) for s in store.scores)} teacher faces", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
