"""Train the embedded detector's landmark CNN (``frvideo.faces.embedded``).

Recipe (everything seeded, ``--seed``; single-threaded by default):

1. **Data.** Every ``--stride``-th (2) frame of each clip in ``--clips``
   (default ``../shared/media/videos/train/*.mp4``, 11 clips) and, for more
   identities, the still images of ``--stills`` (default
   ``../shared/media/images/{cropped_faces,gray_faces,whole,old_photos}``;
   aligned 512 crops are padded by reflection first; each still is used in 6
   variants: rotated -12/0/+12 degrees x longer side 640/400). Each frame is
   shrunk to 640 and turned grey, exactly as the detector does, and the Haar
   stage (``cascade_boxes``: scale 1.2, min face 24, min_neighbors 1 so weak
   hits are mined too) runs on it; RetinaFace MobileNet-0.25 (the teacher,
   ``--teacher``) runs on the full-resolution frame.
   A Haar box with IoU >= 0.4 with a teacher face (score >= 0.8) is a
   positive: the teacher's 5 landmarks and box are its labels. A Haar box with
   IoU < 0.2 with every teacher face (score >= 0.3) is a negative; so is one
   random square per frame away from the faces. Each sample is stored as a
   128 x 128 grey crop of side 2 x the Haar box side (labels in its units).
   The eval clips (``videos/eval``) are not used.
2. **Cascade confidence.** A class-balanced logistic regression of positive vs
   negative on (log support, final-stage weight) of the boxes that pass
   min_neighbors 3; its coefficients go into ``meta['cascade_coef']``.
3. **Training.** ``LandmarkNet`` (heatmap / soft-argmax landmarks) on 64 x 64
   crops of side 1.5 x the Haar side cut from the stored crops with random
   shift (+-10% of the Haar side), scale (0.85-1.15), aspect (0.92-1.08),
   rotation (+-15 deg), horizontal flip (landmarks swapped left/right), gamma
   (0.6-1.6), blur and noise. Batches of 96: 2/3 positives (still-image
   positives ``--still-repeat`` 3 times per epoch), 1/3 negatives. Loss: L1
   on landmarks + 0.5 L1 on the box (crop units, positives only) + 0.5 BCE on
   the face logit. AdamW (weight decay 1e-4), one-cycle lr 3e-3, 50 epochs.

Output: ``{'params': state_dict, 'meta': {...}}`` (meta: input size, context,
arch, cascade_coef, data and settings); floating tensors stored as float16.

    python -m frvideo.train.landmarks --out frvideo/faces/weights/embedded_landmarks.pth
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import math
import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..faces.embedded import (CONTEXT, FLIP_ORDER, INPUT, LandmarkNet, cascade_confidence, crop_params, crop_patch,
                              cascade_boxes, load_cascade, normalise_patches, split_output)
from ..faces.retinaface import RetinaFaceDetector, shrink_for_detection

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
STORE = 128  # stored crop side (pixels)
STORE_CONTEXT = 2.0  # stored crop side / Haar box side
MAX_SIZE = 640
SCALE_FACTOR = 1.2
MIN_SIZE = 24
STILLS = ("cropped_faces", "gray_faces", "whole", "old_photos")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a (4) with boxes b (N x 4)."""
    if len(b) == 0:
        return np.zeros((0,), np.float32)
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter)


