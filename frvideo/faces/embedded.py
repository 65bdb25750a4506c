"""The embedded detector: frvideo's own single-stage face detector, shipped in
the package (``frvideo/faces/weights/embedded_detector.pth``), no download.

``TinyFaceNet`` (86k parameters) sees the RGB frame shrunk so its
longer side is at most ``max_size`` (640) and predicts, on three feature maps
at strides 8, 16 and 32 (a small top-down pyramid that also reads a stride-64
context map), per cell: a face logit, a box (centre offset and log size in
units of the stride) and the 5 landmarks (offsets from the cell centre in
units of 4 strides). Anchor-free: a face of size s = sqrt(w h) is learnt at
every level where 2 <= s / stride <= 8 (stride 8 takes all smaller faces down
to 12 px, stride 32 all larger ones), by the cells near its centre.
Inference: sigmoid scores >= ``score_threshold``, greedy NMS (IoU > 0.4).

It was trained by distillation from RetinaFace MobileNet-0.25 on frames of the
training clips and the still images (``frvideo.train.detector``; the recipe
and measured accuracy are in ``frvideo/faces/weights/README.md``).

Landmark order as everywhere in frvideo: image-left eye, image-right eye,
nose, image-left mouth corner, image-right mouth corner.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import WeightsError
from ..nn.fuse import fuse_conv_batchnorm
from .detect import Detections, FaceDetector
from .retinaface import nms, shrink_for_detection

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights" / "embedded_detector.pth"
STRIDES = (8, 16, 32)
PAD = 64  # the input is padded to a multiple of the context level's stride
LM_UNIT = 4.0  # landmark offsets are predicted in units of LM_UNIT strides
FLIP_ORDER = (1, 0, 2, 4, 3)  # landmark index after a horizontal mirror
RGB_MEAN, RGB_STD = 0.5, 0.25  # input: (rgb / 255 - mean) / std
N_OUT = 1 + 4 + 10  # face logit, box, landmarks
FUSE_IOU = 0.6  # cells fused into a detection (see ``fuse``)


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


def _dws(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (stride) + pointwise 1x1, each with BN and ReLU."""
    return nn.Sequential(*_cbr(cin, cin, 3, stride, cin), *_cbr(cin, cout, 1))


class TinyFaceNet(nn.Module):
    """RGB (normalised) B x 3 x H x W, H and W multiples of 64 -> three maps
    B x 15 x H/s x W/s for s = 8, 16, 32 (logit, box 4, landmarks 10)."""

    def __init__(self, widths=(8, 24, 32, 64, 96, 96), fpn: int = 32):
        super().__init__()
        w0, w4, w8, w16, w32, w64 = widths
        self.stem = nn.Sequential(*_cbr(3, w0, 3, 2))                                     # /2
        self.s4 = nn.Sequential(_dws(w0, w4, 2), _dws(w4, w4))                             # /4
        self.s8 = nn.Sequential(_dws(w4, w8, 2), _dws(w8, w8), _dws(w8, w8))               # /8
        self.s16 = nn.Sequential(_dws(w8, w16, 2), _dws(w16, w16), _dws(w16, w16))         # /16
        self.s32 = nn.Sequential(_dws(w16, w32, 2), _dws(w32, w32), _dws(w32, w32))        # /32
        self.s64 = nn.Sequential(_dws(w32, w64, 2), _dws(w64, w64))                        # /64, context
        self.lat = nn.ModuleList([nn.Sequential(*_cbr(c, fpn, 1)) for c in (w8, w16, w32, w64)])
        self.smooth = nn.ModuleList([_dws(fpn, fpn) for _ in STRIDES])
        # one head per level: a head shared across levels would share its BatchNorm statistics
        # between maps whose statistics differ (the first run did: box sizes at stride 32 came
        # out ~30% small in eval mode while right in train mode)
        self.heads = nn.ModuleList([nn.Sequential(_dws(fpn, fpn), nn.Conv2d(fpn, N_OUT, 1)) for _ in STRIDES])
        for head in self.heads:
            nn.init.constant_(head[-1].bias, 0.0)
            with torch.no_grad():
                head[-1].bias[0] = -4.6  # prior face probability 0.01 (focal-loss start)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f8 = self.s8(self.s4(self.stem(x)))
        f16 = self.s16(f8)
        f32 = self.s32(f16)
        f64 = self.s64(f32)
        p = self.lat[3](f64)
        outs = []
        for i, f in ((2, f32), (1, f16), (0, f8)):
            p = self.lat[i](f) + F.interpolate(p, size=f.shape[-2:], mode="nearest")
            outs.append(self.heads[i](self.smooth[i](p)))
        return outs[::-1]  # strides 8, 16, 32


