"""Encoding: same timestamps, colour tags, rotation and bit depth as the input.

The video is re-encoded (the faces changed); every other stream (audio,
subtitles, data) is copied packet for packet by a second demuxer over the same
input, advanced in step with the video so the muxer can interleave without
buffering whole streams. A file target is written to a temporary file beside
it and renamed only on success, so no half file is ever left.

A URL target (udp, tcp, rtmp incl. a ``listen=1`` server, ...) and stdout get
their muxer from ``EncodeOptions.format`` (``--format``), else from the URL's
scheme (mpegts for udp/tcp, flv for rtmp) or y4m on stdout. Frames go out as
they are encoded: a stream has no temporary file, and its encoder is set for
low delay (x264/x265 ``tune=zerolatency``, a keyframe every 2 s so a receiver
that joins late starts within 2 s).

The temporary file is ``.NAME.partial-PID.EXT``, locked (flock) for as long as
its process lives. A run killed with SIGKILL (or by a power cut) cannot remove
its own: the next run into the same folder removes every partial file whose
lock is free and whose PID is gone (see ``remove_stale_partials``).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Optional

import av

from .. import interrupt
from ..errors import OutputError, UsageError
from . import masters
from .reader import STDIO, VideoInfo, is_url

try:
    import fcntl  # POSIX: the lock that tells a live run's partial file from a dead one's
except ImportError:  # pragma: no cover - Windows: the PID check alone
    fcntl = None

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
# The muxer of each extension (to ask what it can hold without creating a file).
MUXER = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi",
         ".y4m": "yuv4mpegpipe", ".nut": "nut", ".ts": "mpegts", ".flv": "flv"}
# The muxer of a URL target by its scheme, when --format does not name one.
URL_MUXER = {"udp": "mpegts", "tcp": "mpegts", "unix": "mpegts", "srt": "mpegts", "rtp": "rtp_mpegts",
             "rtmp": "flv", "rtmps": "flv", "rtmpt": "flv", "rtmpe": "flv", "rtsp": "rtsp"}
# --format names that are not FFmpeg's own muxer names.
FORMAT_ALIASES = {"y4m": "yuv4mpegpipe", "ts": "mpegts", "mkv": "matroska"}
CONTAINER_FALLBACK.update({".ts": "libx264", ".flv": "libx264"})
# What FFmpeg's mpegts muxer takes (its codec list is a switch in mpegtsenc.c, which PyAV's
# supported_codecs cannot query: it reports only the default mp2/mpeg2video), by codec and encoder name.
MPEGTS_CODECS = {"h264", "libx264", "hevc", "libx265", "mpeg1video", "mpeg2video", "mpeg4", "av1", "libsvtav1",
                 "libaom-av1", "vc1", "cavs", "dirac", "aac", "aac_latm", "mp2", "mp3", "libmp3lame", "ac3", "eac3",
                 "dts", "truehd", "opus", "libopus", "s302m", "dvb_subtitle", "dvb_teletext", "smpte_klv"}
STREAM_KEYFRAME_S = 2  # network outputs: seconds between keyframes (a receiver that joins late waits this long)
# CRF ranges the encoders document (FFmpeg's own option bounds are wider or absent).
CRF_RANGE = {"libx264": (0, 51), "libx264rgb": (0, 51), "libx265": (0, 51), "libvpx-vp9": (0, 63),
             "libvpx": (4, 63), "libsvtav1": (0, 63), "libaom-av1": (0, 63)}
PARTIAL_NAME = re.compile(r"^\..+\.partial-(?P<pid>\d+)\.[A-Za-z0-9]+$")


@dataclass
class EncodeOptions:
    codec: Optional[str] = None  # None: follow the input codec
    crf: Optional[float] = None
    preset: Optional[str] = None
    pix_fmt: Optional[str] = None  # None: the input's pixel format (bit depth kept)
    extra: dict = field(default_factory=dict)  # raw encoder options
    format: Optional[str] = None  # --format: the muxer of a URL or stdout target (None: from the URL / y4m)
    muxer_options: dict = field(default_factory=dict)  # --output-option: FFmpeg muxer/protocol options


def output_muxer(target: str, fmt: Optional[str] = None) -> str:
    """The muxer a target is written with: a file's from its extension, stdout's and a URL's
    from ``fmt`` (``--format``), else y4m on stdout and by scheme for a URL. UsageError for a
    format FFmpeg cannot write, or for --format on a file (its extension decides)."""
    if fmt is not None:
        if target != STDIO and not is_url(target):
            raise UsageError(f"--format applies to - (stdout) and URLs; the file name's extension "
                             f"picks the container of {target}")
        name = FORMAT_ALIASES.get(fmt.strip().lower(), fmt.strip())
        try:
            if not av.format.ContainerFormat(name, "w").is_output:
                raise ValueError(name)
        except ValueError:
            raise UsageError(f"--format: FFmpeg cannot write {fmt!r} (e.g. y4m, nut, mpegts, flv, matroska)") \
                from None
        return name
    if target == STDIO:
        return "yuv4mpegpipe"
    if is_url(target):
        scheme = target.split("://", 1)[0].lower()
        if scheme in URL_MUXER:
            return URL_MUXER[scheme]
        raise UsageError(f"cannot tell the container to send to {target}; name it with --format "
                         f"(e.g. --format mpegts)")
    ext = Path(target).suffix.lower()
    return MUXER.get(ext, "matroska")


def muxer_ext(muxer: str) -> str:
    """The extension standing for a muxer in the codec choices below (".ts" for mpegts)."""
    for ext, name in MUXER.items():
        if name == muxer and ext != ".m4v":
            return ext
    return "." + muxer

def check_output_target(target: str, fmt: Optional[str] = None) -> None:
    """Fail before any work if the output cannot be written."""
    if fmt is not None or is_url(target):
        output_muxer(target, fmt)
    if target == STDIO:
        if sys.stdout is None or not _fd_open(1):
            raise OutputError("stdout is closed; give an output file or redirect stdout")
        if os.isatty(1):
            raise OutputError("refusing to write video to a terminal; redirect stdout (| or >) or give an output file")
        return
    if is_url(target):
        return
    if not target.strip():
        raise OutputError("the output name is empty")
    path = Path(target)
    if path.is_dir():
        raise OutputError(f"output is a directory: {target}")
    if path.exists() and not path.is_file():
        raise OutputError(f"output exists and is not a regular file (a pipe or device): {target}; "
                          f"use - to write y4m to stdout")
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


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


class EncodeOptionError(UsageError):
    """A bad --codec/--crf/--preset/--pix-fmt (``option`` names it, without the dashes)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def _choose_codec(input_codec: str, opts: EncodeOptions, ext: str, supported: set) -> str:
    if opts.codec is not None:
        name = masters.encoder_name(opts.codec)  # prores -> prores_ks
        try:
            codec = av.codec.Codec(name, "w")
        except Exception:
            raise EncodeOptionError("codec", f"unknown video encoder {opts.codec!r} "
                                             f"(try libx264, libx265, prores_ks, ffv1)") from None
        if codec.type != "video":
            raise EncodeOptionError("codec", f"{opts.codec!r} is an {codec.type} encoder, not a video encoder")
        if ext == ".y4m" and codec.name != "rawvideo":
            raise EncodeOptionError("codec", f"a y4m output holds raw video only, not {opts.codec}")
        if ext not in (".y4m", ".nut") and supported and codec.name not in supported:
            hint = {"ffv1": " (an FFV1 master goes in .mkv)", "prores_ks": " (a ProRes master goes in .mov)"}.get(
                codec.name, "")
            raise EncodeOptionError("codec", f"the {ext} container cannot hold {opts.codec} video{hint}")
        return name
    wanted = FOLLOW_INPUT.get(input_codec)
    if ext == ".y4m":
        return "rawvideo"
    if wanted and wanted in supported:
        return wanted
    return CONTAINER_FALLBACK.get(ext, "libx264")


