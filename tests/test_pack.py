"""frvideo.train.pack: a dataset subset packed into budgeted chunks that training reads as the
original (same rows and weights, same valid boxes), the cut falling on the ``--last`` identities."""
import json

import cv2
import numpy as np

from frvideo.train.dataset import FaceCropDataset
from frvideo.train.pack import main, pack
from frvideo.train.trainer import _Images


def _dataset(root, n=6):
    rng = np.random.default_rng(0)
    (root / "shard").mkdir(parents=True)
    rows = []
    for i in range(n):
        img = cv2.GaussianBlur(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), (0, 0), 2)
        cv2.imwrite(str(root / "shard" / f"{i}.png"), img)
        ident = f"utkface:{i}" if i < 3 else f"clip:{i}"
        row = {"file": f"shard/{i}.png", "identity": ident, "track": f"t{i}", "source": f"s{i}.mp4",
               "affine": [[0.5, 0.0, 10.0 * i], [0.0, 0.5, 5.0]], "frame_size": [640, 480], "size": 512,
               "landmarks": [[1, 2]] * 5, "score": 0.99}
        rows += [row] * (1 if ident.startswith("utkface:") else 3)  # weighted as train_colour does
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_pack_keeps_rows_weights_and_boxes(tmp_path):
    src = tmp_path / "src"
    rows = _dataset(src)
    report = pack(src, [(tmp_path / "a", 100.0), (tmp_path / "b", 100.0)], tmp_path / "b" / "index",
                  size=128, last=("utkface:",))
    assert report["crops"] == 6 and report["rows"] == len(rows) == 12
    packed = FaceCropDataset(tmp_path / "b" / "index", 128)
    assert len(packed) == 12
    assert packed[0]["image"].shape == (128, 128, 3)
    # the utkface crops go last; the others keep their order and their three rows each
    order = [e["identity"] for e in packed.entries]
    assert order[:9] == ["clip:3"] * 3 + ["clip:4"] * 3 + ["clip:5"] * 3
    assert sorted(order[9:]) == ["utkface:0", "utkface:1", "utkface:2"]
    assert set(packed.entries[0]) == {"file", "identity", "track", "source", "affine", "frame_size", "size"}
    # the trainer's valid box of a packed crop is the original's
    original = _Images(128, dataset=FaceCropDataset(src, 128), cache=False)
    again = _Images(128, dataset=packed, cache=False)
    by_track = {e["track"]: i for i, e in enumerate(FaceCropDataset(src).entries)}
    for i, e in enumerate(packed.entries):
        assert again.valid_box(i) == original.valid_box(by_track[e["track"]])


def test_pack_budget_cuts_and_fills_in_order(tmp_path):
    src = tmp_path / "src"
    _dataset(src)
    one = cv2.imencode(".jpg", np.zeros((128, 128, 3), np.uint8))[1].size
    # a first chunk too small for all, a second one that takes the rest up to its budget
    report = pack(src, [(tmp_path / "a", 0.02), (tmp_path / "b", 0.05)], tmp_path / "idx", size=128,
                  last=("utkface:",))
    a, b = report["chunks"]
    assert a["crops"] >= 1 and a["mib"] <= 0.02 and b["mib"] <= 0.05 and one > 0
    assert report["crops"] == a["crops"] + b["crops"] <= 6
    assert len(list((tmp_path / "a").glob("*.jpg"))) == a["crops"]
    packed = FaceCropDataset(tmp_path / "idx", 128)
    assert all((tmp_path / "idx" / e["file"]).is_file() for e in packed.entries)


def test_pack_cli(tmp_path, capsys):
    src = tmp_path / "src"
    _dataset(src, n=2)
    assert main([str(src), "--chunk", f"{tmp_path / 'c'}:1", "--index", str(tmp_path / "c"), "--size", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["crops"] == 2


def test_pack_cli_missing_dataset_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--chunk", f"{tmp_path / 'c'}:1", "--index", str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("frvideo.train.pack: error:") and "nowhere" in err and "\n" not in err
