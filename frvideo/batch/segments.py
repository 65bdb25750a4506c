"""Segments: a long file is cut at keyframes, each part restored on its own, then joined.

The plan is made from the video packets alone (no decoding): frame i is the i-th
smallest pts; a segment starts at a keyframe at least ``--segment-seconds`` after the
previous start. Each segment runs through the same pipeline (pipeline.run_file with a
FrameSpan): decoding starts at the keyframe before its warm-up, the ``--warmup-frames``
frames before it and a few frames after it (the pipeline's look-ahead) go through the
pipeline with their output dropped. Every segment is run that way whether the batch ran
straight through or resumed after a kill, so the output does not depend on where (or
whether) a run was cut: a resumed lossless output is bit for bit the uninterrupted one.

The finished segments are joined by copying their packets (no re-encode) into the
output, with the source's other streams (audio, subtitles) copied beside them.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Optional

import av

from ..errors import InputError, OutputError

WHOLE_FILE = {"start_pts": None, "end_pts": None, "warm_pts": None, "seek_pts": 0, "seek_frame": 0, "tail": 0}


def plan_segments(source: str, segment_seconds: float, warmup: int, tail: int) -> list[dict]:
    """The segments of ``source``: dicts of FrameSpan fields plus ``planned_frames``. One
    segment (the whole file) where the container has no usable timestamps or keyframes."""
    from ..io.reader import RAW_FORMATS

    try:
        container = av.open(source)
    except (av.error.FFmpegError, OSError) as exc:
        raise InputError(f"cannot open {source} as a video ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        if not container.streams.video:
            raise InputError(f"{source} has no video stream")
        stream = container.streams.video[0]
        whole = dict(WHOLE_FILE, planned_frames=stream.frames or 0)
        if container.format.name in RAW_FORMATS or segment_seconds <= 0:
            return [whole]
        pts: list[int] = []
        keys: list[bool] = []
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue
                if packet.pts is None:
                    return [whole]
                pts.append(packet.pts)
                keys.append(packet.is_keyframe)
        except av.error.FFmpegError as exc:
            if not pts:
                raise InputError(f"{source} is not a readable video ({exc.strerror or exc})") from None
            # a damaged end: the reader reports it when the last segment gets there
        time_base = stream.time_base
    finally:
        container.close()
    n = len(pts)
    if not n or len(set(pts)) != n:
        return [dict(whole, planned_frames=n)]
    order = sorted(range(n), key=pts.__getitem__)
    sorted_pts = [pts[i] for i in order]
    key_ranks = sorted(rank for rank, i in enumerate(order) if keys[i])
    if not key_ranks or key_ranks[0] != 0 or time_base is None:
        return [dict(whole, planned_frames=n)]
    step = segment_seconds / float(time_base)
    starts = [0]
    for rank in key_ranks[1:]:
        if sorted_pts[rank] - sorted_pts[starts[-1]] >= step:
            starts.append(rank)
    spans = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else n
        warm = max(0, start - warmup)
        seek = max(r for r in key_ranks if r <= warm)
        spans.append({
            "start_pts": sorted_pts[start] if k else None,
            "end_pts": sorted_pts[end] if end < n else None,
            "warm_pts": sorted_pts[warm] if k else None,
            "seek_pts": sorted_pts[seek], "seek_frame": seek,
            "tail": tail if end < n else 0,
            "planned_frames": end - start,
        })
    return spans


# -- one segment's run (in this process, or in a Ray worker) -----------------------------

def settings_namespace(settings: dict, source: str, target: str) -> argparse.Namespace:
    """The restore options of ``frvideo IN OUT`` rebuilt from a job's settings."""
    values = dict(settings)
    if values.get("tracks") is not None:
        values["tracks"] = set(values["tracks"])
    values.update(input=source, output=target, config=None, faces=None)
    return argparse.Namespace(**values)


class SegmentFaces:
    """on_faces callback: counts the kept frames, their faces and tracks, and keeps the
    largest restored face (pts and box) for the report's thumbnail."""

    def __init__(self, span):
        self.span = span
        self.frames = self.faces = self.frames_with_faces = 0
        self.tracks: set[int] = set()
        self.largest: Optional[dict] = None
        self.first_pts = self.last_pts = None

    def __call__(self, index: int, faces, chosen) -> None:
        pts = self.span.fed_pts[index]
        s = self.span
        if (s.start_pts is not None and pts < s.start_pts) or (s.end_pts is not None and pts >= s.end_pts):
            return  # warm-up or look-ahead frame: its output is dropped
        self.frames += 1
        self.first_pts = pts if self.first_pts is None else self.first_pts
        self.last_pts = pts
        if chosen:
            self.frames_with_faces += 1
            self.faces += len(chosen)
        for f in chosen:
            self.tracks.add(int(f.track_id))
            x1, y1, x2, y2 = (float(v) for v in f.box)
            area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            if self.largest is None or area > self.largest["area"]:
                self.largest = {"pts": int(pts), "box": [x1, y1, x2, y2], "area": area, "track": int(f.track_id)}


