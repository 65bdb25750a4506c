"""Film-aware restoration: black-and-white detection, and film grain matched around each face.

Black and white. Restorers are trained on colour faces; on a monochrome film they
tint skin. A video whose chroma is neutral (Cb = Cr = the mid value, within a
couple of 8-bit steps) over its first frames is taken as black and white, and
only the luma of each restored face is pasted back (``io.frames.add_rgb_deltas``
with ``luma_only``): the chroma planes leave exactly as they were decoded.

Grain. A restorer returns clean, grain-free skin: on a grainy film the face looks
pasted in (plastic). ``GrainMatcher`` measures the grain in a ring around the
face (outside the blend mask, inside a box 1.5x the face's): the high-pass
residual's robust std per luma level (film grain depends on exposure), and its
spatial autocorrelation (the grain's size and shape, i.e. its spectrum). The
same high-pass of the restored face says how much grain it still has; the
missing part is re-synthesised as Gaussian noise filtered to the measured
spectrum, scaled per pixel to the measured std at that pixel's luma, and added
under the face mask. Grain is added to luma only (same change to R, G, B), so it
adds no colour noise and keeps a black-and-white film's chroma untouched. The
noise is drawn from a seed of (track, frame index): a rerun, or a resumed
segment, makes the same frames.
"""
from __future__ import annotations

from typing import Iterable, Optional

import av
import cv2
import numpy as np

# -- black and white ------------------------------------------------------------------

GRAY_SAMPLE_FRAMES = 8  # frames looked at (the first ones with some picture in them)
GRAY_MAX_FRAMES = 24  # ... among at most this many (a film may open on black; these wait in memory)
GRAY_TOLERANCE = 2.0  # 8-bit steps of chroma from neutral that still count as gray
GRAY_SHARE = 0.995  # share of chroma samples that must be within the tolerance


def chroma_offset(frame: av.VideoFrame) -> Optional[float]:
    """The frame's chroma distance from neutral (8-bit steps) that GRAY_SHARE of its samples stay
    within: ~0 for black and white. None for formats without separate chroma planes (RGB) where
    R, G and B are compared instead, and for gray formats (returned as 0)."""
    fmt = frame.format
    comps = fmt.components
    if len(comps) == 1 or (len(comps) == 2 and comps[1].is_alpha):
        return 0.0  # a gray pixel format
    if comps[0].is_luma:
        chroma = [c for c in comps[1:] if not c.is_alpha]  # (PyAV's is_chroma: subsampled chroma only)
        bits = chroma[0].bits
        planes = {c.plane for c in chroma}
        mid = float(1 << (bits - 1))
        if len(planes) == 2:
            values = [_plane(frame, p, bits) for p in sorted(planes)]
        else:  # semi-planar: Cb and Cr interleaved in one plane
            values = [_plane(frame, planes.pop(), bits)]
        dev = np.concatenate([np.abs(v.astype(np.float32) - mid).ravel() for v in values])
        return float(np.quantile(dev, GRAY_SHARE)) / (1 << (bits - 8))
    rgb = frame.to_ndarray(format="rgb24").astype(np.int16)
    spread = np.maximum(np.abs(rgb[..., 0] - rgb[..., 1]), np.abs(rgb[..., 2] - rgb[..., 1]))
    return float(np.quantile(spread, GRAY_SHARE)) / 2.0


def _plane(frame: av.VideoFrame, index: int, bits: int) -> np.ndarray:
    plane = frame.planes[index]
    dtype = np.uint8 if bits <= 8 else np.dtype("<u2")
    row = plane.line_size // np.dtype(dtype).itemsize
    comps_in_plane = sum(1 for c in frame.format.components if c.plane == index)
    return np.frombuffer(plane, dtype).reshape(plane.height, row)[:, :plane.width * comps_in_plane]


def _has_picture(frame: av.VideoFrame) -> bool:
    """Not a flat (black, white or gray) frame: a film's opening black says nothing about its colour."""
    y = frame.to_ndarray(format="gray") if not frame.format.components[0].is_luma else \
        _plane(frame, 0, frame.format.components[0].bits)[:, :frame.width]
    scale = 1 << max(0, frame.format.components[0].bits - 8)
    return float(y.std()) / scale > 4.0


def looks_black_and_white(frames: Iterable[av.VideoFrame]) -> tuple[bool, int]:
    """(gray, frames judged): gray when every frame with a picture among the first ones has neutral
    chroma. ``frames`` are the first decoded frames (GRAY_MAX_FRAMES at most are looked at)."""
    judged = 0
    flat = []
    for i, frame in enumerate(frames):
        if i >= GRAY_MAX_FRAMES or judged >= GRAY_SAMPLE_FRAMES:
            break
        if not _has_picture(frame):
            flat.append(frame)
            continue
        judged += 1
        if chroma_offset(frame) > GRAY_TOLERANCE:
            return False, judged
    if judged == 0:  # nothing but flat frames: judge those
        for frame in flat[:GRAY_SAMPLE_FRAMES]:
            judged += 1
            if chroma_offset(frame) > GRAY_TOLERANCE:
                return False, judged
    return judged > 0, judged


