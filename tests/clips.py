"""Small test clips written with PyAV: exact frame rates, VFR, 10-bit, odd
sizes, rotation, audio and subtitles - each property the I/O must keep."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def pattern(i: int, w: int, h: int) -> np.ndarray:
    """A moving gradient with a square: changes every frame, compresses well."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1) + i * 7) % 256, (y * 255 // max(h - 1, 1)) % 256,
                    np.full_like(x, (i * 13) % 256)], axis=2).astype(np.uint8)
    s = max(4, min(w, h) // 5)
    x0 = (i * 5) % max(w - s, 1)
    img[h // 3:h // 3 + s, x0:x0 + s] = 255
    return img


def make_clip(path: Path, n: int = 12, size=(96, 64), pts=None, time_base=Fraction(1, 90000),
              rate=Fraction(25), pix_fmt="yuv420p", codec="libx264", audio: bool = False,
              subtitles: bool = False, rotation: int = 0, frames=None, faststart: bool = False) -> Path:
    """``pts`` (in time_base units) gives VFR; default is a constant ``rate``."""
    w, h = size
    if pts is None:
        step = 1 / (rate * time_base)
        pts = [int(round(i * step)) for i in range(n)]
    out = av.open(str(path), "w", options={"movflags": "faststart"} if faststart else None)
    v = out.add_stream(codec, rate=rate)
    v.width, v.height, v.pix_fmt = w, h, pix_fmt
    v.time_base = time_base
    v.codec_context.time_base = time_base
    if codec == "libx264":
        v.codec_context.options = {"preset": "ultrafast", "crf": "16"}
    if rotation:
        v.set_display_rotation(float(rotation))
    a = s = None
    if audio:
        a = out.add_stream("aac", rate=48000)
        a.layout = "mono"
    subs = None
    if subtitles:
        # PyAV cannot encode subtitles; demux a tiny .srt and copy its stream instead
        srt = path.with_suffix(".srt")
        srt.write_text("1\n00:00:00,100 --> 00:00:00,400\nhello\n\n")
        subs = av.open(str(srt))
        s = out.add_stream_from_template(subs.streams[0])
    for i in range(n):
        img = frames[i] if frames is not None else pattern(i, w, h)
        f = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
        f.pts, f.time_base = pts[i], time_base
        for pkt in v.encode(f):
            out.mux(pkt)
    for pkt in v.encode(None):
        out.mux(pkt)
    if a is not None:
        duration = float(pts[-1] * time_base) + 0.1
        samples = int(48000 * duration)
        t = np.arange(samples) / 48000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
        for start in range(0, samples, 1024):
            af = av.AudioFrame.from_ndarray(tone[:, start:start + 1024], format="fltp", layout="mono")
            af.sample_rate, af.pts = 48000, start
            for pkt in a.encode(af):
                out.mux(pkt)
        for pkt in a.encode(None):
            out.mux(pkt)
    if subs is not None:
        for pkt in subs.demux():
            if pkt.size:
                pkt.stream = s
                out.mux(pkt)
        subs.close()
    out.close()
    return path


def video_summary(path: Path) -> dict:
    """Frame times, pixel format, size, rotation and the other streams' packets."""
    c = av.open(str(path))
    v = c.streams.video[0]
    times, first = [], None
    for f in c.decode(v):
        times.append(float(f.pts * f.time_base))
        first = first or f
    info = {"times": times, "pix_fmt": first.format.name, "size": (first.width, first.height),
            "rotation": int(round(first.rotation or 0)) % 360, "codec": v.codec_context.name}
    c.close()
    c = av.open(str(path))
    other = {}
    for s in c.streams:
        if s.type != "video":
            other[s.index] = (s.type, s.codec_context.name, [])
    for pkt in c.demux(*[s for s in c.streams if s.type != "video"]) if other else ():
        if pkt.size:
            other[pkt.stream.index][2].append((float(pkt.pts * pkt.time_base) if pkt.pts is not None else None,
                                               bytes(pkt)))
    c.close()
    info["other"] = other
    return info


def decoded_planes(path: Path) -> list[list[np.ndarray]]:
    c = av.open(str(path))
    out = []
    for f in c.decode(video=0):
        out.append([np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width * (2 if f.format.components[0].bits > 8 else 1)].copy()
                    for p in f.planes])
    c.close()
    return out
