"""The batch journal, ``DIR/.frvideo/journal.sqlite`` (sqlite3 from the standard library).

The single source of truth of a batch: every job (one output file) with its state, tries,
last error, the hashes of its input and settings, and its segments, each with the file
that holds it once finished. Only the process that runs the batch writes it (Ray workers
return their segments to it), one short transaction per change, so a ``kill -9`` or a
power cut leaves it as it was after the last finished segment.

Job states: ``pending`` (planned), ``running``, ``done``, ``failed`` (every try of the
last run failed), ``interrupted`` (stopped by a signal); a ``running`` job found by a
later run was cut by a kill or crash and resumes like ``interrupted``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Optional

from ..errors import InputError, OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    output TEXT PRIMARY KEY,          -- relative to the batch folder
    input TEXT NOT NULL,
    input_size INTEGER, input_mtime_ns INTEGER, input_sha256 TEXT,
    settings_sha256 TEXT, settings TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    tries INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    segments INTEGER, frames INTEGER, faces INTEGER,
    output_size INTEGER, output_mtime_ns INTEGER, output_sha256 TEXT,
    started REAL, finished REAL, seconds REAL,
    engine TEXT, thumb TEXT, run INTEGER
);
CREATE TABLE IF NOT EXISTS segments (
    output TEXT NOT NULL, idx INTEGER NOT NULL,
    start_pts INTEGER, end_pts INTEGER, warm_pts INTEGER, seek_pts INTEGER, seek_frame INTEGER,
    tail INTEGER, planned_frames INTEGER,
    state TEXT NOT NULL DEFAULT 'pending',
    file TEXT, size INTEGER, sha256 TEXT,
    frames INTEGER, faces INTEGER, frames_with_faces INTEGER, tracks INTEGER,
    largest TEXT, refs TEXT, seconds REAL, finished REAL, run INTEGER, worker TEXT, device TEXT,
    PRIMARY KEY (output, idx)
);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY, output TEXT NOT NULL, run INTEGER, try INTEGER,
    started REAL, finished REAL, state TEXT, error TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started REAL, finished REAL, engine TEXT, argv TEXT, pid INTEGER, exit_code INTEGER
);
"""

SEGMENT_PLAN = ("start_pts", "end_pts", "warm_pts", "seek_pts", "seek_frame", "tail", "planned_frames")


def journal_dir(out_dir: Path) -> Path:
    return out_dir / ".frvideo"


class Journal:
    def __init__(self, out_dir: Path, create: bool = True, lock: bool = True):
        self.out_dir = out_dir
        self.dir = journal_dir(out_dir)
        self.path = self.dir / "journal.sqlite"
        self._lock_fd: Optional[int] = None
        if not create and not self.path.is_file():
            raise InputError(f"no batch journal in {out_dir} ({self.path} not found)")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create {self.dir}: {exc.strerror or exc}") from None
        if lock:
            self._lock()
        try:
            self.db = sqlite3.connect(str(self.path), timeout=30)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA synchronous=FULL")  # a finished segment survives a power cut
            with self.db:
                self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.close()
            raise OutputError(f"batch journal {self.path} is unreadable ({exc}); move it away to start afresh") \
                from None

    def _lock(self) -> None:
        """One batch run per folder at a time (a second would redo the first one's segments)."""
        if fcntl is None:
            return
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"another frvideo batch is running on {self.out_dir}; wait for it "
                              f"(or see `frvideo batch --status {self.out_dir}`)") from None
        self._lock_fd = fd

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.db.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    # runs -----------------------------------------------------------------------------
    def start_run(self, engine: str, argv: list[str]) -> int:
        with self.db:
            cur = self.db.execute("INSERT INTO runs (started, engine, argv, pid) VALUES (?, ?, ?, ?)",
                                  (time.time(), engine, json.dumps(argv), os.getpid()))
        return int(cur.lastrowid)

    def finish_run(self, run: int, exit_code: int) -> None:
        with self.db:
            self.db.execute("UPDATE runs SET finished = ?, exit_code = ? WHERE id = ?", (time.time(), exit_code, run))

    # jobs -------------------------------------------------------------------------------
    def job(self, output: str) -> Optional[sqlite3.Row]:
        return self.db.execute("SELECT * FROM jobs WHERE output = ?", (output,)).fetchone()

    def jobs(self) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM jobs ORDER BY output").fetchall()

    def upsert_job(self, output: str, **values) -> None:
        with self.db:
            if self.job(output) is None:
                self.db.execute("INSERT INTO jobs (output, input) VALUES (?, ?)", (output, values.get("input", "")))
            if values:
                cols = ", ".join(f"{k} = ?" for k in values)
                self.db.execute(f"UPDATE jobs SET {cols} WHERE output = ?", (*values.values(), output))

    def reset_job(self, output: str) -> list[str]:
        """Forget a job's segments (input or settings changed); returns their files to delete."""
        files = [r["file"] for r in self.segments(output) if r["file"]]
        with self.db:
            self.db.execute("DELETE FROM segments WHERE output = ?", (output,))
        return files

    # segments ---------------------------------------------------------------------------
    def segments(self, output: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM segments WHERE output = ? ORDER BY idx", (output,)).fetchall()

    def plan(self, output: str, spans: list[dict]) -> None:
        with self.db:
            self.db.execute("DELETE FROM segments WHERE output = ?", (output,))
            for i, span in enumerate(spans):
                self.db.execute(f"INSERT INTO segments (output, idx, {', '.join(SEGMENT_PLAN)}) VALUES "
                                f"(?, ?, {', '.join('?' * len(SEGMENT_PLAN))})",
                                (output, i, *[span[k] for k in SEGMENT_PLAN]))
            self.db.execute("UPDATE jobs SET segments = ? WHERE output = ?", (len(spans), output))

    def update_segment(self, output: str, idx: int, **values) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self.db:
            self.db.execute(f"UPDATE segments SET {cols} WHERE output = ? AND idx = ?", (*values.values(), output, idx))

    # attempts ---------------------------------------------------------------------------
    def start_attempt(self, output: str, run: int, attempt: int) -> int:
        with self.db:
            cur = self.db.execute("INSERT INTO attempts (output, run, try, started, state) VALUES (?, ?, ?, ?, ?)",
                                  (output, run, attempt, time.time(), "running"))
        return int(cur.lastrowid)

    def finish_attempt(self, attempt_id: int, state: str, error: Optional[str] = None) -> None:
        with self.db:
            self.db.execute("UPDATE attempts SET finished = ?, state = ?, error = ? WHERE id = ?",
                            (time.time(), state, error, attempt_id))

    def attempts(self, output: str) -> list[sqlite3.Row]:
        return self.db.execute("SELECT * FROM attempts WHERE output = ? ORDER BY id", (output,)).fetchall()
