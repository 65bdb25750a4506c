"""One detector interface: boxes, 5 landmarks and scores per image.

Landmark order everywhere in frvideo (as RetinaFace/facexlib and YuNet):
right eye, left eye (from the viewer: left-most first), nose tip, right mouth
corner, left mouth corner — i.e. the order of the FFHQ template in align.py.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """Base class. ``detect`` takes an RGB uint8 H x W x 3 image."""

    name = "?"

    def detect(self, image_rgb: np.ndarray) -> Detections:
        raise NotImplementedError

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[Detections]:
        """Several frames at once; detectors that can batch override this."""
        return [self.detect(im) for im in images_rgb]


def load_detector(name: str = "auto", weights=None, device: str = "cpu", max_size: int | None = None) -> FaceDetector:
    """A detector by model-card name; ``auto`` = the highest-priority one whose weights are installed."""
    from ..errors import ConfigError, WeightsError
    from ..models import all_model_configs, load_model_config
    from ..weights import find_local, resolve, weights_dir

    if name == "auto":
        cards = sorted(all_model_configs("detector"), key=lambda c: -c.priority)
        present = [c for c in cards if find_local(c) is not None]
        if not present:
            files = ", ".join(c.weights.file for c in cards if c.weights)
            raise WeightsError(f"no face detector weights found; put one of {files} in {weights_dir()}/ "
                               f"(`frvideo models` lists where to get them)")
        config = present[0]
    else:
        config = load_model_config(name)
        if config.kind != "detector":
            raise ConfigError(f"{name!r} is a {config.kind}, not a face detector")
    path = resolve(config, weights)
    settings = dict(config.defaults)
    if max_size is not None:
        settings["max_size"] = max_size or None  # 0: full resolution
    if config.backend == "retinaface":
        from .retinaface import RetinaFaceDetector
        detector = RetinaFaceDetector(path, backbone=config.arch.get("backbone", "mobilenet0.25"), device=device,
                                      **settings)
    elif config.backend == "yunet":
        from .yunet import YuNetDetector
        detector = YuNetDetector(path, **settings)
    elif config.backend == "embedded":
        from .embedded import EmbeddedDetector
        detector = EmbeddedDetector(path, device=device, **settings)
    else:
        raise ConfigError(f"detector card {config.name!r} names unknown backend {config.backend!r}")
    detector.name = config.name
    return detector
