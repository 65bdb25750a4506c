"""The command line as a user meets it: real clips end to end, y4m pipes, and
every user mistake answered by one line, a non-zero exit and no output file."""
import os
import subprocess
import sys
from pathlib import Path

import av
import pytest

from clips import make_clip, video_summary
from conftest import MEDIA, need
from frvideo import __version__
from frvideo.cli import main
from frvideo.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE, EXIT_WEIGHTS

FAST = ["--model", "none", "--detector", "yunet", "--preset", "ultrafast", "-q"]


def fails(argv, capsys, code, out_dir=None):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("frvideo: error: "), err
    assert "Traceback" not in err[0]
    if out_dir is not None:
        assert [p.name for p in Path(out_dir).iterdir() if p.suffix in (".mp4", ".mkv")] == [] or \
            all(not p.name.startswith(".") for p in Path(out_dir).iterdir())
    return err[0]


def no_outputs(folder: Path, *keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep) == []


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def test_missing_input(tmp_path, capsys, frvideo_home):
    msg = fails([str(tmp_path / "nope.mp4"), str(tmp_path / "o.mp4")], capsys, EXIT_INPUT)
    assert "not found" in msg and no_outputs(tmp_path, "frvideo_home")


def test_non_video_input(tmp_path, capsys, home_with_detectors):
    txt = tmp_path / "notes.mp4"
    txt.write_text("this is not a video\n" * 50)
    fails([str(txt), str(tmp_path / "o.mp4"), *FAST], capsys, EXIT_INPUT)
    assert not (tmp_path / "o.mp4").exists() and no_outputs(tmp_path, "notes.mp4", "frvideo_home")


def test_truncated_input(tmp_path, capsys, home_with_detectors):
    # index at the end (the usual mp4): a cut file cannot even be opened
    src = make_clip(tmp_path / "full.mp4", n=40, size=(128, 96))
    data = src.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 2 // 3])
    assert "cannot open" in fails([str(cut), str(tmp_path / "o.mp4"), *FAST], capsys, EXIT_INPUT)
    # index first ("faststart", web downloads): the cut is found while decoding, after work was done
    src = make_clip(tmp_path / "fast.mp4", n=40, size=(128, 96), faststart=True)
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    msg = fails([str(cut), str(tmp_path / "o.mp4"), *FAST], capsys, EXIT_INPUT)
    assert "truncated" in msg and "--ignore-damage" in msg
    assert no_outputs(tmp_path, "full.mp4", "fast.mp4", "cut.mp4", "frvideo_home")
    # and the user's way out works
    assert main([str(cut), str(tmp_path / "o.mp4"), *FAST, "--ignore-damage"]) == 0
    assert 0 < len(video_summary(tmp_path / "o.mp4")["times"]) < 40


def test_unwritable_output(tmp_path, capsys, frvideo_home):
    src = make_clip(tmp_path / "a.mp4")
    fails([str(src), str(tmp_path / "missing_dir" / "o.mp4"), *FAST], capsys, EXIT_OUTPUT)
    fails([str(src), str(tmp_path / "o.unknownext"), *FAST], capsys, EXIT_OUTPUT)
    fails([str(src), str(src), *FAST], capsys, EXIT_USAGE)


def test_bad_config(tmp_path, capsys, frvideo_home):
    src = make_clip(tmp_path / "a.mp4")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    fails([str(src), str(tmp_path / "o.mp4"), "--config", str(bad)], capsys, EXIT_CONFIG)
    bad.write_text("no_such_option: 3\n")
    assert "no_such_option" in fails([str(src), str(tmp_path / "o.mp4"), "--config", str(bad)], capsys, EXIT_CONFIG)
    fails([str(src), str(tmp_path / "o.mp4"), "--config", "no-such-preset"], capsys, EXIT_CONFIG)
    assert not (tmp_path / "o.mp4").exists()


def test_bad_option_value(tmp_path, capsys, frvideo_home):
    src = make_clip(tmp_path / "a.mp4")
    fails([str(src), str(tmp_path / "o.mp4"), "--fidelity", "3"], capsys, EXIT_USAGE)
    # an unknown model is a usage mistake like any other bad value (it was 6, the config code)
    fails([str(src), str(tmp_path / "o.mp4"), "--model", "nosuchmodel", "-q"], capsys, EXIT_USAGE)


def test_missing_weights(tmp_path, capsys, frvideo_home):
    src = make_clip(tmp_path / "a.mp4")
    msg = fails([str(src), str(tmp_path / "o.mp4"), "--model", "codeformer", "-q"], capsys, EXIT_WEIGHTS)
    assert "codeformer.pth" in msg and "github.com" in msg and str(frvideo_home / "weights") in msg
    msg = fails([str(src), str(tmp_path / "o.mp4"), *FAST], capsys, EXIT_WEIGHTS)  # no detector weights
    assert "face_detection_yunet_2023mar.onnx" in msg
    corrupt = frvideo_home / "weights" / "codeformer.pth"
    corrupt.write_bytes(b"\0" * 1000)
    msg = fails([str(src), str(tmp_path / "o.mp4"), "--model", "codeformer", "-q"], capsys, EXIT_WEIGHTS)
    assert "corrupt" in msg
    assert not (tmp_path / "o.mp4").exists()


def test_models_lists_backends_and_weights(capsys, home_with_detectors):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "none" in out and "codeformer" in out and "yunet" in out
    assert "ready: " in out and "missing codeformer.pth" in out


def test_models_fetch_copies_installed_file(tmp_path, capsys, home_with_detectors):
    assert main(["models", "fetch", "yunet", "--dest", str(tmp_path / "offline")]) == 0
    assert (tmp_path / "offline" / "face_detection_yunet_2023mar.onnx").stat().st_size > 100000


