"""frvideo.train.corpus: the multi-repository face corpus builder (faces_v2).

Hash, identity and split helpers run on synthetic data; the end-to-end build
lays a real git repository out, keeps eval clips out by sha256, name and
picture, drops duplicates, splits by identity and crops real faces from
../shared with the real RetinaFace weights (skips without them).
"""
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from clips import make_clip
from conftest import MEDIA, WEIGHTS, need
from frvideo.errors import ConfigError
from frvideo.train import corpus
from frvideo.train.dataset import FaceCropDataset


def noise(seed, shape=(120, 160, 3)):
    """A picture with edges at the scale the hash sees: random filled rectangles on a ramp."""
    rng = np.random.default_rng(seed)
    img = np.tile(np.linspace(40, 200, shape[1], dtype=np.float32)[None, :, None], (shape[0], 1, 3))
    for _ in range(25):
        x, y = rng.integers(0, shape[1] - 20), rng.integers(0, shape[0] - 20)
        w, h = rng.integers(15, 60, 2)
        img[y:y + h, x:x + w] = rng.integers(0, 255, 3)
    return img.astype(np.uint8)


def test_dhash_near_copies_close_and_other_pictures_far():
    a, b = noise(0), noise(1)
    half = cv2.resize(a, (80, 60), interpolation=cv2.INTER_AREA)
    ok, jpg = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 85])
    recompressed = cv2.imdecode(jpg, cv2.IMREAD_COLOR)
    h = [corpus.dhash(x) for x in (a, half, recompressed, b)]
    assert all(x.shape == (corpus.HASH_WORDS,) and x.dtype == np.uint64 for x in h)
    d = corpus.hamming(np.stack(h), np.stack(h))
    assert d[0, 0] == 0 and d[0, 1] <= 20 and d[0, 2] <= 20
    assert d[0, 3] > 60  # unrelated pictures differ in about half of 256 bits
    assert corpus.near_duplicates(np.stack(h), 20) == [0, 0, 0, 3]
    assert corpus.near_duplicates(np.stack([h[3], h[0], h[1]]), 20) == [0, 1, 1]  # the first copy keeps


def test_identity_rules_and_split_by_identity():
    assert corpus.identity_of("lfw/Ann_Smith/Ann_Smith_0002.jpg", {"rule": "folder"}) == "Ann_Smith"
    assert corpus.identity_of("assets/d12.jpg", {"rule": "stem"}) == "d12"
    assert corpus.identity_of("a/b.png", {"rule": "file"}) == "a/b.png"
    assert corpus.identity_of("x/y.png", {"rule": "fixed", "value": "group"}) == "group"
    assert corpus.identity_of("short_case/tys/gt.mp4", {"rule": "regex", "pattern": "short_case/(?P<id>[^/]+)/"}) \
        == "tys"
    rule = {"rule": "map", "values": {"ex/sad.png": "happy"}}
    assert corpus.identity_of("ex/sad.png", rule) == "happy" and corpus.identity_of("ex/happy.png", rule) == "happy"
    with pytest.raises(ConfigError):
        corpus.identity_of("a/b.png", {"rule": "regex", "pattern": "(?P<id>zzz)"})
    with pytest.raises(ConfigError):
        corpus.identity_of("a/b.png", {"rule": "age"})

    ids = [f"lfw:person_{i}" for i in range(1000)]
    val = corpus.split_identities(ids, 0.05)
    assert len(val) == 50 and val <= set(ids)
    assert corpus.split_identities(list(reversed(ids)) + ids[:10], 0.05) == val  # order and repeats do not matter
    assert corpus.split_identities(ids[:500], 0.1) != corpus.split_identities(ids[500:], 0.1)
    assert corpus.split_identities(ids, 0.0) == set()


def _git_repo(path: Path, files: dict) -> str:
    path.mkdir(parents=True)
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    env = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    import os
    env = {**os.environ, **env}
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "faces"]):
        subprocess.run(["git", "-C", str(path), *cmd], check=True, env=env, capture_output=True)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _png(rgb) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _jpg(rgb, q=95) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()


