"""Batch runner: local vs Ray local mode, its overhead, and frames lost/duplicated over random kills.

On a folder of the eval clips of ../shared/media/videos/eval (each cut to its first
``--frames`` frames at ``--width`` px with keyframes every ``--gop`` frames, so that the
``--segment-seconds`` segments are many; ``--frames 0`` keeps the whole clips as they are):

1. plain: ``pipeline.run_file`` on each clip in one process, models loaded once (what
   ``frvideo IN OUT`` does per file): the baseline;
2. ``frvideo batch --engine local``: segments, warm-up, join, hashes, sidecars, report;
3. ``frvideo batch --engine ray --workers 2`` (a local Ray started for the batch);
   its decoded frames compared with the local engine's (lossless FFV1: must be equal);
4. the kill test: the same batch in a fresh folder, as a subprocess (the real command line),
   SIGKILLed ``--kills`` times, each at a random moment within two segments' time of the
   run's start (its journal row written), each time started again, then run to the end; every output decoded and compared with the uninterrupted local run: frames lost
   (a pts of the reference missing), duplicated (a pts twice or one not in the reference),
   frames not bit-exact.

    OMP_NUM_THREADS=1 python bench/batch.py --segment-seconds 0 --kills 0   # timings, a segment per clip
    OMP_NUM_THREADS=1 python bench/batch.py --skip-plain --skip-ray        # 20 kills, 0.4 s segments

Writes OUT/batch.json. Wall times on a shared machine vary with the load: the load
average is recorded beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared"))
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def decoded(path: Path) -> list:
    with av.open(str(path)) as c:
        return [(f.pts, f.to_ndarray()) for f in c.decode(c.streams.video[0])]


def compare(got: list, want: list) -> dict:
    want_pts = [p for p, _ in want]
    got_pts = [p for p, _ in got]
    lost = len(set(want_pts) - set(got_pts))
    duplicated = len(got_pts) - len(set(got_pts)) + len(set(got_pts) - set(want_pts))
    ref = dict(want)
    differing = sum(1 for p, a in got if p in ref and not np.array_equal(a, ref[p]))
    return {"frames": len(got), "reference_frames": len(want), "lost": lost, "duplicated": duplicated,
            "not_bit_exact": differing}


def batch_argv(clips: Path, out: Path, args) -> list[str]:
    return [str(clips), "--out", str(out), "--model", args.model, "--detector", args.detector,
            "--segment-seconds", str(args.segment_seconds), "--warmup-frames", str(args.warmup),
            "--codec", "ffv1", "--ext", ".mkv", "--threads", "1", "-q"]


def run_cli(argv: list[str]) -> int:
    from frvideo.cli import main
    return main(["batch", *argv])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/frvideo-batch-bench"))
    ap.add_argument("--frames", type=int, default=48, help="frames kept of each eval clip (0: whole clips)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--gop", type=int, default=12)
    ap.add_argument("--segment-seconds", type=float, default=0.4)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--model", default="lite")
    ap.add_argument("--detector", default="yunet")
    ap.add_argument("--kills", type=int, default=20, help="0: timings only")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()

    from batch_clips import cut_clip

    shutil.rmtree(args.out, ignore_errors=True)
    clips = args.out / "clips"
    clips.mkdir(parents=True)
    for src in sorted((SHARED / "media" / "videos" / "eval").glob("*.mp4")):
        if args.frames:
            cut_clip(src, clips / src.name, frames=args.frames, width=args.width, gop=args.gop)
        else:
            shutil.copy(src, clips / src.name)
    result: dict = {"clips": sorted(p.name for p in clips.iterdir()), "settings": vars(args) | {"out": str(args.out)},
                    "cpus": os.cpu_count()}
    frames_total = sum(len(decoded(p)) for p in clips.iterdir())
    result["frames"] = frames_total
    print(f"{len(result['clips'])} clips, {frames_total} frames", flush=True)

    # 1. plain run_file per clip, models loaded once
    from frvideo.cli import _import_heavy, _parse_restore_args, prepare_restore
    from frvideo.pipeline import run_file
    _import_heavy()
    plain_dir = args.out / "plain"
    if args.skip_plain:
        loaded_clips = []
    else:
        loaded_clips = sorted(clips.iterdir())
    plain_dir.mkdir()
    t = time.perf_counter()
    loaded: dict = {}
    for p in loaded_clips:
        a, origin = _parse_restore_args([str(p), str(plain_dir / (p.stem + ".mkv")), "--model", args.model,
                                         "--detector", args.detector, "--codec", "ffv1", "--threads", "1", "-q"])
        setup = prepare_restore(a, origin, loaded)
        run_file(a.input, a.output, setup.restorer, setup.detector, setup.options)
    result["plain_s"] = time.perf_counter() - t
    result["load_plain"] = os.getloadavg()[0]
    print(f"plain run_file: {result['plain_s']:.1f} s", flush=True)

    # 2. local engine
    local = args.out / "local"
    t = time.perf_counter()
    code = run_cli(batch_argv(clips, local, args))
    result["local_s"] = time.perf_counter() - t
    result["load_local"] = os.getloadavg()[0]
    assert code == 0, code
    outputs = sorted(p.name for p in local.glob("*.mkv"))
    reference = {name: decoded(local / name) for name in outputs}
    import sqlite3
    db = sqlite3.connect(local / ".frvideo" / "journal.sqlite")
    result["segments"] = db.execute("SELECT COUNT(*) FROM segments").fetchone()[0]
    db.close()
    print(f"local engine: {result['local_s']:.1f} s ({result['segments']} segments)", flush=True)

    # 3. Ray local mode, 2 workers
    if not args.skip_ray:
        ray_dir = args.out / "ray"
        t = time.perf_counter()
        code = run_cli(batch_argv(clips, ray_dir, args) + ["--engine", "ray", "--workers", "2"])
        result["ray_s"] = time.perf_counter() - t
        result["load_ray"] = os.getloadavg()[0]
        assert code == 0, code
        result["ray_vs_local"] = {name: compare(decoded(ray_dir / name), reference[name]) for name in outputs}
        print(f"ray local mode (2 workers): {result['ray_s']:.1f} s; equal to local: "
              f"{all(c['not_bit_exact'] == 0 and c['lost'] == 0 and c['duplicated'] == 0 for c in result['ray_vs_local'].values())}",
              flush=True)

    # 4. kill -9 at random moments, start again each time, then finish
    if not args.skip_plain:
        result["overhead_local_vs_plain"] = result["local_s"] / result["plain_s"] - 1
    if "ray_s" in result:
        result["ray_vs_local_time"] = result["ray_s"] / result["local_s"]
    if args.kills == 0:
        (args.out / "batch.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps({k: v for k, v in result.items() if k != "ray_vs_local"}, indent=2, default=str))
        return
    kill_dir = args.out / "killed"
    argv = [sys.executable, "-m", "frvideo", "batch", *batch_argv(clips, kill_dir, args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    rng = random.Random(args.seed)
    # a kill comes at a random moment within about two segments' time after the run has started
    # (its journal row is there: sources listed, options checked; models load with the first segment)
    window = 2 * result["local_s"] / max(result["segments"], 1)
    journal = kill_dir / ".frvideo" / "journal.sqlite"

    def progress(pid=None):
        if not journal.exists():
            return None, 0
        db = sqlite3.connect(journal, timeout=30)
        try:
            started = db.execute("SELECT COUNT(*) FROM runs WHERE pid = ?", (pid,)).fetchone()[0] if pid else 0
            done = db.execute("SELECT COUNT(*) FROM segments WHERE state = 'done'").fetchone()[0]
            return started, done
        except sqlite3.OperationalError:  # the tables are being created
            return None, 0
        finally:
            db.close()

    kills = []
    for i in range(args.kills):
        delay = rng.uniform(0.0, window)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.perf_counter()
        while proc.poll() is None and not progress(proc.pid)[0] and time.perf_counter() - t0 < 120:
            time.sleep(0.05)
        before = progress()[1]
        try:
            proc.wait(timeout=delay)
            kills.append({"delay_s": round(delay, 2), "killed": False, "exit": proc.returncode})
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append({"after_start_s": round(delay, 2), "killed": True, "segments_done_before": before,
                          "segments_done_after": progress()[1]})
        print(f"kill {i + 1}: {kills[-1]}", flush=True)
    final = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert final.returncode == 0, final.stderr
    per_file = {name: compare(decoded(kill_dir / name), reference[name]) for name in outputs}
    result["kills"] = kills
    result["killed_runs"] = sum(k["killed"] for k in kills)
    result["after_kills"] = per_file
    result["frames_lost"] = sum(c["lost"] for c in per_file.values())
    result["frames_duplicated"] = sum(c["duplicated"] for c in per_file.values())
    result["frames_not_bit_exact"] = sum(c["not_bit_exact"] for c in per_file.values())
    leftovers = [str(p) for p in kill_dir.rglob("*") if ".partial-" in p.name or ".tmp-" in p.name]
    result["leftover_partials"] = leftovers
    print(f"{result['killed_runs']} kills: {result['frames_lost']} frames lost, {result['frames_duplicated']} "
          f"duplicated, {result['frames_not_bit_exact']} not bit-exact, {len(leftovers)} partial files left", flush=True)
    (args.out / "batch.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k not in ("kills", "after_kills", "ray_vs_local")},
                     indent=2, default=str))


if __name__ == "__main__":
    main()
