"""Temporal and fidelity metrics: flicker (TDC, flow-warped error), token flip
rate, PSNR and SSIM; the ``frvideo metrics REF OUT`` command.

Conventions (all metrics):

* Images are H x W x C (or H x W) arrays. uint8 is divided by 255, uint16 by
  65535, float arrays are taken as already in [0, 1]. Every MSE below is on
  that [0, 1] scale and averaged over pixels *and* channels, so a uint8 error of
  e grey levels on every pixel gives (e/255)^2.
* A mask is an H x W array, boolean or float weights in [0, 1]; ``None`` means
  the whole frame. The benchmarks build masks from detector boxes with
  :func:`face_masks`.
* A quantity that is undefined (fewer than two frames, a mask that is empty on
  every frame) is ``nan``; PSNR of identical images is ``inf``.

Flicker measures:

* **TDC** (temporal difference consistency): mean over consecutive pairs of
  ``MSE(out_{t+1} - out_t, ref_{t+1} - ref_t)`` over the face region. 0 when
  the output changes in time exactly as the reference does, whatever constant
  bias it has. The region of a pair is the union of the masks of its two
  frames (a face popping in or out counts as flicker).
* **E_warp** (flow-warped error, Lai et al. 2018): mean over pairs of the
  masked ``MSE(out_t, W(out_{t+1}))`` where W warps frame t+1 back to t with
  OpenCV DIS optical flow (preset MEDIUM) computed on the *reference* frames
  (grey), so the output's own artefacts cannot bend the flow. Pixels that
  flow out of the frame or fail the forward-backward check
  ``|f_fw + f_bw(x + f_fw)|^2 > 0.01 (|f_fw|^2 + |f_bw(x + f_fw)|^2) + 0.5``
  (occlusions) are left out; the remaining pixels are weighted by the face
  mask of frame t. :class:`FlickerMeter` also reports the same error of the
  reference itself (``warp_error_ref``): the floor set by flow error and
  lighting change, against which the output's number is read.

Streaming: :class:`FlickerMeter` and :class:`QualityMeter` keep only the
previous frame pair; the list functions wrap them.

SSIM is the standard Gaussian-window SSIM (Wang et al. 2004: 11 x 11 window,
sigma 1.5, K1 0.01, K2 0.03, data range 1) computed on each RGB channel and
averaged, over the "valid" region (no padding), like BasicSR's
``calculate_ssim`` and ``kornia.metrics.ssim(..., padding="valid")``.
With a mask, the SSIM map is averaged over the mask.

``frvideo metrics --boxes FILE.json`` reads face boxes as JSON, one entry per
frame (frame index order), each a list of boxes ``[x1, y1, x2, y2, ...]``
(extra numbers such as a score are ignored): either a plain list
``[[[x1, y1, x2, y2], ...], [], ...]``, ``{"frames": <that list>}``, or a dict
``{"<frame index>": [[x1, y1, x2, y2], ...], ...}`` where missing frames have
no face; or the JSON-lines file ``frvideo --faces FILE.jsonl`` writes (one
``{"frame": i, "faces": [{"box": [...], ...}]}`` per line).

``--json`` prints one object; a number that is undefined is ``null``, an
infinite PSNR (identical videos) the string ``"inf"``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np

from .errors import InputError, UsageError

__all__ = [
    "to_float", "face_mask", "face_masks", "mse", "psnr", "ssim", "ssim_map", "tdc", "warp_error",
    "token_flip_rate", "FlickerMeter", "QualityMeter", "TokenFlipMeter", "metrics_main",
]


# --------------------------------------------------------------------------- helpers

def to_float(img: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: uint8 / 255, uint16 / 65535, float as is."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.uint16:
        return img.astype(np.float32) / 65535.0
    if img.dtype == np.bool_:
        return img.astype(np.float32)
    return img.astype(np.float32, copy=False)


def _grey8(img: np.ndarray) -> np.ndarray:
    """uint8 grey image for optical flow."""
    f = to_float(img)
    if f.ndim == 3:
        f = cv2.cvtColor(np.ascontiguousarray(f[..., :3]), cv2.COLOR_RGB2GRAY) if f.shape[2] >= 3 else f[..., 0]
    return np.clip(f * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _weights(mask: Optional[np.ndarray], shape: tuple[int, int]) -> Optional[np.ndarray]:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise ValueError(f"mask is {m.shape[:2]}, image is {tuple(shape)}")
    return m.astype(np.float32) if m.dtype != np.float32 else m


def _masked_mse(diff: np.ndarray, w: Optional[np.ndarray]) -> float:
    """Mean of diff**2 over pixels (weighted by w) and channels; nan on an empty mask."""
    sq = np.square(diff, dtype=np.float64) if diff.dtype != np.float64 else diff * diff
    if sq.ndim == 3:
        sq = sq.mean(axis=2)
    if w is None:
        return float(sq.mean())
    total = float(w.sum(dtype=np.float64))
    if total <= 0:
        return math.nan
    return float((sq * w).sum(dtype=np.float64) / total)


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")


def face_mask(boxes, height: int, width: int, margin: float = 0.0) -> np.ndarray:
    """Boolean H x W mask, True inside any of ``boxes`` (rows ``x1, y1, x2, y2, ...``,
    pixel coordinates, x2/y2 exclusive; extra columns ignored). ``margin`` widens
    each box by that fraction of its size on every side. Boxes are clipped to the frame."""
    mask = np.zeros((height, width), bool)
    if boxes is None:
        return mask
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return mask
    arr = arr.reshape(-1, arr.shape[-1])
    if arr.shape[1] < 4:
        raise ValueError(f"a box needs 4 numbers x1, y1, x2, y2; got {arr.shape[1]}")
    for x1, y1, x2, y2 in arr[:, :4]:
        if not np.all(np.isfinite((x1, y1, x2, y2))):
            continue
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        mx, my = margin * (x2 - x1), margin * (y2 - y1)
        c0, c1 = max(0, int(math.floor(x1 - mx))), min(width, int(math.ceil(x2 + mx)))
        r0, r1 = max(0, int(math.floor(y1 - my))), min(height, int(math.ceil(y2 + my)))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def face_masks(boxes_per_frame: Iterable, height: int, width: int, margin: float = 0.0) -> list[np.ndarray]:
    """One boolean mask per frame from per-frame box lists (see :func:`face_mask`)."""
    return [face_mask(b, height, width, margin) for b in boxes_per_frame]


# --------------------------------------------------------------------------- image metrics

def mse(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Masked MSE on the [0, 1] scale, averaged over channels."""
    fa, fb = to_float(a), to_float(b)
    _check_pair(fa, fb)
    return _masked_mse(fa - fb, _weights(mask, fa.shape[:2]))


