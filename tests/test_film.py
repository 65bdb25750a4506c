"""Film and archival masters: black and white on luma only, FFV1/ProRes masters that keep bit
depth, field order, colour tags and timecode, --deinterlace, and --grain match.

The B&W and grain clips are made from a real eval clip (../shared/media), restored with the
shipped ``lite`` model and a real detector; the master tests use a synthetic interlaced clip
and ``--model none``. Stream properties are read with PyAV, and also with Debian's ffprobe
where it is installed."""
from __future__ import annotations

import json
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from clips import pattern
from conftest import MEDIA, need
from frvideo.cli import main

EVAL_CLIP = MEDIA / "videos" / "eval" / "retalk_3.mp4"  # one talking face
SIZE, FRAMES = 256, 8
LITE = ["--model", "lite", "--detector", "yunet", "-q"]


# -- clips ----------------------------------------------------------------------------

def _planes(frame: av.VideoFrame) -> list[np.ndarray]:
    out = []
    for i, p in enumerate(frame.planes):
        bits = frame.format.components[0].bits
        dtype = np.uint8 if bits <= 8 else np.dtype("<u2")
        out.append(np.frombuffer(p, dtype).reshape(p.height, p.line_size // np.dtype(dtype).itemsize)
                   [:, :p.width].copy())
    return out


def decoded(path: Path) -> list[list[np.ndarray]]:
    with av.open(str(path)) as c:
        return [_planes(f) for f in c.decode(video=0)]


def _write_planes(stream, out, planes_per_frame, size, rate=25):
    for i, planes in enumerate(planes_per_frame):
        f = av.VideoFrame(size, size, "yuv420p")
        for p, arr in zip(f.planes, planes):
            np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :arr.shape[1]] = arr
        f.pts, f.time_base = i, Fraction(1, rate)
        for pkt in stream.encode(f):
            out.mux(pkt)
    for pkt in stream.encode(None):
        out.mux(pkt)


def eval_planes(n: int = FRAMES, size: int = SIZE) -> list[list[np.ndarray]]:
    """The first frames of the real eval clip, scaled to size x size, as yuv420p planes."""
    need(EVAL_CLIP, "eval clip")
    with av.open(str(EVAL_CLIP)) as c:
        frames = []
        for f in c.decode(video=0):
            frames.append(_planes(f.reformat(width=size, height=size, format="yuv420p")))
            if len(frames) == n:
                return frames
    return frames


def lossless_clip(path: Path, planes_per_frame, size: int = SIZE) -> Path:
    """An FFV1 (lossless) clip of the given planes: what is decoded is exactly what was made."""
    with av.open(str(path), "w") as out:
        s = out.add_stream("ffv1", rate=25)
        s.width = s.height = size
        s.pix_fmt = "yuv420p"
        _write_planes(s, out, planes_per_frame, size)
    return path


@pytest.fixture(scope="module")
def colour_clip(tmp_path_factory):
    return lossless_clip(tmp_path_factory.mktemp("film") / "colour.mkv", eval_planes())


@pytest.fixture(scope="module")
def bw_clip(tmp_path_factory):
    """The eval clip converted to black and white: its luma, chroma 128 (neutral)."""
    planes = [[y, np.full_like(u, 128), np.full_like(v, 128)] for y, u, v in eval_planes()]
    return lossless_clip(tmp_path_factory.mktemp("film") / "bw.mkv", planes)


def interlaced_source(path: Path, n: int = 6, size=(128, 96), pix_fmt: str = "yuv422p10le") -> Path:
    """An interlaced (top field first) x264 MOV with a timecode track and BT.709 tags."""
    w, h = size
    flags = av.codec.context.Flags
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        cc = s.codec_context
        cc.flags |= flags.interlaced_dct | flags.interlaced_me
        cc.options = {"preset": "ultrafast", "crf": "10"}
        cc.color_primaries = cc.color_trc = cc.colorspace = 1  # BT.709
        s.metadata["timecode"] = "10:00:00:00"
        graph = av.filter.Graph()  # setfield: PyAV cannot flag a frame top-field-first itself
        src = graph.add_buffer(width=w, height=h, format=pix_fmt, time_base=Fraction(1, 25))
        tff, sink = graph.add("setfield", "tff"), graph.add("buffersink")
        src.link_to(tff)
        tff.link_to(sink)
        graph.configure()
        for i in range(n):
            f = av.VideoFrame.from_ndarray(pattern(i, w, h), format="rgb24").reformat(format=pix_fmt)
            f.pts, f.time_base = i, Fraction(1, 25)
            graph.push(f)
            for pkt in s.encode(graph.pull()):
                out.mux(pkt)
        for pkt in s.encode(None):
            out.mux(pkt)
    return path


