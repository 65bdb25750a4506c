"""frvideo batch: real clips (cut short from ../shared/media) plus a broken file, kill -9 at
random points and resume, skip of done work, provenance, the report, Ray local == local.

Kept fast: 18/8-frame clips at 128 px, the shipped lite model, 0.2 s segments (keyframes
every 6 frames: 3 segments), one uninterrupted batch shared by the module (its manifest
adds an x264 output of the same clip).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest

from batch_clips import cut_clip
from conftest import MEDIA, REPO, WEIGHTS, need

ARGS = ["--model", "lite", "--detector", "yunet", "--segment-seconds", "0.2", "--warmup-frames", "3",
        "--lookahead", "2", "--bridge", "2", "--threads", "1", "-q"]
LOSSLESS = ["--codec", "ffv1", "--ext", ".mkv"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """$FRVIDEO_HOME with the real detector weights, offline; one thread."""
    need(WEIGHTS / "face_detection_yunet_2023mar.onnx", "YuNet weights")
    home = tmp_path_factory.mktemp("home")
    (home / "weights").mkdir()
    (home / "weights" / "face_detection_yunet_2023mar.onnx").symlink_to(WEIGHTS / "face_detection_yunet_2023mar.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRVIDEO_HOME", str(home))
        mp.setenv("FRVIDEO_OFFLINE", "1")
        mp.setenv("OMP_NUM_THREADS", "1")
        yield home


@pytest.fixture(scope="module")
def clips(env, tmp_path_factory):
    eval_dir = need(MEDIA / "videos" / "eval", "eval clips")
    folder = tmp_path_factory.mktemp("clips")
    (folder / "sub").mkdir()
    cut_clip(eval_dir / "wda_aoc.mp4", folder / "wda.mp4", frames=18, width=128, gop=6)
    cut_clip(eval_dir / "retalk_3.mp4", folder / "sub" / "retalk.mp4", frames=8, width=128, gop=8)
    (folder / "broken.mp4").write_bytes(b"this is not a video\n" * 20)
    # a manifest beside the folder: the same clip again, into x264 (per-file options)
    (folder.parent / "x264.jsonl").write_text(json.dumps({"input": str(folder / "wda.mp4"), "output": "wda_x264.mp4",
                                                          "options": "--codec libx264"}) + "\n")
    return folder


def batch(argv) -> int:
    from frvideo.cli import main
    return main(["batch", *argv])


@pytest.fixture(scope="module")
def reference(clips, tmp_path_factory):
    """One uninterrupted batch of the folder (2 real clips and a broken file) and the manifest."""
    out = tmp_path_factory.mktemp("ref")
    t = time.perf_counter()
    code = batch([str(clips), str(clips.parent / "x264.jsonl"), "--out", str(out), *ARGS, *LOSSLESS, "--framemd5"])
    return {"out": out, "code": code, "seconds": time.perf_counter() - t}


def decoded(path: Path):
    """(pts in seconds, planes) of every frame of the first video stream."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [(round(float(f.pts * s.time_base), 3), f.to_ndarray()) for f in c.decode(s)]


def jobs(out: Path) -> dict:
    db = sqlite3.connect(out / ".frvideo" / "journal.sqlite")
    db.row_factory = sqlite3.Row
    rows = {r["output"]: dict(r) for r in db.execute("SELECT * FROM jobs")}
    for key, row in rows.items():
        row["segments"] = [dict(s) for s in db.execute("SELECT * FROM segments WHERE output = ? ORDER BY idx", (key,))]
    db.close()
    return rows


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- a batch with a broken file ---------------------------------------------------------

def test_broken_file_is_reported_and_the_others_done(clips, reference, capsys):
    out = reference["out"]
    assert reference["code"] == 7  # EXIT_BATCH_FAILED: something failed
    assert (out / "wda.mkv").is_file() and (out / "sub" / "retalk.mkv").is_file()  # relative paths kept
    assert not (out / "broken.mkv").exists()
    state = jobs(out)
    assert state["broken.mkv"]["state"] == "failed" and "broken.mp4" in state["broken.mkv"]["error"]
    assert state["wda.mkv"]["state"] == state["sub/retalk.mkv"]["state"] == state["wda_x264.mp4"]["state"] == "done"
    assert len(state["wda.mkv"]["segments"]) == 3  # keyframes every 6 frames, 0.2 s segments
    with av.open(str(out / "wda_x264.mp4")) as c:
        assert c.streams.video[0].codec_context.name == "h264"
    for name, src in (("wda.mkv", "wda.mp4"), ("sub/retalk.mkv", "sub/retalk.mp4"), ("wda_x264.mp4", "wda.mp4")):
        got, want = [t for t, _ in decoded(out / name)], [t for t, _ in decoded(clips / src)]
        # every frame, once, at its time; Matroska starts the streams at the AAC priming delay
        # (23 ms at 44.1 kHz), as `frvideo IN OUT.mkv` does: the same shift for every frame
        shift = got[0] - want[0]
        assert 0 <= shift < 0.03 and [round(t - shift, 3) for t in got] == want
        with av.open(str(out / name)) as c:
            assert [s.type for s in c.streams] == ["video", "audio"]  # the source's audio copied
    # nothing half-written is left anywhere
    assert not [p for p in out.rglob("*") if ".partial-" in p.name or ".tmp-" in p.name]
    assert not list((out / ".frvideo" / "segments").rglob("*.mkv"))
    capsys.readouterr()
    assert batch(["--status", str(out)]) == 7
    table = capsys.readouterr().out
    assert "failed" in table and "broken.mkv" in table and "wda.mkv" in table and "3/3" in table