def test_build_keeps_eval_out_dedups_and_splits_by_identity(tmp_path, home_with_detectors, capsys):
    need(WEIGHTS / "detection_mobilenet0.25_Final.pth", "RetinaFace MobileNet weights")
    whole = need(MEDIA / "images" / "whole", "whole images")
    faces = [cv2.cvtColor(cv2.imread(str(whole / n)), cv2.COLOR_BGR2RGB) for n in ("00.jpg", "01.jpg", "03.jpg")]
    faces = [cv2.resize(f, (f.shape[1] * 480 // max(f.shape[:2]), f.shape[0] * 480 // max(f.shape[:2])))
             for f in faces]

    # a shared/ with one eval clip: its bytes are in SHA256SUMS; copies of it, of its name, of its frames go
    shared = tmp_path / "shared"
    (shared / "media" / "videos" / "eval").mkdir(parents=True)
    eval_frame = np.ascontiguousarray(faces[2][:256, :256])
    clip = make_clip(shared / "media" / "videos" / "eval" / "evalclip.mp4", n=10, size=(256, 256),
                     frames=[eval_frame] * 10)
    sha = hashlib.sha256(clip.read_bytes()).hexdigest()
    (shared / "media" / "SHA256SUMS").write_text(f"{sha}  media/videos/eval/evalclip.mp4\n")

    other = make_clip(tmp_path / "other.mp4", n=6, size=(96, 64))
    files = {
        "people/alice/a1.jpg": _jpg(faces[0]),
        "people/alice/a2.png": _png(np.ascontiguousarray(faces[0][:, ::-1])),  # mirrored: not a near-copy
        "people/bob/b1.jpg": _jpg(faces[1]),
        "people/bob/b1_again.jpg": _jpg(faces[1]),  # byte-identical
        "people/bob/b1_small.jpg": _jpg(cv2.resize(faces[1], None, fx=0.5, fy=0.5), q=70),  # near-copy
        "people/carol/eval_copy.mp4": clip.read_bytes(),  # the eval clip's bytes
        "people/carol/d13.mp4": other.read_bytes(),  # an eval clip's name
        "people/carol/eval_frame.png": _png(cv2.resize(eval_frame, (128, 128))),  # an eval frame, rescaled
        "people/notes.txt": b"not a picture",
    }
    commit = _git_repo(tmp_path / "remote" / "someone+faces", files)
    manifest = {
        "name": "test", "tiers": {"t": {"size": 128, "min_face": 32, "min_sharpness": 0}},
        "eval_exclude": {"names": ["d13.*"]},
        "sources": [{"id": "faces", "repo": "someone/faces", "commit": commit, "licence": "MIT",
                     "include": ["people/*"], "identity": {"rule": "folder"}, "tier": "t", "val_fraction": 0.5,
                     "main_face_only": True}],
    }
    mpath = tmp_path / "m.yaml"
    mpath.write_text(yaml.safe_dump(manifest))
    out = tmp_path / "corpus"
    args = [str(mpath), "--checkouts", str(tmp_path / "co"), "--out", str(out), "--shared", str(shared),
            "--git", str(tmp_path / "remote" / "{owner}+{name}")]
    assert corpus.main(args) == 0, capsys.readouterr().err

    plan = {p["rel"]: p for p in map(json.loads, (out / "plan.jsonl").read_text().splitlines())}
    assert "people/notes.txt" not in plan
    assert plan["people/carol/eval_copy.mp4"]["dropped"] == "eval clip (sha256)"
    assert plan["people/carol/d13.mp4"]["dropped"] == "eval clip (name)"
    assert plan["people/carol/eval_frame.png"]["dropped"] == "eval clip (picture)"
    assert plan["people/bob/b1_again.jpg"]["dropped"].startswith("duplicate of faces:people/bob/b1.jpg")
    assert plan["people/bob/b1_small.jpg"]["dropped"].startswith("near-duplicate of faces:people/bob/b1.jpg")
    taken = {r for r, p in plan.items() if not p["dropped"]}
    assert taken == {"people/alice/a1.jpg", "people/alice/a2.png", "people/bob/b1.jpg"}
    sides = {plan[r]["identity"]: plan[r]["split"] for r in taken}
    assert set(sides) == {"faces:alice", "faces:bob"} and sorted(sides.values()) == ["train", "val"]

    rep = yaml.safe_load((out / "report.yaml").read_text())
    row = rep["sources"][0]
    assert row["files_matched"] == 8 and row["files_taken"] == 3 and row["commit"] == commit
    assert row["files_dropped"] == {"eval clip (sha256)": 1, "eval clip (name)": 1, "eval clip (picture)": 1,
                                    "duplicate": 1, "near-duplicate": 1}
    train, val = FaceCropDataset(out / "train"), FaceCropDataset(out / "val")
    assert len(train) >= 1 and len(val) >= 1
    assert not ({e["identity"] for e in train.entries} & {e["identity"] for e in val.entries})
    for ds in (train, val):
        for i in range(len(ds)):
            e = ds.entry(i)
            assert ds[i]["image"].shape == (128, 128, 3) and e["origin"] == "someone/faces"
            assert e["source"].startswith("faces/people/") and e["face_px"] >= 32 and 0 <= e["pad_fraction"] <= 1
    assert rep["totals"]["train"]["crops"] + rep["totals"]["val"]["crops"] == len(train) + len(val)
    for split in ("train", "val"):  # folder-per-person: labelled people, one on each side
        assert rep["totals"][split]["identities_labelled"] == 1 and rep["totals"][split]["identities_one_per_photo"] == 0
    assert set(rep["val_identities"]) == {e["identity"] for e in val.entries}
    by_size = FaceCropDataset(out / "train_128")  # the one crop size of this build
    assert len(by_size) == len(train) and by_size[0]["image"].shape == (128, 128, 3)
    assert (out / "report.md").read_text().count("| faces |") == 1

    # resumable: a second run finds every part done and leaves the crops as they are
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert corpus.main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


def test_bad_manifest_one_line_error(tmp_path, capsys):
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"tiers": {"t": {}}, "sources": [{"id": "a", "repo": "o/n", "commit": "abc",
                                                                  "include": ["*"], "tier": "t", "licence": "x"}]}))
    rc = corpus.main([str(m), "--checkouts", str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 6 and len(err) == 1 and "40-hex commit" in err[0]
    shutil.rmtree(tmp_path / "c", ignore_errors=True)
