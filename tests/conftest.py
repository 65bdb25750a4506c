import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
MEDIA = SHARED / "media"
WEIGHTS = SHARED / "weights"


def need(path: Path, what: str) -> Path:
    """Skip (with the reason) when a file from ../shared is not there."""
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (tests that need ../shared skip without it)")
    return path


@pytest.fixture
def media():
    return need(MEDIA, "../shared/media")


@pytest.fixture
def shared_weights():
    return need(WEIGHTS, "../shared/weights")


import numpy as np  # noqa: E402

from frvideo.faces.detect import Detections, FaceDetector  # noqa: E402


class FixedFaceDetector(FaceDetector):
    """Test double: one face at a fixed place on chosen frames (by call count)."""

    name = "fixed"

    def __init__(self, frames_with_face, box=(20, 10, 60, 54)):
        self.frames = set(frames_with_face)
        self.calls = 0
        x1, y1, x2, y2 = box
        w, h = x2 - x1, y2 - y1
        self.box = np.array([box], np.float32)
        self.lm = np.array([[[x1 + .3 * w, y1 + .4 * h], [x1 + .7 * w, y1 + .4 * h], [x1 + .5 * w, y1 + .6 * h],
                             [x1 + .35 * w, y1 + .8 * h], [x1 + .65 * w, y1 + .8 * h]]], np.float32)

    def detect(self, image_rgb):
        i = self.calls
        self.calls += 1
        if i in self.frames:
            return Detections(self.box.copy(), self.lm.copy(), np.array([0.99], np.float32))
        return Detections.empty()


@pytest.fixture
def frvideo_home(tmp_path, monkeypatch):
    """An empty $FRVIDEO_HOME, offline: nothing installed, nothing downloaded."""
    home = tmp_path / "frvideo_home"
    (home / "weights").mkdir(parents=True)
    monkeypatch.setenv("FRVIDEO_HOME", str(home))
    monkeypatch.setenv("FRVIDEO_OFFLINE", "1")
    return home


@pytest.fixture
def home_with_detectors(frvideo_home):
    """$FRVIDEO_HOME holding links to the real detector weights of ../shared."""
    need(WEIGHTS / "face_detection_yunet_2023mar.onnx", "YuNet weights")
    for f in ("face_detection_yunet_2023mar.onnx", "detection_mobilenet0.25_Final.pth"):
        if (WEIGHTS / f).exists():
            (frvideo_home / "weights" / f).symlink_to(WEIGHTS / f)
    return frvideo_home


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-tensor tests on one torch thread, then restore the setting."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
