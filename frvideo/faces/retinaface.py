"""RetinaFace (MobileNet-0.25 or ResNet-50 backbone) as a ``FaceDetector``.

The module tree mirrors facexlib's ``RetinaFace`` so its released weight files
(``detection_mobilenet0.25_Final.pth``, ``detection_Resnet50_Final.pth``)
load unchanged with ``strict=True``:

* ``body``: the backbone truncated after its last returned stage, as
  torchvision's ``IntermediateLayerGetter`` leaves it (MobileNet: ``stage1..3``;
  ResNet-50: ``conv1, bn1, layer1..layer4`` with torchvision's names, no ``fc``);
* ``fpn`` (``output1..3``, ``merge1..2``), ``ssh1..3`` and the three per-level
  heads ``ClassHead`` / ``BboxHead`` / ``LandmarkHead`` (``conv1x1`` each).

Pre- and post-processing follow facexlib's ``detect_faces``: BGR input minus
(104, 117, 123), no scaling to [0, 1]; SSD-style priors (min sizes
16/32, 64/128, 256/512 at strides 8/16/32), variances (0.1, 0.2), softmax face
score > threshold, greedy NMS (plain IoU, as torchvision.ops.nms which
facexlib >= 0.3 calls) in original image pixels. ``max_size`` optionally shrinks large frames first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..nn.fuse import fuse_conv_batchnorm
from .detect import Detections, FaceDetector

# facexlib's generate_config, reduced to what inference needs.
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)
BACKBONES = {
    # name: (in_channel of the cfg -> FPN inputs 2x/4x/8x, FPN/SSH width)
    "mobilenet0.25": (32, 64),
    "resnet50": (256, 256),
}
_ALIASES = {"mobile0.25": "mobilenet0.25", "mobilenet": "mobilenet0.25", "mobile": "mobilenet0.25",
            "resnet": "resnet50", "Resnet50": "resnet50"}


# ----------------------------------------------------------------------------
# building blocks (Sequential indices 0 = conv, 1 = bn, as in the weight files)

def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, leaky: Optional[float] = 0.0,
         groups: int = 1) -> list[nn.Module]:
    """Conv (no bias) + BN, then LeakyReLU unless ``leaky`` is None."""
    mods: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if leaky is not None:
        mods.append(nn.LeakyReLU(leaky, inplace=True))
    return mods


def conv_bn(cin, cout, stride=1, leaky=0.0):
    return nn.Sequential(*_cbr(cin, cout, 3, stride, leaky))


def conv_bn_linear(cin, cout):
    return nn.Sequential(*_cbr(cin, cout, 3, 1, None))


def conv_bn_1x1(cin, cout, leaky=0.0):
    return nn.Sequential(*_cbr(cin, cout, 1, 1, leaky))


def conv_dw(cin, cout, stride, leaky=0.1):
    """Depthwise 3x3 + pointwise 1x1, each with BN and LeakyReLU (indices 0-5)."""
    return nn.Sequential(*_cbr(cin, cin, 3, stride, leaky, groups=cin), *_cbr(cin, cout, 1, 1, leaky))


class MobileNetV1Body(nn.Module):
    """MobileNet-0.25 up to stage3; returns the stage1/2/3 maps (strides 8/16/32)."""

    def __init__(self):
        super().__init__()
        self.stage1 = nn.Sequential(
            conv_bn(3, 8, 2, leaky=0.1), conv_dw(8, 16, 1), conv_dw(16, 32, 2),
            conv_dw(32, 32, 1), conv_dw(32, 64, 2), conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(conv_dw(64, 128, 2), *[conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(conv_dw(128, 256, 2), conv_dw(256, 256, 1))

    def forward(self, x):
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        return [c1, c2, self.stage3(c2)]


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50Body(nn.Module):
    """torchvision resnet50 without avgpool/fc; returns layer2/3/4 (strides 8/16/32)."""

    LAYERS = (3, 4, 6, 3)

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for idx, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.LAYERS)):
            stride = 1 if idx == 0 else 2
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, planes, stride if b == 0 else 1))
                cin = planes * Bottleneck.expansion
            setattr(self, f"layer{idx + 1}", nn.Sequential(*layer))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        c2 = self.layer2(x)
        c3 = self.layer3(c2)
        return [c2, c3, self.layer4(c3)]


class FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], width: int):
        super().__init__()
        leaky = 0.1 if width <= 64 else 0.0
        self.output1 = conv_bn_1x1(in_channels[0], width, leaky)
        self.output2 = conv_bn_1x1(in_channels[1], width, leaky)
        self.output3 = conv_bn_1x1(in_channels[2], width, leaky)
        self.merge1 = conv_bn(width, width, leaky=leaky)
        self.merge2 = conv_bn(width, width, leaky=leaky)

    def forward(self, feats):
        p1, p2, p3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        p2 = self.merge2(p2 + F.interpolate(p3, size=p2.shape[-2:], mode="nearest"))
        p1 = self.merge1(p1 + F.interpolate(p2, size=p1.shape[-2:], mode="nearest"))
        return [p1, p2, p3]


class SSH(nn.Module):
    """Context module: 3x3 | 5x5 (two 3x3) | 7x7 (three 3x3) branches, concat, ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        leaky = 0.1 if cout <= 64 else 0.0
        self.conv3X3 = conv_bn_linear(cin, cout // 2)
        self.conv5X5_1 = conv_bn(cin, cout // 4, leaky=leaky)
        self.conv5X5_2 = conv_bn_linear(cout // 4, cout // 4)
        self.conv7X7_2 = conv_bn(cout // 4, cout // 4, leaky=leaky)
        self.conv7x7_3 = conv_bn_linear(cout // 4, cout // 4)  # lower-case x as in the weight files

    def forward(self, x):
        a = self.conv3X3(x)
        t = self.conv5X5_1(x)
        b = self.conv5X5_2(t)
        c = self.conv7x7_3(self.conv7X7_2(t))
        return F.relu(torch.cat([a, b, c], dim=1))


class _Head(nn.Module):
    """1x1 conv predicting ``per_anchor`` values for each of ``anchors`` anchors."""

    def __init__(self, cin: int, per_anchor: int, anchors: int = 2):
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(cin, anchors * per_anchor, 1)

    def forward(self, x):
        out = self.conv1x1(x).permute(0, 2, 3, 1)  # B, H, W, A*k: rows, cols, anchors
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """The network. ``forward`` returns (box deltas B x N x 4, face probability
    B x N, landmark deltas B x N x 10) for N priors."""

    def __init__(self, backbone: str = "mobilenet0.25"):
        super().__init__()
        backbone = _ALIASES.get(backbone, backbone)
        if backbone not in BACKBONES:
            raise ValueError(f"unknown RetinaFace backbone {backbone!r} (known: {', '.join(BACKBONES)})")
        self.backbone = backbone
        in_ch, width = BACKBONES[backbone]
        self.body = MobileNetV1Body() if backbone == "mobilenet0.25" else ResNet50Body()
        self.fpn = FPN([in_ch * 2, in_ch * 4, in_ch * 8], width)
        self.ssh1, self.ssh2, self.ssh3 = SSH(width, width), SSH(width, width), SSH(width, width)
        self.ClassHead = nn.ModuleList([_Head(width, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(width, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(width, 10) for _ in range(3)])

    def forward(self, x):
        p = self.fpn(self.body(x))
        feats = [self.ssh1(p[0]), self.ssh2(p[1]), self.ssh3(p[2])]
        loc = torch.cat([h(f) for h, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([h(f) for h, f in zip(self.ClassHead, feats)], dim=1)
        ldm = torch.cat([h(f) for h, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, F.softmax(logits, dim=-1)[..., 1], ldm


# ----------------------------------------------------------------------------
# priors, decoding, NMS

def prior_boxes(height: int, width: int) -> np.ndarray:
    """Anchors in pixels, N x 4 (cx, cy, size_x, size_y), in the heads' order:
    level, row, column, anchor. Same values as facexlib's PriorBox times (w, h)."""
    out = []
    for step, sizes in zip(STEPS, MIN_SIZES):
        rows, cols = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * step, (np.arange(cols) + 0.5) * step, indexing="ij")
        grid = np.empty((rows, cols, len(sizes), 4), np.float64)
        grid[..., 0] = cx[..., None]
        grid[..., 1] = cy[..., None]
        grid[..., 2] = np.asarray(sizes, np.float64)
        grid[..., 3] = np.asarray(sizes, np.float64)
        out.append(grid.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def decode(loc: torch.Tensor, ldm: torch.Tensor, priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deltas (... x N x 4, ... x N x 10) -> boxes x1y1x2y2 and landmarks (... x N x 5 x 2), pixels."""
    centre, size = priors[:, :2], priors[:, 2:]
    c = centre + loc[..., :2] * VARIANCE[0] * size
    wh = size * torch.exp(loc[..., 2:] * VARIANCE[1])
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=-1)
    lm = ldm.reshape(*ldm.shape[:-1], 5, 2)
    landmarks = centre[:, None, :] + lm * VARIANCE[0] * size[:, None, :]
    return boxes, landmarks


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS, highest score first, dropping boxes with IoU > threshold
    (torchvision.ops.nms semantics, without torchvision). Kept indices, best first."""
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, np.int64)


def shrink_for_detection(image: np.ndarray, max_size: Optional[int]) -> tuple[np.ndarray, float, float]:
    """Downscale so the longer side is at most ``max_size``; returns the image
    and the factors (sx, sy) that map its pixel coordinates back to the original."""
    h, w = image.shape[:2]
    if not max_size or max(h, w) <= max_size:
        return image, 1.0, 1.0
    s = max_size / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return small, w / nw, h / nh


def load_retinaface_weights(net: RetinaFace, path: Path) -> None:
    """facexlib's raw state dict (a ``module.`` prefix from DataParallel is dropped)."""
    from ..restore import load_state_dict_strict, read_checkpoint

    state = read_checkpoint(Path(path), [])
    state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
    load_state_dict_strict(net, state, path)


# ----------------------------------------------------------------------------

class RetinaFaceDetector(FaceDetector):
    """RetinaFace on RGB uint8 frames. ``score_threshold`` 0.8 and
    ``nms_threshold`` 0.4 are facexlib's ``detect_faces`` defaults."""

    def __init__(self, weights: Path, backbone: str = "mobilenet0.25", device: str | torch.device = "cpu",
                 score_threshold: float = 0.8, nms_threshold: float = 0.4, max_size: Optional[int] = 640,
                 batch_size: int = 8):
        backbone = _ALIASES.get(backbone, backbone)
        if backbone not in BACKBONES:
            raise ConfigError(f"unknown RetinaFace backbone {backbone!r} (known: {', '.join(BACKBONES)})")
        self.name = f"retinaface-{'mobile' if backbone == 'mobilenet0.25' else backbone}"
        self.device = torch.device(device)
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_size = max_size
        self.batch_size = max(1, int(batch_size))
        net = RetinaFace(backbone)
        load_retinaface_weights(net, Path(weights))
        # BatchNorms folded into their convs (frvideo/nn/fuse.py): same outputs to float rounding, faster
        self.net = fuse_conv_batchnorm(net.eval()).to(self.device)
        self._mean = torch.tensor(BGR_MEAN, device=self.device).view(1, 3, 1, 1)
        self._priors: dict[tuple[int, int], torch.Tensor] = {}

    @classmethod
    def from_card(cls, config, weights, device, settings) -> "RetinaFaceDetector":
        return cls(weights, backbone=config.arch.get("backbone", "mobilenet0.25"), device=device, **settings)

    def priors(self, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key not in self._priors:
            if len(self._priors) > 8:  # video frames share one size; keep the cache small
                self._priors.clear()
            self._priors[key] = torch.from_numpy(prior_boxes(height, width)).to(self.device)
        return self._priors[key]

    def detect(self, image_rgb: np.ndarray) -> Detections:
        return self.detect_batch([image_rgb])[0]

    def detect_batch(self, images_rgb: list[np.ndarray]) -> list[Detections]:
        results: list[Optional[Detections]] = [None] * len(images_rgb)
        by_size: dict[tuple, list[int]] = {}
        for i, im in enumerate(images_rgb):
            if im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"expected an H x W x 3 RGB image, got shape {im.shape}")
            by_size.setdefault(im.shape[:2], []).append(i)
        for idxs in by_size.values():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                for i, det in zip(chunk, self._run([images_rgb[i] for i in chunk])):
                    results[i] = det
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _run(self, images: list[np.ndarray]) -> list[Detections]:
        """Same-size RGB frames -> one forward pass."""
        smalls = [shrink_for_detection(im, self.max_size) for im in images]
        sx, sy = smalls[0][1], smalls[0][2]
        batch = np.stack([s[0] for s in smalls])  # B H W 3 RGB uint8
        x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).flip(1).float() - self._mean
        loc, prob, ldm = self.net(x)
        h, w = batch.shape[1:3]
        boxes, landmarks = decode(loc, ldm, self.priors(h, w))
        scale = torch.tensor([sx, sy], device=self.device, dtype=boxes.dtype)
        boxes = boxes * scale.repeat(2)
        landmarks = landmarks * scale
        out = []
        for b in range(len(images)):
            keep = prob[b] > self.score_threshold
            if not bool(keep.any()):
                out.append(Detections.empty())
                continue
            bx = boxes[b][keep].cpu().numpy().astype(np.float32)
            lm = landmarks[b][keep].cpu().numpy().astype(np.float32)
            sc = prob[b][keep].cpu().numpy().astype(np.float32)
            order = nms(bx, sc, self.nms_threshold)
            out.append(Detections(bx[order], lm[order], sc[order]))
        return out
