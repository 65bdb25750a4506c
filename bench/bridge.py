"""How far can a track be bridged? The measurement behind ``--bridge``'s default.

A face the detector misses inside a shot is bridged: landmarks interpolated linearly between
the detections on both sides (files), or continued from the last detection along its last
motion, halving each frame (causal runs, --lookahead 0); frvideo.pipeline does both. This
bench makes gaps where the truth is known: on every frame of the eval clips RetinaFace
MobileNet-0.25 (real weights, score >= 0.97, one face per frame in these clips) gives
reference landmarks; for every gap length N and every place a gap of N frames fits inside a
run of detected frames, the N frames are treated as missed, bridged as the pipeline does, and
the bridged landmarks are compared with the reference ones. Error: mean distance over the 5
points / the reference inter-ocular distance (the unit of bench/embedded_detector.py).

The default is the longest gap whose bridged frames are, at the 95th percentile over every
clip's gaps, within 0.1 of the inter-ocular distance of the reference (--tolerance): about the
error of the shipped embedded detector's own detections on frontal faces (bench/README.md), so a
bridged frame is aligned about as well as a detected one.

    FRVIDEO_HOME=<dir with weights/> OMP_NUM_THREADS=1 python bench/bridge.py [--max-gap 32]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from frvideo.faces.retinaface import RetinaFaceDetector  # noqa: E402
from frvideo.io.frames import to_rgb, to_rgb8  # noqa: E402
from frvideo.io.reader import open_reader  # noqa: E402

SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
# the shipped embedded detector's mean landmark error / iod on the frontal eval clips (0.09-0.10:
# lp_d13, retalk_3, wda_aoc; bench/README.md, "With the card's score threshold 0.6 (shipped)")
TOLERANCE = 0.1


def reference_landmarks(clip: Path, detector: RetinaFaceDetector) -> list:
    """Per frame: the one face's 5 landmarks (5 x 2), or None where there is not exactly one."""
    out = []
    for frame in open_reader(str(clip)):
        det = detector.detect(np.ascontiguousarray(to_rgb8(to_rgb(frame))))
        out.append(det.landmarks[0].astype(np.float64) if len(det) == 1 else None)
    return out


def error(pred: np.ndarray, ref: np.ndarray) -> float:
    iod = np.linalg.norm(ref[1] - ref[0])
    return float(np.linalg.norm(pred - ref, axis=1).mean() / max(iod, 1e-6))


def gap_errors(lms: list, n: int) -> tuple[list[float], list[float]]:
    """Errors of every frame bridged in every gap of n frames that fits in a detected run:
    (interpolated, predicted). Prediction needs two detections before the gap (the velocity)."""
    interp, pred = [], []
    for start in range(2, len(lms) - n):
        span = lms[start - 2:start + n + 1]
        if any(x is None for x in span):
            continue
        before2, before, after = span[0], span[1], span[-1]
        velocity = before - before2  # the tracker's: motion per frame at the last detection
        for k in range(1, n + 1):
            truth = span[1 + k]
            t = k / (n + 1)
            interp.append(error((1 - t) * before + t * after, truth))
            pred.append(error(before + velocity * 2 * (1 - 0.5 ** k), truth))
    return interp, pred


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-gap", type=int, default=32)
    ap.add_argument("--tolerance", type=float, default=TOLERANCE,
                    help="p95 landmark error / iod a bridged frame may have (default 0.1)")
    ap.add_argument("--clips", nargs="*", default=None)
    args = ap.parse_args()
    home = Path(os.environ.get("FRVIDEO_HOME", Path.home() / ".frvideo"))
    weights = home / "weights" / "detection_mobilenet0.25_Final.pth"
    if not weights.is_file():
        sys.exit(f"bridge: no {weights} (set FRVIDEO_HOME to a folder whose weights/ holds RetinaFace MobileNet)")
    detector = RetinaFaceDetector(weights, score_threshold=0.97)
    clips = sorted((SHARED / "media" / "videos" / "eval").glob("*.mp4"))
    if args.clips:
        clips = [c for c in clips if c.name in args.clips]
    refs = {}
    for clip in clips:
        refs[clip.name] = reference_landmarks(clip, detector)
        found = sum(x is not None for x in refs[clip.name])
        print(f"{clip.name}: {found}/{len(refs[clip.name])} frames with one reference face", flush=True)

    print("\n| gap (frames) | bridged frames | interpolated mean | p95 | worst clip p95 | predicted mean | p95 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    chosen = {"interpolated": 0, "predicted": 0}
    for n in range(1, args.max_gap + 1):
        interp, pred, clip_p95 = [], [], []
        for lms in refs.values():
            i, p = gap_errors(lms, n)
            interp += i
            pred += p
            if i:
                clip_p95.append(np.percentile(i, 95))
        if not interp:
            break
        ip95, pp95 = np.percentile(interp, 95), np.percentile(pred, 95)
        print(f"| {n} | {len(interp)} | {np.mean(interp):.4f} | {ip95:.4f} | {max(clip_p95):.4f} | "
              f"{np.mean(pred):.4f} | {pp95:.4f} |", flush=True)
        if ip95 <= args.tolerance and chosen["interpolated"] == n - 1:
            chosen["interpolated"] = n
        if pp95 <= args.tolerance and chosen["predicted"] == n - 1:
            chosen["predicted"] = n
    print(f"\nlongest gap within p95 <= {args.tolerance:.4f} of the inter-ocular distance: "
          f"interpolated {chosen['interpolated']} frames, predicted {chosen['predicted']} frames")


if __name__ == "__main__":
    main()
