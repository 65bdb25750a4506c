"""Encoding: same timestamps, colour tags, rotation and bit depth as the input.

The video is re-encoded (the faces changed); every other stream (audio,
subtitles, data) is copied packet for packet by a second demuxer over the same
input, advanced in step with the video so the muxer can interleave without
buffering whole streams. A file target is written to a temporary file beside
it and renamed only on success, so no half file is ever left.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av

from ..errors import OutputError
from .reader import STDIO, VideoInfo, is_url

# Encoder that follows each input codec ("same kind out as in").
FOLLOW_INPUT = {
    "h264": "libx264", "hevc": "libx265", "prores": "prores_ks", "ffv1": "ffv1",
    "vp9": "libvpx-vp9", "av1": "libsvtav1", "rawvideo": "rawvideo",
}
# Sensible quality defaults per encoder (CRF 18 is visually lossless for x264).
DEFAULT_CRF = {"libx264": 18, "libx265": 20, "libvpx-vp9": 24, "libsvtav1": 28}
DEFAULT_PRESET = {"libx264": "medium", "libx265": "medium", "libsvtav1": "8"}
# Containers whose default encoder is better than "follow the input".
CONTAINER_FALLBACK = {".webm": "libvpx-vp9", ".y4m": "rawvideo", ".mkv": "libx264", ".mp4": "libx264",
                      ".mov": "libx264", ".avi": "libx264"}
KNOWN_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".y4m", ".nut", ".ts"}


@dataclass
class EncodeOptions:
    codec: Optional[str] = None  # None: follow the input codec
    crf: Optional[float] = None
    preset: Optional[str] = None
    pix_fmt: Optional[str] = None  # None: the input's pixel format (bit depth kept)
    extra: dict = field(default_factory=dict)  # raw encoder options


def check_output_target(target: str) -> None:
    """Fail before any work if the output cannot be written."""
    if target == STDIO or is_url(target):
        return
    path = Path(target)
    if path.is_dir():
        raise OutputError(f"output is a directory: {target}")
    if path.suffix.lower() not in KNOWN_EXTENSIONS:
        raise OutputError(f"cannot tell the container from {path.name!r}; "
                          f"use one of {', '.join(sorted(KNOWN_EXTENSIONS))}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder is not writable: {parent}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"output file exists and is not writable: {target}")


def _choose_codec(info: VideoInfo, opts: EncodeOptions, ext: str, supported: set) -> str:
    if opts.codec:
        try:
            av.codec.Codec(opts.codec, "w")
        except Exception:
            raise OutputError(f"unknown video encoder {opts.codec!r} (try libx264, libx265, prores_ks, ffv1)") from None
        return opts.codec
    wanted = FOLLOW_INPUT.get(info.codec)
    if ext == ".y4m":
        return "rawvideo"
    if wanted and wanted in supported:
        return wanted
    return CONTAINER_FALLBACK.get(ext, "libx264")


def _choose_pix_fmt(codec_name: str, info: VideoInfo, opts: EncodeOptions) -> str:
    formats = [f.name for f in (av.codec.Codec(codec_name, "w").video_formats or [])]
    if opts.pix_fmt:
        if formats and opts.pix_fmt not in formats:
            raise OutputError(f"{codec_name} cannot encode pixel format {opts.pix_fmt} "
                              f"(it takes: {', '.join(formats)})")
        return opts.pix_fmt
    if codec_name in ("libx264", "libx265") and (info.width % 2 or info.height % 2) \
            and not info.pix_fmt.startswith(("yuv444", "gbr", "gray")):
        # x264/x265 reject odd sizes in subsampled chroma; 4:4:4 keeps every pixel and the bit depth
        full = "yuv444p10le" if info.bit_depth > 8 else "yuv444p"
        print(f"frvideo: warning: odd frame size {info.width}x{info.height}: {codec_name} needs even sizes "
              f"for {info.pix_fmt}, encoding {full}", file=sys.stderr)
        return full
    if not formats or info.pix_fmt in formats:
        return info.pix_fmt
    # keep the bit depth when the exact format is not available
    depth_matches = [f for f in formats if max(c.bits for c in av.VideoFormat(f).components) == info.bit_depth]
    preferred = [f for f in depth_matches if f.startswith("yuv420p")] or depth_matches
    return preferred[0] if preferred else formats[0]


class _PacketCopier:
    """Copies the non-video streams of the input file packet for packet."""

    def __init__(self, source: str, out: av.container.OutputContainer, ext: str):
        self.container = av.open(source)
        self.map = {}
        supported = out.supported_codecs
        for s in self.container.streams:
            if s.type == "video" and s.index == self.container.streams.video[0].index:
                continue
            name = s.codec_context.name if s.codec_context else None
            if s.type == "video" or name is None or (ext != ".nut" and name not in supported):
                print(f"frvideo: warning: dropping {s.type} stream #{s.index} ({name or 'unknown codec'}): "
                      f"the {ext or 'output'} container cannot hold it", file=sys.stderr)
                continue
            try:
                self.map[s.index] = out.add_stream_from_template(s)
            except (ValueError, av.error.FFmpegError) as exc:
                print(f"frvideo: warning: dropping {s.type} stream #{s.index} ({name}): {exc}", file=sys.stderr)
        self.packets = self.container.demux(*[self.container.streams[i] for i in self.map]) if self.map else iter(())
        self.pending = None
        self.out = out

    def advance_to(self, t: float) -> None:
        """Mux every copied packet up to time t (seconds)."""
        while True:
            pkt = self.pending or next(self.packets, None)
            self.pending = None
            if pkt is None:
                return
            if pkt.dts is None and pkt.size == 0:
                continue  # demuxer flush packet
            ts = pkt.dts if pkt.dts is not None else pkt.pts
            if ts is not None and float(ts * pkt.time_base) > t:
                self.pending = pkt
                return
            pkt.stream = self.map[pkt.stream.index]
            self.out.mux(pkt)

    def close(self) -> None:
        self.container.close()


class VideoWriter:
    def __init__(self, target: str, info: VideoInfo, opts: EncodeOptions, copy_from: Optional[str] = None):
        check_output_target(target)
        self.target = target
        self.info = info
        self.ext = Path(target).suffix.lower() if target != STDIO else ".y4m"
        self.tmp_path: Optional[Path] = None
        self.out = self._open_container()
        try:
            self._setup(opts, copy_from)
        except BaseException:
            self.abort()
            raise

    def _open_container(self):
        try:
            if self.target == STDIO:
                return av.open(sys.stdout.buffer, mode="w", format="yuv4mpegpipe")
            if is_url(self.target):
                return av.open(self.target, mode="w")
            path = Path(self.target)
            self.tmp_path = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
            fmt = {".y4m": "yuv4mpegpipe", ".m4v": "mp4"}.get(self.ext)
            return av.open(str(self.tmp_path), mode="w", format=fmt)
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self._remove_tmp()
            raise OutputError(f"cannot write {self.target}: {exc}") from None

    def _setup(self, opts: EncodeOptions, copy_from: Optional[str]) -> None:
        info = self.info
        codec = _choose_codec(info, opts, self.ext, self.out.supported_codecs)
        self.pix_fmt = _choose_pix_fmt(codec, info, opts)
        # y4m carries no timestamps: frames are numbered at the nominal rate
        self.numbered = self.ext == ".y4m"
        rate = info.average_rate or Fraction(25)
        try:
            stream = self.out.add_stream(codec, rate=rate)
        except (ValueError, av.error.FFmpegError) as exc:
            raise OutputError(f"the {self.ext} container cannot hold {codec} video ({exc})") from None
        cc = stream.codec_context
        cc.width, cc.height, cc.pix_fmt = info.width, info.height, self.pix_fmt
        self.frame_time_base = 1 / rate if self.numbered else info.time_base
        stream.time_base = cc.time_base = self.frame_time_base
        if info.sample_aspect_ratio:
            cc.sample_aspect_ratio = info.sample_aspect_ratio
        cc.color_range, cc.colorspace = info.color_range, info.colorspace
        cc.color_primaries, cc.color_trc = info.color_primaries, info.color_trc
        options = {}
        crf = opts.crf if opts.crf is not None else DEFAULT_CRF.get(codec)
        if crf is not None:
            options["crf"] = str(crf)
            if codec == "libvpx-vp9":
                options["b"] = "0"
        preset = opts.preset or DEFAULT_PRESET.get(codec)
        if preset is not None:
            options["preset"] = str(preset)
        options.update({k: str(v) for k, v in opts.extra.items()})
        cc.options = options
        if info.rotation and self.ext in {".mp4", ".mov", ".m4v", ".mkv"}:
            stream.set_display_rotation(float(info.rotation))
        self.stream = stream
        self.codec = codec
        self.copier = _PacketCopier(copy_from, self.out, self.ext) if copy_from and info.copy_streams else None
        self.count = 0
        self.last_pts: Optional[int] = None

    def write(self, frame: av.VideoFrame) -> None:
        if frame.format.name != self.pix_fmt:
            src = frame
            frame = frame.reformat(format=self.pix_fmt)
            frame.pts, frame.time_base = src.pts, src.time_base
        if self.numbered:
            frame.pts = self.count
            frame.time_base = self.frame_time_base
        else:
            if self.last_pts is not None and frame.pts <= self.last_pts:
                frame.pts = self.last_pts + 1  # encoders need strictly increasing pts
            frame.time_base = self.info.time_base
            self.last_pts = frame.pts
        frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose its own GOP
        self.count += 1
        try:
            for packet in self.stream.encode(frame):
                self.out.mux(packet)
            if self.copier is not None:
                self.copier.advance_to(float(frame.pts * frame.time_base))
        except (av.error.FFmpegError, OSError) as exc:
            raise OutputError(f"writing {self.target} failed: {exc}") from None

    def finish(self) -> None:
        """Flush the encoder, copy the rest of the other streams and publish the file."""
        try:
            for packet in self.stream.encode(None):
                self.out.mux(packet)
            if self.copier is not None:
                self.copier.advance_to(float("inf"))
                self.copier.close()
            self.out.close()
        except (av.error.FFmpegError, OSError) as exc:
            self.abort()
            raise OutputError(f"writing {self.target} failed: {exc}") from None
        if self.tmp_path is not None:
            os.replace(self.tmp_path, self.target)
            self.tmp_path = None

    def abort(self) -> None:
        """Drop everything written so far."""
        try:
            if getattr(self, "copier", None) is not None:
                self.copier.close()
            self.out.close()
        except Exception:
            pass
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self.tmp_path is not None:
            try:
                self.tmp_path.unlink()
            except FileNotFoundError:
                pass
            self.tmp_path = None


def open_writer(target: str, info: VideoInfo, opts: EncodeOptions, copy_from: Optional[str] = None) -> VideoWriter:
    return VideoWriter(target, info, opts, copy_from)
