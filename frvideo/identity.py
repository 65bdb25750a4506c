"""Identity distance between faces: dlib's face descriptor (a ResNet giving 128
numbers per face; two photos of the same person are usually closer than 0.6,
dlib's own threshold, different people farther).

Used by ``frvideo metrics REF OUT --identity`` and the quality benchmark: a
restoration that moves a face away from its person is a regression, however
sharp it looks. The model files come from the ``face_recognition_models``
package (``pip install -e ".[metrics]"`` installs it with ``dlib-bin``): nothing
is downloaded at run time. They are found through the package's folder rather than
by importing it (its ``__init__`` needs setuptools' ``pkg_resources``, which new
setuptools no longer ships).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .errors import UsageError

SAME_PERSON = 0.6  # dlib's threshold for "same person"
INSTALL_HINT = 'pip install dlib-bin face_recognition_models (or pip install -e ".[metrics]")'


def _model_dir() -> Path:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"identity metrics need dlib's face models: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class IdentityModel:
    """``model.descriptor(rgb, box)`` -> 128 floats; ``distance(a, b)``."""

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise UsageError(f"identity metrics need dlib: {INSTALL_HINT}") from None
        models = _model_dir()
        self._dlib = dlib
        self.shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def descriptor(self, rgb: np.ndarray, box) -> np.ndarray:
        """The descriptor of the face in ``box`` (x1, y1, x2, y2) of an RGB image (uint8 or uint16)."""
        img = rgb if rgb.dtype == np.uint8 else (rgb >> 8).astype(np.uint8)
        img = np.ascontiguousarray(img[..., :3])
        h, w = img.shape[:2]
        x1, y1, x2, y2 = [int(round(float(v))) for v in box[:4]]
        rect = self._dlib.rectangle(max(x1, 0), max(y1, 0), min(x2, w - 1), min(y2, h - 1))
        shape = self.shape(img, rect)
        return np.asarray(self.net.compute_face_descriptor(img, shape), np.float64)

    @staticmethod
    def distance(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)))


class IdentityMeter:
    """Per track: the identity distance of each output face to the reference face of the same
    frame and box; ``result()`` gives mean and worst per track and overall."""

    def __init__(self, model: IdentityModel | None = None):
        self.model = model or IdentityModel()
        self.per_track: dict[int, list[float]] = {}

    def update(self, ref: np.ndarray, out: np.ndarray, boxes, track_ids) -> None:
        for box, tid in zip(boxes, track_ids):
            d = self.model.distance(self.model.descriptor(ref, box), self.model.descriptor(out, box))
            self.per_track.setdefault(int(tid), []).append(d)

    def result(self) -> dict:
        tracks = {t: {"faces": len(v), "mean": float(np.mean(v)), "worst": float(np.max(v))}
                  for t, v in sorted(self.per_track.items())}
        every = [d for v in self.per_track.values() for d in v]
        return {"tracks": tracks, "mean": float(np.mean(every)) if every else float("nan"),
                "worst": float(np.max(every)) if every else float("nan"), "faces": len(every)}
