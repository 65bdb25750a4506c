"""The batch scheduler: jobs -> segments -> a local or a Ray executor -> join, provenance.

This process alone writes the journal. Segments run either here, one after another
(``--engine local``), or as Ray tasks (``--engine ray``): a worker restores its segment
into a temporary file and returns the bytes; this process stores them, marks the segment
done and joins a file's segments once all are in. Both executors run the very same
segments (segments.run_segment), so a batch started on one engine resumes on the other.

A failure is confined to its file: the error is recorded, the segment is tried again up
to ``--retries`` times (the file's finished segments are kept), then the file is marked
failed and the batch goes on.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import EXIT_BATCH_FAILED, EXIT_OK, FrvideoError, InputError, UsageError
from .journal import Journal
from .provenance import (face_thumbnail, provenance_record, sha256_file, sidecar_path, write_framemd5,
                         write_sidecar)
from .segments import join_segments, plan_segments, run_segment

# Options that change how fast a file is restored, not what comes out: left out of the settings hash.
NOT_HASHED = ("threads", "quiet")


@dataclass
class BatchOptions:
    out_dir: Path
    retries: int = 0
    engine: str = "local"
    framemd5: bool = False
    segment_seconds: float = 60.0
    warmup: int = 30
    ray_address: Optional[str] = None
    workers: Optional[int] = None
    quiet: bool = False

    def for_provenance(self) -> dict:
        return {"engine": self.engine, "retries": self.retries, "framemd5": self.framemd5,
                "segment_seconds": self.segment_seconds, "warmup_frames": self.warmup}


@dataclass
class Job:
    key: str  # output, relative to the batch folder
    input: Path
    output: Path
    settings: dict
    models: dict
    settings_sha256: str
    origin: str = ""
    error: Optional[str] = None  # found before the run (an unreadable input)
    # this run's bookkeeping
    attempts: int = 0
    attempt_id: Optional[int] = None
    pending: set = field(default_factory=set)
    state: str = "pending"  # this run: queued (segments submitted), running (one began), done, failed, skipped
    begun: bool = False
    started: float = 0.0


def settings_sha256(settings: dict, models: dict, options: BatchOptions) -> str:
    """What decides the output: every restore option (but threads/quiet), the weights' hashes,
    frvideo's version and the segment plan's parameters."""
    from .. import __version__

    identity = {"settings": {k: v for k, v in settings.items() if k not in NOT_HASHED},
                "model": models["model"]["weights_sha256"] or models["model"]["name"],
                "model_name": models["model"]["name"], "detector_name": models["detector"]["name"],
                "detector": models["detector"]["weights_sha256"], "frvideo": __version__,
                "segment_seconds": options.segment_seconds, "warmup": options.warmup}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _message(exc: BaseException) -> str:
    from ..cli import one_line
    if isinstance(exc, FrvideoError):
        return one_line(str(exc))
    return one_line(f"internal error: {type(exc).__name__}: {exc}")


# -- executors --------------------------------------------------------------------------

class LocalExecutor:
    """Segments run in this process, in order; models stay loaded from one file to the next."""

    name = "local"

    def __init__(self):
        self.queue: deque = deque()
        self.loaded: dict = {}
        self.before = lambda task: None  # called as a task starts (the batch counts the file's try then)

    def submit(self, task: dict, front: bool = False) -> None:
        (self.queue.appendleft if front else self.queue.append)(task)

    def drop(self, key: str) -> None:
        self.queue = deque(t for t in self.queue if t["key"] != key)

    def results(self):
        while self.queue:
            task = self.queue.popleft()
            self.before(task)
            try:
                yield task, run_segment(task, self.loaded), None
            except Exception as exc:  # one file's failure (or a bug it hits) must not end the batch
                yield task, None, _message(exc)

    def close(self) -> None:
        pass


class RayExecutor:
    """One Ray task per segment (a short file is one segment). Local mode by default (a Ray
    instance started for this batch, ``--workers`` processes); ``--ray-address`` joins an
    existing cluster, whose nodes must see the inputs at the same paths and have frvideo
    installed. A task takes one GPU where the cluster has them and the device allows."""

    name = "ray"

    def __init__(self, address: Optional[str], workers: Optional[int], threads: int, device: str):
        try:
            import ray
        except ImportError:
            raise UsageError("--engine ray needs Ray: pip install 'frvideo[ray]'") from None
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(num_cpus=workers or os.cpu_count() or 1, **kwargs)
            except Exception as exc:  # ConnectionError, auth errors, ...: one line
                raise UsageError(f"--engine ray: cannot start or reach Ray"
                                 f"{' at ' + address if address else ''} ({_message(exc)})") from None
        gpus = ray.cluster_resources().get("GPU", 0)
        self.remote = ray.remote(_ray_segment).options(
            num_cpus=threads, num_gpus=1 if gpus >= 1 and device != "cpu" else 0, max_retries=0)
        self.threads = threads
        self.inflight: dict = {}
        self.before = lambda task: None

    def submit(self, task: dict, front: bool = False) -> None:
        self.before(task)  # in the cluster's queue from now on
        # a task uses the CPUs it reserved (not half of its node's, the local default)
        remote_task = dict(task, settings=dict(task["settings"], threads=task["settings"].get("threads") or self.threads))
        self.inflight[self.remote.remote(remote_task)] = task

    def drop(self, key: str) -> None:
        for ref, task in list(self.inflight.items()):
            if task["key"] == key:
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref)
                del self.inflight[ref]

    def results(self):
        while self.inflight:
            ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
            task = self.inflight.pop(ready[0])
            try:
                data, result = self.ray.get(ready[0])
            except Exception as exc:  # the worker died (OOM, killed), or Ray itself failed
                yield task, None, _message(exc)
                continue
            if data is None:
                yield task, None, result["error"]
                continue
            target = Path(task["target"])
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                yield task, None, f"cannot store segment {target}: {exc.strerror or exc}"
                continue
            yield task, result, None

    def close(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self.ray.shutdown()


_WORKER_MODELS: dict = {}  # a Ray worker keeps its models loaded between tasks


def _ray_segment(task: dict):
    """A Ray task: restore one segment into a temporary file, return (bytes, result) or
    (None, {"error": one line})."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="frvideo-segment-") as tmp:
            local = dict(task, target=str(Path(tmp) / Path(task["target"]).name))
            result = run_segment(local, _WORKER_MODELS)
            return Path(local["target"]).read_bytes(), result
    except Exception as exc:
        return None, {"error": _message(exc)}


