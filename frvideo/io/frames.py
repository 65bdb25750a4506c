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
    return frame.reformat(format=fmt, src_colorspace=matrix, src_color_range=rng,
                          dst_colorspace=matrix, dst_color_range=ColorRange.JPEG).to_ndarray()


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


def from_rgb(original: av.VideoFrame, rgb: np.ndarray, rois: Iterable[tuple[int, int, int, int]]) -> av.VideoFrame:
    """A new frame in the original's format: RGB pixels inside ``rois``, the
    original's decoded samples everywhere else. Keeps pts, time base and tags."""
    matrix, rng = matrix_and_range(original)
    src_fmt = "rgb48le" if rgb.dtype == np.uint16 else "rgb24"
    converted = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format=src_fmt).reformat(
        format=original.format.name, src_colorspace=matrix, src_color_range=ColorRange.JPEG,
        dst_colorspace=matrix, dst_color_range=rng)
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
    out.pts, out.time_base = original.pts, original.time_base
    out.color_range, out.colorspace = original.color_range, original.colorspace
    out.color_primaries, out.color_trc = original.color_primaries, original.color_trc
    return out
