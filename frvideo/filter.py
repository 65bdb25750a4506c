"""``frvideo.Filter``: the face pipeline for hosts that hand over frames one at a time
(a custom app, a capture loop, a frame server's per-frame callback).

    with frvideo.Filter(model="lite", detector="yunet") as f:
        for rgb in frames:                 # H x W x 3 uint8 RGB arrays (or av.VideoFrame)
            out = f.process(rgb)           # the restored frame, same kind, shape and dtype
            ...
        rest = f.flush()                   # [] with the default lookahead=0

It drives the same ``FacePipeline`` as the command line: the pipeline runs in a
worker thread that pulls its input frames from this object, one per ``process()``
call, and ``process()`` waits until the pipeline asks for the next frame, so
everything the pipeline can output for the frames given so far has come back by
then. Tracks, landmark smoothing and the temporal filters carry over from call to
call, exactly as they do across the frames of a file.

Options are the CLI's (``frvideo --help``), named by their long option with
underscores (``batch_size=``, ``temporal="tokens"``, ``draw=True``), parsed and
checked by the CLI's own code, with the CLI's defaults except two, which give a
host one frame out for each frame in, at once:

* ``lookahead=0``: causal landmark smoothing (the CLI holds 4 frames to look ahead);
* ``batch_size=1``: a frame's faces are restored in the call that brings the frame
  (all faces of the frame in one model call), instead of waiting for faces of the next
  frames to fill a batch of 4.

With ``lookahead=N`` (or a ``batch_size`` above 1) the filter holds frames back as
the CLI does: ``process()`` returns ``None`` until the first frame is done, then the
frames in their input order (the n-th frame returned is the n-th frame given), and
``flush()`` returns the frames still held at the end of the stream.

Filter-only options: ``channels`` ("rgb", the default, or "bgr": the channel order of
the numpy arrays given and returned; OpenCV's is BGR) and ``fps`` (the stream's frame
rate, default 25: causal landmark smoothing is tuned in seconds). The CLI options
about files and the run (input, output, --codec/--crf/--preset/--pix-fmt, --faces,
--ignore-damage, --quiet: all but the model, faces, blend, temporal and reference groups
of ``frvideo --help``) are refused, and so is --reference-frame (use reference_image). ``config=``
takes a preset name or YAML file as ``--config`` does; its file-only keys (an encoder
preset, quiet) are skipped. ``threads`` works as the CLI's: it sets the torch and
OpenCV thread counts of the whole process (default: half the cores, 1 to 8).
"""
from __future__ import annotations

import argparse
import queue
import threading
from collections import deque
from typing import Any, Optional

from .errors import ConfigError, FrvideoError, UsageError

NAME = "frvideo.Filter"

# The two CLI defaults the filter changes so that process() returns the frame it was given.
FILTER_DEFAULTS = {"lookahead": 0, "batch_size": 1}
# The CLI's option groups that shape the restoration: the filter takes their options; the
# others (input/output, encoding, run, and any group for streams added later) are about files
# and the command line, which the host owns
FILTER_GROUPS = ("model", "faces", "blend", "temporal", "reference")
NOT_FILTER_OPTIONS = ("faces",)  # --faces FILE.jsonl: a log file beside the output
# ... and one the filter cannot honour: a frame of the input read before the run starts
NEEDS_FILE_INPUT = "reference_frame"


def filter_option_dests(parser: argparse.ArgumentParser) -> set[str]:
    """The dests of the CLI options a Filter takes (those of FILTER_GROUPS)."""
    return {a.dest for g in parser._action_groups if g.title and g.title.split()[0] in FILTER_GROUPS
            for a in g._group_actions} - set(NOT_FILTER_OPTIONS) - {NEEDS_FILE_INPUT}
CHANNELS = ("rgb", "bgr")


