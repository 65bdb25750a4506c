"""``--live``: a stream in, the same stream out on time; faces restored as far as the machine keeps up.

A driver around the one FacePipeline (no second pipeline): a detection thread
takes each frame as it arrives, detects and aligns its faces (causal: no
look-ahead, landmarks by the One-Euro filter, keyframes from the frames seen so
far) and queues the faces for a restoration worker thread; the main thread only
hands frames to the encoder, on time. Every frame has a deadline,
its arrival plus ``--max-latency`` (less the time pasting and encoding take).
Frames leave in order, each as soon as its faces are back or at its deadline,
whichever comes first: a face whose restoration is not back by then gets the
change the last restoration of its track made, warped onto the face's current
landmarks ("carried"); a face whose track has no restoration yet (or none in
the last ``CARRY_SECONDS``) goes out as it came ("passed through"). No frame
waits longer, none is dropped, none is reordered, and its timestamps stay.

The worker takes the oldest waiting frame it can still finish before that
frame's deadline (from the time its last restorations took) and skips older
ones, which then leave at once with carried faces; a restoration that comes
back after its frame left still updates what its track carries. When even
detection falls behind (a frame would be late before its detection is done),
the frame is not detected: each track seen lately continues along its last
motion for up to ``--bridge`` frames (the causal bridge's prediction, in video
frames) and takes its carried change there ("predicted"); a frame with no such
track is passed through undetected.

A file or pipe input is paced at its timestamps (as ``ffmpeg -re`` does), so a
recording stands in for a camera; network inputs and devices arrive in real
time by themselves. Added latency is measured per frame from its arrival
(decoded and due) to the encoder having taken it.
"""
from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .faces.tracker import TrackedFace
from .pipeline import (FacePipeline, abandon_outputs, PendingFrame, PipelineOptions, RunStats, _EncoderThread, _END, _Failure,
                       _producer, continued_face)

CARRY_SECONDS = 2.0  # a track's last restoration is carried onto later frames for at most this long
EMA = 0.3  # weight of the newest measurement in the running time estimates


@dataclass
class LiveOptions:
    max_latency: float = 0.2  # seconds a frame may spend in frvideo (--max-latency, in ms on the command line)
    stats_interval: float = 5.0  # seconds between stats lines on stderr; 0 = none
    pace: Optional[bool] = None  # None: pace files and pipes at their timestamps, not network streams or devices
    quiet: bool = False


@dataclass
class LiveStats:
    frames_in: int = 0
    frames_out: int = 0
    fresh: int = 0  # frames whose faces all came back restored in time
    carried: int = 0  # frames with at least one face carried from its track's last restoration
    raw: int = 0  # frames with faces that went out unrestored (no restoration to carry, or late)
    late: int = 0  # ... of them: frames passed through undetected because detection itself was behind
    predicted: int = 0  # carried frames not detected (detection behind): faces at their tracks' predicted place
    no_face: int = 0
    latencies: list = field(default_factory=list)  # seconds, per frame out
    # per frame out, in order: F fresh, C carried, P carried onto predicted faces (detection late),
    # R passed through, L undetected (late), N no face
    kinds: bytearray = field(default_factory=bytearray)
    seconds: float = 0.0

    @property
    def with_faces(self) -> int:
        return self.fresh + self.carried + self.raw

    def latency_ms(self, q: float, since: int = 0) -> float:
        values = self.latencies[since:]
        return float(np.percentile(values, q)) * 1000 if values else 0.0

    def fractions(self) -> tuple[float, float, float]:
        n = self.with_faces or 1
        return self.fresh / n, self.carried / n, self.raw / n


def describe(s: LiveStats, seconds: float, since: Optional[LiveStats] = None) -> str:
    """One stats line: frames in/out and their rate, frames with faces fresh/carried/passed
    through, added latency p50/p95 (over the interval since ``since``, else the whole run)."""
    base = since or LiveStats()
    d_in, d_out = s.frames_in - base.frames_in, s.frames_out - base.frames_out
    fresh, carried, raw = s.fresh - base.fresh, s.carried - base.carried, s.raw - base.raw
    faces = fresh + carried + raw
    pct = (lambda n: f" ({100 * n / faces:.0f}%)") if faces else (lambda n: "")
    rate = (lambda n: f"{n / seconds:.1f} fps") if seconds > 0 else (lambda n: "- fps")
    late, predicted = s.late - base.late, s.predicted - base.predicted
    return (f"{d_in} frames in ({rate(d_in)}), {d_out} out ({rate(d_out)}); faces {fresh} fresh{pct(fresh)}, "
            f"{carried} carried{pct(carried)}"
            + (f" (of them {predicted} undetected, faces predicted: detection late)" if predicted else "")
            + f", {raw} passed through{pct(raw)}"
            + (f" (of them {late} undetected: detection late)" if late else "")
            + f", {s.no_face - base.no_face} frames without faces"
            + f"; added latency p50 {s.latency_ms(50, base.frames_out):.0f} ms, "
              f"p95 {s.latency_ms(95, base.frames_out):.0f} ms")


