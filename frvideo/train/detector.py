"""Train the embedded detector (``frvideo.faces.embedded.TinyFaceNet``) by
distillation from RetinaFace MobileNet-0.25.

Recipe (settings in ``configs/train/embedded_detector.yaml``; seeded):

1. **Labels** (``frvideo.train.detector_labels``, once, cached): every 2nd
   frame of the training clips (``videos/train``, the eval clips are never
   used) and the still images in 6 variants each (rolled -20/0/+20 degrees x
   longer side 640/360), shrunk to 640, labelled by the teacher with score
   >= 0.3. Teacher faces with score >= ``pos_score`` (0.9) are faces; those
   between 0.3 and that are "don't care" (no loss on their cells).
   ``val_clips`` (lp_d0, lp_s13) are held out for choosing the checkpoint.
2. **Samples**: a 256 x 256 crop (or, with ``p_mosaic``, a 2 x 2 mosaic of
   128-px crops) of a random labelled image around a random face, scaled so
   that face is log-uniform in [10, 230] px (small faces), rolled +-25 deg,
   mirrored (landmarks swapped), aspect 0.85-1.15 (turned heads look narrower),
   then darkened (gain 0.1-0.6 and gamma), colour-jittered or made grey,
   blurred (Gaussian, motion, down-up sampling), noised and JPEG-compressed,
   each with its own probability. 10% of samples are background crops.
3. **Targets** per level (strides 8/16/32): a face of size s is positive at a
   level when 2 <= s / stride <= 8 (stride 8 also below, stride 32 also
   above), on the cells whose centre lies within max(0.2 s, 0.6 stride) of the
   box centre; the cells within 0.45 s around them and the centres of faces at
   the neighbouring scale range (1.2-2 and 8-12 strides) are "don't care".
   Loss: sigmoid focal loss (alpha 0.25, gamma 2) on the logits / positives,
   + ``w_box`` x L1 on (centre offset, log size) in strides + ``w_lm`` x L1
   on the landmark offsets (units of 4 strides), on positives.
4. **Optimiser**: AdamW, lr ``lr`` with warm-up and cosine decay over
   ``steps``, batch ``batch``, single-threaded (it trains on a shared CPU).
   Every ``val_every`` steps: recall / precision (IoU >= 0.5, score >= 0.5)
   and landmark error / inter-ocular distance against the teacher on the held
   out frames as they are and darkened + blurred + shrunk; the best
   (``val_score``) is kept as ``best.pt``. ``last.pt`` resumes a stopped run.

Output: ``{'params': state_dict (float16), 'meta': {..., 'crc32'}}``.

    python -m frvideo.train.detector --config configs/train/embedded_detector.yaml --work /tmp/det
    python -m frvideo.train.detector --export /tmp/det/best.pt --out frvideo/faces/weights/embedded_detector.pth
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from ..faces.embedded import (FLIP_ORDER, LM_UNIT, STRIDES, TinyFaceNet, checkpoint_crc, normalise, raw_detect)

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "labels": "/tmp/det/labels.npz", "val_clips": ["lp_d0.mp4", "lp_s13.mp4"], "pos_score": 0.9,
    "size": 320, "batch": 24, "steps": 100000, "time_budget_s": 3000.0, "face_near": 80.0, "lr": 4e-3, "weight_decay": 1e-4, "warmup": 300,
    "seed": 0, "val_every": 400, "log_every": 50, "still_repeat": 2,
    "p_mosaic": 0.3, "p_background": 0.1, "face_min": 10.0, "face_max": 230.0, "roll": 25.0,
    "p_flip": 0.5, "aspect": [0.85, 1.15], "p_dark": 0.3, "p_grey": 0.1, "p_colour": 0.5, "p_blur": 0.35,
    "p_motion": 0.15, "p_downup": 0.2, "p_noise": 0.3, "p_jpeg": 0.3,
    "w_box": 1.0, "w_lm": 1.0, "widths": [8, 24, 32, 64, 96, 96], "fpn": 32,
}


# ----------------------------------------------------------------------------
# data

class Labelled:
    """The label cache of ``detector_labels``: decoded lazily per image."""

    def __init__(self, path: str | Path):
        d = np.load(path)
        self.jpeg, self.offsets = d["jpeg"], d["offsets"]
        self.src, self.names = d["src"], [str(n) for n in d["names"]]
        owner = d["owner"]
        n = len(self.offsets) - 1
        order = np.argsort(owner, kind="stable")
        starts = np.searchsorted(owner[order], np.arange(n + 1))
        self.faces = [(d["boxes"][order[starts[i]:starts[i + 1]]], d["landmarks"][order[starts[i]:starts[i + 1]]],
                       d["scores"][order[starts[i]:starts[i + 1]]]) for i in range(n)]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def image(self, i: int) -> np.ndarray:
        buf = self.jpeg[self.offsets[i]:self.offsets[i + 1]]
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy()  # RGB


def _photometric(img: np.ndarray, rng: np.random.Generator, cfg: dict) -> np.ndarray:
    """Dark, colour, grey, blur, motion blur, down-up sampling, noise, JPEG (uint8 RGB in and out)."""
    x = img.astype(np.float32)
    if rng.random() < cfg["p_colour"]:
        x = x * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20)
        grey = x.mean(2, keepdims=True)
        x = grey + (x - grey) * rng.uniform(0.5, 1.4)
    if rng.random() < cfg["p_grey"]:
        x = np.repeat(x.mean(2, keepdims=True), 3, 2)
    if rng.random() < cfg["p_dark"]:
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(1.0, 2.0) * rng.uniform(0.2, 0.7)
    x = np.clip(x, 0, 255).astype(np.uint8)
    h, w = x.shape[:2]
    if rng.random() < cfg["p_blur"]:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.6, 3.0))
    if rng.random() < cfg["p_motion"]:
        k = int(rng.integers(3, 12))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2, :] = 1.0 / k
        kern = cv2.warpAffine(kern, cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), rng.uniform(0, 180), 1.0), (k, k))
        x = cv2.filter2D(x, -1, kern / max(kern.sum(), 1e-6))
    if rng.random() < cfg["p_downup"]:
        f = rng.uniform(0.25, 0.6)
        small = cv2.resize(x, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < cfg["p_noise"]:
        x = np.clip(x.astype(np.float32) + rng.normal(0, rng.uniform(2, 15), x.shape), 0, 255).astype(np.uint8)
    if rng.random() < cfg["p_jpeg"]:
        ok, buf = cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(15, 80))])
        x = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    return x


def _warp_sample(data: Labelled, i: int, size: int, rng: np.random.Generator, cfg: dict, background: bool):
    """One geometric sample (size x size RGB) of image ``i``: boxes, landmarks,
    scores of its teacher faces in the sample's pixels."""
    img = data.image(i)
    boxes, lms, scores = data.faces[i]
    h, w = img.shape[:2]
    strong = np.flatnonzero(scores >= cfg["pos_score"])
    flip = rng.random() < cfg["p_flip"]
    angle = rng.uniform(-cfg["roll"], cfg["roll"]) if rng.random() < 0.6 else 0.0
    aspect = rng.uniform(*cfg["aspect"])
    if len(strong) and not background:
        j = strong[rng.integers(len(strong))]
        b = boxes[j]
        fs = math.sqrt(max((b[2] - b[0]) * (b[3] - b[1]), 1.0))
        top = min(cfg["face_max"], size * 1.0)
        # half the samples at the sizes faces have in a 640-px frame of a close shot, half down to tiny
        low = cfg["face_min"] if rng.random() < 0.5 else min(cfg["face_near"], top)
        target = math.exp(rng.uniform(math.log(low), math.log(top)))
        s = target / fs
        c = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
        # where the face centre lands in the sample: anywhere that keeps most of it inside
        margin = min(target * 0.4, size / 2)
        dst = rng.uniform(margin, size - margin, 2)
    else:
        s = math.exp(rng.uniform(math.log(size / max(h, w)), math.log(2.0)))
        c = np.array([rng.uniform(0, w), rng.uniform(0, h)])
        dst = np.array([size / 2, size / 2])
    # affine: translate c to 0, flip, scale (aspect on x), rotate, translate to dst
    rot = cv2.getRotationMatrix2D((0, 0), angle, 1.0)[:, :2]
    lin = rot @ np.diag([s * aspect * (-1 if flip else 1), s])
    m = np.concatenate([lin, (dst - lin @ c)[:, None]], 1)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    out = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_AREA if s < 0.7 else cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    if len(scores) == 0:
        return out, np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
    lm = lms @ lin.T + m[:, 2]
    if flip:
        lm = lm[:, list(FLIP_ORDER)]
    cen = ((boxes[:, :2] + boxes[:, 2:]) / 2) @ lin.T + m[:, 2]
    bw = (boxes[:, 2] - boxes[:, 0]) * s * aspect
    bh = (boxes[:, 3] - boxes[:, 1]) * s
    # a rolled face's teacher box stays about as large as upright (not the rotated envelope)
    nb = np.stack([cen[:, 0] - bw / 2, cen[:, 1] - bh / 2, cen[:, 0] + bw / 2, cen[:, 1] + bh / 2], 1)
    return out, nb.astype(np.float32), lm.astype(np.float32), scores.astype(np.float32)


