"""frvideo.Filter, the frame-by-frame Python API: on a real clip it gives the frames the
CLI writes for the same options (decoded from a lossless ffv1 output), for av.VideoFrame
and numpy input alike; numpy RGB/BGR shapes and dtypes, pts, track state across calls,
and one-line frvideo errors for bad options and bad calls."""
import subprocess
import sys

import av
import numpy as np
import pytest

from conftest import MEDIA, REPO, WEIGHTS, need
from frvideo.cli import main
from frvideo.errors import FrvideoError, UsageError

N_FRAMES = 12
SIZE = 296  # half the clip's 590 px: a big face still, at a quarter of the pixels


def plane_arrays(frame: av.VideoFrame) -> list[np.ndarray]:
    """Each plane's samples without the line padding (8-bit formats)."""
    out = []
    for p in frame.planes:
        width = p.width * (3 if frame.format.name in ("rgb24", "bgr24") else 1)
        out.append(np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :width].copy())
    return out


def decode(path) -> list[av.VideoFrame]:
    with av.open(str(path)) as c:
        return list(c.decode(video=0))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline $FRVIDEO_HOME with the real detector weights, and two lossless cuts of a real
    clip (retalk_3, first 12 frames at 296 px): yuv420p and packed RGB (bgr0)."""
    src = need(MEDIA / "videos" / "eval" / "retalk_3.mp4", "eval clip retalk_3.mp4")
    need(WEIGHTS / "face_detection_yunet_2023mar.onnx", "YuNet weights")
    root = tmp_path_factory.mktemp("filter")
    home = root / "home"
    (home / "weights").mkdir(parents=True)
    for name in ("face_detection_yunet_2023mar.onnx", "detection_mobilenet0.25_Final.pth"):
        if (WEIGHTS / name).exists():  # both: --detector auto would pick retinaface-mobile, not yunet
            (home / "weights" / name).symlink_to(WEIGHTS / name)
    clips = {}
    for pix_fmt in ("yuv420p", "bgr0"):
        path = root / f"clip_{pix_fmt}.mkv"
        with av.open(str(src)) as inp, av.open(str(path), "w") as out:
            v = out.add_stream("ffv1", rate=25)
            v.width, v.height, v.pix_fmt = SIZE, SIZE, pix_fmt
            for i, frame in enumerate(inp.decode(video=0)):
                if i == N_FRAMES:
                    break
                small = frame.reformat(width=SIZE, height=SIZE, format=pix_fmt)
                small.pts = None
                out.mux(v.encode(small))
            out.mux(v.encode(None))
        clips[pix_fmt] = path
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRVIDEO_HOME", str(home))
        mp.setenv("FRVIDEO_OFFLINE", "1")
        yield {"root": root, **clips}


def cli_frames(env, clip: str, name: str, *options) -> list[av.VideoFrame]:
    out = env["root"] / f"{name}.mkv"
    assert main([str(env[clip]), str(out), "--detector", "yunet", "--codec", "ffv1", "-q", *options]) == 0
    return decode(out)


def run_filter(frames, flt) -> list:
    """Every frame through ``flt`` (returning None while it holds frames), then flush()."""
    out = [o for o in (flt.process(f) for f in frames) if o is not None]
    return out + flt.flush()


def test_import_frvideo_filter_does_not_load_torch():
    code = "import sys, frvideo; from frvideo import Filter; print('torch' in sys.modules, Filter.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "Filter"], out.stderr


def test_lite_video_frames_equal_the_cli(env):
    """lite, strength 1 (the clip is clean: auto strength would leave it almost untouched),
    causal: av.VideoFrame in -> av.VideoFrame out at once, pts kept, the CLI's frames exactly."""
    from frvideo import Filter

    expected = cli_frames(env, "yuv420p", "lite", "--model", "lite", "--strength", "1",
                          "--lookahead", "0", "--batch-size", "1")
    given = decode(env["yuv420p"])
    tracks = []
    with Filter(model="lite", detector="yunet", strength=1) as flt:
        assert flt.options.lookahead == 0 and flt.options.batch_size == 1  # the filter's two defaults
        out = []
        for frame in given:
            pts = frame.pts
            restored = flt.process(frame)
            assert isinstance(restored, av.VideoFrame) and restored.pts == pts == flt.last_pts
            assert restored.format.name == "yuv420p" and (restored.width, restored.height) == (SIZE, SIZE)
            out.append(restored)
            tracks.append([f.track_id for f in flt.faces if not f.bridged])
        assert flt.flush() == []
        assert flt.stats.frames == N_FRAMES and flt.stats.faces_changed > 0
    assert len(out) == len(expected) == N_FRAMES
    for i, (a, b) in enumerate(zip(out, expected)):
        for pa, pb in zip(plane_arrays(a), plane_arrays(b)):
            assert np.array_equal(pa, pb), f"frame {i} differs from the CLI's"
    changed = [not np.array_equal(plane_arrays(a)[0], plane_arrays(g)[0]) for a, g in zip(out, decode(env["yuv420p"]))]
    assert sum(changed) >= N_FRAMES // 2  # the comparison is of restored frames, not of copies
    # one face, one track from the first call to the last: the tracker's state carried over
    assert tracks == [[0]] * N_FRAMES


