"""Short clips cut from the real media of ../shared for the batch tests and bench/batch.py:
the first frames of a real video, scaled down, re-encoded with keyframes every ``gop``
frames (so a clip of a second or two has several segments), audio copied for as long."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av


def cut_clip(source: Path, target: Path, frames: int = 40, width: int = 192, gop: int = 8,
             codec: str = "libx264", audio: bool = True) -> Path:
    src = av.open(str(source))
    vin = src.streams.video[0]
    rate = vin.average_rate or Fraction(25)
    out = av.open(str(target), "w")
    v = out.add_stream(codec, rate=rate)
    height = round(vin.codec_context.height * width / vin.codec_context.width / 2) * 2
    v.width, v.height, v.pix_fmt = width, height, "yuv420p"
    v.time_base = Fraction(1, 12800)
    v.codec_context.time_base = v.time_base
    if codec == "libx264":
        v.codec_context.options = {"preset": "ultrafast", "crf": "18", "g": str(gop), "keyint_min": str(gop),
                                   "sc_threshold": "0"}
    else:
        v.codec_context.gop_size = gop
    a = out.add_stream_from_template(src.streams.audio[0]) if audio and src.streams.audio else None
    step = int(round(1 / (rate * v.time_base)))
    n = 0
    for frame in src.decode(vin):
        if n == frames:
            break
        f = frame.reformat(width=width, height=height, format="yuv420p")
        f.pts, f.time_base = n * step, v.time_base
        f.pict_type = av.video.frame.PictureType.NONE  # keyframes every gop frames, not where the source had them
        for pkt in v.encode(f):
            out.mux(pkt)
        n += 1
    for pkt in v.encode(None):
        out.mux(pkt)
    if a is not None:
        end = n / float(rate)
        src.seek(0)
        for pkt in src.demux(src.streams.audio[0]):
            if pkt.pts is None or not pkt.size:
                continue
            if float(pkt.pts * pkt.time_base) >= end:
                break
            pkt.stream = a
            out.mux(pkt)
    out.close()
    src.close()
    return target
