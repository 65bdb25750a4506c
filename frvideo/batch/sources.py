"""What a batch restores: video files, folders of them (recursively) and manifests.

A manifest is a CSV file (a header row naming the columns) or JSON lines (one object a
line). ``input`` is required (a path relative to the manifest's folder, or absolute);
``output`` optionally names the output (relative to ``--out``); ``options`` holds
restore options as on the command line (``"--model lite --fidelity 0.7"``, or a JSON list
of words); any other column or key is one option, as in a ``--config`` file
(``fidelity: 0.7``, ``only_largest: true``).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

from ..errors import ConfigError, InputError, UsageError

# Folder sources: files with these extensions are videos (case does not matter).
VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mts", ".nut", ".y4m",
                    ".mpg", ".mpeg", ".mxf", ".wmv", ".flv", ".dv", ".vob", ".ogv", ".3gp"}
MANIFEST_EXTENSIONS = {".csv", ".jsonl", ".ndjson"}


@dataclass
class JobSource:
    input: Path  # absolute
    output: str  # relative to the batch's --out folder, "/"-separated
    options: list = field(default_factory=list)  # command-line words for this file only
    values: dict = field(default_factory=dict)  # option: value pairs (as in a --config file)
    origin: str = ""  # where the job came from, for messages: "list.csv:3", "reels/"


def output_name(rel: PurePosixPath, ext: Optional[str]) -> str:
    """The output's relative name: the input's, with ``ext`` (``--ext``) or, where the input's
    container is not one frvideo writes, .mkv."""
    from ..io.writer import KNOWN_EXTENSIONS

    if ext:
        rel = rel.with_suffix(ext)
    elif rel.suffix.lower() not in KNOWN_EXTENSIONS:
        rel = rel.with_suffix(".mkv")
    return rel.as_posix()


def _checked_output(name: str, origin: str) -> str:
    p = PurePosixPath(str(name).replace("\\", "/"))
    if not str(name).strip() or p.is_absolute() or ".." in p.parts or p.name in ("", "."):
        raise ConfigError(f"{origin}: output {name!r} must be a file name inside --out (no absolute path, no ..)")
    return p.as_posix()


def collect_sources(sources: list[str], out_dir: Path, ext: Optional[str]) -> list[JobSource]:
    """Every job the command line names, in order; outputs checked to be distinct."""
    jobs: list[JobSource] = []
    out_resolved = out_dir.resolve()
    for src in sources:
        path = Path(src)
        if not path.exists():
            raise InputError(f"batch source not found: {src}")
        if path.is_dir():
            jobs += _folder_jobs(path, out_resolved, ext)
        elif path.suffix.lower() in MANIFEST_EXTENSIONS:
            jobs += _manifest_jobs(path, ext)
        else:
            jobs.append(JobSource(path.resolve(), output_name(PurePosixPath(path.name), ext), origin=src))
    if not jobs:
        raise InputError(f"no videos found in {', '.join(sources)} (extensions: "
                         f"{', '.join(sorted(VIDEO_EXTENSIONS))})")
    seen: dict[str, JobSource] = {}
    for job in jobs:
        key = job.output.lower()  # a case-insensitive file system would merge them
        if key in seen:
            raise UsageError(f"two inputs would write the same output {job.output}: {seen[key].input} and "
                             f"{job.input} (name one in a manifest's output column)")
        seen[key] = job
    return jobs


def _folder_jobs(folder: Path, out_dir: Path, ext: Optional[str]) -> list[JobSource]:
    root = folder.resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        # never descend into the batch's own output (``frvideo batch . --out restored``) or hidden folders
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (here / d).resolve() != out_dir)
        for name in sorted(filenames):
            p = here / name
            if name.startswith(".") or p.suffix.lower() not in VIDEO_EXTENSIONS or not p.is_file():
                continue
            rel = PurePosixPath(p.relative_to(root).as_posix())
            found.append(JobSource(p, output_name(rel, ext), origin=f"{folder}/"))
    return found


def _manifest_rows(path: Path):
    """(line number, dict) of each entry."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read manifest {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "input" not in [f.strip() for f in reader.fieldnames]:
            raise ConfigError(f"{path}: a CSV manifest needs a header row with an 'input' column")
        for row in reader:
            clean = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if None in row:
                raise ConfigError(f"{path}:{reader.line_num}: more values than columns")
            yield reader.line_num, {k: v for k, v in clean.items() if v != ""}
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}:{number}: each line must be a JSON object with an 'input' key")
        yield number, entry


def _manifest_jobs(path: Path, ext: Optional[str]) -> list[JobSource]:
    import shlex

    jobs = []
    for number, entry in _manifest_rows(path):
        origin = f"{path}:{number}"
        entry = dict(entry)
        source = entry.pop("input", None)
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"{origin}: no input")
        file = Path(source).expanduser()
        if not file.is_absolute():
            file = path.parent / file
        output = entry.pop("output", None)
        if output is not None and not isinstance(output, str):
            raise ConfigError(f"{origin}: output must be a text")
        options = entry.pop("options", [])
        if isinstance(options, str):
            try:
                options = shlex.split(options)
            except ValueError as exc:
                raise ConfigError(f"{origin}: options: {exc}") from None
        if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
            raise ConfigError(f"{origin}: options must be a text or a list of texts")
        rel = _checked_output(output, origin) if output else output_name(PurePosixPath(file.name), ext)
        if output and not PurePosixPath(rel).suffix:
            rel = output_name(PurePosixPath(rel), ext or PurePosixPath(file.name).suffix or ".mkv")
        jobs.append(JobSource(file.resolve(), rel, options, entry, origin))
    return jobs
