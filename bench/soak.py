"""Soak: memory, file descriptors and threads stay flat over an hour of video.

A synthetic y4m stream (generated on the fly, never stored: a moving gradient
with a real face from ../shared/media/images/cropped_faces pasted in, moving,
for ``--face-for`` seconds of every ``--face-every``; each appearance is a new
face, so tracks start and end all the time) is piped into
``frvideo - OUT.mp4`` with a real detector and a real restorer (default
``lite`` + ``retinaface-mobile``). RSS (VmRSS), open file descriptors and
threads of the frvideo process are sampled from /proc every ``--sample-s``
seconds. Pass: every RSS sample after the first minute of video stays within
10% of its value at that minute, and fds / threads at the end are no more
than at that minute.

Writes OUT_DIR/soak.csv (one row per sample), soak.json (the figures) and
soak.png (the curve, drawn with OpenCV: no plotting dependency).

    OMP_NUM_THREADS=1 nohup python bench/soak.py --minutes 60 --fps 10 > soak.log 2>&1 &

One thread, so it runs beside other jobs; an hour of 10 fps video takes
about an hour on one core of the dev machine. Not resumable: a stopped soak
starts again.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
TOLERANCE = 0.10


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, open fds, threads) of a live process, from /proc."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return rss, fds, threads


class FaceStream:
    """Frames of the synthetic stream, as yuv420p bytes (I420)."""

    def __init__(self, width: int, height: int, fps: int, face_every: float, face_for: float):
        faces = sorted((SHARED / "media" / "images" / "cropped_faces").glob("*.png"))
        if not faces:
            sys.exit(f"no face images under {SHARED / 'media' / 'images' / 'cropped_faces'}")
        self.w, self.h, self.fps = width, height, fps
        self.side = int(min(width, height) * 0.6) // 2 * 2
        self.faces = [cv2.resize(cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB), (self.side, self.side),
                                 interpolation=cv2.INTER_AREA) for p in faces]
        yy, xx = np.mgrid[0:self.side, 0:self.side] / (self.side - 1) * 2 - 1
        self.mask = np.clip((1.0 - np.sqrt(xx ** 2 + yy ** 2)) * 4, 0, 1)[..., None]  # soft-edged disc
        self.period, self.visible = int(face_every * fps), int(face_for * fps)
        y, x = np.mgrid[0:height, 0:2 * width]
        self.wide = np.stack([x * 255 // (2 * width - 1), y * 255 // (height - 1),
                              np.full_like(x, 96)], axis=2).astype(np.uint8)

    def rgb(self, i: int) -> np.ndarray:
        shift = (i * 2) % self.w
        img = self.wide[:, shift:shift + self.w].copy()
        phase, k = i % self.period, i // self.period
        if phase < self.visible:
            t = phase / self.fps
            x0 = int((self.w - self.side) * (0.5 + 0.4 * np.sin(0.8 * t + k)))
            y0 = int((self.h - self.side) * (0.5 + 0.3 * np.cos(0.5 * t)))
            face = self.faces[k % len(self.faces)]
            region = img[y0:y0 + self.side, x0:x0 + self.side].astype(np.float32)
            img[y0:y0 + self.side, x0:x0 + self.side] = (region * (1 - self.mask) + face * self.mask).astype(np.uint8)
        return img

    def frame_bytes(self, i: int) -> bytes:
        return b"FRAME\n" + cv2.cvtColor(self.rgb(i), cv2.COLOR_RGB2YUV_I420).tobytes()

    def header(self) -> bytes:
        return f"YUV4MPEG2 W{self.w} H{self.h} F{self.fps}:1 Ip A1:1 C420jpeg\n".encode()


def detector_home(tmp: Path) -> Path:
    """$FRVIDEO_HOME with links to the real detector weights of ../shared."""
    home = tmp / "home"
    (home / "weights").mkdir(parents=True)
    for f in (SHARED / "weights").glob("*"):
        if f.suffix in (".pth", ".onnx"):
            (home / "weights" / f.name).symlink_to(f)
    return home


def draw_plot(rows: list[dict], path: Path, minute_rss: float) -> None:
    """RSS (MiB), fds and threads against minutes of video, on one white canvas."""
    W, H, L, R, T, B = 1000, 600, 80, 30, 50, 60
    img = np.full((H, W, 3), 255, np.uint8)
    t = np.array([r["video_s"] for r in rows]) / 60
    rss = np.array([r["rss"] for r in rows]) / 2 ** 20
    fds = np.array([r["fds"] for r in rows], float)
    thr = np.array([r["threads"] for r in rows], float)
    t_max = max(t.max(), 1e-6)
    top = max(rss.max(), minute_rss / 2 ** 20 * (1 + TOLERANCE)) * 1.1
    top = max(top, fds.max() * 1.1, thr.max() * 1.1)

    def xy(tt, v):
        return np.stack([L + tt / t_max * (W - L - R), H - B - v / top * (H - T - B)], 1).astype(np.int32)

    cv2.rectangle(img, (L, T), (W - R, H - B), (0, 0, 0), 1)
    for frac in np.linspace(0, 1, 6):
        y = int(H - B - frac * (H - T - B))
        cv2.line(img, (L - 5, y), (L, y), (0, 0, 0), 1)
        cv2.putText(img, f"{frac * top:.0f}", (5, y + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        x = int(L + frac * (W - L - R))
        cv2.line(img, (x, H - B), (x, H - B + 5), (0, 0, 0), 1)
        cv2.putText(img, f"{frac * t_max:.0f}", (x - 10, H - B + 22), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
    band = minute_rss / 2 ** 20
    for v in (band * (1 - TOLERANCE), band * (1 + TOLERANCE)):
        p = xy(np.array([0, t_max]), np.array([v, v]))
        cv2.line(img, tuple(p[0]), tuple(p[1]), (180, 180, 255), 1, cv2.LINE_AA)
    for values, color in ((rss, (200, 40, 40)), (fds, (40, 150, 40)), (thr, (40, 40, 200))):
        cv2.polylines(img, [xy(t, values)], False, color, 2, cv2.LINE_AA)
    cv2.putText(img, "frvideo soak: RSS MiB (blue), open fds (green), threads (red); pink: +-10% of RSS at 1 min",
                (L, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "minutes of video", (W // 2 - 60, H - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                cv2.LINE_AA)
    cv2.imwrite(str(path), img)  # BGR order: the colours named above are as drawn


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="video length (default 60)")
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--size", default="256x192", help="frame size WxH (default 256x192)")
    p.add_argument("--face-every", type=float, default=30.0, help="a new face appears every N s of video")
    p.add_argument("--face-for", type=float, default=10.0, help="... and stays this many seconds")
    p.add_argument("--model", default="lite")
    p.add_argument("--detector", default="retinaface-mobile")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between /proc samples")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "soak", help="folder for csv/json/png")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    total = int(args.minutes * 60 * args.fps)
    stream = FaceStream(w, h, args.fps, args.face_every, args.face_for)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="frvideo-soak-") as tmpdir:
        tmp = Path(tmpdir)
        env = dict(os.environ, FRVIDEO_HOME=str(detector_home(tmp)), FRVIDEO_OFFLINE="1",
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        target = tmp / "soak.mp4"
        cmd = [sys.executable, "-m", "frvideo", "-", str(target), "--model", args.model, "--detector",
               args.detector, "--preset", "ultrafast", "--crf", "30", "-q"]
        print("soak:", " ".join(cmd), f"({total} frames, {w}x{h} @ {args.fps} fps)", flush=True)
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
        sent = [0]
        rows: list[dict] = []
        done = threading.Event()
        stdin_closed = threading.Event()  # the whole stream is sent: samples after it show the exit, not the run
        start = time.time()
        csv_path = args.out / "soak.csv"

        def sample() -> None:
            with open(csv_path, "w", newline="") as f:
                out = csv.DictWriter(f, ["wall_s", "frames_sent", "video_s", "rss", "fds", "threads"])
                out.writeheader()
                while not done.wait(args.sample_s):
                    try:
                        rss, fds, threads = proc_figures(proc.pid)
                    except (OSError, ValueError):
                        return
                    if rss == 0 or stdin_closed.is_set():  # exiting (a zombie has no memory): the run is over
                        return
                    row = {"wall_s": round(time.time() - start, 1), "frames_sent": sent[0],
                           "video_s": sent[0] / args.fps, "rss": rss, "fds": fds, "threads": threads}
                    rows.append(row)
                    out.writerow(row)
                    f.flush()
                    if len(rows) % 60 == 0:
                        print(f"soak: {row['wall_s']:.0f} s, {sent[0]}/{total} frames, "
                              f"rss {rss / 2**20:.1f} MiB, fds {fds}, threads {threads}", flush=True)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            proc.stdin.write(stream.header())
            for i in range(total):
                proc.stdin.write(stream.frame_bytes(i))
                sent[0] = i + 1
            stdin_closed.set()
            proc.stdin.close()
        except BrokenPipeError:
            pass
        err = proc.stderr.read().decode(errors="replace")
        rc = proc.wait()
        wall = time.time() - start
        done.set()
        sampler.join()
        if rc != 0:
            print(f"soak: frvideo exited {rc}: {err.strip()}", file=sys.stderr)
            return 1
        import av
        with av.open(str(target)) as c:
            frames_out = sum(1 for pkt in c.demux(video=0) if pkt.size)
    if not rows:
        print("soak: no samples taken", file=sys.stderr)
        return 1
    minute = next((r for r in rows if r["video_s"] >= 60), rows[0])
    after = [r for r in rows if r["wall_s"] >= minute["wall_s"]]
    end = rows[-1]
    peak = max(r["rss"] for r in after)
    low = min(r["rss"] for r in after)
    figures = {
        "command": " ".join(cmd[2:]), "frames_sent": total, "frames_out": frames_out,
        "video_minutes": total / args.fps / 60, "size": f"{w}x{h}", "fps": args.fps, "wall_s": round(wall, 1),
        "samples": len(rows), "rss_1min_mib": round(minute["rss"] / 2 ** 20, 1),
        "rss_end_mib": round(end["rss"] / 2 ** 20, 1), "rss_peak_after_1min_mib": round(peak / 2 ** 20, 1),
        "rss_low_after_1min_mib": round(low / 2 ** 20, 1), "rss_peak_mib": round(max(r["rss"] for r in rows) / 2**20, 1),
        "fds_start": rows[0]["fds"], "fds_1min": minute["fds"], "fds_end": end["fds"],
        "fds_max": max(r["fds"] for r in rows),
        "threads_start": rows[0]["threads"], "threads_1min": minute["threads"], "threads_end": end["threads"],
        "threads_max": max(r["threads"] for r in rows),
        "stderr": err.strip(),
    }
    figures["rss_within_10pct"] = bool(peak <= minute["rss"] * (1 + TOLERANCE)
                                       and low >= minute["rss"] * (1 - TOLERANCE))
    figures["fds_flat"] = end["fds"] <= minute["fds"]
    figures["threads_flat"] = end["threads"] <= minute["threads"]
    figures["frames_all_out"] = frames_out == total
    (args.out / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    draw_plot(rows, args.out / "soak.png", minute["rss"])
    print(json.dumps(figures, indent=2))
    ok = figures["rss_within_10pct"] and figures["fds_flat"] and figures["threads_flat"] and figures["frames_all_out"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
