"""One detector interface: boxes, 5 landmarks and scores per image.

Landmark order everywhere in frvideo (as RetinaFace/facexlib and YuNet):
right eye, left eye (from the viewer: left-most first), nose tip, right mouth
corner, left mouth corner — i.e. the order of the FFHQ template in align.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass
class Detections:
    """Faces in one image. N may be 0."""

    boxes: np.ndarray  # N x 4 float32, x1 y1 x2 y2 in pixels
    landmarks: np.ndarray  # N x 5 x 2 float32, pixels
    scores: np.ndarray  # N float32 in [0, 1]

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32))

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep) -> "Detections":
        return Detections(self.boxes[keep], self.landmarks[keep], self.scores[keep])


class FaceDetector:
    """Base class. ``detect`` takes an RGB uint8 H x W x 3 image.

    A backend is registered under its model cards' ``backend`` name through the
    entry-point group ``frvideo.detectors`` (name -> ``module:Class``, see
    pyproject.toml; the built-ins are also listed in ``_BUILTIN_DETECTORS``
    for a source tree that is not installed), exactly as restorers are. The
    registry holds only those strings: this module imports no detector, so the
    detectors can import ``Detections`` / ``FaceDetector`` from it freely."""

    name = "?"

    def detect(self, image_rgb: np.ndarray) -> Detections:
        raise NotImplementedError

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[Detections]:
        """Several frames at once; detectors that can batch override this."""
        return [self.detect(im) for im in images_rgb]

    @classmethod
    def from_card(cls, config, weights: Optional[Path], device: str, settings: dict) -> "FaceDetector":
        """Build from a model card (``config.arch``), the resolved weight file and the
        card's ``defaults`` (with the command line's overrides) as keyword arguments."""
        return cls(weights, **settings)


ENTRY_POINT_GROUP = "frvideo.detectors"

# Used when the package is run from a source tree without being installed
# (entry points only exist for installed distributions).
_BUILTIN_DETECTORS = {
    "retinaface": "frvideo.faces.retinaface:RetinaFaceDetector",
    "yunet": "frvideo.faces.yunet:YuNetDetector",
    "embedded": "frvideo.faces.embedded:EmbeddedDetector",
}


def detector_entry_points() -> dict[str, str]:
    """Detector backend name -> 'module:Class', from installed entry points and the built-ins."""
    from ..models import registered
    return registered(ENTRY_POINT_GROUP, _BUILTIN_DETECTORS)


def detector_class(backend: str) -> type[FaceDetector]:
    from ..models import registered_class
    return registered_class(ENTRY_POINT_GROUP, _BUILTIN_DETECTORS, backend, FaceDetector, "face detector")


def installed_detectors() -> list:
    """Detector model cards whose backend is registered and whose weights are
    installed (shipped, or in the weights folder), best (highest priority) first."""
    from ..models import all_model_configs
    from ..weights import find_local

    backends = detector_entry_points()
    cards = sorted(all_model_configs("detector"), key=lambda c: -c.priority)
    return [c for c in cards if c.backend in backends and (c.weights is None or find_local(c) is not None)]


def is_installed(name: str) -> bool:
    return any(c.name == name for c in installed_detectors())


def best_installed_detector() -> str:
    """``--detector auto``: the highest-priority installed detector's name."""
    from ..errors import WeightsError
    from ..models import all_model_configs
    from ..weights import weights_dir

    present = installed_detectors()
    if not present:
        files = ", ".join(c.weights.file for c in all_model_configs("detector") if c.weights)
        raise WeightsError(f"no face detector weights found; put one of {files} in {weights_dir()}/ "
                           f"or pass --detector-weights (`frvideo models` lists where to get them)")
    return present[0].name


def load_detector(name: str = "auto", weights=None, device: str = "cpu", max_size: int | None = None) -> FaceDetector:
    """A detector by model-card name; ``auto`` = the highest-priority one whose weights are installed."""
    from ..errors import ConfigError
    from ..models import load_model_config
    from ..weights import resolve

    if name == "auto":
        name = best_installed_detector()
    config = load_model_config(name)
    if config.kind != "detector":
        raise ConfigError(f"{name!r} is a {config.kind}, not a face detector")
    cls = detector_class(config.backend)
    path = resolve(config, weights, option="--detector-weights")
    settings = dict(config.defaults)
    if max_size is not None:
        settings["max_size"] = max_size or None  # 0: full resolution
    detector = cls.from_card(config, path, device, settings)
    detector.name = config.name
    return detector