def test_provenance_sidecar_and_framemd5(clips, reference):
    out = reference["out"]
    side = json.loads((out / "wda.mkv.frvideo.json").read_text())
    import frvideo
    assert side["frvideo_version"] == frvideo.__version__
    assert side["input"] == {"path": str((clips / "wda.mp4").resolve()), "size": (clips / "wda.mp4").stat().st_size,
                             "sha256": sha256(clips / "wda.mp4")}
    assert side["output"]["sha256"] == sha256(out / "wda.mkv")
    assert side["model"]["name"] == "lite"
    assert side["model"]["weights_sha256"] == sha256(REPO / "plugins" / "lite" / "weights" / "lite.pth")
    assert side["detector"]["name"] == "yunet"
    assert side["detector"]["weights_sha256"] == sha256(WEIGHTS / "face_detection_yunet_2023mar.onnx")
    assert side["options"]["codec"] == "ffv1" and side["options"]["temporal"] == "full"
    assert side["batch_options"]["segment_seconds"] == 0.2 and side["batch_options"]["warmup_frames"] == 3
    assert side["frames"]["output"] == side["frames"]["planned"] == 18
    assert 0 < side["frames"]["with_faces"] <= 18 and side["faces"] >= side["frames"]["with_faces"]
    assert side["seconds"] > 0 and len(side["segments"]) == 3 and side["references"] == []  # lite: no keyframes
    assert json.loads((out / "wda_x264.mp4.frvideo.json").read_text())["options"]["codec"] == "libx264"
    # --framemd5: one line per decoded frame, the md5 of its samples...
    lines = [line for line in (out / "wda.mkv.framemd5").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 18
    md5s = [line.split(",")[-1].strip() for line in lines]
    with av.open(str(out / "wda.mkv")) as c:
        planes = [f.to_ndarray() for f in c.decode(video=0)]
    assert md5s[0] == hashlib.md5(planes[0].tobytes()).hexdigest()  # yuv420p: to_ndarray packs the planes
    # ... the very hashes FFmpeg's own framemd5 muxer prints
    if shutil.which("ffmpeg"):
        text = subprocess.run(["ffmpeg", "-v", "error", "-noautorotate", "-i", str(out / "wda.mkv"), "-map", "0:v",
                               "-fps_mode", "passthrough", "-f", "framemd5", "-"],
                              capture_output=True, text=True, check=True).stdout
        assert [line.split(",")[-1].strip() for line in text.splitlines() if not line.startswith("#")] == md5s


def test_rerun_skips_done_work(clips, reference, capsys):
    out = reference["out"]
    before = {p: (p.stat().st_mtime_ns, sha256(p)) for p in (out / "wda.mkv", out / "sub" / "retalk.mkv",
                                                              out / "wda_x264.mp4")}
    tries = {k: v["tries"] for k, v in jobs(out).items()}
    os.utime(clips / "wda.mp4")  # touched, same content: hashed again, still unchanged
    t = time.perf_counter()
    assert batch([str(clips), str(clips.parent / "x264.jsonl"), "--out", str(out), *ARGS, *LOSSLESS,
                  "--framemd5"]) == 7  # broken fails again
    assert time.perf_counter() - t < reference["seconds"] / 2
    assert {p: (p.stat().st_mtime_ns, sha256(p)) for p in before} == before
    after = jobs(out)
    assert after["wda.mkv"]["tries"] == tries["wda.mkv"] and after["sub/retalk.mkv"]["tries"] == tries["sub/retalk.mkv"]
    assert after["broken.mkv"]["tries"] == tries["broken.mkv"] + 1


def test_retries_then_failed(clips, env, tmp_path):
    out = tmp_path / "out"
    assert batch([str(clips / "broken.mp4"), "--out", str(out), *ARGS, "--retries", "2"]) == 7
    row = jobs(out)["broken.mp4"]
    assert (row["state"], row["tries"]) == ("failed", 3) and "broken.mp4 as a video" in row["error"]


def test_report_has_a_row_per_file_with_thumbnails(reference):
    page = (reference["out"] / "report.html").read_text()
    assert page.count("<tr>") == 5  # header + 4 files
    assert page.count("data:image/png;base64,") == 3  # before | after of the largest face of each done file
    assert "broken.mkv" in page and 'class="state failed"' in page and page.count('class="state done"') == 3


# -- kill -9 and resume -------------------------------------------------------------------

def _killed_then_resumed(clips: Path, out: Path, extra: list, output: str, seed: int, budget: float) -> dict:
    """Start the batch of wda.mp4 in a forked child (the real command line, models loaded
    afresh), SIGKILL it at a random moment, then run the same command again."""
    argv = [str(clips / "wda.mp4"), "--out", str(out), *ARGS, *extra]
    delay = random.Random(seed).uniform(0.15, 0.85) * budget
    pid = os.fork()
    if pid == 0:  # the child: killed with no chance to clean up
        code = 1
        try:
            code = batch(argv)
        finally:
            os._exit(code)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    journal = out / ".frvideo" / "journal.sqlite"
    before = jobs(out).get(output) if journal.exists() else None
    done_before = sum(s["state"] == "done" for s in before["segments"]) if before else 0
    assert batch(argv) == 0
    return {"killed": killed, "delay": delay, "done_before": done_before}


@pytest.mark.parametrize("seed", [11, 23])
def test_kill_9_then_resume_is_bit_exact(clips, reference, tmp_path, seed):
    segment_time = sum(s["seconds"] for s in jobs(reference["out"])["wda.mkv"]["segments"])
    r = _killed_then_resumed(clips, tmp_path / "out", LOSSLESS, "wda.mkv", seed, segment_time + 2.0)
    got, want = decoded(tmp_path / "out" / "wda.mkv"), decoded(reference["out"] / "wda.mkv")
    assert [t for t, _ in got] == [t for t, _ in want], r  # no frame lost, none duplicated
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want)), r  # lossless: bit for bit
    segments = jobs(tmp_path / "out")["wda.mkv"]["segments"]
    # what the killed run finished was kept, not redone
    assert sum(s["run"] == 1 for s in segments) == r["done_before"], r
    assert not [p for p in (tmp_path / "out").rglob("*") if ".partial-" in p.name]


