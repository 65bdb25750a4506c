"""A generated corpus of hostile cases, run as a careless or hostile user would.

Every case asserts the same four things: the documented exit code, exactly one
line on stderr (the error, or the one warning of a run that succeeds), no file
left beside the target (no partial, no stray output), and every input file
(video, config, weights) unchanged. Classes: inputs, outputs, weights,
configs, options, signals, pipes. Most cases fail before any model loads, so
the whole corpus stays fast; run cases use tiny generated clips with
``--model none`` and the real YuNet detector (``home_with_detectors``).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import pty
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Optional

import av
import numpy as np
import pytest
import torch

from clips import make_clip
from frvideo.cli import build_parser, main
from frvideo.errors import EXIT_CONFIG, EXIT_INPUT, EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, EXIT_WEIGHTS

REPO = Path(__file__).resolve().parent.parent
LITE = REPO / "plugins" / "lite" / "weights" / "lite.pth"
FAST = ["--model", "none", "--detector", "yunet", "--preset", "ultrafast", "-q"]
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root reads and writes whatever the mode bits say


# -- material -------------------------------------------------------------------------

def write_y4m(path: Path, n: int = 5, size=(64, 48)) -> Path:
    w, h = size
    out = av.open(str(path), "w", format="yuv4mpegpipe")
    s = out.add_stream("rawvideo", rate=25)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        f = av.VideoFrame.from_ndarray(np.full((h, w, 3), 30 * i, np.uint8), format="rgb24").reformat(format="yuv420p")
        for p in s.encode(f):
            out.mux(p)
    for p in s.encode(None):
        out.mux(p)
    out.close()
    return path


FRAME_BYTES = 64 * 48 * 3 // 2 + len(b"FRAME\n")


class Work:
    """The files of one case, made on demand in its own folder."""

    def __init__(self, root: Path):
        self.root = root

    def p(self, name: str) -> Path:
        return self.root / name

    def clip(self, name="a.mp4", **kw) -> str:
        path = self.p(name)
        if not path.exists():
            make_clip(path, **{"n": 6, "size": (96, 64), **kw})
        return str(path)

    def y4m(self, name="in.y4m", cut: int = 0) -> str:
        path = self.p(name)
        write_y4m(path)
        if cut:
            data = path.read_bytes()
            path.write_bytes(data[:-cut])
        return str(path)

    def text(self, name: str, content: str | bytes) -> str:
        path = self.p(name)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return str(path)

    def config(self, yaml_text: str) -> str:
        return self.text("cfg.yaml", yaml_text)

    def fifo(self, name: str) -> str:
        path = self.p(name)
        os.mkfifo(path)
        return str(path)

    def weights(self, name: str, make: Callable[[Path], None]) -> str:
        path = self.p(name)
        make(path)
        return str(path)

    def out(self, name="o.mp4") -> str:
        return str(self.p(name))


def lite_state() -> dict:
    return torch.load(LITE, map_location="cpu", weights_only=True)


def flipped(path: Path, count: int = 1000) -> None:
    data = bytearray(LITE.read_bytes())
    mid = len(data) // 2
    for i in range(mid, mid + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def with_value(value: float):
    def make(path: Path) -> None:
        ck = lite_state()
        state = ck["params_ema"] if "params_ema" in ck else ck["params"]
        key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 10)
        state[key] = state[key].clone().contiguous()
        state[key].view(-1)[3] = value
        torch.save(ck, path)
    return make


class _Evil:
    """A pickle that would run a command if torch.load ran pickle code (weights_only must refuse it)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_pickle(path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"params_ema": _Evil(path.with_suffix(".pwned"))}, f)


def evil_zip(path: Path) -> None:
    torch.save({"params_ema": _Evil(path.with_suffix(".pwned"))}, path)


# -- the corpus -------------------------------------------------------------------------

@dataclass
class Case:
    kind: str
    name: str
    argv: Callable[[Work], list[str]]
    code: int
    says: Optional[str] = None  # a word the one line must contain
    makes_target: bool = False  # success: the target (and only it) appears
    target: str = "o.mp4"
    skip: Optional[str] = None
    lines: int = 1  # stderr lines: the error or the one warning (0: a clean, quiet success)

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.name}"


def C(kind, name, argv, code, says=None, **kw) -> Case:
    return Case(kind, name, argv, code, says, **kw)