def stream_props(path: Path) -> dict:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        tc = next((val for meta in [v.metadata, *(s.metadata for s in c.streams if s.type == "data")]
                   for k, val in meta.items() if k.lower() == "timecode"), None)
        frames = list(c.decode(v))
        first = frames[0]
        return {"codec": v.codec_context.name, "pix_fmt": first.format.name, "field_order": v.codec_context.field_order,
                "interlaced": first.interlaced_frame, "timecode": tc, "frames": len(frames),
                "times": [float(f.pts * f.time_base) for f in frames],
                "tags": (first.colorspace, first.color_primaries, first.color_trc)}


def ffprobe(path: Path) -> dict | None:
    if shutil.which("ffprobe") is None:
        return None
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "stream=codec_name,pix_fmt,field_order,color_space:stream_tags=timecode",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["streams"][0]


# -- black and white ---------------------------------------------------------------------

def _restore(src: Path, dst: Path, *extra) -> None:
    assert main([str(src), str(dst), *LITE, "--codec", "ffv1", "--pix-fmt", "yuv420p", *extra]) == 0


def test_black_and_white_clip_keeps_its_chroma_bit_exact(tmp_path, bw_clip, home_with_detectors, capsys):
    _restore(bw_clip, tmp_path / "auto.mkv", "--strength", "1")
    before, after = decoded(bw_clip), decoded(tmp_path / "auto.mkv")
    assert len(after) == len(before) == FRAMES
    assert sum(not np.array_equal(a[0], b[0]) for a, b in zip(after, before)) >= FRAMES // 2  # faces restored
    for a, b in zip(after, before):
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])  # chroma: not one sample changed
    # the control: restored in colour (--no-gray), the same model tints the gray face
    _restore(bw_clip, tmp_path / "colour.mkv", "--no-gray", "--strength", "1")
    tinted = decoded(tmp_path / "colour.mkv")
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(tinted, before))


def test_gray_forced_on_a_colour_clip_leaves_chroma_unchanged(tmp_path, colour_clip, home_with_detectors):
    _restore(colour_clip, tmp_path / "gray.mkv", "--gray", "--strength", "1")
    before, after = decoded(colour_clip), decoded(tmp_path / "gray.mkv")
    assert sum(not np.array_equal(a[0], b[0]) for a, b in zip(after, before)) >= FRAMES // 2
    for a, b in zip(after, before):
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


@pytest.mark.parametrize("fmt", ["yuv420p", "nv12", "yuv444p", "yuv422p10le", "rgb24", "gbrp"])
def test_luma_only_delta_leaves_chroma_alone(fmt):
    from frvideo.io.frames import add_rgb_deltas

    gray = np.repeat(pattern(1, 64, 48)[..., :1], 3, axis=2)
    frame = av.VideoFrame.from_ndarray(gray, format="rgb24").reformat(format=fmt)
    delta = np.zeros((20, 24, 3), np.float32)
    delta[..., 0], delta[..., 1], delta[..., 2] = 0.2, -0.05, 0.1  # a coloured change
    out = add_rgb_deltas(frame, [(8, 10, delta)], luma_only=True)
    if fmt.startswith(("yuv", "nv")):
        a, b = _planes(frame), _planes(out)
        assert not np.array_equal(a[0], b[0])  # luma changed
        assert all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))  # chroma bit for bit
    else:
        rgb = out.to_ndarray(format="rgb24").astype(int)
        assert not np.array_equal(rgb, gray)
        assert np.abs(rgb[..., 0] - rgb[..., 1]).max() <= 1 and np.abs(rgb[..., 2] - rgb[..., 1]).max() <= 1