def make_sample(data: Labelled, pool: np.ndarray, rng: np.random.Generator, cfg: dict):
    size = cfg["size"]
    if rng.random() < cfg["p_mosaic"]:
        half = size // 2
        img = np.zeros((size, size, 3), np.uint8)
        parts = []
        for k in range(4):
            sub = dict(cfg, face_max=min(cfg["face_max"], half * 0.9), face_near=half * 0.4)
            im, b, lm, sc = _warp_sample(data, int(rng.choice(pool)), half, rng, sub, rng.random() < 0.15)
            oy, ox = (k // 2) * half, (k % 2) * half
            img[oy:oy + half, ox:ox + half] = im
            parts.append((b + [ox, oy, ox, oy], lm + [ox, oy], sc, (ox, oy, ox + half, oy + half)))
        boxes = np.concatenate([p[0] for p in parts]).reshape(-1, 4)
        lms = np.concatenate([p[1] for p in parts]).reshape(-1, 5, 2)
        scores = np.concatenate([p[2] for p in parts])
        clips = np.concatenate([np.tile(p[3], (len(p[2]), 1)) for p in parts]).reshape(-1, 4)
    else:
        img, boxes, lms, scores = _warp_sample(data, int(rng.choice(pool)), size, rng, cfg,
                                               rng.random() < cfg["p_background"])
        clips = np.tile([0, 0, size, size], (len(scores), 1))
    img = _photometric(img, rng, cfg)
    # faces mostly outside their tile: don't care (the visible part is ambiguous)
    vis_w = np.clip(np.minimum(boxes[:, 2], clips[:, 2]) - np.maximum(boxes[:, 0], clips[:, 0]), 0, None)
    vis_h = np.clip(np.minimum(boxes[:, 3], clips[:, 3]) - np.maximum(boxes[:, 1], clips[:, 1]), 0, None)
    area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6)
    visible = vis_w * vis_h / area
    positive = (scores >= cfg["pos_score"]) & (visible >= 0.7)
    keep = visible > 0.0
    return img, boxes[keep], lms[keep], positive[keep]


