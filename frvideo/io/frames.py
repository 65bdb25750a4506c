"""Frame <-> RGB array conversion that leaves untouched pixels bit-identical.

Faces are pasted in RGB, but the video lives in YUV (often subsampled). A full
YUV->RGB->YUV round trip would soften every pixel of the frame, so only the
rectangles the faces touched are converted back and written into a copy of
the original planes; everything else keeps the decoded samples.
"""
from __future__ import annotations

from typing import Iterable

import av
import numpy as np
from av.video.reformatter import ColorRange, Colorspace

# AVCOL_SPC_* -> swscale matrix
_MATRIX = {1: Colorspace.ITU709, 4: Colorspace.FCC, 5: Colorspace.ITU601, 6: Colorspace.ITU601,
           7: Colorspace.SMPTE240M, 9: Colorspace.BT2020, 10: Colorspace.BT2020}


def matrix_and_range(frame: av.VideoFrame) -> tuple[Colorspace, ColorRange]:
    """The YUV matrix and range to convert with; untagged video follows players'
    convention (BT.709 from 720 lines up, BT.601 below; limited range unless yuvj)."""
    matrix = _MATRIX.get(int(frame.colorspace))
    if matrix is None:
        matrix = Colorspace.ITU709 if frame.height >= 720 else Colorspace.ITU601
    full = int(frame.color_range) == 2 or frame.format.name.startswith("yuvj")
    return matrix, ColorRange.JPEG if full else ColorRange.MPEG


def high_bit_depth(frame: av.VideoFrame) -> bool:
    return max(c.bits for c in frame.format.components) > 8


def to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """H x W x 3 RGB: uint8 for 8-bit video, uint16 (full 16-bit scale) above."""
    if frame.format.name in ("rgb24", "rgb48le"):
        return frame.to_ndarray()
    matrix, rng = matrix_and_range(frame)
    fmt = "rgb48le" if high_bit_depth(frame) else "rgb24"
    # threads=1: a frame otherwise keeps a swscale thread pool of its own for as long as it lives
    return frame.reformat(format=fmt, src_colorspace=matrix, src_color_range=rng,
                          dst_colorspace=matrix, dst_color_range=ColorRange.JPEG, threads=1).to_ndarray()


def to_rgb8(rgb: np.ndarray) -> np.ndarray:
    return rgb if rgb.dtype == np.uint8 else (rgb >> 8).astype(np.uint8)


