"""Speed and bf16 accuracy of the restoration backends at full official size, on CPU.

Each backend is built from its model card (or, for a backend without a card yet,
from the parity manifest's constructor), checked to have the official state-dict
keys and shapes, and loaded with the parity weights (``fill_state_dict`` of
../shared/parity/fill.py, the fixture folder's salt). Faces are the parity input
(1 x 3 x 512 x 512, RGB in [-1, 1]) repeated along the batch. The timed call is
``Restorer.restore`` at the card's default fidelity - what the pipeline runs per
batch when temporal smoothing is off (encode + argmax + decode).

Two precisions are measured side by side in one process, interleaved per
repeat so background load hits both alike:
  * fp32 (the network as built),
  * bf16 + channels_last: ``net.to(memory_format=torch.channels_last,
    dtype=torch.bfloat16)``, the input likewise.

Before any timing, each (model, precision) runs once on the parity input: that
is the warm-up, and its outputs give bf16's deviation from fp32 (image error,
token agreement) and fp32's agreement with the stored official outputs.

    .venv/bin/python bench/backends.py [--models codeformer,gfpgan,vqfr_v2,vqfr_v1]
        [--batches 1,4,8|none] [--repeats 1] [--threads 2] [--budget 150] [--fidelity F] [--shared DIR]

``--budget`` skips a timed cell (model, precision, batch) whose estimated run
time (batch-1 time x batch x repeats) is over that many seconds, so the default
run stays bounded on a small CPU; 0 = never skip. Output: a markdown table of
seconds per face (batch 1) and faces/s (every batch), then the bf16 deviations.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from frvideo.errors import ConfigError  # noqa: E402
from frvideo.models import ModelConfig, all_model_configs  # noqa: E402
from frvideo.restore import RestoreContext, Restorer, backend_class  # noqa: E402

# bench name -> parity folder, backend, arch.version (vqfr) and plugin package (fallback when the
# backend is not registered yet)
MODELS = {
    "codeformer": dict(folder="codeformer", backend="codeformer", version=None, plugin="plugins.codeformer"),
    "gfpgan": dict(folder="gfpgan_v1_4", backend="gfpgan", version=None, plugin="plugins.gfpgan"),
    "vqfr_v2": dict(folder="vqfr_v2", backend="vqfr", version=2, plugin="plugins.vqfr"),
    "vqfr_v1": dict(folder="vqfr_v1", backend="vqfr", version=1, plugin="plugins.vqfr"),
}
PRECISIONS = ("fp32", "bf16+CL")


def load_fill(parity_dir: Path):
    spec = importlib.util.spec_from_file_location("parity_fill", parity_dir / "fill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def restorer_class(spec: dict) -> type[Restorer]:
    try:
        return backend_class(spec["backend"])
    except ConfigError:  # not registered (yet): the plugin package directly
        module = importlib.import_module(spec["plugin"])
        return next(c for c in vars(module).values()
                    if isinstance(c, type) and issubclass(c, Restorer) and c is not Restorer)


def find_card(spec: dict) -> Optional[ModelConfig]:
    for card in all_model_configs("restorer"):
        if card.backend != spec["backend"]:
            continue
        if spec["version"] is None or card.arch.get("version", 2) == spec["version"]:
            return card
    return None


@dataclass
class Bench:
    name: str
    card_name: str
    restorer: dict  # precision -> Restorer
    fidelity: Optional[float]
    ref: Optional[np.ndarray]  # stored official output for this fidelity, if any
    times: dict = field(default_factory=dict)  # (precision, batch) -> [seconds]
    notes: list = field(default_factory=list)


def reference_name(name: str, fidelity: Optional[float]) -> Optional[str]:
    if name == "codeformer":
        return f"out_w{fidelity}"
    if name == "gfpgan":
        return "out"
    if name == "vqfr_v2":
        return f"main_dec_f{fidelity}"
    if name == "vqfr_v1":
        return "main_dec"
    return None


def build(name: str, parity_dir: Path, fill, fidelity_override: Optional[float] = None) -> Bench:
    spec = MODELS[name]
    folder = parity_dir / spec["folder"]
    manifest = json.loads((folder / "manifest.json").read_text())
    salt = json.loads((folder / "outputs.json").read_text())["salt"]
    cls = restorer_class(spec)
    card = find_card(spec)
    notes = []
    if card is None:
        arch = dict(manifest["constructor"])
        if spec["version"] is not None:
            arch["version"] = spec["version"]
        card = ModelConfig(name=f"{name} (no card: manifest constructor)", backend=spec["backend"], arch=arch)
        notes.append("no model card: built from the parity manifest's constructor")
    net = cls.build_network(dict(card.arch)).eval()
    sd = net.state_dict()
    keys = manifest["keys"]
    if set(sd) != set(keys) or any(list(sd[k].shape) != keys[k]["shape"] for k in keys):
        raise SystemExit(f"{name}: card {card.name!r} does not build the official architecture")
    net.load_state_dict(fill.fill_state_dict(sd, salt), strict=True)
    r32 = cls(net, card)
    net16 = to_bf16_channels_last(copy.deepcopy(net))
    r16 = cls(net16, card)
    fidelity = None
    if getattr(r32, "version", None) == 1:  # vqfr v1: no fidelity control
        fidelity = None
    elif hasattr(r32, "fidelity") and callable(r32.fidelity):  # vqfr v2
        fidelity = r32.fidelity(RestoreContext.single(1))
    elif hasattr(r32, "_fidelity"):  # codeformer
        fidelity = r32._fidelity(RestoreContext.single(1))
    if fidelity is not None and fidelity_override is not None:
        fidelity = float(fidelity_override)
    ref_name = reference_name(name, fidelity)
    ref_path = folder / f"{ref_name}.npy"
    ref = np.load(ref_path) if ref_name and ref_path.is_file() else None
    return Bench(name, card.name, {"fp32": r32, "bf16+CL": r16}, fidelity, ref, notes=notes)


def to_bf16_channels_last(net: torch.nn.Module) -> torch.nn.Module:
    """``net.to(memory_format=torch.channels_last, dtype=torch.bfloat16)``, except that Module.to
    refuses channels_last for a network holding 5-D tensors (GFPGAN's modulated conv weights are
    1 x out x in x k x k): then bf16 everywhere and channels_last for the 4-D tensors only."""
    try:
        return net.to(memory_format=torch.channels_last, dtype=torch.bfloat16)
    except RuntimeError:
        net.to(dtype=torch.bfloat16)
        with torch.no_grad():
            for t in list(net.parameters()) + list(net.buffers()):
                if t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=torch.channels_last)
        return net


def as_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "fp32":
        return x
    return x.to(memory_format=torch.channels_last, dtype=torch.bfloat16)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """The official tensor2img: clamp to [-1, 1], to [0, 255], round."""
    return ((img.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def deviation(b: Bench, x: torch.Tensor) -> dict:
    """Warm-up run of both precisions on the parity input, and what it tells about bf16."""
    out = {}
    ctx = RestoreContext.single(1, b.fidelity)
    res = {}
    for p in PRECISIONS:
        r = b.restorer[p]
        t = time.perf_counter()
        if r.has_codebook:
            enc = r.encode(as_input(x, p), ctx)
            tokens = enc.scores.argmax(-1)
            img = r.decode(enc, tokens, ctx)
            res[p] = (enc, tokens, img.float())
        else:
            res[p] = (None, None, r.restore(as_input(x, p), ctx).float())
        out[f"warmup_s_{p}"] = time.perf_counter() - t
    img32, img16 = res["fp32"][2], res["bf16+CL"][2]
    scale = max(1.0, float(img32.abs().max()))
    out["range"] = (float(img32.min()), float(img32.max()))
    out["scale"] = scale
    out["img_max"] = float((img16 - img32).abs().max())
    out["img_mean"] = float((img16 - img32).abs().mean())
    u32, u16 = to_uint8(img32), to_uint8(img16)
    du = np.abs(u32.astype(np.int16) - u16.astype(np.int16))
    out["u8_max"] = int(du.max())
    out["u8_mean"] = float(du.mean())
    out["u8_gt2"] = float((du > 2).mean() * 100)
    if b.ref is not None:
        out["fp32_vs_official"] = float(np.abs(img32.numpy() - b.ref).max())
        out["official_tol"] = 1e-3 * max(1.0, float(np.abs(b.ref).max()))
    if res["fp32"][1] is not None:
        t32, t16 = res["fp32"][1], res["bf16+CL"][1]
        out["tokens_agree"] = float((t32 == t16).float().mean() * 100)
        out["n_tokens"] = t32.numel()
        # bf16 decode from the fp32 tokens: the decoder's own error, without token flips
        r16 = b.restorer["bf16+CL"]
        same = r16.decode(res["bf16+CL"][0], t32.to(res["bf16+CL"][1].device), ctx).float()
        out["img_max_same_tokens"] = float((same - img32).abs().max())
        out["img_mean_same_tokens"] = float((same - img32).abs().mean())
        out["u8_max_same_tokens"] = int(np.abs(to_uint8(same).astype(np.int16) - u32.astype(np.int16)).max())
        s32, s16 = res["fp32"][0].scores, res["bf16+CL"][0].scores
        out["scores_max"] = float((s16 - s32).abs().max())
        top2 = s32.topk(2, dim=-1).values
        margin = top2[..., 0] - top2[..., 1]
        out["fp32_min_margin"] = float(margin.min())
        flipped = t32 != t16
        # a flip is a precision effect when the fp32 top-2 margin is within bf16's score error
        out["max_margin_flipped"] = float(margin[flipped].max()) if flipped.any() else 0.0
    return out


# The loose tolerance under which bf16 "still holds parity" (the fp32 one, 1e-3 * max(1, max|ref|) on images
# and exact tokens, is missed by two to three orders of magnitude). Relative to scale = max(1, max|fp32 image|):
LOOSE = dict(
    token_agree=90.0,  # % of tokens equal to fp32's ...
    flip_margin=2.0,   # ... and every flipped token a near-tie: fp32 top-2 margin <= 2 x max|bf16 - fp32 score|
    img_max=0.15,      # image decoded from the fp32 tokens (the whole image for GFPGAN): max abs <= 0.15 scale
    img_mean=0.02,     # and mean abs <= 0.02 scale
)


def loose_parity(d: dict) -> tuple[bool, str]:
    """(holds, why not) for one model's deviation figures."""
    fails = []
    if "tokens_agree" in d:
        if d["tokens_agree"] < LOOSE["token_agree"]:
            fails.append(f"tokens {d['tokens_agree']:.1f}% < {LOOSE['token_agree']:.0f}%")
        if d["max_margin_flipped"] > LOOSE["flip_margin"] * d["scores_max"]:
            fails.append("a flipped token was not a near-tie")
        img_max, img_mean = d["img_max_same_tokens"], d["img_mean_same_tokens"]
    else:
        img_max, img_mean = d["img_max"], d["img_mean"]
    if img_max > LOOSE["img_max"] * d["scale"]:
        fails.append(f"image max {img_max / d['scale']:.1%} of scale")
    if img_mean > LOOSE["img_mean"] * d["scale"]:
        fails.append(f"image mean {img_mean / d['scale']:.2%} of scale")
    return not fails, "; ".join(fails)