@dataclass
class _Slot:
    """A frame between arrival and leaving."""

    pending: PendingFrame
    arrival: float
    deadline: float
    # arrived (waits for detection), detecting, queued (faces wait for the worker), running, done,
    # skipped (its faces will be carried), none (no face), late (passed through undetected),
    # predicted (not detected: faces predicted from their tracks' motion, to carry onto)
    state: str
    late: bool = False
    predicted: bool = False
    gone: bool = False  # it has left (on its deadline, possibly before its detection or restoration ended)


WAITING = ("arrived", "detecting", "queued", "running")  # a frame in these states leaves only on its deadline


class _Wake:
    """Tells the main loop a restoration came back (or frames were skipped)."""


_WAKE = _Wake()


def _scene_cut_view(frame) -> np.ndarray:
    """The frame as the scene cut check needs it (it looks at a 32 x 32 grey thumbnail), scaled
    down by swscale on the way to RGB: a full-size conversion would cost a late frame's
    detection thread several milliseconds for nothing."""
    w, h = max(1, frame.width // 4), max(1, frame.height // 4)
    return frame.reformat(width=w, height=h, format="rgb24").to_ndarray()


class LiveDriver:
    def __init__(self, pipeline: FacePipeline, writer, live: LiveOptions, fps: float):
        self.pipeline = pipeline
        pipeline.forget_in_align = False  # the worker forgets ended tracks, between its restorations
        self.live = live
        self.fps = fps
        self.stats = LiveStats()
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)
        self.slots: deque[_Slot] = deque()
        self.events: queue.Queue = queue.Queue(maxsize=max(16, int(2 * fps)))
        self.carry: dict[int, tuple[int, Optional[np.ndarray]]] = {}  # track -> (frame index, change)
        # track -> (video frame index, face, landmark motion per video frame) at its last detection
        self.motion: dict[int, tuple[int, TrackedFace, Optional[np.ndarray]]] = {}
        self.max_carry = max(1, int(round(CARRY_SECONDS * fps)))
        # running estimates (seconds): restoration per face, detection+alignment, paste, encode
        self.restore_per_face: Optional[float] = None
        self.detect_s = 0.0
        self.paste_s = 0.0
        self.encode_s = 0.0
        self.error: Optional[BaseException] = None
        self.closing = False
        self.ended = False  # the input has ended
        self.to_detect: queue.Queue = queue.Queue()  # slots waiting for the detection thread
        self.handed: deque = deque()  # (arrival, hand-off time) of frames given to the encoder, in order
        self.encoder = _EncoderThread(_TimedWriter(writer, self._written))
        self.worker = threading.Thread(target=self._work, daemon=True, name="frvideo-restore")

    # -- the restoration worker -------------------------------------------------------

    def _estimate(self, slot: _Slot) -> float:
        per_face = self.restore_per_face or 0.0
        return 1.2 * per_face * len(slot.pending.jobs)

    def _next_job(self) -> Optional[_Slot]:
        """The oldest queued frame that can still be restored before its deadline; older queued
        ones that cannot are skipped (they leave with carried faces). When none can make it, the
        newest is restored anyway: it leaves carried or raw, but what it brings back is carried
        onto the frames after it (an idle worker would bring nothing). Called under the lock."""
        now = time.monotonic()
        skipped = []
        chosen = None
        for slot in self.slots:
            if slot.state != "queued" or slot.gone:
                continue
            if now + self._estimate(slot) <= slot.deadline:
                chosen = slot
                break
            slot.state = "skipped"
            skipped.append(slot)
        if chosen is None and skipped:
            chosen = skipped[-1]
        if skipped:
            self._wake()
        return chosen

    def _work(self) -> None:
        try:
            while True:
                with self.work:
                    slot = self._next_job()
                    while slot is None and not self.closing:
                        self.work.wait()
                        slot = self._next_job()
                    if slot is None:
                        return
                    slot.state = "running"  # (a skipped slot taken anyway still leaves on its deadline)
                jobs = slot.pending.jobs
                t0 = time.monotonic()
                self.pipeline._forget_ended_tracks()
                self.pipeline._restore(jobs)
                took = (time.monotonic() - t0) / len(jobs)
                with self.lock:
                    slot.state = "done"
                    self.restore_per_face = took if self.restore_per_face is None else \
                        (1 - EMA) * self.restore_per_face + EMA * took
                    for job in jobs:
                        tid = job.face.track_id
                        if tid not in self.carry or self.carry[tid][0] < job.frame_index:
                            self.carry[tid] = (job.frame_index, job.change)
                self._wake()
        except BaseException as exc:  # re-raised in the main thread
            self.error = exc
            self._wake()

    def _wake(self) -> None:
        try:
            self.events.put_nowait(_WAKE)
        except queue.Full:
            pass  # the main loop has events to handle anyway

    # -- the main thread ----------------------------------------------------------------

    def _arrive(self, frame, arrival: float) -> None:
        """Main thread: a frame arrived; it gets its slot in the output order and its deadline
        now, and waits for detection (it leaves on its deadline even if detection has not run)."""
        index = self.stats.frames_in
        self.stats.frames_in += 1
        deadline = arrival + self.live.max_latency - self.paste_s - self.encode_s
        slot = _Slot(PendingFrame(index, frame), arrival, deadline, "arrived")
        with self.lock:
            self.slots.append(slot)
        self.to_detect.put(slot)

    def _detect_loop(self) -> None:
        """Detection thread: faces of each arrived frame found and aligned, queued for the worker.
        When detection falls behind the input, it takes the newest frame that waits (the one with
        the most time left to be restored too) and passes the older ones through undetected, as
        it does a frame whose detection would end after its deadline."""
        try:
            while True:
                slot = self.to_detect.get()
                while slot is not None and not self.to_detect.empty():
                    self._undetected(slot)
                    slot = self.to_detect.get()
                if slot is None:
                    return
                t0 = time.monotonic()
                with self.lock:
                    if slot.gone:
                        continue
                    too_late = t0 + self.detect_s > slot.deadline
                    if too_late:
                        self.detect_s *= 1 - EMA  # one slow detection must not keep every later frame undetected
                    else:
                        slot.state = "detecting"
                if too_late:
                    self._undetected(slot)
                    continue
                p = self.pipeline._detect(slot.pending.index, self.pipeline._find_faces(slot.pending.frame))
                self.pipeline._align(p, [])
                p.rgb = None  # only detection and alignment (done) read it
                self._remember_motion(p)
                self.detect_s = (1 - EMA) * self.detect_s + EMA * (time.monotonic() - t0)
                with self.work:
                    if not slot.gone:  # (one that left meanwhile is not restored: its frame is out)
                        slot.pending = p
                        slot.state = "queued" if p.jobs else "none"
                        if p.jobs:
                            self.work.notify()
                self._wake()
        except BaseException as exc:  # re-raised in the main thread
            self.error = exc
            self._wake()

    def _remember_motion(self, p: PendingFrame) -> None:
        """Detection thread: each detected face's place and its motion per video frame (the
        tracker counts its own updates, which skip the frames detection was late for)."""
        for face in p.faces:
            if face.bridged:
                continue
            last = None if face.new_track else self.motion.get(face.track_id)
            velocity = None if last is None else (face.landmarks - last[1].landmarks) / max(p.index - last[0], 1)
            self.motion[face.track_id] = (p.index, face, velocity)
        if len(self.motion) > 2 * len(self.pipeline.tracker.tracks) + 16:  # forget ended tracks
            alive = {t.id for t in self.pipeline.tracker.tracks}
            self.motion = {k: v for k, v in self.motion.items() if k in alive}

    def _undetected(self, slot: _Slot) -> None:
        """Detection thread: a frame detection is too late for. Each track seen in the last
        ``bridge`` frames (at least 3 times) continues along its last motion, as the causal bridge
        predicts a missed face, so the frame can take the tracks' carried changes; with none it is
        passed through undetected. Frames come here in order, so landmark smoothing and the scene
        cut check see every frame once."""
        pipe = self.pipeline
        faces = []
        if pipe.bridge and not slot.gone:
            if pipe._check_scene_cut(_scene_cut_view(slot.pending.frame)):
                self.motion.clear()
            hits = {t.id: t.hits for t in pipe.tracker.tracks}
            for tid, (index, face, velocity) in self.motion.items():
                steps = slot.pending.index - index
                if hits.get(tid, 0) >= 3 and 0 < steps <= pipe.bridge:
                    faces.append(continued_face(face, velocity, steps))
        p = None
        if faces:
            p = PendingFrame(slot.pending.index, slot.pending.frame)
            pipe.paste_only(p, faces)
        with self.lock:
            if not slot.gone:
                if p is not None and p.jobs:
                    slot.pending, slot.state, slot.predicted = p, "predicted", True
                else:
                    slot.state, slot.late = "late", True
        self._wake()

    def _emit_due(self) -> None:
        """Hand every frame at the head that is ready, or due, to the encoder, in order."""
        while self.slots:
            now = time.monotonic()
            with self.lock:
                head = self.slots[0]
                if head.state in WAITING and now < head.deadline:
                    return
                self.slots.popleft()
                head.gone = True  # the detection thread and the worker must not start it now
                if head.state in ("arrived", "detecting"):
                    head.late = True
                jobs, kinds = self._settle(head)
            t0 = time.monotonic()
            out = self.pipeline._finish(dataclasses.replace(head.pending, jobs=jobs))
            self.paste_s = (1 - EMA) * self.paste_s + EMA * (time.monotonic() - t0)
            self._count(head, kinds)
            self.handed.append((head.arrival, time.monotonic()))
            self.encoder.put(out)
            self.pipeline.stats.frames += 1

    def _settle(self, slot: _Slot) -> tuple[list, list[str]]:
        """The frame's faces as they leave: restored (fresh), carried, or raw. Under the lock; the
        jobs themselves are the worker's (it may still be filling them in), so copies go out."""
        jobs, kinds = [], []
        for job in slot.pending.jobs:
            if job.done:
                jobs.append(dataclasses.replace(job))
                kinds.append("fresh")
                continue
            last = self.carry.get(job.face.track_id)
            if last is not None and 0 <= job.frame_index - last[0] <= self.max_carry:
                jobs.append(dataclasses.replace(job, change=last[1], done=True))
                kinds.append("carried")
            else:
                jobs.append(dataclasses.replace(job, change=None, done=True))
                kinds.append("raw")
        return jobs, kinds

    def _count(self, slot: _Slot, kinds: list[str]) -> None:
        s = self.stats
        if slot.predicted and "carried" in kinds:
            s.carried += 1
            s.predicted += 1
            s.kinds += b"P"
        elif slot.late or slot.predicted:  # (predicted faces with nothing to carry: as it came)
            s.raw += 1
            s.late += 1
            s.kinds += b"L"
        elif not kinds:
            s.no_face += 1
            s.kinds += b"N"
        elif all(k == "fresh" for k in kinds):
            s.fresh += 1
            s.kinds += b"F"
        elif all(k == "raw" for k in kinds):
            s.raw += 1
            s.kinds += b"R"
        else:
            s.carried += 1
            s.kinds += b"C"
        if len(self.carry) > 2 * len(self.pipeline.tracker.tracks) + 16:  # forget ended tracks
            live = {t.id for t in self.pipeline.tracker.tracks}
            with self.lock:
                self.carry = {k: v for k, v in self.carry.items() if k in live}

    def _written(self) -> None:
        """Encoder thread: a frame is encoded and muxed (it has left frvideo)."""
        arrival, handed = self.handed.popleft()
        now = time.monotonic()
        self.stats.latencies.append(now - arrival)
        self.stats.frames_out += 1
        self.encode_s = (1 - EMA) * self.encode_s + EMA * (now - handed)

    def _wait_time(self, next_stats: float) -> Optional[float]:
        now = time.monotonic()
        waits = [next_stats - now] if self.live.stats_interval > 0 and not self.live.quiet else []
        if self.slots:
            head = self.slots[0]
            waits.append(0.0 if head.state not in WAITING else head.deadline - now)
        return max(0.0, min(waits)) if waits else None

    def run(self, frames) -> None:
        """Stream ``frames`` (an iterator of (frame, arrival time)) through, until they end."""
        stop = threading.Event()
        threading.Thread(target=_producer, args=(frames, self.events, stop), daemon=True,
                         name="frvideo-decode").start()
        detect = threading.Thread(target=self._detect_loop, daemon=True, name="frvideo-detect")
        detect.start()
        self.worker.start()
        start = time.monotonic()
        interval = self.live.stats_interval
        next_stats = start + interval
        last_line = (dataclasses.replace(self.stats, latencies=[], kinds=bytearray()), start)
        try:
            while not (self.ended and not self.slots):
                try:
                    item = self.events.get(timeout=self._wait_time(next_stats))
                except queue.Empty:
                    item = None
                if item is _END:
                    self.ended = True
                elif isinstance(item, _Failure):
                    raise item.exc
                elif isinstance(item, tuple):
                    self._arrive(*item)
                if self.error is not None:
                    raise self.error
                self._emit_due()
                now = time.monotonic()
                if interval > 0 and not self.live.quiet and now >= next_stats:
                    before, t_before = last_line
                    print(f"frvideo: live {now - start:.0f} s: {describe(self.stats, now - t_before, before)}",
                          file=sys.stderr, flush=True)
                    last_line = (dataclasses.replace(self.stats, latencies=[], kinds=bytearray()), now)
                    next_stats = now + interval
            self.encoder.close()
        finally:
            stop.set()
            self.to_detect.put(None)
            with self.work:
                self.closing = True
                self.work.notify_all()
        self.worker.join()
        detect.join()
        self.stats.seconds = time.monotonic() - start


