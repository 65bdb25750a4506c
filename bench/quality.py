"""Never make a face worse: every shipped model (and ``none``) on the eval clips, in three
families of input, against the clean clip.

Families (each clip's first ``--frames`` frames; one parameter draw per clip, seeded by the
clip's number, so a clip is degraded the same whichever others run):

* ``mild``: the project's degradation preset ``ld-bfr-mild`` (LD-BFR's CelebA-Test mild
  split: blur 3-5 px, x4 down, noise 5-20, JPEG 60-80), then a real x264 pass;
* ``vqfr``: the preset ``vqfr`` (VQFR's training ranges) then a real x264 pass;
* ``simple``: an independent, fixed degradation: Gaussian blur sigma 3 at the scale of a
  512-px aligned face (sigma scaled by the face's size in the frame), x4 area down, bicubic
  up, JPEG quality 30;
* ``clean``: the clip itself (then "PSNR" is PSNR(output, input): the no-harm bar is 38 dB).

Rows: the input, a classical baseline (OpenCV non-local-means denoise of the face box, then
a light unsharp mask), and each model through the whole pipeline (in memory, default
options: auto strength, detail keeping, temporal smoothing). Metrics over the face boxes of
the clean clip (RetinaFace-mobile): face PSNR / SSIM, identity distance (dlib descriptor of
the output face vs the clean face, every ``--identity-every``-th frame), TDC and E_warp
(frvideo.metrics), the share of frames with a clean-clip face that the pipeline restored
(a restored face overlapping it), and seconds per face. The last lines check the no-harm
goals (PSNR >= input - 0.2 dB, identity <= input + 0.03; clean: PSNR >= 38 dB).

    FRVIDEO_HOME=<detectors> OMP_NUM_THREADS=1 python bench/quality.py \\
        [--models none lite lite@int8 ented ldbfr] [--families mild vqfr simple clean] [--frames 24] \\
        [--detector retinaface-mobile] [--clips retalk_1 ...] [--json out.json] [--panels DIR]
    python bench/quality.py --merge clip1.json clip2.json ...   # one table from per-clip runs
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from frvideo.faces.align import similarity_transforms  # noqa: E402
from frvideo.faces.detect import load_detector  # noqa: E402
from frvideo.faces.tracker import box_iou  # noqa: E402
from frvideo.identity import IdentityModel  # noqa: E402
from frvideo.io.frames import to_rgb  # noqa: E402
from frvideo.metrics import FlickerMeter, QualityMeter, face_mask  # noqa: E402
from frvideo.pipeline import FacePipeline, PipelineOptions  # noqa: E402
from frvideo.restore import INT8, load_restorer  # noqa: E402
from frvideo.train.degradation import Degradation  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from temporal import as_frames, read_clip  # noqa: E402  (bench/temporal.py: the same clip reading)

SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
FAMILIES = ("mild", "vqfr", "simple", "clean")
OTHER_IDENTITY = ", other identity"  # row label suffix: a reference-based model given another person's face


def face_scale(landmarks: np.ndarray) -> float:
    """Frame pixels per pixel of a 512 aligned crop."""
    A = similarity_transforms(landmarks[None], 512)[0]
    return 1.0 / float(np.sqrt(abs(np.linalg.det(A[:, :2]))))


def simple_degrade(frames: list[np.ndarray], scale: float) -> list[np.ndarray]:
    out = []
    for f in frames:
        h, w = f.shape[:2]
        x = cv2.GaussianBlur(f, (0, 0), 3.0 * scale)
        x = cv2.resize(x, (max(1, w // 4), max(1, h // 4)), interpolation=cv2.INTER_AREA)
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(x, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 30])
        out.append(cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return out


def degrade_family(family: str, clean: list[np.ndarray], fps: float, number: int, scale: float) -> list[np.ndarray]:
    """The clip of one family: ``number`` (the clip's place among the eval clips) seeds the draw,
    ``scale`` (face_scale) sizes the ``simple`` blur."""
    if family == "clean":
        return clean
    if family == "simple":
        return simple_degrade(clean, scale)
    preset = "ld-bfr-mild" if family == "mild" else "vqfr"
    return Degradation(preset, seed=[0, number]).degrade_clip(clean, codec="libx264", fps=fps)


def classical(frames: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
    """Non-local-means denoise of each face box (with a margin), then unsharp mask 0.5, sigma 1."""
    out = []
    for f, bs in zip(frames, boxes):
        g = f.copy()
        h, w = f.shape[:2]
        for x1, y1, x2, y2 in bs[:, :4]:
            mx, my = 0.2 * (x2 - x1), 0.2 * (y2 - y1)
            a, b = int(max(x1 - mx, 0)), int(max(y1 - my, 0))
            c, d = int(min(x2 + mx, w)), int(min(y2 + my, h))
            roi = cv2.fastNlMeansDenoisingColored(np.ascontiguousarray(f[b:d, a:c]), None, 6, 6, 7, 21)
            sharp = cv2.addWeighted(roi, 1.5, cv2.GaussianBlur(roi, (0, 0), 1.0), -0.5, 0)
            g[b:d, a:c] = sharp
        out.append(g)
    return out


class Scorer:
    """Metrics of one output clip against the clean clip, over the clean clip's face boxes."""

    def __init__(self, clean, boxes, identity: IdentityModel, every: int):
        self.clean, self.boxes, self.identity, self.every = clean, boxes, identity, every
        h, w = clean[0].shape[:2]
        self.masks = [face_mask(b[:, :4], h, w) for b in boxes]
        self.ref_desc = {(t, k): identity.descriptor(clean[t], b)
                         for t in range(0, len(clean), every) for k, b in enumerate(boxes[t])}

    def __call__(self, out, restored_boxes=None) -> dict:
        flicker, quality = FlickerMeter(warp=True), QualityMeter()
        for c, o, m in zip(self.clean, out, self.masks):
            flicker.update(c, o, m)
            quality.update(c, o, m)
        ids = [self.identity.distance(d, self.identity.descriptor(out[t], self.boxes[t][k]))
               for (t, k), d in self.ref_desc.items()]
        res = {**flicker.result(), **quality.result(), "identity": float(np.mean(ids)) if ids else float("nan")}
        # PSNR of the clip's mean squared error (a per-frame mean is infinite once one frame is untouched)
        res["psnr"] = 10 * np.log10(1 / res["mse"]) if res["mse"] > 0 else float("inf")
        if restored_boxes is not None:  # frames whose clean-clip face was restored
            hit = total = 0
            for gt, got in zip(self.boxes, restored_boxes):
                for b in gt:
                    total += 1
                    hit += bool(len(got)) and float(box_iou(b[None, :4], np.asarray(got)[:, :4]).max()) >= 0.3
            res["restored"] = hit / total if total else float("nan")
        return res


def other_face(all_clips, number: int, size: int, detector) -> np.ndarray:
    """A clean aligned face of another person: the largest face of frame 12 of the eval clip half
    the list away (so no clip meets itself)."""
    from frvideo.faces.align import warp_faces
    frames, _ = read_clip(all_clips[(number + len(all_clips) // 2) % len(all_clips)], 13)
    img = frames[-1]
    d = detector.detect(img)
    big = int(np.argmax(d.boxes[:, 2] - d.boxes[:, 0]))
    return warp_faces(img, similarity_transforms(d.landmarks[big][None], size), size)[0]


def run_model(restorer, detector, frames, fps, opts):
    restored: list[list] = []
    pipe = FacePipeline(restorer, detector, opts, fps,
                        on_faces=lambda i, faces, chosen: restored.append([f.box for f in chosen]))
    t = time.perf_counter()
    out = [to_rgb(f) for f in pipe.process(as_frames(frames, fps))]
    secs = time.perf_counter() - t
    return out, restored, secs / max(pipe.stats.faces, 1), pipe.stats


def mean_psnr(meter_rows, key):
    vals = [r[key] for r in meter_rows if np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["none", "lite", "ented", "ldbfr"])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--clips", nargs="+", default=None)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--detector", default="retinaface-mobile", help="the pipeline's detector")
    ap.add_argument("--truth-detector", default="retinaface-mobile", help="faces of the clean clip")
    ap.add_argument("--identity-every", type=int, default=4)
    ap.add_argument("--strength", default="auto")
    ap.add_argument("--no-keep-detail", action="store_true")
    ap.add_argument("--candidate", action="append", default=[], metavar="LABEL=MODEL:PATH",
                    help="also run MODEL's network with the weight file PATH, reported as LABEL (a training "
                         "run's export before it is shipped)")
    ap.add_argument("--default", action="append", default=[], metavar="LABEL.KEY=VALUE",
                    help="override a card default of one row's model (e.g. lite-v2.max_strength=1.0)")
    ap.add_argument("--gain", type=float, default=0.5,
                    help="the own-model goal: face PSNR above both the input and the classical baseline by "
                         "this many dB on every degraded family, identity distance at most the input's")
    ap.add_argument("--json")
    ap.add_argument("--panels", help="folder for input | output | clean face panels (first clip frame 12)")
    ap.add_argument("--ented-references", action="store_true",
                    help="with ented: also rows with another identity's face as every track's reference "
                         "(a clean face of another eval clip) and with no reference (a flat grey face)")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no run: the tables of earlier runs' --json files together (e.g. one clip per process)")
    args = ap.parse_args()
    if args.merge:
        rows = {}
        for path in args.merge:
            if not Path(path).is_file():
                ap.error(f"--merge: no such file {path} (is its run still going?)")
            for key, rs in json.loads(Path(path).read_text()).items():
                have = rows.setdefault(tuple(key.split("/", 1)), [])
                # runs of other models on the same clips repeat the input and classical rows: once each
                have.extend(r for r in rs if all(h["clip"] != r["clip"] for h in have))
        args.families = [f for f in FAMILIES if (f, "input") in rows]
        args.json = None
        report(rows, args)
        return

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    all_clips = sorted((SHARED / "media" / "videos" / "eval").glob("*.mp4"))
    clips = [c for c in all_clips if c.stem in args.clips] if args.clips else all_clips
    detector = load_detector(args.detector)
    truth = load_detector(args.truth_detector)
    identity = IdentityModel()
    # MODEL@int8: the model's int8 graphs (--precision int8)
    restorers = {m: load_restorer(m.removesuffix("@int8"), dtype=INT8 if m.endswith("@int8") else torch.float32)
                 for m in args.models}
    for spec in args.candidate:
        label, _, target = spec.partition("=")
        model, _, path = target.partition(":")
        if not (label and model and path):
            ap.error(f"--candidate {spec!r}: expected LABEL=MODEL:PATH")
        restorers[label] = load_restorer(model, weights=path)
    for spec in args.default:
        key, _, value = spec.partition("=")
        label, _, name = key.rpartition(".")  # labels may hold dots (lite@1.0), card keys do not
        if label not in restorers or not name or not value:
            ap.error(f"--default {spec!r}: expected LABEL.KEY=VALUE with LABEL one of {', '.join(restorers)}")
        r = restorers[label]
        r.config = dataclasses.replace(r.config, defaults={**r.config.defaults, name: yaml.safe_load(value)})
    strength = None if args.strength == "auto" else float(args.strength)
    opts = PipelineOptions(quiet=True, strength=strength, keep_detail=not args.no_keep_detail)
    rows: dict[tuple[str, str], list[dict]] = {}
    print(f"detector {detector.name}, clean-clip faces by {truth.name}, {args.frames} frames per clip, "
          f"strength {args.strength}", file=sys.stderr)
    for clip in clips:
        clean, fps = read_clip(clip, args.frames)
        boxes = []
        for c in clean:
            d = truth.detect(c)
            boxes.append(np.concatenate([d.boxes, d.landmarks.reshape(-1, 10)], 1) if len(d) else np.zeros((0, 14)))
        big = max((b for b in boxes if len(b)), key=lambda b: (b[0, 2] - b[0, 0]), default=None)
        scale = face_scale(big[0, 4:].reshape(5, 2)) if big is not None else 1.0
        scorer = Scorer(clean, boxes, identity, args.identity_every)
        number = all_clips.index(clip)
        for family in args.families:
            degraded = degrade_family(family, clean, fps, number, scale)
            baseline = classical(degraded, boxes)
            results = {"input": scorer(degraded), "classical": scorer(baseline)}
            runs = [(name, r, opts) for name, r in restorers.items()]
            panel = {"clean": clean, "degraded": degraded}
            for name, r in restorers.items() if args.ented_references else ():
                if r.config.backend != "ented":
                    continue
                size = r.input_size
                runs += [(name + OTHER_IDENTITY, r,
                          dataclasses.replace(opts, reference=other_face(all_clips, number, size, truth),
                                              reference_label="another identity")),
                         (f"{name}, no reference", r,
                          dataclasses.replace(opts, reference=np.full((size, size, 3), 128, np.uint8),
                                              reference_label="flat grey"))]
            for name, r, run_opts in runs:
                out, restored, s_face, stats = run_model(r, detector, degraded, fps, run_opts)
                results[name] = {**scorer(out, restored), "s_face": s_face,
                                 "strength": stats.mean_strength, "bridged": stats.frames_bridged}
                if args.panels and family != "clean" or args.panels and name != "none":
                    save_panel(Path(args.panels), clip.stem, family, name, degraded, out, clean, boxes)
                panel[name] = out
            if args.panels and family != "clean":
                panel["classical"] = baseline
                save_row_panel(Path(args.panels), clip.stem, family, panel, boxes)
            for name, res in results.items():
                rows.setdefault((family, name), []).append({"clip": clip.stem, **res})
                print(f"{clip.stem:<28} {family:<7} {name:<10} PSNR {res['psnr']:6.2f}  SSIM {res['ssim']:.4f}  "
                      f"ID {res['identity']:.3f}  TDC {res['tdc'] * 1e4:7.3f}  Ew {res['warp_error'] * 1e4:7.3f}"
                      + (f"  restored {res['restored']:.3f}  s/face {res['s_face']:.3f}  "
                         f"strength {res['strength']:.2f}" if "restored" in res else ""), file=sys.stderr)
    report(rows, args)


def save_panel(folder: Path, clip: str, family: str, name: str, degraded, out, clean, boxes) -> None:
    t = min(12, len(clean) - 1)
    if not len(boxes[t]):
        return
    a, b, c, d = face_window(boxes, clean, t)
    crops = [cv2.resize(img[b:d, a:c], (384, int(384 * (d - b) / (c - a)))) for img in (degraded[t], out[t], clean[t])]
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{clip}_{family}_{name}.png"), cv2.cvtColor(np.hstack(crops), cv2.COLOR_RGB2BGR))


def face_window(boxes, clean, t: int):
    x1, y1, x2, y2 = boxes[t][0, :4]
    m = 0.15 * (x2 - x1)
    a, b = int(max(x1 - m, 0)), int(max(y1 - m, 0))
    c, d = int(min(x2 + m, clean[t].shape[1])), int(min(y2 + m, clean[t].shape[0]))
    return a, b, c, d


def save_row_panel(folder: Path, clip: str, family: str, frames: dict, boxes) -> None:
    """One picture per clip and family: clean | degraded | each model | classical (frame 12),
    each face labelled."""
    clean = frames["clean"]
    t = min(12, len(clean) - 1)
    if not len(boxes[t]):
        return
    a, b, c, d = face_window(boxes, clean, t)
    tiles = []
    for name, video in frames.items():
        tile = cv2.resize(video[t][b:d, a:c], (256, int(256 * (d - b) / (c - a))), interpolation=cv2.INTER_AREA)
        tile = np.ascontiguousarray(tile)
        cv2.putText(tile, name, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(tile, name, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        tiles.append(tile)
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{clip}_{family}_all.png"), cv2.cvtColor(np.hstack(tiles), cv2.COLOR_RGB2BGR))


def report(rows, args) -> None:
    def avg(vals):
        vals = [v for v in vals if np.isfinite(v)]
        return float(np.mean(vals)) if vals else float("nan")

    lines = []
    for family in args.families:
        lines.append(f"\n**{family}** ({'PSNR = PSNR(output, input)' if family == 'clean' else 'vs the clean clip'}), "
                     f"means over {len(rows[(family, 'input')])} clips\n")
        lines.append("| method | face PSNR | SSIM | identity | TDC 1e-4 | E_warp 1e-4 | restored | s/face | strength |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for (fam, name), rs in rows.items():
            if fam != family:
                continue
            get = lambda k: avg([r.get(k, float("nan")) for r in rs])  # noqa: E731
            lines.append(f"| {name} | {get('psnr'):.2f} | {get('ssim'):.4f} | {get('identity'):.3f} | "
                         f"{get('tdc') * 1e4:.3f} | {get('warp_error') * 1e4:.3f} | "
                         + (f"{get('restored'):.3f} | {get('s_face'):.3f} | {get('strength'):.2f} |"
                            if name not in ("input", "classical") else "– | – | – |"))
    lines.append("\nNo-harm goals per family and model (every clip): PSNR >= input - 0.2 dB, identity <= input + 0.03; "
                 "clean: PSNR(output, input) >= 38 dB\n")
    for (fam, name), rs in rows.items():
        if name in ("input", "classical"):
            continue
        base = {r["clip"]: r for r in rows[(fam, "input")]}
        fails = []
        for r in rs:
            b = base[r["clip"]]
            if fam == "clean":
                if r["psnr"] < 38:
                    fails.append(f"{r['clip']} {r['psnr']:.2f} dB")
            else:
                if r["psnr"] < b["psnr"] - 0.2:
                    fails.append(f"{r['clip']} PSNR {r['psnr'] - b['psnr']:+.2f}")
                if r["identity"] > b["identity"] + 0.03:
                    fails.append(f"{r['clip']} ID {r['identity'] - b['identity']:+.3f}")
        lines.append(f"* {fam} / {name}: " + ("met on every clip" if not fails else "NOT met: " + ", ".join(fails)))
    lines.append(f"\nOwn-model goal per degraded family (means over the clips): face PSNR >= input + {args.gain} dB "
                 f"and >= classical + {args.gain} dB, identity <= input\n")
    def mean(rows_, k):
        return float(np.mean([r[k] for r in rows_]))

    for (fam, name), rs in rows.items():
        if name in ("input", "classical", "none") or fam == "clean":
            continue
        gain_in = mean(rs, "psnr") - mean(rows[(fam, "input")], "psnr")
        gain_cl = mean(rs, "psnr") - mean(rows[(fam, "classical")], "psnr")
        d_id = mean(rs, "identity") - mean(rows[(fam, "input")], "identity")
        met = gain_in >= args.gain and gain_cl >= args.gain and d_id <= 0
        lines.append(f"* {fam} / {name}: {gain_in:+.2f} dB over the input, {gain_cl:+.2f} dB over classical, "
                     f"identity {d_id:+.3f}: {'met' if met else 'NOT met'}")
    for (fam, name), rs in rows.items():
        model = name[:-len(OTHER_IDENTITY)]
        if name.endswith(OTHER_IDENTITY) and (fam, model) in rows:
            diff = mean(rows[(fam, model)], "psnr") - mean(rs, "psnr")
            lines.append(f"* {fam} / {model}: the track's keyframe is {diff:+.2f} dB "
                         f"over another identity's reference (goal >= +0.3)")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{f}/{n}": rs for (f, n), rs in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