def build_targets(boxes: np.ndarray, lms: np.ndarray, positive: np.ndarray, size: int):
    """Per level: (cls target h x w in {0, 1}, weight h x w in {0, 1} (0 = don't care),
    regression targets 14 x h x w, regression mask h x w)."""
    out = []
    sizes = np.sqrt(np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-6))
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    for li, stride in enumerate(STRIDES):
        g = size // stride
        cls = np.zeros((g, g), np.float32)
        wt = np.ones((g, g), np.float32)
        reg = np.zeros((14, g, g), np.float32)
        best = np.full((g, g), np.inf, np.float32)  # smallest face wins a shared cell
        ys, xs = np.mgrid[0:g, 0:g]
        px, py = (xs + 0.5) * stride, (ys + 0.5) * stride
        for k in np.argsort(-sizes):
            s, (cx, cy) = sizes[k], centres[k]
            ratio = s / stride
            lo = 0.0 if li == 0 else 2.0
            hi = np.inf if li == len(STRIDES) - 1 else 8.0
            d = np.hypot(px - cx, py - cy)
            if not positive[k]:
                b = boxes[k]
                inside = (px >= b[0]) & (px <= b[2]) & (py >= b[1]) & (py <= b[3])
                wt[inside & (cls == 0)] = 0.0
                continue
            if lo <= ratio <= hi and ratio >= 1.2:
                r = max(0.2 * s, 0.6 * stride)
                pos = d <= r
                if not pos.any():
                    pos = d <= d.min() + 1e-6
                wt[(d <= 0.45 * s) & (cls == 0)] = 0.0
                take = pos & (s < best)
                cls[pos] = 1.0
                wt[pos] = 1.0
                best[take] = s
                b = boxes[k]
                reg[0][take] = (cx - px[take]) / stride
                reg[1][take] = (cy - py[take]) / stride
                reg[2][take] = math.log(max(b[2] - b[0], 1.0) / stride)
                reg[3][take] = math.log(max(b[3] - b[1], 1.0) / stride)
                for p in range(5):
                    reg[4 + 2 * p][take] = (lms[k, p, 0] - px[take]) / (LM_UNIT * stride)
                    reg[5 + 2 * p][take] = (lms[k, p, 1] - py[take]) / (LM_UNIT * stride)
            elif (1.2 <= ratio < 2.0) or (8.0 < ratio <= 12.0):
                wt[(d <= max(0.3 * s, 0.6 * stride)) & (cls == 0)] = 0.0
        out.append((cls, wt, reg, np.isfinite(best).astype(np.float32)))
    return out