def _choose_pix_fmt(codec_name: str, info: VideoInfo, opts: EncodeOptions, warn: bool = True) -> str:
    formats = [f.name for f in (av.codec.Codec(codec_name, "w").video_formats or [])]
    if opts.pix_fmt is not None:
        try:
            av.VideoFormat(opts.pix_fmt)
        except (ValueError, TypeError):
            raise EncodeOptionError("pix_fmt", f"unknown pixel format {opts.pix_fmt!r} (e.g. yuv420p, yuv444p, "
                                               f"yuv420p10le)") from None
        if formats and opts.pix_fmt not in formats:
            raise EncodeOptionError("pix_fmt", f"{codec_name} cannot encode pixel format {opts.pix_fmt} "
                                               f"(it takes: {', '.join(formats)})")
        return opts.pix_fmt
    if opts.codec is not None and codec_name in masters.MASTER_CODECS:
        master = masters.master_pix_fmt(codec_name, info.pix_fmt, formats)  # 10-bit 4:2:2 or richer
        if master is not None:
            return master
    if codec_name in ("libx264", "libx265") and (info.width % 2 or info.height % 2) \
            and not info.pix_fmt.startswith(("yuv444", "gbr", "gray")):
        # x264/x265 reject odd sizes in subsampled chroma; 4:4:4 keeps every pixel and the bit depth
        full = "yuv444p10le" if info.bit_depth > 8 else "yuv444p"
        if warn:
            print(f"frvideo: warning: odd frame size {info.width}x{info.height}: {codec_name} needs even sizes "
                  f"for {info.pix_fmt}, encoding {full}", file=sys.stderr)
        return full
    if not formats or info.pix_fmt in formats:
        return info.pix_fmt
    # keep the bit depth when the exact format is not available
    depth_matches = [f for f in formats if max(c.bits for c in av.VideoFormat(f).components) == info.bit_depth]
    preferred = [f for f in depth_matches if f.startswith("yuv420p")] or depth_matches
    return preferred[0] if preferred else formats[0]