INPUTS = [
    C("inputs", "missing", lambda w: [w.out("missing.mp4"), w.out(), *FAST], EXIT_INPUT, "not found"),
    C("inputs", "directory", lambda w: [str(w.root), w.out(), *FAST], EXIT_INPUT, "directory"),
    C("inputs", "empty", lambda w: [w.text("e.mp4", b""), w.out(), *FAST], EXIT_INPUT, "empty"),
    C("inputs", "text-as-mp4", lambda w: [w.text("t.mp4", "not a video\n" * 40), w.out(), *FAST], EXIT_INPUT),
    C("inputs", "random-bytes", lambda w: [w.text("r.mkv", os.urandom(5000)), w.out(), *FAST], EXIT_INPUT),
    C("inputs", "empty-name", lambda w: ["", w.out(), *FAST], EXIT_INPUT),
    C("inputs", "mp4-cut", lambda w: [w.text("cut.mp4", Path(w.clip("full.mp4", n=30)).read_bytes()[:3000]),
                                      w.out(), *FAST], EXIT_INPUT),
    C("inputs", "faststart-cut", lambda w: [w.text("cut.mp4", (lambda b: b[:len(b) * 2 // 3])(
        Path(w.clip("fs.mp4", n=40, faststart=True)).read_bytes())), w.out(), *FAST], EXIT_INPUT, "--ignore-damage"),
    C("inputs", "y4m-cut-mid-frame", lambda w: [w.y4m(cut=1000), w.out(), *FAST], EXIT_INPUT, "--ignore-damage"),
    C("inputs", "y4m-cut-in-frame-header", lambda w: [w.y4m(cut=FRAME_BYTES - 3), w.out(), *FAST], EXIT_INPUT,
      "--ignore-damage"),
    C("inputs", "y4m-cut-with-ignore-damage", lambda w: [w.y4m(cut=1000), w.out(), *FAST, "--ignore-damage"],
      EXIT_OK, "warning", makes_target=True),
    C("inputs", "y4m-header-only", lambda w: [w.text("h.y4m", "YUV4MPEG2 W64 H48 F25:1 Ip A1:1 C420jpeg\n"),
                                              w.out(), *FAST], EXIT_INPUT),
    C("inputs", "y4m-bad-header", lambda w: [w.text("b.y4m", "YUV4MPEG2 W-4 H0 F0:0\nFRAME\n" + "x" * 100),
                                             w.out(), *FAST], EXIT_INPUT),
    C("inputs", "same-as-output", lambda w: [w.clip(), w.clip(), *FAST], EXIT_USAGE, "overwrite"),
    C("inputs", "hardlink-as-output", lambda w: [w.clip(), (os.link(w.clip(), w.p("link.mp4")), w.out("link.mp4"))[1],
                                                 *FAST], EXIT_USAGE, "overwrite"),
    C("inputs", "symlink-as-output", lambda w: [w.clip(), (w.p("sl.mp4").symlink_to(w.clip()), w.out("sl.mp4"))[1],
                                                *FAST], EXIT_USAGE, "overwrite"),
    C("inputs", "unreadable", lambda w: [(w.clip(), os.chmod(w.clip(), 0), w.clip())[2], w.out(), *FAST], EXIT_INPUT,
      "readable", skip="root reads any file" if ROOT else None),
    C("inputs", "tiny-1x1", lambda w: [w.clip("one.mkv", n=3, size=(1, 1), codec="ffv1", pix_fmt="yuv444p"),
                                       w.out("o.mkv"), *FAST], EXIT_OK, None, makes_target=True, target="o.mkv", lines=0),
    C("inputs", "metrics-on-1x1", lambda w: ["metrics", w.clip("one.mkv", n=3, size=(1, 1), codec="ffv1",
                                                               pix_fmt="yuv444p"), w.clip("one.mkv")], EXIT_USAGE,
      "SSIM"),
    C("inputs", "metrics-missing", lambda w: ["metrics", w.clip(), w.out("none.mp4")], EXIT_INPUT, "not found"),
]

OUTPUTS = [
    C("outputs", "folder-missing", lambda w: [w.clip(), str(w.p("no/such/o.mp4")), *FAST], EXIT_OUTPUT, "folder"),
    C("outputs", "unknown-extension", lambda w: [w.clip(), w.out("o.xyz"), *FAST], EXIT_OUTPUT, "container"),
    C("outputs", "no-extension", lambda w: [w.clip(), w.out("o"), *FAST], EXIT_OUTPUT, "container"),
    C("outputs", "is-directory", lambda w: [w.clip(), (w.p("d.mp4").mkdir(), w.out("d.mp4"))[1], *FAST], EXIT_OUTPUT,
      "directory"),
    C("outputs", "is-fifo", lambda w: [w.clip(), w.fifo("f.mp4"), *FAST], EXIT_OUTPUT, "regular"),
    C("outputs", "dev-full", lambda w: [w.clip(), "/dev/full", *FAST], EXIT_OUTPUT),
    C("outputs", "empty-name", lambda w: [w.clip(), "", *FAST], EXIT_OUTPUT, "empty"),
    C("outputs", "y4m-with-x264", lambda w: [w.clip(), w.out("o.y4m"), *FAST, "--codec", "libx264"], EXIT_USAGE,
      "raw video"),
    C("outputs", "webm-with-prores", lambda w: [w.clip(), w.out("o.webm"), *FAST, "--codec", "prores_ks"], EXIT_USAGE,
      "cannot hold"),
    C("outputs", "folder-not-writable", lambda w: [w.clip(), (w.p("ro").mkdir(mode=0o555), str(w.p("ro/o.mp4")))[1],
                                                   *FAST], EXIT_OUTPUT, "writable",
      skip="root writes anywhere" if ROOT else None),
]

WEIGHTS = [
    C("weights", "missing", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights", w.out("x.pth")],
      EXIT_WEIGHTS, "not found"),
    C("weights", "directory", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights", str(w.root)],
      EXIT_WEIGHTS, "regular"),
    C("weights", "fifo", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights", w.fifo("f.pth")],
      EXIT_WEIGHTS, "regular"),
    C("weights", "empty", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                     w.text("e.pth", b"")], EXIT_WEIGHTS),
    C("weights", "text", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                    w.text("t.pth", "hello\n")], EXIT_WEIGHTS),
    C("weights", "truncated", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                         w.text("cut.pth", LITE.read_bytes()[:LITE.stat().st_size // 2])],
      EXIT_WEIGHTS),
    C("weights", "1000-bytes-flipped", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                                  w.weights("flip.pth", flipped)], EXIT_WEIGHTS, "corrupt"),
    C("weights", "one-byte-flipped", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                                w.weights("flip1.pth", lambda p: flipped(p, 1))], EXIT_WEIGHTS,
      "corrupt"),
    C("weights", "nan-tensor", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                          w.weights("nan.pth", with_value(float("nan")))], EXIT_WEIGHTS, "non-finite"),
    C("weights", "inf-tensor", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                          w.weights("inf.pth", with_value(float("-inf")))], EXIT_WEIGHTS, "non-finite"),
    C("weights", "malicious-pickle", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                                w.weights("evil.pth", evil_pickle)], EXIT_WEIGHTS),
    C("weights", "malicious-zip-pickle", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                                    w.weights("evil2.pth", evil_zip)], EXIT_WEIGHTS),
    C("weights", "wrong-architecture", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                                  w.weights("w.pth", lambda p: torch.save(
                                                      {"params": {"conv.weight": torch.zeros(3, 3)}}, p))],
      EXIT_WEIGHTS, "architecture"),
    C("weights", "no-state-dict", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--weights",
                                             w.weights("l.pth", lambda p: torch.save([1, 2, 3], p))], EXIT_WEIGHTS),
    C("weights", "detector-weights-missing", lambda w: [w.clip(), w.out(), "--model", "none", "--detector", "yunet",
                                                        "-q", "--detector-weights", w.out("y.onnx")], EXIT_WEIGHTS,
      "not found"),
    C("weights", "weights-for-a-model-without", lambda w: [w.clip(), w.out(), *FAST, "--weights", str(LITE)],
      EXIT_USAGE, "takes no weight"),
]

