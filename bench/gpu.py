"""GPU throughput, end to end from file to file, in one command (GPU time is scarce).

For each model (CodeFormer, GFPGAN and VQFR v2 with parity-filled official-format weights
made here by bench/make_filled_checkpoint.py - the architectures and their cost are the
real ones, the faces come out as noise -, and the shipped ``lite``), a 1080p clip with one
face and one with four faces go through the whole pipeline (decode thread, detection with
RetinaFace-mobile, batched restoration, blend, encode thread) into an x264 file. Printed:
fps end to end, faces/s, and the main thread's share of time per stage (RunStats
.stage_seconds: detect, align, model, filter, blend, paste).

The clips are made from ../shared/media/videos/eval/lp_s18_1280x720.mp4 (one face),
scaled to 1920x1080; four faces = the same frames tiled 2 x 2 then scaled to 1080p. A first
short run per model warms the GPU up (cuDNN autotuning, allocations) and is not counted.

    FRVIDEO_HOME=<dir with weights/ holding the detector> python bench/gpu.py \\
        [--frames 240] [--models codeformer gfpgan vqfr lite] [--device cuda] [--budget-s 420]

``--budget-s`` stops starting new measurements once that much time has passed (the lent GPU
allows 8 minutes per command); ``--device cpu --frames 4`` is the smoke test used here.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
FILLED = {"codeformer": "params_ema", "gfpgan": "params_ema", "vqfr": "params"}


def make_clip(path: Path, frames: int, tiles: int) -> Path:
    src = SHARED / "media" / "videos" / "eval" / "lp_s18_1280x720.mp4"
    with av.open(str(src)) as inp, av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
        s.codec_context.options = {"preset": "veryfast", "crf": "18"}
        n = 0
        for f in inp.decode(video=0):
            img = f.to_ndarray(format="rgb24")
            if tiles == 4:
                img = np.vstack([np.hstack([img, img]), np.hstack([img, img])])
            img = cv2.resize(img, (1920, 1080), interpolation=cv2.INTER_AREA if tiles == 4 else cv2.INTER_CUBIC)
            vf = av.VideoFrame.from_ndarray(img, format="rgb24")
            vf.pts, vf.time_base = n, Fraction(1, 30)
            for p in s.encode(vf):
                out.mux(p)
            n += 1
            if n == frames:
                break
        for p in s.encode():
            out.mux(p)
    return path


def run(model: str, weights, clip: Path, out: Path, device: str, batch: int, frames: int):
    import torch

    from frvideo.faces.detect import load_detector
    from frvideo.io.writer import EncodeOptions
    from frvideo.pipeline import PipelineOptions, run_file
    from frvideo.restore import load_restorer

    dtype = torch.float32
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    restorer = load_restorer(model, weights, device, dtype)
    detector = load_detector("retinaface-mobile", None, device, None)
    opts = PipelineOptions(quiet=True, batch_size=batch, encode=EncodeOptions(preset="veryfast"))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    stats = run_file(str(clip), str(out), restorer, detector, opts)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return stats, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["codeformer", "gfpgan", "vqfr", "lite"])
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=420.0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="frvideo-gpu-"))
    clips = {n: make_clip(work / f"faces{n}.mp4", args.frames, n) for n in (1, 4)}
    warm = make_clip(work / "warm.mp4", min(16, args.frames), 1)
    rows = []
    for model in args.models:
        weights = None
        if model in FILLED:
            weights = work / f"{model}.pth"
            subprocess.run([sys.executable, str(REPO / "bench" / "make_filled_checkpoint.py"), model, str(weights),
                            "--key", FILLED[model]], check=True, stdout=subprocess.DEVNULL)
        run(model, weights, warm, work / "warm_out.mp4", args.device, args.batch, args.frames)
        for n, clip in clips.items():
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget reached: {model} {n} face(s) not measured", file=sys.stderr)
                continue
            stats, secs = run(model, weights, clip, work / "out.mp4", args.device, args.batch, args.frames)
            total = sum(stats.stage_seconds.values()) or 1.0
            shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stats.stage_seconds.items())
            rows.append((model, n, stats.frames / secs, stats.faces / secs, shares))
            print(f"{model:<10} {n} face(s): {stats.frames / secs:7.1f} fps, {stats.faces / secs:7.1f} faces/s  "
                  f"[{shares}]", file=sys.stderr, flush=True)
    print(f"\n{args.device}, {args.frames} frames of 1920x1080, batch {args.batch}, end to end file to file\n")
    print("| model | faces per frame | fps | faces/s | main-thread time per stage |")
    print("|---|---|---|---|---|")
    for model, n, fps, fs, shares in rows:
        print(f"| {model} | {n} | {fps:.1f} | {fs:.1f} | {shares} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
