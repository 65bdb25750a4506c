"""The embedded detector (frvideo's own single-stage CNN, shipped) and the detector registry.

The checkpoint, registry and preset tests run anywhere; the accuracy test uses
a frame of a held-out eval clip from ../shared and RetinaFace MobileNet as the
reference, and skips without them.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from frvideo.errors import ConfigError, WeightsError
from frvideo.faces.detect import (best_installed_detector, detector_class, detector_entry_points, installed_detectors,
                                  load_detector)
from frvideo.faces.embedded import SHIPPED_WEIGHTS, EmbeddedDetector, TinyFaceNet, checkpoint_crc
from frvideo.models import load_model_config, load_preset, model_names, PRESETS_DIR
from frvideo.train.detector import iou_matrix
from frvideo.weights import REPO_ROOT, find_local, sha256_file

from conftest import MEDIA, REPO, WEIGHTS, need

EVAL_CLIP = MEDIA / "videos" / "eval" / "retalk_2.mp4"
MOBILE = WEIGHTS / "detection_mobilenet0.25_Final.pth"


# -- the shipped weights --------------------------------------------------------------------

def test_shipped_checkpoint_matches_card_and_is_small():
    card = load_model_config("embedded")
    assert card.kind == "detector" and card.backend == "embedded"
    assert card.weights.url is None and card.weights.param_keys == ["params"]
    path = REPO_ROOT / card.weights.shipped
    assert path == SHIPPED_WEIGHTS and path.is_file()
    assert path.stat().st_size < 2_000_000
    assert sha256_file(path) == card.weights.sha256
    assert find_local(card) == path
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert checkpoint_crc(ckpt["params"]) == ckpt["meta"]["crc32"]
    det = EmbeddedDetector()  # default weights: the shipped file
    assert isinstance(det.net, TinyFaceNet)
    assert sum(p.numel() for p in det.net.parameters()) < 200_000


def test_damaged_checkpoint_is_refused(tmp_path):
    ckpt = torch.load(SHIPPED_WEIGHTS, map_location="cpu", weights_only=True)
    key = next(k for k, v in ckpt["params"].items() if v.is_floating_point() and v.numel() > 4)
    edited = {k: v.clone() for k, v in ckpt["params"].items()}
    edited[key].view(-1)[0] += 1.0  # a changed weight under the old checksum
    torch.save({"params": edited, "meta": ckpt["meta"]}, tmp_path / "edited.pth")
    with pytest.raises(WeightsError, match="checksum"):
        EmbeddedDetector(tmp_path / "edited.pth")
    edited[key].view(-1)[0] = float("nan")
    torch.save({"params": edited, "meta": ckpt["meta"]}, tmp_path / "nan.pth")
    with pytest.raises(WeightsError, match="non-finite"):
        EmbeddedDetector(tmp_path / "nan.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="--detector-weights"):
        EmbeddedDetector(tmp_path / "text.pth")
    with pytest.raises(WeightsError, match="--detector-weights"):
        EmbeddedDetector(tmp_path / "missing.pth")


# -- what it finds ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def detector():
    torch.set_num_threads(1)
    return EmbeddedDetector()


@pytest.fixture(scope="module")
def frame():
    from frvideo.io.frames import to_rgb, to_rgb8
    from frvideo.io.reader import open_reader

    for k, f in enumerate(open_reader(str(need(EVAL_CLIP, "eval clip")))):
        if k == 30:
            return np.ascontiguousarray(to_rgb8(to_rgb(f)))


def test_blank_and_noise_frames_have_no_face(detector):
    assert len(detector.detect(np.full((360, 640, 3), 128, np.uint8))) == 0
    noise = np.random.default_rng(0).integers(0, 256, (360, 640, 3), dtype=np.uint8)
    assert len(detector.detect(noise)) == 0


def test_finds_the_face_retinaface_finds(detector, frame):
    from frvideo.faces.retinaface import RetinaFaceDetector

    ref = RetinaFaceDetector(need(MOBILE, "RetinaFace MobileNet weights"), score_threshold=0.97).detect(frame)
    assert len(ref) == 1
    det = detector.detect(frame)
    assert len(det) == 1 and det.scores[0] >= 0.5
    assert iou_matrix(ref.boxes, det.boxes)[0, 0] >= 0.6
    iod = np.linalg.norm(ref.landmarks[0, 1] - ref.landmarks[0, 0])
    assert np.linalg.norm(det.landmarks[0] - ref.landmarks[0], axis=1).mean() / iod < 0.15
    # the same face mirrored: landmarks keep frvideo's order (image-left eye first)
    flipped = detector.detect(np.ascontiguousarray(frame[:, ::-1]))
    assert len(flipped) == 1 and flipped.landmarks[0, 0, 0] < flipped.landmarks[0, 1, 0]


def test_smaller_and_darker_face_still_found(detector, frame):
    import cv2

    h, w = frame.shape[:2]
    small = cv2.resize(frame, (w // 4, h // 4), interpolation=cv2.INTER_AREA)
    canvas = np.full((h, w, 3), 60, np.uint8)
    canvas[100:100 + small.shape[0], 200:200 + small.shape[1]] = (small * 0.45).astype(np.uint8)
    det = detector.detect(canvas)
    assert len(det) == 1
    full = detector.detect(frame).boxes[0] / 4 + [200, 100, 200, 100]
    assert iou_matrix(full[None], det.boxes)[0, 0] >= 0.5


# -- the registry -----------------------------------------------------------------------------

def test_registry_lists_builtins_and_loads_by_name(frvideo_home):
    points = detector_entry_points()
    assert {"retinaface", "yunet", "embedded"} <= set(points)
    assert detector_class("embedded") is EmbeddedDetector
    with pytest.raises(ConfigError, match="no face detector backend 'nosuch'"):
        detector_class("nosuch")
    det = load_detector("embedded")
    assert isinstance(det, EmbeddedDetector) and det.name == "embedded"
    # an empty home: the shipped detector is the only one installed, and auto takes it
    assert [c.name for c in installed_detectors()] == ["embedded"]
    assert best_installed_detector() == "embedded" and load_detector("auto").name == "embedded"


def test_detect_module_imports_no_detector():
    code = ("import sys, frvideo.faces.detect as d; d.detector_entry_points(); "
            "print(sorted(m for m in sys.modules if m.startswith('frvideo.faces.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "['frvideo.faces.detect']"


def test_missing_detector_file_names_the_option(frvideo_home):
    with pytest.raises(WeightsError, match="--detector-weights"):
        load_detector("yunet")  # offline, nothing installed
    with pytest.raises(WeightsError, match="--detector-weights"):
        load_detector("retinaface-mobile", weights=frvideo_home / "nope.pth")


# -- presets ----------------------------------------------------------------------------------

def _preset_detector(argv):
    from frvideo.cli import _parse_restore_args
    return _parse_restore_args(["in.mp4", "out.mp4", *argv])[0].detector


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
def test_presets_use_only_installed_detectors(preset, frvideo_home, capsys):
    named = load_preset(preset).get("detector")
    chosen = _preset_detector(["--config", preset])
    err = capsys.readouterr().err
    if named is None or named == "auto":
        assert err == ""
        return
    assert named in model_names("detector")
    assert chosen == "embedded"  # the only detector installed in an empty home
    if named == "embedded":  # the preset names the built-in one: used as named, nothing to say
        assert err == ""
        return
    assert err.count("\n") == 1 and f"names detector {named!r}" in err and "using 'embedded'" in err


def test_preset_keeps_its_detector_when_installed(home_with_detectors, capsys):
    assert _preset_detector(["--config", "fast"]) == "yunet"
    assert capsys.readouterr().err == ""


def test_command_line_detector_is_not_replaced(frvideo_home, capsys):
    assert _preset_detector(["--config", "fast", "--detector", "yunet"]) == "yunet"
    assert capsys.readouterr().err == ""


def test_models_lists_detectors_with_state(frvideo_home, capsys):
    from frvideo.cli import main
    assert main(["models"]) == 0
    out = capsys.readouterr().out.split("detectors:")[1]
    assert "embedded               ready (shipped)" in out
    assert "yunet                  missing face_detection_yunet_2023mar.onnx" in out