def filter_args(options: dict[str, Any]) -> tuple[argparse.Namespace, dict[str, str]]:
    """The CLI's namespace of options for keyword arguments of Filter: the CLI parser's defaults,
    FILTER_DEFAULTS, a ``config`` preset's values, then the keywords, each value checked by the
    same parser as the same option on the command line or in a --config file. Also returns where
    each preset value came from (so a value the preset got wrong is reported against the file)."""
    from .cli import NOT_IN_CONFIG, _config_value, build_parser
    from .models import load_preset

    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    allowed = filter_option_dests(parser)
    args = parser.parse_args(["-", "-"])  # every option at its CLI default
    args.input = args.output = None
    for key, value in FILTER_DEFAULTS.items():
        setattr(args, key, value)
    origin: dict[str, str] = {}
    options = dict(options)
    config = options.pop("config", None)
    if config is not None:
        if not isinstance(config, str) or not config.strip():
            raise UsageError(f"{NAME}: config: must be a preset name or a YAML file path, not {config!r}")
        for key, value in load_preset(config).items():
            dest = str(key).replace("-", "_")
            if not isinstance(key, str) or dest not in actions or dest in NOT_IN_CONFIG:
                raise ConfigError(f"{config}: unknown option {key!r}")
            if dest == NEEDS_FILE_INPUT:
                raise ConfigError(f"{config}: {key}: {_NEEDS_FILE}")
            if dest not in allowed:
                continue  # e.g. an encoder preset: the host encodes
            setattr(args, dest, _config_value(actions[dest], str(key), value, config))
            origin[dest] = f"{config}: {key}"
    for key, value in options.items():
        dest = key.replace("-", "_")
        if dest == NEEDS_FILE_INPUT:
            raise UsageError(f"{NAME}: {key}: {_NEEDS_FILE}")
        if dest in actions and dest not in allowed and dest not in NOT_IN_CONFIG:
            raise UsageError(f"{NAME}: {key!r} is an option of the command line's input/output or run, "
                             f"not of the filter (the host decodes and encodes)")
        if dest not in allowed:
            raise UsageError(f"{NAME}: unknown option {key!r} "
                             f"(options: {', '.join(sorted(allowed))}, channels, fps, config)")
        if value is None:  # None keeps the default (auto strength, the model's fidelity, ...)
            continue
        if isinstance(value, (set, frozenset, tuple)):
            value = sorted(value)  # --tracks as a set of ids
        try:
            setattr(args, dest, _config_value(actions[dest], key, value, NAME))
        except ConfigError as exc:  # the keyword is the caller's, not a file's: a usage error
            raise UsageError(str(exc)) from None
        origin.pop(dest, None)
    return args, origin


_NEEDS_FILE = ("needs a file input (it reads that frame before the run starts); the filter sees frames "
               "one at a time: use reference_image")

_END = object()  # no more input: restore what is held and finish (flush)
_WANT = object()  # the pipeline asks for its next frame: all it could output so far has been handed back
_DONE = object()  # the pipeline has finished


class _Closed(Exception):
    """Raised inside the pipeline's input to stop it without finishing the frames it holds."""


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Faces:
    """The pipeline's on_faces callback: the tracked faces of the frame it is finishing."""

    def __init__(self):
        self.last: list = []

    def __call__(self, index, faces, chosen) -> None:
        self.last = faces


def _drive(pipeline, faces: _Faces, inbox: queue.Queue, outbox: queue.Queue) -> None:
    """The worker thread: FacePipeline.process() over the frames put in ``inbox``, one at a
    time. Before it takes each frame it says so (_WANT), after everything it could output for
    the frames so far: that is when Filter.process() returns. (It holds no reference to the
    Filter, so an unclosed Filter can still be collected and stop it.)"""
    def frames():
        while True:
            outbox.put(_WANT)
            item = inbox.get()
            if item is _END:
                return
            if item is _Closed:
                raise _Closed()
            yield item

    try:
        for frame in pipeline.process(frames()):
            outbox.put((frame, faces.last))
        outbox.put(_DONE)
    except _Closed:
        outbox.put(_DONE)
    except BaseException as exc:  # re-raised in the caller's thread
        outbox.put(_Failure(exc))


