"""Peak memory stays flat with video length.

Builds a 1-minute and a 4-minute input by concatenating the real clips of
../shared/media/videos (scaled to one size, 25 fps, with their faces), runs
`frvideo` on each in a fresh process, and reports peak RSS and fps side by
side. The two peaks must be within 10% of each other.

    python bench/memory.py [--model none] [--minutes 1 4] [--size 512]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SHARED = Path(os.environ.get("FRVIDEO_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def build_input(path: Path, seconds: float, size: int, fps: int = 25) -> int:
    """Concatenate real clips (looping over them) into one h264 file of the given length."""
    clips = sorted((SHARED / "media" / "videos").glob("*/*.mp4"))
    if not clips:
        sys.exit(f"no clips under {SHARED / 'media' / 'videos'}")
    out = av.open(str(path), "w")
    s = out.add_stream("libx264", rate=fps)
    s.width = s.height = size
    s.pix_fmt = "yuv420p"
    s.codec_context.options = {"preset": "ultrafast", "crf": "20"}
    total, n = int(seconds * fps), 0
    while n < total:
        for clip in clips:
            with av.open(str(clip)) as c:
                for f in c.decode(video=0):
                    img = f.to_ndarray(format="rgb24")
                    h, w = img.shape[:2]
                    side = min(h, w)  # centre square: the faces are central in these clips
                    img = np.ascontiguousarray(img[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2])
                    frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(size, size, "yuv420p")
                    frame.pts, frame.time_base = n, Fraction(1, fps)
                    for p in s.encode(frame):
                        out.mux(p)
                    n += 1
                    if n >= total:
                        break
            if n >= total:
                break
    for p in s.encode(None):
        out.mux(p)
    out.close()
    return n


def measure(cmd: list[str]) -> tuple[int, float]:
    """Run cmd in a child process; return (its peak RSS in KiB, seconds)."""
    code = ("import resource, subprocess, sys, time, json; t = time.time(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.time() - t]))")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    rc, rss, secs = json.loads(res.stdout.strip().splitlines()[-1])
    if rc != 0:
        sys.exit(f"frvideo failed ({rc}): {res.stderr[-2000:]}")
    return rss, secs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="none")
    ap.add_argument("--detector", default="yunet")
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 4])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more frvideo options")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for minutes in args.minutes:
            src = Path(tmp) / f"in_{minutes}min.mp4"
            frames = build_input(src, minutes * 60, args.size)
            cmd = [sys.executable, "-m", "frvideo", str(src), str(Path(tmp) / "out.mp4"), "--model", args.model,
                   "--detector", args.detector, "-q", *args.extra]
            rss, secs = measure(cmd)
            rows.append((minutes, frames, rss / 1024, frames / secs))
    print(f"model {args.model}, detector {args.detector}, {args.size}x{args.size} input\n")
    print("| input | frames | peak RSS (MiB) | fps |\n|---|---|---|---|")
    for minutes, frames, mib, fps in rows:
        print(f"| {minutes:g} min | {frames} | {mib:.0f} | {fps:.1f} |")
    if len(rows) >= 2:
        ratio = rows[-1][2] / rows[0][2]
        print(f"\npeak RSS ratio {rows[-1][0]:g} min / {rows[0][0]:g} min = {ratio:.3f} "
              f"({'flat' if abs(ratio - 1) <= 0.10 else 'NOT flat'}: must be within 10%)")


if __name__ == "__main__":
    main()
