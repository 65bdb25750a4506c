"""Reference keyframes for reference-based backends (ENTED): one per track.

Each aligned face of a track is a candidate. Its score multiplies

* sharpness: variance of the Laplacian of the grey face region of the aligned
  crop (``frvideo.train.dataset.sharpness``, the dataset builder's measure),
* frontalness in (0, 1] from the 5 landmarks: the nose tip and the mouth centre
  should sit on the eyes' perpendicular bisector (yaw), and the nose halfway
  down between eyes and mouth (pitch); ``exp(-(yaw / 0.15)^2 - (pitch / 0.25)^2)``,
  offsets in eye distances,
* the detector's confidence.

A track's first reference is the best of its first frame and, when the pipeline
has look-ahead frames, the frames of the same track in the look-ahead window
(``ahead``). Later it is replaced only when the best candidate seen since the
last switch beats it by the factor ``1 + switch_margin`` *and* at least
``MIN_SWITCH_GAP`` frames have passed since the last switch (or the track's
start): each switch changes the texture source, which can show as a jump, and
sharpness often rises frame by frame at the start of a shot (focus, motion blur
settling), where a best-so-far rule would switch on nearly every frame. When the
hold ends the track switches to the best frame seen during it. A new track (a
scene cut resets the tracker, so new ids follow) starts over. Without look-ahead
(live runs) the first reference is the first frame.

A fixed reference (``--reference-image``, ``--reference-frame``) replaces the
selection for every track.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .train.dataset import sharpness

__all__ = ["frontalness", "keyframe_score", "Keyframe", "KeyframeSelector"]

_REF_SERIAL = itertools.count()  # makes reference ids unique across selectors (a restorer may outlive a run)


def frontalness(landmarks: np.ndarray) -> float:
    """5 x 2 landmarks (left eye, right eye, nose, left mouth, right mouth) -> (0, 1], 1 = frontal."""
    lm = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_l, eye_r, nose, mouth_l, mouth_r = lm
    eye_mid, mouth_mid = (eye_l + eye_r) / 2, (mouth_l + mouth_r) / 2
    axis = eye_r - eye_l
    d = float(np.linalg.norm(axis))
    if d < 1e-6:
        return 0.0
    across = axis / d  # along the eye line
    down = np.array([-across[1], across[0]])  # perpendicular, pointing to the mouth
    yaw = (abs(float((nose - eye_mid) @ across)) + abs(float((mouth_mid - eye_mid) @ across))) / d
    depth_mouth = float((mouth_mid - eye_mid) @ down)
    if depth_mouth <= 1e-6:
        return 0.0
    pitch = float((nose - eye_mid) @ down) / depth_mouth - 0.55  # ~0.55 on the FFHQ template
    return float(np.exp(-(yaw / 0.15) ** 2 - (pitch / 0.25) ** 2))


def keyframe_score(crop: np.ndarray, landmarks: np.ndarray, det_score: float = 1.0) -> float:
    """Higher = better reference: sharpness x frontalness x detection confidence."""
    c = crop if crop.dtype == np.uint8 else (crop.astype(np.float32) / 257.0).round().astype(np.uint8)
    return sharpness(c) * frontalness(landmarks) * float(det_score)


@dataclass
class Keyframe:
    ref_id: str  # unique per chosen reference image (the restorer caches features under it)
    frame_index: int  # source frame of the reference (-1: an outside image)
    crop: np.ndarray  # aligned reference face (input_size x input_size x 3, the pipeline's dtype)
    score: float
    tensor: Any = None  # the crop as the restorer's input (1 x 3 x S x S), made once by the pipeline


@dataclass
class _TrackState:
    current: Optional[Keyframe] = None
    history: list[tuple[int, int]] = field(default_factory=list)  # (from frame, reference frame)
    last_seen: int = -1
    last_switch: int = -1  # frame of the last reference change (the track's first frame at first)
    best: Optional[tuple[float, int, np.ndarray]] = None  # best (score, frame, crop) since the last switch


MAX_HELD_REFERENCES = 64  # reference crops kept (the most recently seen tracks): memory stays flat
# Fewest frames between two reference switches of a track (about 1 s at 25 fps). The score margin
# alone let a track whose first frames get sharper switch on almost every frame (the new reference
# changes the restored texture: flicker); with the hold, a track switches at most once a second, to
# the best frame seen meanwhile. Short tracks keep their first reference.
MIN_SWITCH_GAP = 25

# a look-ahead candidate: (frame index, aligned crop, landmarks, detection score)
Candidate = tuple[int, np.ndarray, np.ndarray, float]


class KeyframeSelector:
    """Per-track reference choice with hysteresis and a minimum hold (``MIN_SWITCH_GAP``).

    ``update(track_id, frame_index, crop, landmarks, det_score, new_track, ahead)`` returns
    the track's :class:`Keyframe` to use for that frame; ``ahead`` (optional) returns the
    look-ahead candidates of the track and is called only when the track's first reference
    is chosen. ``prepare`` (optional) is applied once to each newly chosen reference crop
    (e.g. restoring it with another backend, ``--reference-restorer``).
    """

    def __init__(self, switch_margin: float = 0.25, fixed: Optional[np.ndarray] = None,
                 fixed_label: str = "reference image", prepare: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        self.switch_margin = switch_margin
        self.prepare = prepare
        self.fixed = None
        self.fixed_label = fixed_label
        if fixed is not None:
            self.fixed = Keyframe(f"fixed#{next(_REF_SERIAL)}", -1, prepare(fixed) if prepare else fixed, float("inf"))
        self.tracks: dict[int, _TrackState] = {}
        self.ended: dict[int, list[tuple[int, int]]] = {}  # history of tracks whose id was re-used

    def update(self, track_id: int, frame_index: int, crop: np.ndarray, landmarks: np.ndarray,
               det_score: float = 1.0, new_track: bool = False,
               ahead: Optional[Callable[[], list[Candidate]]] = None) -> Keyframe:
        if self.fixed is not None:
            self.tracks.setdefault(track_id, _TrackState())
            return self.fixed
        state = self.tracks.get(track_id)
        if state is None or new_track:
            if state is not None and state.history:
                self.ended.setdefault(track_id, []).extend(state.history)
            state = self.tracks[track_id] = _TrackState()
        state.last_seen = frame_index
        score = keyframe_score(crop, landmarks, det_score)
        if state.current is None and state.last_switch < 0:  # the track's first reference
            best = (score, frame_index, crop)
            for f, c, lm, det in (ahead() if ahead is not None else []):
                s = keyframe_score(c, lm, det)
                if s > best[0]:
                    best = (s, f, c)
            self._switch(track_id, state, frame_index, *best)
            return state.current
        if state.best is None or score > state.best[0]:
            state.best = (score, frame_index, crop.copy())
        cur = state.current
        if cur is None:  # its crop was dropped (track unseen for long): take the best since
            self._switch(track_id, state, frame_index, *state.best)
        elif (frame_index - state.last_switch >= MIN_SWITCH_GAP
              and state.best[0] > cur.score * (1.0 + self.switch_margin)):
            self._switch(track_id, state, frame_index, *state.best)
        return state.current

    def _switch(self, track_id: int, state: _TrackState, frame_index: int, score: float, ref_frame: int,
                crop: np.ndarray) -> None:
        ref = self.prepare(crop) if self.prepare else crop.copy()
        state.current = Keyframe(f"{track_id}:{ref_frame}#{next(_REF_SERIAL)}", ref_frame, ref, score)
        state.history.append((frame_index, ref_frame))
        state.last_switch = frame_index
        state.best = None
        self._drop_old_crops()

    def _drop_old_crops(self) -> None:
        """Forget the reference crops of the tracks seen longest ago (ended tracks); their
        summary lines stay."""
        held = [(s.last_seen, tid) for tid, s in self.tracks.items() if s.current is not None]
        for _, tid in sorted(held)[:max(0, len(held) - MAX_HELD_REFERENCES)]:
            self.tracks[tid].current = None
            self.tracks[tid].best = None

    def summary(self) -> list[str]:
        """One line per track: which keyframe(s) it used."""
        lines = []
        for tid in sorted(self.tracks):
            if self.fixed is not None:
                lines.append(f"track {tid}: {self.fixed_label}")
                continue
            hist = self.ended.get(tid, []) + self.tracks[tid].history
            if not hist:
                continue
            final = hist[-1][1]
            if len(hist) == 1:
                lines.append(f"track {tid}: reference frame {final}")
            else:
                steps = ", ".join(f"{ref} from frame {start}" for start, ref in hist)
                lines.append(f"track {tid}: reference frame {final} ({len(hist)} keyframes: {steps})")
        return lines


# -- user-given references and reference restoration ---------------------------------

def align_largest_face(rgb: np.ndarray, detector, size: int, what: str) -> np.ndarray:
    """Detect faces in an RGB image and return the largest one aligned at ``size`` (uint8/16 as the
    image). ``what`` names the image in the error when there is no face."""
    from .errors import InputError
    from .faces.align import similarity_transforms, warp_faces
    from .io.frames import to_rgb8

    det = detector.detect(to_rgb8(rgb) if rgb.dtype != np.uint8 else rgb)
    if len(det) == 0:
        raise InputError(f"no face found in {what}")
    areas = (det.boxes[:, 2] - det.boxes[:, 0]) * (det.boxes[:, 3] - det.boxes[:, 1])
    j = int(np.argmax(areas))
    return warp_faces(rgb, similarity_transforms(det.landmarks[j:j + 1], size), size)[0]


def reference_from_image(path: str, detector, size: int) -> np.ndarray:
    """``--reference-image PATH``: the largest face of the image, aligned."""
    from .errors import InputError
    from .train.dataset import read_image_rgb

    p = Path(path)
    if not p.is_file():
        raise InputError(f"reference image not found: {path}")
    return align_largest_face(read_image_rgb(p), detector, size, f"reference image {path}")


def reference_from_frame(source: str, frame_index: int, detector, size: int) -> np.ndarray:
    """``--reference-frame N``: the largest face of frame N of the input (a file), aligned."""
    from .errors import InputError, UsageError
    from .io import open_reader
    from .io.frames import to_rgb
    from .io.reader import STDIO

    if source == STDIO:
        raise UsageError("--reference-frame needs a file input (stdin cannot be read twice); "
                         "use --reference-image")
    if frame_index < 0:
        raise UsageError(f"--reference-frame must be >= 0, not {frame_index}")
    reader = open_reader(source)
    count = 0
    try:
        for frame in reader:
            if count == frame_index:
                return align_largest_face(to_rgb(frame), detector, size, f"frame {frame_index} of {source}")
            count += 1
    finally:
        reader.close()
    raise InputError(f"--reference-frame {frame_index}: the input has only {count} frames")


def reference_preparer(restorer, size: int) -> Callable[[np.ndarray], np.ndarray]:
    """``--reference-restorer NAME``: restore each chosen reference once with another backend
    (e.g. codeformer) before it is used. The crop is resized to that backend's input size and
    back (same alignment template, other resolution)."""
    import cv2
    import torch

    from .restore import RestoreContext

    def prepare(crop: np.ndarray) -> np.ndarray:
        peak = 255.0 if crop.dtype == np.uint8 else 65535.0
        s = restorer.input_size
        x = crop if crop.shape[0] == s else cv2.resize(crop, (s, s), interpolation=cv2.INTER_CUBIC)
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].float() / peak * 2 - 1
        with torch.inference_mode():
            y = restorer.restore(t.to(restorer.device, restorer.dtype), RestoreContext.single(1))
        out = ((y[0].float().clamp(-1, 1) + 1) / 2 * peak).round().permute(1, 2, 0).cpu().numpy()
        out = out.astype(crop.dtype)
        if s != size:
            out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_CUBIC)
        return out

    return prepare