CONFIG_TEXT = {
    "invalid-yaml": ("model: [unclosed\n", None),
    "top-level-list": ("- model\n- none\n", "mapping"),
    "unknown-key": ("no_such_option: 3\n", "no_such_option"),
    "draw-maybe": ("draw: maybe\n", "true or false"),
    "flag-as-number": ("quiet: 1\n", "true or false"),
    "batch-size-true": ("batch_size: true\n", "batch_size"),
    "crf-nan": ("crf: .nan\n", "finite"),
    "fidelity-inf": ("fidelity: .inf\n", "finite"),
    "model-nosuch": ("model: nosuch\n", "unknown model"),
    "detector-nosuch": ("detector: nosuch\n", "unknown detector"),
    "tracks-bad-list": ("tracks: [1, x]\n", "tracks"),
    "lookahead-list": ("lookahead: [4]\n", "list"),
    "input-key": ("input: x.mp4\n", "unknown option"),
    "config-key": ("config: fast\n", "unknown option"),
    "temporal-choice": ("temporal: sideways\n", "one of"),
    "detect-size-negative": ("detect_size: -5\n", "detect_size"),
    "preset-nosuch": ("preset: nosuch\n", "preset"),
    "min-face-null": ("min_face:\n", "no value"),
    "model-dict": ("model: {a: 1}\n", "model"),
    "codec-empty": ("codec: ''\n", "empty"),
    "device-number": ("device: 3\n", "device"),
    "date-value": ("crf: 2020-01-01\n", "crf"),
    "numeric-key": ("1: 2\n", "unknown option"),
}

