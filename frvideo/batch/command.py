"""``frvideo batch SRC... --out DIR [restore options]`` and ``frvideo batch --status DIR``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..argtypes import number
from ..errors import EXIT_BATCH_FAILED, EXIT_OK, ConfigError, InputError, OutputError, UsageError

# dests of the batch's own options (not restore options: not in a --config file or a manifest)
BATCH_DESTS = ("sources", "out", "status", "retries", "ext", "segment_seconds", "warmup_frames", "framemd5",
               "engine", "ray_address", "workers")
NOT_PER_FILE = ("config", "faces", "help", "input", "output", "version")


def _cli():
    from .. import cli
    return cli


class _BatchParser(argparse.ArgumentParser):
    """Options and sources in any order (``frvideo batch a.mp4 --model lite b.mp4 --out DIR``)."""

    _inner = False

    def error(self, message):
        raise UsageError(f"{message} (see `frvideo batch --help`)")

    def parse_known_args(self, args=None, namespace=None):
        if self._inner:  # argparse's intermixed parsing calls this again
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def build_batch_parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = _BatchParser(
        prog="frvideo batch",
        description="Restore many videos unattended: SRC are video files, folders (searched recursively) or "
                    "manifests (.csv/.jsonl: input, optional output, per-file options). Outputs keep their relative "
                    "paths under --out. A journal in DIR/.frvideo/ makes the batch resumable: done files are "
                    "skipped, a long file interrupted (even by kill -9) resumes at its first unfinished segment. "
                    "Beside each output: NAME.EXT.frvideo.json (provenance); DIR/report.html lists every file. "
                    "Every restore option of `frvideo IN OUT` applies to every file.")
    p.add_argument("sources", nargs="*", metavar="SRC", help="video files, folders, manifests (.csv, .jsonl)")
    p.add_argument("--version", action="version", version=f"frvideo {__version__}")
    b = p.add_argument_group("batch")
    b.add_argument("--out", metavar="DIR", help="output folder (created if missing)")
    b.add_argument("--status", metavar="DIR", help="print the table of the batch in DIR and exit")
    b.add_argument("--retries", type=number(int, 0, 100), default=0, metavar="N",
                   help="try a failed file N more times (its finished segments are kept; default 0)")
    b.add_argument("--ext", help="output container for every file, e.g. .mkv (default: the input's, "
                                 ".mkv where frvideo cannot write the input's)")
    b.add_argument("--segment-seconds", type=number(float, 0.0), default=60.0, metavar="S",
                   help="cut files into segments of at least S seconds, at keyframes (the unit of resume and "
                        "of Ray tasks; default 60; 0 = never cut)")
    b.add_argument("--warmup-frames", type=number(int, 0, 1000), default=30, metavar="N",
                   help="frames before each segment run through the pipeline (output dropped) to warm up its "
                        "temporal state, so segments join without a seam (default 30)")
    b.add_argument("--framemd5", action="store_true",
                   help="also write NAME.EXT.framemd5: the md5 of every decoded output frame (FFmpeg's layout)")
    b.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: one segment after another in this process (default); ray: Ray tasks")
    b.add_argument("--ray-address", metavar="ADDRESS",
                   help="--engine ray: an existing Ray cluster (default: a local Ray started for the batch)")
    b.add_argument("--workers", type=number(int, 1, 4096), metavar="N",
                   help="--engine ray without --ray-address: worker processes (default: the CPU count)")
    _cli().add_restore_options(p)
    return p


def _restore_dests() -> list[str]:
    return [a.dest for a in _cli().build_parser()._actions
            if a.dest not in ("help", "version", "input", "output", "config")]


def _settings(ns: argparse.Namespace) -> dict:
    """The restore options of a namespace as JSON-able values (the journal, the hash, the sidecar)."""
    out = {}
    for dest in _restore_dests():
        value = getattr(ns, dest)
        if isinstance(value, set):
            value = sorted(value)
        out[dest] = value
    return out


def _file_settings(base: dict, src) -> dict:
    """A manifest entry's own options over the batch's."""
    if not src.options and not src.values:
        return base
    cli = _cli()
    p = cli._Parser(prog="manifest options", add_help=False)
    cli.add_restore_options(p)
    p.set_defaults(**{k: (set(v) if k == "tracks" and v is not None else v) for k, v in base.items()})
    try:
        ns = p.parse_args(src.options)
    except UsageError as exc:
        raise ConfigError(f"{src.origin}: options: {str(exc).replace(' (see `frvideo --help`)', '')}") from None
    if ns.config is not None or ns.faces is not None:
        raise ConfigError(f"{src.origin}: --config and --faces are not per-file options")
    actions = {a.dest: a for a in p._actions}
    for key, value in src.values.items():
        dest = str(key).replace("-", "_")
        if dest not in actions or dest in NOT_PER_FILE:
            raise ConfigError(f"{src.origin}: unknown option {key!r}")
        action = actions[dest]
        if action.nargs == 0 and isinstance(value, str):  # a CSV cell: true/false as text
            word = value.strip().lower()
            if word not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                raise ConfigError(f"{src.origin}: {key}: must be true or false, not {value!r}")
            value = word in ("true", "yes", "1", "on")
        setattr(ns, dest, cli._config_value(action, str(key), value, src.origin))
    return _settings(ns)


def batch_main(argv: list[str]) -> int:
    cli = _cli()
    args, origin = cli._parse_restore_args(argv, build_batch_parser, cli.NOT_IN_CONFIG + BATCH_DESTS)
    if args.status is not None:
        if args.sources or args.out:
            raise UsageError("--status DIR takes no sources or --out")
        return print_status(Path(args.status))
    if not args.sources:
        raise UsageError("give the videos, folders or manifests to restore: frvideo batch SRC... --out DIR")
    if not args.out or not args.out.strip():
        raise UsageError("--out DIR is required (the folder the restored files go to)")
    if args.faces is not None:
        raise UsageError("--faces writes one file's faces; it is not a batch option")
    if args.engine != "ray":
        for dest in ("ray_address", "workers"):
            if getattr(args, dest) is not None:
                raise UsageError(f"--{dest.replace('_', '-')} applies to --engine ray")
    elif args.ray_address is not None and args.workers is not None:
        raise UsageError("--workers sizes a local Ray; an existing cluster (--ray-address) has its own")
    from ..io.writer import KNOWN_EXTENSIONS
    if args.ext is not None:
        args.ext = args.ext if args.ext.startswith(".") else "." + args.ext
        if args.ext.lower() not in KNOWN_EXTENSIONS:
            raise UsageError(f"--ext {args.ext}: not a container frvideo writes ({', '.join(sorted(KNOWN_EXTENSIONS))})")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {args.out} exists and is not a folder")
    from .sources import collect_sources
    sources = collect_sources(args.sources, out_dir, args.ext)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {args.out}: {exc.strerror or exc}") from None
    out_dir = out_dir.resolve()

    cli._import_heavy()
    from .engine import BatchOptions, BatchRun, Job, LocalExecutor, RayExecutor, settings_sha256
    from .journal import Journal
    from .provenance import model_identity
    from .segments import settings_namespace

    options = BatchOptions(out_dir=out_dir, retries=args.retries, engine=args.engine, framemd5=args.framemd5,
                           segment_seconds=args.segment_seconds, warmup=args.warmup_frames,
                           ray_address=args.ray_address, workers=args.workers, quiet=args.quiet)
    journal = Journal(out_dir)  # first: a second batch on the same folder stops here
    try:
        base = _settings(args)
        jobs = []
        identities: dict = {}
        for src in sources:
            settings = _file_settings(base, src)
            output = out_dir / src.output
            output.parent.mkdir(parents=True, exist_ok=True)
            ns = settings_namespace(settings, str(src.input), str(output))
            error = None
            try:  # every option checked before any work, against each file (a broken file fails alone)
                cli.validate_restore_args(ns, origin if settings is base else {})
            except InputError as exc:
                error = cli.one_line(str(exc))
            key = tuple(settings[k] for k in ("model", "weights", "detector", "detector_weights"))
            if key not in identities:
                identities[key] = model_identity(settings)
            models = identities[key]
            jobs.append(Job(src.output, src.input, output, settings, models,
                            settings_sha256(settings, models, options), src.origin, error))
        if args.engine == "ray":
            device = base["device"]
            executor = RayExecutor(args.ray_address, args.workers, args.threads or 1, device)
        else:
            executor = LocalExecutor()
        if not args.quiet:
            print(f"frvideo batch: {len(jobs)} file{'s' if len(jobs) != 1 else ''} -> {out_dir} "
                  f"(engine {args.engine}, journal {journal.path})", file=sys.stderr)
        return BatchRun(journal, jobs, options, argv).run(executor)
    finally:
        journal.close()


def print_status(out_dir: Path) -> int:
    from .journal import Journal

    journal = Journal(out_dir, create=False, lock=False)
    try:
        rows = journal.jobs()
        table = [("STATE", "TRIES", "SEGMENTS", "FRAMES", "FACES", "SECONDS", "OUTPUT", "ERROR")]
        failed = 0
        for job in rows:
            segments = journal.segments(job["output"])
            done = sum(s["state"] == "done" for s in segments)
            failed += job["state"] == "failed"
            table.append((job["state"], str(job["tries"]), f"{done}/{len(segments)}",
                          "" if job["frames"] is None else str(job["frames"]),
                          "" if job["faces"] is None else str(job["faces"]),
                          "" if job["seconds"] is None else f"{job['seconds']:.1f}",
                          job["output"], (job["error"] or "")[:120]))
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        counts: dict = {}
        for job in rows:
            counts[job["state"]] = counts.get(job["state"], 0) + 1
        print(f"{len(rows)} files: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        return EXIT_BATCH_FAILED if failed else EXIT_OK
    finally:
        journal.close()
