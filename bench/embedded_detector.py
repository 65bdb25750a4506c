"""The embedded detector against RetinaFace MobileNet-0.25, on every frame of the eval clips.

On every frame of every clip in ../shared/media/videos/eval/ (never used in
training), the reference is RetinaFace MobileNet-0.25 at its card's settings
(frame shrunk to 640, score >= 0.97, NMS 0.4); the embedded detector runs at
its card's settings (640, score >= 0.5). Greedy one-to-one matching, highest
IoU first, a pair needs IoU >= ``--iou`` (0.5). Every reference face counts
(no minimum size: the smallest reference face on these clips is ~114 px of
the 640-px frame). Reported per clip and overall:

* recall: matched reference faces / reference faces;
* precision: matched embedded faces / embedded faces; ``precision*`` does not
  count as false an embedded face on a face RetinaFace scores 0.3-0.97 (a
  face the reference is unsure of, not background);
* IoU of the matched boxes; landmark error: mean distance over the 5 points
  / the reference's inter-ocular distance (mean and 95th percentile);
* ms per frame of ``detect`` (frame decoding excluded), one thread
  (``torch.set_num_threads(1)``), and the same on a 640 x 360 and a 640 x 640
  frame (``--timing-runs`` repeats, median);
* with ``--pipeline``: ``frvideo CLIP out.mkv --model none --detector embedded
  --faces f.jsonl`` is run on each clip and the faces it restored (detected or
  bridged, ``restored: true``) are matched (IoU >= 0.5) to the reference's:
  ``restored``: share of reference faces (= frames, one face per frame here)
  whose face the pipeline restored; ``bridged``: RunStats' frames_bridged.

    OMP_NUM_THREADS=1 python bench/embedded_detector.py [--pipeline] [--weights W] [--threshold 0.5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from frvideo.faces.detect import Detections  # noqa: E402
from frvideo.faces.embedded import EmbeddedDetector  # noqa: E402
from frvideo.faces.retinaface import RetinaFaceDetector  # noqa: E402
from frvideo.io.frames import to_rgb, to_rgb8  # noqa: E402
from frvideo.io.reader import open_reader  # noqa: E402
from frvideo.train.detector import iou_matrix, match  # noqa: E402

REF_SCORE = 0.97  # retinaface-mobile's card threshold
UNSURE_SCORE = 0.3


class Tally:
    def __init__(self):
        self.frames = self.ref = self.det = self.found = self.unsure_hits = 0
        self.ious, self.nme, self.ms, self.cpu_ms = [], [], [], []
        self.restored = self.bridged = None

    def add(self, other: "Tally") -> None:
        for k in ("frames", "ref", "det", "found", "unsure_hits", "ious", "nme", "ms", "cpu_ms"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        if other.restored is not None:
            r = self.restored or (0, 0)
            self.restored = (r[0] + other.restored[0], r[1] + other.restored[1])
            self.bridged = (self.bridged or 0) + other.bridged

    def row(self, name: str) -> str:
        rec = self.found / max(self.ref, 1)
        prec = self.found / self.det if self.det else float("nan")
        prec2 = (self.found + self.unsure_hits) / self.det if self.det else float("nan")
        m = lambda x: float(np.mean(x)) if x else float("nan")  # noqa: E731
        p95 = float(np.percentile(self.nme, 95)) if self.nme else float("nan")
        rest = (f"{self.restored[0] / max(self.restored[1], 1):.4f} ({self.restored[0]}/{self.restored[1]}) | "
                f"{self.bridged}" if self.restored is not None else "- | -")
        return (f"| {name} | {self.frames} | {self.ref} | {self.det} | {rec:.4f} | {prec:.4f} | {prec2:.4f} | "
                f"{m(self.ious):.3f} | {m(self.nme):.4f} | {p95:.4f} | {m(self.cpu_ms):.1f} | {m(self.ms):.1f} | {rest} |")


HEADER = ("| clip | frames | ref faces | emb faces | recall | precision | precision* | IoU | lm err / iod | "
          "p95 / iod | CPU ms / frame | wall ms / frame | restored (pipeline) | frames bridged |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


class CachedReference:
    """Reference faces of ``detector_labels --eval`` (boxes in the 640-shrunk frame's pixels)."""

    def __init__(self, path: Path):
        from frvideo.train.detector import Labelled

        data = Labelled(path)
        self.by_frame = {(data.names[s], int(f)): data.faces[i]
                         for i, (s, f) in enumerate(zip(data.src, np.load(path)["frame"]))}

    def get(self, clip: str, k: int, shape) -> Detections:
        boxes, lms, scores = self.by_frame[(clip, k)]
        h, w = shape[:2]
        sx = sy = 1.0
        if max(h, w) > 640:  # as shrink_for_detection
            s = 640 / max(h, w)
            sx, sy = w / max(1, round(w * s)), h / max(1, round(h * s))
        return Detections((boxes.reshape(-1, 2, 2) * [sx, sy]).reshape(-1, 4).astype(np.float32),
                          (lms * [sx, sy]).astype(np.float32), scores)


def pipeline_restored(clip: Path, ref_boxes: dict[int, np.ndarray], threshold: float, weights) -> tuple:
    """Run the CLI with the embedded detector; (restored reference faces, reference faces), frames_bridged."""
    with tempfile.TemporaryDirectory() as tmp:
        faces = Path(tmp) / "f.jsonl"
        cmd = [sys.executable, "-m", "frvideo", str(clip), str(Path(tmp) / "out.mkv"), "--model", "none",
               "--detector", "embedded", "--faces", str(faces)]
        if weights:
            cmd += ["--detector-weights", str(weights)]
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr.strip()[-400:]}")
        bridged = re.search(r"with faces, (\d+) bridged\)", run.stderr + run.stdout)
        recs = {}
        for line in faces.read_text().splitlines():
            r = json.loads(line)
            recs[r["frame"]] = np.array([f["box"] for f in r["faces"] if f["restored"]], np.float32).reshape(-1, 4)
    hit = total = 0
    for k, rb in ref_boxes.items():
        total += len(rb)
        hit += len(match(rb, recs.get(k, np.zeros((0, 4), np.float32))))
    return (hit, total), int(bridged.group(1)) if bridged else -1