class Filter:
    """Restores faces frame by frame; see the module's documentation."""

    def __init__(self, model: Optional[str] = None, detector: Optional[str] = None, *, channels: str = "rgb",
                 fps: float = 25.0, **options):
        """``model``, ``detector``: names as for --model/--detector; None: a ``config`` preset's,
        else auto (as on the command line)."""
        from . import cli

        if channels not in CHANNELS:
            raise UsageError(f"{NAME}: channels must be 'rgb' or 'bgr', not {channels!r}")
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            raise UsageError(f"{NAME}: fps must be a number, not {fps!r}") from None
        if not 0 < fps < 1000:
            raise UsageError(f"{NAME}: fps must be in (0, 1000), not {fps}")
        self.channels = channels
        args, origin = filter_args({"model": model, "detector": detector, **options})
        check = cli._OptionCheck(origin, option_name=NAME + ": {}")
        cli._check_not_empty(args, check)
        cli._import_heavy()
        checked = cli.validate_model_args(args, check)

        from .hardware import apply_threads, default_threads
        from .io.writer import EncodeOptions
        from .pipeline import FacePipeline

        apply_threads(args.threads or default_threads())
        cli._quiet_opencv()
        args.quiet = True
        detector_obj, restorer, pipeline_options = cli.load_pipeline(args, {**checked, "encode": EncodeOptions()})
        self.model, self.detector, self.device = checked["model"], detector_obj.name, checked["device"]
        self.options = pipeline_options
        faces = _Faces()
        self.pipeline = FacePipeline(restorer, detector_obj, pipeline_options, fps, on_faces=faces)
        self._stats = self.pipeline.stats
        self.faces: list = []  # the tracked faces (TrackedFace: track_id, box, landmarks, ...) of the last frame out
        self.last_pts: Optional[int] = None  # the pts of the last frame out (given to process() or the frame's own)
        self._size: Optional[tuple[int, int]] = None
        self._given: deque = deque()  # (kind, pts) of each frame in the pipeline, oldest first
        self._ready: deque = deque()  # frames out of the pipeline not returned yet: (frame, faces)
        self._to_worker: queue.Queue = queue.Queue(maxsize=1)
        self._from_worker: queue.Queue = queue.Queue()
        self._state = "open"  # open -> flushed -> closed; "failed" after an error in the pipeline
        self._worker = threading.Thread(target=_drive, args=(self.pipeline, faces, self._to_worker, self._from_worker),
                                        daemon=True, name="frvideo-filter")
        self._worker.start()
        self._collect()  # until the pipeline asks for its first frame

    def _collect(self) -> None:
        """Wait until the pipeline asks for its next frame (or ends), keeping what it output."""
        try:
            while True:
                item = self._from_worker.get()
                if item is _WANT or item is _DONE:
                    return
                if isinstance(item, _Failure):
                    self._state = "failed"
                    raise item.exc
                self._ready.append(item)
        except BaseException:
            # an error or an interrupt (Ctrl-C while waiting): the pipeline's state is no longer
            # in step with the calls, so the filter takes no more frames
            if self._state != "failed":
                self._state = "failed"
                self._stop_worker(wait=False)  # an interrupt must not wait for a model call
            raise

    # -- frames in and out ----------------------------------------------------------------

    def _usable(self, what: str) -> None:
        if self._state == "closed":
            raise UsageError(f"{NAME}.{what}: the filter is closed")
        if self._state == "flushed":
            raise UsageError(f"{NAME}.{what}: the filter was flushed (the end of the stream); "
                             f"make a new Filter for another stream")
        if self._state == "failed":
            raise UsageError(f"{NAME}.{what}: the filter stopped after an error; make a new Filter")

    def _to_video_frame(self, frame, pts):
        import av
        import numpy as np

        if isinstance(frame, av.VideoFrame):
            if pts is not None:
                frame.pts = pts
            return "av", frame
        if not isinstance(frame, np.ndarray):
            raise UsageError(f"{NAME}.process: expected a numpy array or an av.VideoFrame, "
                             f"not {type(frame).__name__}")
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype not in (np.uint8, np.uint16) \
                or frame.shape[0] < 2 or frame.shape[1] < 2:
            raise UsageError(f"{NAME}.process: expected an H x W x 3 uint8 (or uint16) "
                             f"{self.channels.upper()} array, not shape {frame.shape} dtype {frame.dtype}")
        if self.channels == "bgr":
            frame = frame[..., ::-1]
        if frame.dtype == np.uint8:
            video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        else:
            video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame, dtype="<u2"), format="rgb48le")
        video.pts = pts
        return "numpy", video

    def _from_video_frame(self, kind: str, frame):
        if kind == "av":
            return frame
        import numpy as np

        array = frame.to_ndarray()  # rgb24 -> uint8, rgb48le -> uint16, as given
        if self.channels == "bgr":
            array = np.ascontiguousarray(array[..., ::-1])
        return array

    def _next_out(self):
        frame, faces = self._ready.popleft()
        kind, pts = self._given.popleft()
        self.faces = faces
        self.last_pts = pts if pts is not None else frame.pts
        return self._from_video_frame(kind, frame)

    def process(self, frame, pts: Optional[int] = None):
        """One frame in: an H x W x 3 uint8/uint16 numpy array (RGB, or BGR with channels="bgr")
        or an av.VideoFrame (any pixel format PyAV decodes to; ``pts``, when given, is set on it).
        Returns the restored frame of the same kind (an av.VideoFrame keeps its pts, time base
        and format), or None while the pipeline holds frames for look-ahead (never with the
        default lookahead=0 and batch_size=1)."""
        self._usable("process")
        kind, video = self._to_video_frame(frame, pts)
        size = (video.width, video.height)
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise UsageError(f"{NAME}.process: the frame size changed from {self._size[0]}x{self._size[1]} "
                             f"to {size[0]}x{size[1]}; make a new Filter for the new size")
        self._given.append((kind, pts))
        self._to_worker.put(video)
        self._collect()
        return self._next_out() if self._ready else None

    def flush(self) -> list:
        """The end of the stream: restores and returns the frames still held (in order; [] with
        lookahead=0 and batch_size=1, where no frame is held). The filter takes no more frames."""
        self._usable("flush")
        self._to_worker.put(_END)
        self._collect()
        self._state = "flushed"
        self._worker.join()
        return [self._next_out() for _ in range(len(self._ready))]

    @property
    def stats(self):
        """The pipeline's RunStats so far (frames, faces, strength, time per stage)."""
        return self._stats

    def _stop_worker(self, wait: bool = True) -> None:
        """Ends the worker without finishing the frames it holds; ``wait``: until it has ended
        (a model call under way finishes first)."""
        if self._worker.is_alive():
            try:
                self._to_worker.put_nowait(_Closed)
            except queue.Full:
                pass
            if wait:
                self._worker.join()

    def close(self) -> None:
        """Stops the pipeline (frames still held are dropped; call flush() first to get them) and
        frees the models. Calling it again does nothing."""
        if self._state == "closed":
            return
        if self._state in ("open", "failed"):
            self._stop_worker()
        self._state = "closed"
        self._ready.clear()
        self._given.clear()
        self.pipeline = None

    def __enter__(self) -> "Filter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if getattr(self, "_state", "closed") in ("open", "failed"):
                self._stop_worker(wait=False)
        except Exception:
            pass


__all__ = ["Filter", "FrvideoError", "UsageError"]
