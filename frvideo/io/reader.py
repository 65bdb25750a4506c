"""Decoding: frames keep their pts/time base and colour tags untouched.

``open_reader`` accepts a file path, ``-`` (a y4m or nut stream on stdin, told
apart by their magic bytes), a URL that FFmpeg can open (udp, tcp, rtmp, http,
HLS, ...) or, with ``InputOptions.format``, anything that demuxer or capture
device takes (``lavfi`` graphs, ``v4l2`` devices where FFmpeg has them).
Frames are yielded as ``av.VideoFrame`` so a frame the pipeline does not touch
can be encoded from exactly the decoded planes.

An input that cannot be opened twice (stdin, a FIFO, a URL, a device) has its
audio, subtitle and data packets kept by the reader itself, in demux order, for
the writer to interleave with the video (``take_side_streams``); a regular file
is read a second time by the writer instead. A network input that stays silent
for ``InputOptions.timeout`` seconds, or whose sender hangs up, ends like a file
ends: the frames so far are the whole stream.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional

import av

from ..errors import InputError, UsageError
from ..interrupt import call_beside
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


@dataclass
class InputOptions:
    """How to open an input beyond its name (``--input-format``, ``--input-option``, ``--input-timeout``)."""

    format: Optional[str] = None  # the demuxer or capture device; None: probe (stdin: y4m or nut)
    options: dict = field(default_factory=dict)  # FFmpeg demuxer/protocol options, e.g. {"listen": "1"}
    timeout: float = 10.0  # seconds a network input may stay silent before the run ends cleanly; 0 = forever
    announce: bool = False  # say on stderr when a network input starts waiting for its stream


def is_url(source: str) -> bool:
    return "://" in source and not os.path.exists(source)


# Magic bytes of the stream formats told apart on stdin.
STDIN_MAGIC = {b"YUV4MPEG2": "yuv4mpegpipe", b"nut/multimedia container\0": "nut"}


def is_listening(options: dict) -> bool:
    """A server input (rtmp/tcp ``listen=1``): it waits for its client without a time limit."""
    return str(options.get("listen", "0")).strip() not in ("", "0")


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

    def peek(self, n: int) -> bytes:
        """The first ``n`` bytes (fewer at end of stream), handed out again by the next reads."""
        try:
            head = self.raw.read(n)
        except OSError as exc:
            raise InputError(f"reading stdin failed ({exc.strerror or exc})") from None
        self._head = head + getattr(self, "_head", b"")
        return self._head

    def read(self, n: int = -1) -> bytes:
        head = getattr(self, "_head", b"")
        if head:
            data, self._head = (head, b"") if n < 0 or n >= len(head) else (head[:n], head[n:])
            self.count += len(data)
            return data
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


def check_input_source(source: str, input_format: Optional[str] = None) -> None:
    """Fail before any work when the input cannot be read at all (one line, InputError/UsageError).
    With ``input_format`` (a demuxer or capture device) the name is FFmpeg's to judge."""
    if source == STDIO:
        if sys.stdin is None or not _fd_open(0):
            raise InputError("stdin is closed; pipe a y4m or nut stream into frvideo or give an input file")
        if os.isatty(0):
            raise UsageError("stdin is a terminal; pipe a y4m or nut stream into it "
                             "(ffmpeg -i IN -f yuv4mpegpipe - | frvideo - OUT) or give an input file")
        return
    if is_url(source) or (input_format is not None and source.strip()):
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


def stdin_format(counter: _CountingReader) -> str:
    """y4m or nut, from the stream's first bytes (left in place for the demuxer)."""
    head = counter.peek(max(len(m) for m in STDIN_MAGIC))
    if counter.interrupted is not None:
        raise counter.interrupted
    for magic, name in STDIN_MAGIC.items():
        if head.startswith(magic):
            return name
    what = "empty" if not head else "neither a y4m nor a nut stream"
    raise InputError(f"stdin is {what}; pipe one with: ffmpeg -i IN -f yuv4mpegpipe - (video only) or "
                     f"ffmpeg -i IN -c:v rawvideo -f nut - (with audio), or name its format with --input-format")