def normalise(batch_rgb_uint8: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float, padded to multiples of ``PAD``."""
    x = batch_rgb_uint8.permute(0, 3, 1, 2).float().div_(255.0).sub_(RGB_MEAN).div_(RGB_STD)
    h, w = x.shape[-2:]
    ph, pw = -h % PAD, -w % PAD
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))  # 0 = mid grey after normalisation
    return x


def decode_level(out: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level's B x 15 x h x w map -> scores B x N, boxes B x N x 4 (x1 y1 x2 y2),
    landmarks B x N x 5 x 2, in pixels of the network input."""
    b, _, h, w = out.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=out.dtype), torch.arange(w, dtype=out.dtype), indexing="ij")
    cx = ((xs + 0.5) * stride).reshape(1, -1)
    cy = ((ys + 0.5) * stride).reshape(1, -1)
    o = out.reshape(b, N_OUT, -1)
    score = torch.sigmoid(o[:, 0])
    bx = cx + o[:, 1] * stride
    by = cy + o[:, 2] * stride
    bw = torch.exp(o[:, 3].clamp(max=6.0)) * stride
    bh = torch.exp(o[:, 4].clamp(max=6.0)) * stride
    boxes = torch.stack([bx - bw / 2, by - bh / 2, bx + bw / 2, by + bh / 2], -1)
    lm = o[:, 5:].reshape(b, 5, 2, -1).permute(0, 3, 1, 2) * (LM_UNIT * stride)
    lm = lm + torch.stack([cx, cy], -1).reshape(1, -1, 1, 2)
    return score, boxes, lm


def checkpoint_crc(state: dict) -> int:
    """CRC32 over the tensors' names and bytes in key order (stored in the
    checkpoint's meta, checked at load: a damaged or edited file is refused)."""
    crc = 0
    for k in sorted(state):
        v = state[k]
        crc = zlib.crc32(k.encode(), crc)
        crc = zlib.crc32(v.detach().cpu().contiguous().numpy().tobytes(), crc)
    return crc & 0xFFFFFFFF


def load_embedded_net(path: Path) -> tuple[TinyFaceNet, dict]:
    """The network of a checkpoint ``{'params': state, 'meta': {...}}``, with the
    checks every frvideo checkpoint gets (zip CRCs, every tensor finite:
    ``frvideo.restore.load_checkpoint_file``) and the CRC32 over the tensors
    stored in ``meta`` (it catches an edited file whose zip CRCs were rewritten)."""
    from ..restore import load_checkpoint_file, load_state_dict_strict

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"embedded detector weight file not found: {path} (check --detector-weights)")
    try:
        ckpt = load_checkpoint_file(path)
    except WeightsError as exc:
        raise WeightsError(f"{exc} (check --detector-weights)") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("params"), dict)):
        raise WeightsError(f"{path} is not an embedded detector checkpoint (no 'params'); check --detector-weights")
    state, meta = ckpt["params"], dict(ckpt.get("meta") or {})
    if "crc32" in meta and checkpoint_crc(state) != int(meta["crc32"]):
        raise WeightsError(f"{path}: tensor checksum mismatch (damaged or edited file)")
    net = TinyFaceNet(tuple(meta.get("widths", (8, 24, 32, 64, 96, 96))), int(meta.get("fpn", 32)))
    load_state_dict_strict(net, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, path)
    return net.eval(), meta


