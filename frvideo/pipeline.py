"""The streaming pipeline: decode -> detect+track -> align -> restore -> blend -> encode.

Decoding and encoding run in their own threads, joined to the main thread by
bounded queues, so memory stays flat however long the video is. The main
thread detects and tracks faces frame by frame, queues aligned crops, and runs
the restorer on batches of faces from several frames and tracks. A frame is
handed to the encoder as soon as all its faces are back, always in order.
A frame with no face to restore is passed on as the decoded frame itself.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import av
import cv2
import numpy as np
import torch
from tqdm import tqdm

from .errors import FrvideoError
from .faces.align import similarity_transforms, warp_faces
from .faces.blend import crop_mask, paste_face
from .faces.detect import FaceDetector
from .faces.tracker import FaceTracker, SceneCutDetector, TrackedFace, select_faces
from .io import EncodeOptions, open_reader, open_writer
from .io.frames import from_rgb, to_rgb, to_rgb8
from .io.reader import STDIO, is_url
from .reference import Keyframe, KeyframeSelector
from .restore import RestoreContext, Restorer
from .temporal import FaceFilter, OneEuroLandmarks, TokenSmoother, centered_landmarks

QUEUE_FRAMES = 8  # frames buffered between decode / main / encode threads


@dataclass
class PipelineOptions:
    batch_size: int = 4
    fidelity: Optional[float] = None
    min_face: int = 24  # px, shorter box side; smaller faces carry too little detail to restore
    only_largest: bool = False
    track_ids: Optional[set[int]] = None
    draw: bool = False
    temporal: str = "full"  # off | tokens | full (tokens + restored-face filter)
    temporal_alpha: float = 0.6
    temporal_margin: float = 0.3
    temporal_tau: float = 1.0
    temporal_strength: float = 0.8  # restored-face filter: weight of the past where nothing moved
    temporal_threshold: float = 0.08  # ... and the change in the input face (0-1 units) at which it lets go
    temporal_guide: str = "input"  # ... motion and change measured on the input crops (or "output")
    temporal_flow: bool = True  # ... after warping the previous face onto this one (optical flow)
    smooth_landmarks: bool = True
    lookahead: int = 4  # frames of look-ahead for landmark smoothing; 0 = causal (live)
    quiet: bool = False
    allow_damaged: bool = False
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    # diffusion backends (LD-BFR): sampling steps (None = the card's) and fresh noise per frame
    # instead of noise locked per track (only to measure what the locking buys)
    steps: Optional[int] = None
    fresh_noise: bool = False
    # reference-based backends (restorer.needs_reference) only:
    reference: Optional[np.ndarray] = None  # a fixed aligned reference face for every track (else keyframes)
    reference_label: str = "reference image"  # how the summary names that fixed reference
    reference_prepare: Optional[Callable[[np.ndarray], np.ndarray]] = None  # e.g. restore it with another backend


@dataclass
class FaceJob:
    face: TrackedFace
    transform: np.ndarray
    crop: np.ndarray
    frame_index: int
    restored: Optional[np.ndarray] = None
    reference: Optional[Keyframe] = None  # reference-based backends: the track's keyframe


@dataclass
class PendingFrame:
    index: int
    frame: av.VideoFrame
    rgb: Optional[np.ndarray] = None  # only for frames with faces
    chosen: list[TrackedFace] = field(default_factory=list)  # faces to restore
    jobs: list[FaceJob] = field(default_factory=list)
    faces: list[TrackedFace] = field(default_factory=list)  # all tracked (for --draw)

    @property
    def ready(self) -> bool:
        return all(j.restored is not None for j in self.jobs)


@dataclass
class RunStats:
    frames: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    tracks: int = 0
    seconds: float = 0.0
    references: list[str] = field(default_factory=list)  # reference-based backends: keyframe per track

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


# -- threads ----------------------------------------------------------------------

_END = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _producer(iterable, q: queue.Queue, stop: threading.Event) -> None:
    try:
        for item in iterable:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        q.put(_END)
    except BaseException as exc:  # re-raised in the main thread
        q.put(_Failure(exc))


def _threaded(iterable, stop: threading.Event, maxsize: int = QUEUE_FRAMES) -> Iterator:
    q: queue.Queue = queue.Queue(maxsize=maxsize)
    threading.Thread(target=_producer, args=(iterable, q, stop), daemon=True, name="frvideo-decode").start()
    while True:
        item = q.get()
        if item is _END:
            return
        if isinstance(item, _Failure):
            raise item.exc
        yield item


class _EncoderThread:
    def __init__(self, writer):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=QUEUE_FRAMES)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="frvideo-encode")
        self.thread.start()

    def _run(self) -> None:
        while True:
            frame = self.q.get()
            if frame is _END:
                return
            if self.error is None:
                try:
                    self.writer.write(frame)
                except BaseException as exc:
                    self.error = exc

    def put(self, frame: av.VideoFrame) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(frame)

    def close(self) -> None:
        self.q.put(_END)
        self.thread.join()
        if self.error is not None:
            raise self.error


# -- tensors ----------------------------------------------------------------------

def crops_to_tensor(crops: np.ndarray, device, dtype) -> torch.Tensor:
    """N x S x S x 3 uint8/uint16 RGB -> N x 3 x S x S in [-1, 1]."""
    scale = 255.0 if crops.dtype == np.uint8 else 65535.0
    t = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float()
    return (t / scale * 2.0 - 1.0).to(dtype)


def tensor_to_crops(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """N x 3 x S x S in [-1, 1] (clamped here, as the official scripts do) -> uint8/uint16."""
    scale = 255.0 if dtype == np.uint8 else 65535.0
    t = ((t.float().clamp(-1, 1) + 1.0) / 2.0 * scale).round()
    return t.permute(0, 2, 3, 1).cpu().numpy().astype(dtype)


# -- the pipeline -----------------------------------------------------------------

class FacePipeline:
    """Restores the faces of a stream of frames (any iterable of av.VideoFrame)."""

    def __init__(self, restorer: Restorer, detector: FaceDetector, options: PipelineOptions, fps: float = 25.0):
        self.restorer = restorer
        self.detector = detector
        self.opts = options
        self.size = restorer.input_size
        self.mask = crop_mask(self.size)
        self.tracker = FaceTracker()
        self.scene_cut = SceneCutDetector()
        if options.temporal not in ("off", "tokens", "full"):
            raise ValueError(f"temporal must be off, tokens or full, not {options.temporal!r}")
        self.smoother = TokenSmoother(options.temporal_alpha, options.temporal_margin, options.temporal_tau) \
            if options.temporal in ("tokens", "full") and restorer.has_codebook else None
        self.face_filter = FaceFilter(options.temporal_strength, options.temporal_threshold,
                                      options.temporal_guide, options.temporal_flow) \
            if options.temporal == "full" else None
        self.lookahead = options.lookahead if options.smooth_landmarks else 0
        self.one_euro = OneEuroLandmarks(fps) if options.smooth_landmarks and self.lookahead == 0 else None
        self.history: dict[int, deque] = {}  # track id -> raw landmarks of the last frames
        self.stats = RunStats()
        self._track_ids: set[int] = set()
        self.keyframes = KeyframeSelector(fixed=options.reference, fixed_label=options.reference_label,
                                          prepare=options.reference_prepare) if restorer.needs_reference else None

    # one frame in: detection and tracking
    def _detect(self, index: int, frame: av.VideoFrame) -> PendingFrame:
        rgb = to_rgb(frame)
        rgb8 = to_rgb8(rgb)
        if self.scene_cut(rgb8):
            self.tracker.reset()
            if self.smoother is not None:
                self.smoother.reset()
            if self.face_filter is not None:
                self.face_filter.reset()
            if self.one_euro is not None:
                self.one_euro.reset()
        tracked = self.tracker.update(self.detector.detect(rgb8))
        chosen = select_faces(tracked, self.opts.min_face, self.opts.only_largest, self.opts.track_ids)
        pending = PendingFrame(index, frame, chosen=chosen, faces=tracked)
        if chosen or (self.opts.draw and tracked):
            pending.rgb = rgb
        return pending

    def _smoothed_landmarks(self, face: TrackedFace, future: list[PendingFrame]) -> np.ndarray:
        if self.one_euro is not None:
            return self.one_euro(face.track_id, face.landmarks, face.new_track)
        if self.lookahead == 0:
            return face.landmarks
        if face.new_track:
            self.history.pop(face.track_id, None)
        past = self.history.setdefault(face.track_id, deque(maxlen=self.lookahead))
        ahead = [f.landmarks for p in future for f in p.faces if f.track_id == face.track_id and not f.new_track]
        out = centered_landmarks(list(past), face.landmarks, ahead, sigma_frames=self.lookahead / 2)
        past.append(face.landmarks)
        return out

    def _lookahead_candidates(self, track_id: int, future: list[PendingFrame]) -> list:
        """The track's faces in the look-ahead frames, aligned on their raw landmarks: keyframe
        candidates for the track's first reference (called once per track, at its start)."""
        out = []
        for q in future:
            face = next((f for f in q.chosen if f.track_id == track_id), None)
            if face is None:
                continue
            if face.new_track:  # the id starts another track there
                break
            crop = warp_faces(q.rgb, similarity_transforms(face.landmarks[None], self.size), self.size)[0]
            out.append((q.index, crop, face.landmarks, face.score))
        return out

    # alignment, once the look-ahead frames of this one are known
    def _align(self, p: PendingFrame, future: list[PendingFrame]) -> None:
        if not p.chosen:
            return
        landmarks = np.stack([self._smoothed_landmarks(f, future) for f in p.chosen])
        transforms = similarity_transforms(landmarks, self.size)
        crops = warp_faces(p.rgb, transforms, self.size)
        p.jobs = [FaceJob(f, A, c, p.index) for f, A, c in zip(p.chosen, transforms, crops)]
        if self.keyframes is not None:
            for j in p.jobs:
                j.reference = self.keyframes.update(
                    j.face.track_id, p.index, j.crop, j.face.landmarks, j.face.score, j.face.new_track,
                    ahead=lambda tid=j.face.track_id: self._lookahead_candidates(tid, future))
        self.stats.frames_with_faces += 1
        self.stats.faces += len(p.chosen)
        self._track_ids.update(f.track_id for f in p.chosen)
        if len(self.history) > 4 * len(self.tracker.tracks) + 16:  # forget ended tracks
            live = {t.id for t in self.tracker.tracks}
            self.history = {k: v for k, v in self.history.items() if k in live}
        self._forget_ended_tracks()

    def _forget_ended_tracks(self) -> None:
        """Drop the token/face-filter state of tracks the tracker has dropped. Without this it
        piled up to the stores' 256-track caps (~2 MB a track with lite), so RSS grew by
        hundreds of MB over a long video with many faces coming and going (bench/soak.py)."""
        live = {t.id for t in self.tracker.tracks}
        keep = self.opts.batch_size  # fewer faces than a batch wait: at most that many ended tracks need theirs
        for store in (self.smoother, self.face_filter):
            if store is None or len(store.tracks) <= len(live) + keep:
                continue
            ended = [tid for tid in store.tracks if tid not in live]  # oldest use first
            for tid in ended[:len(ended) - keep]:
                if hasattr(store, "_end"):
                    store._end(tid)  # TokenSmoother: keeps the track's flip count for its statistics
                else:
                    store.tracks.pop(tid, None)

    @torch.inference_mode()
    def _restore(self, jobs: list[FaceJob]) -> None:
        r = self.restorer
        faces = crops_to_tensor(np.stack([j.crop for j in jobs]), r.device, r.dtype)
        tracks = [j.face.track_id for j in jobs]
        # stochastic backends draw their noise from a per-track seed: a still face stays still
        ctx = RestoreContext(tracks, [j.frame_index for j in jobs], self.opts.fidelity,
                             noise_seeds=None if self.opts.fresh_noise else [1000003 * t + 12345 for t in tracks],
                             steps=self.opts.steps)
        if self.keyframes is not None:
            for ref in {id(j.reference): j.reference for j in jobs}.values():
                if ref.tensor is None:  # once per keyframe, not once per face
                    ref.tensor = crops_to_tensor(ref.crop[None], r.device, r.dtype)
            ctx.references = torch.cat([j.reference.tensor for j in jobs])
            ctx.reference_ids = [j.reference.ref_id for j in jobs]
        new_track = [j.face.new_track for j in jobs]
        if r.has_codebook:
            encoded = r.encode(faces, ctx)
            if self.smoother is not None:
                tokens = self.smoother.choose(encoded.scores, ctx.track_ids, new_track)
            else:
                tokens = encoded.scores.argmax(-1)
            out = r.decode(encoded, tokens, ctx)
        else:
            out = r.restore(faces, ctx)
        if self.face_filter is not None:
            out = self.face_filter(out, ctx.track_ids, new_track, inputs=faces)
        for job, crop in zip(jobs, tensor_to_crops(out, jobs[0].crop.dtype)):
            job.restored = crop

    def _finish(self, p: PendingFrame) -> av.VideoFrame:
        if p.rgb is None:
            return p.frame  # no face: the decoded frame itself, bit for bit
        rgb = p.rgb.copy()
        rois = [roi for j in p.jobs if (roi := paste_face(rgb, j.restored, j.transform, self.mask))]
        if self.opts.draw:
            rois.append((0, 0, rgb.shape[1], rgb.shape[0]))
            draw_faces(rgb, p.faces)
        return from_rgb(p.frame, rgb, rois)

    def process(self, frames, on_frame: Optional[Callable[[int], None]] = None) -> Iterator[av.VideoFrame]:
        window: deque[PendingFrame] = deque()  # detected, waiting for look-ahead
        pending: deque[PendingFrame] = deque()  # aligned, waiting for restoration
        waiting: list[FaceJob] = []
        start = time.perf_counter()

        def advance(flush: bool) -> Iterator[av.VideoFrame]:
            nonlocal waiting
            while window and (flush or len(window) > self.lookahead):
                p = window.popleft()
                self._align(p, list(window))
                pending.append(p)
                waiting.extend(p.jobs)
                if len(waiting) >= self.opts.batch_size:
                    self._restore(waiting)
                    waiting = []
            if flush and waiting:
                self._restore(waiting)
                waiting = []
            while pending and pending[0].ready:
                yield self._finish(pending.popleft())
                self.stats.frames += 1
                if on_frame:
                    on_frame(self.stats.faces)

        for index, frame in enumerate(frames):
            window.append(self._detect(index, frame))
            yield from advance(flush=False)
        yield from advance(flush=True)
        self.stats.seconds = time.perf_counter() - start
        self.stats.tracks = len(self._track_ids)
        if self.keyframes is not None:
            self.stats.references = self.keyframes.summary()