def test_kill_9_then_resume_x264(clips, reference, tmp_path):
    """x264 (the input's codec): same frames, same timestamps, PSNR >= 45 dB against the
    uninterrupted run (bit-exact in fact: every run encodes the very same segments)."""
    segment_time = sum(s["seconds"] for s in jobs(reference["out"])["wda_x264.mp4"]["segments"])
    r = _killed_then_resumed(clips, tmp_path / "out", ["--codec", "libx264"], "wda.mp4", 5, segment_time + 2.0)
    got, want = decoded(tmp_path / "out" / "wda.mp4"), decoded(reference["out"] / "wda_x264.mp4")
    assert [t for t, _ in got] == [t for t, _ in want], r
    for (_, a), (_, b) in zip(got, want):
        mse = np.mean((a.astype(np.float64) - b) ** 2)
        assert mse == 0 or 10 * np.log10(255 ** 2 / mse) >= 45, r


# -- sources, manifests, plan, usage --------------------------------------------------------

def test_manifests_csv_and_jsonl(tmp_path):
    from frvideo.batch.command import _file_settings, _settings, build_batch_parser
    from frvideo.batch.sources import collect_sources
    from frvideo.errors import ConfigError

    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "list.csv").write_text("input,output,options,fidelity,only_largest\n"
                                       "a.mp4,restored/a.mkv,--temporal tokens,0.7,true\n"
                                       "b.avi,,,,\n")
    (tmp_path / "list.jsonl").write_text('{"input": "a.mp4", "output": "j/a", "options": ["--min-face", "40"]}\n')
    found = collect_sources([str(tmp_path / "list.csv"), str(tmp_path / "list.jsonl")], tmp_path / "out", None)
    assert [j.output for j in found] == ["restored/a.mkv", "b.avi", "j/a.mp4"]
    assert found[0].input == (tmp_path / "a.mp4").resolve() and found[0].options == ["--temporal", "tokens"]
    base = _settings(build_batch_parser().parse_args(["x", "--out", "o"]))
    first = _file_settings(base, found[0])
    assert (first["temporal"], first["fidelity"], first["only_largest"]) == ("tokens", 0.7, True)
    assert _file_settings(base, found[2])["min_face"] == 40 and base["min_face"] == 24
    (tmp_path / "bad.jsonl").write_text('{"input": "a.mp4", "fidelity": 7}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1: fidelity"):
        _file_settings(base, collect_sources([str(tmp_path / "bad.jsonl")], tmp_path / "out", None)[0])
    (tmp_path / "twice.csv").write_text("input,output\na.mp4,x.mp4\nb.mp4,X.mp4\n")
    with pytest.raises(Exception, match="same output"):
        collect_sources([str(tmp_path / "twice.csv")], tmp_path / "out", None)


def test_plan_cuts_at_keyframes_with_warmup(clips):
    from frvideo.batch.segments import plan_segments
    spans = plan_segments(str(clips / "wda.mp4"), 0.2, 4, 8)
    step = 512  # 1/12800 s units per frame at 25 fps
    assert [s["start_pts"] for s in spans] == [None, 6 * step, 12 * step]
    assert [s["end_pts"] for s in spans] == [6 * step, 12 * step, None]
    assert [s["warm_pts"] for s in spans] == [None, 2 * step, 8 * step]
    assert [s["seek_frame"] for s in spans] == [0, 0, 6]  # the keyframe before the warm-up
    assert [s["planned_frames"] for s in spans] == [6, 6, 6] and [s["tail"] for s in spans] == [8, 8, 0]
    assert len(plan_segments(str(clips / "wda.mp4"), 0, 4, 8)) == 1  # 0: never cut


@pytest.mark.parametrize("argv, code, words", [
    (["--out", "o"], 2, "give the videos"),
    (["x.mp4"], 2, "--out DIR is required"),
    (["x.mp4", "--out", "o", "--workers", "2"], 2, "applies to --engine ray"),
    (["nosuch.mp4", "--out", "o"], 3, "not found"),
    (["--status", "nosuch_dir"], 3, "no batch journal"),
])
def test_usage_errors(tmp_path, capsys, monkeypatch, argv, code, words):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "x.mp4":
        (tmp_path / "x.mp4").write_bytes(b"x")
    assert batch(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("frvideo: error:") and words in err[0]


# -- Ray ---------------------------------------------------------------------------------

def test_ray_local_mode_equals_local_engine(clips, reference, tmp_path, monkeypatch, capsys):
    """--engine ray in local mode (2 workers): the same decoded frames as the local engine; the
    journal is the same, so the local engine then finds the file done."""
    pytest.importorskip("ray", reason="Ray not installed (pip install 'frvideo[ray]')")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "ray"
    assert batch([str(clips / "wda.mp4"), "--out", str(out), *ARGS, *LOSSLESS, "--engine", "ray", "--workers", "2"]) == 0
    got, want = decoded(out / "wda.mkv"), decoded(reference["out"] / "wda.mkv")
    assert [t for t, _ in got] == [t for t, _ in want]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(got, want))
    state = jobs(out)["wda.mkv"]
    assert state["engine"] == "ray" and len({s["worker"] for s in state["segments"]}) >= 1
    assert json.loads((out / "wda.mkv.frvideo.json").read_text())["engine"] == "ray"
    capsys.readouterr()
    assert batch([str(clips / "wda.mp4"), "--out", str(out), *ARGS[:-1], *LOSSLESS]) == 0
    assert "skipped" in capsys.readouterr().err


def test_segmented_master_keeps_timecode_and_frames(env, tmp_path):
    """A MOV with a start timecode, cut into 2 segments, joined into ProRes: the output starts
    at the source's timecode (not a segment's) and has every frame."""
    from clips import pattern
    src = tmp_path / "in" / "tc.mov"
    src.parent.mkdir()
    out = av.open(str(src), "w")
    v = out.add_stream("libx264", rate=25)
    v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
    v.codec_context.options = {"preset": "ultrafast", "g": "6", "keyint_min": "6", "sc_threshold": "0"}
    v.metadata["timecode"] = "01:00:00:00"
    for i in range(12):
        f = av.VideoFrame.from_ndarray(pattern(i, 96, 64), format="rgb24").reformat(format="yuv420p")
        f.pts = i
        for pkt in v.encode(f):
            out.mux(pkt)
    for pkt in v.encode(None):
        out.mux(pkt)
    out.close()
    dest = tmp_path / "out"
    assert batch([str(src.parent), "--out", str(dest), *ARGS, "--codec", "prores_ks"]) == 0
    assert len(jobs(dest)["tc.mov"]["segments"]) == 2
    with av.open(str(dest / "tc.mov")) as c:
        assert c.streams.video[0].codec_context.name == "prores"
        assert c.streams.video[0].metadata.get("timecode") == "01:00:00:00"
    assert [t for t, _ in decoded(dest / "tc.mov")] == [t for t, _ in decoded(src)]
