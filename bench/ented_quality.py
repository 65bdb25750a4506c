"""Quality of the shipped ``ented`` (reference-based) restorer on the held-out
clips: with a keyframe of the same track as reference, with a reference of
another identity, and against ``lite`` and the degraded input.

Faces and degradation are exactly those of ``bench/lite_quality.py`` (same crops,
same per-clip ``Degradation(PRESET, seed=SEED + clip number).degrade_clip``), so
the ``lite`` and ``degraded input`` rows reproduce its table.

References (all aligned crops of the eval set, ``/work/data/eval512``, at 256):

* keyframe (clean): per face, the crop of the evaluated track with the best
  ``frvideo.reference.keyframe_score`` (sharpness x frontalness x detector
  score) among its *clean* crops at least ``--min-gap`` frames (default 10) away
  from the face's own frame (never the target itself, nor its near-copy
  neighbour);
* keyframe (degraded): the same keyframe taken from the degraded clip - what the
  pipeline has when the video has no clean frame;
* other identity: the clean keyframe of another clip (clips shifted by half the
  list, so retalk_* never meets retalk_*).

Metrics as lite_quality (face region x 25-75 %, y 31-88 % of the crop, and the
whole crop); seconds per face for ented (batch 1, reference features cached,
i.e. what a frame costs in a video) and for one reference pass.

    OMP_NUM_THREADS=1 .venv/bin/python bench/ented_quality.py [--threads 1] [--per-clip 24]
        [--weights PATH] [--save-frames /tmp/ented_frames]
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

from lite_quality import EVAL_SET, evenly_spaced, face_region, label, longest_tracks, score  # noqa: E402

from frvideo.metrics import psnr  # noqa: E402
from frvideo.reference import keyframe_score  # noqa: E402
from frvideo.train.trainer import to_tensor, to_uint8  # noqa: E402
from frvideo.train.degradation import Degradation  # noqa: E402


def clips_with_keyframes(root: Path, per_clip: int, size: int) -> dict:
    """Per clip: the evaluated crops (as lite_quality picks them) and the track's keyframe ranking."""
    ds, tracks = longest_tracks(root, size)
    out = {}
    for name, best in tracks.items():
        images = {i: ds[i]["image"] for i in best}
        scores = {i: keyframe_score(images[i], np.asarray(ds.entry(i)["landmarks"]), ds.entry(i).get("score", 1.0))
                  for i in best}
        ranking = sorted(best, key=lambda i: -scores[i])
        out[name] = {"targets": evenly_spaced(best, per_clip), "ranking": ranking, "images": images,
                     "frames": {i: int(ds.entry(i).get("frame", 0)) for i in best}, "scores": scores}
    return out


def to_t(img: np.ndarray) -> torch.Tensor:
    return to_tensor([img], "cpu")