def _default_pipe_codec(target: str, ext: str, opts: EncodeOptions) -> Optional[str]:
    """nut on stdout carries raw video unless --codec says otherwise: a pipe feeds another
    program, which encodes once at its end (as y4m on stdout always is)."""
    return "rawvideo" if target == STDIO and ext == ".nut" and opts.codec is None else None


def streaming_options(codec: str, rate: Fraction) -> dict[str, str]:
    """Encoder settings of a network output: no frames held back inside the encoder (x264/x265
    zerolatency: no B-frames, no look-ahead) and a keyframe every STREAM_KEYFRAME_S seconds."""
    options = {"g": str(max(1, round(float(rate) * STREAM_KEYFRAME_S)))}
    if codec in ("libx264", "libx265", "libx264rgb"):
        options["tune"] = "zerolatency"
    return options


def encoder_options(codec: str, opts: EncodeOptions, width: int = 64, height: int = 64,
                    pix_fmt: str = "yuv422p10le") -> dict[str, str]:
    """The options dict handed to the encoder: a master's settings (FFV1/ProRes, io/masters.py),
    crf/preset (given or the codec's default) and extras."""
    options = masters.master_options(codec, width, height, pix_fmt)
    crf = opts.crf if opts.crf is not None else DEFAULT_CRF.get(codec)
    if crf is not None:
        options["crf"] = format(crf, "g")
        if codec == "libvpx-vp9":
            options["b"] = "0"
    preset = opts.preset if opts.preset is not None else DEFAULT_PRESET.get(codec)
    if preset is not None:
        options["preset"] = str(preset)
    options.update({k: str(v) for k, v in opts.extra.items()})
    return options