def draw_faces(rgb: np.ndarray, faces: list[TrackedFace]) -> None:
    """--draw: boxes, 5 landmarks and track ids, scaled to the frame size."""
    peak = 255 if rgb.dtype == np.uint8 else 65535
    thick = max(1, round(min(rgb.shape[:2]) / 360))
    colors = [(peak, 0, 0), (0, peak, 0), (0, 0, peak), (peak, peak, 0), (0, peak, peak)]
    for f in faces:
        color = colors[f.track_id % len(colors)]
        x1, y1, x2, y2 = [int(round(v)) for v in f.box]
        cv2.rectangle(rgb, (x1, y1), (x2, y2), color, thick)
        for x, y in f.landmarks:
            cv2.circle(rgb, (int(round(x)), int(round(y))), thick + 1, (peak, peak, peak), -1)
        cv2.putText(rgb, f"#{f.track_id} {f.score:.2f}", (x1, max(y1 - 4 * thick, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5 * thick, color, thick, cv2.LINE_AA)


def run_file(source: str, target: str, restorer: Restorer, detector: FaceDetector, options: PipelineOptions,
             model_note: str = "") -> RunStats:
    """Whole job: open, stream every frame through, publish the output atomically."""
    reader = open_reader(source, options.allow_damaged)
    copy_from = source if source != STDIO and not is_url(source) else None
    writer = open_writer(target, reader.info, options.encode, copy_from=copy_from)
    pipeline = FacePipeline(restorer, detector, options, float(reader.info.average_rate or 25))
    stop = threading.Event()
    total = reader.info.frames or None
    bar = tqdm(total=total, unit="frame", disable=options.quiet or target == STDIO and not sys.stderr.isatty(),
               desc=model_note or "frvideo", dynamic_ncols=True, file=sys.stderr)
    encoder = _EncoderThread(writer)
    ok = False
    try:
        last = [0.0]

        def progress(faces: int) -> None:
            bar.update(1)
            now = time.perf_counter()
            if now - last[0] > 0.5:
                bar.set_postfix(faces=faces, refresh=False)
                last[0] = now

        for out_frame in pipeline.process(_threaded(reader, stop), progress):
            encoder.put(out_frame)
        encoder.close()
        writer.finish()
        ok = True
    finally:
        stop.set()
        bar.close()
        if not ok:
            try:
                encoder.close()
            except BaseException:
                pass
            writer.abort()
        reader.close()
    return pipeline.stats
