"""Pack a subset of a built face dataset small enough to carry to another machine.

``python -m frvideo.train.pack SRC --chunk DIR:MIB [--chunk DIR:MIB ...] --index DIR``

An accelerator machine lent for a short training burst takes a working tree of a few tens of MiB
(the device tool's limit is 64 MiB a call, and a warm machine keeps what earlier calls carried), while
a dataset of 512² PNG crops is gigabytes. This writes each distinct crop of SRC's index once, as a
JPEG at the training size (``--size``), into the chunk folders in order until each one's budget is
spent, and one ``index.jsonl`` in ``--index`` whose rows point at the packed files (relative paths, so
the chunks must sit side by side as they do here). Rows keep only the fields training reads (KEEP:
the affine and frame size give the trainer the valid box; ``size`` stays the source crop's, which is
what the affine refers to) and their multiplicity (an index that lists a crop three times to weight
it keeps doing so). Crops whose identity starts with a ``--last`` prefix are packed after all
others, in a random order, so a budget cut falls on them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

from ..errors import FrvideoError, InputError
from .dataset import read_image_rgb, read_index, _resize

# the index fields training reads (the valid box from affine, frame_size and size; sources and
# tracks for splits); the rest (landmarks, scores, ...) would be a third of the bytes carried
KEEP = ("identity", "track", "source", "affine", "frame_size", "size")


def _jpeg(path: Path, size: int, quality: int) -> np.ndarray:
    image = _resize(read_image_rgb(path), size)
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise InputError(f"could not encode {path} as JPEG")
    return data


def pack(src: Path, chunks: list[tuple[Path, float]], index_dir: Path, size: int = 256, quality: int = 92,
         last: tuple[str, ...] = (), seed: int = 0) -> dict:
    rows = read_index(src)
    by_file: dict[str, list[dict]] = {}
    for r in rows:
        by_file.setdefault(r["file"], []).append(r)
    is_late = {f: bool(last) and by_file[f][0].get("identity", "").startswith(last) for f in by_file}
    late = [f for f in by_file if is_late[f]]
    order = [f for f in by_file if not is_late[f]]
    order += [late[i] for i in np.random.default_rng(seed).permutation(len(late))]
    index_dir.mkdir(parents=True, exist_ok=True)
    crops = ((k, _jpeg(src / name, size, quality)) for k, name in enumerate(order))
    crop = next(crops, None)  # encoded once: the crop a chunk has no room for opens the next one
    out_rows, counts = [], []
    for folder, mib in chunks:
        folder.mkdir(parents=True, exist_ok=True)
        budget, used, n = mib * 2**20, 0, 0
        while crop is not None and used + crop[1].size <= budget:
            k, data = crop
            target = folder / f"{k:06d}.jpg"
            target.write_bytes(data.tobytes())
            rel = os.path.relpath(target, index_dir)
            out_rows += [{**{f: r[f] for f in KEEP if f in r}, "file": rel} for r in by_file[order[k]]]
            used += data.size
            n += 1
            crop = next(crops, None)
        counts.append({"folder": str(folder), "crops": n, "mib": round(used / 2**20, 2)})
    packed = sum(c["crops"] for c in counts)
    with open(index_dir / "index.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in out_rows)
    ids = {r.get("identity") for r in out_rows}
    return {"crops": packed, "of": len(order), "rows": len(out_rows), "identities": len(ids), "chunks": counts}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m frvideo.train.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="a built dataset folder (index.jsonl)")
    p.add_argument("--chunk", action="append", required=True, metavar="DIR:MIB",
                   help="a folder to fill and its budget in MiB (repeatable, filled in order)")
    p.add_argument("--index", type=Path, required=True, help="folder for the packed index.jsonl")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--quality", type=int, default=92, help="JPEG quality")
    p.add_argument("--last", action="append", default=[], metavar="PREFIX",
                   help="identities with this prefix go last, in a random order (repeatable)")
    args = p.parse_args(argv)
    chunks = []
    for c in args.chunk:
        folder, _, mib = c.rpartition(":")
        try:
            chunks.append((Path(folder), float(mib)))
        except ValueError:
            p.error(f"--chunk wants DIR:MIB, not {c!r}")
    try:
        report = pack(args.src, chunks, args.index, args.size, args.quality, tuple(args.last))
    except FrvideoError as exc:  # a missing dataset or crop: one line, not a traceback
        print(f"frvideo.train.pack: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
