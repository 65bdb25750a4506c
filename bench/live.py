"""--live on a paced 25 fps source: does the output keep the input's rate, how many frames are
restored fresh / carried / passed through, and how much latency frvideo adds (p50, p95).

For each height (360p, 480p, 720p) a 16:9 clip is made from an eval clip (a talking face at
25 fps, scaled and padded), then run through the real command line

    frvideo CLIP - --format nut --config live --model lite --max-latency MS

which paces the file at its timestamps (like ffmpeg -re). The bench reads frvideo's nut
output from the pipe as it comes and stamps each video frame's arrival on its own clock:
the output rate is measured there, not taken from frvideo. Fresh/carried/passed-through and
the added latency come from frvideo's summary line.

    FRVIDEO_HOME=<detector weights> OMP_NUM_THREADS=1 python bench/live.py [--heights 360 480 720]
        [--seconds 10] [--max-latency 200] [--detector auto] [--precision auto|int8] [--clip PATH]

Needs the ffmpeg command (to make the clips) and ../shared/media.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import av

REPO = Path(__file__).resolve().parent.parent
CLIP = REPO.parent / "shared" / "media" / "videos" / "eval" / "retalk_2.mp4"  # 25 fps, 844x844, 5 s, audio
SUMMARY = re.compile(r"frvideo: live: (?P<fin>\d+) frames in .*?(?P<fout>\d+) out .*?faces (?P<fresh>\d+) fresh.*?"
                     r"(?P<carried>\d+) carried.*?(?P<raw>\d+) passed through.*?"
                     r"added latency p50 (?P<p50>\d+) ms, p95 (?P<p95>\d+) ms")


def make_clip(src: Path, height: int, seconds: float, out: Path) -> Path:
    width = (height * 16 // 9) // 2 * 2
    loops = max(0, int(seconds // 5))
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-y", "-stream_loop", str(loops), "-i", str(src),
                    "-t", str(seconds), "-vf", f"scale=-2:{height},pad={width}:{height}:(ow-iw)/2:0,fps=25",
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-c:a", "aac", str(out)],
                   check=True, timeout=600)
    return out


def receive(pipe, arrivals: list) -> None:
    """Demux frvideo's nut stdout as it comes; stamp each video frame's arrival."""
    with av.open(pipe, "r", format="nut") as c:
        video = c.streams.video[0]
        for packet in c.demux(video):
            if packet.size:
                arrivals.append(time.monotonic())


def run(clip: Path, args) -> dict:
    cmd = [sys.executable, "-m", "frvideo", str(clip), "-", "--format", "nut", "--config", "live",
           "--model", args.model, "--detector", args.detector, "--max-latency", str(args.max_latency),
           "--stats-interval", "0", "--precision", args.precision]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    arrivals: list = []
    reader = threading.Thread(target=receive, args=(proc.stdout, arrivals), daemon=True)
    reader.start()
    err = proc.stderr.read().decode(errors="replace")
    proc.wait()
    reader.join(30)
    m = SUMMARY.search(err)
    if proc.returncode != 0 or m is None:
        raise SystemExit(f"frvideo failed ({proc.returncode}):\n{err}")
    n = {k: int(v) for k, v in m.groupdict().items()}
    faces = n["fresh"] + n["carried"] + n["raw"] or 1
    span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else 0.0
    return {"frames_in": n["fin"], "frames_out": len(arrivals),
            "out_fps": (len(arrivals) - 1) / span if span else 0.0,
            "fresh": n["fresh"] / faces, "carried": n["carried"] / faces, "raw": n["raw"] / faces,
            "p50": n["p50"], "p95": n["p95"],
            "detector": re.search(r"detector (\S+),", err).group(1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heights", type=int, nargs="+", default=[360, 480, 720])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--max-latency", type=float, default=200.0)
    p.add_argument("--model", default="lite")
    p.add_argument("--detector", default="auto")
    p.add_argument("--precision", default="auto", help="frvideo's --precision (int8: lite's int8 graphs)")
    p.add_argument("--clip", type=Path, default=CLIP)
    args = p.parse_args()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("bench/live.py needs the ffmpeg command to make its clips")
    if not args.clip.exists():
        raise SystemExit(f"clip not found: {args.clip}")
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for h in args.heights:
            clip = make_clip(args.clip, h, args.seconds, Path(tmp) / f"live_{h}p.mp4")
            r = run(clip, args)
            rows.append((h, r))
            print(f"{h}p: {r}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"\n{args.model} ({args.precision}) / {rows[0][1]['detector']}, --max-latency {args.max_latency:g} ms, "
          f"{args.seconds:g} s at 25 fps; load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print("| input | frames in / out | output rate | fresh | carried | passed through | added latency p50 | p95 |")
    print("|---|---|---|---|---|---|---|---|")
    for h, r in rows:
        print(f"| {h}p 25 fps | {r['frames_in']} / {r['frames_out']} | {r['out_fps']:.1f} fps | "
              f"{100 * r['fresh']:.0f}% | {100 * r['carried']:.0f}% | {100 * r['raw']:.0f}% | "
              f"{r['p50']} ms | {r['p95']} ms |")


if __name__ == "__main__":
    main()
