"""Quality of the shipped ``lite`` restorer on held-out clips vs the degraded
input and a classical baseline.

Faces: aligned crops of the eval clips (../shared/media/videos/eval), from the
built eval set /work/data/eval512 (``frvideo dataset``) when present, else
aligned here with the RetinaFace detector from ../shared/weights. Up to
``--per-clip`` crops per clip (evenly spaced in time, one track per clip),
resized to the model's input size (256, INTER_AREA): these are the clean
references.

Degradation: per clip, ``Degradation(PRESET, seed=SEED + clip number)
.degrade_clip(frames)`` - one parameter draw per clip (blur sigma, downscale r,
noise, JPEG q; printed) and fresh noise per frame, as a camera + encoder would
damage a real video; ``--codec libx264`` adds a real low-bitrate codec pass.

Methods:
  * input: the degraded crop;
  * classical: ``cv2.fastNlMeansDenoisingColored(h=hColor=H, 7, 21)`` then
    unsharp mask ``x + A (x - GaussianBlur(x, sigma 1.0))`` (H=6, A=0.5 by
    default; ``--baseline-grid`` also reports the best of a small grid, chosen on
    this very test set, i.e. an optimistic baseline);
  * lite at each ``--fidelity`` (``Restorer.restore``, batch 1).

Metrics (frvideo.metrics, uint8, vs the clean crop): PSNR and SSIM over the face
region of the aligned crop (the box around the FFHQ-template landmarks,
x 25-75 %, y 31-88 % of the crop) and over the whole crop; mean over all faces.
Also: seconds per face for lite (batch 1, ``--threads``, median of the runs).

    .venv/bin/python bench/lite_quality.py [--preset vqfr] [--seed 0] [--per-clip 24]
        [--fidelity 0,0.5,1] [--weights PATH] [--threads 2] [--codec libx264]
        [--save-cmp /tmp/lite_cmp] [--baseline-grid]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from frvideo.metrics import psnr, ssim  # noqa: E402
from frvideo.train.degradation import Degradation  # noqa: E402

SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
EVAL_SET = Path(os.environ.get("FRVIDEO_EVAL_SET", "/work/data/eval512"))


def face_region(size: int) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[int(0.31 * size):int(0.88 * size), int(0.25 * size):int(0.75 * size)] = True
    return m


def longest_tracks(root: Path, size: int):
    """The eval set and, per clip (file name), the indices of its longest track in frame order:
    the faces every quality bench (lite, ented, ldbfr) draws from."""
    from frvideo.train.dataset import FaceCropDataset
    ds = FaceCropDataset(root, size)
    out = {}
    for source, idx in sorted(ds.sources().items()):
        tracks: dict[str, list[int]] = {}
        for i in idx:
            tracks.setdefault(ds.entry(i)["track"], []).append(i)
        best = max(tracks.values(), key=len)
        best.sort(key=lambda i: ds.entry(i).get("frame", 0))
        out[Path(source).name] = best
    return ds, out


def evenly_spaced(track: list[int], per_clip: int) -> list[int]:
    pick = np.unique(np.linspace(0, len(track) - 1, min(per_clip, len(track))).round().astype(int))
    return [track[j] for j in pick]


def crops_from_eval_set(root: Path, per_clip: int, size: int) -> dict[str, list[np.ndarray]]:
    ds, tracks = longest_tracks(root, size)
    return {name: [ds[i]["image"] for i in evenly_spaced(best, per_clip)] for name, best in tracks.items()}


def crops_from_videos(folder: Path, per_clip: int, size: int) -> dict[str, list[np.ndarray]]:
    """Align the largest face of evenly spaced frames of each clip (RetinaFace, 512 crop -> size)."""
    import av

    from frvideo.faces.align import similarity_transforms, warp_faces
    from frvideo.faces.detect import load_detector
    det = load_detector("retinaface-mobile", weights=SHARED / "weights" / "detection_mobilenet0.25_Final.pth")
    out = {}
    for clip in sorted(folder.glob("*.mp4")):
        with av.open(str(clip)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        picks = np.unique(np.linspace(0, len(frames) - 1, min(per_clip, len(frames))).round().astype(int))
        crops = []
        for i in picks:
            d = det.detect(frames[i])
            if len(d) == 0:
                continue
            j = int(np.argmax((d.boxes[:, 2] - d.boxes[:, 0]) * (d.boxes[:, 3] - d.boxes[:, 1])))
            crop = warp_faces(frames[i], similarity_transforms(d.landmarks[j:j + 1], 512), 512)[0]
            crops.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
        if crops:
            out[clip.name] = crops
    return out


def classical(img: np.ndarray, h: float = 6.0, amount: float = 0.5, sigma: float = 1.0) -> np.ndarray:
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if h > 0:
        bgr = cv2.fastNlMeansDenoisingColored(bgr, None, h, h, 7, 21)
    x = bgr.astype(np.float32)
    if amount > 0:
        x = x + amount * (x - cv2.GaussianBlur(x, (0, 0), sigma))
    return cv2.cvtColor(np.clip(np.rint(x), 0, 255).astype(np.uint8), cv2.COLOR_BGR2RGB)


def score(ref: list[np.ndarray], out: list[np.ndarray], mask: np.ndarray) -> dict:
    return {"psnr": float(np.mean([psnr(r, o, mask) for r, o in zip(ref, out)])),
            "ssim": float(np.mean([ssim(r, o, mask) for r, o in zip(ref, out)])),
            "psnr_crop": float(np.mean([psnr(r, o) for r, o in zip(ref, out)])),
            "ssim_crop": float(np.mean([ssim(r, o) for r, o in zip(ref, out)]))}


def label(img: np.ndarray, text: str) -> np.ndarray:
    img = img.copy()
    cv2.putText(img, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vqfr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-clip", type=int, default=24)
    p.add_argument("--fidelity", default="0,0.5,1")
    p.add_argument("--weights", help="a lite checkpoint other than the shipped one")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--codec", help="also pass each degraded clip through this codec (e.g. libx264)")
    p.add_argument("--baseline-grid", action="store_true")
    p.add_argument("--save-cmp", default="/tmp/lite_cmp", help="prefix of the comparison PNGs ('' = none)")
    p.add_argument("--eval-set", default=str(EVAL_SET))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    from frvideo.restore import RestoreContext, load_restorer
    restorer = load_restorer("lite", weights=args.weights)
    size = restorer.input_size
    fids = [float(f) for f in args.fidelity.split(",") if f.strip()]

    if (Path(args.eval_set) / "index.jsonl").is_file():
        clips, where = crops_from_eval_set(Path(args.eval_set), args.per_clip, size), args.eval_set
    else:
        folder = SHARED / "media" / "videos" / "eval"
        if not folder.is_dir():
            print(f"no eval set at {args.eval_set} and no clips at {folder}", file=sys.stderr)
            return 2
        clips, where = crops_from_videos(folder, args.per_clip, size), str(folder)
    print(f"faces: {sum(len(v) for v in clips.values())} aligned {size}x{size} crops from {len(clips)} clips "
          f"({where}); degradation preset {args.preset!r}, seed {args.seed}"
          + (f", codec {args.codec}" if args.codec else ""))

    clean, degraded, names, clip_params = [], [], [], {}
    for n, (name, frames) in enumerate(clips.items()):
        deg = Degradation(args.preset, seed=args.seed + n, codec=args.codec)
        low = deg.degrade_clip(frames)
        prm = deg.last_params
        clip_params[name] = prm
        print(f"  {name}: {len(frames)} faces, sigma {prm.sigma:.2f}, r {prm.scale:.2f}, noise {prm.noise:.1f}, "
              f"jpeg {prm.jpeg}")
        clean += frames
        degraded += low
        names += [name] * len(frames)

    mask = face_region(size)
    rows = [("degraded input", score(clean, degraded, mask))]
    base = [classical(x) for x in degraded]
    rows.append(("classical (NLM h=6 + USM 0.5)", score(clean, base, mask)))
    if args.baseline_grid:
        best = None
        for h in (3, 6, 10, 15):
            for a in (0.0, 0.5, 1.0):
                s = score(clean, [classical(x, h, a) for x in degraded], mask)
                if best is None or s["psnr"] > best[1]["psnr"]:
                    best = (f"classical best of grid (h={h}, USM {a})", s)
        rows.append(best)

    outs: dict[float, list[np.ndarray]] = {f: [] for f in fids}
    times = []
    for x in degraded:
        t = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 127.5 - 1
        for f in fids:
            t0 = time.perf_counter()
            y = restorer.restore(t, RestoreContext.single(1, f))
            if f == fids[-1]:
                times.append(time.perf_counter() - t0)
            outs[f].append(((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
    for f in fids:
        rows.append((f"lite, fidelity {f:g}", score(clean, outs[f], mask)))

    print()
    print("| method | face PSNR (dB) | face SSIM | crop PSNR (dB) | crop SSIM |")
    print("|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_crop']:.2f} | {s['ssim_crop']:.4f} |")
    print()
    fl = fids[-1]
    print(f"per clip, face PSNR (dB): degraded / classical / lite w={fl:g}")
    print()
    print("| clip | degradation | degraded | classical | lite |")
    print("|---|---|---|---|---|")
    for name, prm in clip_params.items():
        idx = [j for j, nm in enumerate(names) if nm == name]
        vals = [np.mean([psnr(clean[j], src[j], mask) for j in idx]) for src in (degraded, base, outs[fl])]
        print(f"| {name} | sigma {prm.sigma:.1f}, r {prm.scale:.1f}, noise {prm.noise:.1f}, q {prm.jpeg} | "
              + " | ".join(f"{v:.2f}" for v in vals) + " |")
    print()
    print(f"lite: {np.median(times):.3f} s per face (median of {len(times)}, batch 1, {size}x{size}, "
          f"{args.threads} threads, fidelity {fids[-1]:g}; restore() only)")

    if args.save_cmp:
        # two clips: the least damaged one and the one with the median damage (input face PSNR)
        fbest = fids[-1]
        clip_names = list(dict.fromkeys(names))
        by_damage = sorted(clip_names, key=lambda nm: -np.mean(
            [psnr(clean[j], degraded[j], mask) for j, n2 in enumerate(names) if n2 == nm]))
        picks = [by_damage[0], by_damage[len(by_damage) // 2]]
        for k, name in enumerate(dict.fromkeys(picks)):
            idx = [j for j, nm in enumerate(names) if nm == name]
            j = idx[len(idx) // 2]  # the middle face of the clip
            panel = np.concatenate([label(degraded[j], "degraded"), label(base[j], "classical"),
                                    label(outs[fbest][j], f"lite w={fbest:g}"), label(clean[j], "clean")], axis=1)
            path = f"{args.save_cmp}_{k + 1}.png"
            cv2.imwrite(path, cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
            print(f"saved {path} ({name}: degraded {psnr(clean[j], degraded[j], mask):.2f} dB, classical "
                  f"{psnr(clean[j], base[j], mask):.2f} dB, lite {psnr(clean[j], outs[fbest][j], mask):.2f} dB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
