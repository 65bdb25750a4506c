"""The streaming pipeline: decode -> detect+track -> align -> restore -> blend -> encode.

Decoding and encoding run in their own threads, joined to the main thread by
bounded queues, so memory stays flat however long the video is. A detection
thread finds the faces of the next few frames while the main thread tracks
faces frame by frame, queues aligned crops, and runs
the restorer on batches of faces from several frames and tracks. A frame is
handed to the encoder as soon as all its faces are back, always in order.

Nothing around the restorer alters a pixel the restorer did not change: what
is pasted back is the change to the input crop (``faces/detail.py`` decides how
much of the restoration to keep), added to the decoded samples
(``io.frames.add_rgb_deltas``). A frame with no face, or whose faces came back
unchanged, is passed on as the decoded frame itself.

A track the detector misses for up to ``bridge`` frames stays restored: the
frames of the gap wait in the look-ahead window until the face is found again
and get landmarks interpolated between the detections on both sides; without
look-ahead (causal runs) the face is predicted from its last motion instead.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import av
import cv2
import numpy as np
import torch
from tqdm import tqdm

from .film import GRAY_MAX_FRAMES, GrainMatcher, frame_mask, looks_black_and_white
from .faces.align import similarity_transforms, warp_faces
from .faces.blend import change_to_frame, outline_mask
from .faces.detail import BlendSettings, FaceBlend
from .faces.detect import FaceDetector
from .faces.tracker import FaceTracker, SceneCutDetector, TrackedFace, select_faces
from .io import EncodeOptions, open_reader, open_writer
from .io.frames import _LUMA_WEIGHTS, add_rgb_deltas, from_rgb, matrix_and_range, to_rgb, to_rgb8
from .io.reader import STDIO, InputOptions
from .reference import Keyframe, KeyframeSelector
from .restore import RestoreContext, Restorer
from .temporal import FaceFilter, OneEuroLandmarks, TokenSmoother, centered_landmarks

QUEUE_FRAMES = 8  # frames buffered between decode / main / encode threads
DETECT_AHEAD = 4  # frames the detection thread may run ahead of tracking and restoration


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
    # a track missed by the detector for up to this many frames stays restored (0: never bridge;
    # None: BRIDGE_INTERPOLATED, or BRIDGE_PREDICTED for causal runs)
    bridge: Optional[int] = None
    strength: Optional[float] = None  # how much of the restoration to keep; None = auto per face
    keep_detail: bool = True  # keep the input's band wherever the restoration has less signal
    quiet: bool = False
    allow_damaged: bool = False
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    input: InputOptions = field(default_factory=InputOptions)  # --input-format/-option/-timeout
    # diffusion backends (LD-BFR): sampling steps (None = the card's) and fresh noise per frame
    # instead of noise locked per track (only to measure what the locking buys)
    steps: Optional[int] = None
    fresh_noise: bool = False
    # reference-based backends (restorer.needs_reference) only:
    reference: Optional[np.ndarray] = None  # a fixed aligned reference face for every track (else keyframes)
    reference_label: str = "reference image"  # how the summary names that fixed reference
    reference_prepare: Optional[Callable[[np.ndarray], np.ndarray]] = None  # e.g. restore it with another backend
    # film (frvideo/film.py, io/masters.py): black and white restored on luma only (None: detected
    # from the first frames), grain matched around each face ("match") or not ("off"),
    # deinterlacing before detection (files: run_file)
    gray: Optional[bool] = None
    grain: str = "off"
    deinterlace: bool = False


@dataclass
class FaceJob:
    face: TrackedFace
    transform: np.ndarray
    crop: Optional[np.ndarray]  # aligned input face; None for a paste-only job (live: nothing restored from it)
    frame_index: int
    mask: np.ndarray  # crop-space blend mask (the face outline)
    done: bool = False
    change: Optional[np.ndarray] = None  # S x S x 3 float32 change to the input crop; None = unchanged
    strength: float = 0.0
    reference: Optional[Keyframe] = None  # reference-based backends: the track's keyframe


@dataclass
class PendingFrame:
    index: int
    frame: av.VideoFrame
    rgb: Optional[np.ndarray] = None  # while the frame is in the look-ahead window
    chosen: list[TrackedFace] = field(default_factory=list)  # faces to restore
    jobs: list[FaceJob] = field(default_factory=list)
    faces: list[TrackedFace] = field(default_factory=list)  # all tracked, detected and bridged

    @property
    def ready(self) -> bool:
        return all(j.done for j in self.jobs)


@dataclass
class RunStats:
    frames: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    tracks: int = 0
    frames_bridged: int = 0  # frames with a face filled in between detections (or predicted)
    faces_bridged: int = 0
    faces_changed: int = 0  # faces the restoration actually changed
    strength_sum: float = 0.0  # of the faces restored (mean = strength_sum / faces)
    seconds: float = 0.0
    input_ended: Optional[str] = None  # a network input that ended by silence or hang-up: why
    references: list[str] = field(default_factory=list)  # reference-based backends: keyframe per track
    # wall seconds of the main thread per stage (detect = colour conversion, scene cut, detector,
    # tracker; align; model; filter = temporal face filter; blend; paste = back into the frame)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    gray: Optional[bool] = None  # restored on luma only (black and white)
    gray_detected: bool = False  # ... decided from the first frames (not --gray/--no-gray)
    grain_faces: int = 0  # faces that got grain (--grain match)
    grain_sum: float = 0.0  # sum of the std of the grain they got (0-1 units)

    def timed(self, stage: str):
        return _StageTimer(self.stage_seconds, stage)

    @property
    def mean_strength(self) -> float:
        return self.strength_sum / self.faces if self.faces else 0.0

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


class _StageTimer:
    def __init__(self, into: dict, stage: str):
        self.into, self.stage = into, stage

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.into[self.stage] = self.into.get(self.stage, 0.0) + time.perf_counter() - self.t


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


# --bridge's defaults (bench/bridge.py, bench/README.md "Bridging gaps"): the longest gaps whose
# bridged landmarks stay, at the 95th percentile over every gap on the eval clips, within 0.1 of
# the inter-ocular distance of RetinaFace's, about what the embedded detector's own detections
# reach on frontal faces: interpolated between detections (files) 8 frames, predicted from the
# last motion (causal runs) 3
BRIDGE_INTERPOLATED = 8
BRIDGE_PREDICTED = 3


def continued_face(face: TrackedFace, velocity: Optional[np.ndarray], steps: int) -> TrackedFace:
    """Where a face last seen ``steps`` frames ago is predicted now (bridged): its last landmark
    motion per frame, halving each frame (a damped continuation: a face rarely keeps moving
    straight)."""
    drift = np.zeros((5, 2)) if velocity is None else velocity * 2 * (1 - 0.5 ** steps)
    return TrackedFace(face.track_id, face.box + np.tile(drift.mean(0), 2), face.landmarks + drift,
                       face.score, bridged=True)


def bridge_frames(bridge: Optional[int], lookahead: int) -> int:
    """--bridge as a run uses it: the option, or its default for a file (look-ahead) or causal run."""
    if bridge is not None:
        return bridge
    return BRIDGE_PREDICTED if lookahead == 0 else BRIDGE_INTERPOLATED


def interpolate_face(a: TrackedFace, b: TrackedFace, t: float) -> TrackedFace:
    """The face of a's track at fraction t of the way from detection a to detection b."""
    return TrackedFace(a.track_id, (1 - t) * a.box + t * b.box, (1 - t) * a.landmarks + t * b.landmarks,
                       min(a.score, b.score), bridged=True)