@contextlib.contextmanager
def _stderr_silenced():
    """Encoders such as x264 print their own complaints straight to fd 2; the user gets our one line."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def container_codecs(ext: str) -> set:
    """The encoders the muxer of ``ext`` accepts (asked of an in-memory muxer: no file is made)."""
    try:
        with av.open(io.BytesIO(), "w", format=MUXER.get(ext, ext.lstrip("."))) as probe:
            return _holds(probe)
    except (av.error.FFmpegError, ValueError):
        return set()


def _holds(out) -> set:
    """Codec and encoder names an output container takes."""
    supported = set(out.supported_codecs)
    if out.format.name == "mpegts":
        supported |= MPEGTS_CODECS
    return supported


def check_encode_options(target: str, opts: EncodeOptions, input_codec: str = "",
                         input_pix_fmt: str = "yuv420p") -> str:
    """Check --codec/--crf/--preset/--pix-fmt by opening the encoder they describe on a small
    test size, before any model loads or frame is read. Returns the encoder's name; raises
    EncodeOptionError naming the bad option.

    ``input_codec`` is the input's codec (the encoder follows it when --codec is not given), or
    empty when not known yet (stdin, URL): then the container's default encoder is checked.
    """
    for name in ("codec", "preset", "pix_fmt"):
        value = getattr(opts, name)
        if value is not None and not str(value).strip():
            raise EncodeOptionError(name, "must not be empty")
    if opts.crf is not None and not math.isfinite(opts.crf):
        raise EncodeOptionError("crf", f"must be a finite number, not {opts.crf}")
    ext = muxer_ext(output_muxer(target, opts.format))
    codec = _default_pipe_codec(target, ext, opts) or _choose_codec(input_codec, opts, ext, container_codecs(ext))
    info = VideoInfo(width=64, height=64, pix_fmt=input_pix_fmt, codec=input_codec, time_base=Fraction(1, 25),
                     average_rate=Fraction(25), frames=0, duration_s=None, color_range=0, colorspace=2,
                     color_primaries=2, color_trc=2, rotation=0, bit_depth=8, sample_aspect_ratio=None,
                     copy_streams=0)
    pix_fmt = _choose_pix_fmt(codec, info, opts, warn=False)
    if opts.crf is not None and codec in CRF_RANGE:
        low, high = CRF_RANGE[codec]
        if not low <= opts.crf <= high:
            raise EncodeOptionError("crf", f"{codec} takes a crf in [{low}, {high}], not {format(opts.crf, 'g')}")
    options = encoder_options(codec, opts, info.width, info.height, pix_fmt)
    cc = av.CodecContext.create(codec, "w")
    cc.width, cc.height, cc.pix_fmt = info.width, info.height, pix_fmt
    cc.time_base, cc.framerate = Fraction(1, 25), Fraction(25)
    cc.options = dict(options)
    try:
        with _stderr_silenced():
            cc.open()
    except (av.error.FFmpegError, ValueError, OverflowError, OSError) as exc:
        bad = "preset" if opts.preset is not None and "preset" in str(exc) else \
            "crf" if opts.crf is not None and "crf" in str(exc) else "codec"
        what = {"preset": f"preset {opts.preset!r}", "crf": f"crf {format(opts.crf, 'g') if opts.crf is not None else ''}",
                "codec": "these settings"}[bad]
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise EncodeOptionError(bad, f"{codec} does not accept {what} ({reason})") from None
    finally:
        with contextlib.suppress(Exception):
            cc.close()
    if opts.codec is not None:  # settings the chosen encoder does not have (a follow-input one just skips them)
        for name in ("crf", "preset"):
            if getattr(opts, name) is not None and name in (cc.options or {}):
                raise EncodeOptionError(name, f"{codec} has no {name} setting")
    return codec


# -- partial files ------------------------------------------------------------------

_LIVE_PARTIALS: set[Path] = set()  # this process's partial files: removed by any way out


def remove_partials() -> None:
    """Remove this process's partial files (called on every way out, and by a second signal)."""
    for path in list(_LIVE_PARTIALS):
        with contextlib.suppress(OSError):
            path.unlink()
        _LIVE_PARTIALS.discard(path)


interrupt.on_emergency(remove_partials)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number no process has: kept, to be safe)
    return True


def _lock_free(path: Path) -> bool:
    """True when no process holds the partial file's lock (its writer is gone)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the partial files in ``folder`` left by runs that died without cleaning up (SIGKILL,
    power cut): those whose lock is free and whose PID is not a live process. Returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = PARTIAL_NAME.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        pid = int(m.group("pid"))
        path = Path(entry.path)
        if pid == os.getpid() or path in _LIVE_PARTIALS or _pid_alive(pid) or not _lock_free(path):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed


def _copy_streams(streams, out: av.container.OutputContainer, ext: str) -> dict:
    """Output streams for the input's non-video ``streams`` the container can hold: input index -> stream."""
    mapped = {}
    supported = _holds(out)
    for s in streams:
        name = s.codec_context.name if s.codec_context else None
        if s.type == "data" and any(k.lower() == "timecode" for k in s.metadata):
            continue  # a MOV tmcd track: the writer gives the output its own (VideoWriter._setup)
        if s.type == "video" or name is None or (ext != ".nut" and name not in supported):
            why = "y4m carries video only (--format nut keeps audio)" if ext == ".y4m" else \
                f"the {ext or 'output'} container cannot hold it"
            print(f"frvideo: warning: dropping {s.type} stream #{s.index} ({name or 'unknown codec'}): {why}",
                  file=sys.stderr)
            continue
        try:
            mapped[s.index] = out.add_stream_from_template(s)
        except (ValueError, av.error.FFmpegError) as exc:
            print(f"frvideo: warning: dropping {s.type} stream #{s.index} ({name}): {exc}", file=sys.stderr)
    return mapped