def run_segment(task: dict, loaded: dict) -> dict:
    """Restore one segment of ``task['input']`` into ``task['target']`` (published atomically by
    the writer). ``loaded``: the caller's cache of detectors and restorers."""
    from ..cli import prepare_restore
    from ..pipeline import FrameSpan, run_file
    from ..restore import precision_name

    start = time.perf_counter()
    args = settings_namespace(task["settings"], task["input"], task["target"])
    setup = prepare_restore(args, {}, loaded)
    setup.options.quiet = True
    span = FrameSpan(**{k: task["span"][k] for k in WHOLE_FILE})
    faces = SegmentFaces(span)
    stats = run_file(task["input"], task["target"], setup.restorer, setup.detector, setup.options,
                     span=span, on_faces=faces)
    return {"frames": faces.frames, "faces": faces.faces, "frames_with_faces": faces.frames_with_faces,
            "tracks": len(faces.tracks), "largest": faces.largest, "references": list(stats.references),
            "fed_frames": len(span.fed_pts), "first_pts": faces.first_pts, "last_pts": faces.last_pts,
            "seconds": time.perf_counter() - start, "worker": f"{socket.gethostname()}:{os.getpid()}",
            "device": setup.device, "precision": precision_name(setup.dtype), "threads": setup.threads,
            "model": setup.model, "detector": setup.detector.name}


# -- the join ---------------------------------------------------------------------------

@contextlib.contextmanager
def _partial(target: Path):
    """A locked temporary file beside ``target`` (the writer's partial-file scheme, so a kill
    -9 leaves nothing the next run does not remove); yields its path, renamed on success."""
    from ..io.writer import _LIVE_PARTIALS, VideoWriter, remove_stale_partials

    remove_stale_partials(target.parent)
    tmp = target.with_name(f".{target.stem}.partial-{os.getpid()}{target.suffix}")
    fd = VideoWriter._create_locked(tmp)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _LIVE_PARTIALS.discard(tmp)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def join_segments(files: list[Path], source: str, target: Path, rotation: int = 0,
                  timecode: Optional[str] = None, rate=None) -> int:
    """Copy the video packets of ``files`` (in order) into ``target`` with the other streams
    of ``source``; the target appears only complete. ``timecode``: the source's start timecode
    (each segment carries its own run's; the whole file starts at the source's). Returns the
    number of video packets."""
    from ..io.writer import MUXER, _PacketCopier

    ext = target.suffix.lower()
    fmt = {".y4m": "yuv4mpegpipe", ".m4v": "mp4"}.get(ext)
    count = 0
    try:
        with _partial(target) as tmp:
            out = av.open(str(tmp), mode="w", format=fmt)
            copier = None
            try:
                first = av.open(str(files[0]))
                template = first.streams.video[0]
                params = _stream_params(template)
                video = out.add_stream_from_template(template)
                if rotation and ext in {".mp4", ".mov", ".m4v", ".mkv"}:
                    video.set_display_rotation(float(rotation))
                if rate:  # the stream's frame rate (MOV needs it to write a timecode track)
                    with contextlib.suppress(AttributeError, TypeError, ValueError):
                        video.codec_context.framerate = rate
                video.metadata.pop("timecode", None)
                if timecode:  # MOV/MP4: a tmcd track; MKV: a TIMECODE tag (as the writer does)
                    video.metadata["timecode"] = timecode
                first.close()
                with av.open(source) as probe:
                    has_others = any(s.type != "video" for s in probe.streams) and ext in MUXER
                copier = _PacketCopier(source, out, ext) if has_others else None
                last_dts = None
                for path in files:
                    with av.open(str(path)) as seg:
                        stream = seg.streams.video[0]
                        if _stream_params(stream) != params:
                            raise OutputError(f"segment {path.name} was encoded with other settings than the first "
                                              f"({_stream_params(stream)} vs {params}); delete {path.parent} to redo it")
                        for packet in seg.demux(stream):
                            if not packet.size:
                                continue
                            if packet.dts is not None:
                                dts = float(packet.dts * packet.time_base)
                                if last_dts is not None and dts <= last_dts:
                                    raise OutputError(f"segment {path.name} does not follow the one before it "
                                                      f"(decode time {dts:.3f} s after {last_dts:.3f} s)")
                                last_dts = dts
                            packet.stream = video
                            out.mux(packet)
                            count += 1
                            if copier is not None and last_dts is not None:
                                copier.advance_to(last_dts)
                if copier is not None:
                    copier.advance_to(float("inf"))
            finally:
                if copier is not None:
                    copier.close()
                out.close()
    except (av.error.FFmpegError, OSError) as exc:
        raise OutputError(f"joining the segments of {target} failed: {getattr(exc, 'strerror', None) or exc}") \
            from None
    return count


def _stream_params(stream) -> tuple:
    cc = stream.codec_context
    return (cc.name, cc.width, cc.height, cc.format.name if cc.format else None, bytes(cc.extradata or b""))
