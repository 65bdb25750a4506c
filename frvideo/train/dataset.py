"""Aligned face crops for training and evaluation: ``frvideo dataset`` and
:class:`FaceCropDataset`.

Building (``frvideo dataset SRC... --out DIR``)
------------------------------------------------
SRC may be video files, image files or folders of them (searched recursively;
the kind is decided by the file extension, hidden files are skipped).

* Videos: every N-th decoded frame (``--every``, default 2) is kept; the
  tracker sees each kept frame (so ``max_missed`` counts kept frames) and is
  reset on a scene cut. Each face is aligned with the 5-point similarity to
  the FFHQ template at ``--size`` (the crop the restorers see). With
  ``--lookahead K`` the landmarks are first smoothed per track over the K kept
  frames before and after (``temporal.centered_landmarks``, as the restoration
  pipeline does), for crops that stay put when the head does.
* Images: each detected face is aligned the same way. Images under a folder
  named ``cropped_faces`` or ``gray_faces``, or all images with ``--aligned``,
  are already-aligned square crops: they are only resized.

Source lists (``--source-list FILE``, with or instead of SRC): a JSON-lines
file, one object per input: ``path`` (absolute, or relative to the list's
folder), optional ``identity`` (the person: copied into every crop's index
entry, so that splits can keep a person on one side) and ``origin`` (where the
file came from, e.g. ``owner/repo``), optional ``label`` (the index's
``source`` for it instead of the relative path; unique), optional ``kind``
``aligned``. A list is
how a corpus of many repositories is built with one labelled index
(``frvideo.train.corpus`` writes them).

With ``--main-face-only`` only the largest face of each image is kept: in an
identity-labelled photo (LFW and the like) that is the labelled person, and
the others would carry a wrong identity. Videos are tracked as usual.

Filters (videos and images alike; the reasons are counted in the summary):

* ``--min-face PX`` (default 96): the shorter side of the detector box. A
  smaller face would be upsampled > 5x into a 512 crop: no detail to learn.
* ``--min-sharpness V`` (default 10): variance of the Laplacian of the grey
  crop, measured on the face region of the aligned crop (rows 30-85 %, columns
  25-75 %, so a blurred studio background does not count), at the output
  ``--size`` (the default is calibrated for 512). Measured on this project's
  media at 512 (every 2nd frame of the 11 training clips, 1436 faces): per
  clip medians 5-42, overall median 14. Clips whose crops score 5-7
  (lp_d11, lp_d12, lp_d20) are visibly soft at 1:1 - compression blocking,
  upsampled or beauty-filtered skin - while from ~10 up eye, lash and lip
  edges are crisp; CodeFormer's low-quality ``cropped_faces`` inputs score
  2-4. 10 keeps about two thirds of the video faces. 0 turns the filter off
  (evaluation sets that must keep every frame).

Output layout::

    DIR/shard_00000/000000.png ... (at most --shard-size files per folder)
    DIR/index.jsonl                one JSON object per crop

Index entry keys: ``file`` (relative to DIR), ``source`` (the input path
relative to the common folder of all inputs: unique), ``kind`` (video, image,
aligned), ``frame`` (decoded frame index in the source, 0 for images),
``time`` (seconds, videos), ``track`` ("<source>:<id>", unique across sources;
each face of an image is its own track), ``box`` (x1 y1 x2 y2 in the upright
frame), ``landmarks`` (5 x 2, the ones the crop was aligned with),
``affine`` (2 x 3, frame -> crop), ``frame_size`` (W, H), ``score``,
``sharpness``, ``size``, ``face_px`` (shorter side of the detector box, or of
the image for aligned crops: how much real detail the crop has),
``pad_fraction`` (share of the crop outside the source frame, filled by
reflection; ``--max-pad F`` rejects crops above F), and, from a
source list, ``identity`` and ``origin``. The PNGs are written as the run goes; the index is
written once at the end (temp file + rename), so a directory without
``index.jsonl`` is an unfinished build; a failed or interrupted run removes
its shard folders.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import cv2
import numpy as np

from ..argtypes import number
from ..errors import InputError, OutputError, UsageError

__all__ = ["dataset_main", "build_dataset", "BuildOptions", "FaceCropDataset", "sharpness", "pad_fraction",
           "VIDEO_EXTENSIONS", "IMAGE_EXTENSIONS", "ALIGNED_FOLDERS"]

VIDEO_EXTENSIONS = {".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi", ".nut", ".ts", ".mts", ".m2ts", ".y4m",
                    ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".mxf", ".ogv"}
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
ALIGNED_FOLDERS = {"cropped_faces", "gray_faces"}
INDEX = "index.jsonl"

DEFAULT_MIN_FACE = 96
DEFAULT_MIN_SHARPNESS = 10.0


# -- small helpers ------------------------------------------------------------------


def sharpness(crop_rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey face region of an aligned crop."""
    h, w = crop_rgb.shape[:2]
    face = crop_rgb[int(0.30 * h):int(0.85 * h), int(0.25 * w):int(0.75 * w)]
    grey = cv2.cvtColor(np.ascontiguousarray(face), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def pad_fraction(affine, size: int, frame_size) -> float:
    """Share of an aligned crop that lies outside its source frame (filled by reflection when
    warping): 0 for a face well inside the picture, ~0.6 for a tight 200 px face chip. Measured on a
    32 x 32 grid of crop pixels mapped back into the frame."""
    A = np.vstack([np.asarray(affine, np.float64).reshape(2, 3), [0.0, 0.0, 1.0]])
    g = (np.arange(32) + 0.5) / 32 * size
    xs, ys = np.meshgrid(g, g)
    p = np.linalg.inv(A) @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    w, h = frame_size
    inside = (p[0] >= 0) & (p[0] < w) & (p[1] >= 0) & (p[1] < h)
    return float(1.0 - inside.mean())


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_CUBIC
    return cv2.resize(image, (size, size), interpolation=interp)


def read_image_rgb(path: Path) -> np.ndarray:
    """Any image OpenCV reads, as 8-bit RGB (alpha dropped, grey expanded)."""
    data = np.fromfile(str(path), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None  # 8-bit BGR whatever the file
    if image is None:
        raise InputError(f"cannot read {path} as an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _labels(source) -> dict:
    """The identity/origin index keys of a source, where its source list gave them."""
    return {k: v for k, v in (("identity", source.identity), ("origin", source.origin)) if v is not None}


def _round(a, nd: int = 2) -> list:
    return np.round(np.asarray(a, np.float64), nd).tolist()


# -- sources ------------------------------------------------------------------------


@dataclass
class Source:
    path: Path
    kind: str  # "video" | "image" | "aligned"
    label: str = ""
    identity: Optional[str] = None
    origin: Optional[str] = None


def _kind_of(path: Path, aligned: bool) -> Optional[str]:
    ext = path.suffix.lower()
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in IMAGE_EXTENSIONS:
        return "aligned" if aligned or any(p in ALIGNED_FOLDERS for p in path.parent.parts) else "image"
    return None


def read_source_list(path: str | Path) -> list[Source]:
    """The inputs named by a ``--source-list`` file (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"source list not found: {path}")
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{n} is not valid JSON") from None
            if not isinstance(e, dict) or not isinstance(e.get("path"), str):
                raise InputError(f"{path}:{n} has no \"path\"")
            file = Path(e["path"])
            file = file if file.is_absolute() else path.parent / file
            kind = "aligned" if e.get("kind") == "aligned" else _kind_of(file, False)
            if kind is None:
                raise InputError(f"{path}:{n}: {file} is neither a video nor an image (by its extension)")
            if not file.is_file():
                raise InputError(f"{path}:{n}: input not found: {file}")
            ident, origin = e.get("identity"), e.get("origin")
            out.append(Source(file.resolve(), kind, label=str(e.get("label") or ""),
                              identity=None if ident is None else str(ident),
                              origin=None if origin is None else str(origin)))
    if not out:
        raise InputError(f"source list {path} names no inputs")
    return out


def collect_sources(srcs: Sequence[str], aligned: bool = False, source_list: Optional[str | Path] = None
                    ) -> list[Source]:
    """Files to read, in a stable order, each with a unique label (its path
    relative to the common folder of all inputs)."""
    if not srcs and source_list is None:
        raise UsageError("no SRC given (video files, image files or folders of them)")
    found: list[Source] = []
    seen: set[Path] = set()
    if source_list is not None:
        for s in read_source_list(source_list):
            if s.path not in seen:
                seen.add(s.path)
                found.append(s)
    for src in srcs:
        path = Path(src)
        if not path.exists():
            raise InputError(f"input not found: {src}")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
            kept = [(p, _kind_of(p, aligned)) for p in files]
            kept = [(p, k) for p, k in kept if k is not None]
            if not kept:
                raise InputError(f"no videos or images found in {src} (extensions: "
                                 f"{' '.join(sorted(VIDEO_EXTENSIONS | IMAGE_EXTENSIONS))})")
        else:
            kind = _kind_of(path, aligned)
            if kind is None:
                raise InputError(f"{src} is neither a video nor an image (by its extension {path.suffix or 'none'})")
            if not os.access(path, os.R_OK):
                raise InputError(f"input is not readable (permission denied): {src}")
            kept = [(path, kind)]
        for p, k in kept:
            r = p.resolve()
            if r not in seen:
                seen.add(r)
                found.append(Source(r, k))
    root = Path(os.path.commonpath([s.path.parent for s in found]))
    for s in found:
        s.label = s.label or s.path.relative_to(root).as_posix()
    labels = Counter(s.label for s in found)
    twice = [label for label, n in labels.items() if n > 1]
    if twice:
        raise InputError(f"source label {twice[0]!r} is given to more than one input (labels must be unique)")
    return found


# -- writing ------------------------------------------------------------------------


class ShardWriter:
    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.count = 0
        self.shards: list[Path] = []

    def write(self, crop_rgb: np.ndarray) -> str:
        shard = self.out / f"shard_{self.count // self.shard_size:05d}"
        if not self.shards or self.shards[-1] != shard:
            shard.mkdir(exist_ok=True)
            self.shards.append(shard)
        path = shard / f"{self.count:06d}.png"
        ok, buf = cv2.imencode(".png", cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2BGR))
        try:
            if not ok:
                raise OSError("PNG encoding failed")
            buf.tofile(str(path))
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.count += 1
        return path.relative_to(self.out).as_posix()

    def remove(self) -> None:
        for shard in self.shards:
            shutil.rmtree(shard, ignore_errors=True)


@dataclass
class BuildOptions:
    size: int = 512
    every: int = 2
    min_face: float = DEFAULT_MIN_FACE
    min_sharpness: float = DEFAULT_MIN_SHARPNESS
    max_pad: float = 1.0
    shard_size: int = 256
    aligned: bool = False
    lookahead: int = 0
    ignore_damage: bool = False
    main_face_only: bool = False
    quiet: bool = False


@dataclass
class BuildStats:
    videos: int = 0
    images: int = 0
    aligned: int = 0
    frames_decoded: int = 0
    frames_sampled: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    kept: int = 0
    small: int = 0
    blurry: int = 0
    padded: int = 0
    no_face_images: int = 0
    tracks: set = field(default_factory=set)
    seconds: float = 0.0

    def summary(self, out: Path) -> str:
        rejected = self.small + self.blurry + self.padded
        return (f"frvideo dataset: {self.videos} videos, {self.images} images, {self.aligned} aligned crops; "
                f"{self.frames_decoded} frames decoded, {self.frames_sampled} sampled "
                f"({self.frames_with_faces} with faces); {self.faces} faces: {self.kept} kept in "
                f"{len(self.tracks)} tracks, {rejected} rejected ({self.small} smaller than the minimum face, "
                f"{self.blurry} below the sharpness minimum, {self.padded} over the padding maximum); "
                f"{self.no_face_images} images without a face; "
                f"{self.seconds:.1f} s -> {out}")


class _Builder:
    def __init__(self, out: Path, detector, opts: BuildOptions):
        self.out, self.detector, self.opts = out, detector, opts
        self.writer = ShardWriter(out, opts.shard_size)
        self.entries: list[dict] = []
        self.stats = BuildStats()

    def _keep(self, crop: np.ndarray, box, entry: dict, check_size: bool = True) -> None:
        self.stats.faces += 1
        if check_size and min(box[2] - box[0], box[3] - box[1]) < self.opts.min_face:
            self.stats.small += 1
            return
        pad = pad_fraction(entry["affine"], self.opts.size, entry["frame_size"]) if entry["kind"] != "aligned" else 0.0
        if pad > self.opts.max_pad:
            self.stats.padded += 1
            return
        sharp = sharpness(crop)
        if sharp < self.opts.min_sharpness:
            self.stats.blurry += 1
            return
        entry["file"] = self.writer.write(crop)
        entry["sharpness"] = round(sharp, 2)
        entry["size"] = self.opts.size
        entry["face_px"] = round(float(min(box[2] - box[0], box[3] - box[1])), 1)
        entry["pad_fraction"] = round(pad, 3)
        self.entries.append(dict(sorted(entry.items())))
        self.stats.kept += 1
        self.stats.tracks.add(entry["track"])

    def _faces(self, source: Source, rgb: np.ndarray, frame: int, faces, landmarks, extra: dict) -> None:
        """Align and filter the faces of one frame (or image)."""
        from ..faces.align import similarity_transforms, warp_faces

        if not faces:
            return
        transforms = similarity_transforms(np.stack(landmarks), self.opts.size)
        crops = warp_faces(rgb, transforms, self.opts.size)
        h, w = rgb.shape[:2]
        for (tid, box, score), lm, A, crop in zip(faces, landmarks, transforms, crops):
            entry = dict(source=source.label, kind=source.kind, frame=frame, track=f"{source.label}:{tid}",
                         box=_round(box), landmarks=_round(lm), affine=_round(A, 5), frame_size=[w, h],
                         score=round(float(score), 4), **extra, **_labels(source))
            self._keep(crop, box, entry)

    def image(self, source: Source) -> None:
        rgb = read_image_rgb(source.path)
        if source.kind == "aligned":
            self.stats.aligned += 1
            from ..faces.align import template
            h, w = rgb.shape[:2]
            crop = _resize(rgb, self.opts.size)
            lm = template(self.opts.size) * np.array([w, h]) / self.opts.size
            A = np.array([[self.opts.size / w, 0, 0], [0, self.opts.size / h, 0]])
            entry = dict(source=source.label, kind="aligned", frame=0, track=f"{source.label}:0",
                         box=[0.0, 0.0, float(w), float(h)], landmarks=_round(lm), affine=_round(A, 5),
                         frame_size=[w, h], score=1.0, **_labels(source))
            self._keep(crop, entry["box"], entry, check_size=False)
            return
        self.stats.images += 1
        dets = self.detector.detect(rgb)
        if len(dets) == 0:
            self.stats.no_face_images += 1
            return
        keep = range(len(dets))
        if self.opts.main_face_only:
            areas = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
            keep = [int(np.argmax(areas))]
        faces = [(i, dets.boxes[i], dets.scores[i]) for i in keep]
        self._faces(source, rgb, 0, faces, [dets.landmarks[i] for i in keep], {})

    def video(self, source: Source) -> None:
        from ..faces.tracker import FaceTracker, SceneCutDetector
        from ..io.frames import to_rgb, to_rgb8
        from ..io.reader import open_reader
        from ..temporal import centered_landmarks

        self.stats.videos += 1
        tracker, cut = FaceTracker(), SceneCutDetector()
        k = self.opts.lookahead
        window: deque = deque()  # (frame index, time, rgb, tracked faces) awaiting their look-ahead
        history: dict[int, deque] = {}

        def flush_one() -> None:
            index, t, rgb, faces = window.popleft()
            landmarks = []
            for f in faces:
                if k == 0:
                    landmarks.append(f.landmarks)
                    continue
                if f.new_track:
                    history.pop(f.track_id, None)
                past = history.setdefault(f.track_id, deque(maxlen=k))
                ahead = [g.landmarks for p in window for g in p[3] if g.track_id == f.track_id and not g.new_track]
                landmarks.append(centered_landmarks(list(past), f.landmarks, ahead, sigma_frames=k / 2))
                past.append(f.landmarks)
            if faces:
                self.stats.frames_with_faces += 1
            self._faces(source, rgb, index, [(f.track_id, f.box, f.score) for f in faces], landmarks,
                        {"time": round(t, 4)} if t is not None else {})
            if len(history) > 4 * len(tracker.tracks) + 16:
                live = {tr.id for tr in tracker.tracks}
                for tid in [t for t in history if t not in live]:
                    del history[tid]

        with open_reader(str(source.path), allow_damaged=self.opts.ignore_damage) as reader:
            for index, frame in enumerate(reader):
                self.stats.frames_decoded += 1
                if index % self.opts.every:
                    continue
                self.stats.frames_sampled += 1
                rgb = to_rgb8(to_rgb(frame))
                turns = int(round((frame.rotation or 0) / 90.0)) % 4 if hasattr(frame, "rotation") else 0
                if turns:  # store upright, as players show it
                    rgb = np.ascontiguousarray(np.rot90(rgb, turns))
                if cut(rgb):
                    tracker.reset()
                faces = tracker.update(self.detector.detect(rgb))
                t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else None
                window.append((index, t, rgb, faces))
                while len(window) > k:
                    flush_one()
        while window:
            flush_one()

    def write_index(self) -> Path:
        path = self.out / INDEX
        tmp = self.out / f".{INDEX}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as f:
                for e in self.entries:
                    f.write(json.dumps(e, separators=(",", ":")) + "\n")
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        return path


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.is_dir():
        old = [p for p in out.iterdir() if p.name == INDEX or p.name.startswith("shard_")]
        if old and not overwrite:
            raise OutputError(f"{out} already holds a dataset; pass --overwrite to replace it")
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"{out} is not writable")


def build_dataset(srcs: Sequence[str], out: str | Path, detector, opts: BuildOptions,
                  overwrite: bool = False, source_list: Optional[str | Path] = None) -> BuildStats:
    """Build ``out`` from ``srcs`` (and/or a source list) with a loaded detector (None is fine when all
    inputs are aligned)."""
    start = time.perf_counter()
    sources = collect_sources(srcs, opts.aligned, source_list)
    if detector is None and any(s.kind != "aligned" for s in sources):
        raise UsageError("a face detector is needed for videos and uncropped images")
    out = Path(out)
    _prepare_out(out, overwrite)
    builder = _Builder(out, detector, opts)
    bar = None
    if not opts.quiet:
        from tqdm import tqdm
        bar = tqdm(total=len(sources), unit="src", desc="frvideo dataset", file=sys.stderr, leave=False)
    try:
        for s in sources:
            if bar is not None:
                bar.set_postfix_str(s.label[-40:], refresh=False)
            builder.video(s) if s.kind == "video" else builder.image(s)
            if bar is not None:
                bar.update()
        builder.write_index()
    except BaseException:
        builder.writer.remove()
        raise
    finally:
        if bar is not None:
            bar.close()
    builder.stats.seconds = time.perf_counter() - start
    return builder.stats


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `frvideo dataset --help`)")


_positive = number(int, 1)
_non_negative = number(float, 0.0)


def dataset_main(argv: list[str]) -> int:
    """``frvideo dataset SRC... --out DIR [options]``."""
    p = _Parser(prog="frvideo dataset",
                description="Build a folder of aligned face crops (PNG shards + index.jsonl) from videos, images "
                            "and folders of them, for training and evaluation.")
    p.add_argument("src", nargs="*", metavar="SRC", help="video or image files, or folders of them (recursive)")
    p.add_argument("--source-list", metavar="FILE",
                   help="JSON-lines file of inputs: path, optional identity, origin, kind (see the module doc)")
    p.add_argument("--main-face-only", action="store_true",
                   help="keep only the largest face of each image (identity-labelled photos)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--size", type=_positive, default=512, help="crop size in pixels (default 512)")
    p.add_argument("--every", type=_positive, default=2, help="keep every N-th video frame (default 2)")
    p.add_argument("--min-face", type=_non_negative, default=DEFAULT_MIN_FACE, metavar="PX",
                   help=f"smallest detector box side to keep (default {DEFAULT_MIN_FACE})")
    p.add_argument("--min-sharpness", type=_non_negative, default=DEFAULT_MIN_SHARPNESS, metavar="V",
                   help=f"smallest Laplacian variance of the face region of the crop (default "
                        f"{DEFAULT_MIN_SHARPNESS:g}, calibrated at --size 512; 0: keep all)")
    p.add_argument("--max-pad", type=_non_negative, default=1.0, metavar="F",
                   help="largest share of a crop outside the source frame (mirror-filled) to keep "
                        "(default 1: keep all; 0.25 keeps crops whose border is mostly real picture)")
    p.add_argument("--lookahead", type=int, default=0, metavar="K",
                   help="smooth landmarks per track over K kept frames each side before aligning (default 0)")
    p.add_argument("--aligned", action="store_true",
                   help="all images are already-aligned square crops: resize only "
                        "(automatic under folders named cropped_faces or gray_faces)")
    p.add_argument("--shard-size", type=_positive, default=256, help="PNG files per shard folder (default 256)")
    p.add_argument("--detector", default="auto", help="face detector (default auto)")
    p.add_argument("--detector-weights", metavar="PATH", help="weight file for the detector")
    p.add_argument("--detect-size", type=int, help="shrink frames to this longer side for detection (0: full)")
    p.add_argument("--device", default="cpu", help="device for the detector (default cpu)")
    p.add_argument("--ignore-damage", action="store_true", help="keep the readable part of a damaged video")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.lookahead < 0:
        raise UsageError("--lookahead must be >= 0")
    opts = BuildOptions(size=args.size, every=args.every, min_face=args.min_face, min_sharpness=args.min_sharpness,
                        max_pad=args.max_pad,
                        shard_size=args.shard_size, aligned=args.aligned, lookahead=args.lookahead,
                        ignore_damage=args.ignore_damage, main_face_only=args.main_face_only, quiet=args.quiet)
    sources = collect_sources(args.src, args.aligned, args.source_list)  # bad SRC fails before the detector loads
    detector = None
    if any(s.kind != "aligned" for s in sources):
        from ..faces.detect import load_detector
        detector = load_detector(args.detector, args.detector_weights, args.device, args.detect_size)
    stats = build_dataset(args.src, args.out, detector, opts, overwrite=args.overwrite, source_list=args.source_list)
    print(stats.summary(Path(args.out)))
    return 0


# -- reading ------------------------------------------------------------------------


def read_index(root: Path) -> list[dict]:
    path = Path(root) / INDEX
    if not path.is_file():
        raise InputError(f"{path} not found: build the dataset with `frvideo dataset SRC... --out {root}`")
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}:{n} is not valid JSON") from None
            if not isinstance(e, dict) or not {"file", "source", "track"} <= e.keys():
                raise InputError(f"{path}:{n} lacks file/source/track")
            entries.append(e)
    return entries


try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover - torch is a dependency
    _TorchDataset = object


class FaceCropDataset(_TorchDataset):
    """The crops of a built dataset, as dicts: ``image`` (H x W x 3 uint8 RGB,
    resized to ``size`` when given), ``track``, ``source``, ``frame``, ``index``
    (position in this dataset; what :meth:`tracks` lists)."""

    def __init__(self, root: str | Path, size: Optional[int] = None, entries: Optional[list[dict]] = None):
        self.root = Path(root)
        self.size = size
        self.entries = read_index(self.root) if entries is None else list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def entry(self, i: int) -> dict:
        return self.entries[i]

    def load(self, i: int) -> np.ndarray:
        path = self.root / self.entries[i]["file"]
        if not path.is_file():
            raise InputError(f"{path} listed in {self.root / INDEX} is missing")
        image = read_image_rgb(path)
        return _resize(image, self.size) if self.size else image

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        e = self.entries[i]
        return {"image": self.load(i), "track": e["track"], "source": e["source"], "frame": int(e.get("frame", 0)),
                "index": i}

    def tracks(self) -> dict[str, list[int]]:
        """track -> indices of its crops, in frame order."""
        out: dict[str, list[int]] = defaultdict(list)
        for i in sorted(range(len(self)), key=lambda i: (self.entries[i]["track"], self.entries[i].get("frame", 0))):
            out[self.entries[i]["track"]].append(i)
        return dict(out)

    def sources(self, by: str = "source") -> dict[str, list[int]]:
        """``by`` value -> indices. ``by="identity"`` groups by the person where the index names one
        (built from a source list), else by source."""
        if by not in ("source", "identity"):
            raise UsageError(f"cannot group crops by {by!r} (source or identity)")
        out: dict[str, list[int]] = defaultdict(list)
        for i, e in enumerate(self.entries):
            key = e.get("identity") if by == "identity" else None
            out[f"identity:{key}" if key is not None else e["source"]].append(i)
        return dict(out)

    def subset(self, indices: Iterable[int]) -> "FaceCropDataset":
        return FaceCropDataset(self.root, self.size, [self.entries[i] for i in indices])

    def split(self, eval_fraction: float = 0.1, seed: int = 0, by: str = "source"
              ) -> tuple["FaceCropDataset", "FaceCropDataset"]:
        """(train, eval) by source: every crop of a clip or image lands on the same side
        (``by="identity"``: every crop of a person, see :meth:`sources`).

        Sources are shuffled with ``seed``; each in turn goes to eval when that
        brings eval's share of the crops closer to ``eval_fraction`` (a clip of
        hundreds of crops is skipped rather than overshoot a small target).
        With two or more sources and a fraction in (0, 1) both sides get at
        least one source.
        """
        if not 0.0 <= eval_fraction <= 1.0:
            raise UsageError(f"eval fraction {eval_fraction} is not in [0, 1]")
        by_source = self.sources(by)
        names = sorted(by_source)
        random.Random(seed).shuffle(names)
        if eval_fraction == 0.0:
            eval_names = []
        elif eval_fraction == 1.0:
            eval_names = names
        else:
            target = eval_fraction * len(self)
            eval_names, count = [], 0
            for name in names:
                n = len(by_source[name])
                if len(eval_names) < len(names) - 1 and abs(count + n - target) < abs(count - target):
                    eval_names.append(name)
                    count += n
            if not eval_names and len(names) > 1:
                eval_names = [min(names, key=lambda name: abs(len(by_source[name]) - target))]
        ev = sorted(i for name in eval_names for i in by_source[name])
        chosen = set(ev)
        train = [i for i in range(len(self.entries)) if i not in chosen]
        return self.subset(train), self.subset(ev)
