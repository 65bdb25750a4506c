"""frvideo against the official CodeFormer video script, side by side (A B A B).

The anchor of the speed and memory claims: the official ``inference_codeformer.py`` of
sczhou/CodeFormer at a pinned commit, run unchanged, and ``frvideo`` on the same clip with
the same weights, one after the other, each as a whole process. Printed per run: wall
time, CPU time (user + system of the process and the children it waited for, e.g. the
official side's ffmpeg) and peak RSS, from ``os.wait4``; then the medians and the ratios
frvideo / official.

Same work on both sides: CodeFormer with parity-filled weights in the official file
format (bench/make_filled_checkpoint.py: the real architecture and cost, not trained, so
the faces come out as noise), the real RetinaFace MobileNet-0.25 from ../shared/weights,
fidelity w 0.5, no upscaling (``-w 0.5 --upscale 1 --detection_model retinaface_mobile0.25``
on the official side). The official script also runs its face parser (ParseNet, hard-wired
``use_parse=True``) for its paste mask: its weights are parity-filled too (official class,
../shared/parity/fill.py). frvideo runs with its defaults (``--precision auto``: bf16 only
where the CPU has bf16 units; ``--precision fp32`` with ``--frvideo-args``).

The official side needs what its requirements.txt lists and frvideo does not:
``pip install scipy ffmpeg-python pillow`` and ``pip install --no-deps lpips`` (--no-deps:
lpips would pull torchvision and a CUDA torch), plus the ffmpeg program. torchvision
cannot be imported on the project's CPU machine (CUDA-only wheel), so the official side
runs with bench/anchor_standin/ on its PYTHONPATH: our stand-in for the few torchvision
functions its inference path calls. ``basicsr/version.py`` is written as the official
install step (``python basicsr/setup.py develop``) would write it.

    git clone https://github.com/sczhou/CodeFormer /tmp/CodeFormer   # any clone holding the pinned commit
    python bench/anchor.py --official /tmp/CodeFormer [--pairs 2] [--frames 8]

Run it on a quiet machine: both sides use the cores they find (the environment's
OMP_NUM_THREADS / MKL_NUM_THREADS are removed for the runs unless --keep-thread-env).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import av

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
STANDIN = Path(__file__).resolve().parent / "anchor_standin"
OFFICIAL_COMMIT = "b33cc7d639d6545bfcccc7e0bc6ae51f24e79c2b"  # the commit ../shared/parity/codeformer was made from
DEFAULT_CLIP = SHARED / "media" / "videos" / "eval" / "retalk_1.mp4"  # 700 x 700, one face
RETINAFACE = "detection_mobilenet0.25_Final.pth"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")

FILL_PARSENET = """
import sys, importlib.util, torch
spec = importlib.util.spec_from_file_location("fill", sys.argv[1]); fill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fill)
from facelib.parsing.parsenet import ParseNet
net = ParseNet(in_size=512, out_size=512, parsing_ch=19)  # as facelib.parsing.init_parsing_model builds it
torch.save(fill.fill_state_dict(net.state_dict(), 0), sys.argv[2])
"""


def fail(msg: str) -> None:
    sys.exit(f"anchor: {msg}")


def extract_official(source: Path, dest: Path) -> None:
    """The pinned commit's files, unchanged, from any clone (bare or not) holding it."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(source), "archive", OFFICIAL_COMMIT], capture_output=True)
    if archive.returncode:
        fail(f"{source} does not hold sczhou/CodeFormer@{OFFICIAL_COMMIT[:8]}: "
             f"{archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    version = (dest / "basicsr" / "VERSION").read_text().strip()
    (dest / "basicsr" / "version.py").write_text(
        f"# GENERATED VERSION FILE (what basicsr/setup.py writes)\n__version__ = '{version}'\n"
        f"__gitsha__ = '{OFFICIAL_COMMIT[:7]}'\nversion_info = ({', '.join(version.split('.'))})\n")


def official_env(base: dict) -> dict:
    """The official code runs from its own folder, with our torchvision stand-in importable."""
    return base | {"PYTHONPATH": os.pathsep.join([str(STANDIN), "."])}


def prepare_weights(official: Path, work: Path) -> Path:
    """Filled CodeFormer and ParseNet, real RetinaFace, where the official loaders look first."""
    retinaface = SHARED / "weights" / RETINAFACE
    if not retinaface.is_file():
        fail(f"{retinaface} is missing (the real RetinaFace MobileNet-0.25 weights)")
    codeformer = work / "home" / "weights" / "codeformer.pth"
    codeformer.parent.mkdir(parents=True)
    subprocess.run([sys.executable, str(REPO / "bench" / "make_filled_checkpoint.py"), "codeformer",
                    str(codeformer)], check=True, stdout=subprocess.DEVNULL)
    (official / "weights" / "CodeFormer").mkdir(parents=True, exist_ok=True)
    (official / "weights" / "facelib").mkdir(parents=True, exist_ok=True)
    shutil.copy(codeformer, official / "weights" / "CodeFormer" / "codeformer.pth")
    shutil.copy(retinaface, official / "weights" / "facelib" / RETINAFACE)
    shutil.copy(retinaface, work / "home" / "weights" / RETINAFACE)
    parse = subprocess.run([sys.executable, "-c", FILL_PARSENET, str(SHARED / "parity" / "fill.py"),
                            str(official / "weights" / "facelib" / "parsing_parsenet.pth")],
                           cwd=official, env=official_env(dict(os.environ)), capture_output=True, text=True)
    if parse.returncode:
        fail("the official code does not import here (install its extra packages, see this file's "
             f"docstring):\n{parse.stderr.strip().splitlines()[-1]}")
    return codeformer


def make_clip(source: Path, frames: int, dest: Path) -> None:
    """The first `frames` frames of `source` at a constant 25 fps, x264 crf 12, no audio."""
    with av.open(str(source)) as src, av.open(str(dest), "w") as out:
        vin = src.streams.video[0]
        vout = out.add_stream("libx264", rate=25)
        vout.width, vout.height, vout.pix_fmt = vin.width, vin.height, "yuv420p"
        vout.options = {"crf": "12"}
        for i, frame in enumerate(src.decode(vin)):
            if i == frames:
                break
            frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            out.mux(vout.encode(frame))
        out.mux(vout.encode(None))


def count_frames(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def measure(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Wall, CPU (user + sys, children included) and peak RSS of one whole process."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        fail(f"{shlex.join(cmd)} exited {proc.returncode}; its log: {log}\n" + log.read_text()[-2000:])
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="a clone of sczhou/CodeFormer holding the pinned commit")
    ap.add_argument("--clip", type=Path, default=DEFAULT_CLIP)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=2, help="official, frvideo, official, frvideo, ...")
    ap.add_argument("--frvideo-args", default="", help="extra frvideo options, e.g. '--precision fp32'")
    ap.add_argument("--keep-thread-env", action="store_true", help="keep OMP_NUM_THREADS etc. for the runs")
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--json", type=Path, help="also write the runs and ratios here")
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        fail("the official script needs the ffmpeg program (apt-get install ffmpeg)")
    if not args.clip.is_file():
        fail(f"no clip {args.clip}")

    work = args.work or Path(tempfile.mkdtemp(prefix="frvideo-anchor-"))
    work = work.resolve()
    try:
        official = work / "official"
        if official.exists():
            shutil.rmtree(official)
        if (work / "home").exists():
            shutil.rmtree(work / "home")
        extract_official(args.official, official)
        codeformer = prepare_weights(official, work)
        clip = work / "clip.mp4"
        make_clip(args.clip, args.frames, clip)

        env = dict(os.environ)
        if not args.keep_thread_env:
            for k in THREAD_ENV:
                env.pop(k, None)
        off_env = official_env(env)
        fr_env = env | {"FRVIDEO_HOME": str(work / "home")}
        off_out = work / "official_out"
        off_cmd = [sys.executable, "inference_codeformer.py", "-i", str(clip), "-o", str(off_out),
                   "-w", "0.5", "--upscale", "1", "--detection_model", "retinaface_mobile0.25"]
        fr_out = work / "frvideo_out.mp4"
        fr_cmd = [sys.executable, "-m", "frvideo", str(clip), str(fr_out), "--model", "codeformer",
                  "--weights", str(codeformer), "--detector", "retinaface-mobile", "--fidelity", "0.5",
                  *shlex.split(args.frvideo_args)]
        print(f"clip: {args.clip.name}, first {args.frames} frames; official: sczhou/CodeFormer@{OFFICIAL_COMMIT[:8]}")
        print(f"official: {shlex.join(off_cmd)}\nfrvideo:  {shlex.join(fr_cmd)}")
        runs = {"official": [], "frvideo": []}
        for pair in range(args.pairs):
            for side, cmd, cwd, side_env in (("official", off_cmd, official, off_env),
                                             ("frvideo", fr_cmd, REPO, fr_env)):
                if side == "official" and off_out.exists():
                    shutil.rmtree(off_out)
                r = measure(cmd, cwd, side_env, work / f"{side}_{pair}.log")
                made = off_out / f"{clip.stem}.mp4" if side == "official" else fr_out
                r["frames_out"] = count_frames(made)
                if r["frames_out"] != args.frames:
                    fail(f"{side} wrote {r['frames_out']} frames of {args.frames}")
                runs[side].append(r)
                print(f"  {side:8s} run {pair + 1}: wall {r['wall_s']:7.1f} s  CPU {r['cpu_s']:7.1f} s  "
                      f"peak RSS {r['peak_rss_mib']:6.0f} MiB", flush=True)
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_mib")}
               for side, rs in runs.items()}
        ratio = {k: med["frvideo"][k] / med["official"][k] for k in med["official"]}
        print("medians:          wall s   CPU s   peak RSS MiB")
        for side in ("official", "frvideo"):
            m = med[side]
            print(f"  {side:14s} {m['wall_s']:7.1f} {m['cpu_s']:7.1f} {m['peak_rss_mib']:8.0f}")
        print(f"  frvideo/official {ratio['wall_s']:6.2f}  {ratio['cpu_s']:6.2f}  {ratio['peak_rss_mib']:7.2f}"
              "   (goals: <= 0.67, <= 0.50, <= 1.00)")
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "medians": med, "ratios": ratio,
                                             "official": off_cmd, "frvideo": fr_cmd}, indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