# -- the run ------------------------------------------------------------------------------

class BatchRun:
    def __init__(self, journal: Journal, jobs: list[Job], options: BatchOptions, argv: list[str]):
        self.journal = journal
        self.jobs = jobs
        self.by_key = {j.key: j for j in jobs}
        self.opts = options
        self.argv = argv
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.executor = None

    def say(self, job: Optional[Job], text: str) -> None:
        if not self.opts.quiet:
            where = f"[{self.jobs.index(job) + 1}/{len(self.jobs)}] {job.key}: " if job is not None else ""
            print(f"frvideo batch: {where}{text}", file=sys.stderr, flush=True)

    def segment_dir(self, job: Job) -> Path:
        return self.journal.dir / "segments" / hashlib.sha1(job.key.encode()).hexdigest()[:16]

    def run(self, executor) -> int:
        self.executor = executor
        executor.before = lambda task: self._begin(self.by_key[task["key"]])
        self.run_id = self.journal.start_run(executor.name, self.argv)
        code = None
        try:
            for job in self.jobs:
                self._start(job)
            for task, result, error in executor.results():
                job = self.by_key[task["key"]]
                if error is None:
                    self._segment_done(job, task, result)
                else:
                    self._segment_failed(job, task, error)
            code = EXIT_BATCH_FAILED if self.counts["failed"] else EXIT_OK
            return code
        finally:
            if code is None:  # stopped (a signal, Ctrl-C): what runs now resumes next time
                for job in self.jobs:
                    if job.state == "running":
                        with contextlib.suppress(Exception):
                            self.journal.upsert_job(job.key, state="interrupted")
                            if job.attempt_id is not None:
                                self.journal.finish_attempt(job.attempt_id, "interrupted")
            executor.close()
            with contextlib.suppress(Exception):
                self.journal.finish_run(self.run_id, code if code is not None else -1)
            with contextlib.suppress(Exception):
                from .report import write_report
                report = write_report(self.journal, self.opts.out_dir)
                if code is not None:
                    self.say(None, f"{self.counts['done']} done, {self.counts['skipped']} skipped (done before, "
                                   f"unchanged), {self.counts['failed']} failed; report {report}")

    # one job ----------------------------------------------------------------------------
    def _input_sha256(self, job: Job, row) -> tuple[int, int, str]:
        try:
            st = job.input.stat()
        except OSError as exc:
            raise InputError(f"input not readable ({exc.strerror or exc}): {job.input}") from None
        if row is not None and row["input"] == str(job.input) and row["input_size"] == st.st_size \
                and row["input_mtime_ns"] == st.st_mtime_ns and row["input_sha256"]:
            return st.st_size, st.st_mtime_ns, row["input_sha256"]  # unchanged since it was hashed
        try:
            return st.st_size, st.st_mtime_ns, sha256_file(job.input)
        except OSError as exc:
            raise InputError(f"input not readable ({exc.strerror or exc}): {job.input}") from None

    def _output_intact(self, job: Job, row) -> bool:
        try:
            st = job.output.stat()
        except OSError:
            return False
        if st.st_size != row["output_size"] or not sidecar_path(job.output).is_file():
            return False
        return st.st_mtime_ns == row["output_mtime_ns"] or sha256_file(job.output) == row["output_sha256"]

    def _start(self, job: Job) -> None:
        """Skip, or (re)start a job: hash, plan (or take the journal's plan), submit what is missing."""
        job.attempts += 1
        job.attempt_id = None
        job.begun = False
        row = self.journal.job(job.key)
        try:
            if job.error is not None:
                raise InputError(job.error)
            size, mtime, input_sha = self._input_sha256(job, row)
            if row is not None and row["state"] == "done" and row["input_sha256"] == input_sha \
                    and row["settings_sha256"] == job.settings_sha256 and self._output_intact(job, row):
                job.state = "skipped"
                self.counts["skipped"] += 1
                self.say(job, "skipped (done before; input and settings unchanged)")
                return
            if row is not None and (row["input_sha256"] != input_sha or row["settings_sha256"] != job.settings_sha256
                                    or row["input"] != str(job.input)):
                for f in self.journal.reset_job(job.key):
                    with contextlib.suppress(OSError):
                        (self.segment_dir(job) / f).unlink()
            job.state = "queued"
            self.journal.upsert_job(
                job.key, input=str(job.input), input_size=size, input_mtime_ns=mtime, input_sha256=input_sha,
                settings_sha256=job.settings_sha256, settings=json.dumps(job.settings, sort_keys=True),
                state="pending", tries=row["tries"] if row is not None else 0)
            segments = self.journal.segments(job.key)
            if not segments:
                from ..pipeline import bridge_frames
                tail = max(job.settings["lookahead"], bridge_frames(job.settings["bridge"], job.settings["lookahead"]))
                spans = plan_segments(str(job.input), self.opts.segment_seconds, self.opts.warmup, tail)
                self.journal.plan(job.key, spans)
                segments = self.journal.segments(job.key)
            folder = self.segment_dir(job)
            folder.mkdir(parents=True, exist_ok=True)
            ext = job.output.suffix
            job.pending = set()
            done_before = 0
            for seg in segments:
                if seg["state"] == "done" and self._segment_intact(folder, seg):
                    done_before += 1
                    continue
                if seg["state"] == "done":
                    self.journal.update_segment(job.key, seg["idx"], state="pending")
                job.pending.add(seg["idx"])
                self.executor.submit(self._task(job, seg, folder / f"{seg['idx']:06d}{ext}"))
            if done_before:
                self.say(job, f"resuming: {done_before} of {len(segments)} segments done before")
            if not job.pending:
                self._begin(job)
                self._finish(job)
        except FrvideoError as exc:
            self._failed(job, _message(exc))
        except OSError as exc:
            self._failed(job, _message(InputError(f"{exc.strerror or exc}: {exc.filename or job.input}")))

    def _begin(self, job: Job) -> None:
        """The file's first task of this try starts: a try is counted (a file a killed run never
        got to is not)."""
        if job.begun or job.state not in ("queued", "running"):
            return
        job.begun = True
        job.state = "running"
        job.started = time.time()
        row = self.journal.job(job.key)
        self.journal.upsert_job(job.key, state="running", tries=(row["tries"] or 0) + 1, error=None,
                                started=job.started, finished=None, engine=self.executor.name, run=self.run_id)
        job.attempt_id = self.journal.start_attempt(job.key, self.run_id, job.attempts)

    def _segment_intact(self, folder: Path, seg) -> bool:
        path = folder / (seg["file"] or "")
        try:
            return bool(seg["file"]) and path.stat().st_size == seg["size"] and sha256_file(path) == seg["sha256"]
        except OSError:
            return False

    def _task(self, job: Job, seg, target: Path) -> dict:
        from .segments import WHOLE_FILE
        return {"key": job.key, "index": seg["idx"], "input": str(job.input), "target": str(target),
                "settings": job.settings, "span": {k: seg[k] for k in WHOLE_FILE}}

    def _segment_done(self, job: Job, task: dict, result: dict) -> None:
        target = Path(task["target"])
        try:
            size, digest = target.stat().st_size, sha256_file(target)
        except OSError as exc:
            self._segment_failed(job, task, f"segment file lost: {exc}")
            return
        self.journal.update_segment(
            job.key, task["index"], state="done", file=target.name, size=size, sha256=digest,
            frames=result["frames"], faces=result["faces"], frames_with_faces=result["frames_with_faces"],
            tracks=result["tracks"], largest=json.dumps(result["largest"]), refs=json.dumps(result["references"]),
            seconds=result["seconds"], finished=time.time(), run=self.run_id, worker=result["worker"],
            device=f"{result['device']} {result['precision']}, {result['threads']} threads")
        if job.state not in ("queued", "running"):
            return  # a late segment of a job already given up: kept for a later resume
        job.pending.discard(task["index"])
        total = len(self.journal.segments(job.key))
        if total > 1:
            self.say(job, f"segment {task['index'] + 1}/{total} done ({result['frames']} frames, "
                          f"{result['seconds']:.1f} s, {result['worker']})")
        if not job.pending:
            try:
                self._finish(job)
            except FrvideoError as exc:
                self._failed(job, _message(exc))
            except OSError as exc:
                self._failed(job, _message(exc))

    def _segment_failed(self, job: Job, task: dict, error: str) -> None:
        if job.state not in ("queued", "running"):
            return
        self.journal.finish_attempt(job.attempt_id, "failed", error)
        if job.attempts <= self.opts.retries:
            job.attempts += 1
            row = self.journal.job(job.key)
            self.journal.upsert_job(job.key, tries=row["tries"] + 1, error=error)
            job.attempt_id = self.journal.start_attempt(job.key, self.run_id, job.attempts)
            self.say(job, f"segment {task['index'] + 1} failed ({error}); trying again "
                          f"({job.attempts} of {self.opts.retries + 1})")
            self.executor.submit(task, front=True)
            return
        self.executor.drop(job.key)
        self._failed(job, error, attempt_closed=True)

    def _failed(self, job: Job, error: str, attempt_closed: bool = False) -> None:
        if job.attempt_id is None:  # failed before the try was recorded (an unreadable input): count it
            row = self.journal.job(job.key)
            self.journal.upsert_job(job.key, input=str(job.input), tries=(row["tries"] if row is not None else 0) + 1)
        elif not attempt_closed:
            self.journal.finish_attempt(job.attempt_id, "failed", error)
        if job.attempts <= self.opts.retries and not attempt_closed:
            self.say(job, f"failed ({error}); trying again ({job.attempts + 1} of {self.opts.retries + 1})")
            self._start(job)
            return
        self.journal.upsert_job(job.key, state="failed", error=error, finished=time.time(), run=self.run_id)
        job.state = "failed"
        self.counts["failed"] += 1
        self.say(job, f"failed: {error}")

    def _finish(self, job: Job) -> None:
        """All segments are in: join them, hash, provenance, thumbnail, then mark done."""
        import av

        from ..io.reader import open_reader

        t0 = time.perf_counter()
        segments = self.journal.segments(job.key)
        folder = self.segment_dir(job)
        with open_reader(str(job.input), allow_damaged=True) as reader:
            rotation, time_base = reader.info.rotation, reader.info.time_base
            timecode, rate = getattr(reader.info, "timecode", None), reader.info.average_rate
        job.output.parent.mkdir(parents=True, exist_ok=True)
        join_segments([folder / s["file"] for s in segments], str(job.input), job.output, rotation, timecode, rate)
        output_sha = sha256_file(job.output)
        md5_path = write_framemd5(job.output) if self.opts.framemd5 else None
        row = self.journal.job(job.key)
        seconds = sum(s["seconds"] or 0 for s in segments) + time.perf_counter() - t0
        finished = time.time()
        # when the work began: the first segment's start (a job is queued long before on a busy batch)
        began = min((s["finished"] - s["seconds"] for s in segments if s["finished"] and s["seconds"]),
                    default=row["started"] or job.started)
        record = provenance_record(
            source=job.input, source_size=row["input_size"], source_sha256=row["input_sha256"], output=job.output,
            output_sha256=output_sha, models=job.models, settings=job.settings,
            batch_options=self.opts.for_provenance(), segments=segments, started=began,
            finished=finished, seconds=seconds, engine=self.executor.name, framemd5=md5_path)
        write_sidecar(job.output, record)
        thumb = None
        largest = [json.loads(s["largest"]) for s in segments if s["largest"] and s["largest"] != "null"]
        if largest:
            best = max(largest, key=lambda f: f["area"])
            rel = Path(".frvideo") / "thumbs" / f"{hashlib.sha1(job.key.encode()).hexdigest()[:16]}.png"
            with contextlib.suppress(av.error.FFmpegError, OSError, ValueError):
                if face_thumbnail(job.input, job.output, best, time_base, self.opts.out_dir / rel):
                    thumb = rel.as_posix()
        st = job.output.stat()
        self.journal.upsert_job(
            job.key, state="done", error=None, output_size=st.st_size, output_mtime_ns=st.st_mtime_ns,
            output_sha256=output_sha, frames=record["frames"]["output"], faces=record["faces"], started=began,
            finished=finished, seconds=seconds, thumb=thumb)
        self.journal.finish_attempt(job.attempt_id, "done")
        shutil.rmtree(folder, ignore_errors=True)  # the output holds them now
        job.state = "done"
        self.counts["done"] += 1
        self.say(job, f"done: {record['frames']['output']} frames, {record['faces']} faces, {seconds:.1f} s "
                      f"({len(segments)} segment{'s' if len(segments) > 1 else ''}) -> {job.output}")