class _PacketCopier:
    """Copies the non-video streams of the input file packet for packet."""

    def __init__(self, source: str, out: av.container.OutputContainer, ext: str):
        self.container = av.open(source)
        video = self.container.streams.video[0].index
        self.map = _copy_streams([s for s in self.container.streams if s.index != video], out, ext)
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


class _SidePacketCopier:
    """Copies the non-video streams of a single-pass input (stdin, URL, device): the reader keeps
    their packets as it demuxes (``VideoReader.take_side_streams``); they are muxed in step with
    the video, up to each frame's time, so the output interleaves as the input did."""

    def __init__(self, reader, out: av.container.OutputContainer, ext: str):
        self.map = _copy_streams(reader.side_streams, out, ext)
        self.packets = reader.take_side_streams(set(self.map))
        self.out = out
        self.failed: set[int] = set()

    def advance_to(self, t: float) -> None:
        packets = self.packets
        while packets:
            pkt = packets[0]
            ts = pkt.dts if pkt.dts is not None else pkt.pts
            if ts is not None and float(ts * pkt.time_base) > t:
                return
            packets.popleft()
            index = pkt.stream.index
            if ts is None or index in self.failed:
                continue  # a packet with no time cannot be placed in the output
            pkt.stream = self.map[index]
            try:
                self.out.mux(pkt)
            except av.error.FFmpegError as exc:
                if isinstance(exc, OSError):  # the output itself failed (pipe closed, network gone)
                    raise
                # the copy does not fit this muxer (e.g. ADTS AAC into flv): drop that stream, keep the video
                self.failed.add(index)
                print(f"frvideo: warning: dropping stream #{index} from here on: {exc}", file=sys.stderr)

    def close(self) -> None:
        self.packets.clear()


