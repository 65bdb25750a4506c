"""Streams and --live with real clients: the Debian ffmpeg on both ends of nut pipes and of
UDP mpegts (audio kept), an rtmp server input, a lavfi device input, and the live driver's
latency budget with a slow restorer (frames never stalled, dropped or reordered)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from clips import make_clip, video_summary
from conftest import FixedFaceDetector
from frvideo.cli import main
from frvideo.errors import EXIT_INPUT, EXIT_OK, EXIT_USAGE
from frvideo.io.reader import InputOptions
from frvideo.io.writer import EncodeOptions
from frvideo.live import LiveOptions, run_live
from frvideo.models import ModelConfig
from frvideo.pipeline import PipelineOptions
from frvideo.restore import Restorer

REPO = Path(__file__).resolve().parent.parent
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg command is not installed "
                                                        "(apt-get install ffmpeg; .ci/run installs it)")
# no weights needed: the identity model, the built-in detector, no temporal filter (fast on 2 cores)
FAST = ["--model", "none", "--detector", "embedded", "--temporal", "off", "--preset", "ultrafast"]


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ffmpeg(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([FFMPEG, "-v", "error", "-nostdin", "-y", *args], **kw)


def synthetic(path: Path, seconds: float = 1.0, audio: str = "aac") -> Path:
    """A clip made by ffmpeg itself: a moving test pattern and a 440 Hz tone."""
    subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=160x120:rate=25:duration={seconds}", "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds}", "-c:v", "libx264", "-preset", "ultrafast",
                    "-c:a", audio, "-shortest", str(path)], check=True, timeout=60)
    return path


def frame_hashes(path: Path) -> dict[int, list[str]]:
    """ffmpeg's framemd5 of every decoded frame, per stream."""
    out = subprocess.run([FFMPEG, "-v", "error", "-nostdin", "-i", str(path), "-f", "framemd5", "-"],
                         capture_output=True, check=True, timeout=60).stdout.decode()
    hashes: dict[int, list[str]] = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            fields = [f.strip() for f in line.split(",")]
            hashes.setdefault(int(fields[0]), []).append(fields[-1])
    return hashes


def frvideo(args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "frvideo", *args], cwd=REPO, env=dict(os.environ), **kw)


