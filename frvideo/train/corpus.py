"""Build a multi-repository face corpus from a manifest: ``python -m frvideo.train.corpus``.

A manifest (``configs/datasets/faces_v2.yaml``) lists sources: a public
repository pinned at a commit (or a local folder such as ``../shared/media``),
the globs of the files taken, their licence, how the identity of each file is
known, the crop tier and the share of identities held out for validation.
The builder

1. lays each repository's files out under ``--checkouts`` (``git archive`` of
   the pinned commit from a bare clone: ``--git`` names where clones come from,
   a URL template or a folder of mirrors);
2. selects files by the globs; drops every file whose sha256 is an eval clip's
   (``SHA256SUMS`` entries under ``media/videos/eval``), whose name matches an
   ``eval_exclude.names`` glob, or whose picture is a near-copy of a frame of an
   eval clip (difference hash of the whole picture, Hamming distance
   <= ``eval_exclude.max_distance``); then drops exact (sha256) and near
   (difference hash) duplicates across all sources, the first source listed
   keeping its copy;
3. splits identities into train and validation (per source, the identities
   with the smallest sha1 of ``namespace:identity``; a namespace shared by two
   sources, e.g. LFW names, splits the same way in both);
4. writes source lists of at most ``--part-size`` files and runs
   ``frvideo dataset --source-list`` on each part (``train/<part>/``,
   ``val/<part>/``); a part with an ``index.jsonl`` is done, so a stopped build
   resumes where it was;
5. merges the parts into ``train/index.jsonl`` and ``val/index.jsonl``
   (:class:`frvideo.train.dataset.FaceCropDataset` roots; ``train_512/``,
   ``train_256/``, ... hold one crop size each, pointing into ``train/``) and writes
   ``report.yaml``: per source, files taken and dropped (and why), identities,
   crops kept, crops by face size.

Usage::

    python -m frvideo.train.corpus configs/datasets/faces_v2.yaml --checkouts DIR --out DIR \\
        [--git 'https://github.com/{owner}/{name}.git'] [--shared ../shared] [--part-size 2000] [--dry-run]
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import cv2
import numpy as np
import yaml

from ..errors import ConfigError, InputError, UsageError
from .dataset import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, pad_fraction, read_index

__all__ = ["dhash", "hamming", "identity_of", "split_identities", "near_duplicates", "FACE_BUCKETS", "main"]

FACE_BUCKETS = ((0, 128), (128, 192), (192, 256), (256, 10 ** 9))
GIT_DEFAULT = "https://github.com/{owner}/{name}.git"


# -- picture hashes ---------------------------------------------------------------------
# A 64-bit difference hash (Krawetz's dHash) is a few lines of OpenCV; none of
# the project's dependencies ships one, and it is all near-duplicate checks need.


HASH_WORDS = 4  # 256 bits: a 64-bit hash calls different people's centred passport-like photos the same


def dhash(rgb_or_grey: np.ndarray) -> np.ndarray:
    """256-bit difference hash (4 x uint64): signs of horizontal gradients of the 17x16 grey thumbnail."""
    grey = rgb_or_grey if rgb_or_grey.ndim == 2 else cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2GRAY)
    small = cv2.resize(grey, (17, 16), interpolation=cv2.INTER_AREA).astype(np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return np.packbits(bits).view(">u8").astype(np.uint64)


def hamming(a, b) -> np.ndarray:
    """Pairwise Hamming distances of two arrays of hashes (n x 4 uint64 each): len(a) x len(b)."""
    a = np.asarray(a, np.uint64).reshape(-1, HASH_WORDS)[:, None, :]
    b = np.asarray(b, np.uint64).reshape(-1, HASH_WORDS)[None, :, :]
    return np.bitwise_count(a ^ b).sum(-1).astype(np.int32)


def near_duplicates(hashes, max_distance: int, chunk: int = 256) -> list[int]:
    """For each hash, the index of an earlier one within ``max_distance`` (itself if none)."""
    h = np.asarray(hashes, np.uint64).reshape(-1, HASH_WORDS)
    first = np.arange(len(h))
    for start in range(0, len(h), chunk):
        block = h[start:start + chunk]
        d = hamming(block, h[:start + len(block)])
        for i in range(len(block)):
            row = d[i, :start + i]
            close = np.flatnonzero(row <= max_distance)
            if close.size:
                first[start + i] = first[close[0]]
    return first.tolist()


def picture_hashes(path: Path, kind: str, frames: int = 3) -> list[int]:
    """dHash of an image, or of ``frames`` frames spread over a video (first, middle, ...)."""
    if kind == "image":
        data = np.fromfile(str(path), np.uint8)
        img = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
        return [] if img is None else [dhash(img)]
    cap = cv2.VideoCapture(str(path))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    out = []
    for k in range(frames):
        if n > 0:
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(k * (n - 1) / max(frames - 1, 1)))
        ok, frame = cap.read()
        if ok:
            out.append(dhash(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)))
    cap.release()
    return out


def clip_frame_hashes(path: Path, every: int = 5) -> list[int]:
    """dHash of every ``every``-th frame of a clip (the eval clips, to find copies of them)."""
    cap = cv2.VideoCapture(str(path))
    out, i = [], 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if i % every == 0:
            out.append(dhash(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)))
        i += 1
    cap.release()
    return out


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- identities and splits ----------------------------------------------------------------


def identity_of(relpath: str, rule: dict) -> str:
    """The identity of a file from its path inside the source, by the manifest's rule:
    ``folder`` (the parent folder's name), ``stem`` (the file name without extension),
    ``file`` (the whole relative path: one identity per file), ``regex`` (group ``id``
    of ``pattern`` matched against the relative path), ``fixed`` (``value``), ``map`` (``values``: relative path -> identity, the stem for
    paths not listed: files known to show the same person)."""
    kind = rule.get("rule", "file")
    p = Path(relpath)
    if kind == "map":
        return str((rule.get("values") or {}).get(relpath, p.stem))
    if kind == "folder":
        return p.parent.name
    if kind == "stem":
        return p.stem
    if kind == "file":
        return relpath
    if kind == "fixed":
        return str(rule["value"])
    if kind == "regex":
        m = re.search(rule["pattern"], relpath)
        if not m:
            raise ConfigError(f"identity pattern {rule['pattern']!r} does not match {relpath}")
        return m.group("id")
    raise ConfigError(f"unknown identity rule {kind!r} (folder, stem, file, regex, fixed, map)")


def split_identities(identities: Iterable[str], fraction: float) -> set[str]:
    """The held-out identities: the round(fraction * n) with the smallest sha1. Stable across runs
    and machines, and the same person falls on the same side in every source sharing a namespace."""
    ids = sorted(set(identities), key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    return set(ids[:int(round(fraction * len(ids)))])


# -- the manifest ---------------------------------------------------------------------------


@dataclass
class Candidate:
    source: str
    path: Path  # absolute, in the checkout
    rel: str  # path inside the source
    kind: str  # image | video
    identity: str = ""
    sha256: str = ""
    hashes: list = field(default_factory=list)
    dropped: str = ""  # why, when it is not taken
    split: str = "train"


def load_manifest(path: Path) -> dict:
    try:
        m = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc}") from None
    if not isinstance(m, dict) or not isinstance(m.get("sources"), list) or not m["sources"]:
        raise ConfigError(f"{path} has no sources list")
    tiers = m.get("tiers") or {}
    ids = set()
    for s in m["sources"]:
        for key in ("id", "include", "tier", "licence"):
            if key not in s:
                raise ConfigError(f"{path}: source {s.get('id', '?')} lacks {key!r}")
        if s["id"] in ids:
            raise ConfigError(f"{path}: source id {s['id']!r} twice")
        ids.add(s["id"])
        if s["tier"] not in tiers:
            raise ConfigError(f"{path}: source {s['id']} names tier {s['tier']!r}, not in tiers")
        if ("repo" in s) == ("local" in s):
            raise ConfigError(f"{path}: source {s['id']} needs exactly one of repo (+commit) or local")
        if "repo" in s and not re.fullmatch(r"[0-9a-f]{40}", str(s.get("commit", ""))):
            raise ConfigError(f"{path}: source {s['id']} needs a 40-hex commit")
    return m


def _git(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], check=True, capture_output=True, **kw)


def checkout(source: dict, checkouts: Path, git: str) -> Path:
    """The files of a repository source at its commit, laid out once under ``checkouts``."""
    owner, name = source["repo"].split("/")
    dest = checkouts / f"{owner}+{name}@{source['commit'][:12]}"
    done = dest / ".frvideo-complete"
    if done.exists():
        return dest
    where = git.format(owner=owner, name=name)
    bare = checkouts / ".git-cache" / f"{owner}+{name}.git"
    if Path(where).is_dir():  # a local clone: bare, or a work tree's .git
        git_dir = Path(where) / ".git" if (Path(where) / ".git").is_dir() else Path(where)
    else:
        git_dir = bare
        if not bare.exists():
            bare.parent.mkdir(parents=True, exist_ok=True)
            _git("clone", "--bare", "--quiet", where, str(bare))
    tmp = dest.with_name(dest.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Only the files the globs take, blob by blob: `git archive` stops at the first blob a partial
    # clone or a size-capped mirror lacks; those are listed in .frvideo-missing instead.
    listing = _git(f"--git-dir={git_dir}", "ls-tree", "-r", "-z", source["commit"]).stdout.split(b"\0")
    wanted = []
    for item in listing:
        if not item:
            continue
        meta, path = item.split(b"\t", 1)
        mode, kind, sha = meta.split()
        rel = path.decode()
        if kind == b"blob" and _matches(rel, source["include"]):
            wanted.append((sha.decode(), rel))
    missing = []
    cat = subprocess.Popen(["git", f"--git-dir={git_dir}", "cat-file", "--batch"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
    for sha, rel in wanted:
        cat.stdin.write(sha.encode() + b"\n")
        cat.stdin.flush()
        header = cat.stdout.readline().split()
        if len(header) < 3 or header[1] != b"blob":
            missing.append(rel)
            continue
        data = cat.stdout.read(int(header[2]))
        cat.stdout.read(1)
        out = tmp / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    cat.stdin.close()
    cat.wait()
    (tmp / ".frvideo-missing").write_text("".join(m + "\n" for m in missing))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    done.write_text(source["commit"] + "\n")
    return dest


def _matches(rel: str, globs: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, g) for g in globs)


def list_candidates(source: dict, root: Path) -> list[Candidate]:
    out = []
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(root).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if not _matches(rel, source["include"]) or _matches(rel, source.get("exclude", [])):
            continue
        ext = p.suffix.lower()
        kind = "video" if ext in VIDEO_EXTENSIONS else "image" if ext in IMAGE_EXTENSIONS else None
        if kind is None:
            continue
        rule = source.get("identity", {"rule": "file"})
        ident = identity_of(rel, rule)
        namespace = rule.get("namespace", source["id"])
        out.append(Candidate(source["id"], p, rel, kind, identity=f"{namespace}:{ident}"))
    return out


def eval_fingerprints(manifest: dict, shared: Path) -> tuple[set[str], list[int]]:
    """sha256 of every eval clip (SHA256SUMS) and dHashes of their frames."""
    ex = manifest.get("eval_exclude") or {}
    shas, frames = set(), []
    sums = shared / ex.get("sha256sums", "media/SHA256SUMS")
    prefix = ex.get("sha256_prefix", "media/videos/eval/")
    if not sums.is_file():
        raise InputError(f"{sums} not found: the eval clips' hashes are needed to keep them out")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith(prefix):
            shas.add(parts[0])
    clips = shared / ex.get("clips", "media/videos/eval")
    for clip in sorted(clips.glob("*")):
        if clip.suffix.lower() in VIDEO_EXTENSIONS:
            shas.add(sha256_of(clip))
            frames.extend(clip_frame_hashes(clip))
    if not shas:
        raise InputError(f"no eval clip hashes under {prefix} in {sums}")
    return shas, frames


# -- the build --------------------------------------------------------------------------------


def select(manifest: dict, roots: dict[str, Path], shared: Path, log=print) -> list[Candidate]:
    """Every candidate of every source, with ``dropped`` set for those not taken and ``split`` set."""
    ex = manifest.get("eval_exclude") or {}
    eval_shas, eval_frames = eval_fingerprints(manifest, shared)
    eval_names = ex.get("names", [])
    eval_dist = int(ex.get("max_distance", 24))
    dup_dist = int((manifest.get("dedup") or {}).get("max_distance", 12))
    cands: list[Candidate] = []
    for s in manifest["sources"]:
        found = list_candidates(s, roots[s["id"]])
        log(f"  {s['id']}: {len(found)} files match")
        cands.extend(found)
    eval_h = np.asarray(eval_frames, np.uint64).reshape(-1, HASH_WORDS)
    for i, c in enumerate(cands):
        c.sha256 = sha256_of(c.path)
        c.hashes = picture_hashes(c.path, c.kind)
        if i % 2000 == 0 and i:
            log(f"  hashed {i}/{len(cands)}")
    for c in cands:
        if c.sha256 in eval_shas:
            c.dropped = "eval clip (sha256)"
        elif _matches(c.rel, eval_names) or _matches(Path(c.rel).name, eval_names):
            c.dropped = "eval clip (name)"
        elif not c.hashes:
            c.dropped = "unreadable"
        elif eval_h.size and hamming(c.hashes, eval_h).min() <= eval_dist:
            c.dropped = "eval clip (picture)"
    seen: dict[str, Candidate] = {}
    for c in cands:
        if c.dropped:
            continue
        if c.sha256 in seen:
            c.dropped = f"duplicate of {seen[c.sha256].source}:{seen[c.sha256].rel} (sha256)"
        else:
            seen[c.sha256] = c
    # videos first: a still that is a frame of a clip goes, not the clip
    live = sorted((c for c in cands if not c.dropped), key=lambda c: c.kind != "video")
    firsts = near_duplicates([c.hashes[0] for c in live], dup_dist)
    for c, f in zip(live, firsts):
        if live[f] is not c:
            c.dropped = f"near-duplicate of {live[f].source}:{live[f].rel} (dhash)"
    # splits: per source, by identity; a namespace shared by sources splits once
    by_ns: dict[str, set] = defaultdict(set)
    frac_of: dict[str, float] = {}
    for s in manifest["sources"]:
        frac_of[s["id"]] = float(s.get("val_fraction", 0.0))
    for c in cands:
        if not c.dropped:
            by_ns[(c.identity.split(":", 1)[0], frac_of[c.source])].add(c.identity)
    val: set[str] = set()
    for (ns, frac), ids in by_ns.items():
        val |= split_identities(ids, frac)
    for c in cands:
        c.split = "val" if c.identity in val else "train"
    # a person held out anywhere is held out everywhere
    return cands


def plan_parts(manifest: dict, cands: list[Candidate], part_size: int) -> list[dict]:
    sources = {s["id"]: s for s in manifest["sources"]}
    parts = []
    for split in ("train", "val"):
        for sid in sources:
            # videos apart from stills: a slow clip part is not rebuilt when a photo is added or removed
            for kind, tag in (("image", ""), ("video", "video-")):
                group = [c for c in cands if not c.dropped and c.source == sid and c.split == split and c.kind == kind]
                for k in range(0, len(group), part_size):
                    parts.append(dict(split=split, name=f"{sid}-{tag}{k // part_size:03d}", source=sid,
                                      tier=sources[sid]["tier"], files=group[k:k + part_size]))
    return parts


def run_part(part: dict, manifest: dict, out: Path, detector: str, log=print) -> Path:
    d = out / part["split"] / part["name"]
    src = manifest_source(manifest, part["source"])
    origin = src.get("repo") or f"local:{src['local']}"
    tier = manifest["tiers"][part["tier"]]
    lines = []
    for c in part["files"]:
        entry = dict(path=str(c.path), label=f"{c.source}/{c.rel}", identity=c.identity, origin=origin)
        if src.get("aligned") and c.kind == "image":
            entry["kind"] = "aligned"
        lines.append(json.dumps(entry) + "\n")
    recipe = json.dumps(dict(tier=tier, main_face_only=bool(src.get("main_face_only")), detector=detector),
                        sort_keys=True) + "\n"
    # done = an index built from this very list with these settings (a changed plan rebuilds the part)
    if (d / "index.jsonl").is_file() and (d / "sources.jsonl").is_file() and (d / "recipe.json").is_file() \
            and (d / "sources.jsonl").read_text() == "".join(lines) and (d / "recipe.json").read_text() == recipe:
        return d
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.jsonl").unlink(missing_ok=True)
    (d / "sources.jsonl").write_text("".join(lines))
    (d / "recipe.json").write_text(recipe)
    cmd = [sys.executable, "-m", "frvideo", "dataset", "--source-list", str(d / "sources.jsonl"), "--out", str(d),
           "--size", str(tier.get("size", 512)), "--min-face", str(tier.get("min_face", 96)),
           "--min-sharpness", str(tier.get("min_sharpness", 10)), "--every", str(tier.get("every", 2)),
           "--detector", detector, "--overwrite", "-q"]
    if src.get("main_face_only"):
        cmd.append("--main-face-only")
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise InputError(f"part {part['split']}/{part['name']} failed: {res.stderr.strip()[-400:]}")
    (d / "summary.txt").write_text(res.stdout)
    log(f"  {part['split']}/{part['name']}: {res.stdout.strip()} ({time.time() - t:.0f} s)")
    return d


def manifest_source(manifest: dict, sid: str) -> dict:
    return next(s for s in manifest["sources"] if s["id"] == sid)


def merge(out: Path, split: str, names: set[str]) -> list[dict]:
    """One index for ``out/split`` from its finished parts named in ``names`` (the plan's; file paths
    gain the part folder)."""
    entries = []
    for part in sorted(p for p in (out / split).iterdir() if p.is_dir()) if (out / split).is_dir() else []:
        if part.name not in names or not (part / "index.jsonl").is_file():
            continue
        for e in read_index(part):
            e = dict(e, file=f"{part.name}/{e['file']}")
            if "pad_fraction" not in e:  # parts built before the index had it: the same measure, from the affine
                e["pad_fraction"] = 0.0 if e.get("kind") == "aligned" else \
                    round(pad_fraction(e["affine"], int(e["size"]), e["frame_size"]), 3)
            entries.append(e)
    _write_index(out / split, entries)
    # one root per crop size as well (a 256 crop upsampled into a 512 batch is a blurry target):
    # DIR/train_512/index.jsonl lists the 512 crops of DIR/train, by relative path
    for size in sorted({int(e["size"]) for e in entries}):
        _write_index(out / f"{split}_{size}", [dict(e, file=f"../{split}/{e['file']}") for e in entries
                                               if int(e["size"]) == size])
    return entries


def _write_index(root: Path, entries: list[dict]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".index.jsonl.tmp"
    with open(tmp, "w") as f:
        for e in entries:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
    os.replace(tmp, root / "index.jsonl")


def bucket(px: float) -> str:
    for lo, hi in FACE_BUCKETS:
        if lo <= px < hi:
            return f"{lo}-{hi}" if hi < 10 ** 9 else f">={lo}"
    return "?"


def report(manifest: dict, cands: list[Candidate], entries: dict[str, list[dict]]) -> dict:
    rows = []
    all_crops = [e for split in entries.values() for e in split]
    for s in manifest["sources"]:
        mine = [c for c in cands if c.source == s["id"]]
        taken = [c for c in mine if not c.dropped]
        crops = [e for e in all_crops if e["source"].startswith(s["id"] + "/")]
        why = Counter(c.dropped.split(" of ")[0] if c.dropped.startswith(("duplicate", "near-duplicate"))
                      else c.dropped for c in mine if c.dropped)
        rows.append(dict(
            id=s["id"], repo=s.get("repo") or f"local:{s['local']}", commit=s.get("commit"), licence=s["licence"],
            include=s["include"], tier=s["tier"], files_matched=len(mine), files_taken=len(taken),
            files_dropped=dict(why), identities_taken=len({c.identity for c in taken}),
            identities_with_crops=len({e.get("identity") for e in crops}),
            identity_rule=(s.get("identity") or {}).get("rule", "file"),
            crops=dict(train=sum(e["source"].startswith(s["id"] + "/") for e in entries.get("train", [])),
                       val=sum(e["source"].startswith(s["id"] + "/") for e in entries.get("val", []))),
            crops_by_face_px=dict(Counter(bucket(e["face_px"]) for e in crops)),
            pad_fraction_median=round(float(np.median([e["pad_fraction"] for e in crops])), 3) if crops else None,
            crops_pad_over_quarter=sum(e["pad_fraction"] > 0.25 for e in crops)))
    # a per-file identity (rule "file") is an upper bound: one photo = at most one person
    per_file = {s["id"] for s in manifest["sources"] if (s.get("identity") or {}).get("rule", "file") == "file"}
    totals = {}
    for split, es in entries.items():
        ids = {e.get("identity") for e in es}
        unlabelled = {e.get("identity") for e in es if e["source"].split("/", 1)[0] in per_file}
        totals[split] = dict(crops=len(es), identities=len(ids), identities_labelled=len(ids - unlabelled),
                             identities_one_per_photo=len(unlabelled),
                             crops_by_face_px=dict(Counter(bucket(e["face_px"]) for e in es)),
                             crops_by_size=dict(Counter(int(e["size"]) for e in es)),
                             crops_pad_over_quarter=sum(e["pad_fraction"] > 0.25 for e in es))
    val_ids = sorted({e.get("identity") for e in entries.get("val", [])})
    train_ids = {e.get("identity") for e in entries.get("train", [])}
    assert not (train_ids & set(val_ids)), "an identity on both sides of the split"
    return dict(name=manifest.get("name"), sources=rows, totals=totals, val_identities=val_ids)


def markdown_table(rep: dict) -> str:
    lines = ["| source | repo @ commit | licence | files taken / matched | identities (with crops) | "
             "crops train / val | crops by face px | median pad |", "|---|---|---|---|---|---|---|---|"]
    for r in rep["sources"]:
        commit = (r["commit"] or "")[:10]
        px = ", ".join(f"{k}: {v}" for k, v in sorted(r["crops_by_face_px"].items()))
        lines.append(f"| {r['id']} | {r['repo']} {('@ ' + commit) if commit else ''} | {r['licence']} | "
                     f"{r['files_taken']} / {r['files_matched']} | {r['identities_taken']} "
                     f"({r['identities_with_crops']}) | {r['crops']['train']} / {r['crops']['val']} | {px} | "
                     f"{'' if r['pad_fraction_median'] is None else r['pad_fraction_median']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m frvideo.train.corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("manifest", type=Path)
    p.add_argument("--checkouts", type=Path, required=True, help="folder for the repositories' files")
    p.add_argument("--out", type=Path, required=True, help="corpus folder (train/, val/, report.yaml)")
    p.add_argument("--git", default=GIT_DEFAULT,
                   help="where bare clones come from: a template with {owner} {name} (a URL, or a folder of mirrors)")
    p.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[3] / "shared",
                   help="the shared folder: eval clips' hashes and local sources (default ../shared)")
    p.add_argument("--part-size", type=int, default=2000)
    p.add_argument("--detector", default="retinaface-mobile")
    p.add_argument("--dry-run", action="store_true", help="select and split, write the plan, crop nothing")
    args = p.parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        t0 = time.time()
        roots = {}
        for s in manifest["sources"]:
            if "repo" in s:
                roots[s["id"]] = checkout(s, args.checkouts, args.git)
            else:
                root = (args.shared / s["local"]).resolve()
                if not root.is_dir():
                    raise InputError(f"local source {s['id']}: {root} not found")
                roots[s["id"]] = root
        print(f"frvideo corpus: {len(roots)} sources laid out ({time.time() - t0:.0f} s); selecting")
        cands = select(manifest, roots, args.shared)
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "plan.jsonl", "w") as f:
            for c in cands:
                f.write(json.dumps(dict(source=c.source, rel=c.rel, kind=c.kind, identity=c.identity,
                                        sha256=c.sha256, split=c.split, dropped=c.dropped)) + "\n")
        parts = plan_parts(manifest, cands, args.part_size)
        print(f"frvideo corpus: {sum(not c.dropped for c in cands)} of {len(cands)} files taken, "
              f"{len(parts)} parts ({time.time() - t0:.0f} s)")
        if args.dry_run:
            return 0
        for part in parts:
            run_part(part, manifest, args.out, args.detector)
        entries = {split: merge(args.out, split, {p["name"] for p in parts if p["split"] == split})
                   for split in ("train", "val")}
        planned = {(p["split"], p["name"]) for p in parts}
        stale = sorted(f"{d.parent.name}/{d.name}" for split in ("train", "val") if (args.out / split).is_dir()
                       for d in (args.out / split).iterdir() if d.is_dir() and (split, d.name) not in planned)
        if stale:  # left in place (a manifest edit may bring them back), but not in any index
            print(f"frvideo corpus: parts no longer in the plan, not merged: {' '.join(stale)}")
        rep = report(manifest, cands, entries)
        rep["seconds"] = round(time.time() - t0)
        (args.out / "report.yaml").write_text(yaml.safe_dump(rep, sort_keys=False, allow_unicode=True))
        (args.out / "report.md").write_text(markdown_table(rep))
        print(f"frvideo corpus: {rep['totals']} -> {args.out} ({rep['seconds']} s)")
    except (ConfigError, InputError, UsageError) as exc:
        print(f"frvideo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except subprocess.CalledProcessError as exc:
        print(f"frvideo: error: {' '.join(map(str, exc.cmd[:3]))} failed: "
              f"{(exc.stderr or b'').decode(errors='replace').strip()[-300:]}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
