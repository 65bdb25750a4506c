"""Video I/O through the whole pipeline: timing, bit depth, size, rotation,
other streams, and untouched pixels (the `none` backend and a fake detector,
so no weights are needed)."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from clips import decoded_planes, make_clip, video_summary
from conftest import FixedFaceDetector
from frvideo.io.writer import EncodeOptions
from frvideo.pipeline import PipelineOptions, run_file
from frvideo.restore import Restorer, load_restorer
from frvideo.models import ModelConfig


class NegateRestorer(Restorer):
    """Test double: turns every face into its negative (a visible change)."""

    name = "negate"

    def __init__(self):
        super().__init__(torch.nn.Identity(), ModelConfig("negate", "negate"))

    def restore(self, faces, ctx):
        return -faces


def run(src, dst, faces=(), restorer=None, bridge=8, **encode):
    opts = PipelineOptions(quiet=True, min_face=0, bridge=bridge, encode=EncodeOptions(preset="ultrafast", **encode))
    return run_file(str(src), str(dst), restorer or load_restorer("none"), FixedFaceDetector(faces), opts)


def test_vfr_timestamps_and_10bit_kept(tmp_path):
    pts = [0, 3000, 9000, 10000, 20000, 21000, 30000, 33000, 40000, 41000, 50000, 60000]
    src = make_clip(tmp_path / "vfr10.mkv", pts=pts, pix_fmt="yuv420p10le")
    dst = tmp_path / "out.mkv"
    run(src, dst, faces=[2, 3])
    a, b = video_summary(src), video_summary(dst)
    assert b["times"] == a["times"]
    assert b["pix_fmt"] == "yuv420p10le"


def test_ntsc_rate_and_audio_packets_kept(tmp_path):
    src = make_clip(tmp_path / "ntsc.mp4", n=30, rate=Fraction(30000, 1001), time_base=Fraction(1, 30000), audio=True)
    dst = tmp_path / "out.mp4"
    stats = run(src, dst, faces=range(0, 30, 2))
    a, b = video_summary(src), video_summary(dst)
    assert stats.frames == 30 and len(b["times"]) == 30
    assert b["times"] == pytest.approx(a["times"], abs=1e-9)
    assert np.allclose(np.diff(b["times"]), 1001 / 30000)
    (_, codec_a, pk_a), = [v for v in a["other"].values()]
    (_, codec_b, pk_b), = [v for v in b["other"].values()]
    assert codec_b == codec_a == "aac" and pk_b == pk_a  # same times, same bytes


@pytest.mark.parametrize("ext", [".mkv", ".mp4"])
def test_rotation_kept(tmp_path, ext):
    src = make_clip(tmp_path / f"rot{ext}", rotation=90)
    dst = tmp_path / f"out{ext}"
    run(src, dst)
    assert video_summary(src)["rotation"] == 90
    assert video_summary(dst)["rotation"] == 90


def test_odd_size(tmp_path, capsys):
    src = make_clip(tmp_path / "odd.mkv", codec="ffv1", size=(721, 405), n=4)
    run(src, tmp_path / "same.mkv", faces=[1])
    out = video_summary(tmp_path / "same.mkv")
    assert out["size"] == (721, 405) and out["codec"] == "ffv1" and out["pix_fmt"] == "yuv420p"
    run(src, tmp_path / "x264.mp4", faces=[1], codec="libx264")
    out = video_summary(tmp_path / "x264.mp4")
    assert out["size"] == (721, 405) and out["pix_fmt"] == "yuv444p"
    assert "odd frame size" in capsys.readouterr().err


def test_subtitles_copied_or_dropped_with_warning(tmp_path, capsys):
    src = make_clip(tmp_path / "subs.mkv", audio=True, subtitles=True)
    run(src, tmp_path / "out.mkv")
    kinds = sorted(t for t, _, _ in video_summary(tmp_path / "out.mkv")["other"].values())
    assert kinds == ["audio", "subtitle"]
    run(src, tmp_path / "out.mp4")  # mp4 cannot hold srt
    kinds = sorted(t for t, _, _ in video_summary(tmp_path / "out.mp4")["other"].values())
    assert kinds == ["audio"]
    assert "dropping subtitle stream" in capsys.readouterr().err


def test_frames_without_faces_are_pixel_identical(tmp_path):
    src = make_clip(tmp_path / "lossless.mkv", codec="ffv1", n=10, size=(96, 64))
    dst = tmp_path / "out.mkv"
    faces = {3, 4, 7}
    run(src, dst, faces=faces, restorer=NegateRestorer(), bridge=0, codec="ffv1")  # no gap filled in
    a, b = decoded_planes(src), decoded_planes(dst)
    assert len(a) == len(b) == 10
    for i in range(10):
        same = all(np.array_equal(pa, pb) for pa, pb in zip(a[i], b[i]))
        assert same == (i not in faces), i
    # on face frames, only the face region changed: the far corner stays as decoded
    for i in faces:
        assert np.array_equal(a[i][0][-4:, -4:], b[i][0][-4:, -4:])


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_order_and_count_with_batching(tmp_path, batch):
    src = make_clip(tmp_path / "b.mkv", codec="ffv1", n=11)
    dst = tmp_path / "out.mkv"
    opts = PipelineOptions(quiet=True, min_face=0, batch_size=batch, bridge=0, encode=EncodeOptions(codec="ffv1"))
    stats = run_file(str(src), str(dst), NegateRestorer(), FixedFaceDetector({0, 1, 2, 5, 9, 10}), opts)
    assert stats.frames == 11 and stats.faces == 6
    assert video_summary(dst)["times"] == video_summary(src)["times"]
    a, b = decoded_planes(src), decoded_planes(dst)
    for i in (3, 4, 6, 7, 8):
        assert all(np.array_equal(pa, pb) for pa, pb in zip(a[i], b[i]))
