"""`frvideo dataset` and FaceCropDataset: crops, index, tracks and a leak-free split.

Synthetic tests (a fixed fake detector, hand-written index) run everywhere;
the real ones use a training clip, CodeFormer's cropped_faces and the real
detector weights of ../shared, and skip without them.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from clips import make_clip
from conftest import MEDIA, FixedFaceDetector, need
from frvideo.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE, FrvideoError
from frvideo.faces.detect import Detections
from frvideo.train.dataset import BuildOptions, FaceCropDataset, build_dataset, dataset_main, sharpness


def run_cli(argv):
    """`frvideo dataset ARGV` as the CLI runs it (through cli.main once it is wired)."""
    from frvideo import cli
    if "dataset" in getattr(cli, "SUBCOMMANDS", ()):
        return cli.main(["dataset", *argv])
    try:
        return dataset_main(argv)
    except FrvideoError as exc:
        print(f"frvideo: error: {exc}", file=sys.stderr)
        return exc.exit_code


def one_line_error(argv, capsys, code):
    rc = run_cli(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code, err
    assert len(err) == 1 and err[0].startswith("frvideo: error: ") and "Traceback" not in err[0], err
    return err[0]


def read_index(root):
    return [json.loads(line) for line in (Path(root) / "index.jsonl").read_text().splitlines()]


def write_png(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def assert_split_by_source(ds, seeds=range(5), fraction=0.3):
    for seed in seeds:
        train, ev = ds.split(fraction, seed)
        a, b = {e["source"] for e in train.entries}, {e["source"] for e in ev.entries}
        assert a and b and not (a & b)
        assert len(train) + len(ev) == len(ds)
        assert sorted(e["file"] for e in train.entries + ev.entries) == sorted(e["file"] for e in ds.entries)
        for part in (train, ev):  # track indices refer to the part itself
            for idx in part.tracks().values():
                assert all(0 <= i < len(part) for i in idx)


# -- without ../shared ----------------------------------------------------------------


def test_dataset_index_tracks_and_split(tmp_path):
    rng = np.random.default_rng(0)
    entries = []
    n = 0
    layout = [("clips/a.mp4", 0, [4, 0, 2]), ("clips/a.mp4", 1, [0, 2]), ("b.mp4", 0, [6, 2, 0, 4]),
              ("c.png", 0, [0]), ("d.png", 0, [0]), ("d.png", 1, [0])]
    for source, tid, frames in layout:
        for f in frames:
            file = f"shard_{n // 4:05d}/{n:06d}.png"
            img = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
            img[..., 0] = 250  # red: checks RGB order
            write_png(tmp_path / file, img)
            entries.append({"file": file, "source": source, "frame": f, "track": f"{source}:{tid}"})
            n += 1
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))

    ds = FaceCropDataset(tmp_path, size=32)
    assert len(ds) == n == 12
    item = ds[3]
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.uint8
    assert item["image"][..., 0].mean() > 240 and item["image"][..., 2].mean() < 200
    assert (item["track"], item["source"], item["frame"], item["index"]) == ("clips/a.mp4:1", "clips/a.mp4", 0, 3)
    assert FaceCropDataset(tmp_path)[0]["image"].shape == (48, 48, 3)

    tracks = ds.tracks()
    assert set(tracks) == {"clips/a.mp4:0", "clips/a.mp4:1", "b.mp4:0", "c.png:0", "d.png:0", "d.png:1"}
    assert [ds[i]["frame"] for i in tracks["b.mp4:0"]] == [0, 2, 4, 6]  # frame order
    assert [ds[i]["frame"] for i in tracks["clips/a.mp4:0"]] == [0, 2, 4]

    assert_split_by_source(ds, seeds=range(10))
    train, ev = ds.split(0.0, 0)
    assert len(train) == len(ds) and len(ev) == 0
    train, ev = ds.split(1.0, 0)
    assert len(train) == 0 and len(ev) == len(ds)
    assert [e["file"] for e in ds.split(0.3, 7)[1].entries] == [e["file"] for e in ds.split(0.3, 7)[1].entries]

    import torch
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 32, 32, 3) and len(batch["track"]) == 4


def test_build_from_clip_with_fixed_detector(tmp_path):
    (tmp_path / "in").mkdir()
    clip = make_clip(tmp_path / "in" / "clip.mp4", n=24, size=(224, 192))
    # 12 kept frames (every 2nd); the detector misses the 6th of them (frame 10)
    det = FixedFaceDetector([i for i in range(12) if i != 5], box=(50, 40, 170, 170))
    out = tmp_path / "ds"
    opts = BuildOptions(size=64, every=2, min_sharpness=0, shard_size=4, quiet=True)
    stats = build_dataset([str(clip)], out, det, opts)
    assert det.calls == 12 and stats.frames_decoded == 24 and stats.frames_sampled == 12
    index = read_index(out)
    assert stats.kept == len(index) == 11
    assert [e["frame"] for e in index] == [f for f in range(0, 24, 2) if f != 10]
    assert {e["track"] for e in index} == {"clip.mp4:0"}  # one track across a one-frame miss
    assert all(e["source"] == "clip.mp4" and e["kind"] == "video" and e["size"] == 64 for e in index)
    assert abs(index[1]["time"] - 2 / 25) < 1e-3
    shards = sorted(p for p in out.iterdir() if p.is_dir())
    assert [p.name for p in shards] == ["shard_00000", "shard_00001", "shard_00002"]
    assert all(len(list(p.iterdir())) <= 4 for p in shards)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == sorted(e["file"] for e in index)
    for e in index:
        assert cv2.imread(str(out / e["file"])).shape == (64, 64, 3)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp index left

    # the minimum face size rejects, and an existing dataset is replaced only on request
    with pytest.raises(FrvideoError, match="already holds a dataset"):
        build_dataset([str(clip)], out, FixedFaceDetector(range(12), box=(50, 40, 170, 170)), opts)
    stats = build_dataset([str(clip)], out, FixedFaceDetector(range(12), box=(50, 40, 170, 170)),
                          BuildOptions(size=64, min_face=150, min_sharpness=0, quiet=True), overwrite=True)
    assert stats.small == 12 and stats.kept == 0 and read_index(out) == []
    assert not list(out.glob("shard_*"))


def test_aligned_images_resized_and_sharpness_filter(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cropped_faces"  # aligned by its name
    sharp = rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)
    write_png(folder / "sharp.png", sharp)
    write_png(folder / "flat.png", np.full((100, 100, 3), 128, np.uint8))
    rgba = np.dstack([sharp, np.full((100, 100), 255, np.uint8)])
    cv2.imwrite(str(folder / "alpha.png"), rgba)
    cv2.imwrite(str(folder / "grey.png"), sharp[..., 0])
    assert sharpness(sharp) > 1000 and sharpness(np.full((64, 64, 3), 9, np.uint8)) == 0
    out = tmp_path / "ds"
    stats = build_dataset([str(folder)], out, None, BuildOptions(size=80, min_sharpness=10, quiet=True))
    index = read_index(out)
    assert stats.aligned == 4 and stats.blurry == 1
    assert sorted(e["source"] for e in index) == ["alpha.png", "grey.png", "sharp.png"]
    assert all(e["kind"] == "aligned" for e in index) and len({e["track"] for e in index}) == 3
    ds = FaceCropDataset(out)
    assert all(ds[i]["image"].shape == (80, 80, 3) for i in range(len(ds)))


def test_failed_build_leaves_no_dataset(tmp_path):
    clip = make_clip(tmp_path / "clip.mp4", n=12, size=(224, 192))

    class Broken(FixedFaceDetector):
        def detect(self, image_rgb):
            if self.calls == 3:
                raise RuntimeError("boom")
            return super().detect(image_rgb)

    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        build_dataset([str(clip)], out, Broken(range(12), box=(50, 40, 170, 170)),
                      BuildOptions(size=32, every=1, min_sharpness=0, shard_size=2, quiet=True))
    assert list(out.iterdir()) == []


def test_images_detected_and_tracks_unique_across_sources(tmp_path):
    """Two images with the same name in different folders stay apart."""
    img = np.random.default_rng(2).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    for sub in ("old", "old_w_scratch"):
        write_png(tmp_path / "photos" / sub / "a.png", img)

    class TwoFaces(FixedFaceDetector):
        def detect(self, image_rgb):
            d = super().detect(image_rgb)
            return Detections(np.concatenate([d.boxes, d.boxes + 20]), np.concatenate([d.landmarks, d.landmarks + 20]),
                              np.concatenate([d.scores, d.scores]))

    out = tmp_path / "ds"
    build_dataset([str(tmp_path / "photos")], out, TwoFaces([0, 1], box=(10, 10, 130, 130)),
                  BuildOptions(size=32, min_sharpness=0, quiet=True))
    index = read_index(out)
    assert sorted(e["track"] for e in index) == ["old/a.png:0", "old/a.png:1", "old_w_scratch/a.png:0",
                                                 "old_w_scratch/a.png:1"]
    assert all(e["frame"] == 0 and e["kind"] == "image" for e in index)


def test_bad_input_one_line_errors(tmp_path, capsys):
    out = tmp_path / "ds"
    msg = one_line_error([str(tmp_path / "nope.mp4"), "--out", str(out)], capsys, EXIT_INPUT)
    assert "not found" in msg and "nope.mp4" in msg and not out.exists()
    (tmp_path / "notes.txt").write_text("hello")
    assert "neither a video nor an image" in one_line_error([str(tmp_path / "notes.txt"), "--out", str(out)],
                                                            capsys, EXIT_INPUT)
    (tmp_path / "empty").mkdir()
    assert "no videos or images" in one_line_error([str(tmp_path / "empty"), "--out", str(out)], capsys, EXIT_INPUT)
    one_line_error([str(tmp_path / "empty"), "--out", str(out), "--every", "0"], capsys, EXIT_USAGE)
    one_line_error([str(tmp_path / "empty")], capsys, EXIT_USAGE)  # --out missing
    write_png(tmp_path / "faces" / "x.png", np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    args = [str(tmp_path / "faces"), "--out", str(out), "--aligned", "-q"]
    assert run_cli(args) == 0
    assert "--overwrite" in one_line_error(args, capsys, EXIT_OUTPUT)
    assert run_cli(args + ["--overwrite"]) == 0 and len(read_index(out)) == 1


# -- with the real media and detector weights -----------------------------------------------


def test_real_clip_and_aligned_faces(tmp_path, capsys, home_with_detectors):
    clip = need(MEDIA / "videos" / "train" / "lp_d0.mp4", "training clip")
    faces = need(MEDIA / "images" / "cropped_faces", "cropped_faces")
    out = tmp_path / "ds"
    rc = dataset_main([str(clip), str(faces), "--aligned", "--out", str(out), "--every", "10", "--size", "256",
                       "--min-sharpness", "0", "--detector", "yunet", "--shard-size", "16", "-q"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "1 videos" in summary and "20 aligned" in summary
    index = read_index(out)
    video = [e for e in index if e["kind"] == "video"]
    aligned = [e for e in index if e["kind"] == "aligned"]
    assert len(aligned) == 20 and len({e["track"] for e in aligned}) == 20
    assert len(video) >= 6 and all(e["frame"] % 10 == 0 for e in video)
    tracks = Counter(e["track"] for e in video)
    main_track, n = tracks.most_common(1)[0]
    assert main_track.startswith("videos/train/lp_d0.mp4:") and n >= 0.8 * len(video)  # one talking head, one track
    for e in video:
        assert len(e["box"]) == 4 and np.array(e["landmarks"]).shape == (5, 2) and e["box"][2] - e["box"][0] >= 96
        # the crop's landmarks land on the FFHQ template
        A, lm = np.array(e["affine"]), np.array(e["landmarks"])
        mapped = lm @ A[:, :2].T + A[:, 2]
        from frvideo.faces.align import template
        assert np.abs(mapped - template(256)).max() < 256 * 0.08
    assert all(len(list(p.iterdir())) <= 16 for p in out.glob("shard_*"))

    ds = FaceCropDataset(out)
    assert len(ds) == len(index)
    for i in (0, len(ds) - 1):
        assert ds[i]["image"].shape == (256, 256, 3)
    assert_split_by_source(ds, fraction=0.2)

    # the default sharpness minimum rejects most of these low-quality inputs (the minimum is calibrated at 512)
    stats = build_dataset([str(faces)], tmp_path / "sharp", None, BuildOptions(size=512, quiet=True))
    assert stats.aligned == 20 and stats.blurry >= 15


def test_source_list_identity_labels_and_main_face(tmp_path, capsys):
    """A --source-list carries identity/origin/label into the index; --main-face-only keeps the largest face."""
    rng = np.random.default_rng(5)
    for name in ("p/alice_1.png", "p/alice_2.png", "q/bob_1.png"):
        write_png(tmp_path / "in" / name, rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    lines = [dict(path="in/p/alice_1.png", identity="lfw:Alice", origin="someone/repo", label="lfw/alice_1.png"),
             dict(path=str(tmp_path / "in" / "p" / "alice_2.png"), identity="lfw:Alice"),
             dict(path="in/q/bob_1.png", identity="lfw:Bob")]
    lst = tmp_path / "sources.jsonl"
    lst.write_text("".join(json.dumps(e) + "\n" for e in lines))

    class SmallAndLarge(FixedFaceDetector):
        def detect(self, image_rgb):
            d = super().detect(image_rgb)  # 120 px face, then a 40 px one
            small = np.array([[150, 150, 190, 190]], np.float32)
            lm = d.landmarks * (40 / 120) + np.array([150 - 10 * 40 / 120, 150 - 10 * 40 / 120], np.float32)
            return Detections(np.concatenate([d.boxes, small]), np.concatenate([d.landmarks, lm]),
                              np.concatenate([d.scores, d.scores]))

    opts = BuildOptions(size=32, min_face=0, min_sharpness=0, quiet=True)
    out = tmp_path / "all"
    build_dataset([], out, SmallAndLarge(range(3), box=(10, 10, 130, 130)), opts, source_list=lst)
    index = read_index(out)
    assert len(index) == 6  # both faces of each image
    out = tmp_path / "main"
    opts.main_face_only = True
    build_dataset([], out, SmallAndLarge(range(3), box=(10, 10, 130, 130)), opts, source_list=lst)
    index = read_index(out)
    assert len(index) == 3 and all(e["face_px"] == 120.0 for e in index)
    by_source = {e["source"]: e for e in index}
    assert by_source["lfw/alice_1.png"]["identity"] == "lfw:Alice"
    assert by_source["lfw/alice_1.png"]["origin"] == "someone/repo"
    assert by_source["p/alice_2.png"]["identity"] == "lfw:Alice" and "origin" not in by_source["p/alice_2.png"]
    assert by_source["q/bob_1.png"]["identity"] == "lfw:Bob"

    # split by identity: both of Alice's crops on one side, whatever the seed
    ds = FaceCropDataset(out)
    for seed in range(6):
        train, ev = ds.split(0.5, seed, by="identity")
        sides = {e["identity"]: ("t" if e in train.entries else "e") for e in ds.entries}
        assert {("t" if e in train.entries else "e") for e in ds.entries if e["identity"] == "lfw:Alice"} \
            == {sides["lfw:Alice"]}
        assert len(train) + len(ev) == 3 and len(train) and len(ev)

    # bad lists: one line, right exit code
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "in/p/nope.png"}\n')
    assert "not found" in one_line_error(["--source-list", str(bad), "--out", str(tmp_path / "x")], capsys,
                                         EXIT_INPUT)
    bad.write_text('{"identity": "x"}\n')
    assert '"path"' in one_line_error(["--source-list", str(bad), "--out", str(tmp_path / "x")], capsys, EXIT_INPUT)
    bad.write_text(json.dumps(dict(path="in/p/alice_1.png", label="same")) + "\n"
                   + json.dumps(dict(path="in/q/bob_1.png", label="same")) + "\n")
    assert "unique" in one_line_error(["--source-list", str(bad), "--out", str(tmp_path / "x")], capsys, EXIT_INPUT)
    with pytest.raises(FrvideoError):
        FaceCropDataset(out).split(0.5, 0, by="colour")


def test_pad_fraction_measured_and_max_pad_filter(tmp_path):
    """A face at the picture's corner yields a crop partly outside the frame (mirror-filled): measured in the
    index as pad_fraction, and --max-pad rejects it; a face in the middle has none."""
    from frvideo.train.dataset import pad_fraction
    assert pad_fraction([[1, 0, 0], [0, 1, 0]], 100, (100, 100)) == 0.0  # the crop is the frame
    assert abs(pad_fraction([[1, 0, -50], [0, 1, 0]], 100, (100, 100)) - 0.5) < 0.02  # half of it beyond the edge
    img = np.random.default_rng(9).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    write_png(tmp_path / "in" / "corner.png", img)
    write_png(tmp_path / "in2" / "middle.png", img)
    opts = BuildOptions(size=64, min_face=0, min_sharpness=0, quiet=True)
    corner = build_dataset([str(tmp_path / "in")], tmp_path / "a", FixedFaceDetector([0], box=(0, 0, 100, 100)), opts)
    middle = build_dataset([str(tmp_path / "in2")], tmp_path / "b", FixedFaceDetector([0], box=(110, 110, 190, 190)),
                           opts)
    assert corner.kept == middle.kept == 1
    pad_corner = read_index(tmp_path / "a")[0]["pad_fraction"]
    assert pad_corner > 0.2 and read_index(tmp_path / "b")[0]["pad_fraction"] == 0.0
    opts.max_pad = pad_corner / 2
    stats = build_dataset([str(tmp_path / "in")], tmp_path / "c", FixedFaceDetector([0], box=(0, 0, 100, 100)), opts)
    assert stats.kept == 0 and stats.padded == 1 and "1 over the padding maximum" in stats.summary(tmp_path / "c")
    assert build_dataset([str(tmp_path / "in2")], tmp_path / "d", FixedFaceDetector([0], box=(110, 110, 190, 190)),
                         opts).kept == 1