CONFIGS = [C("configs", name, (lambda t: lambda w: [w.clip(), w.out(), "--config", w.config(t)])(text), EXIT_CONFIG,
             says) for name, (text, says) in CONFIG_TEXT.items()] + [
    C("configs", "binary-file", lambda w: [w.clip(), w.out(), "--config", w.text("b.yaml", bytes(range(256)) * 4)],
      EXIT_CONFIG, "binary"),
    C("configs", "latin1", lambda w: [w.clip(), w.out(), "--config", w.text("l.yaml", "model: caf\xe9\n".encode("latin-1"))],
      EXIT_CONFIG, "UTF-8"),
    C("configs", "directory", lambda w: [w.clip(), w.out(), "--config", str(w.root)], EXIT_CONFIG, "directory"),
    C("configs", "missing", lambda w: [w.clip(), w.out(), "--config", w.out("none.yaml")], EXIT_CONFIG, "not found"),
    C("configs", "fifo", lambda w: [w.clip(), w.out(), "--config", w.fifo("f.yaml")], EXIT_CONFIG, "regular"),
    C("configs", "no-such-preset", lambda w: [w.clip(), w.out(), "--config", "nosuchpreset"], EXIT_CONFIG, "preset"),
    C("configs", "empty-name", lambda w: [w.clip(), w.out(), "--config", ""], EXIT_USAGE, "empty"),
]


def _numeric_actions():
    return [a for a in build_parser()._actions if getattr(a.type, "range_checked", False) and a.option_strings]


def _value_actions():
    return [a for a in build_parser()._actions if a.option_strings and a.nargs is None
            and a.dest not in ("config", "help", "version")]


# every range-checked option refuses NaN and text; every option refuses a list or a mapping in a config
OPTIONS = [C("options", f"{a.option_strings[-1]}={bad}", (lambda o, v: lambda w: [w.clip(), w.out(), *FAST, f"{o}={v}"])(
    a.option_strings[-1], bad), EXIT_USAGE, a.option_strings[-1]) for a in _numeric_actions() for bad in ("nan", "x1")]
OPTIONS += [C("configs", f"list-for-{a.dest}", (lambda d: lambda w: [w.clip(), w.out(), "--config",
                                                                    w.config(f"{d}: {{k: [1, 2]}}\n")])(a.dest),
              EXIT_CONFIG, a.dest) for a in _value_actions()]