# -- the pipeline -----------------------------------------------------------------

class FacePipeline:
    """Restores the faces of a stream of frames (any iterable of av.VideoFrame)."""

    def __init__(self, restorer: Restorer, detector: FaceDetector, options: PipelineOptions, fps: float = 25.0,
                 on_faces: Optional[Callable[[int, list[TrackedFace], list[TrackedFace]], None]] = None):
        self.restorer = restorer
        self.detector = detector
        self.opts = options
        self.size = restorer.input_size
        # causal runs (--lookahead 0) hold no frame back; files wait long enough to bridge a gap
        self.causal = options.lookahead == 0
        self.bridge = bridge_frames(options.bridge, options.lookahead)
        self.tracker = FaceTracker(max_missed=max(self.bridge, 1))
        self.scene_cut = SceneCutDetector()
        if options.temporal not in ("off", "tokens", "full"):
            raise ValueError(f"temporal must be off, tokens or full, not {options.temporal!r}")
        self.smoother = TokenSmoother(options.temporal_alpha, options.temporal_margin, options.temporal_tau) \
            if options.temporal in ("tokens", "full") and restorer.has_codebook else None
        self.face_filter = FaceFilter(options.temporal_strength, options.temporal_threshold,
                                      options.temporal_guide, options.temporal_flow) \
            if options.temporal == "full" else None
        self.blend = FaceBlend(self.size, BlendSettings(
            strength=options.strength, keep_detail=options.keep_detail,
            max_strength=restorer.max_strength))
        self.lookahead = options.lookahead if options.smooth_landmarks else 0
        self.window_len = 0 if self.causal else max(self.lookahead, self.bridge)
        self.one_euro = OneEuroLandmarks(fps) if options.smooth_landmarks and self.causal else None
        self.history: dict[int, deque] = {}  # track id -> raw landmarks of the last frames
        self.last_detected: dict[int, tuple[PendingFrame, TrackedFace]] = {}  # track id -> its last detection
        self.window: deque[PendingFrame] = deque()  # detected, waiting for look-ahead (and gaps to close)
        self.on_faces = on_faces
        # a driver that restores in another thread (live.py) forgets ended tracks there instead
        self.forget_in_align = True
        self.stats = RunStats()
        self._track_ids: set[int] = set()
        self.keyframes = KeyframeSelector(fixed=options.reference, fixed_label=options.reference_label,
                                          prepare=options.reference_prepare) if restorer.needs_reference else None
        if options.grain not in ("off", "match"):
            raise ValueError(f"grain must be off or match, not {options.grain!r}")
        self.luma_only = options.gray  # None: decided on the first frames (process)
        self.grain = GrainMatcher() if options.grain == "match" else None

    # one frame in: detection, tracking, bridging
    def _find_faces(self, frame: av.VideoFrame):
        """The per-frame work that needs no state: runs in the detection thread."""
        rgb = to_rgb(frame)
        rgb8 = to_rgb8(rgb)
        return frame, rgb, rgb8, self.detector.detect(rgb8)

    def _detected_ahead(self, frames) -> Iterator[tuple]:
        """Frames with their faces found, in order. Detection (colour conversion included) runs in
        a thread of its own up to DETECT_AHEAD frames ahead, so the detector works on frame t+k
        while the restorer works on the faces of frame t (torch and OpenCV release the GIL). Only
        the stateless part runs there; tracking stays on the main thread, in frame order.
        Causal runs (live streams, the Filter API) hand each frame on as soon as it is done, so
        they detect in line: reading ahead would hold frames back for the frames after them."""
        if self.causal:
            for frame in frames:
                with self.stats.timed("detect"):
                    found = self._find_faces(frame)
                yield found
            return
        ahead: deque = deque()
        worker = ThreadPoolExecutor(1, thread_name_prefix="frvideo-detect")
        try:
            for frame in frames:
                ahead.append(worker.submit(self._find_faces, frame))
                if len(ahead) > DETECT_AHEAD:
                    with self.stats.timed("detect"):  # the main thread's wait for the detector
                        yield ahead.popleft().result()
            while ahead:
                with self.stats.timed("detect"):
                    yield ahead.popleft().result()
        finally:
            for future in ahead:
                future.cancel()
            worker.shutdown(wait=True)

    def _detect(self, index: int, found: tuple) -> PendingFrame:
        frame, rgb, rgb8, detections = found
        self._check_scene_cut(rgb8)
        tracked = self.tracker.update(detections)
        pending = PendingFrame(index, frame, rgb=rgb, faces=list(tracked))
        for face in tracked:
            if face.gap and not face.new_track:
                self._fill_gap(face, index)
            self.last_detected[face.track_id] = (pending, face)
        if self.causal and self.bridge:
            pending.faces += self._predicted(index)
        return pending

    def _check_scene_cut(self, rgb8: np.ndarray) -> bool:
        """A cut (in frame order): every track, smoothing and filter state starts over."""
        if not self.scene_cut(rgb8):
            return False
        self.tracker.reset()
        self.last_detected.clear()
        if self.smoother is not None:
            self.smoother.reset()
        if self.face_filter is not None:
            self.face_filter.reset()
        if self.one_euro is not None:
            self.one_euro.reset()
        return True

    def _fill_gap(self, face: TrackedFace, index: int) -> None:
        """The track was missed for ``face.gap`` frames before ``index``: give each frame of the
        gap still in the window the face interpolated between the detections on both sides."""
        last = self.last_detected.get(face.track_id)
        if last is None:
            return
        before = last[1]
        start = index - face.gap - 1  # frame of the previous detection
        for q in self.window:
            if start < q.index < index and not any(f.track_id == face.track_id for f in q.faces):
                q.faces.append(interpolate_face(before, face, (q.index - start) / (index - start)))

    def _predicted(self, index: int) -> list[TrackedFace]:
        """Causal bridging: tracks missed in this frame (within ``bridge`` frames of their last
        detection, seen at least 3 times) continue along their last landmark motion, slowing down."""
        out = []
        for t in self.tracker.missing():
            last = self.last_detected.get(t.id)
            if last is None or t.hits < 3:
                continue
            out.append(continued_face(last[1], t.velocity, index - t.last_frame))
        return out

    def _smoothed_landmarks(self, face: TrackedFace, future: list[PendingFrame]) -> np.ndarray:
        if self.one_euro is not None:
            return self.one_euro(face.track_id, face.landmarks, face.new_track)
        if self.lookahead == 0:
            return face.landmarks
        if face.new_track:
            self.history.pop(face.track_id, None)
        past = self.history.setdefault(face.track_id, deque(maxlen=self.lookahead))
        ahead = [f.landmarks for p in future[:self.lookahead] for f in p.faces
                 if f.track_id == face.track_id and not f.new_track]
        out = centered_landmarks(list(past), face.landmarks, ahead, sigma_frames=self.lookahead / 2)
        past.append(face.landmarks)
        return out

    def _lookahead_candidates(self, track_id: int, future: list[PendingFrame]) -> list:
        """The track's detected faces in the look-ahead frames, aligned on their raw landmarks:
        keyframe candidates for the track's first reference (called once per track, at its start)."""
        out = []
        for q in future:
            face = next((f for f in q.faces if f.track_id == track_id), None)
            if face is None or face.bridged:
                continue
            if face.new_track:  # the id starts another track there
                break
            crop = warp_faces(q.rgb, similarity_transforms(face.landmarks[None], self.size), self.size)[0]
            out.append((q.index, crop, face.landmarks, face.score))
        return out

    def _jobs(self, p: PendingFrame, landmarks: np.ndarray, with_crops: bool) -> list[FaceJob]:
        """One job per chosen face: its transform into the crop and its blend mask, and (to be
        restored) its aligned crop."""
        transforms = similarity_transforms(landmarks, self.size)
        crops = warp_faces(p.rgb, transforms, self.size) if with_crops else [None] * len(transforms)
        in_crop = np.einsum("nij,nkj->nki", transforms[:, :, :2], landmarks) + transforms[:, None, :, 2]
        return [FaceJob(f, A, c, p.index, outline_mask(lm, self.size))
                for f, A, c, lm in zip(p.chosen, transforms, crops, in_crop)]

    def paste_only(self, p: PendingFrame, faces: list[TrackedFace]) -> None:
        """Causal drivers (live.py) whose detection is late for frame ``p``: ``faces`` (predicted
        from their tracks' motion) get jobs that can only take a change carried from their track's
        last restoration (transform and mask, no crop: nothing is restored from this frame). The
        landmarks go through the same smoothing as detected ones, in frame order."""
        p.faces = faces
        p.chosen = select_faces(faces, self.opts.min_face, self.opts.only_largest, self.opts.track_ids)
        if p.chosen:
            p.jobs = self._jobs(p, np.stack([self._smoothed_landmarks(f, []) for f in p.chosen]), with_crops=False)

    # alignment, once the look-ahead frames of this one are known
    def _align(self, p: PendingFrame, future: list[PendingFrame]) -> None:
        p.chosen = select_faces(p.faces, self.opts.min_face, self.opts.only_largest, self.opts.track_ids)
        if not p.chosen:
            return
        landmarks = np.stack([self._smoothed_landmarks(f, future) for f in p.chosen])
        p.jobs = self._jobs(p, landmarks, with_crops=True)
        if self.keyframes is not None:
            for j in p.jobs:
                j.reference = self.keyframes.update(
                    j.face.track_id, p.index, j.crop, j.face.landmarks, 0.0 if j.face.bridged else j.face.score,
                    j.face.new_track, ahead=lambda tid=j.face.track_id: self._lookahead_candidates(tid, future))
        self.stats.frames_with_faces += 1
        self.stats.faces += len(p.chosen)
        bridged = sum(f.bridged for f in p.chosen)
        self.stats.faces_bridged += bridged
        self.stats.frames_bridged += bridged > 0
        self._track_ids.update(f.track_id for f in p.chosen)
        if len(self.history) > 4 * len(self.tracker.tracks) + 16:  # forget ended tracks
            live = {t.id for t in self.tracker.tracks}
            self.history = {k: v for k, v in self.history.items() if k in live}
            self.last_detected = {k: v for k, v in self.last_detected.items() if k in live}
        if self.forget_in_align:
            self._forget_ended_tracks()

    def _forget_ended_tracks(self) -> None:
        """Drop the token/face-filter state of tracks the tracker has dropped. Without this it
        piled up to the stores' 256-track caps (~2 MB a track with lite), so RSS grew by
        hundreds of MB over a long video with many faces coming and going (bench/soak.py)."""
        live = {t.id for t in self.tracker.tracks}
        # faces still waiting (a batch, the look-ahead window) may belong to ended tracks: keep that many
        keep = self.opts.batch_size + self.window_len
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
        with self.stats.timed("model"):
            out = self._run_model(faces, ctx, new_track)
        out = out.float().clamp(-1, 1)  # as the official scripts clamp
        faces = faces.float()
        if torch.equal(out, faces):  # nothing restored (``none``, or a model that gave the input back)
            for job in jobs:
                job.strength, job.change, job.done = 0.0, None, True
            return
        if self.face_filter is not None:
            with self.stats.timed("filter"):
                out = self.face_filter(out, ctx.track_ids, new_track, inputs=faces)
        with self.stats.timed("blend"):
            self._blend(jobs, faces, out)

    def _run_model(self, faces: torch.Tensor, ctx: RestoreContext, new_track: list[bool]) -> torch.Tensor:
        r = self.restorer
        if r.has_codebook:
            encoded = r.encode(faces, ctx)
            if self.smoother is not None:
                tokens = self.smoother.choose(encoded.scores, ctx.track_ids, new_track)
            else:
                tokens = encoded.scores.argmax(-1)
            out = r.decode(encoded, tokens, ctx)
        else:
            out = r.restore(faces, ctx)
        return out

    def _blend(self, jobs: list[FaceJob], faces: torch.Tensor, out: torch.Tensor) -> None:
        masks = torch.from_numpy(np.stack([j.mask for j in jobs]))[:, None].to(out.device)
        change, strength, _ = self.blend(faces, out, masks)
        # a change under half a step of the frame's samples changes nothing: skip the paste
        step = 0.5 / (255.0 if jobs[0].crop.dtype == np.uint8 else 65535.0)
        change = (change * masks).permute(0, 2, 3, 1).cpu().numpy()
        for job, c, s in zip(jobs, change, strength.tolist()):
            job.strength = s
            job.change = c if float(np.abs(c).max()) >= step else None
            job.done = True
            self.stats.strength_sum += s
            self.stats.faces_changed += job.change is not None

    def _finish(self, p: PendingFrame) -> av.VideoFrame:
        if self.on_faces is not None:
            self.on_faces(p.index, p.faces, p.chosen)
        hw = p.frame.height, p.frame.width
        deltas = [(j, d) for j in p.jobs if j.change is not None
                  and (d := change_to_frame(j.change, j.mask, j.transform, hw)) is not None]
        if self.grain is not None and deltas:
            deltas = self._add_grain(p, deltas)
        # no change: the decoded frame itself, bit for bit; black and white: chroma as decoded
        frame = add_rgb_deltas(p.frame, [d for _, d in deltas], luma_only=bool(self.luma_only))
        if self.opts.draw and p.faces:
            rgb = to_rgb(frame)
            draw_faces(rgb, p.faces)
            frame = from_rgb(frame, rgb, [(0, 0, rgb.shape[1], rgb.shape[0])])
        p.rgb = None
        return frame

    def _add_grain(self, p: PendingFrame, deltas: list) -> list:
        """--grain match: each restored face gets the film grain measured around it (film.py)."""
        self.grain.kr, self.grain.kb = _LUMA_WEIGHTS.get(matrix_and_range(p.frame)[0], (0.299, 0.114))
        out = []
        with self.stats.timed("grain"):
            for job, (x0, y0, d) in deltas:
                mask = frame_mask(job.mask, job.transform, (p.frame.height, p.frame.width))
                if mask is not None and mask.shape == d.shape[:2]:
                    d = self.grain.apply(p.rgb, x0, y0, d, mask, job.face.track_id, p.index, job.face.new_track)
                    if self.grain.last_added > 0:
                        self.stats.grain_faces += 1
                        self.stats.grain_sum += self.grain.last_added
                out.append((job, (x0, y0, d)))
        return out

    def _decide_gray(self, frames) -> Iterator[av.VideoFrame]:
        """Black and white or colour, from the first frames (held back, then passed on)."""
        frames = iter(frames)
        # a causal (live) run holds nothing back: it judges the first frame alone
        head = list(itertools.islice(frames, 1 if self.causal else GRAY_MAX_FRAMES))
        self.luma_only, _ = looks_black_and_white(head)
        self.stats.gray_detected = True
        return itertools.chain(head, frames)

    def process(self, frames, on_frame: Optional[Callable[[int], None]] = None) -> Iterator[av.VideoFrame]:
        if self.luma_only is None:
            frames = self._decide_gray(frames)
        self.stats.gray = bool(self.luma_only)
        window = self.window
        pending: deque[PendingFrame] = deque()  # aligned, waiting for restoration
        waiting: list[FaceJob] = []
        start = time.perf_counter()

        def advance(flush: bool) -> Iterator[av.VideoFrame]:
            nonlocal waiting
            while window and (flush or len(window) > self.window_len):
                p = window.popleft()
                with self.stats.timed("align"):
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
                with self.stats.timed("paste"):
                    out = self._finish(pending.popleft())
                yield out
                self.stats.frames += 1
                if on_frame:
                    on_frame(self.stats.faces)

        for index, found in enumerate(self._detected_ahead(frames)):
            with self.stats.timed("track"):
                window.append(self._detect(index, found))
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
        cv2.putText(rgb, f"#{f.track_id} " + ("bridged" if f.bridged else f"{f.score:.2f}"), (x1, max(y1 - 4 * thick, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.5 * thick, color, thick, cv2.LINE_AA)


@dataclass
class FrameSpan:
    """The part of a file one run restores (``frvideo batch`` cuts long files into segments at
    keyframes). Frames with ``start_pts <= pts < end_pts`` (end None: to the end) are encoded.
    The frames from ``warm_pts`` up to ``start_pts`` and ``tail`` frames after ``end_pts`` go
    through the pipeline too, their output dropped: the temporal state (tracks, token and face
    filters) is warmed up on the frames just before the segment, and its last frames get their
    look-ahead, so a segment joins the next without a seam and a resumed run equals a whole one.
    Decoding starts at the keyframe at ``seek_pts`` (``seek_frame`` frames into the stream)."""
    start_pts: Optional[int]  # None: from the first frame
    end_pts: Optional[int]
    warm_pts: Optional[int]
    seek_pts: int
    seek_frame: int
    tail: int
    fed_pts: list = field(default_factory=list)  # pts of each frame handed to the pipeline, in order

    def frames(self, reader) -> Iterator[av.VideoFrame]:
        after = 0
        for frame in reader:
            if self.warm_pts is not None and frame.pts < self.warm_pts:
                continue  # decoded from the keyframe before the warm-up: not needed
            if self.end_pts is not None and frame.pts >= self.end_pts:
                if after >= self.tail:
                    return
                after += 1
            self.fed_pts.append(frame.pts)
            yield frame

    def keeps(self, frame: av.VideoFrame) -> bool:
        return (self.start_pts is None or frame.pts >= self.start_pts) and \
            (self.end_pts is None or frame.pts < self.end_pts)


def run_file(source: str, target: str, restorer: Restorer, detector: FaceDetector, options: PipelineOptions,
             model_note: str = "", faces_log: Optional[str] = None, span: Optional[FrameSpan] = None,
             on_faces: Optional[Callable[[int, list[TrackedFace], list[TrackedFace]], None]] = None) -> RunStats:
    """Whole job: open, stream every frame through, publish the output (and the ``faces_log``
    JSON lines, see faces/facelog.py) atomically. With ``span`` only that part of the file is
    written, video only (the batch runner joins the segments and copies the other streams);
    ``on_faces`` sees every frame's faces as the face log does (its index: the frame's place in
    what the pipeline was fed)."""
    from .faces.facelog import FaceLogWriter

    reader = open_reader(source, options.allow_damaged, options.input)
    # a file's other streams are read again by the writer; a stream's are kept by the reader; a
    # segment of a batch gets its audio when the segments are joined
    copy_from = None if span is not None else reader if reader.single_pass else source
    info, frames = reader.info, reader
    if span is not None:  # a batch segment: decoding from the keyframe before its warm-up
        if span.seek_frame:
            reader.seek(span.seek_pts, span.seek_frame)
        frames = span.frames(reader)
    if options.deinterlace:  # one frame per frame, same timestamps; the output is progressive
        from .io.masters import FIELD_PROGRESSIVE, deinterlaced
        if info.field_order == FIELD_PROGRESSIVE:
            print(f"frvideo: warning: {source} is flagged progressive; deinterlacing it anyway (--deinterlace)",
                  file=sys.stderr)
        frames = deinterlaced(frames, info.field_order, info.time_base)
        info = dataclasses.replace(info, field_order=FIELD_PROGRESSIVE)
    try:
        writer = open_writer(target, info, options.encode, copy_from=copy_from)
    except BaseException:
        reader.close()
        raise
    log = FaceLogWriter(faces_log) if faces_log else None
    callbacks = [c for c in (log, on_faces) if c is not None]
    pipeline = FacePipeline(restorer, detector, options, float(reader.info.average_rate or 25),
                            on_faces=(lambda *a: [c(*a) for c in callbacks]) if callbacks else None)
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

        for out_frame in pipeline.process(_threaded(frames, stop), progress):
            if span is None or span.keeps(out_frame):
                encoder.put(out_frame)
        encoder.close()
        writer.finish()
        if log is not None:
            log.finish()
        pipeline.stats.input_ended = reader.ended_by
        ok = True
    finally:
        stop.set()
        bar.close()
        if not ok:
            abandon_outputs(encoder, writer, log)
        reader.close()
    return pipeline.stats


def abandon_outputs(encoder, writer, log) -> None:
    """A run that failed or was stopped: stop the encoder thread, remove the partial output and
    face log (the writer and the log know their partial files)."""
    try:
        encoder.close()
    except BaseException:  # already failing: the first error is the one to report
        pass
    writer.abort()
    if log is not None:
        log.abort()