def test_preset_config(tmp_path, capsys, home_with_detectors):
    src = make_clip(tmp_path / "a.mp4", n=5)
    cfg = tmp_path / "my.yaml"
    cfg.write_text("model: none\ndetector: yunet\npreset: ultrafast\ncrf: 30\nquiet: true\n")
    assert main([str(src), str(tmp_path / "o.mkv"), "--config", str(cfg)]) == 0
    assert len(video_summary(tmp_path / "o.mkv")["times"]) == 5


def _eval_clip(name):
    return need(MEDIA / "videos" / "eval" / name, f"eval clip {name}")


@pytest.mark.parametrize("name", ["retalk_1.mp4", "wda_aoc.mp4", "lp_d13_720x1280_noaudio.mp4"])
def test_real_clip_keeps_frames_timestamps_audio(tmp_path, home_with_detectors, name):
    src = _eval_clip(name)
    dst = tmp_path / "out.mp4"
    assert main([str(src), str(dst), *FAST]) == 0
    a, b = video_summary(src), video_summary(dst)
    assert len(b["times"]) == len(a["times"])
    assert b["times"] == pytest.approx(a["times"], abs=1e-6)
    assert b["size"] == a["size"] and b["rotation"] == a["rotation"]  # portrait stays portrait
    assert [(t, c, p) for t, c, p in a["other"].values()] == [(t, c, p) for t, c, p in b["other"].values()]


def test_y4m_pipe(tmp_path, home_with_detectors):
    src = make_clip(tmp_path / "a.mkv", n=8, size=(96, 64))
    y4m = tmp_path / "in.y4m"
    c = av.open(str(src))
    o = av.open(str(y4m), "w", format="yuv4mpegpipe")
    s = o.add_stream("rawvideo", rate=25)
    s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
    for f in c.decode(video=0):
        f.pts = None
        for p in s.encode(f):
            o.mux(p)
    for p in s.encode(None):
        o.mux(p)
    o.close()
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "frvideo", "-", "-", "--model", "none", "--detector", "yunet", "-q"],
                          stdin=y4m.open("rb"), capture_output=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    out = tmp_path / "out.y4m"
    out.write_bytes(proc.stdout)
    assert proc.stdout.startswith(b"YUV4MPEG2 W96 H64")
    assert len(video_summary(out)["times"]) == 8


@pytest.mark.parametrize("preset", sorted(p.stem for p in (Path(__file__).parent.parent / "configs" / "presets").glob("*.yaml")))
def test_shipped_presets_parse(preset):
    from frvideo.cli import _apply_config, build_parser
    args = _apply_config(build_parser(), ["in.mp4", "out.mp4", "--config", preset])
    assert args.config == preset


def test_precision_auto_follows_the_cpu(monkeypatch, capsys):
    # the capability probe decides: bf16 only on a CPU with bf16 units
    import torch

    from frvideo import cli, hardware
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: True)
    assert cli.auto_precision("cpu") == "bf16"
    assert cli._device_and_dtype("cpu", "auto")[1] == torch.bfloat16
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: False)
    assert cli.auto_precision("cpu") == "fp32"
    assert cli._device_and_dtype("cpu", "auto")[1] == torch.float32
    assert capsys.readouterr().err == ""
    # asked for by name on such a CPU: it runs, with one warning that says what it costs
    assert cli._device_and_dtype("cpu", "bf16")[1] == torch.bfloat16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bf16 units" in err[0] and "slower than fp32" in err[0]


def test_cpu_flags_probe(monkeypatch):
    from frvideo import hardware
    monkeypatch.setattr(hardware.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not hardware.native_bf16_cpu()
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert hardware.native_bf16_cpu()
    assert 1 <= hardware.default_threads() <= 8


def test_default_threads_leave_one_core_beyond_two(monkeypatch):
    from frvideo import hardware
    for cores, threads in ((1, 1), (2, 2), (3, 2), (4, 3), (16, 8), (64, 8)):
        monkeypatch.setattr(hardware, "usable_cores", lambda c=cores: c)
        assert hardware.default_threads() == threads, cores


def test_batch_size_default_follows_the_card_on_a_cpu():
    from frvideo import cli
    from frvideo.models import load_model_config
    from frvideo.restore import Restorer

    def restorer(name):
        r = Restorer.__new__(Restorer)  # the card alone: no network is built
        r.config = load_model_config(name)
        return r

    codeformer, lite = restorer("codeformer"), restorer("lite")
    assert codeformer.cpu_batch_size == 1 and lite.cpu_batch_size is None
    assert cli._default_batch_size(codeformer, "cpu") == 1
    assert cli._default_batch_size(codeformer, "cuda:0") == 4  # batching pays on a GPU
    assert cli._default_batch_size(lite, "cpu") == 4


def test_command_line_keeps_freed_memory(monkeypatch):
    """The CLI's allocator settings: torch's THP switch set before torch loads, unless the user set it."""
    from frvideo import cli
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    cli._keep_freed_memory()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    cli._keep_freed_memory()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_help_and_version_do_not_load_torch():
    import subprocess
    import sys
    code = ("import sys; from frvideo.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr


def test_models_listing_does_not_load_torch():
    """`frvideo models` reads cards and weight files only: it must start as fast as --help."""
    import subprocess
    import sys
    code = ("import sys, io, contextlib; from frvideo.cli import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    rc = main(['models'])\n"
            "print(rc, 'lite' in out.getvalue(), 'torch' in sys.modules, 'cv2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 True False False", out.stdout + out.stderr