# -- grain ----------------------------------------------------------------------------

HIGHPASS_SIGMA = 1.5  # px: what the residual keeps (grain is 1-3 px; faces' shapes are larger)
HIGHPASS_FLOOR = 0.12  # the least high-pass response the grain spectrum is divided by
LEVELS = 8  # luma bins for the std per exposure
LAG = 5  # autocorrelation lags measured each way: an 11 x 11 grain kernel (grains up to ~2 px)
MIN_SAMPLES = 64  # ring pixels a luma bin needs to count
RING = 0.5  # the ring box: the face's box grown by this much of its size on every side
MEMORY = 0.8  # weight of the past in the per-track grain statistics (grain is stable in a reel)
MAD_TO_STD = 1.4826


def highpass(y: np.ndarray) -> np.ndarray:
    return y - cv2.GaussianBlur(y, (0, 0), HIGHPASS_SIGMA)


def robust_std(values: np.ndarray) -> float:
    """Std of the grain, robust to the edges a high-pass also keeps (median absolute deviation)."""
    if values.size == 0:
        return 0.0
    return float(MAD_TO_STD * np.median(np.abs(values - np.median(values))))


def level_stds(residual: np.ndarray, level: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Robust residual std per luma bin (NaN where a bin has too few pixels)."""
    out = np.full(LEVELS, np.nan, np.float32)
    bins = np.clip((level * LEVELS).astype(np.int32), 0, LEVELS - 1)
    for b in range(LEVELS):
        sel = where & (bins == b)
        if int(sel.sum()) >= MIN_SAMPLES:
            out[b] = robust_std(residual[sel])
    return out


def autocorrelation(residual: np.ndarray, where: np.ndarray) -> Optional[np.ndarray]:
    """Normalised autocorrelation (2 LAG + 1)² of the residual over the pixels ``where`` (pairs
    both of whose pixels are in it), None if too few. Outliers (edges) are clipped first. Sums
    over all pixel pairs at once by FFT (zero-padded: no wrap-around)."""
    s = robust_std(residual[where])
    if s <= 0:
        return None
    m = where.astype(np.float32)
    r = np.clip(residual, -3 * s, 3 * s) * m
    h, w = r.shape
    fh, fw = cv2.getOptimalDFTSize(h + LAG), cv2.getOptimalDFTSize(w + LAG)

    def correlate(a):
        spectrum = np.fft.rfft2(a, (fh, fw))
        full = np.fft.irfft2(spectrum * np.conj(spectrum), (fh, fw))
        ys, xs = np.arange(-LAG, LAG + 1) % fh, np.arange(-LAG, LAG + 1) % fw
        return full[np.ix_(ys, xs)]
    pairs = correlate(m)
    if float(pairs.min()) < MIN_SAMPLES:
        return None
    out = correlate(r) / pairs
    if out[LAG, LAG] <= 0:
        return None
    return out / out[LAG, LAG]


def shaping_kernel(acf: np.ndarray) -> np.ndarray:
    """The filter that turns white noise into grain whose high-pass has this autocorrelation: the
    inverse FFT of the square root of the grain's power spectrum. That spectrum is the FFT of the
    autocorrelation (of the high-pass residual) divided by the high-pass's own response (floored,
    so the lowest frequencies the high-pass removed are not blown up)."""
    k = acf.shape[0]
    size = 4 * k  # zero-padded: a finer spectrum
    padded = np.zeros((size, size))
    padded[:k, :k] = acf
    padded = np.roll(padded, (-(k // 2), -(k // 2)), axis=(0, 1))  # lag 0 at the origin
    f = np.fft.fftfreq(size)
    f2 = f[:, None] ** 2 + f[None, :] ** 2
    highpass_response = (1.0 - np.exp(-2.0 * np.pi ** 2 * HIGHPASS_SIGMA ** 2 * f2)) ** 2
    power = np.maximum(np.fft.fft2(padded).real, 0.0) / np.maximum(highpass_response, HIGHPASS_FLOOR)
    kernel = np.fft.fftshift(np.fft.ifft2(np.sqrt(power)).real)
    c = size // 2
    kernel = kernel[c - LAG:c + LAG + 1, c - LAG:c + LAG + 1].astype(np.float32)
    return kernel / max(float(np.sqrt((kernel ** 2).sum())), 1e-12)


class _TrackGrain:
    def __init__(self, stds: np.ndarray, acf: Optional[np.ndarray]):
        self.stds, self.acf = stds, acf


class GrainMatcher:
    """Adds grain matched to the film around each face to its restored part (see the module doc)."""

    def __init__(self, luma_weights: tuple[float, float] = (0.2126, 0.0722), seed: int = 0):
        self.kr, self.kb = luma_weights
        self.seed = seed
        self.tracks: dict[int, _TrackGrain] = {}
        self.last_added: float = 0.0  # std of the grain added to the last face (0-1 units), for tests/stats

    def luma(self, rgb: np.ndarray) -> np.ndarray:
        return rgb[..., 0] * self.kr + rgb[..., 1] * (1 - self.kr - self.kb) + rgb[..., 2] * self.kb

    def _measure(self, track_id: int, new_track: bool, y: np.ndarray, ring: np.ndarray) -> Optional[_TrackGrain]:
        residual = highpass(y)
        stds = level_stds(residual, cv2.GaussianBlur(y, (0, 0), 3.0), ring)
        acf = autocorrelation(residual, ring)
        past = None if new_track else self.tracks.get(track_id)
        if past is not None:  # a running mean per track: one frame's ring is a small sample
            stds = np.where(np.isnan(stds), past.stds,
                            np.where(np.isnan(past.stds), stds, MEMORY * past.stds + (1 - MEMORY) * stds))
            if acf is None:
                acf = past.acf
            elif past.acf is not None:
                acf = MEMORY * past.acf + (1 - MEMORY) * acf
        if np.isnan(stds).all():
            return past
        state = _TrackGrain(stds, acf)
        if len(self.tracks) > 256:
            self.tracks.pop(next(iter(self.tracks)))
        self.tracks[track_id] = state
        return state

    def apply(self, rgb: np.ndarray, x0: int, y0: int, delta: np.ndarray, mask: np.ndarray,
              track_id: int, frame_index: int, new_track: bool = False) -> np.ndarray:
        """``delta`` (h x w x 3, 0-1 units, placed at x0, y0 in the frame ``rgb``) plus the grain the
        restored face lacks, under ``mask`` (h x w, the face's blend mask in the frame)."""
        self.last_added = 0.0
        peak = 255.0 if rgb.dtype == np.uint8 else 65535.0
        h, w = delta.shape[:2]
        H, W = rgb.shape[:2]
        gx, gy = int(RING * w), int(RING * h)
        bx0, by0, bx1, by1 = max(0, x0 - gx), max(0, y0 - gy), min(W, x0 + w + gx), min(H, y0 + h + gy)
        y_big = self.luma(rgb[by0:by1, bx0:bx1].astype(np.float32) / peak)
        ring = np.ones(y_big.shape, bool)
        inner = ring[y0 - by0:y0 - by0 + h, x0 - bx0:x0 - bx0 + w]
        inner &= mask < 0.02  # outside the face (and whatever the blend touched)
        # not the frame's border pixels of the high-pass (its blur reaches past them)
        ring[:2], ring[-2:], ring[:, :2], ring[:, -2:] = False, False, False, False
        grain = self._measure(track_id, new_track, y_big, ring)
        if grain is None or grain.acf is None:
            return delta
        # how much grain the restored face keeps (same high-pass, same robust std, the face's core)
        y_in = y_big[y0 - by0:y0 - by0 + h, x0 - bx0:x0 - bx0 + w]
        y_out = np.clip(y_in + self.luma(delta), 0.0, 1.0)
        core = mask > 0.5
        if int(core.sum()) < MIN_SAMPLES:
            return delta
        level_out = cv2.GaussianBlur(y_out, (0, 0), 3.0)
        target = self._std_at(grain.stds, level_out)
        have = robust_std(highpass(y_out)[core])
        want = float(np.median(target[core]))
        if want <= 0 or have >= want:
            return delta
        missing = np.sqrt(1.0 - (have / want) ** 2)
        noise = self._noise(grain.acf, (h, w), track_id, frame_index)
        added = noise * target * missing * mask
        self.last_added = float(np.median(target[core]) * missing)
        return delta + added[..., None].astype(np.float32)

    @staticmethod
    def _std_at(stds: np.ndarray, level: np.ndarray) -> np.ndarray:
        valid = ~np.isnan(stds)
        centers = (np.arange(LEVELS) + 0.5) / LEVELS
        return np.interp(level, centers[valid], stds[valid]).astype(np.float32)

    def _noise(self, acf: np.ndarray, shape: tuple[int, int], track_id: int, frame_index: int) -> np.ndarray:
        """Unit-std noise (after the same high-pass the measurement uses) of the measured spectrum."""
        rng = np.random.default_rng((self.seed, track_id, frame_index))
        white = rng.standard_normal((shape[0] + 2 * LAG, shape[1] + 2 * LAG)).astype(np.float32)
        shaped = cv2.filter2D(white, -1, shaping_kernel(acf), borderType=cv2.BORDER_REFLECT)
        shaped = shaped[LAG:LAG + shape[0], LAG:LAG + shape[1]]
        s = robust_std(highpass(shaped))
        return shaped / s if s > 0 else shaped


def frame_mask(mask: np.ndarray, transform: np.ndarray, frame_hw: tuple[int, int]):
    """The crop-space blend mask warped into the frame box that ``change_to_frame`` uses."""
    from .faces.blend import change_to_frame
    out = change_to_frame(np.ones(mask.shape + (1,), np.float32), mask, transform, frame_hw)
    return None if out is None else out[2][..., 0]