def to_img(t: torch.Tensor) -> np.ndarray:
    return to_uint8(t)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="vqfr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-clip", type=int, default=24)
    p.add_argument("--min-gap", type=int, default=10, help="frames between a face and its reference keyframe")
    p.add_argument("--weights", help="an ented checkpoint other than the shipped one")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-set", default=str(EVAL_SET))
    p.add_argument("--save-frames", default="/tmp/ented_frames", help="folder for the comparison PNGs ('' = none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)

    from frvideo.restore import RestoreContext, load_restorer
    ented = load_restorer("ented", weights=args.weights)
    lite = load_restorer("lite")
    size = ented.input_size
    if not (Path(args.eval_set) / "index.jsonl").is_file():
        print(f"no eval set at {args.eval_set} (build it with `frvideo dataset`, see plugins/lite/RECIPE.md)",
              file=sys.stderr)
        return 2
    clips = clips_with_keyframes(Path(args.eval_set), args.per_clip, size)
    names = list(clips)
    other_of = {nm: names[(k + len(names) // 2) % len(names)] for k, nm in enumerate(names)}
    print(f"faces: {sum(len(c['targets']) for c in clips.values())} aligned {size}x{size} crops from {len(clips)} "
          f"clips ({args.eval_set}); degradation preset {args.preset!r}, seed {args.seed}")

    clean, degraded, refs_same, refs_deg, refs_other, owner = [], [], [], [], [], []
    ref_ids_same, ref_ids_other = [], []
    for n, name in enumerate(names):
        c = clips[name]
        frames = [c["images"][i] for i in c["targets"]]
        deg = Degradation(args.preset, seed=args.seed + n)
        low = deg.degrade_clip(frames)
        prm = deg.last_params
        ref_deg = Degradation(args.preset, seed=10_000 + n)  # noise of the degraded keyframes
        o = clips[other_of[name]]
        used = []
        for i, img, lo in zip(c["targets"], frames, low):
            use = next((k for k in c["ranking"] if abs(c["frames"][k] - c["frames"][i]) >= args.min_gap),
                       c["ranking"][0] if c["ranking"][0] != i else c["ranking"][1])
            used.append(c["frames"][use])
            clean.append(img)
            degraded.append(lo)
            refs_same.append(c["images"][use])
            ref_ids_same.append(f"{name}:{use}")
            # the keyframe as it looks in the degraded clip (same parameters, its own noise draw)
            refs_deg.append(ref_deg.apply(c["images"][use], prm))
            refs_other.append(o["images"][o["ranking"][0]])
            ref_ids_other.append(f"{other_of[name]}:{o['ranking'][0]}")
            owner.append(name)
        print(f"  {name}: {len(frames)} faces, sigma {prm.sigma:.2f}, r {prm.scale:.2f}, noise {prm.noise:.1f}, "
              f"jpeg {prm.jpeg}; keyframes used: frames {sorted(set(used))}; other identity = "
              f"{other_of[name]} frame {o['frames'][o['ranking'][0]]}")

    mask = face_region(size)
    outs = {"lite": [], "same": [], "deg": [], "other": []}
    times, ref_times = [], []
    for j, x in enumerate(degraded):
        t = to_t(x)
        outs["lite"].append(to_img(lite.restore(t, RestoreContext.single(1, 1.0))))
        for tag, refs, ids in (("same", refs_same, ref_ids_same), ("deg", refs_deg, None),
                               ("other", refs_other, ref_ids_other)):
            ctx = RestoreContext.single(1)
            ctx.references = to_t(refs[j])
            ctx.reference_ids = [ids[j]] if ids is not None else [f"deg:{j}"]
            if tag == "same":
                t0 = time.perf_counter()
                ented.reference_features(ctx.references, ["timing"])  # one E_ref pass, uncached
                ref_times.append(time.perf_counter() - t0)
                ented._ref_cache.pop("timing", None)
                ented.reference_features(ctx.references, ctx.reference_ids)  # warm the cache (as in a video)
                t0 = time.perf_counter()
                y = ented.restore(t, ctx)
                times.append(time.perf_counter() - t0)
            else:
                y = ented.restore(t, ctx)
            outs[tag].append(to_img(y))

    rows = [("degraded input", score(clean, degraded, mask)),
            ("lite (fidelity 1, card default)", score(clean, outs["lite"], mask)),
            ("ented, reference of another identity", score(clean, outs["other"], mask)),
            ("ented, keyframe of the same track, degraded like the clip", score(clean, outs["deg"], mask)),
            ("ented, keyframe of the same track, clean", score(clean, outs["same"], mask))]
    print()
    print("| method | face PSNR (dB) | face SSIM | crop PSNR (dB) | crop SSIM |")
    print("|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['psnr']:.2f} | {s['ssim']:.4f} | {s['psnr_crop']:.2f} | {s['ssim_crop']:.4f} |")
    print()
    print("per clip, face PSNR (dB)")
    print()
    print("| clip | degraded | lite | ented, other identity | ented, degraded keyframe | ented, clean keyframe |")
    print("|---|---|---|---|---|---|")
    for name in names:
        idx = [j for j, nm in enumerate(owner) if nm == name]
        vals = [np.mean([psnr(clean[j], src[j], mask) for j in idx])
                for src in (degraded, outs["lite"], outs["other"], outs["deg"], outs["same"])]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    print()
    print(f"ented: {np.median(times):.3f} s per face (median of {len(times)}; batch 1, {size}x{size}, "
          f"{args.threads} thread(s), reference features cached); one reference pass (E_ref + texture "
          f"extraction) {np.median(ref_times):.3f} s")

    if args.save_frames:
        folder = Path(args.save_frames)
        folder.mkdir(parents=True, exist_ok=True)
        by_damage = sorted(names, key=lambda nm: -np.mean(
            [psnr(clean[j], degraded[j], mask) for j, n2 in enumerate(owner) if n2 == nm]))
        for k, name in enumerate(dict.fromkeys([by_damage[len(by_damage) // 2], by_damage[-1]])):
            idx = [j for j, nm in enumerate(owner) if nm == name]
            j = idx[len(idx) // 2]
            panel = np.concatenate([label(degraded[j], "degraded"), label(outs["lite"][j], "lite"),
                                    label(outs["other"][j], "ented other-id ref"),
                                    label(outs["same"][j], "ented keyframe ref"),
                                    label(refs_same[j], "keyframe (ref)"), label(clean[j], "clean")], axis=1)
            path = folder / f"ented_{k + 1}_{Path(name).stem}.png"
            cv2.imwrite(str(path), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
            print(f"saved {path} ({name}: degraded {psnr(clean[j], degraded[j], mask):.2f} dB, lite "
                  f"{psnr(clean[j], outs['lite'][j], mask):.2f}, ented other-id "
                  f"{psnr(clean[j], outs['other'][j], mask):.2f}, ented keyframe "
                  f"{psnr(clean[j], outs['same'][j], mask):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