def test_black_and_white_detection():
    from frvideo.film import looks_black_and_white

    colour = [av.VideoFrame.from_ndarray(pattern(i, 64, 48), format="rgb24").reformat(format="yuv420p")
              for i in range(4)]
    gray = [av.VideoFrame.from_ndarray(np.repeat(pattern(i, 64, 48)[..., :1], 3, axis=2), format="rgb24")
            .reformat(format="yuv420p") for i in range(4)]
    black = [av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24").reformat(format="yuv420p")]
    assert looks_black_and_white(gray)[0] is True
    assert looks_black_and_white(colour)[0] is False
    assert looks_black_and_white(black * 3 + colour)[0] is False  # an opening on black does not decide
    assert looks_black_and_white([f.reformat(format="yuv422p10le") for f in gray])[0] is True


# -- masters ----------------------------------------------------------------------------

@pytest.mark.parametrize("codec, ext, source_fmt", [("ffv1", ".mkv", "yuv422p10le"), ("ffv1", ".mkv", "yuv420p"),
                                                    ("prores", ".mov", "yuv422p10le"), ("prores", ".mov", "yuv420p")])
def test_master_keeps_depth_fields_tags_and_timecode(tmp_path, codec, ext, source_fmt, home_with_detectors):
    src = interlaced_source(tmp_path / "src.mov", pix_fmt=source_fmt)
    source = stream_props(src)
    assert source["field_order"] == 2 and source["timecode"] == "10:00:00:00"  # the source is what we think
    assert source["pix_fmt"] == source_fmt
    out = tmp_path / f"master{ext}"
    assert main([str(src), str(out), "--model", "none", "--detector", "yunet", "-q", "--codec", codec]) == 0
    master = stream_props(out)
    assert master["codec"] == {"ffv1": "ffv1", "prores": "prores"}[codec]
    # FFV1 (lossless) keeps the source's format; ProRes is 10-bit 4:2:2
    assert master["pix_fmt"] == (source_fmt if codec == "ffv1" else "yuv422p10le")
    assert master["field_order"] == 2 and master["interlaced"]  # top field first, coded interlaced
    assert master["timecode"] == "10:00:00:00"
    assert master["tags"] == source["tags"] == (1, 1, 1)
    assert master["times"] == source["times"]
    if codec == "ffv1":  # lossless and no face: every sample as decoded, through the field flagging too
        for a, b in zip(decoded(out), decoded(src)):
            assert all(np.array_equal(pa, pb) for pa, pb in zip(a, b))
    else:
        with av.open(str(out)) as c:
            assert c.streams.video[0].codec_context.profile == "HQ"
        if source_fmt == "yuv420p":  # 8 bits widened to 10 exactly, before ProRes' own (small) loss
            err = [np.abs(a[0].astype(int) - (b[0].astype(int) << 2)).mean() for a, b in zip(decoded(out), decoded(src))]
            assert max(err) < 4, err  # in 10-bit steps
    probed = ffprobe(out)
    if probed is not None:  # and Debian's ffprobe reads the same
        assert probed["field_order"] == "tt" and probed["pix_fmt"] == master["pix_fmt"]
        assert probed["tags"].get("timecode", probed["tags"].get("TIMECODE")) == "10:00:00:00"


def test_master_keeps_a_richer_source(tmp_path, home_with_detectors):
    """12-bit 4:4:4 stays 12-bit 4:4:4 in FFV1; ProRes 4444 takes the 4:4:4 at its 10 bits."""
    src = tmp_path / "src12.mkv"
    with av.open(str(src), "w") as out:
        s = out.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv444p12le"
        for i in range(3):
            f = av.VideoFrame.from_ndarray(pattern(i, 64, 48), format="rgb24").reformat(format="yuv444p12le")
            f.pts, f.time_base = i, Fraction(1, 25)
            for pkt in s.encode(f):
                out.mux(pkt)
        for pkt in s.encode(None):
            out.mux(pkt)
    base = ["--model", "none", "--detector", "yunet", "-q"]
    assert main([str(src), str(tmp_path / "m.mkv"), *base, "--codec", "ffv1"]) == 0
    assert stream_props(tmp_path / "m.mkv")["pix_fmt"] == "yuv444p12le"
    assert decoded(tmp_path / "m.mkv")[1][1].tolist() == decoded(src)[1][1].tolist()  # lossless, same depth
    assert main([str(src), str(tmp_path / "m.mov"), *base, "--codec", "prores"]) == 0
    with av.open(str(tmp_path / "m.mov")) as c:
        assert c.streams.video[0].codec_context.profile == "4444"


def test_master_in_a_container_that_cannot_hold_it(tmp_path, capsys, home_with_detectors):
    src = interlaced_source(tmp_path / "src.mov", n=2)
    assert main([str(src), str(tmp_path / "m.webm"), "--model", "none", "--codec", "prores", "-q"]) == 2
    assert "cannot hold prores" in capsys.readouterr().err
    assert not (tmp_path / "m.webm").exists()


def test_deinterlace_makes_progressive_one_frame_per_frame(tmp_path, home_with_detectors):
    src = interlaced_source(tmp_path / "src.mov")
    out = tmp_path / "progressive.mkv"
    assert main([str(src), str(out), "--model", "none", "--detector", "yunet", "-q", "--codec", "ffv1",
                 "--deinterlace"]) == 0
    source, result = stream_props(src), stream_props(out)
    assert result["field_order"] == 1 and not result["interlaced"]  # progressive
    assert result["frames"] == source["frames"] and result["times"] == source["times"]
    assert result["timecode"] == "10:00:00:00"
    # the frames were filtered (bwdif interpolates one field), not passed through
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(decoded(out), decoded(src)))
    probed = ffprobe(out)
    if probed is not None:
        assert probed["field_order"] == "progressive"