def make_batch(data: Labelled, pool: np.ndarray, rng: np.random.Generator, cfg: dict):
    imgs, targets = [], []
    for _ in range(cfg["batch"]):
        img, b, lm, pos = make_sample(data, pool, rng, cfg)
        imgs.append(img)
        targets.append(build_targets(b, lm, pos, cfg["size"]))
    x = normalise(torch.from_numpy(np.stack(imgs)))
    levels = []
    for li in range(len(STRIDES)):
        levels.append(tuple(torch.from_numpy(np.stack([t[li][j] for t in targets])) for j in range(4)))
    return x, levels


def focal_loss(logit, target, weight, alpha=0.25, gamma=2.0):
    p = torch.sigmoid(logit)
    ce = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    a = alpha * target + (1 - alpha) * (1 - target)
    return (a * (1 - pt) ** gamma * ce * weight).sum()


def loss_of(outs, levels, cfg):
    n_pos = sum(float(lv[0].sum()) for lv in levels)
    norm = max(n_pos, 1.0)
    cls_l = box_l = lm_l = 0.0
    for o, (cls, wt, reg, mask) in zip(outs, levels):
        cls_l = cls_l + focal_loss(o[:, 0], cls, wt)
        m = mask.unsqueeze(1)
        box_l = box_l + (F.smooth_l1_loss(o[:, 1:5], reg[:, :4], reduction="none", beta=0.1) * m).sum()
        lm_l = lm_l + (F.smooth_l1_loss(o[:, 5:], reg[:, 4:], reduction="none", beta=0.05) * m).sum()
    cls_l, box_l, lm_l = cls_l / norm, box_l / norm / 4, lm_l / norm / 10
    total = cls_l + cfg["w_box"] * box_l + cfg["w_lm"] * lm_l
    return total, (float(cls_l.detach()), float(box_l.detach()), float(lm_l.detach()))


# ----------------------------------------------------------------------------
# validation (also used by bench/embedded_detector.py)

def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    aa = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    ab = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(aa[:, None] + ab[None, :] - inter, 1e-9)


def match(ref_boxes: np.ndarray, det_boxes: np.ndarray, iou: float = 0.5) -> list[tuple[int, int]]:
    """Greedy one-to-one matching, highest IoU first: (ref index, det index) pairs with IoU >= ``iou``."""
    m = iou_matrix(ref_boxes, det_boxes)
    pairs = []
    while m.size and m.max() >= iou:
        r, d = np.unravel_index(int(m.argmax()), m.shape)
        pairs.append((int(r), int(d)))
        m[r, :] = -1
        m[:, d] = -1
    return pairs


