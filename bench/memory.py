"""Peak memory stays flat with video length.

Builds a 1-minute and a 4-minute input by concatenating the real clips of
../shared/media/videos (scaled to one size, 25 fps, with their faces), runs
`frvideo` on each in a fresh process, and reports peak RSS and fps side by
side. The two peaks must be within 10% of each other.

    python bench/memory.py [--model none] [--minutes 1 4] [--size 512]
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


def measure(cmd: list[str], samples: int = 8) -> tuple[int, float, list[int]]:
    """Run cmd; return (peak RSS in KiB, seconds, RSS in KiB at evenly spaced moments)."""
    t0 = time.time()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stderr=err)
        trace = []
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                trace.append(int(next(line for line in lines if line.startswith("VmRSS")).split()[1]))
            except (OSError, StopIteration):
                pass
            time.sleep(0.5)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"frvideo failed: {err.read().decode()[-2000:]}")
    picks = [trace[round(i * (len(trace) - 1) / (samples - 1))] for i in range(samples)] if trace else []
    return usage.ru_maxrss, time.time() - t0, picks


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
            rss, secs, trace = measure(cmd)
            rows.append((minutes, frames, rss / 1024, frames / secs, trace))
    print(f"model {args.model}, detector {args.detector}, {args.size}x{args.size} input\n")
    print("| input | frames | peak RSS (MiB) | fps | RSS over the run (MiB, evenly spaced) |\n|---|---|---|---|---|")
    for minutes, frames, mib, fps, trace in rows:
        print(f"| {minutes:g} min | {frames} | {mib:.0f} | {fps:.1f} | {' '.join(str(k // 1024) for k in trace)} |")
    if len(rows) >= 2:
        ratio = rows[-1][2] / rows[0][2]
        print(f"\npeak RSS ratio {rows[-1][0]:g} min / {rows[0][0]:g} min = {ratio:.3f} "
              f"({'flat' if abs(ratio - 1) <= 0.10 else 'NOT flat'}: must be within 10%)")


if __name__ == "__main__":
    main()