def _plane_array(frame: av.VideoFrame, index: int) -> np.ndarray:
    """A writable view (rows x bytes) of one plane, without the line padding."""
    plane = frame.planes[index]
    comps = [c for c in frame.format.components if c.plane == index]
    bytes_per_px = len(comps) * ((max(c.bits for c in comps) + 7) // 8)
    buf = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return buf[:, : plane.width * bytes_per_px], bytes_per_px


# Formats whose planes hold whole pixels (the ROI copy below is exact for them).
def _roi_copy_supported(fmt: av.VideoFormat) -> bool:
    return fmt.name.startswith(("yuv", "yuvj", "gray", "nv12", "nv21", "gbrp", "rgb24", "bgr24", "rgb48", "p010"))


def _copy_frame_props(original: av.VideoFrame, out: av.VideoFrame) -> None:
    out.pts = original.pts
    if original.time_base is not None:
        out.time_base = original.time_base
    out.color_range, out.colorspace = original.color_range, original.colorspace
    out.color_primaries, out.color_trc = original.color_primaries, original.color_trc


def from_rgb(original: av.VideoFrame, rgb: np.ndarray, rois: Iterable[tuple[int, int, int, int]]) -> av.VideoFrame:
    """A new frame in the original's format: RGB pixels inside ``rois``, the
    original's decoded samples everywhere else. Keeps pts, time base and tags."""
    matrix, rng = matrix_and_range(original)
    src_fmt = "rgb48le" if rgb.dtype == np.uint16 else "rgb24"
    converted = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format=src_fmt).reformat(
        format=original.format.name, src_colorspace=matrix, src_color_range=ColorRange.JPEG,
        dst_colorspace=matrix, dst_color_range=rng, threads=1)
    if _roi_copy_supported(original.format):
        out = av.VideoFrame(original.width, original.height, original.format.name)
        for p in range(len(original.planes)):
            dst, bpp = _plane_array(out, p)
            src_orig, _ = _plane_array(original, p)
            src_new, _ = _plane_array(converted, p)
            dst[...] = src_orig
            sy = original.height / original.planes[p].height
            sx = original.width / original.planes[p].width
            for x0, y0, x1, y1 in rois:
                # widen to whole chroma samples so a subsampled pixel is never half-updated
                px0, px1 = int(x0 // sx), int(-(-x1 // sx))
                py0, py1 = int(y0 // sy), int(-(-y1 // sy))
                dst[py0:py1, px0 * bpp:px1 * bpp] = src_new[py0:py1, px0 * bpp:px1 * bpp]
    else:
        out = converted
    _copy_frame_props(original, out)
    return out


# -- adding an RGB change straight to the decoded planes ----------------------------

# Luma weights (Kr, Kb) of each swscale matrix; Kg = 1 - Kr - Kb.
_LUMA_WEIGHTS = {Colorspace.ITU709: (0.2126, 0.0722), Colorspace.ITU601: (0.299, 0.114),
                 Colorspace.SMPTE240M: (0.212, 0.087), Colorspace.FCC: (0.30, 0.11),
                 Colorspace.BT2020: (0.2627, 0.0593)}
_PACKED_RGB = {"rgb24": (0, 1, 2), "bgr24": (2, 1, 0), "rgb48le": (0, 1, 2), "bgr48le": (2, 1, 0)}


def _delta_layout(fmt: av.VideoFormat) -> str | None:
    """How :func:`add_rgb_deltas` writes into this format, or None (then it converts instead)."""
    if fmt.is_big_endian or fmt.has_palette or fmt.is_bayer or fmt.is_bit_stream:
        return None
    if fmt.name in _PACKED_RGB:
        return "rgb"
    comps = fmt.components
    if comps[0].is_luma and comps[0].plane == 0 and all(c.bits <= 16 for c in comps):
        if len(comps) == 1 or (len(comps) == 2 and comps[1].is_alpha):
            return "gray"
        chroma = [c for c in comps if c.is_chroma]
        if len(chroma) == 2 and {c.plane for c in chroma} == {1, 2}:  # planar Cb, Cr (not nv12/p010)
            return "yuv"
    return None


def _plane_values(frame: av.VideoFrame, index: int, bits: int) -> np.ndarray:
    """A writable rows x samples view of one plane (uint8, or little-endian uint16 above 8 bits)."""
    plane = frame.planes[index]
    dtype = np.uint8 if bits <= 8 else np.dtype("<u2")
    width = plane.line_size // np.dtype(dtype).itemsize
    return np.frombuffer(plane, dtype).reshape(plane.height, width)


def _add_to(plane: np.ndarray, x0: int, y0: int, delta: np.ndarray, peak: int) -> None:
    """plane[y0:, x0:] += delta (rounded, clipped). A sample whose change rounds to 0 keeps
    its decoded value bit for bit."""
    h, w = delta.shape[:2]
    region = plane[y0:y0 + h, x0:x0 + w]
    new = np.clip(np.rint(region.astype(np.float32) + delta), 0, peak)
    region[...] = new.astype(plane.dtype)


def _subsample(delta: np.ndarray, x0: int, y0: int, sx: int, sy: int, height: int, width: int):
    """Mean of ``delta`` (placed at x0, y0 in a frame that is otherwise 0) over each sx x sy
    chroma cell it touches: (cell x0, cell y0, cell means)."""
    h, w = delta.shape
    cx0, cy0 = x0 // sx, y0 // sy
    cx1, cy1 = min(-(-(x0 + w) // sx), width), min(-(-(y0 + h) // sy), height)
    padded = np.zeros(((cy1 - cy0) * sy, (cx1 - cx0) * sx), np.float32)
    ox, oy = x0 - cx0 * sx, y0 - cy0 * sy
    hh, ww = min(h, padded.shape[0] - oy), min(w, padded.shape[1] - ox)
    padded[oy:oy + hh, ox:ox + ww] = delta[:hh, :ww]
    cells = padded.reshape(cy1 - cy0, sy, cx1 - cx0, sx).mean(axis=(1, 3))
    return cx0, cy0, cells


def _luma_plane_alone(fmt: av.VideoFormat) -> bool:
    """Plane 0 holds luma and nothing else (planar and semi-planar YUV, gray)."""
    comps = fmt.components
    return (not fmt.is_big_endian and not fmt.has_palette and not fmt.is_bayer and not fmt.is_bit_stream
            and comps[0].is_luma and comps[0].plane == 0 and comps[0].bits <= 16
            and not any(c.plane == 0 for c in comps[1:]))


def add_rgb_deltas(original: av.VideoFrame, deltas: Iterable[tuple[int, int, np.ndarray]],
                   luma_only: bool = False) -> av.VideoFrame:
    """A new frame: ``original`` plus RGB changes, written into its own planes.

    ``deltas``: (x0, y0, d) with d an h x w x 3 float32 change in RGB on the [0, 1] scale,
    placed at column x0, row y0. The change is turned into the frame's own sample space
    (the RGB -> Y'CbCr matrix is linear, chroma averaged over each subsampled cell) and
    added to the decoded samples, so a pixel the change leaves alone (or changes by less
    than half a step) keeps its decoded value exactly, and restored pixels are not
    re-sampled through a YUV -> RGB -> YUV round trip either. Formats this does not know
    (semi-planar, palette, big-endian) go through RGB conversion of the touched boxes
    (:func:`from_rgb`). Keeps pts, time base and colour tags.

    ``luma_only`` (black-and-white video): only the luma of the change is added; the chroma
    planes stay bit for bit as decoded (packed RGB: the luma change goes to R, G and B alike,
    so a gray pixel stays gray).
    """
    deltas = [(x0, y0, d) for x0, y0, d in deltas if d.size]
    if not deltas:
        return original
    fmt = original.format
    layout = _delta_layout(fmt)
    if luma_only and layout != "rgb" and _luma_plane_alone(fmt):
        layout = "gray"  # nv12/p010 too: only plane 0 is touched
    elif luma_only and layout is None:
        # no luma plane of its own (gbrp, ...): add the change's luma to each channel alike
        deltas = [(x0, y0, np.repeat(_luma_of(d, original)[..., None], 3, axis=2)) for x0, y0, d in deltas]
    if layout is None:
        return _add_by_conversion(original, deltas)
    out = av.VideoFrame(original.width, original.height, fmt.name)
    for p in range(len(original.planes)):  # row by row: the two frames' line padding may differ
        dst, _ = _plane_array(out, p)
        dst[...] = _plane_array(original, p)[0]
    bits = max(c.bits for c in fmt.components)
    top = (1 << bits) - 1
    if layout == "rgb":
        order = _PACKED_RGB[fmt.name]
        values = _plane_values(out, 0, bits)[:, :3 * original.width].reshape(original.height, original.width, 3)
        for x0, y0, d in deltas:
            if luma_only:
                d = np.repeat(_luma_of(d, original)[..., None], 3, axis=2)
            _add_to(values, x0, y0, d[..., order] * top, top)
    else:
        matrix, rng = matrix_and_range(original)
        kr, kb = _LUMA_WEIGHTS.get(matrix, _LUMA_WEIGHTS[Colorspace.ITU601])
        full = rng == ColorRange.JPEG
        step = 1 << (bits - 8)
        y_scale = top if full else 219 * step
        c_scale = top if full else 224 * step
        luma = _plane_values(out, 0, bits)[:, :original.width]
        chroma = [] if layout == "gray" else [_plane_values(out, p, bits)[:, :out.planes[p].width] for p in (1, 2)]
        sx = sy = 1
        if chroma:
            sx = max(1, round(original.width / out.planes[1].width))
            sy = max(1, round(original.height / out.planes[1].height))
        for x0, y0, d in deltas:
            dy = d[..., 0] * kr + d[..., 1] * (1.0 - kr - kb) + d[..., 2] * kb
            _add_to(luma, x0, y0, dy * y_scale, top)
            if chroma:
                dcb = (d[..., 2] - dy) / (2.0 * (1.0 - kb))
                dcr = (d[..., 0] - dy) / (2.0 * (1.0 - kr))
                for plane, dc in zip(chroma, (dcb, dcr)):
                    cx0, cy0, cells = _subsample(dc, x0, y0, sx, sy, plane.shape[0], plane.shape[1])
                    _add_to(plane, cx0, cy0, cells * c_scale, top)
    _copy_frame_props(original, out)
    return out


def _luma_of(d: np.ndarray, frame: av.VideoFrame) -> np.ndarray:
    """The luma (Y') of an RGB change, with the frame's own matrix weights."""
    kr, kb = _LUMA_WEIGHTS.get(matrix_and_range(frame)[0], _LUMA_WEIGHTS[Colorspace.ITU601])
    return d[..., 0] * kr + d[..., 1] * (1.0 - kr - kb) + d[..., 2] * kb


def _add_by_conversion(original: av.VideoFrame, deltas) -> av.VideoFrame:
    rgb = to_rgb(original)
    peak = 255.0 if rgb.dtype == np.uint8 else 65535.0
    rois = []
    for x0, y0, d in deltas:
        h, w = d.shape[:2]
        region = rgb[y0:y0 + h, x0:x0 + w]
        region[...] = np.clip(np.rint(region.astype(np.float32) + d * peak), 0, peak).astype(rgb.dtype)
        rois.append((x0, y0, x0 + w, y0 + h))
    return from_rgb(original, rgb, rois)
