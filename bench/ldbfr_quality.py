"""Quality, speed and flicker of the shipped ``ldbfr`` (LD-BFR) restorer.

Faces and degradation are exactly those of ``bench/lite_quality.py`` (its
functions are imported): up to ``--per-clip`` aligned crops of the longest
track of each held-out clip (/work/data/eval512, evenly spaced in time), 256 px,
each clip degraded by ``Degradation(PRESET, seed=SEED + clip number)
.degrade_clip`` (one parameter draw per clip, fresh noise per frame). With the
default preset ``ld-bfr`` (the same ranges as ``vqfr``) and seed 0 the degraded
faces are those of lite's table in plugins/lite/RECIPE.md.

Quality table (face region x 25-75 %, y 31-88 % of the crop, and whole crop;
mean over faces): the degraded input, ``lite`` (card default fidelity 1),
LD-BFR's DC-VQR stage alone (f_HQ decoded directly, ``steps`` 0) and LD-BFR at
each ``--steps`` (DDIM, eta 0, noise locked: seed = the clip's track seed).
Seconds per face: ``restore()`` at batch 1 on ``--threads`` threads, median.

Flicker table: per clip, ``--tdc-frames`` consecutive crops of that track
(consecutive frames of the clip, the middle of the track), degraded as above;
TDC (frvideo.metrics.tdc, face region, REF = the clean crops) of the input,
lite, DC-VQR alone and LD-BFR at ``--tdc-steps`` with noise locked (the same
seed on every frame, as the pipeline does per track) vs fresh noise (a new draw
per frame). Mean over clips.

PNGs (``--frames-dir``): per picked clip, one panel of the methods side by
side, and a strip of 4 consecutive restored frames, locked vs fresh, with their
frame-to-frame differences (x4).

    .venv/bin/python bench/ldbfr_quality.py [--steps 1,4,10,25] [--per-clip 24] [--threads 1]
        [--tdc-frames 24] [--tdc-steps 4] [--weights PATH] [--frames-dir /tmp/ldbfr_frames]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from lite_quality import EVAL_SET, crops_from_eval_set, face_region, label, longest_tracks, score  # noqa: E402

from frvideo.metrics import psnr, tdc  # noqa: E402
from frvideo.train.trainer import to_tensor, to_uint8  # noqa: E402
from frvideo.train.degradation import Degradation  # noqa: E402


def to_t(img: np.ndarray) -> torch.Tensor:
    return to_tensor([img], "cpu")


def to_img(y: torch.Tensor) -> np.ndarray:
    return to_uint8(y)[0]


def consecutive_crops(root: Path, count: int, size: int) -> dict[str, list[np.ndarray]]:
    """Per clip: ``count`` consecutive-frame crops from the middle of its longest track."""
    ds, tracks = longest_tracks(root, size)
    out = {}
    for name, best in tracks.items():
        frames = [ds.entry(i).get("frame", 0) for i in best]
        # the longest run of consecutive frame numbers, then its middle ``count``
        runs, start = [], 0
        for k in range(1, len(best) + 1):
            if k == len(best) or frames[k] != frames[k - 1] + 1:
                runs.append((start, k))
                start = k
        a, b = max(runs, key=lambda r: r[1] - r[0])
        mid = (a + b) // 2
        lo = max(a, mid - count // 2)
        out[name] = [ds[i]["image"] for i in best[lo:min(b, lo + count)]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="ld-bfr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-clip", type=int, default=24)
    p.add_argument("--steps", default="1,4,10,25")
    p.add_argument("--tdc-frames", type=int, default=24)
    p.add_argument("--tdc-steps", default="4")
    p.add_argument("--weights", help="an ldbfr checkpoint other than the shipped one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--frames-dir", default="/tmp/ldbfr_frames", help="where the PNGs go ('' = none)")
    p.add_argument("--eval-set", default=str(EVAL_SET))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    from frvideo.restore import RestoreContext, load_restorer
    ldbfr = load_restorer("ldbfr", weights=args.weights)
    lite = load_restorer("lite")
    size = ldbfr.input_size
    steps_list = [int(s) for s in args.steps.split(",") if s.strip()]
    tdc_steps = [int(s) for s in args.tdc_steps.split(",") if s.strip()]
    if not (Path(args.eval_set) / "index.jsonl").is_file():
        print(f"no eval set at {args.eval_set} (build it with `frvideo dataset`, see plugins/lite/RECIPE.md)",
              file=sys.stderr)
        return 2
    clips = crops_from_eval_set(Path(args.eval_set), args.per_clip, size)
    print(f"faces: {sum(len(v) for v in clips.values())} aligned {size}x{size} crops from {len(clips)} clips "
          f"({args.eval_set}); degradation preset {args.preset!r}, seed {args.seed}; {args.threads} thread(s)")

    clean, degraded, names, seeds = [], [], [], []
    for n, (name, frames) in enumerate(clips.items()):
        deg = Degradation(args.preset, seed=args.seed + n)
        low = deg.degrade_clip(frames)
        prm = deg.last_params
        print(f"  {name}: {len(frames)} faces, sigma {prm.sigma:.2f}, r {prm.scale:.2f}, noise {prm.noise:.1f}, "
              f"jpeg {prm.jpeg}")
        clean += frames
        degraded += low
        names += [name] * len(frames)
        seeds += [1000003 * n + 12345] * len(frames)  # one track per clip: the pipeline's per-track seed

    def ctx(seed, steps):
        return RestoreContext([0], [0], noise_seeds=None if seed is None else [seed], steps=steps)

    mask = face_region(size)
    methods = [("lite", None)] + [("dcvqr", 0)] + [("ldbfr", s) for s in steps_list]
    outs = {m: [] for m in methods}
    times = {m: [] for m in methods}
    with torch.no_grad():
        for x, seed in zip(degraded, seeds):
            t = to_t(x)
            for m in methods:
                t0 = time.perf_counter()
                y = lite.restore(t, RestoreContext.single(1)) if m[0] == "lite" else ldbfr.restore(t, ctx(seed, m[1]))
                times[m].append(time.perf_counter() - t0)
                outs[m].append(to_img(y))

    def title(m):
        return {"lite": "lite (fidelity 1)", "dcvqr": "LD-BFR DC-VQR stage alone"}.get(
            m[0], f"LD-BFR, {m[1]} DDIM step{'s' if m[1] != 1 else ''}")

    print()
    print("| method | face PSNR (dB) | face SSIM | crop PSNR (dB) | crop SSIM | s / face |")
    print("|---|---|---|---|---|---|")
    s = score(clean, degraded, mask)
    print(f"| degraded input | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_crop']:.2f} | {s['ssim_crop']:.4f} | - |")
    for m in methods:
        s = score(clean, outs[m], mask)
        print(f"| {title(m)} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_crop']:.2f} | {s['ssim_crop']:.4f} | "
              f"{np.median(times[m]):.3f} |")
    print()
    print("per clip, face PSNR (dB)")
    print()
    print("| clip | degraded | lite | DC-VQR | " + " | ".join(f"LD-BFR {s}" for s in steps_list) + " |")
    print("|---|---|---|---|" + "---|" * len(steps_list))
    for name in dict.fromkeys(names):
        idx = [j for j, nm in enumerate(names) if nm == name]
        vals = [np.mean([psnr(clean[j], src[j], mask) for j in idx]) for src in [degraded] + [outs[m] for m in methods]]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")

    # -- flicker on consecutive frames --------------------------------------------------------------
    runs = consecutive_crops(Path(args.eval_set), args.tdc_frames, size)
    fmask = [mask] * args.tdc_frames
    tdc_rows: dict[str, list[float]] = {}
    strips = {}
    print()
    print(f"flicker: {args.tdc_frames} consecutive crops per clip, TDC x 1e4 (face region, REF = clean crops)")
    with torch.no_grad():
        for n, (name, frames) in enumerate(runs.items()):
            low = Degradation(args.preset, seed=args.seed + n).degrade_clip(frames)
            m = fmask[:len(frames)]
            seed = 1000003 * n + 12345
            res = {"degraded input": low,
                   "lite": [to_img(lite.restore(to_t(x), RestoreContext.single(1))) for x in low],
                   "DC-VQR alone": [to_img(ldbfr.restore(to_t(x), ctx(seed, 0))) for x in low]}
            for st in tdc_steps:
                res[f"LD-BFR {st} steps, locked noise"] = [to_img(ldbfr.restore(to_t(x), ctx(seed, st))) for x in low]
                res[f"LD-BFR {st} steps, fresh noise"] = [to_img(ldbfr.restore(to_t(x), ctx(None, st))) for x in low]
            for k, v in res.items():
                tdc_rows.setdefault(k, []).append(tdc(frames, v, m))
            strips[name] = (frames, low, res)
    print()
    print("| method | " + " | ".join(runs) + " | mean |")
    print("|---|" + "---|" * (len(runs) + 1))
    for k, vals in tdc_rows.items():
        print(f"| {k} | " + " | ".join(f"{v * 1e4:.2f}" for v in vals) + f" | {np.mean(vals) * 1e4:.2f} |")

    # -- PNGs ----------------------------------------------------------------------------------------
    if args.frames_dir:
        out_dir = Path(args.frames_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        clip_names = list(dict.fromkeys(names))
        by_damage = sorted(clip_names, key=lambda nm: -np.mean(
            [psnr(clean[j], degraded[j], mask) for j, n2 in enumerate(names) if n2 == nm]))
        picks = list(dict.fromkeys([by_damage[0], by_damage[len(by_damage) // 2], by_damage[-1]]))
        for k, name in enumerate(picks):
            j = [i for i, nm in enumerate(names) if nm == name][len(clips[name]) // 2]
            tiles = [label(degraded[j], "degraded")] + [label(outs[m][j], {"lite": "lite", "dcvqr": "DC-VQR"}.get(
                m[0], f"LD-BFR {m[1]}")) for m in methods] + [label(clean[j], "clean")]
            path = out_dir / f"quality_{k + 1}_{Path(name).stem}.png"
            cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(tiles, axis=1), cv2.COLOR_RGB2BGR))
            print(f"saved {path}")
            frames, low, res = strips[name]
            st = tdc_steps[0]
            rows = []
            for key in (f"LD-BFR {st} steps, locked noise", f"LD-BFR {st} steps, fresh noise"):
                seq = res[key][:4]
                diffs = [np.clip(np.abs(seq[i + 1].astype(int) - seq[i].astype(int)) * 4, 0, 255).astype(np.uint8)
                         for i in range(len(seq) - 1)]
                tag = key.split(", ")[1]
                rows.append(np.concatenate([label(f, f"{tag} t{i}") for i, f in enumerate(seq)], axis=1))
                rows.append(np.concatenate([label(d, f"|diff| x4 t{i + 1}-t{i}") for i, d in enumerate(diffs)]
                                           + [np.zeros_like(seq[0])], axis=1))
            path = out_dir / f"flicker_{k + 1}_{Path(name).stem}.png"
            cv2.imwrite(str(path), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))
            print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