@torch.no_grad()
def timed(b: Bench, precision: str, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one restore call."""
    r = b.restorer[precision]
    c, t = time.process_time(), time.perf_counter()
    r.restore(x, RestoreContext.single(x.shape[0], b.fidelity))
    return time.perf_counter() - t, time.process_time() - c


def fmt_cell(times: Optional[list], batch: int, per_face: bool) -> str:
    if times is None:
        return "-"
    if isinstance(times, str):
        return times
    wall, cpu = min(times)  # the fastest repeat: least disturbed by other processes
    if per_face:
        return f"{wall / batch:.2f} ({cpu / batch:.1f})"
    return f"{batch / wall:.3f} ({cpu / batch:.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--batches", default="1,4,8", help="comma list; 'none' = only the bf16 deviation")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--fidelity", type=float, default=None,
                    help="CodeFormer w / VQFR v2 ratio (default: each model card's)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0 = torch default)")
    ap.add_argument("--budget", type=float, default=150.0,
                    help="skip a timed cell whose estimated seconds exceed this (0 = never skip)")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared")))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parity_dir = args.shared / "parity"
    fill = load_fill(parity_dir)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown} (known: {', '.join(MODELS)})")
    batches = [] if args.batches.strip() in ("", "none", "0") else [int(v) for v in args.batches.split(",")]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, load avg at start {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    t_all = time.perf_counter()
    for name in names:
        try:
            b = build(name, parity_dir, fill, args.fidelity)
        except (ImportError, StopIteration) as exc:
            print(f"{name}: not available ({type(exc).__name__}: {exc})", flush=True)
            continue
        x1 = torch.from_numpy(np.load(parity_dir / MODELS[name]["folder"] / "input.npy"))
        dev = deviation(b, x1)
        print(f"{name}: card {b.card_name}, fidelity {b.fidelity}, warm-up fp32 {dev['warmup_s_fp32']:.1f} s, "
              f"bf16 {dev['warmup_s_bf16+CL']:.1f} s", flush=True)
        est = {p: dev[f"warmup_s_{p}"] for p in PRECISIONS}
        for batch in batches:
            xb = x1.expand(batch, -1, -1, -1).contiguous()
            inputs = {p: as_input(xb, p) for p in PRECISIONS}
            todo = [p for p in PRECISIONS if not args.budget or est[p] * batch * args.repeats <= args.budget]
            for p in PRECISIONS:
                if p not in todo:
                    b.times[(p, batch)] = f"skipped (est. {est[p] * batch * args.repeats:.0f} s)"
            for _ in range(args.repeats):
                for p in todo:
                    try:
                        s, cpu = timed(b, p, inputs[p])
                    except RuntimeError as exc:  # e.g. CPU allocator out of memory
                        b.times[(p, batch)] = f"failed: {str(exc).splitlines()[0][:40]}"
                        continue
                    if isinstance(b.times.get((p, batch)), str):
                        continue
                    b.times.setdefault((p, batch), []).append((s, cpu))
                    print(f"  {name} {p} batch {batch}: {s:.2f} s ({batch / s:.3f} faces/s), cpu {cpu:.1f} s, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
            del inputs, xb
        b.dev = dev
        results.append(b)
        del b.restorer
    wall = time.perf_counter() - t_all
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2

    if batches:
        print()
        print(f"Timings: fastest of {args.repeats} repeat(s), {torch.get_num_threads()} threads, "
              f"whole run {wall / 60:.1f} min, peak RSS {peak:.1f} GiB, load avg at end {os.getloadavg()[0]:.2f}")
        print()
        print("Cells: wall-clock value (process CPU seconds per face, all threads). The CPU column is less "
              "sensitive to other processes competing for the cores than the wall-clock one.")
        print()
        cols = ["model", "precision", "batch 1: s/face"] + [f"batch {bs}: faces/s" for bs in batches]
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for b in results:
            for p in PRECISIONS:
                row = [b.name, p, fmt_cell(b.times.get((p, 1)), 1, True) if 1 in batches else "-"]
                row += [fmt_cell(b.times.get((p, bs)), bs, False) for bs in batches]
                print("| " + " | ".join(row) + " |")
    print()
    print(f"Run: {wall / 60:.1f} min, peak RSS {peak:.1f} GiB.")
    print()
    print("bf16+channels_last vs fp32 on the parity input (batch 1). img: max|bf16 - fp32| on the raw output; "
          "scale = max(1, max|fp32|); u8: after clamp to [-1,1] and rounding to 8 bits. Loose parity: "
          f"tokens >= {LOOSE['token_agree']:.0f}% equal, flips only near-ties (fp32 top-2 margin <= "
          f"{LOOSE['flip_margin']:g} x max score error); image from the fp32 tokens within "
          f"{LOOSE['img_max']:g} (max) / {LOOSE['img_mean']:g} (mean) x scale.")
    print()
    cols = ["model", "fidelity", "fp32 range", "fp32 vs official (tol)", "img max abs (rel.)", "img mean abs",
            "u8 max / mean / % >2", "tokens agree", "same tokens: img max abs (rel.) / mean abs (u8 max)",
            "scores max abs", "fp32 top-2 margin: min / max over flipped tokens", "loose parity"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for b in results:
        d = b.dev
        off = (f"{d['fp32_vs_official']:.2g} ({d['official_tol']:.2g})" if "fp32_vs_official" in d else "-")
        row = [b.name, str(b.fidelity) if b.fidelity is not None else "-",
               f"[{d['range'][0]:.2f}, {d['range'][1]:.2f}]", off,
               f"{d['img_max']:.3g} ({d['img_max'] / d['scale']:.2%})", f"{d['img_mean']:.3g}",
               f"{d['u8_max']} / {d['u8_mean']:.2f} / {d['u8_gt2']:.2f}%"]
        if "tokens_agree" in d:
            row += [f"{d['tokens_agree']:.1f}% of {d['n_tokens']}",
                    f"{d['img_max_same_tokens']:.3g} ({d['img_max_same_tokens'] / d['scale']:.1%}) / "
                    f"{d['img_mean_same_tokens']:.3g} ({d['u8_max_same_tokens']})",
                    f"{d['scores_max']:.3g}", f"{d['fp32_min_margin']:.2g} / {d['max_margin_flipped']:.2g}"]
        else:
            row += ["-", "-", "-", "-"]
        ok, why = loose_parity(d)
        row.append("holds" if ok else f"NO: {why}")
        print("| " + " | ".join(row) + " |")
    for b in results:
        for n in b.notes:
            print(f"note: {b.name}: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