def test_lite_numpy_rgb_equals_the_cli(env):
    """numpy RGB in -> numpy RGB out (same shape, uint8), equal to the CLI's frames of the RGB clip."""
    from frvideo import Filter

    expected = [f.to_ndarray(format="rgb24") for f in
                cli_frames(env, "bgr0", "lite_rgb", "--model", "lite", "--strength", "1",
                           "--lookahead", "0", "--batch-size", "1")]
    given = [f.to_ndarray(format="rgb24") for f in decode(env["bgr0"])]
    with Filter(model="lite", detector="yunet", strength=1) as flt:
        out = [flt.process(rgb.copy()) for rgb in given]
    for i, (a, b) in enumerate(zip(out, expected)):
        assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b), f"frame {i} differs from the CLI's (max {np.abs(a.astype(int) - b).max()})"
    assert sum(not np.array_equal(a, g) for a, g in zip(out, given)) >= N_FRAMES // 2


def test_lookahead_draw_equals_the_cli_with_delay(env):
    """The CLI's own defaults (lookahead 4, batch 4, bridging): the filter holds frames back,
    returns None meanwhile, and flush() gives the rest; all equal to the CLI's. --draw makes
    the frames depend on detection, tracking and the look-ahead landmark smoothing."""
    from frvideo import Filter

    expected = cli_frames(env, "yuv420p", "draw", "--model", "none", "--draw")
    given = decode(env["yuv420p"])
    with Filter(model="none", detector="yunet", draw=True, lookahead=4, batch_size=4) as flt:
        returned = [flt.process(f) for f in given]
        held = flt.flush()
    assert returned[0] is None and held  # delayed output
    out = [f for f in returned if f is not None] + held
    assert [f.pts for f in out] == [f.pts for f in given]  # in order, none lost
    for i, (a, b) in enumerate(zip(out, expected)):
        for pa, pb in zip(plane_arrays(a), plane_arrays(b)):
            assert np.array_equal(pa, pb), f"frame {i} differs from the CLI's"
    assert not np.array_equal(plane_arrays(out[0])[0], plane_arrays(decode(env["yuv420p"])[0])[0])  # boxes drawn


def test_numpy_bgr_uint16_pts(env):
    """channels="bgr": BGR in, BGR out (the RGB result with channels swapped); uint16 RGB stays
    uint16; pts given with a numpy frame comes back as last_pts, with an av.VideoFrame it is set."""
    from frvideo import Filter

    rgb = [f.to_ndarray(format="rgb24") for f in decode(env["bgr0"])[:4]]
    with Filter(model="none", detector="yunet", draw=True) as flt:
        out_rgb = [flt.process(x) for x in rgb]
    with Filter(model="none", detector="yunet", draw=True, channels="bgr") as flt:
        out_bgr = []
        for i, x in enumerate(rgb):
            out_bgr.append(flt.process(np.ascontiguousarray(x[..., ::-1]), pts=1000 + i))
            assert flt.last_pts == 1000 + i
    for a, b, x in zip(out_rgb, out_bgr, rgb):
        assert b.shape == x.shape and b.dtype == np.uint8 and b.flags.c_contiguous
        assert np.array_equal(a, b[..., ::-1])
        assert not np.array_equal(a, x)  # drawn boxes: red (track 0) in RGB, so blue first in BGR
    with Filter(model="none", detector="yunet") as flt:
        deep = flt.process(rgb[0].astype(np.uint16) * 257)
        assert deep.dtype == np.uint16 and np.array_equal(deep, rgb[0].astype(np.uint16) * 257)
        frame = decode(env["yuv420p"])[0]
        assert flt.process(frame.reformat(width=SIZE, height=SIZE), pts=77).pts == 77


def one_line_error(cls, fn, *args, **kwargs) -> str:
    with pytest.raises(cls) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert isinstance(e.value, FrvideoError) and "\n" not in message and message
    return message