def psnr(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """PSNR in dB with peak 1 on the [0, 1] scale (= peak 255 for uint8): 10 log10(1 / MSE).
    ``inf`` for identical images, ``nan`` for an empty mask."""
    m = mse(a, b, mask)
    if math.isnan(m):
        return math.nan
    return math.inf if m == 0 else 10.0 * math.log10(1.0 / m)


_C1, _C2 = 0.01 ** 2, 0.03 ** 2
_SSIM_WIN, _SSIM_SIGMA = 11, 1.5


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM (H-10) x (W-10) [x C]: Gaussian 11x11 window, sigma 1.5,
    valid region only (the map starts 5 pixels in from each border)."""
    fa, fb = to_float(a), to_float(b)  # float32: 1e-6 of float64's answer, half the memory traffic
    _check_pair(fa, fb)
    if min(fa.shape[:2]) < _SSIM_WIN:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WIN}x{_SSIM_WIN} pixels, got {fa.shape[:2]}")
    k = cv2.getGaussianKernel(_SSIM_WIN, _SSIM_SIGMA).astype(np.float32)
    r = _SSIM_WIN // 2

    def filt(x):  # separable Gaussian; the border rows/columns it pads are cropped away
        return cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REFLECT)[r:-r, r:-r]

    mu_a, mu_b = filt(fa), filt(fb)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a, var_b, cov = filt(fa * fa) - mu_aa, filt(fb * fb) - mu_bb, filt(fa * fb) - mu_ab
    return ((2 * mu_ab + _C1) * (2 * cov + _C2)) / ((mu_aa + mu_bb + _C1) * (var_a + var_b + _C2))


def ssim(a: np.ndarray, b: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Mean SSIM over RGB channels (see the module doc); with ``mask``, the
    SSIM map's mean over the mask (cropped to the valid region)."""
    m = ssim_map(a, b)
    if m.ndim == 3:
        m = m.mean(axis=2)
    if mask is None:
        return float(m.mean())
    r = _SSIM_WIN // 2
    w = _weights(mask, to_float(a).shape[:2])[r:-r, r:-r]
    total = float(w.sum(dtype=np.float64))
    return math.nan if total <= 0 else float((m * w).sum() / total)


# --------------------------------------------------------------------------- flicker

_DIS = None


def _dis():
    global _DIS
    if _DIS is None:
        _DIS = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    return _DIS


def _warp_valid(g0: np.ndarray, g1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flow from grey frame t (g0) to t+1 (g1): the remap grids that pull frame
    t+1 back onto frame t, and the non-occluded, in-frame pixels of frame t."""
    dis = _dis()
    fw = dis.calc(g0, g1, None)
    bw = dis.calc(g1, g0, None)
    h, w = g0.shape
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    mx, my = gx + fw[..., 0], gy + fw[..., 1]
    inside = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    bw_w = cv2.remap(bw, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    s = fw + bw_w
    lhs = (s * s).sum(axis=2)
    rhs = 0.01 * ((fw * fw).sum(axis=2) + (bw_w * bw_w).sum(axis=2)) + 0.5
    return mx, my, inside & (lhs <= rhs)


def _remap(img: np.ndarray, mx: np.ndarray, my: np.ndarray) -> np.ndarray:
    out = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(img.shape)


class _Mean:
    """Mean of the finite values added; nan when none."""

    def __init__(self):
        self.total, self.n = 0.0, 0

    def add(self, v: float) -> None:
        if not math.isnan(v):
            self.total += v
            self.n += 1

    @property
    def value(self) -> float:
        return self.total / self.n if self.n else math.nan


class FlickerMeter:
    """Streaming TDC and E_warp: ``update(ref_t, out_t, mask_t)`` frame by frame,
    then ``result()``. Holds only the previous frame of each video.

    ``warp=False`` skips the optical flow (TDC only, much faster).
    """

    def __init__(self, warp: bool = True):
        self.warp = warp
        self._prev = None  # (ref float, out float, weights or None, grey ref)
        self.frames = 0
        self._tdc, self._warp, self._warp_ref = _Mean(), _Mean(), _Mean()

    def update(self, ref: np.ndarray, out: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        r, o = to_float(ref), to_float(out)
        _check_pair(r, o)
        w = _weights(mask, r.shape[:2])
        g = _grey8(ref) if self.warp else None
        if self._prev is not None:
            pr, po, pw, pg = self._prev
            if pr.shape != r.shape:
                raise ValueError(f"frame {self.frames} is {r.shape}, the previous frame {pr.shape}")
            # TDC over the union of the two frames' regions
            wu = None if (pw is None and w is None) else np.maximum(
                pw if pw is not None else 1.0, w if w is not None else 1.0).astype(np.float32)
            self._tdc.add(_masked_mse((o - po) - (r - pr), wu))
            if self.warp:
                mx, my, valid = _warp_valid(pg, g)
                wv = valid.astype(np.float32) if pw is None else valid * pw
                self._warp.add(_masked_mse(po - _remap(o, mx, my), wv))
                self._warp_ref.add(_masked_mse(pr - _remap(r, mx, my), wv))
        self._prev = (r, o, w, g)
        self.frames += 1

    @property
    def tdc(self) -> float:
        return self._tdc.value

    @property
    def warp_error(self) -> float:
        return self._warp.value if self.warp else math.nan

    @property
    def warp_error_ref(self) -> float:
        return self._warp_ref.value if self.warp else math.nan

    def result(self) -> dict:
        return {"tdc": self.tdc, "warp_error": self.warp_error, "warp_error_ref": self.warp_error_ref,
                "frames": self.frames, "pairs": self._tdc.n}


class QualityMeter:
    """Streaming per-frame PSNR / SSIM, averaged over the frames (frames whose
    mask is empty are skipped). PSNR is ``inf`` when any frame is identical."""

    def __init__(self, ssim: bool = True):
        self.with_ssim = ssim
        self._psnr, self._ssim, self._mse = _Mean(), _Mean(), _Mean()
        self.frames = 0

    def update(self, ref: np.ndarray, out: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        self.frames += 1
        m = mse(ref, out, mask)
        if math.isnan(m):
            return
        self._mse.add(m)
        self._psnr.add(math.inf if m == 0 else 10.0 * math.log10(1.0 / m))
        if self.with_ssim:
            self._ssim.add(ssim(ref, out, mask))

    def result(self) -> dict:
        return {"psnr": self._psnr.value, "ssim": self._ssim.value if self.with_ssim else math.nan,
                "mse": self._mse.value, "frames_measured": self._mse.n}


def _masks_or_none(masks, n):
    if masks is None:
        return [None] * n
    masks = list(masks)
    if len(masks) != n:
        raise ValueError(f"{len(masks)} masks for {n} frames")
    return masks


def _flicker(ref_frames, out_frames, masks, warp) -> FlickerMeter:
    ref_frames, out_frames = list(ref_frames), list(out_frames)
    if len(ref_frames) != len(out_frames):
        raise ValueError(f"{len(ref_frames)} reference frames but {len(out_frames)} output frames")
    meter = FlickerMeter(warp=warp)
    for r, o, m in zip(ref_frames, out_frames, _masks_or_none(masks, len(ref_frames))):
        meter.update(r, o, m)
    return meter


def tdc(ref_frames: Sequence[np.ndarray], out_frames: Sequence[np.ndarray], masks=None) -> float:
    """Temporal difference consistency (see the module doc); [0, 1]-scale MSE."""
    return _flicker(ref_frames, out_frames, masks, warp=False).tdc


def warp_error(ref_frames: Sequence[np.ndarray], out_frames: Sequence[np.ndarray], masks=None) -> float:
    """Flow-warped error E_warp of the output, flow from the reference (see the module doc)."""
    return _flicker(ref_frames, out_frames, masks, warp=True).warp_error


def token_flip_rate(tokens_per_frame) -> float:
    """Fraction of token positions whose index changes between consecutive frames
    of one track: ``mean(tokens[t+1] != tokens[t])`` over t and positions.
    Input T x N (or T x H x W) integers; nan for T < 2."""
    t = np.asarray(tokens_per_frame)
    if t.ndim < 2:
        raise ValueError("token_flip_rate wants T x N_tokens")
    if t.shape[0] < 2:
        return math.nan
    return float(np.mean(t[1:] != t[:-1]))


class TokenFlipMeter:
    """Streaming token flip rate over several tracks: ``update(track_id, tokens)``
    with one frame's N tokens of that track. ``rate`` pools all tracks;
    ``per_track()`` gives each one's rate."""

    def __init__(self):
        self._last: dict = {}
        self._flips: dict = {}
        self._count: dict = {}

    def update(self, track_id, tokens) -> None:
        tok = np.asarray(tokens).ravel().copy()
        prev = self._last.get(track_id)
        if prev is not None and prev.shape == tok.shape:
            self._flips[track_id] = self._flips.get(track_id, 0) + int((prev != tok).sum())
            self._count[track_id] = self._count.get(track_id, 0) + tok.size
        self._last[track_id] = tok

    def reset(self, track_id) -> None:
        """Forget the track's last tokens (scene cut): the next frame starts afresh."""
        self._last.pop(track_id, None)

    @property
    def rate(self) -> float:
        n = sum(self._count.values())
        return sum(self._flips.values()) / n if n else math.nan

    def per_track(self) -> dict:
        return {k: self._flips[k] / self._count[k] for k in self._count if self._count[k]}


# --------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `frvideo metrics --help`)")


def _load_boxes(path: str) -> tuple[Optional[list], Optional[dict]]:
    """(list per frame, or None) and (dict index -> boxes, or None)."""
    records = _load_face_records(path)
    if records is not None:
        return None, {k: [f["box"] for f in faces] for k, faces in records.items()}
    return _load_plain_boxes(path)


def _load_face_records(path: str) -> Optional[dict[int, list[dict]]]:
    """A ``frvideo --faces`` JSON-lines file as frame -> face records; None for other formats."""
    from .faces.facelog import parse_face_log
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
            if not first.lstrip().startswith("{") or '"frame"' not in first:
                return None
            f.seek(0)
            return parse_face_log(f)
    except (OSError, UnicodeDecodeError):
        return None  # reported by the plain loader
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"faces file {path} is not valid JSON lines: {exc}") from None


def _load_plain_boxes(path: str) -> tuple[Optional[list], Optional[dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise InputError(f"boxes file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read boxes file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"boxes file {path} is not JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(data, dict) and "frames" in data:
        data = data["frames"]
    try:
        if isinstance(data, list):
            frames = [[list(map(float, b[:4])) for b in (boxes or [])] for boxes in data]
            if any(len(b) != 4 for boxes in frames for b in boxes):
                raise ValueError
            return frames, None
        if isinstance(data, dict):
            out = {}
            for k, boxes in data.items():
                out[int(k)] = [list(map(float, b[:4])) for b in (boxes or [])]
                if any(len(b) != 4 for b in out[int(k)]):
                    raise ValueError
            return None, out
    except (TypeError, ValueError):
        pass
    raise UsageError(f"boxes file {path}: expected, per frame, a list of [x1, y1, x2, y2] boxes "
                     f"(a list over frames, {{\"frames\": [...]}}, or {{\"<frame>\": [...]}})")


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v


def _fmt(v: float, spec: str) -> str:
    if math.isnan(v):
        return "n/a"
    if math.isinf(v):
        return "inf"
    return format(v, spec)


def metrics_main(argv: list[str]) -> int:
    """``frvideo metrics REF OUT [--boxes FILE.json] [--json] [--no-warp]``."""
    from .io.frames import to_rgb
    from .io.reader import open_reader

    p = _Parser(prog="frvideo metrics",
                description="Compare a restored video OUT with its reference REF (same frame count and size): "
                            "temporal flicker (TDC, flow-warped error E_warp) and PSNR/SSIM, over the face boxes "
                            "when --boxes is given, else over the whole frame. Errors are MSE on the [0, 1] scale.")
    p.add_argument("ref", help="reference video (e.g. the input of the restoration)")
    p.add_argument("out", help="video to measure (e.g. the restored output)")
    p.add_argument("--boxes", help="JSON face boxes per frame (see `pydoc frvideo.metrics`)")
    p.add_argument("--margin", type=float, default=0.0, help="widen each box by this fraction per side")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-warp", action="store_true", help="skip the optical-flow E_warp (faster)")
    p.add_argument("--identity", action="store_true",
                   help="also the identity distance (dlib face descriptor; same person < 0.6) of each OUT face "
                        "to the REF face, per track: mean and worst. Faces and tracks come from --boxes when it "
                        "is a `frvideo --faces` file, else from --detector on REF (needs the [metrics] extra)")
    p.add_argument("--identity-every", type=int, default=1, metavar="N",
                   help="with --identity: measure every N-th frame (default 1)")
    p.add_argument("--detector", default="auto", help="with --identity and no faces file: detector for REF's faces")
    args = p.parse_args(argv)
    if args.identity_every < 1:
        raise UsageError("--identity-every must be >= 1")
    identity = tracker = detector = None
    records = _load_face_records(args.boxes) if args.boxes else None
    if args.identity:
        from .identity import IdentityMeter
        identity = IdentityMeter()
        if records is None or not all("track" in f for faces in records.values() for f in faces):
            from .faces.detect import load_detector
            from .faces.tracker import FaceTracker
            detector, tracker = load_detector(args.detector), FaceTracker()

    box_list, box_dict = _load_boxes(args.boxes) if args.boxes else (None, None)
    with open_reader(args.ref) as ref, open_reader(args.out) as out:
        ri, oi = ref.info, out.info
        if (ri.width, ri.height) != (oi.width, oi.height):
            raise UsageError(f"{args.ref} is {ri.width}x{ri.height} but {args.out} is {oi.width}x{oi.height}; "
                             f"metrics need videos of the same size")
        if min(ri.width, ri.height) < _SSIM_WIN:
            raise UsageError(f"{args.ref} is {ri.width}x{ri.height}; SSIM needs frames of at least "
                             f"{_SSIM_WIN}x{_SSIM_WIN} pixels")
        if ri.frames and oi.frames and ri.frames != oi.frames:
            raise UsageError(f"{args.ref} has {ri.frames} frames but {args.out} has {oi.frames}; "
                             f"metrics need the same frame count")
        if box_list is not None and ri.frames and len(box_list) != ri.frames:
            raise UsageError(f"boxes file {args.boxes} has {len(box_list)} frames, the videos {ri.frames}")
        flicker = FlickerMeter(warp=not args.no_warp)
        quality = QualityMeter()
        n = with_faces = 0
        ref_it, out_it = iter(ref), iter(out)
        while True:
            rf = next(ref_it, None)
            of = next(out_it, None)
            if rf is None or of is None:
                if rf is not None or of is not None:
                    longer, shorter = (args.ref, args.out) if rf is not None else (args.out, args.ref)
                    raise UsageError(f"{shorter} ended after {n} frames but {longer} has more; "
                                     f"metrics need the same frame count")
                break
            r, o = to_rgb(rf), to_rgb(of)
            if r.shape != o.shape:
                raise UsageError(f"frame {n}: {args.ref} is {r.shape[1]}x{r.shape[0]} but {args.out} is "
                                 f"{o.shape[1]}x{o.shape[0]}")
            mask = None
            if box_list is not None or box_dict is not None:
                if box_list is not None:
                    if n >= len(box_list):
                        raise UsageError(f"boxes file {args.boxes} has {len(box_list)} frames, the videos more")
                    boxes = box_list[n]
                else:
                    boxes = box_dict.get(n, [])
                mask = face_mask(boxes, r.shape[0], r.shape[1], args.margin)
                with_faces += bool(mask.any())
            flicker.update(r, o, mask)
            quality.update(r, o, mask)
            if identity is not None:
                if tracker is not None:  # faces of REF, tracked, on every frame (tracks need them all)
                    from .io.frames import to_rgb8
                    faces = tracker.update(detector.detect(to_rgb8(r)))
                    boxes, tids = [f.box for f in faces], [f.track_id for f in faces]
                else:
                    faces = records.get(n, [])
                    boxes, tids = [f["box"] for f in faces], [f["track"] for f in faces]
                if n % args.identity_every == 0:
                    identity.update(r, o, boxes, tids)
            n += 1
        if box_list is not None and len(box_list) != n:
            raise UsageError(f"boxes file {args.boxes} has {len(box_list)} frames, the videos {n}")

    res = {"frames": n, "region": "boxes" if args.boxes else "frame",
           "frames_with_faces": with_faces if args.boxes else n}
    res.update({k: v for k, v in flicker.result().items() if k not in ("frames",)})
    res.update(quality.result())
    if identity is not None:
        ident = identity.result()
        res["identity"] = {"mean": ident["mean"], "worst": ident["worst"], "faces": ident["faces"],
                           "tracks": {str(t): v for t, v in ident["tracks"].items()}}
    if args.json:
        print(json.dumps(_jsonable(res), allow_nan=False))
    else:
        region = (f"face boxes from {args.boxes} ({with_faces} frames with faces)" if args.boxes
                  else "whole frame")
        print(f"frames   {n}   region: {region}   (errors: MSE on the [0, 1] scale)")
        print(f"TDC      {_fmt(res['tdc'], '.4e')}   temporal difference vs reference (0 = same motion)")
        print(f"E_warp   {_fmt(res['warp_error'], '.4e')}   flow-warped error "
              f"(reference itself: {_fmt(res['warp_error_ref'], '.4e')})")
        print(f"PSNR     {_fmt(res['psnr'], '.2f')} dB")
        print(f"SSIM     {_fmt(res['ssim'], '.4f')}")
        if identity is not None:
            from .identity import SAME_PERSON
            ident = res["identity"]
            print(f"identity {_fmt(ident['mean'], '.3f')} mean, {_fmt(ident['worst'], '.3f')} worst distance "
                  f"over {ident['faces']} faces (same person < {SAME_PERSON})")
            for t, v in ident["tracks"].items():
                print(f"  track {t}: {v['faces']} faces, mean {v['mean']:.3f}, worst {v['worst']:.3f}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(metrics_main(sys.argv[1:]))