def wait_for_line(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until frvideo's stderr (written to ``path``) says ``text``."""
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert proc.poll() is None, path.read_text(errors="replace")
        time.sleep(0.05)
    raise AssertionError(f"frvideo never said {text!r}: {path.read_text(errors='replace')}")


@needs_ffmpeg
def test_ffmpeg_nut_pipes_keep_audio_bit_exact(tmp_path):
    """ffmpeg | frvideo - - --format nut | ffmpeg: auto-detected nut on stdin, nut on stdout,
    every video frame and every audio frame the same as the source's (no face: untouched)."""
    src = synthetic(tmp_path / "src.mkv", audio="pcm_s16le")
    out = tmp_path / "chain.nut"
    head = ffmpeg("-i", str(src), "-c:v", "rawvideo", "-c:a", "copy", "-f", "nut", "-", stdout=subprocess.PIPE)
    mid = frvideo(["-", "-", "--format", "nut", *FAST, "-q"], stdin=head.stdout, stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    head.stdout.close()
    tail = ffmpeg("-f", "nut", "-i", "-", "-c", "copy", str(out), stdin=mid.stdout)
    mid.stdout.close()
    _, err = mid.communicate(timeout=180)
    assert mid.returncode == EXIT_OK, err.decode()
    assert tail.wait(timeout=60) == 0 and head.wait(timeout=60) == 0
    a, b = frame_hashes(src), frame_hashes(out)
    assert len(a[0]) == 25 and len(a[1]) > 0
    assert b[0] == a[0]  # video: bit for bit
    assert b[1] == a[1]  # audio: every frame kept


@needs_ffmpeg
def test_y4m_output_says_it_drops_audio(tmp_path):
    src = synthetic(tmp_path / "src.mp4")
    head = ffmpeg("-i", str(src), "-c:v", "rawvideo", "-c:a", "copy", "-f", "nut", "-", stdout=subprocess.PIPE)
    proc = frvideo(["-", "-", *FAST, "-q"], stdin=head.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head.stdout.close()
    y4m, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_OK
    assert y4m.startswith(b"YUV4MPEG2")
    assert "y4m carries video only" in err.decode()


@needs_ffmpeg
def test_udp_mpegts_in_and_out_with_audio(tmp_path):
    """ffmpeg -> udp mpegts -> frvideo -> udp mpegts -> ffmpeg; the silent input ends the run
    cleanly (exit 0, summary printed) after --input-timeout."""
    src = synthetic(tmp_path / "src.mp4", seconds=2)
    port_in, port_out = free_port(), free_port()
    got = tmp_path / "received.ts"
    log = tmp_path / "frvideo.err"
    with open(log, "wb") as err:
        proc = frvideo([f"udp://127.0.0.1:{port_in}", f"udp://127.0.0.1:{port_out}", *FAST,
                        "--input-timeout", "2"], stderr=err)
        wait_for_line(log, f"opening udp://127.0.0.1:{port_in}", proc)
        receiver = ffmpeg("-timeout", "8000000", "-i", f"udp://127.0.0.1:{port_out}", "-c", "copy", "-f", "mpegts",
                          str(got))
        time.sleep(0.5)
        sender = ffmpeg("-re", "-i", str(src), "-c", "copy", "-f", "mpegts",
                        f"udp://127.0.0.1:{port_in}?pkt_size=1316")
        assert sender.wait(timeout=60) == 0
        assert proc.wait(timeout=120) == EXIT_OK, log.read_text()
        receiver.wait(timeout=60)
    text = log.read_text()
    assert "ended: no data for 2 s (--input-timeout)" in text
    assert "frames (" in text  # the summary
    info = video_summary(got)
    assert len(info["times"]) >= 40  # 50 sent; UDP on loopback loses few if any
    assert np.all(np.diff(info["times"]) > 0)
    (kind, codec, packets), = info["other"].values()
    assert kind == "audio" and codec == "aac" and len(packets) >= 50


@needs_ffmpeg
def test_rtmp_server_input(tmp_path):
    """frvideo listens (--input-option listen=1); ffmpeg publishes flv to it; the publisher
    hanging up ends the run cleanly, with every frame and the audio kept (2 decoder threads: the
    frames a threaded decoder still holds when the sender hangs up are drained, not lost)."""
    src = synthetic(tmp_path / "src.mp4")
    port = free_port(socket.SOCK_STREAM)
    url = f"rtmp://127.0.0.1:{port}/live/test"
    out = tmp_path / "out.mkv"
    log = tmp_path / "frvideo.err"
    with open(log, "wb") as err:
        proc = frvideo([url, str(out), *FAST, "--threads", "2", "--input-option", "listen=1"], stderr=err)
        wait_for_line(log, f"listening on {url}", proc)
        time.sleep(0.5)
        sender = ffmpeg("-re", "-i", str(src), "-c", "copy", "-f", "flv", url)
        assert sender.wait(timeout=60) == 0
        assert proc.wait(timeout=120) == EXIT_OK, log.read_text()
    assert "ended: the sender ended it" in log.read_text()
    info = video_summary(out)
    assert len(info["times"]) == 25
    (kind, codec, packets), = info["other"].values()
    assert kind == "audio" and codec == "aac" and packets


def test_lavfi_device_input(tmp_path):
    """--input-format names the demuxer/device: FFmpeg's lavfi test source as a camera."""
    out = tmp_path / "out.mkv"
    rc = main(["testsrc2=size=128x96:rate=25:duration=0.6", str(out), "--input-format", "lavfi", *FAST, "-q"])
    assert rc == EXIT_OK
    assert len(video_summary(out)["times"]) == 15


def test_network_input_that_never_starts(tmp_path, capsys):
    rc = main([f"udp://127.0.0.1:{free_port()}", str(tmp_path / "o.mkv"), *FAST, "--input-timeout", "0.5"])
    err = capsys.readouterr().err
    assert rc == EXIT_INPUT and "nothing arrived within 0.5 s" in err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, says", [
    (["--max-latency", "100"], "--max-latency: applies with --live"),
    (["--live", "--lookahead", "3"], "--live is causal"),
    (["--format", "nut"], "--format applies to - (stdout) and URLs"),
    (["--input-format", "nosuch"], "FFmpeg cannot read 'nosuch'"),
    (["--input-option", "listen"], "is not KEY=VALUE"),
])
def test_stream_option_errors(tmp_path, capsys, args, says):
    src = make_clip(tmp_path / "a.mp4", n=2)
    rc = main([str(src), str(tmp_path / "o.mkv"), *FAST, *args])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and says in err and len(err.strip().splitlines()) == 1


def test_url_output_format_errors(tmp_path, capsys):
    src = make_clip(tmp_path / "a.mp4", n=2)
    assert main([str(src), "http://127.0.0.1:9/x", *FAST]) == EXIT_USAGE
    assert "--format" in capsys.readouterr().err
    assert main([str(src), "-", *FAST, "--format", "nosuch"]) == EXIT_USAGE
    assert "cannot write 'nosuch'" in capsys.readouterr().err


# -- the latency budget ---------------------------------------------------------------

class NegateRestorer(Restorer):
    """Test double: every face turned into its negative, after ``delay`` seconds."""

    name = "negate"
    input_size = 128  # small crops: the blend around it stays fast on 2 busy cores

    def __init__(self, delay: float = 0.0):
        super().__init__(torch.nn.Identity(), ModelConfig("negate", "negate"))
        self.delay = delay

    def restore(self, faces, ctx):
        time.sleep(self.delay)
        return -faces


def _live_run(tmp_path, delay: float, max_latency: float):
    src = make_clip(tmp_path / "src.mp4", n=25, size=(96, 64))
    dst = tmp_path / "out.nut"
    opts = PipelineOptions(quiet=True, min_face=0, temporal="off", strength=1.0,
                           encode=EncodeOptions(codec="rawvideo"), input=InputOptions())
    t0 = time.monotonic()
    stats, live = run_live(str(src), str(dst), NegateRestorer(delay), FixedFaceDetector(range(1000)), opts,
                           LiveOptions(max_latency=max_latency, stats_interval=0))
    took = time.monotonic() - t0
    return src, dst, stats, live, took


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="gray").astype(int) for f in c.decode(video=0)]