def _covered(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fraction of each box a (N x 4) inside box b (4)."""
    iw = np.clip(np.minimum(a[:, 2], b[2]) - np.maximum(a[:, 0], b[0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[3]) - np.maximum(a[:, 1], b[1]), 0, None)
    return iw * ih / np.maximum((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), 1e-9)


# ----------------------------------------------------------------------------
# data

def frames_of(path: str, stride: int):
    from ..io.frames import to_rgb, to_rgb8
    from ..io.reader import open_reader

    for k, frame in enumerate(open_reader(path)):
        if k % stride == 0:
            yield np.ascontiguousarray(to_rgb8(to_rgb(frame)))


STILL_ANGLES = (-12.0, 0.0, 12.0)  # degrees
STILL_SIZES = (640, 400)  # longer side of each still's variants


def still_variants(bgr: np.ndarray, aligned: bool):
    """RGB variants of a still image: rotations x sizes (aligned 512 face crops
    are first padded by reflection so the cascade sees some context)."""
    rgb = np.ascontiguousarray(bgr[..., ::-1])
    if aligned:
        pad = rgb.shape[0] * 3 // 10
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REFLECT101)
    h, w = rgb.shape[:2]
    for size in STILL_SIZES:
        s = min(1.0, size / max(h, w))
        for angle in STILL_ANGLES:
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, s)
            m[:, 2] += [w * s / 2 - w / 2, h * s / 2 - h / 2]
            out = (max(1, round(w * s)), max(1, round(h * s)))
            yield cv2.warpAffine(rgb, m, out, flags=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_REFLECT101)


class _Builder:
    """Accumulates positives and negatives from frames (see the module docstring)."""

    def __init__(self, teacher: Path, seed: int):
        self.rng = np.random.default_rng(seed)
        self.cascade = load_cascade()
        self.rf = RetinaFaceDetector(teacher, max_size=None, score_threshold=0.3)
        self.pos, self.pos_lm, self.pos_box, self.neg, self.stats = [], [], [], [], []
        self.src_pos, self.src_neg = [], []

    def add(self, rgb: np.ndarray, src: int) -> tuple[int, int]:
        n_pos, n_neg = len(self.pos), len(self.neg)
        det = self.rf.detect(rgb)
        small, sx, sy = shrink_for_detection(rgb, MAX_SIZE)
        grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        scale = np.array([sx, sy], np.float32)
        t_boxes = (det.boxes.reshape(-1, 2, 2) / scale).reshape(-1, 4)
        t_lms = det.landmarks / scale
        strong = det.scores >= 0.8
        boxes, support, weight = cascade_boxes(self.cascade, grey, SCALE_FACTOR, 1, MIN_SIZE)
        for b, s, w in zip(boxes, support, weight):
            iou_strong = _iou(b, t_boxes[strong])
            iou_any = _iou(b, t_boxes)
            cx, cy, _ = crop_params(b, 1.0)
            side = STORE_CONTEXT * max(b[2] - b[0], b[3] - b[1])
            if len(iou_strong) and iou_strong.max() >= 0.4:
                j = np.flatnonzero(strong)[int(iou_strong.argmax())]
                self.pos.append(crop_patch(grey, cx, cy, side, STORE))
                self.pos_lm.append((t_lms[j] - [cx, cy]) / side)
                self.pos_box.append((t_boxes[j].reshape(2, 2) - [cx, cy]).reshape(4) / side)
                self.src_pos.append(src)
                self.stats.append((s, w, 1.0))
            elif not len(iou_any) or iou_any.max() < 0.2:
                self.neg.append(crop_patch(grey, cx, cy, side, STORE))
                self.src_neg.append(src)
                self.stats.append((s, w, 0.0))
        # one random background square per frame, away from the faces
        h, w_ = grey.shape
        for _ in range(20):
            side = float(self.rng.uniform(MIN_SIZE, 0.7 * min(h, w_)))
            x1, y1 = self.rng.uniform(0, w_ - side), self.rng.uniform(0, h - side)
            b = np.array([x1, y1, x1 + side, y1 + side], np.float32)
            if len(t_boxes) == 0 or (_iou(b, t_boxes).max() < 0.1 and _covered(t_boxes, b).max() < 0.3):
                cx, cy, _ = crop_params(b, 1.0)
                self.neg.append(crop_patch(grey, cx, cy, STORE_CONTEXT * side, STORE))
                self.src_neg.append(src)
                break
        return len(self.pos) - n_pos, len(self.neg) - n_neg

    def result(self, names: list[str]) -> dict:
        return {
            "pos": np.stack(self.pos).astype(np.uint8), "pos_lm": np.asarray(self.pos_lm, np.float32),
            "pos_box": np.asarray(self.pos_box, np.float32), "neg": np.stack(self.neg).astype(np.uint8),
            "stats": np.asarray(self.stats, np.float32).reshape(-1, 3),
            "clip_of_pos": np.asarray(self.src_pos, np.int32), "clip_of_neg": np.asarray(self.src_neg, np.int32),
            "clips": np.asarray(names),
        }


def build_dataset(clips: list[str], teacher: Path, stride: int, seed: int, stills: list[str] = (),
                  log=print) -> dict:
    """``clips``: videos (every ``stride``-th frame); ``stills``: folders of images
    (a folder named ``*faces*`` holds aligned 512 crops)."""
    b = _Builder(teacher, seed)
    names = []
    for clip in clips:
        t0, n = time.perf_counter(), np.zeros(3, int)
        for rgb in frames_of(clip, stride):
            n += (1, *b.add(rgb, len(names)))
        log(f"  {Path(clip).name}: {n[0]} frames, {n[1]} positives, {n[2]} negatives ({time.perf_counter() - t0:.0f} s)")
        names.append(Path(clip).name)
    for folder in stills:
        t0, n = time.perf_counter(), np.zeros(3, int)
        for path in sorted(Path(folder).rglob("*")):
            bgr = cv2.imread(str(path)) if path.suffix.lower() in (".png", ".jpg", ".jpeg") else None
            if bgr is None:
                continue
            for rgb in still_variants(bgr, aligned="faces" in Path(folder).name):
                n += (1, *b.add(rgb, len(names)))
        log(f"  {Path(folder).name}/: {n[0]} image variants, {n[1]} positives, {n[2]} negatives "
            f"({time.perf_counter() - t0:.0f} s)")
        names.append(Path(folder).name + "/")
    return b.result(names)


def fit_cascade_confidence(stats: np.ndarray, min_neighbors: int = 3, l2: float = 1e-2) -> list[float]:
    """Logistic regression of (log support, weight) -> face, boxes with support > min_neighbors."""
    s = stats[stats[:, 0] > min_neighbors]
    x = torch.tensor(np.stack([np.log(s[:, 0]), s[:, 1], np.ones(len(s))], 1), dtype=torch.float64)
    y = torch.tensor(s[:, 2], dtype=torch.float64)
    # class-balanced weights: the negatives are few
    wpos, wneg = 0.5 / max(y.mean().item(), 1e-3), 0.5 / max(1 - y.mean().item(), 1e-3)
    sw = torch.where(y > 0, wpos, wneg)
    coef = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (sw * F.binary_cross_entropy_with_logits(x @ coef, y, reduction="none")).mean() \
            + l2 * (coef[:2] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [float(v) for v in coef.detach()]


# ----------------------------------------------------------------------------
# augmentation

def augment(crops: np.ndarray, lms: np.ndarray, boxes: np.ndarray, rng: np.random.Generator,
            train: bool = True, size: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored 128 crops + labels (stored-crop units) -> size x size network crops + labels (its units)."""
    size = size or INPUT
    n = len(crops)
    out = np.empty((n, size, size), np.uint8)
    lm_out = np.empty_like(lms)
    box_out = np.empty_like(boxes)
    haar = STORE / STORE_CONTEXT  # Haar side in stored pixels
    for i in range(n):
        if train:
            s = rng.uniform(0.85, 1.15)
            aspect = rng.uniform(0.92, 1.08)
            dx, dy = rng.uniform(-0.1, 0.1, 2) * haar
            theta = math.radians(rng.uniform(-15, 15))
            flip = rng.random() < 0.5
        else:
            s, aspect, dx, dy, theta, flip = 1.0, 1.0, 0.0, 0.0, 0.0, False
        side = CONTEXT * haar * s  # crop side in stored pixels
        k = size / side
        c, sn = math.cos(theta), math.sin(theta)
        # continuous coords: q = k R(-theta) (P - centre) + size / 2
        centre = np.array([STORE / 2 + dx, STORE / 2 + dy])
        a = k * np.diag([aspect, 1 / aspect]) @ np.array([[c, sn], [-sn, c]])
        t = size / 2 - a @ centre
        m = np.concatenate([a, (t + a.sum(1) * 0.5 - 0.5)[:, None]], 1)  # index coords for warpAffine
        patch = cv2.warpAffine(crops[i], m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        # labels: stored-crop units -> stored continuous px -> network units
        p = lms[i] * STORE + STORE / 2
        q = (p @ a.T + t - size / 2) / size
        bc = (boxes[i].reshape(2, 2).mean(0)) * STORE + STORE / 2
        bq = (a @ bc + t - size / 2) / size
        bw = (boxes[i][2] - boxes[i][0]) * STORE * k * aspect / size
        bh = (boxes[i][3] - boxes[i][1]) * STORE * k / aspect / size
        b = np.array([bq[0] - bw / 2, bq[1] - bh / 2, bq[0] + bw / 2, bq[1] + bh / 2])
        if flip:
            patch = patch[:, ::-1]
            q = q[list(FLIP_ORDER)] * [-1, 1]
            b = np.array([-b[2], b[1], -b[0], b[3]])
        if train:
            g = rng.uniform(0.6, 1.6)
            patch = (255.0 * (patch / 255.0) ** g)
            if rng.random() < 0.3:
                patch = cv2.GaussianBlur(patch, (0, 0), rng.uniform(0.3, 1.3))
            if rng.random() < 0.3:
                patch = patch + rng.normal(0, rng.uniform(1, 6), patch.shape)
            patch = np.clip(patch, 0, 255)
        out[i] = patch
        lm_out[i] = q
        box_out[i] = b
    return out, lm_out, box_out


# ----------------------------------------------------------------------------
# training

def train(data: dict, epochs: int, batch: int, lr: float, seed: int, val_clips: set[int], arch: str = "heatmap",
          size: int = INPUT, still_repeat: int = 1, log=print) -> LandmarkNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    tr_p = np.flatnonzero(~np.isin(data["clip_of_pos"], list(val_clips)))
    tr_n = np.flatnonzero(~np.isin(data["clip_of_neg"], list(val_clips)))
    va_p = np.flatnonzero(np.isin(data["clip_of_pos"], list(val_clips)))
    va_n = np.flatnonzero(np.isin(data["clip_of_neg"], list(val_clips)))
    net = LandmarkNet(arch=arch, size=size)
    # positives of still images (sources named "folder/") are used still_repeat times per epoch
    stills = {i for i, name in enumerate(data["clips"]) if str(name).endswith("/")}
    tr_p = np.concatenate([tr_p] + [tr_p[np.isin(data["clip_of_pos"][tr_p], list(stills))]] * (still_repeat - 1))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(tr_p) // (batch * 2 // 3))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    n_pos = batch * 2 // 3
    zeros_lm = np.zeros((batch - n_pos, 5, 2), np.float32)
    zeros_box = np.zeros((batch - n_pos, 4), np.float32)
    for epoch in range(epochs):
        net.train()
        t0, tot = time.perf_counter(), np.zeros(3)
        perm = rng.permutation(tr_p)
        for step in range(steps_per_epoch):
            ip = perm[step * n_pos:(step + 1) * n_pos]
            ineg = rng.choice(tr_n, batch - n_pos)
            crops = np.concatenate([data["pos"][ip], data["neg"][ineg]])
            lms = np.concatenate([data["pos_lm"][ip], zeros_lm])
            bxs = np.concatenate([data["pos_box"][ip], zeros_box])
            x, lm, bx = augment(crops, lms, bxs, rng, size=size)
            y = torch.cat([torch.ones(len(ip)), torch.zeros(batch - n_pos)])
            out_lm, out_box, logit = split_output(net(normalise_patches(x)))
            l_lm = (out_lm[:len(ip)] - torch.from_numpy(lm[:len(ip)])).abs().mean()
            l_box = (out_box[:len(ip)] - torch.from_numpy(bx[:len(ip)])).abs().mean()
            l_cls = F.binary_cross_entropy_with_logits(logit, y)
            loss = l_lm + 0.5 * l_box + 0.5 * l_cls
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += [l_lm.item(), l_box.item(), l_cls.item()]
        msg = f"epoch {epoch + 1:3d}/{epochs}: lm {tot[0] / steps_per_epoch:.4f} box {tot[1] / steps_per_epoch:.4f} " \
              f"cls {tot[2] / steps_per_epoch:.4f} ({time.perf_counter() - t0:.1f} s)"
        if len(va_p) and (epoch + 1 == epochs or (epoch + 1) % 5 == 0):
            msg += "  val " + evaluate(net, data, va_p, va_n, size)
        log(msg)
    return net.eval()


@torch.no_grad()
def evaluate(net: LandmarkNet, data: dict, ip: np.ndarray, ineg: np.ndarray, size: int = INPUT) -> str:
    net.eval()
    rng = np.random.default_rng(0)
    x, lm, bx = augment(data["pos"][ip], data["pos_lm"][ip], data["pos_box"][ip], rng, train=False, size=size)
    out_lm, out_box, logit = split_output(net(normalise_patches(x)))
    err = (out_lm.numpy() - lm)
    iod = np.linalg.norm(lm[:, 1] - lm[:, 0], axis=1)
    nme = (np.linalg.norm(err, axis=2).mean(1) / iod).mean()
    xn = augment(data["neg"][ineg], np.zeros((len(ineg), 5, 2), np.float32), np.zeros((len(ineg), 4), np.float32),
                 rng, train=False, size=size)[0]
    neg_logit = split_output(net(normalise_patches(xn)))[2] if len(ineg) else torch.zeros(0)
    net.train()
    return (f"NME/iod {nme:.4f}, box L1 {np.abs(out_box.numpy() - bx).mean():.4f}, "
            f"face recall {(logit > 0).float().mean():.3f}, neg rejected {(neg_logit <= 0).float().mean():.3f}")


def save_checkpoint(path: Path, state: dict, meta: dict) -> None:
    """``{'params': state dict, 'meta': meta}`` with floating tensors stored as
    float16 (halves the shipped file; the detector loads them into float32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).clone().contiguous()
             for k, v in state.items()}
    torch.save({"params": state, "meta": {**meta, "stored_dtype": "float16"}}, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Train the embedded detector's landmark CNN")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--clips", nargs="*", default=None,
                    help="training clips (default: ../shared/media/videos/train/*.mp4)")
    ap.add_argument("--stills", nargs="*", default=None,
                    help="folders of still images (default: ../shared/media/images/{%s})" % ",".join(STILLS))
    ap.add_argument("--teacher", type=Path, default=SHARED / "weights" / "detection_mobilenet0.25_Final.pth")
    ap.add_argument("--stride", type=int, default=2, help="use every n-th frame")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", choices=("heatmap", "fc"), default="heatmap")
    ap.add_argument("--input", type=int, default=INPUT, help="network input side (a multiple of 16)")
    ap.add_argument("--still-repeat", type=int, default=3, help="use still-image positives this many times per epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=None, help="npz of the built dataset (reused when present)")
    ap.add_argument("--val", nargs="*", default=[], help="clip names held out for validation (development)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    clips = args.clips or sorted(glob.glob(str(SHARED / "media" / "videos" / "train" / "*.mp4")))
    stills = args.stills if args.stills is not None else [str(SHARED / "media" / "images" / d) for d in STILLS]
    t0 = time.perf_counter()
    if args.cache and args.cache.is_file():
        data = dict(np.load(args.cache))
        print(f"dataset from {args.cache}")
    else:
        print(f"building the dataset from {len(clips)} clips (every {args.stride}. frame)")
        data = build_dataset(clips, args.teacher, args.stride, args.seed, stills)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.cache, **data)
    t_data = time.perf_counter() - t0
    names = [str(n) for n in data["clips"]]
    print(f"{len(data['pos'])} positives, {len(data['neg'])} negatives ({t_data:.0f} s)")
    coef = fit_cascade_confidence(data["stats"])
    s = data["stats"][data["stats"][:, 0] > 3]
    p = cascade_confidence(s[:, 0], s[:, 1], coef)
    print(f"cascade confidence coef {np.round(coef, 3).tolist()}: positives >= 0.5: {(p[s[:, 2] > 0] >= 0.5).mean():.3f}, "
          f"negatives < 0.5: {(p[s[:, 2] == 0] < 0.5).mean():.3f} ({int((s[:, 2] == 0).sum())} negatives)")
    val = {names.index(v) for v in args.val}
    t1 = time.perf_counter()
    net = train(data, args.epochs, args.batch, args.lr, args.seed, val, args.arch, args.input, args.still_repeat)
    t_train = time.perf_counter() - t1
    meta = {
        "input": args.input, "context": CONTEXT, "width": 16, "arch": args.arch, "still_repeat": args.still_repeat, "cascade": "haarcascade_frontalface_default.xml",
        "cascade_coef": coef, "teacher": args.teacher.name, "sources": names, "stride": args.stride,
        "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "positives": int(len(data["pos"])), "negatives": int(len(data["neg"])),
        "landmark_order": "image-left eye, image-right eye, nose, image-left mouth, image-right mouth",
        "units": "(p - crop centre) / crop side; crop = context x Haar box side, centred on it",
    }
    save_checkpoint(args.out, net.state_dict(), meta)
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {n_params} parameters, sha256 {digest}); "
          f"data {t_data:.0f} s, training {t_train:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