class _TimedWriter:
    """The writer, telling the driver when each frame has been written."""

    def __init__(self, writer, on_written):
        self.writer = writer
        self.on_written = on_written

    def write(self, frame) -> None:
        self.writer.write(frame)
        self.on_written()


def timed_frames(reader, pace: bool, rate: float):
    """(frame, arrival) pairs. Paced: each frame is held until its timestamp comes round on the
    wall clock (counted from the first frame) and arrives then; a jump of over a second ahead in
    the timestamps starts the count over. Unpaced: a frame arrives when it is decoded."""
    origin = None
    for index, frame in enumerate(reader):
        now = time.monotonic()
        if not pace:
            yield frame, now
            continue
        ts = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else index / rate
        if origin is None or origin + ts - now > 1.0:
            origin = now - ts
        due = origin + ts
        if due > now:
            time.sleep(due - now)
        yield frame, due


def warm_up(restorer, detector, options: PipelineOptions, fps: float, frame) -> None:
    """One throwaway pass over the first frame (and a face-sized blank, should it have no face)
    before the clock starts: the first call of each model and kernel is many times slower than
    the next, and a live run would otherwise start with frames late for no lasting reason."""
    import torch

    from .faces.align import template
    from .faces.blend import template_mask
    from .pipeline import FaceJob

    scratch = FacePipeline(restorer, detector, dataclasses.replace(options, quiet=True), fps)
    for _ in scratch.process([frame]):
        pass
    if scratch.stats.faces == 0:
        size = scratch.size
        lm = template(size).astype(np.float32)
        face = TrackedFace(0, np.array([0, 0, size, size], np.float32), lm, 1.0, new_track=True)
        crop = np.full((size, size, 3), 128, np.uint8)
        job = FaceJob(face, np.eye(2, 3), crop, 0, template_mask(size))
        with torch.inference_mode():
            scratch._restore([job])