def test_live_slow_restorer_never_stalls(tmp_path):
    """A restorer 3x slower than the budget: every frame still leaves within it, in order, with
    its timestamp; faces whose restoration is late carry their track's last one, and the first
    frames (nothing restored yet) pass through untouched."""
    src, dst, stats, live, took = _live_run(tmp_path, delay=0.35, max_latency=0.12)
    a, b = video_summary(src), video_summary(dst)
    assert stats.frames == live.frames_out == 25 and len(b["times"]) == 25
    assert b["times"] == pytest.approx(a["times"], abs=1e-6)  # same pts, same order
    assert took >= 0.9  # paced at 25 fps like ffmpeg -re, not as fast as it decodes
    kinds = live.kinds.decode()
    assert len(kinds) == 25 and "F" not in kinds  # 0.35 s can never make a 0.12 s budget
    assert live.carried >= 3 and live.raw >= 1 and kinds[0] in "RL"
    assert live.fresh + live.carried + live.raw + live.no_face == 25
    # a stall would grow the latency by 0.35 s a frame (8 s by the end); the budget holds it
    assert live.latency_ms(95) < 500
    src_frames, out_frames = _frames(src), _frames(dst)
    face = (slice(14, 50), slice(24, 56))  # inside the fixed face box
    for kind, x, y in zip(kinds, src_frames, out_frames):
        changed = np.abs(x[face] - y[face]).mean()
        if kind in "RL":
            assert changed == 0  # passed through: the decoded frame itself
        else:
            # carried: the last restoration's change (what the blend keeps of a negated face is small)
            # warped onto this frame's face
            assert changed > 0.1


def test_live_fast_restorer_all_fresh(tmp_path):
    src, dst, stats, live, _ = _live_run(tmp_path, delay=0.0, max_latency=2.0)
    assert live.frames_out == 25 and len(video_summary(dst)["times"]) == 25
    assert live.fresh >= 20, live.kinds.decode()
    assert live.late == 0


