"""The embedded detector (Haar cascade + shipped landmark CNN) against RetinaFace MobileNet-0.25.

On every ``--stride``-th frame of every clip in ../shared/media/videos/eval/
(held out from the landmark CNN's training), both detectors run at their
default settings (max_size 640). A RetinaFace face counts as **found** when an
embedded box has IoU >= ``--iou`` (0.5) with it (greedy one-to-one matching,
highest IoU first). Reported per clip and overall:

* recall: found RetinaFace faces / RetinaFace faces;
* precision: matched embedded faces / embedded faces (an embedded face with
  no RetinaFace face is counted false, though RetinaFace may be the one wrong);
* IoU: mean IoU of the matched boxes (refined box; ``haar IoU``: the cascade's raw box);
* landmark error of matched faces: mean over the 5 points of the distance to
  RetinaFace's, in pixels and as a fraction of RetinaFace's inter-ocular distance;
* ms per frame of ``detect`` for each (single-threaded by default: ``--threads``).

    .venv/bin/python bench/embedded_detector.py [--stride 1] [--threads 1] [--shared DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from frvideo.faces.embedded import EmbeddedDetector, cascade_boxes  # noqa: E402
from frvideo.faces.retinaface import RetinaFaceDetector, shrink_for_detection  # noqa: E402
from frvideo.io.frames import to_rgb, to_rgb8  # noqa: E402
from frvideo.io.reader import open_reader  # noqa: E402


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter)


def match(a: np.ndarray, b: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Greedy one-to-one pairs (i in a, j in b, IoU), highest IoU first, IoU >= threshold."""
    m = iou_matrix(a, b)
    pairs, used_a, used_b = [], set(), set()
    for flat in np.argsort(-m, axis=None):
        i, j = np.unravel_index(flat, m.shape)
        if m[i, j] < threshold:
            break
        if i in used_a or j in used_b:
            continue
        pairs.append((int(i), int(j), float(m[i, j])))
        used_a.add(i)
        used_b.add(j)
    return pairs


class Tally:
    def __init__(self):
        self.frames = self.rf = self.emb = self.found = 0
        self.ious, self.haar_ious, self.lm_px, self.lm_rel = [], [], [], []
        self.t_rf, self.t_emb = [], []

    def add(self, other: "Tally") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def row(self, name: str) -> str:
        rec = self.found / max(self.rf, 1)
        prec = self.found / max(self.emb, 1) if self.emb else float("nan")
        mean = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731
        return (f"| {name} | {self.frames} | {self.rf} | {self.emb} | {rec:.3f} | {prec:.3f} | {mean(self.ious):.3f} | "
                f"{mean(self.haar_ious):.3f} | {mean(self.lm_px):.2f} | {mean(self.lm_rel):.3f} | "
                f"{np.median(self.lm_rel) if self.lm_rel else float('nan'):.3f} | "
                f"{mean(self.t_rf):.1f} | {mean(self.t_emb):.1f} |")


HEADER = ("| clip | frames | RF faces | emb faces | recall | precision | IoU | haar IoU | lm err px | lm err / iod "
          "| median / iod | RF ms | emb ms |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared")))
    ap.add_argument("--stride", type=int, default=1, help="every n-th frame")
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (0 = library default)")
    ap.add_argument("--weights", type=Path, default=None, help="embedded landmark CNN (default: the shipped file)")
    args = ap.parse_args()
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    rf = RetinaFaceDetector(args.shared / "weights" / "detection_mobilenet0.25_Final.pth")
    emb = EmbeddedDetector(args.weights)
    clips = sorted((args.shared / "media" / "videos" / "eval").glob("*.mp4"))
    print(f"every {args.stride}. frame, found = IoU >= {args.iou}, threads {args.threads}\n")
    print(HEADER)
    total = Tally()
    for clip in clips:
        t = Tally()
        for k, frame in enumerate(open_reader(str(clip))):
            if k % args.stride:
                continue
            rgb = np.ascontiguousarray(to_rgb8(to_rgb(frame)))
            t0 = time.perf_counter()
            ref = rf.detect(rgb)
            t1 = time.perf_counter()
            det = emb.detect(rgb)
            t2 = time.perf_counter()
            t.t_rf.append(1000 * (t1 - t0))
            t.t_emb.append(1000 * (t2 - t1))
            t.frames += 1
            t.rf += len(ref)
            t.emb += len(det)
            pairs = match(ref.boxes, det.boxes, args.iou)
            t.found += len(pairs)
            for i, j, iou in pairs:
                t.ious.append(iou)
                err = np.linalg.norm(det.landmarks[j] - ref.landmarks[i], axis=1).mean()
                iod = np.linalg.norm(ref.landmarks[i, 1] - ref.landmarks[i, 0])
                t.lm_px.append(float(err))
                t.lm_rel.append(float(err / max(iod, 1e-6)))
            # the cascade's own boxes, for comparison (not timed)
            small, sx, sy = shrink_for_detection(rgb, emb.max_size)
            grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
            hb = cascade_boxes(emb.cascade, grey, emb.scale_factor, emb.min_neighbors, emb.min_face)[0]
            hb = hb * np.array([sx, sy, sx, sy], np.float32)
            m = iou_matrix(ref.boxes, hb)
            if m.size:
                t.haar_ious += [float(v) for v in m.max(1) if v > 0]
        print(t.row(clip.name), flush=True)
        total.add(t)
    print(total.row("**all**"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