OPTIONS += [
    C("options", "codec-audio", lambda w: [w.clip(), w.out(), *FAST, "--codec", "aac"], EXIT_USAGE, "audio"),
    C("options", "codec-nosuch", lambda w: [w.clip(), w.out(), *FAST, "--codec", "nosuch"], EXIT_USAGE, "unknown"),
    C("options", "crf-negative", lambda w: [w.clip(), w.out(), *FAST, "--crf", "-5"], EXIT_USAGE, "crf"),
    C("options", "crf-too-high", lambda w: [w.clip(), w.out(), *FAST, "--crf", "99"], EXIT_USAGE, "crf"),
    C("options", "crf-on-ffv1", lambda w: [w.clip(), w.out("o.mkv"), *FAST, "--codec", "ffv1", "--crf", "3"],
      EXIT_USAGE, "crf", target="o.mkv"),
    C("options", "preset-nosuch", lambda w: [w.clip(), w.out(), *FAST[:4], "--preset", "nosuch"], EXIT_USAGE,
      "preset"),
    C("options", "pix-fmt-nosuch", lambda w: [w.clip(), w.out(), *FAST, "--pix-fmt", "nosuch"], EXIT_USAGE,
      "pixel format"),
    C("options", "pix-fmt-unsupported", lambda w: [w.clip(), w.out(), *FAST, "--pix-fmt", "rgb48le"], EXIT_USAGE,
      "cannot encode"),
    C("options", "device-bad", lambda w: [w.clip(), w.out(), *FAST, "--device", "cuda:x"], EXIT_USAGE, "device"),
    C("options", "device-tpu", lambda w: [w.clip(), w.out(), *FAST, "--device", "tpu"], EXIT_USAGE, "device"),
    C("options", "precision-nosuch", lambda w: [w.clip(), w.out(), *FAST, "--precision", "fp8"], EXIT_USAGE),
    C("options", "model-nosuch", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "nosuch"], EXIT_USAGE,
      "unknown model"),
    C("options", "model-is-detector", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "yunet"], EXIT_USAGE,
      "detector"),
    C("options", "model-empty", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", ""], EXIT_USAGE, "empty"),
    C("options", "detector-nosuch", lambda w: [w.clip(), w.out(), "--model", "none", "--detector", "nosuch"],
      EXIT_USAGE, "unknown detector"),
    C("options", "detector-is-model", lambda w: [w.clip(), w.out(), "--model", "none", "--detector", "lite"],
      EXIT_USAGE, "not a face detector"),
    C("options", "lookahead-negative", lambda w: [w.clip(), w.out(), *FAST, "--lookahead=-3"], EXIT_USAGE,
      "lookahead"),
    C("options", "detect-size-negative", lambda w: [w.clip(), w.out(), *FAST, "--detect-size=-5"], EXIT_USAGE,
      "detect-size"),
    C("options", "batch-size-huge", lambda w: [w.clip(), w.out(), *FAST, "--batch-size", str(10 ** 12)], EXIT_USAGE,
      "batch-size"),
    C("options", "temporal-margin-inf", lambda w: [w.clip(), w.out(), *FAST, "--temporal-margin", "inf"], EXIT_USAGE,
      "finite"),
    C("options", "tracks-empty", lambda w: [w.clip(), w.out(), *FAST, "--tracks", ","], EXIT_USAGE, "tracks"),
    C("options", "tracks-negative", lambda w: [w.clip(), w.out(), *FAST, "--tracks=-1"], EXIT_USAGE, "tracks"),
    C("options", "steps-on-lite", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite", "--steps", "3"],
      EXIT_USAGE, "diffusion"),
    C("options", "reference-frame-on-lite", lambda w: [w.clip(), w.out(), *FAST[2:], "--model", "lite",
                                                       "--reference-frame", "0"], EXIT_USAGE, "reference"),
    C("options", "unknown-flag", lambda w: [w.clip(), w.out(), *FAST, "--no-such-flag"], EXIT_USAGE),
    C("options", "missing-output", lambda w: [w.clip()], EXIT_USAGE),
    C("options", "newline-in-value", lambda w: [w.clip(), w.out(), *FAST, "--codec", "lib\nx264"], EXIT_USAGE),
]

CASES = INPUTS + OUTPUTS + WEIGHTS + CONFIGS + OPTIONS


def snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 (or a tag for what is not a regular file) of everything in the folder, recursively."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir" if path.is_dir() else "special"
    return out


