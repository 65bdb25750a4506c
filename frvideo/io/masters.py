"""Archival masters: FFV1 / ProRes settings, field order, timecode, deinterlacing.

What archives expect of a master (FFV1 as the IETF/MediaConch profile uses it,
ProRes as edit suites read it): nothing of the source's signal is thrown away.
So a master is 4:2:2 at 10 bits, or more where the source has more (4:4:4
chroma, 12/16 bits stay), carries the source's colour tags, its field order
(interlaced stays interlaced, fields flagged the same way) and its timecode.

Field order is a flag on every frame (FFmpeg's AV_FRAME_FLAG_INTERLACED and
TOP_FIELD_FIRST) that the encoders read per frame; PyAV cannot set the second
one, so the writer passes frames through FFmpeg's own ``setfield`` filter.
Deinterlacing (``--deinterlace``) is FFmpeg's ``bwdif`` through PyAV's filter
graph in ``send_frame`` mode: one output frame per input frame, same
timestamps, so the frame-count and timing rules of the pipeline still hold.
"""
from __future__ import annotations

import contextlib
import functools
import re
from fractions import Fraction
from typing import Iterable, Iterator, Optional

import av

# names users type -> FFmpeg encoder
CODEC_ALIASES = {"prores": "prores_ks", "ffv1": "ffv1"}
MASTER_CODECS = {"ffv1", "prores_ks"}

# AVFieldOrder (libavcodec/defs.h)
FIELD_UNKNOWN, FIELD_PROGRESSIVE, FIELD_TT, FIELD_BB, FIELD_TB, FIELD_BT = range(6)
FIELD_NAMES = {FIELD_UNKNOWN: "unknown", FIELD_PROGRESSIVE: "progressive", FIELD_TT: "tt", FIELD_BB: "bb",
               FIELD_TB: "tb", FIELD_BT: "bt"}
TOP_FIRST = {FIELD_TT, FIELD_TB}  # the top field is shown (TB: and coded) first

TIMECODE = re.compile(r"^-?\d{1,2}:\d{2}:\d{2}[:;.]\d{2,3}$")


def encoder_name(codec: Optional[str]) -> Optional[str]:
    """--codec as FFmpeg calls it (``prores`` picks the prores_ks encoder, the one that writes
    4:4:4 and the HQ profile; FFmpeg's ``prores`` encoder is the older prores_aw)."""
    if codec is None:
        return None
    return CODEC_ALIASES.get(codec.strip().lower(), codec)


def is_interlaced(field_order: int) -> bool:
    return field_order in (FIELD_TT, FIELD_BB, FIELD_TB, FIELD_BT)


def master_pix_fmt(codec: str, pix_fmt: str, formats: list[str]) -> Optional[str]:
    """The pixel format of a master of a ``pix_fmt`` source. FFV1 is lossless: it keeps the
    source's own format (every decoded sample, bit depth and chroma as they are; an untouched
    frame stays bit-identical). ProRes: 4:2:2 at 10 bits, 4:4:4 (4444) for a 4:4:4 source. None:
    let the ordinary rule choose (RGB sources, formats the encoder lacks)."""
    if codec == "ffv1" and pix_fmt in formats:
        return pix_fmt
    try:
        fmt = av.VideoFormat(pix_fmt, 64, 64)  # a size, so the components know theirs
    except (ValueError, TypeError):
        return None
    comps = fmt.components
    if not comps or not comps[0].is_luma:
        return None  # RGB: FFV1 keeps it as it is (bgr0/gbrp), ProRes converts to 4:4:4
    depth = max(10, max(c.bits for c in comps))
    chroma = [c for c in comps[1:] if not c.is_alpha]  # (PyAV's is_chroma: subsampled chroma only)
    full_chroma = bool(chroma) and all(c.width == comps[0].width and c.height == comps[0].height for c in chroma)
    alpha = any(c.is_alpha for c in comps)
    # FFV1: the source's depth or more; ProRes takes 10 bits (4444 codes up to 12 internally)
    for d in (depth, 12, 16) if codec == "ffv1" else (10,):
        if codec == "ffv1" and d < depth:
            continue
        want = ("yuva" if alpha else "yuv") + ("444" if full_chroma else "422") + f"p{d}le"
        if want in formats:
            return want
        if alpha and want.replace("yuva", "yuv") in formats:
            return want.replace("yuva", "yuv")
    return None


@functools.lru_cache(maxsize=32)
def ffv1_slices(width: int, height: int, pix_fmt: str) -> int:
    """Slices per frame: decode and CRC checks in parallel, and a damaged frame loses one slice,
    not the whole picture. 16 from SD up, 4 below; FFV1 refuses counts it cannot lay out on the
    frame (odd sizes, tiny frames), so each is tried on the real size, down to 1."""
    wanted = 16 if width * height >= 640 * 360 else 4
    for n in [c for c in (16, 12, 9, 6, 4, 2, 1) if c <= wanted]:
        cc = av.CodecContext.create("ffv1", "w")
        cc.width, cc.height, cc.pix_fmt = width, height, pix_fmt
        cc.time_base = Fraction(1, 25)
        cc.options = {"level": "3", "slices": str(n), "slicecrc": "1"}
        try:
            cc.open()
            return n
        except (av.error.FFmpegError, ValueError):
            continue
        finally:
            with contextlib.suppress(Exception):
                cc.close()
    return 1