class VideoWriter:
    def __init__(self, target: str, info: VideoInfo, opts: EncodeOptions, copy_from=None):
        """``copy_from``: the input file whose other streams are copied, or the VideoReader of a
        single-pass input (stdin, URL) that keeps them; None: video only."""
        check_output_target(target, opts.format)
        self.target = target
        self.info = info
        self.muxer = output_muxer(target, opts.format)
        self.muxer_options = {k: str(v) for k, v in opts.muxer_options.items()}
        self.ext = muxer_ext(self.muxer) if target == STDIO or is_url(target) else Path(target).suffix.lower()
        self.streaming = is_url(target) and not target.startswith("file:")
        self.tmp_path: Optional[Path] = None
        self._lock_fd: Optional[int] = None
        self.out = self._open_container()
        try:
            self._setup(opts, copy_from)
        except BaseException:
            self.abort()
            raise

    def _open_container(self):
        try:
            if self.target == STDIO:
                return av.open(sys.stdout.buffer, mode="w", format=self.muxer, options=self.muxer_options)
            if is_url(self.target):
                return _open_url_in_thread(self.target, self.muxer, self.muxer_options)
            path = Path(self.target)
            remove_stale_partials(path.parent if str(path.parent) else Path("."))
            self.tmp_path = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
            self._lock_fd = self._create_locked(self.tmp_path)
            fmt = {".y4m": "yuv4mpegpipe", ".m4v": "mp4"}.get(self.ext)
            return av.open(str(self.tmp_path), mode="w", format=fmt)
        except (av.error.FFmpegError, OSError, ValueError) as exc:
            self._remove_tmp()
            raise OutputError(f"cannot write {self.target}: {exc}") from None

    @staticmethod
    def _create_locked(path: Path) -> Optional[int]:
        """Create the partial file, registered for removal, and hold its lock for this process's life."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        _LIVE_PARTIALS.add(path)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # a file system without flock: the PID check alone tells live from dead
        return fd

    def _setup(self, opts: EncodeOptions, copy_from: Optional[str]) -> None:
        info = self.info
        codec = _default_pipe_codec(self.target, self.ext, opts) or \
            _choose_codec(info.codec, opts, self.ext, _holds(self.out))
        self.pix_fmt = _choose_pix_fmt(codec, info, opts)
        # y4m carries no timestamps: frames are numbered at the nominal rate
        self.numbered = self.ext == ".y4m"
        rate = info.average_rate or Fraction(25)
        try:
            stream = self.out.add_stream(codec, rate=rate)
        except (ValueError, TypeError, av.error.FFmpegError) as exc:
            raise OutputError(f"the {self.ext} container cannot hold {codec} video ({exc})") from None
        cc = stream.codec_context
        cc.width, cc.height, cc.pix_fmt = info.width, info.height, self.pix_fmt
        self.frame_time_base = 1 / rate if self.numbered else info.time_base
        stream.time_base = cc.time_base = self.frame_time_base
        if info.sample_aspect_ratio:
            cc.sample_aspect_ratio = info.sample_aspect_ratio
        cc.color_range, cc.colorspace = info.color_range, info.colorspace
        cc.color_primaries, cc.color_trc = info.color_primaries, info.color_trc
        cc.options = {**(streaming_options(codec, rate) if self.streaming else {}),
                      **encoder_options(codec, opts, info.width, info.height, self.pix_fmt)}
        self.fields = self._set_field_order(cc, codec)
        if info.timecode:  # MOV/MP4: a tmcd track; MKV: a TIMECODE tag; others ignore it
            stream.metadata["timecode"] = info.timecode
        from . import codec_threads
        if codec_threads():
            cc.thread_count = codec_threads()
        if info.rotation and self.ext in {".mp4", ".mov", ".m4v", ".mkv"}:
            stream.set_display_rotation(float(info.rotation))
        self.stream = stream
        self.codec = codec
        if not copy_from or not info.copy_streams:
            self.copier = None
        elif isinstance(copy_from, str):
            self.copier = _PacketCopier(copy_from, self.out, self.ext)
        else:
            self.copier = _SidePacketCopier(copy_from, self.out, self.ext)
        self.count = 0
        self.last_pts: Optional[int] = None

    # encoders that code interlaced pictures as two fields only when asked to (per frame the
    # field flags then say which comes first); FFV1 just records the flags
    FIELD_CODING = {"libx264", "prores_ks", "mpeg2video", "dnxhd"}

    def _set_field_order(self, cc, codec: str) -> Optional[masters.FieldFlagger]:
        """The output keeps the source's field order (``info.field_order``; progressive after
        --deinterlace). Interlaced: the stream is tagged, field coding is switched on, and each
        frame is flagged by FFmpeg's setfield filter (returned)."""
        order = self.info.field_order
        if order == masters.FIELD_PROGRESSIVE:
            cc.field_order = order
            return None
        if not masters.is_interlaced(order):
            return None
        cc.field_order = order
        if codec in self.FIELD_CODING:
            flags = av.codec.context.Flags
            cc.flags |= flags.interlaced_dct | flags.interlaced_me
        return masters.FieldFlagger(order, self.info.time_base, self.pix_fmt)

    def write(self, frame: av.VideoFrame) -> None:
        if self.fields is not None:  # interlaced: field-aware chroma resampling, then the field flags
            src = frame
            frame = self.fields(frame)
            frame.pts, frame.time_base = src.pts, src.time_base
        elif frame.format.name != self.pix_fmt:
            src = frame
            frame = frame.reformat(format=self.pix_fmt, threads=1)  # no swscale thread pool per frame
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
            try:
                os.replace(self.tmp_path, self.target)
            except OSError as exc:
                self.abort()
                raise OutputError(f"cannot publish {self.target}: {exc.strerror or exc}") from None
            _LIVE_PARTIALS.discard(self.tmp_path)
            self.tmp_path = None
            self._release_lock()

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
            with contextlib.suppress(OSError):
                self.tmp_path.unlink()
            _LIVE_PARTIALS.discard(self.tmp_path)
            self.tmp_path = None
        self._release_lock()

    def _release_lock(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


def _open_url_in_thread(target: str, muxer: str, options: dict):
    """av.open of a URL for writing, in a helper thread: a server output (``listen=1``) waits for
    its client inside FFmpeg, where no signal reaches Python; the main thread waits beside it so
    Ctrl-C still stops the run."""
    from ..interrupt import call_beside
    return call_beside(lambda: av.open(target, mode="w", format=muxer, options=dict(options)),
                       "frvideo-open-output")


def open_writer(target: str, info: VideoInfo, opts: EncodeOptions, copy_from=None) -> VideoWriter:
    return VideoWriter(target, info, opts, copy_from)
