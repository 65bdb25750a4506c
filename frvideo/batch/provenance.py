"""What made an output: hashes, the ``NAME.EXT.frvideo.json`` sidecar, ``--framemd5``, thumbnails.

The sidecar names the input (path, size, sha256), the output (sha256), frvideo's version,
the model and detector with the sha256 of their weight files, every option, the frame and
face counts, the time taken and, for reference-based models (ENTED), the keyframe each
track was restored with. ``--framemd5`` writes ``NAME.EXT.framemd5``: one md5 per decoded
output frame in FFmpeg's framemd5 layout (the same hashes ``ffmpeg -i OUT -f framemd5 -``
prints), so a copy can be checked frame by frame years later.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import av
import numpy as np

from .. import __version__


def sha256_file(path: Path) -> str:
    from ..weights import sha256_file as digest
    return digest(path)


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def model_identity(settings: dict) -> dict:
    """The model and detector a job's settings resolve to, with their weight files' sha256
    (resolved as a run would: --weights, $FRVIDEO_HOME/weights/, the shipped file)."""
    from ..models import all_model_configs, load_model_config
    from ..restore import auto_model_name
    from ..weights import _verified_sha256, find_local, resolve

    def weights_of(card, explicit) -> dict:
        path = resolve(card, explicit)
        return {"name": card.name, "weights": str(path) if path else None,
                "weights_sha256": _verified_sha256(Path(path)) if path else None}

    model = settings["model"] if settings["model"] != "auto" else auto_model_name()
    if settings["detector"] == "auto":
        cards = sorted(all_model_configs("detector"), key=lambda c: -c.priority)
        present = [c for c in cards if find_local(c) is not None]
        detector_card = present[0] if present else load_model_config(cards[0].name)
    else:
        detector_card = load_model_config(settings["detector"])
    return {"model": weights_of(load_model_config(model), settings.get("weights")),
            "detector": weights_of(detector_card, settings.get("detector_weights"))}


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + ".frvideo.json")


def framemd5_path(output: Path) -> Path:
    return output.with_name(output.name + ".framemd5")


def write_sidecar(output: Path, record: dict) -> Path:
    path = sidecar_path(output)
    write_atomically(path, json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def provenance_record(*, source: Path, source_size: int, source_sha256: str, output: Path, output_sha256: str,
                      models: dict, settings: dict, batch_options: dict, segments: list, started: float,
                      finished: float, seconds: float, engine: str, framemd5: Optional[Path]) -> dict:
    frames = sum(s["frames"] or 0 for s in segments)
    return {
        "frvideo_version": __version__,
        "input": {"path": str(source), "size": source_size, "sha256": source_sha256},
        "output": {"path": str(output), "size": output.stat().st_size, "sha256": output_sha256},
        "model": models["model"],
        "detector": models["detector"],
        "options": settings,
        "batch_options": batch_options,
        "frames": {"output": frames, "planned": sum(s["planned_frames"] or 0 for s in segments),
                   "with_faces": sum(s["frames_with_faces"] or 0 for s in segments)},
        "faces": sum(s["faces"] or 0 for s in segments),
        # per segment: each restores its own tracks (their ids start again at 0)
        "tracks": sum(s["tracks"] or 0 for s in segments),
        "references": [line for s in segments for line in json.loads(s["refs"] or "[]")],
        "segments": [{"index": s["idx"], "start_pts": s["start_pts"], "end_pts": s["end_pts"],
                      "frames": s["frames"], "faces": s["faces"], "seconds": s["seconds"], "worker": s["worker"],
                      "device": s["device"]}
                     for s in segments],
        "engine": engine,
        "started": _iso(started), "finished": _iso(finished),
        "seconds": round(seconds, 3),
        "framemd5": str(framemd5) if framemd5 else None,
    }


def _iso(t: float) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


# -- framemd5 -------------------------------------------------------------------------

def frame_md5s(path: Path) -> tuple[list[tuple[int, int, int, int, str]], av.VideoStream]:
    """(dts, pts, duration, size, md5) of every decoded frame of the first video stream: the
    md5 of the frame's samples packed without padding, as FFmpeg's rawvideo encoder lays them
    out (what its framemd5 muxer hashes)."""
    rows = []
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        encoder = None
        for frame in c.decode(stream):
            if encoder is None:
                encoder = av.CodecContext.create("rawvideo", "w")
                encoder.width, encoder.height, encoder.pix_fmt = frame.width, frame.height, frame.format.name
                encoder.time_base = stream.time_base
                encoder.open()
            frame.pict_type = av.video.frame.PictureType.NONE
            data = b"".join(bytes(p) for p in encoder.encode(frame))
            duration = frame.duration if getattr(frame, "duration", None) else 0
            rows.append((frame.pts, frame.pts, duration or 0, len(data), hashlib.md5(data).hexdigest()))
        time_base = stream.time_base
    return rows, time_base


def write_framemd5(output: Path) -> Path:
    rows, time_base = frame_md5s(output)
    lines = ["#format: frame checksums", "#version: 2", "#hash: MD5", "#tb 0: " + f"{time_base.numerator}/"
             f"{time_base.denominator}", "#stream#, dts,        pts, duration,     size, hash"]
    lines += [f"0, {dts:10d}, {pts:10d}, {dur:8d}, {size:8d}, {md5}" for dts, pts, dur, size, md5 in rows]
    path = framemd5_path(output)
    write_atomically(path, "\n".join(lines) + "\n")
    return path


# -- thumbnails -----------------------------------------------------------------------

def _frame_at(path: Path, seconds: float, rgb: bool = True) -> Optional[np.ndarray]:
    """The decoded frame of ``path`` shown at ``seconds`` (RGB), or None."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        with contextlib.suppress(av.error.FFmpegError):
            c.seek(int(seconds / float(stream.time_base)), stream=stream, backward=True)
        best = None
        for frame in c.decode(stream):
            if frame.time is None:
                continue
            if frame.time >= seconds - 0.5 / rate:
                best = frame
                break
        return best.to_ndarray(format="rgb24") if best is not None else None


def _first_time(path: Path) -> float:
    with av.open(str(path)) as c:
        for frame in c.decode(c.streams.video[0]):
            if frame.time is not None:
                return float(frame.time)
    return 0.0


def face_thumbnail(source: Path, output: Path, largest: dict, time_base, target: Path, size: int = 160) -> bool:
    """Before | after of the largest restored face, one PNG (``target``). False if not found."""
    import cv2

    seconds = float(largest["pts"] * time_base)
    before = _frame_at(source, seconds)
    # a container may start all streams later than the source did (Matroska shifts them by the
    # AAC priming delay): the same frame is at the same offset from the first one
    after = _frame_at(output, seconds + _first_time(output) - _first_time(source))
    if before is None or after is None or before.shape != after.shape:
        return False
    x1, y1, x2, y2 = largest["box"]
    cx, cy, half = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, y2 - y1) * 0.7
    h, w = before.shape[:2]
    a, b = int(max(0, cx - half)), int(min(w, cx + half))
    c, d = int(max(0, cy - half)), int(min(h, cy + half))
    if b - a < 2 or d - c < 2:
        return False
    tiles = [cv2.resize(img[c:d, a:b], (size, size), interpolation=cv2.INTER_AREA) for img in (before, after)]
    gap = np.full((size, 4, 3), 255, np.uint8)
    ok, png = cv2.imencode(".png", cv2.cvtColor(np.concatenate([tiles[0], gap, tiles[1]], 1), cv2.COLOR_RGB2BGR))
    if not ok:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(png.tobytes())
    os.replace(tmp, target)
    return True