def master_options(codec: str, width: int, height: int, pix_fmt: str) -> dict[str, str]:
    """The encoder settings of a master (any of them can still be overridden by the user)."""
    if codec == "ffv1":
        # version 3, every frame a keyframe (cut anywhere, a loss stays in its frame), range coder
        # with the large context model (smaller files), a CRC per slice (MediaConch checks it)
        return {"level": "3", "g": "1", "coder": "1", "context": "1", "slicecrc": "1",
                "slices": str(ffv1_slices(width, height, pix_fmt))}
    if codec == "prores_ks":
        # HQ for 4:2:2, 4444 (profile 4) for 4:4:4; vendor apl0 so Apple's decoders take it as theirs
        profile = "4" if "444" in pix_fmt else "3"
        return {"profile": profile, "vendor": "apl0"}
    return {}


def read_timecode(container: av.container.InputContainer, video: av.video.stream.VideoStream) -> Optional[str]:
    """The start timecode of the video: the video stream's tag (MOV copies its tmcd track there, MKV
    keeps a TIMECODE tag), else a tmcd data stream's, else the file's."""
    sources = [video.metadata, *(s.metadata for s in container.streams if s.type == "data"), container.metadata]
    for meta in sources:
        for key, value in (meta or {}).items():
            if key.lower() == "timecode" and TIMECODE.match(str(value).strip()):
                return str(value).strip()
    return None


# -- filter graphs -------------------------------------------------------------------

class _FrameFilter:
    """One FFmpeg filter chain over a stream of frames (PyAV's filter graph), built on the first frame."""

    def __init__(self, chain: list[tuple[str, str]], time_base: Fraction):
        self.chain = chain
        self.time_base = time_base
        self.graph: Optional[av.filter.Graph] = None

    def _build(self, frame: av.VideoFrame) -> None:
        g = av.filter.Graph()
        src = g.add_buffer(width=frame.width, height=frame.height, format=frame.format.name,
                           time_base=frame.time_base or self.time_base)
        last = src
        for name, args in self.chain:
            node = g.add(name, args)
            last.link_to(node)
            last = node
        sink = g.add("buffersink")
        last.link_to(sink)
        g.configure()
        self.graph = g

    def push(self, frame: Optional[av.VideoFrame]) -> list[av.VideoFrame]:
        """Frames out after ``frame`` went in (None flushes)."""
        if frame is not None and self.graph is None:
            self._build(frame)
        if self.graph is None:
            return []
        if frame is not None and frame.time_base is None:
            frame.time_base = self.time_base
        self.graph.push(frame)
        out = []
        while True:
            try:
                f = self.graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return out
            out.append(f)


def _copy_tags(src: av.VideoFrame, dst: av.VideoFrame) -> None:
    """Timestamps and colour tags of ``src`` onto a filter's output (the scale filter, for one,
    leaves the matrix unspecified; the encoders write the frame's tags into their bitstream)."""
    dst.pts, dst.time_base = src.pts, src.time_base
    dst.color_range, dst.colorspace = src.color_range, src.colorspace
    dst.color_primaries, dst.color_trc = src.color_primaries, src.color_trc


class FieldFlagger(_FrameFilter):
    """Marks frames as interlaced with the source's field order (``setfield``), for the encoder,
    after converting them to ``pix_fmt`` field by field (``scale=interl=1``: 4:2:0 chroma is
    resampled within each field, not across the two)."""

    # AVCOL_SPC_* -> the scale filter's matrix names
    MATRIX = {1: "bt709", 4: "fcc", 5: "bt470", 6: "smpte170m", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}

    def __init__(self, field_order: int, time_base: Fraction, pix_fmt: str):
        super().__init__([], time_base)
        self.pix_fmt = pix_fmt
        self.field = "tff" if field_order in TOP_FIRST else "bff"

    def _build(self, frame: av.VideoFrame) -> None:
        # the same matrix and range in and out, named: the filter graph's buffer does not carry the
        # frame's tags, and the scale filter would otherwise convert between its guesses of them
        # (that moved 8-bit luma by up to 53/1023 in a 10-bit master); like this 8 -> 10 bits is exact
        matrix = self.MATRIX.get(int(frame.colorspace), "bt601")
        rng = "pc" if int(frame.color_range) == 2 or frame.format.name.startswith("yuvj") else "tv"
        self.chain = [("scale", f"interl=1:in_range={rng}:out_range={rng}:in_color_matrix={matrix}:"
                                f"out_color_matrix={matrix}"),
                      ("format", self.pix_fmt), ("setfield", self.field)]
        super()._build(frame)

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        out = self.push(frame)
        # setfield passes each frame straight through (one in, one out, nothing held back)
        f = out[0]
        _copy_tags(frame, f)
        return f


def deinterlaced(frames: Iterable[av.VideoFrame], field_order: int, time_base: Fraction,
                 filter_name: str = "bwdif") -> Iterator[av.VideoFrame]:
    """``frames`` deinterlaced one frame per frame (bwdif/yadif ``send_frame``; the filter holds
    one frame back, the flush returns it), every output frame with its input's pts, flagged
    progressive. All frames are deinterlaced (deint=all): the user asked for it, and captures
    often flag interlaced video as progressive. Parity from the stream's field order when it
    has one, else from each frame's flags."""
    parity = "tff" if field_order in TOP_FIRST else "bff" if is_interlaced(field_order) else "auto"
    flt = _FrameFilter([(filter_name, f"mode=send_frame:parity={parity}:deint=all"), ("setfield", "prog")],
                       time_base)
    queued: list[av.VideoFrame] = []  # input frames whose output is not out yet: their pts go on it

    def emit(outs):
        for f in outs:
            src = queued.pop(0)
            _copy_tags(src, f)
            f.time_base = f.time_base or time_base
            yield f

    for frame in frames:
        queued.append(frame)
        yield from emit(flt.push(frame))
    yield from emit(flt.push(None))