def check_outcome(case: Case, rc: int, err_lines: list[str], before: dict, after: dict) -> None:
    assert rc == case.code, (case.id, err_lines)
    assert len(err_lines) == case.lines, (case.id, err_lines)
    line = err_lines[0] if err_lines else ""
    assert "Traceback" not in line
    if case.code != EXIT_OK:
        assert line.startswith("frvideo: error: "), line
    if case.says:
        assert case.says.lower() in line.lower(), (case.id, line)
    added = sorted(set(after) - set(before))
    assert added == ([case.target] if case.makes_target else []), (case.id, added)
    changed = [k for k in before if k in after and before[k] != after[k]]
    assert changed == [], (case.id, "inputs changed", changed)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: Case, tmp_path, home_with_detectors, capsys):
    if case.skip:
        pytest.skip(case.skip)
    work = Work(tmp_path / "work")
    work.root.mkdir()
    argv = case.argv(work)
    capsys.readouterr()
    before = snapshot(work.root)
    try:
        rc = main(argv)
    finally:
        for p in work.root.rglob("*"):  # give back the modes a case took away (so tmp_path can be removed)
            if not p.is_symlink() and (p.is_file() or p.is_dir()):
                os.chmod(p, 0o755)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    after = snapshot(work.root)
    check_outcome(case, rc, err, before, after)
    assert not list(work.root.glob("*.pwned")), "a pickle in a weight file ran code"


def test_corpus_covers_every_class():
    kinds = {c.kind for c in CASES} | {"signals", "pipes"}
    assert kinds == {"inputs", "outputs", "weights", "configs", "options", "signals", "pipes"}
    assert len(CASES) + len(SIGNAL_CASES) + len(PIPE_CASES) >= 60


def test_every_numeric_option_is_range_checked():
    """No option parses a bare int()/float() (which takes -5, nan and inf): all go through argtypes.number."""
    for action in build_parser()._actions:
        assert action.type not in (int, float), action.option_strings


# -- subprocess cases: signals and pipes ---------------------------------------------------

def _default_sigint():
    # a background shell job starts with SIGINT ignored, nohup with SIGHUP ignored (and frvideo keeps
    # what it finds ignored): give the run the defaults a terminal's Ctrl-C or a hang-up would find
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def frvideo(args, before_exec: Optional[Callable[[], None]] = None, **kw) -> subprocess.Popen:
    def preexec():
        _default_sigint()
        if before_exec is not None:
            before_exec()
    return subprocess.Popen([sys.executable, "-m", "frvideo", *args], env=dict(os.environ), cwd=REPO,
                            preexec_fn=preexec, **kw)


def wait_for_partial(folder: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and not list(folder.glob(".o.partial-*")):
        assert proc.poll() is None, proc.communicate()[1].decode()
        time.sleep(0.02)
    assert list(folder.glob(".o.partial-*")), "the run never started writing"


@dataclass
class SignalCase:
    name: str
    signals: list[int]
    code: int
    gap: float = 0.0  # seconds between the signals
    stdin_idle: bool = False  # signal while frvideo waits on a pipe with no data


SIGNAL_CASES = [
    SignalCase("sigterm-mid-run", [signal.SIGTERM], 143),
    SignalCase("sighup-mid-run", [signal.SIGHUP], 129),
    SignalCase("sigint-mid-run", [signal.SIGINT], 130),
    SignalCase("sigquit-mid-run", [signal.SIGQUIT], 131),
    SignalCase("sigint-twice", [signal.SIGINT, signal.SIGINT], 130),
    # the second one lands while the first one's clean-up (draining a veryslow encoder) runs
    SignalCase("sigterm-then-sigint-in-cleanup", [signal.SIGTERM, signal.SIGINT], 143, gap=0.3),
    SignalCase("sigterm-on-idle-stdin", [signal.SIGTERM], 143, stdin_idle=True),
    SignalCase("sigint-on-idle-stdin", [signal.SIGINT], 130, stdin_idle=True),
]


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c.name for c in SIGNAL_CASES])
def test_signal_case(case: SignalCase, tmp_path, home_with_detectors):
    work = tmp_path / "work"
    work.mkdir()
    target = work / "o.mp4"
    if case.stdin_idle:
        src = None
        proc = frvideo(["-", str(target), *FAST], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(4)  # started, waiting for the y4m header that never comes
    else:
        src = make_clip(work / "long.mkv", n=300, size=(320, 240))
        before = snapshot(work)
        proc = frvideo([str(src), str(target), *FAST[:4], "--preset", "veryslow", "-q"], stderr=subprocess.PIPE)
        wait_for_partial(work, proc)
    before = snapshot(work)
    for i, sig in enumerate(case.signals):
        if i:
            time.sleep(case.gap)
        proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1].decode().splitlines()
    after = snapshot(work)
    assert proc.returncode == case.code, err
    assert len(err) == 1 and err[0].startswith("frvideo: interrupted (SIG"), err
    assert sorted(after) == sorted(k for k in before if not k.startswith(".o.partial-")), after
    assert all(after[k] == before[k] for k in after)