def _hard(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fixed hard variant: shrunk x0.3-0.5 onto a grey canvas, darkened, blurred."""
    h, w = img.shape[:2]
    f = rng.uniform(0.3, 0.5)
    small = cv2.resize(img, (max(1, int(w * f)), max(1, int(h * f))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), rng.uniform(0.5, 1.2))
    small = (255.0 * (small / 255.0) ** 1.5 * rng.uniform(0.3, 0.6)).astype(np.uint8)
    canvas = np.full_like(img, 90)
    oy, ox = int(rng.integers(0, h - small.shape[0] + 1)), int(rng.integers(0, w - small.shape[1] + 1))
    canvas[oy:oy + small.shape[0], ox:ox + small.shape[1]] = small
    return canvas, f, (ox, oy)


def validate(net: TinyFaceNet, data: Labelled, idx: np.ndarray, pos_score: float, threshold: float = 0.5) -> dict:
    """Recall, precision and landmark error / inter-ocular vs the teacher on held-out images, plain and hard."""
    net.eval()
    rng = np.random.default_rng(123)
    res = {}
    for variant in ("plain", "hard"):
        tp = n_ref = n_det = 0
        nme = []
        for i in idx:
            img = data.image(int(i))
            boxes, lms, scores = data.faces[int(i)]
            strong = scores >= pos_score
            rb, rl = boxes[strong], lms[strong]
            if variant == "hard":
                img, f, (ox, oy) = _hard(img, rng)
                rb = rb * f + [ox, oy, ox, oy]
                rl = rl * f + [ox, oy]
            (db, dl, ds), = raw_detect(net, normalise(torch.from_numpy(img)[None]), threshold)
            pairs = match(rb, db)
            tp += len(pairs)
            n_ref += len(rb)
            n_det += len(db)
            for r, d in pairs:
                iod = max(float(np.linalg.norm(rl[r, 0] - rl[r, 1])), 1.0)
                nme.append(float(np.linalg.norm(dl[d] - rl[r], axis=1).mean()) / iod)
        res[variant] = {"recall": tp / max(n_ref, 1), "precision": tp / max(n_det, 1),
                        "nme": float(np.mean(nme)) if nme else 1.0, "faces": n_ref}
    net.train()
    res["score"] = sum(r["recall"] + r["precision"] - 2 * r["nme"] for r in (res["plain"], res["hard"]))
    return res


# ----------------------------------------------------------------------------

@torch.no_grad()
def recalibrated(net: TinyFaceNet, data: Labelled, pool: np.ndarray, cfg: dict, seed, batches: int = 8) -> TinyFaceNet:
    """A copy of ``net`` whose BatchNorm running statistics are the plain average over
    ``batches`` fresh training batches. The running averages kept during training lag the
    fast-moving weights: with them the box sizes came out ~30% too small at stride 32
    (log-size bias -0.3 on training samples in eval mode, -0.03 in train mode)."""
    import copy

    calib = copy.deepcopy(net)
    for m in calib.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    calib.train()
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        calib(make_batch(data, pool, rng, cfg)[0])
    for m in calib.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.1
    return calib.eval()


def save_weights(path: Path, state: dict, meta: dict) -> None:
    """The shipped layout: float16 tensors, ``meta['crc32']`` over them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    half = {k: (v.detach().half() if v.is_floating_point() else v.detach()).clone().contiguous()
            for k, v in state.items()}
    torch.save({"params": half, "meta": {**meta, "stored_dtype": "float16", "crc32": checkpoint_crc(half)}}, path)


def train(cfg: dict, work: Path, log=print) -> None:
    work.mkdir(parents=True, exist_ok=True)
    data = Labelled(cfg["labels"])
    val_src = {data.names.index(v) for v in cfg["val_clips"] if v in data.names}
    is_val = np.isin(data.src, list(val_src))
    train_idx = np.flatnonzero(~is_val)
    still = np.array([data.names[s].endswith("/") for s in data.src])
    pool = np.concatenate([train_idx] + [np.flatnonzero(still & ~is_val)] * (cfg["still_repeat"] - 1))
    val_idx = np.flatnonzero(is_val)
    log(f"{len(train_idx)} training images ({int((still & ~is_val).sum())} stills), {len(val_idx)} validation")
    torch.manual_seed(cfg["seed"])
    net = TinyFaceNet(tuple(cfg["widths"]), cfg["fpn"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    step, best, trained_s, restart = 0, -np.inf, 0.0, 0
    rng = np.random.default_rng(cfg["seed"])
    last = work / "last.pt"
    if last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=False)
        state = ck["net"]
        if any(k.startswith("head.") for k in state):
            # a checkpoint of the shared-head network (first run): each level's head starts
            # from the shared one; the optimiser starts afresh, with a short warm-up
            state = {k: v for k, v in state.items() if not k.startswith("head.")} | {
                f"heads.{i}.{k[5:]}": v.clone() for i in range(len(STRIDES)) for k, v in ck["net"].items()
                if k.startswith("head.")}
            net.load_state_dict(state)
            restart = ck["step"]
            log(f"shared head split into {len(STRIDES)} per-level heads; fresh optimiser")
        else:
            net.load_state_dict(state)
            opt.load_state_dict(ck["opt"])
            restart = ck.get("restart", 0)
        step, best, trained_s = ck["step"], ck["best"], ck.get("trained_s", 0.0)
        if restart:
            best = -np.inf  # scores of the shared-head network are not comparable
        rng = np.random.default_rng([cfg["seed"], step])
        log(f"resumed at step {step} (best {best:.4f})")
    net.train()
    t0, acc = time.perf_counter(), np.zeros(4)
    # the schedule runs on steps or on training time, whichever ends first (the run is time-boxed)
    progress = max(step / cfg["steps"], trained_s / cfg["time_budget_s"])
    while progress < 1.0:
        t_step = time.perf_counter()
        warm = min(1.0, (step + 1) / cfg["warmup"], (step - restart + 1) / 100 if restart else 1.0)
        lr = cfg["lr"] * warm * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        x, levels = make_batch(data, pool, rng, cfg)
        loss, parts = loss_of(net(x), levels, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        step += 1
        trained_s += time.perf_counter() - t_step
        progress = max(step / cfg["steps"], trained_s / cfg["time_budget_s"])
        acc += (float(loss.detach()), *parts)
        if step % cfg["log_every"] == 0:
            a = acc / cfg["log_every"]
            log(f"step {step} lr {lr:.2e} loss {a[0]:.4f} (cls {a[1]:.4f} box {a[2]:.4f} lm {a[3]:.4f}) "
                f"{(time.perf_counter() - t0) / cfg['log_every']:.2f} s/step")
            acc[:], t0 = 0, time.perf_counter()
        if step % cfg["val_every"] == 0 or progress >= 1.0:
            calib = recalibrated(net, data, pool, cfg, [cfg["seed"], step, 7])
            v = validate(calib, data, val_idx, cfg["pos_score"])
            p, h = v["plain"], v["hard"]
            log(f"val step {step}: plain R {p['recall']:.4f} P {p['precision']:.4f} NME {p['nme']:.4f} | "
                f"hard R {h['recall']:.4f} P {h['precision']:.4f} NME {h['nme']:.4f} | score {v['score']:.4f}")
            meta = {"widths": list(cfg["widths"]), "fpn": cfg["fpn"], "step": step, "val": v, "config": cfg,
                    "teacher": "detection_mobilenet0.25_Final.pth"}
            if v["score"] > best:
                best = v["score"]
                torch.save({"params": calib.state_dict(), "meta": meta}, work / "best.pt")
                log(f"  new best {best:.4f} -> {work / 'best.pt'}")
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                        "trained_s": trained_s, "restart": restart},
                       work / "last.tmp")
            (work / "last.tmp").replace(last)
            t0 = time.perf_counter()
    log("done")


def load_config(path: Path | None) -> dict:
    cfg = dict(DEFAULTS)
    if path:
        cfg.update(yaml.safe_load(Path(path).read_text()) or {})
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the embedded face detector by distillation from RetinaFace")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "train" / "embedded_detector.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/det"), help="checkpoints and resume state")
    ap.add_argument("--export", type=Path, help="a best.pt to write as shipped weights (--out)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if args.export:
        ck = torch.load(args.export, map_location="cpu", weights_only=False)
        meta = {k: v for k, v in ck["meta"].items() if k != "config"}
        meta["config"] = {k: v for k, v in ck["meta"]["config"].items()}
        save_weights(args.out, ck["params"], meta)
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
        return 0
    train(load_config(args.config), args.work, log=lambda m: print(m, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
