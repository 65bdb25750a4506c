"""Decoding: frames keep their pts/time base and colour tags untouched.

``open_reader`` accepts a file path, ``-`` (a y4m stream on stdin) or a URL
that FFmpeg can open. Frames are yielded as ``av.VideoFrame`` so a frame the
pipeline does not touch can be encoded from exactly the decoded planes.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional

import av

from ..errors import InputError, UsageError
from .masters import FIELD_TT, FIELD_UNKNOWN, read_timecode

STDIO = "-"


@dataclass
class VideoInfo:
    width: int
    height: int
    pix_fmt: str
    codec: str
    time_base: Fraction
    average_rate: Optional[Fraction]
    frames: int  # 0 when the container does not say
    duration_s: Optional[float]
    color_range: int
    colorspace: int
    color_primaries: int
    color_trc: int
    rotation: int  # degrees, from the display matrix; 0 when absent
    bit_depth: int
    sample_aspect_ratio: Optional[Fraction]
    copy_streams: int  # audio/subtitle/data streams in the input
    field_order: int = 0  # AVFieldOrder: 0 unknown, 1 progressive, 2 tt, 3 bb, 4 tb, 5 bt (io/masters.py)
    timecode: Optional[str] = None  # start timecode (MOV tmcd track, MKV TIMECODE tag), e.g. 01:00:00:00


def is_url(source: str) -> bool:
    return "://" in source and not os.path.exists(source)


# Demuxers of raw frames: a stream of these that stops inside a frame loses it silently
# (FFmpeg reports end of file), so the bytes left over are counted instead.
RAW_FORMATS = {"yuv4mpegpipe", "rawvideo"}


class _CountingReader:
    """A read-only, unseekable file for FFmpeg over a pipe or FIFO that counts the bytes it
    handed out, so a stream cut mid-frame can be told from one that ended on a frame."""

    def __init__(self, raw):
        self.raw = raw
        self.count = 0
        self.eof = False
        self.interrupted: Optional[BaseException] = None

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(n)
            self.count += len(data)
            if not data:
                self.eof = True
            return data
        except BaseException as exc:
            # called from FFmpeg (C): a signal's exception raised here (the main thread blocked on an
            # idle pipe while opening) would be swallowed there; keep it and re-raise it in Python
            self.interrupted = exc
            return b""

    def close(self) -> None:
        self.raw.close()


def check_input_source(source: str) -> None:
    """Fail before any work when the input cannot be read at all (one line, InputError/UsageError)."""
    if source == STDIO:
        if sys.stdin is None or not _fd_open(0):
            raise InputError("stdin is closed; pipe a y4m stream into frvideo or give an input file")
        if os.isatty(0):
            raise UsageError("stdin is a terminal; pipe a y4m stream into it "
                             "(ffmpeg -i IN -f yuv4mpegpipe - | frvideo - OUT) or give an input file")
        return
    if is_url(source):
        return
    if not source.strip():
        raise InputError("the input name is empty")
    path = Path(source)
    if not path.exists():
        raise InputError(f"input not found: {source}")
    if path.is_dir():
        raise InputError(f"input is a directory, not a video: {source}")
    try:
        with open(path, "rb") if path.is_file() else contextlib.nullcontext():
            pass
    except OSError as exc:
        raise InputError(f"input is not readable ({exc.strerror or exc}): {source}") from None
    if not os.access(path, os.R_OK):
        raise InputError(f"input is not readable (permission denied): {source}")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"input is empty: {source}")


def probe_input(source: str) -> Optional[tuple[str, str]]:
    """(codec, pixel format) of a regular input file's first video stream, read from its header
    only (no frame is decoded); None for stdin, pipes and URLs. InputError if it is no video."""
    if source == STDIO or is_url(source) or not Path(source).is_file():
        return None
    try:
        with av.open(source, mode="r") as c:
            if not c.streams.video:
                raise InputError(f"{source} has no video stream")
            cc = c.streams.video[0].codec_context
            return cc.name, (cc.format.name if cc.format is not None else "yuv420p")
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot open {source} as a video ({exc.strerror or type(exc).__name__})") from None


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _bit_depth(pix_fmt: str) -> int:
    try:
        return max(c.bits for c in av.VideoFormat(pix_fmt).components)
    except Exception:
        return 8


class VideoReader:
    """Iterates decoded video frames of the first video stream."""

    def __init__(self, source: str, allow_damaged: bool = False):
        self.source = source
        self.allow_damaged = allow_damaged
        self.counter: Optional[_CountingReader] = None  # pipes and FIFOs: bytes read so far
        self.container = self._open()
        if not self.container.streams.video:
            self.container.close()
            raise InputError(f"{_name(source)} has no video stream")
        self._setup_stream()
        self._first = self._decode_first()
        self.info = self._make_info()

    def _setup_stream(self) -> None:
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame threading: decode runs beside the model
        from . import codec_threads
        if codec_threads():
            self.stream.codec_context.thread_count = codec_threads()

    def seek(self, pts: int, frame_index: int) -> None:
        """Decode from the keyframe at or before ``pts`` (``frame_index`` frames into the stream)
        instead of from the start (``frvideo batch`` runs long files in segments). Where the
        container cannot seek there (the first frame after the seek is later than ``pts``),
        decoding starts again from the first frame, so no frame is lost either way."""
        if self._first is None:
            raise RuntimeError("seek before iterating")
        first = None
        try:
            self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
            self._frames = self._decode(frame_index)
            first = next(self._frames, None)
        except (av.error.FFmpegError, InputError):
            first = None
        if first is None or first.pts is None or first.pts > pts:
            self.container.close()
            self.container = self._open()
            self._setup_stream()
            first = self._decode_first()
        self._first = first

    def _decode_first(self):
        self._frames = self._decode()
        try:
            return next(self._frames)
        except StopIteration:
            self.container.close()
            raise InputError(f"{_name(self.source)}: the video stream has no decodable frames") from None

    def _open(self):
        if self.source == STDIO or (not is_url(self.source) and Path(self.source).exists()
                                    and not Path(self.source).is_file() and not Path(self.source).is_dir()):
            check_input_source(self.source)
            raw = sys.stdin.buffer if self.source == STDIO else open(self.source, "rb")
            self.counter = _CountingReader(raw)
            try:
                container = av.open(self.counter, mode="r", format="yuv4mpegpipe" if self.source == STDIO else None)
            except av.error.FFmpegError as exc:
                if self.counter.interrupted is not None:
                    raise self.counter.interrupted from None
                if self.source == STDIO:
                    raise InputError(f"stdin is not a y4m stream ({exc.strerror}); "
                                     f"pipe one with: ffmpeg -i IN -f yuv4mpegpipe -") from None
                raise InputError(f"cannot open {self.source} as a video ({exc.strerror or type(exc).__name__})") \
                    from None
            if self.counter.interrupted is not None:
                container.close()
                raise self.counter.interrupted
            return container
        return _open_input(self.source)

    def _leftover_bytes(self, end_of_last_frame: Optional[int]) -> int:
        """Bytes after the last whole frame of a raw stream (a frame cut short), 0 if none."""
        if end_of_last_frame is None or self.container.format.name not in RAW_FORMATS:
            return 0
        if self.counter is not None:
            if not self.counter.eof:
                return 0
            total = self.counter.count
        else:
            try:
                total = os.path.getsize(self.source)
            except OSError:
                return 0
        return max(0, total - end_of_last_frame)

    def _decode(self, start_index: int = 0) -> Iterator[av.VideoFrame]:
        index = start_index  # frames before the point decoding starts from (see seek)
        damage = None
        frame_end: Optional[int] = None  # byte offset after the last whole packet (raw streams)
        try:
            for packet in self.container.demux(self.stream):
                if packet.size and packet.pos is not None and packet.pos >= 0:
                    frame_end = packet.pos + packet.size
                for frame in packet.decode():
                    if frame.pts is None:  # raw/y4m streams: frame index in 1/rate units
                        frame.pts = index
                    index += 1
                    yield frame
        except av.error.FFmpegError as exc:
            if index == start_index:
                raise InputError(f"{_name(self.source)} is not a readable video ({exc.strerror or exc})") from None
            damage = f"decoding failed after frame {index} ({exc.strerror or exc})"
        failed = self.counter.interrupted if self.counter is not None else None
        if failed is not None:  # the pipe itself failed (or a signal came while opening)
            if isinstance(failed, OSError):
                raise InputError(f"reading {_name(self.source)} failed after frame {index} "
                                 f"({failed.strerror or failed})")
            raise failed
        declared = self.stream.frames or 0
        leftover = self._leftover_bytes(frame_end) if damage is None else 0
        if leftover:
            damage = f"the stream ends inside frame {index + 1} ({leftover} bytes of a cut frame)"
        if damage is None and declared and index < declared:
            damage = f"only {index} of its {declared} frames could be decoded (truncated?)"
        if damage is not None:
            if not self.allow_damaged:
                raise InputError(f"{_name(self.source)}: {damage}; repair it, or pass --ignore-damage "
                                 f"to restore the readable part")
            print(f"frvideo: warning: {_name(self.source)}: {damage}; keeping the readable part", file=sys.stderr)

    def _make_info(self) -> VideoInfo:
        cc = self.stream.codec_context
        f = self._first
        return VideoInfo(
            width=f.width, height=f.height, pix_fmt=f.format.name, codec=cc.name,
            time_base=self.stream.time_base or Fraction(1, 25),
            average_rate=self.stream.average_rate or self.stream.guessed_rate,
            frames=self.stream.frames or 0,
            duration_s=(float(self.container.duration) / av.time_base) if self.container.duration else None,
            color_range=f.color_range, colorspace=f.colorspace,
            color_primaries=f.color_primaries, color_trc=f.color_trc,
            rotation=int(round(f.rotation or 0)) % 360 if hasattr(f, "rotation") else 0,
            bit_depth=_bit_depth(f.format.name),
            sample_aspect_ratio=self.stream.sample_aspect_ratio,
            copy_streams=sum(1 for s in self.container.streams if s.type != "video"),
            field_order=_field_order(cc.field_order, f),
            timecode=read_timecode(self.container, self.stream),
        )

    def __iter__(self) -> Iterator[av.VideoFrame]:
        first, self._first = self._first, None
        if first is None:
            raise RuntimeError("a VideoReader can be iterated once")
        yield first
        yield from self._frames

    def close(self) -> None:
        self.container.close()
        if self.counter is not None and self.source != STDIO:
            with contextlib.suppress(OSError):
                self.counter.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _field_order(stream_order: int, first: av.VideoFrame) -> int:
    """The stream's field order; a stream that does not say but whose frames are flagged interlaced
    is taken as top field first (PyAV does not show the frames' own top-field-first flag)."""
    order = int(stream_order or 0)
    if order == FIELD_UNKNOWN and getattr(first, "interlaced_frame", False):
        return FIELD_TT
    return order


def _name(source: str) -> str:
    return "stdin" if source == STDIO else source


def _open_input(source: str):
    """A regular file or a URL (stdin and FIFOs go through a _CountingReader, see VideoReader._open)."""
    if not is_url(source):
        check_input_source(source)
    try:
        return av.open(source, mode="r")
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot open {source} as a video ({exc.strerror or type(exc).__name__})") from None


def open_reader(source: str, allow_damaged: bool = False) -> VideoReader:
    return VideoReader(source, allow_damaged)
