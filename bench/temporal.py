"""Temporal coherence benchmark: flicker with and without smoothing, fidelity held.

For each clip of ../shared/media/videos/eval (first --frames frames): degrade it
with the papers' degradation model drawn once per clip from (--seed, clip
number) (plus a real x264 pass), run the pipeline in memory under each configuration, and
measure against the clean clip over the face regions (boxes detected on the
clean clip, the same for every configuration):

* TDC and E_warp (frvideo.metrics; flow on the clean clip), lower = steadier;
* token flip rate: share of token positions that change between consecutive
  frames of a track (what the decoder was actually given);
* PSNR / SSIM of the restored frames against the clean clip.

Reference rows: the degraded input; the detail-loss floor (the clean clip through
the degradation's blur and resize only: TDC charges motion detail the output
lacks, so a restorer that recovers nothing the blur removed cannot go below it,
whatever its temporal smoothing); an output that does not move at all.

Configurations: per-frame (no smoothing), landmarks only, tokens only, both,
full (both + the restored-face filter: the default), plus any --alphas x
--margins sweep of the token smoother and --strengths x --thresholds sweep of
the face filter.

    python bench/temporal.py --model lite [--weights W] [--clips retalk_1 ...] [--frames 48]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from frvideo.faces.detect import load_detector
from frvideo.io import open_reader
from frvideo.io.frames import to_rgb
from frvideo.metrics import FlickerMeter, QualityMeter, TokenFlipMeter, face_masks
from frvideo.pipeline import FacePipeline, PipelineOptions
from frvideo.restore import load_restorer
from frvideo.train.degradation import Degradation, degrade

FLOOR = "detail-loss floor (blur+resize only)"
SHARED = Path(os.environ.get("FRVIDEO_SHARED", Path(__file__).resolve().parents[2] / "shared"))


class RecordingRestorer:
    """Wraps a backend and records the tokens each face was decoded with."""

    def __init__(self, inner):
        self.inner = inner
        self.meter = TokenFlipMeter()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, encoded, tokens, ctx):
        for tid, tok in zip(ctx.track_ids, tokens.cpu().numpy()):
            self.meter.update(tid, tok)
        return self.inner.decode(encoded, tokens, ctx)


def read_clip(path: Path, frames: int) -> tuple[list[np.ndarray], float]:
    reader = open_reader(str(path))
    fps = float(reader.info.average_rate or 25)
    out = []
    for f in reader:
        out.append(to_rgb(f))
        if len(out) >= frames:
            break
    reader.close()
    return out, fps


def as_frames(images: list[np.ndarray], fps: float):
    for i, img in enumerate(images):
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        f.pts, f.time_base = i, Fraction(1, round(fps))
        yield f


def run_config(restorer, detector, degraded, fps, opts: PipelineOptions):
    rec = RecordingRestorer(restorer)
    pipe = FacePipeline(rec, detector, opts, fps)
    t = time.perf_counter()
    out = [to_rgb(f) for f in pipe.process(as_frames(degraded, fps))]
    return out, rec.meter.rate, time.perf_counter() - t, pipe.stats.faces


def measure(clean, out, masks):
    flicker, quality = FlickerMeter(warp=True), QualityMeter()
    for c, o, m in zip(clean, out, masks):
        flicker.update(c, o, m)
        quality.update(c, o, m)
    return {**flicker.result(), **quality.result()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lite")
    ap.add_argument("--weights")
    ap.add_argument("--detector", default="auto")
    ap.add_argument("--clips", nargs="+", default=None, help="clip stems (default: all eval clips)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--preset", default="vqfr", help="degradation preset")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fidelity", type=float, default=None)
    ap.add_argument("--alphas", type=float, nargs="*", default=[])
    ap.add_argument("--margins", type=float, nargs="*", default=[])
    ap.add_argument("--strengths", type=float, nargs="*", default=[],
                    help="extra 'full' configs: face-filter strengths (x --thresholds)")
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.08])
    ap.add_argument("--guides", nargs="*", choices=["input", "output"], default=["input"],
                    help="face-filter guide for the sweep: motion and change read on the input crops or the restored faces")
    ap.add_argument("--no-flow", action="store_true", help="sweep configs without motion compensation")
    ap.add_argument("--only", nargs="*", default=None, help="run only these named configs (plus the sweeps)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()

    all_clips = sorted((SHARED / "media" / "videos" / "eval").glob("*.mp4"))
    clips = [c for c in all_clips if c.stem in args.clips] if args.clips else all_clips
    import torch
    restorer = load_restorer(args.model, args.weights,
                             dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    detector = load_detector(args.detector)
    base = dict(batch_size=args.batch_size, fidelity=args.fidelity, quiet=True)
    configs = {
        "per-frame": PipelineOptions(temporal="off", smooth_landmarks=False, **base),
        "landmarks": PipelineOptions(temporal="off", smooth_landmarks=True, **base),
        "tokens": PipelineOptions(temporal="tokens", smooth_landmarks=False, **base),
        "landmarks+tokens": PipelineOptions(temporal="tokens", smooth_landmarks=True, **base),
        # the face filter reading motion and change on the restored faces (the default until input guiding)
        "full, output-guided": PipelineOptions(temporal_guide="output", temporal_threshold=0.05, **base),
        "full (default)": PipelineOptions(**base),  # landmarks + tokens + restored-face filter
    }
    if not restorer.has_codebook:
        configs = {k: v for k, v in configs.items() if "tokens" not in k}
    if args.only is not None:
        configs = {k: v for k, v in configs.items() if k == "per-frame" or k in args.only}
    for st in args.strengths:
        for th in args.thresholds:
            for guide in args.guides:
                configs[f"full s={st:g} t={th:g} {guide}"] = PipelineOptions(
                    temporal_strength=st, temporal_threshold=th, temporal_guide=guide,
                    temporal_flow=not args.no_flow, **base)
    for a in args.alphas:
        for m in args.margins:
            configs[f"both a={a:g} m={m:g}"] = PipelineOptions(temporal="tokens", smooth_landmarks=True,
                                                              temporal_alpha=a, temporal_margin=m, **base)
    rows: dict[str, list[dict]] = {name: [] for name in [
        "degraded input", FLOOR, "static output (no motion)", *configs]}
    print(f"model {args.model}, detector {detector.name}, preset {args.preset}, seed {args.seed}, "
          f"{args.frames} frames per clip", file=sys.stderr)
    for clip in clips:
        clean, fps = read_clip(clip, args.frames)
        # one draw per clip from (seed, clip number): a clip is degraded the same whichever others run
        deg = Degradation(args.preset, seed=[args.seed, all_clips.index(clip)])
        degraded = deg.degrade_clip(clean, codec="libx264", fps=fps)
        h, w = clean[0].shape[:2]
        masks = face_masks([detector.detect(c).boxes for c in clean], h, w)
        rows["degraded input"].append({**measure(clean, degraded, masks), "flip": float("nan"), "s_face": 0})
        # TDC of an output that does not move at all = mean |clean change|^2 in the face regions: what
        # TDC charges for motion the output does not reproduce (lost detail counts as flicker)
        # the clean clip through the degradation's blur and resampling only (no noise, JPEG 100, no codec):
        # a restorer that removes every artefact but recovers no detail the blur took still scores this TDC
        detail_only = dataclasses.replace(deg.last_params, noise=0.0, jpeg=100)
        rows[FLOOR].append({**measure(clean, [degrade(c, detail_only, np.random.default_rng(0)) for c in clean],
                                      masks), "flip": float("nan"), "s_face": 0})
        rows["static output (no motion)"].append({**measure(clean, [clean[0]] * len(clean), masks),
                                                  "flip": float("nan"), "s_face": 0})
        print(f"{clip.stem}: {deg.last_params}", file=sys.stderr)
        for name, opts in configs.items():
            out, flip, secs, faces = run_config(restorer, detector, degraded, fps, opts)
            rows[name].append({**measure(clean, out, masks), "flip": flip, "s_face": secs / max(faces, 1)})
            r = rows[name][-1]
            print(f"  {name:<22} TDC {r['tdc'] * 1e4:.3f}e-4  Ewarp {r['warp_error'] * 1e4:.3f}e-4  "
                  f"flip {flip:.4f}  PSNR {r['psnr']:.2f}  SSIM {r['ssim']:.4f}", file=sys.stderr)

    def mean(name, key):
        vals = [r[key] for r in rows[name] if np.isfinite(r[key])]
        return float(np.mean(vals)) if vals else float("nan")

    ref = "per-frame"

    def ratio(name, key):  # geometric mean over clips of the per-clip ratio to per-frame
        r = [a[key] / b[key] for a, b in zip(rows[name], rows[ref]) if b[key] > 0 and np.isfinite(a[key])]
        return float(np.exp(np.mean(np.log(r)))) if r else float("nan")

    print(f"\n{len(clips)} clips x {args.frames} frames; means over clips; face regions; ratios vs {ref} "
          f"(lower flicker is better): of the means, and the geometric mean of per-clip ratios\n")
    print("| config | TDC (1e-4) | E_warp (1e-4) | token flip rate | PSNR (dB) | SSIM | TDC ratio | E_warp ratio | "
          "per-clip TDC / E_warp ratio | PSNR vs per-frame | s/face |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in rows:
        tdc, ew = mean(name, "tdc"), mean(name, "warp_error")
        print(f"| {name} | {tdc * 1e4:.3f} | {ew * 1e4:.3f} | {mean(name, 'flip'):.4f} | {mean(name, 'psnr'):.2f} | "
              f"{mean(name, 'ssim'):.4f} | {tdc / mean(ref, 'tdc'):.2f} | {ew / mean(ref, 'warp_error'):.2f} | "
              f"{ratio(name, 'tdc'):.2f} / {ratio(name, 'warp_error'):.2f} | "
              f"{mean(name, 'psnr') - mean(ref, 'psnr'):+.2f} | {mean(name, 's_face'):.2f} |")
    print(f"\nE_warp of the clean clip itself (flow/lighting floor): {mean('degraded input', 'warp_error_ref') * 1e4:.3f}e-4")
    print("\nPer clip, TDC / E_warp (1e-4):\n")
    print("| config | " + " | ".join(c.stem for c in clips) + " |")
    print("|---|" + "---|" * len(clips))
    for name in rows:
        print(f"| {name} | " + " | ".join(f"{r['tdc'] * 1e4:.2f} / {r['warp_error'] * 1e4:.2f}" for r in rows[name]) + " |")

if __name__ == "__main__":
    main()