class VideoReader:
    """Iterates decoded video frames of the first video stream."""

    def __init__(self, source: str, allow_damaged: bool = False, input_options: Optional[InputOptions] = None):
        self.source = source
        self.allow_damaged = allow_damaged
        self.input = input_options or InputOptions()
        self.counter: Optional[_CountingReader] = None  # pipes and FIFOs: bytes read so far
        self.ended_by: Optional[str] = None  # why a network input ended (silence, sender gone), if it did
        self.skipped_packets = 0  # network inputs: video packets that did not decode
        # a stream read once (stdin, FIFO, URL, device): its other streams' packets are kept here
        self.single_pass = not self._regular_file()
        self._side: Optional[deque] = deque() if self.single_pass else None
        self._side_keep: Optional[set] = None  # stream indices the writer takes; None: not asked yet
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

    def _regular_file(self) -> bool:
        return self.source != STDIO and not is_url(self.source) and self.input.format is None \
            and Path(self.source).is_file()

    @property
    def network(self) -> bool:
        """A URL other than a local file: it may stall or hang up, and has a read timeout."""
        return is_url(self.source) and not self.source.startswith("file:")

    def _decode_first(self):
        self._frames = self._decode()
        try:
            return next(self._frames)
        except StopIteration:
            self.container.close()
            raise InputError(f"{_name(self.source)}: the video stream has no decodable frames") from None

    def _open(self):
        named_by_ffmpeg = self.input.format is not None and self.source != STDIO
        if not named_by_ffmpeg and (self.source == STDIO or (
                not is_url(self.source) and Path(self.source).exists()
                and not Path(self.source).is_file() and not Path(self.source).is_dir())):
            check_input_source(self.source)
            raw = sys.stdin.buffer if self.source == STDIO else open(self.source, "rb")
            self.counter = _CountingReader(raw)
            fmt = self.input.format
            if fmt is None and self.source == STDIO:
                fmt = stdin_format(self.counter)
            try:
                container = av.open(self.counter, mode="r", format=fmt, options=dict(self.input.options))
            except av.error.FFmpegError as exc:
                if self.counter.interrupted is not None:
                    raise self.counter.interrupted from None
                if self.source == STDIO:
                    raise InputError(f"stdin is not a readable {fmt} stream ({exc.strerror})") from None
                raise InputError(f"cannot open {self.source} as a video ({exc.strerror or type(exc).__name__})") \
                    from None
            if self.counter.interrupted is not None:
                container.close()
                raise self.counter.interrupted
            return container
        if is_url(self.source) or named_by_ffmpeg:
            return _open_in_thread(self.source, self.input, self.network)
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
        video = self.stream.index
        side = self._side

        def numbered(frames):
            nonlocal index
            for frame in frames:
                if frame.pts is None:  # raw/y4m streams: frame index in 1/rate units
                    frame.pts = index
                index += 1
                yield frame

        try:
            for packet in self.container.demux(*(() if side is not None else (self.stream,))):
                if packet.stream.index != video:
                    if side is not None and packet.size and (self._side_keep is None
                                                             or packet.stream.index in self._side_keep):
                        side.append(packet)
                    continue
                if packet.size and packet.pos is not None and packet.pos >= 0:
                    frame_end = packet.pos + packet.size
                yield from numbered(self._decode_packet(packet))
        except av.error.FFmpegError as exc:
            if index == start_index:
                if isinstance(exc, av.error.ExitError) and self.network:
                    raise InputError(f"{self.source}: no video arrived within {self.input.timeout:g} s "
                                     f"(--input-timeout)") from None
                raise InputError(f"{_name(self.source)} is not a readable video ({exc.strerror or exc})") from None
            if self.network:  # a live stream ends by going silent or by its sender hanging up
                self.ended_by = (f"no data for {self.input.timeout:g} s (--input-timeout)"
                                 if isinstance(exc, av.error.ExitError) else f"the sender ended it ({exc.strerror or exc})")
                # the decoder still holds the frames a threaded decode had in flight (one per extra
                # thread): the end of demuxing never reached it, so drain it here, or they are lost
                yield from numbered(self._drain_decoder())
                return
            damage = f"decoding failed after frame {index} ({exc.strerror or exc})"
        failed = self.counter.interrupted if self.counter is not None else None
        if failed is not None:  # the pipe itself failed (or a signal came while opening)
            if isinstance(failed, OSError):
                raise InputError(f"reading {_name(self.source)} failed after frame {index} "
                                 f"({failed.strerror or failed})")
            raise failed
        if self.skipped_packets:
            print(f"frvideo: warning: {self.source}: {self.skipped_packets} damaged or incomplete video packets "
                  f"skipped (joined mid-stream, or packets lost on the way)", file=sys.stderr)
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

    def _drain_decoder(self) -> list:
        try:
            return self.stream.codec_context.decode(None)
        except av.error.FFmpegError:  # a decoder in error has nothing left to give
            return []

    def _decode_packet(self, packet) -> list:
        """A packet's frames. A network stream joined mid-way starts before its first keyframe and
        may lose packets on the way: those packets are skipped (and counted), as players do."""
        if not self.network:
            return packet.decode()
        try:
            return packet.decode()
        except av.error.FFmpegError:
            self.skipped_packets += 1
            return []

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

    @property
    def first_frame(self) -> Optional[av.VideoFrame]:
        """The first frame (decoded on opening), until iteration starts."""
        return self._first

    @property
    def side_streams(self) -> list:
        """The input's non-video streams (templates for the writer's copies)."""
        return [s for s in self.container.streams if s.index != self.stream.index]

    def take_side_streams(self, indices: set) -> deque:
        """A single-pass input: the writer keeps these streams' packets; the reader hands them
        over in this deque (in demux order, the order their timestamps interleave in)."""
        if self._side is None:
            raise RuntimeError("a regular file's other streams are read by the writer itself")
        self._side_keep = set(indices)
        kept = [p for p in self._side if p.stream.index in self._side_keep]
        self._side.clear()
        self._side.extend(kept)
        return self._side

    def __iter__(self) -> Iterator[av.VideoFrame]:
        first, self._first = self._first, None
        if first is None:
            raise RuntimeError("a VideoReader can be iterated once")
        if self._side is not None and self._side_keep is None:  # nobody takes the other streams
            self._side_keep = set()
            self._side.clear()
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


