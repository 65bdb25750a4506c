"""Compare RetinaFace MobileNet-0.25 and YuNet on ../shared/media/images/whole/.

For each image: faces found by each detector, mean landmark distance between
the two on faces both found (pixels and as a fraction of the inter-ocular
distance), and ms per image (median of a few runs after a warm-up).

    .venv/bin/python bench/detectors.py [--max-size 640] [--repeat 3] [--threads 1] [--shared DIR]
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

from frvideo.faces.detect import Detections  # noqa: E402
from frvideo.faces.retinaface import RetinaFaceDetector  # noqa: E402
from frvideo.faces.yunet import YuNetDetector  # noqa: E402


def match_faces(a: Detections, b: Detections) -> list[tuple[int, int]]:
    """Pairs (i in a, j in b), greedily by the distance of box centres, kept
    when that distance is under half the width of a's box."""
    pairs, used = [], set()
    ca = (a.boxes[:, :2] + a.boxes[:, 2:]) / 2
    cb = (b.boxes[:, :2] + b.boxes[:, 2:]) / 2
    cand = sorted((float(np.linalg.norm(ca[i] - cb[j])), i, j) for i in range(len(a)) for j in range(len(b)))
    used_a = set()
    for d, i, j in cand:
        if i in used_a or j in used or d > 0.5 * (a.boxes[i, 2] - a.boxes[i, 0]):
            continue
        pairs.append((i, j))
        used_a.add(i)
        used.add(j)
    return pairs


def timed(fn, image, repeat: int) -> tuple[Detections, float]:
    fn(image)  # warm-up (prior cache, setInputSize)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        det = fn(image)
        times.append(time.perf_counter() - t)
    return det, 1000 * float(np.median(times))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared")))
    ap.add_argument("--max-size", type=int, default=640, help="0 = detect at full resolution")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (0 = library default)")
    args = ap.parse_args()
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
        cv2.setNumThreads(args.threads)
    images = sorted((args.shared / "media/images/whole").glob("*"))
    weights = args.shared / "weights"
    max_size = args.max_size or None
    rf = RetinaFaceDetector(weights / "detection_mobilenet0.25_Final.pth", max_size=max_size)
    yn = YuNetDetector(weights / "face_detection_yunet_2023mar.onnx", max_size=max_size)

    print(f"max_size={max_size}  torch threads={__import__('torch').get_num_threads()}  cv2 threads={cv2.getNumThreads()}")
    head = f"{'image':<22}{'size':>11}{'rf':>4}{'yn':>4}{'both':>5}{'lm px':>8}{'lm/iod':>8}{'rf ms':>8}{'yn ms':>8}"
    print(head)
    print("-" * len(head))
    all_px, all_rel, t_rf, t_yn = [], [], [], []
    for path in images:
        bgr = cv2.imread(str(path))
        if bgr is None:
            continue
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        a, ms_rf = timed(rf.detect, rgb, args.repeat)
        b, ms_yn = timed(yn.detect, rgb, args.repeat)
        pairs = match_faces(a, b)
        px, rel = [], []
        for i, j in pairs:
            d = np.linalg.norm(a.landmarks[i] - b.landmarks[j], axis=1).mean()
            iod = np.linalg.norm(a.landmarks[i, 0] - a.landmarks[i, 1])
            px.append(d)
            rel.append(d / iod)
        all_px += px
        all_rel += rel
        t_rf.append(ms_rf)
        t_yn.append(ms_yn)
        h, w = bgr.shape[:2]
        lm_px = f"{np.mean(px):8.1f}" if px else f"{'-':>8}"
        lm_rel = f"{np.mean(rel):8.3f}" if rel else f"{'-':>8}"
        print(f"{path.name:<22}{f'{w}x{h}':>11}{len(a):>4}{len(b):>4}{len(pairs):>5}{lm_px}{lm_rel}{ms_rf:8.1f}{ms_yn:8.1f}")
    print("-" * len(head))
    print(f"{'all faces (mean)':<22}{'':>11}{'':>4}{'':>4}{len(all_px):>5}{np.mean(all_px):8.1f}{np.mean(all_rel):8.3f}"
          f"{np.mean(t_rf):8.1f}{np.mean(t_yn):8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