def timing(det: EmbeddedDetector, runs: int) -> dict:
    """Median (CPU ms of this thread, wall ms) of ``detect`` on a 640 x 360 and a 640 x 640 frame.
    CPU time is the cost on one core; wall time also holds the waits of a shared machine."""
    rng = np.random.default_rng(0)
    out = {}
    for h, w in ((360, 640), (640, 640)):
        frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        det.detect(frame)
        cpu, wall = [], []
        for _ in range(runs):
            t0, c0 = time.perf_counter(), time.thread_time()
            det.detect(frame)
            cpu.append(1000 * (time.thread_time() - c0))
            wall.append(1000 * (time.perf_counter() - t0))
        out[f"{w}x{h}"] = (float(np.median(cpu)), float(np.median(wall)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared")))
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--weights", type=Path, default=None, help="embedded detector checkpoint (default: shipped)")
    ap.add_argument("--threshold", type=float, default=None, help="embedded score threshold (default: the card's)")
    ap.add_argument("--max-size", type=int, default=None, help="embedded detector's max_size (default: the card's)")
    ap.add_argument("--pipeline", action="store_true", help="also run the CLI per clip (restored share)")
    ap.add_argument("--timing-runs", type=int, default=30)
    ap.add_argument("--clips", nargs="*", default=None, help="clip names (default: every eval clip)")
    ap.add_argument("--labels", type=Path, default=None,
                    help="the reference from `python -m frvideo.train.detector_labels --eval --out FILE` (the same "
                         "RetinaFace at the same settings, score >= 0.3, computed once) instead of running it here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    __import__("cv2").setNumThreads(1)
    from frvideo.models import load_model_config
    card = load_model_config("embedded").defaults
    thr = card["score_threshold"] if args.threshold is None else args.threshold
    ref_det = RetinaFaceDetector(args.shared / "weights" / "detection_mobilenet0.25_Final.pth",
                                 score_threshold=UNSURE_SCORE)
    if args.max_size is not None:
        card = {**card, "max_size": args.max_size}
    emb = EmbeddedDetector(args.weights, **{**card, "score_threshold": thr})
    clips = sorted((args.shared / "media" / "videos" / "eval").glob("*.mp4"))
    if args.clips:
        clips = [c for c in clips if c.name in args.clips]
    print(f"every frame; reference retinaface-mobile score >= {REF_SCORE}; embedded score >= {thr}; "
          f"match IoU >= {args.iou}; 1 thread\n")
    print(HEADER)
    total = Tally()
    cached = CachedReference(args.labels) if args.labels else None
    for clip in clips:
        t = Tally()
        refs = {}
        for k, frame in enumerate(open_reader(str(clip))):
            rgb = np.ascontiguousarray(to_rgb8(to_rgb(frame)))
            ref = cached.get(clip.name, k, rgb.shape) if cached else ref_det.detect(rgb)
            t0, c0 = time.perf_counter(), time.thread_time()
            det = emb.detect(rgb)
            t.ms.append(1000 * (time.perf_counter() - t0))
            t.cpu_ms.append(1000 * (time.thread_time() - c0))
            sure = ref.scores >= REF_SCORE
            rb, rl = ref.boxes[sure], ref.landmarks[sure]
            refs[k] = rb
            t.frames += 1
            t.ref += len(rb)
            t.det += len(det)
            pairs = match(rb, det.boxes, args.iou)
            t.found += len(pairs)
            iou = iou_matrix(rb, det.boxes)
            for r, d in pairs:
                t.ious.append(float(iou[r, d]))
                iod = max(float(np.linalg.norm(rl[r, 1] - rl[r, 0])), 1e-6)
                t.nme.append(float(np.linalg.norm(det.landmarks[d] - rl[r], axis=1).mean()) / iod)
            unmatched = sorted(set(range(len(det))) - {d for _, d in pairs})
            unsure = ref.boxes[~sure]
            if unmatched and len(unsure):
                t.unsure_hits += len(match(unsure, det.boxes[unmatched], args.iou))
        if args.pipeline:
            t.restored, t.bridged = pipeline_restored(clip, refs, thr, args.weights)
        print(t.row(clip.name), flush=True)
        total.add(t)
    print(total.row("**all**"))
    print(f"\nms per frame, one thread, median of {args.timing_runs} (CPU / wall): " +
          ", ".join(f"{k}: {c:.1f} / {w:.1f}" for k, (c, w) in timing(emb, args.timing_runs).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