# -- grain ----------------------------------------------------------------------------

def grainy_clip(path: Path, sigma: float = 7.0) -> Path:
    """The eval clip with film-like grain: Gaussian noise blurred to ~1.5 px grains, on luma."""
    rng = np.random.default_rng(7)
    frames = []
    for y, u, v in eval_planes():
        noise = cv2.GaussianBlur(rng.standard_normal(y.shape).astype(np.float32), (0, 0), 0.8)
        noise *= sigma / noise.std()
        frames.append([np.clip(y + noise, 0, 255).astype(np.uint8), u, v])
    return lossless_clip(path, frames)


def face_and_ring_grain(path: Path, faces_log: Path) -> list[tuple[float, float]]:
    """(grain std in the face's centre, grain std in a ring around the face) per frame, with the
    same high-pass + robust std the matcher uses."""
    from frvideo.film import highpass, robust_std

    boxes = {}
    for line in faces_log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("faces"):
            boxes[rec["frame"]] = rec["faces"][0]["box"]
    out = []
    for i, planes in enumerate(decoded(path)):
        if i not in boxes:
            continue
        y = planes[0].astype(np.float32) / 255.0
        r = highpass(y)
        x0, y0, x1, y1 = [int(round(v)) for v in boxes[i]]
        w, h = x1 - x0, y1 - y0
        centre = r[y0 + h // 4:y1 - h // 4, x0 + w // 4:x1 - w // 4]
        ring = np.zeros(y.shape, bool)
        ring[max(0, y0 - h // 2):y1 + h // 2, max(0, x0 - w // 2):x1 + w // 2] = True
        ring[max(0, y0 - h // 8):y1 + h // 8, max(0, x0 - w // 8):x1 + w // 8] = False
        out.append((robust_std(centre.ravel()), robust_std(r[ring])))
    return out


def test_grain_match_puts_the_films_grain_on_the_restored_face(tmp_path, home_with_detectors):
    src = grainy_clip(tmp_path / "grainy.mkv")
    runs = {}
    for grain in ("off", "match"):
        out, log = tmp_path / f"{grain}.mkv", tmp_path / f"{grain}.jsonl"
        assert main([str(src), str(out), *LITE, "--codec", "ffv1", "--pix-fmt", "yuv420p", "--strength", "1",
                     "--grain", grain, "--faces", str(log)]) == 0
        runs[grain] = face_and_ring_grain(out, log)
        assert len(runs[grain]) >= FRAMES // 2
    off = np.median([f / r for f, r in runs["off"]])
    match = np.median([f / r for f, r in runs["match"]])
    assert match > 1.15 * off  # grain was added on the face (lite leaves some of the film's: off ~0.9)
    assert 0.67 < match < 1.5, match  # matched: within a factor 1.5 of the surroundings'
    # the colour clip was seen as colour (restored in colour: its chroma changed) ...
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(decoded(tmp_path / "off.mkv"), decoded(src)))
    # ... and chroma untouched by the grain (it is luma only): same chroma with and without it
    for a, b in zip(decoded(tmp_path / "off.mkv"), decoded(tmp_path / "match.mkv")):
        assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])


def test_grain_matcher_gives_a_cleaned_face_the_grain_around_it():
    """A face the restorer left perfectly smooth gets back grain of the ring's std and size."""
    from frvideo.film import GrainMatcher, highpass, robust_std

    rng = np.random.default_rng(3)
    size, sigma = 240, 0.03
    yy, xx = np.mgrid[0:size, 0:size]
    base = 0.3 + 0.4 * xx / size  # a gradient: grain std is measured per brightness level
    grain = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 1.0)
    grain *= sigma / grain.std()
    rgb = (np.clip(base + grain, 0, 1)[..., None].repeat(3, axis=2) * 255).astype(np.uint8)
    x0, y0, w = 80, 80, 80
    face = ((yy[y0:y0 + w, x0:x0 + w] - (y0 + w / 2)) ** 2 + (xx[y0:y0 + w, x0:x0 + w] - (x0 + w / 2)) ** 2) ** .5
    mask = np.clip((w / 2 - face) / 6, 0, 1).astype(np.float32)  # a soft disc
    frame = rgb[..., 0].astype(np.float32) / 255
    smooth = cv2.GaussianBlur(frame, (0, 0), 4)
    delta = ((smooth - frame)[y0:y0 + w, x0:x0 + w] * mask)[..., None].repeat(3, axis=2)  # grain removed

    def face_ring(d):
        out = frame.copy()
        out[y0:y0 + w, x0:x0 + w] += d[..., 0]
        r = highpass(out)
        core = r[y0:y0 + w, x0:x0 + w][mask > 0.99]
        ring = np.ones(out.shape, bool)
        ring[y0 - 8:y0 + w + 8, x0 - 8:x0 + w + 8] = False
        ring[:y0 - 40], ring[y0 + w + 40:], ring[:, :x0 - 40], ring[:, x0 + w + 40:] = False, False, False, False
        return robust_std(core), robust_std(r[ring]), out

    cleaned, ring, _ = face_ring(delta)
    assert cleaned < 0.3 * ring  # the "restored" face is smooth
    matcher = GrainMatcher((0.299, 0.114))
    added = matcher.apply(rgb, x0, y0, delta, mask, track_id=0, frame_index=0, new_track=True)
    assert np.allclose(added[..., 0], added[..., 1]) and np.allclose(added[..., 0], added[..., 2])  # luma only
    matched, ring, out = face_ring(added)
    assert 0.8 < matched / ring < 1.25, (matched, ring)
    # the grain's size: the neighbour correlation of the added grain is the film's

    def neighbour_corr(r):
        return float((r[:, 1:] * r[:, :-1]).mean() / (r * r).mean())
    film = highpass(frame)[20:60, 20:200]
    synth = highpass(out)[y0 + 25:y0 + w - 25, x0 + 25:x0 + w - 25]
    assert abs(neighbour_corr(synth) - neighbour_corr(film)) < 0.12, (neighbour_corr(synth), neighbour_corr(film))
    # the same frame and track: the same grain (a rerun or a resumed segment is reproducible)
    again = GrainMatcher((0.299, 0.114)).apply(rgb, x0, y0, delta, mask, 0, 0, True)
    assert np.array_equal(added, again)
