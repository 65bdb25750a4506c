"""Decoding: frames keep their pts/time base and colour tags untouched.

``open_reader`` accepts a file path, ``-`` (a y4m stream on stdin) or a URL
that FFmpeg can open. Frames are yielded as ``av.VideoFrame`` so a frame the
pipeline does not touch can be encoded from exactly the decoded planes.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional

import av

from ..errors import InputError

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


def is_url(source: str) -> bool:
    return "://" in source and not os.path.exists(source)


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
        self.container = _open_input(source)
        if not self.container.streams.video:
            self.container.close()
            raise InputError(f"{_name(source)} has no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"  # frame threading: decode runs beside the model
        self._first = self._decode_first()
        self.info = self._make_info()

    def _decode_first(self):
        self._frames = self._decode()
        try:
            return next(self._frames)
        except StopIteration:
            self.container.close()
            raise InputError(f"{_name(self.source)}: the video stream has no decodable frames") from None

    def _decode(self) -> Iterator[av.VideoFrame]:
        index = 0
        damage = None
        try:
            for packet in self.container.demux(self.stream):
                for frame in packet.decode():
                    if frame.pts is None:  # raw/y4m streams: frame index in 1/rate units
                        frame.pts = index
                    index += 1
                    yield frame
        except av.error.FFmpegError as exc:
            if index == 0:
                raise InputError(f"{_name(self.source)} is not a readable video ({exc.strerror or exc})") from None
            damage = f"decoding failed after frame {index} ({exc.strerror or exc})"
        declared = self.stream.frames or 0
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
        )

    def __iter__(self) -> Iterator[av.VideoFrame]:
        first, self._first = self._first, None
        if first is None:
            raise RuntimeError("a VideoReader can be iterated once")
        yield first
        yield from self._frames

    def close(self) -> None:
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _name(source: str) -> str:
    return "stdin" if source == STDIO else source


def _open_input(source: str):
    if source == STDIO:
        try:
            return av.open(sys.stdin.buffer, mode="r", format="yuv4mpegpipe")
        except av.error.FFmpegError as exc:
            raise InputError(f"stdin is not a y4m stream ({exc.strerror}); "
                             f"pipe one with: ffmpeg -i IN -f yuv4mpegpipe -") from None
    if not is_url(source):
        path = Path(source)
        if not path.exists():
            raise InputError(f"input not found: {source}")
        if path.is_dir():
            raise InputError(f"input is a directory, not a video: {source}")
        if not os.access(path, os.R_OK):
            raise InputError(f"input is not readable (permission denied): {source}")
        if path.stat().st_size == 0:
            raise InputError(f"input is empty: {source}")
    try:
        return av.open(source, mode="r")
    except av.error.FFmpegError as exc:
        raise InputError(f"cannot open {source} as a video ({exc.strerror or type(exc).__name__})") from None


def open_reader(source: str, allow_damaged: bool = False) -> VideoReader:
    return VideoReader(source, allow_damaged)
