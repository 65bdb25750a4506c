"""Per-face costs of the stages around the model, side by side in one run: the blend
(FaceBlend) and the temporal filter (FaceFilter) with their blurs and pyramids on OpenCV
(frvideo/faces/crop_filters.py, what ships) against the same code on kornia's filters (what
it ran on before), and the embedded detector with its BatchNorms folded into the convs
(frvideo/nn/fuse.py, what ships) against the unfolded network, and ``lite`` itself (encode +
decode of one 256² face and of a batch of 4) in fp32 against ``--precision int8`` (its ONNX Runtime
int8 graphs; needs onnxruntime). One thread, so the figures are per core; quote the ratios, the
machine's speed drifts.

    python bench/stage_speed.py [--sizes 256 512] [--repeats 20]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from frvideo.faces import detail  # noqa: E402
from frvideo import temporal  # noqa: E402


def _kornia_gauss(x, sigma, border="reflect", truncate=3.0):
    from kornia.filters import gaussian_blur2d
    if sigma <= 0:
        return x
    k = 2 * int(math.ceil(truncate * sigma)) + 1
    return gaussian_blur2d(x, (k, k), (sigma, sigma), border_type=border)


def _kornia_down(x):
    from kornia.geometry.transform import pyrdown
    return pyrdown(x)


def _kornia_up(x):
    from kornia.geometry.transform import pyrup
    return pyrup(x)


@contextmanager
def kornia_filters():
    """The blend and the temporal filter as they were: every blur and pyramid step on kornia."""
    saved = detail.gaussian_blur, detail.pyr_down, detail.pyr_up, temporal.gaussian_blur
    detail.gaussian_blur, detail.pyr_down, detail.pyr_up = _kornia_gauss, _kornia_down, _kornia_up
    temporal.gaussian_blur = _kornia_gauss
    try:
        yield
    finally:
        detail.gaussian_blur, detail.pyr_down, detail.pyr_up, temporal.gaussian_blur = saved


def ms(fn, repeats: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats * 1000


def face_pair(size: int):
    g = torch.Generator().manual_seed(size)
    x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    return x, y, torch.ones(1, 1, size, size)


def stage_rows(size: int, repeats: int) -> list[tuple[str, float, float]]:
    x, y, mask = face_pair(size)
    blend = detail.FaceBlend(size)

    def filtered():
        # two frames of one track: the second is blended with the first (flow + blurs)
        f = temporal.FaceFilter()
        f(y, [1], [True], inputs=x)
        f(y, [1], [False], inputs=x)

    rows = []
    for name, fn in ((f"FaceBlend {size}²", lambda: blend(x, y, mask)),
                     (f"FaceFilter {size}² (2 frames)", filtered)):
        ours = ms(fn, repeats)
        with kornia_filters():
            before = ms(fn, repeats)
        rows.append((name, before, ours))
    return rows


def detector_rows(repeats: int) -> list[tuple[str, float, float]]:
    from frvideo.faces.embedded import SHIPPED_WEIGHTS, load_embedded_net
    from frvideo.nn.fuse import fuse_conv_batchnorm
    x = torch.randn(1, 3, 384, 640, generator=torch.Generator().manual_seed(0))
    plain = load_embedded_net(SHIPPED_WEIGHTS)[0]
    folded = fuse_conv_batchnorm(load_embedded_net(SHIPPED_WEIGHTS)[0])
    with torch.inference_mode():
        return [("embedded detector net, 640 x 384", ms(lambda: plain(x), repeats), ms(lambda: folded(x), repeats))]


def lite_rows(repeats: int) -> list[tuple[str, float, float]]:
    from frvideo.restore import INT8, RestoreContext, load_restorer
    try:
        int8 = load_restorer("lite", dtype=INT8)
    except Exception as exc:  # onnxruntime not installed: say so, time the rest
        print(f"(lite int8 not timed: {exc})", file=sys.stderr)
        return []
    fp32 = load_restorer("lite")
    rows = []
    for batch in (1, 4):
        x = face_pair(256)[0].repeat(batch, 1, 1, 1)
        ctx = RestoreContext.single(batch)
        rows.append((f"lite encode + decode, {batch} x 256² (fp32 -> int8)",
                     ms(lambda: fp32.restore(x, ctx), repeats) / batch, ms(lambda: int8.restore(x, ctx), repeats) / batch))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [r for s in args.sizes for r in stage_rows(s, args.repeats)] + detector_rows(args.repeats) \
        + lite_rows(args.repeats)
    print("| stage (one thread, per face) | before (kornia / BatchNorm / fp32) | now (OpenCV / folded / int8) | now / before |")
    print("|---|---|---|---|")
    for name, before, ours in rows:
        print(f"| {name} | {before:.1f} ms | {ours:.1f} ms | {ours / before:.2f} |")


if __name__ == "__main__":
    main()