def test_live_cli_stats_lines(tmp_path, capsys):
    """--live from the command line: paced, stats lines, the summary with fresh/carried/passed
    through and the added latency."""
    src = make_clip(tmp_path / "src.mp4", n=25, size=(96, 64), audio=True)
    out = tmp_path / "out.mkv"
    assert main([str(src), str(out), *FAST, "--live", "--max-latency", "150", "--stats-interval", "0.4"]) == EXIT_OK
    err = capsys.readouterr().err
    assert err.count("frvideo: live ") >= 1 and "frvideo: live: 25 frames in" in err
    assert "added latency p50" in err and "passed through" in err
    info = video_summary(out)
    assert len(info["times"]) == 25 and info["other"]  # the audio copied from the file


def test_shipped_live_preset_runs(tmp_path):
    """The live preset names the built-in detector (always installed, the quickest) and turns --live on."""
    from frvideo.cli import _apply_config, build_parser
    args = _apply_config(build_parser(), ["in.mp4", "out.mp4", "--config", "live"])
    assert args.live and args.detector == "embedded" and args.lookahead == 0


def test_fractional_rate_paced_by_timestamps(tmp_path):
    """Pacing follows the timestamps, not a nominal rate: 10 frames at 12.5 fps take 0.8 s."""
    src = make_clip(tmp_path / "src.mp4", n=10, size=(96, 64), rate=Fraction(25, 2))
    opts = PipelineOptions(quiet=True, min_face=0, temporal="off", encode=EncodeOptions(codec="rawvideo"))
    t0 = time.monotonic()
    _, live = run_live(str(src), str(tmp_path / "o.nut"), NegateRestorer(), FixedFaceDetector(()), opts,
                       LiveOptions(stats_interval=0))
    assert time.monotonic() - t0 >= 0.7 and live.frames_out == 10 and live.no_face == 10


class SlowFixedFaceDetector(FixedFaceDetector):
    """A face on every frame, found ``delay`` seconds after it was asked for."""

    def __init__(self, delay: float):
        super().__init__(range(10_000))
        self.delay = delay

    def detect(self, image_rgb):
        time.sleep(self.delay)
        return super().detect(image_rgb)


def test_live_frames_detection_is_late_for_carry_onto_predicted_faces(tmp_path):
    """Detection 2x slower than the frame rate: the frames it skips are not passed through raw
    (the output would toggle restored / unrestored) but take their track's carried change at the
    place the track's motion predicts (a still face here: its own place)."""
    src = make_clip(tmp_path / "src.mp4", n=50, size=(96, 64))
    dst = tmp_path / "out.nut"
    opts = PipelineOptions(quiet=True, min_face=0, temporal="off", strength=1.0,
                           encode=EncodeOptions(codec="rawvideo"), input=InputOptions())
    stats, live = run_live(str(src), str(dst), NegateRestorer(0.0), SlowFixedFaceDetector(0.08), opts,
                           LiveOptions(max_latency=0.5, stats_interval=0))
    kinds = live.kinds.decode()
    assert live.frames_out == 50 and len(kinds) == 50
    assert live.predicted >= 10 and kinds.count("P") == live.predicted, kinds
    assert live.predicted <= live.carried
    assert live.fresh + live.carried + live.raw + live.no_face == 50
    # a still face: a predicted frame gets exactly the change a recent fresh restoration made
    # (the blend keeps little of a negated face, sometimes nothing; the carried change is that)
    src_frames, out_frames = _frames(src), _frames(dst)
    face = (slice(14, 50), slice(24, 56))
    deltas = [y[face] - x[face] for x, y in zip(src_frames, out_frames)]
    for i, kind in enumerate(kinds):
        if kind in "RL":
            assert not deltas[i].any()
        elif kind == "P":
            recent = [deltas[j] for j in range(max(0, i - 4), i) if kinds[j] == "F"]
            assert recent and min(np.abs(deltas[i] - d).mean() for d in recent) < 0.5, (i, kinds)
    assert any(deltas[i].any() for i, k in enumerate(kinds) if k == "P")