def _open_in_thread(source: str, opts: InputOptions, network: bool):
    """av.open of a URL or device, in a helper thread: a server input waits for its client (and
    a slow host for its connection) inside FFmpeg, where no signal reaches Python. The main
    thread waits beside it, so Ctrl-C or SIGTERM still stops the run at once."""
    listening = is_listening(opts.options)
    wait = None if listening or not network or not opts.timeout else opts.timeout
    read = opts.timeout if network and opts.timeout else None
    if opts.announce and network:
        until = "until a sender connects" if listening else f"up to {wait:g} s" if wait else "without a time limit"
        print(f"frvideo: {'listening on' if listening else 'opening'} {source}: waiting {until}", file=sys.stderr,
              flush=True)

    try:
        return call_beside(lambda: av.open(source, mode="r", format=opts.format, options=dict(opts.options),
                                           timeout=(wait, read) if network else None), "frvideo-open")
    except av.error.ExitError:
        raise InputError(f"{source}: nothing arrived within {wait:g} s (--input-timeout)") from None
    except (av.error.FFmpegError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise InputError(f"cannot open {source} ({why})") from None


def open_reader(source: str, allow_damaged: bool = False, input_options: Optional[InputOptions] = None) -> VideoReader:
    return VideoReader(source, allow_damaged, input_options)