def test_kill9_partial_removed_by_next_run(tmp_path, home_with_detectors):
    work = tmp_path / "work"
    work.mkdir()
    src = make_clip(work / "long.mkv", n=300, size=(320, 240))
    proc = frvideo([str(src), str(work / "o.mp4"), *FAST[:4], "--preset", "veryslow", "-q"], stderr=subprocess.PIPE)
    wait_for_partial(work, proc)
    proc.kill()
    proc.communicate(timeout=30)
    stale = list(work.glob(".o.partial-*"))
    assert stale, "kill -9 cannot clean up: its partial file is there"
    small = make_clip(work / "small.mkv", n=3)
    before = snapshot(work)
    assert main([str(small), str(work / "other.mp4"), *FAST]) == 0
    after = snapshot(work)
    assert not any(work.glob(".*.partial-*")), "the next run into the folder removes a dead run's partial file"
    assert sorted(set(after) - set(before)) == ["other.mp4"]


def test_live_partial_is_not_removed(tmp_path, home_with_detectors):
    """A run that is still going keeps its partial file when another run writes into the same folder."""
    work = tmp_path / "work"
    work.mkdir()
    src = make_clip(work / "long.mkv", n=300, size=(320, 240))
    proc = frvideo([str(src), str(work / "o.mp4"), *FAST[:4], "--preset", "veryslow", "-q"], stderr=subprocess.PIPE)
    try:
        wait_for_partial(work, proc)
        live = list(work.glob(".o.partial-*"))
        assert main([str(make_clip(work / "small.mkv", n=3)), str(work / "other.mp4"), *FAST]) == 0
        assert all(p.exists() for p in live)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 143


@dataclass
class PipeCase:
    name: str
    code: int
    says: Optional[str]
    run: Callable[[Path], tuple[int, list[str]]]  # -> exit code, stderr lines
    made: tuple = ()  # files the run adds beside its input (success cases)


def _pipe_run(args, stdin=None, stdout=subprocess.DEVNULL, data: Optional[bytes] = None, **kw):
    proc = frvideo(args, stdin=stdin if data is None else subprocess.PIPE, stdout=stdout, stderr=subprocess.PIPE, **kw)
    _, err = proc.communicate(input=data, timeout=120)
    return proc.returncode, [line for line in err.decode().splitlines() if line.strip()]


def _y4m_bytes(tmp: Path, cut: int = 0) -> bytes:
    data = write_y4m(tmp / "src.y4m").read_bytes()
    (tmp / "src.y4m").unlink()
    return data[:-cut] if cut else data


def _closed_stdin(w: Path):
    return _pipe_run(["-", str(w / "o.mp4"), *FAST], before_exec=lambda: os.close(0))


def _closed_stdout(w: Path):
    src = make_clip(w / "a.mp4")
    return _pipe_run([str(src), "-", *FAST], before_exec=lambda: os.close(1))


def _tty(w: Path, which: str):
    master, slave = pty.openpty()
    try:
        if which == "stdin":
            return _pipe_run(["-", str(w / "o.mp4"), *FAST], stdin=slave)
        src = make_clip(w / "a.mp4")
        return _pipe_run([str(src), "-", *FAST], stdout=slave)
    finally:
        os.close(master)
        os.close(slave)


def _dev_full(w: Path):
    src = make_clip(w / "a.mp4", n=12)
    with open("/dev/full", "wb") as full:
        return _pipe_run([str(src), "-", *FAST], stdout=full)


def _fifo_input(w: Path, cut: int):
    fifo = w / "in.y4m"
    os.mkfifo(fifo)
    data = _y4m_bytes(w, cut)
    proc = frvideo([str(fifo), str(w / "o.mp4"), *FAST], stderr=subprocess.PIPE)
    with open(fifo, "wb") as f:
        f.write(data)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, [line for line in err.decode().splitlines() if line.strip()]