def fuse(boxes: np.ndarray, lms: np.ndarray, scores: np.ndarray, order: np.ndarray, iou: float):
    """Each kept detection's box and landmarks as the score-weighted mean over the cells
    whose box has IoU >= ``iou`` with it (the neighbouring cells see the same face and their
    errors partly cancel)."""
    if len(order) == 0:
        return boxes[order], lms[order]
    kept = boxes[order]
    iw = np.clip(np.minimum(kept[:, None, 2], boxes[None, :, 2]) - np.maximum(kept[:, None, 0], boxes[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(kept[:, None, 3], boxes[None, :, 3]) - np.maximum(kept[:, None, 1], boxes[None, :, 1]), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    m = inter / np.maximum(area[order][:, None] + area[None, :] - inter, 1e-9)
    w = (m >= iou) * scores[None, :]
    w = w / w.sum(1, keepdims=True)
    return w @ boxes, np.einsum("kn,npc->kpc", w, lms)


def drop_inside(boxes: np.ndarray, order: np.ndarray, threshold: float) -> np.ndarray:
    """``order`` (best first) without the boxes lying mostly (intersection / own area >
    ``threshold``) inside a better one. Cells of a level finer than a large face's see only
    part of it and may propose that part as a face (IoU ~0.35 with the whole face, so NMS
    keeps it): on wda_aoc such boxes were most false detections."""
    keep: list[int] = []
    for i in order:
        b = boxes[i]
        area = max(float((b[2] - b[0]) * (b[3] - b[1])), 1e-6)
        inside = False
        for k in keep:
            o = boxes[k]
            iw = min(b[2], o[2]) - max(b[0], o[0])
            ih = min(b[3], o[3]) - max(b[1], o[1])
            if iw > 0 and ih > 0 and iw * ih / area > threshold:
                inside = True
                break
        if not inside:
            keep.append(int(i))
    return np.asarray(keep, np.int64)


@torch.inference_mode()
def raw_detect(net: TinyFaceNet, x: torch.Tensor, score_threshold: float, nms_threshold: float = 0.4,
               max_faces: int = 200, inside_threshold: float = 0.6, fuse_iou: float = FUSE_IOU) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Normalised batch -> per image (boxes N x 4, landmarks N x 5 x 2, scores N),
    network-input pixels, after NMS and ``drop_inside``, best first."""
    levels = [decode_level(o.float(), s) for o, s in zip(net(x), STRIDES)]
    score = torch.cat([lv[0] for lv in levels], 1)
    boxes = torch.cat([lv[1] for lv in levels], 1)
    lms = torch.cat([lv[2] for lv in levels], 1)
    out = []
    for b in range(x.shape[0]):
        keep = torch.nonzero(score[b] >= score_threshold).flatten()
        if len(keep) > 20 * max_faces:
            keep = keep[torch.topk(score[b][keep], 20 * max_faces).indices]
        sc = score[b][keep].numpy()
        bx = boxes[b][keep].numpy()
        lm = lms[b][keep].numpy()
        order = nms(bx, sc, nms_threshold) if len(sc) else np.zeros(0, np.int64)
        order = drop_inside(bx, order, inside_threshold)[:max_faces]
        fb, fl = fuse(bx, lm, sc, order, fuse_iou) if fuse_iou < 1 else (bx[order], lm[order])
        out.append((fb.astype(np.float32), fl.astype(np.float32), sc[order].astype(np.float32)))
    return out


class EmbeddedDetector(FaceDetector):
    """See the module docstring. ``weights``: a checkpoint of ``frvideo.train.detector``
    (default: the shipped file). ``max_size``: the frame's longer side is
    shrunk to this first (0 / None: full resolution). ``min_face``: faces whose
    box is smaller (sqrt(w h), pixels of the shrunk frame) are dropped."""

    name = "embedded"

    def __init__(self, weights: Optional[Path] = None, device: str | torch.device = "cpu",
                 max_size: Optional[int] = 640, score_threshold: float = 0.5, nms_threshold: float = 0.4,
                 min_face: float = 10.0):
        path = Path(weights) if weights else SHIPPED_WEIGHTS
        self.net, self.meta = load_embedded_net(path)
        self.device = torch.device(device)
        # BatchNorms folded into their convs (frvideo/nn/fuse.py): same outputs to float rounding, faster
        self.net = fuse_conv_batchnorm(self.net).to(self.device)
        self.max_size = max_size or None
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.min_face = float(min_face)

    @classmethod
    def from_card(cls, config, weights, device, settings) -> "EmbeddedDetector":
        return cls(weights, device=device, **settings)

    def detect(self, image_rgb: np.ndarray) -> Detections:
        return self.detect_batch([image_rgb])[0]

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[Detections]:
        out = []
        for im in images_rgb:
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"expected an H x W x 3 RGB image, got shape {im.shape}")
            if im.dtype != np.uint8:
                im = (im >> 8).astype(np.uint8) if im.dtype == np.uint16 else np.clip(im, 0, 255).astype(np.uint8)
            small, sx, sy = shrink_for_detection(im, self.max_size)
            x = normalise(torch.from_numpy(np.ascontiguousarray(small))[None]).to(self.device)
            (boxes, lms, scores), = raw_detect(self.net, x, self.score_threshold, self.nms_threshold)
            h, w = small.shape[:2]
            boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
            size = np.sqrt(np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0))
            keep = size >= self.min_face
            scale = np.array([sx, sy], np.float32)
            out.append(Detections((boxes[keep].reshape(-1, 2, 2) * scale).reshape(-1, 4).astype(np.float32),
                                  (lms[keep] * scale).astype(np.float32), scores[keep]))
        return out