def paced_by_default(reader) -> bool:
    """Files and pipes are paced; network streams and capture devices come in real time."""
    return not reader.network and (reader.input.format is None or reader.input.format == "lavfi")


def run_live(source: str, target: str, restorer, detector, options: PipelineOptions, live: LiveOptions,
             faces_log: Optional[str] = None) -> tuple[RunStats, LiveStats]:
    """The whole live run: open, stream every frame through on time, close the output."""
    from .faces.facelog import FaceLogWriter
    from .io import open_reader, open_writer

    options = dataclasses.replace(options, lookahead=0)  # causal: nothing held back for look-ahead
    reader = open_reader(source, options.allow_damaged, options.input)
    info, frames = reader.info, reader
    if getattr(options, "deinterlace", False):  # as run_file: one frame per frame, same timestamps
        from .io.masters import FIELD_PROGRESSIVE, deinterlaced
        frames = deinterlaced(reader, info.field_order, info.time_base)
        info = dataclasses.replace(info, field_order=FIELD_PROGRESSIVE)
    writer = open_writer(target, info, options.encode, copy_from=reader if reader.single_pass else source)
    log = FaceLogWriter(faces_log) if faces_log else None
    fps = float(reader.info.average_rate or 25)
    pipeline = FacePipeline(restorer, detector, options, fps, on_faces=log)
    driver = LiveDriver(pipeline, writer, live, fps)
    pace = paced_by_default(reader) if live.pace is None else live.pace
    ok = False
    try:
        warm_up(restorer, detector, options, fps, reader.first_frame)
        driver.run(timed_frames(frames, pace, fps))
        writer.finish()
        if log is not None:
            log.finish()
        ok = True
    finally:
        if not ok:
            abandon_outputs(driver.encoder, writer, log)
        reader.close()
    stats = pipeline.stats
    stats.seconds = driver.stats.seconds
    stats.tracks = len(pipeline._track_ids)
    stats.input_ended = reader.ended_by
    if pipeline.keyframes is not None:
        stats.references = pipeline.keyframes.summary()
    return stats, driver.stats