PIPE_CASES = [
    PipeCase("stdin-cut-mid-frame", EXIT_INPUT, "--ignore-damage",
             lambda w: _pipe_run(["-", str(w / "o.mp4"), *FAST], data=_y4m_bytes(w, 1000))),
    PipeCase("stdin-cut-ignore-damage", EXIT_OK, "warning",
             lambda w: _pipe_run(["-", str(w / "o.mp4"), *FAST, "--ignore-damage"], data=_y4m_bytes(w, 1000)),
             made=("o.mp4",)),
    PipeCase("stdin-garbage", EXIT_INPUT, "y4m", lambda w: _pipe_run(["-", str(w / "o.mp4"), *FAST],
                                                                     data=b"\x00garbage" * 100)),
    PipeCase("stdin-empty", EXIT_INPUT, None, lambda w: _pipe_run(["-", str(w / "o.mp4"), *FAST], data=b"")),
    PipeCase("stdin-closed", EXIT_INPUT, "stdin", _closed_stdin),
    PipeCase("stdin-terminal", EXIT_USAGE, "terminal", lambda w: _tty(w, "stdin")),
    PipeCase("stdout-closed", EXIT_OUTPUT, "stdout", _closed_stdout, made=("a.mp4",)),
    PipeCase("stdout-terminal", EXIT_OUTPUT, "terminal", lambda w: _tty(w, "stdout"), made=("a.mp4",)),
    PipeCase("stdout-disk-full", EXIT_OUTPUT, None, _dev_full, made=("a.mp4",)),
    PipeCase("fifo-input-cut", EXIT_INPUT, "--ignore-damage", lambda w: _fifo_input(w, 1000), made=("in.y4m",)),
]


@pytest.mark.parametrize("case", PIPE_CASES, ids=[c.name for c in PIPE_CASES])
def test_pipe_case(case: PipeCase, tmp_path, home_with_detectors):
    work = tmp_path / "work"
    work.mkdir()
    rc, err = case.run(work)
    assert rc == case.code, err
    assert len(err) == 1 and "Traceback" not in err[0], err
    if case.code != EXIT_OK:
        assert err[0].startswith("frvideo: error: "), err
    if case.says:
        assert case.says.lower() in err[0].lower(), err
    names = sorted(p.name for p in work.iterdir())
    assert names == sorted(case.made), names
    if case.code == EXIT_OK:
        with av.open(str(work / "o.mp4")) as c:
            assert sum(1 for _ in c.decode(video=0)) == 4  # the whole frames of the cut stream


def test_pipe_reader_gone(tmp_path, home_with_detectors):
    """`frvideo IN - | head -c 100`: the reader leaves early; frvideo ends quietly, nothing left behind."""
    src = make_clip(tmp_path / "a.mp4", n=60, size=(160, 120))
    proc = frvideo([str(src), "-", *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode().splitlines()
    proc.wait(timeout=60)
    assert proc.returncode in (EXIT_OUTPUT, 130), err
    assert len(err) <= 1 and not any("Traceback" in line for line in err), err


# -- memory over a long run: what bench/soak.py measures, in miniature ----------------------

def test_temporal_state_of_ended_tracks_is_dropped():
    """A face that comes and goes is a new track each time; the face filter must not keep the
    state of every track that ever was (it grew ~2 MB a track with lite until a 256-track cap)."""
    from conftest import FixedFaceDetector
    from frvideo.pipeline import BRIDGE_INTERPOLATED, FacePipeline, PipelineOptions
    from frvideo.restore import load_restorer

    opts = PipelineOptions(temporal="full", min_face=0, quiet=True, batch_size=2)
    # off > the gap a track is bridged over (--bridge): each appearance is a new track
    appearances, on, off = 30, 3, BRIDGE_INTERPOLATED + 3
    visible = {a * (on + off) + i for a in range(appearances) for i in range(on)}
    pipe = FacePipeline(load_restorer("none"), FixedFaceDetector(visible, box=(30, 15, 90, 85)), opts)
    rng = np.random.default_rng(0)

    def frames():
        for i in range(appearances * (on + off)):
            f = av.VideoFrame.from_ndarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), format="rgb24")
            f.pts, f.time_base = i, Fraction(1, 25)
            yield f

    count = sum(1 for _ in pipe.process(frames()))
    assert count == appearances * (on + off)
    assert pipe.stats.tracks == appearances
    # bounded by what may still be waiting (a batch and the look-ahead window), not by the tracks that ever were
    bound = opts.batch_size + pipe.window_len + 1
    assert bound < appearances
    assert len(pipe.face_filter.tracks) <= bound, len(pipe.face_filter.tracks)