def test_bad_options_are_one_line_frvideo_errors(env):
    from frvideo import Filter

    msg = one_line_error(UsageError, Filter, model="nope")
    assert "unknown model 'nope'" in msg and "lite" in msg
    assert "a face detector" in one_line_error(UsageError, Filter, model="yunet")
    assert "unknown detector" in one_line_error(UsageError, Filter, model="none", detector="nope")
    assert "lookahead" in one_line_error(UsageError, Filter, model="none", lookahead=-1)
    assert "must be one of" in one_line_error(UsageError, Filter, model="none", temporal="sometimes")
    assert "true or false" in one_line_error(UsageError, Filter, model="none", draw="yes")
    assert "unknown option 'colour'" in one_line_error(UsageError, Filter, model="none", colour=1)
    for file_option in ("codec", "quiet", "ignore_damage", "faces"):
        assert "not of the filter" in one_line_error(UsageError, Filter, model="none", **{file_option: "x"})
    assert "use reference_image" in one_line_error(UsageError, Filter, model="none", reference_frame=3)
    assert "channels" in one_line_error(UsageError, Filter, model="none", channels="yuv")
    assert "no preset" in one_line_error(FrvideoError, Filter, model="none", config="nope")
    assert "diffusion" in one_line_error(UsageError, Filter, model="lite", steps=4)


def test_preset_and_bad_calls(env):
    from frvideo import Filter

    rgb = decode(env["bgr0"])[0].to_ndarray(format="rgb24")
    # the live preset: batch 1, lookahead 0, the built-in detector (installed everywhere)
    flt = Filter(model="none", config="live")
    assert flt.options.batch_size == 1 and flt.options.lookahead == 0 and flt.detector == "embedded"
    if (WEIGHTS / "detection_mobilenet0.25_Final.pth").exists():
        with Filter(model="none", config="live", detector="yunet") as other:  # the keyword wins over the preset
            assert other.detector == "yunet"
    assert "H x W x 3" in one_line_error(UsageError, flt.process, rgb[..., 0])
    assert "H x W x 3" in one_line_error(UsageError, flt.process, rgb.astype(np.float32))
    assert "numpy array or an av.VideoFrame" in one_line_error(UsageError, flt.process, [1, 2, 3])
    assert flt.process(rgb).shape == rgb.shape
    assert "size changed" in one_line_error(UsageError, flt.process, rgb[:100])
    assert flt.flush() == []
    assert "flushed" in one_line_error(UsageError, flt.process, rgb)
    flt.close()
    flt.close()  # twice: nothing
    assert "closed" in one_line_error(UsageError, flt.process, rgb)
    with Filter(model="none", detector="yunet") as flt:
        flt.process(rgb)
    assert "closed" in one_line_error(UsageError, flt.process, rgb)
    assert "closed" in one_line_error(UsageError, flt.flush)


def run_example(name: str, argv: list) -> int:
    import runpy
    module = runpy.run_path(str(REPO / "examples" / name))
    return module["main"](argv)


def test_examples_run(env, capsys):
    """examples/filter_numpy.py (PyAV in and out, RGB arrays) and filter_opencv.py (BGR arrays)
    on the clip; a bad model name: one line, exit 2, no output file."""
    out = env["root"] / "example.mp4"
    assert run_example("filter_numpy.py", [str(env["yuv420p"]), str(out), "--model", "none",
                                           "--detector", "yunet", "--frames", "5"]) == 0
    assert len(decode(out)) == 5
    avi = env["root"] / "example.avi"
    assert run_example("filter_opencv.py", [str(env["yuv420p"]), "--out", str(avi), "--model", "none",
                                            "--detector", "yunet", "--frames", "4"]) == 0
    assert len(decode(avi)) == 4
    capsys.readouterr()
    bad = env["root"] / "bad.mp4"
    assert run_example("filter_numpy.py", [str(env["yuv420p"]), str(bad), "--model", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'nope'" in err[0] and not bad.exists()


def test_options_and_unclosed_filter(env):
    """Options as the CLI parses them (a set of track ids like --tracks 0,2); a Filter dropped
    without close() stops its worker thread when it is collected."""
    import gc
    import threading

    from frvideo import Filter

    rgb = decode(env["bgr0"])[0].to_ndarray(format="rgb24")
    flt = Filter(model="none", detector="yunet", tracks={2, 0}, temporal="tokens", min_face=40)
    assert flt.options.track_ids == {0, 2} and flt.options.temporal == "tokens" and flt.options.min_face == 40
    flt.process(rgb)
    worker = next(t for t in threading.enumerate() if t.name == "frvideo-filter" and t.is_alive())
    del flt
    gc.collect()
    worker.join(timeout=30)
    assert not worker.is_alive()
