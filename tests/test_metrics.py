"""Metrics with known answers on synthetic cases (all on the [0, 1] scale)."""
import json
import math

import cv2
import numpy as np
import pytest

from clips import make_clip, pattern
from frvideo import metrics as M
from frvideo.cli import main as cli_main


def texture(h=96, w=200, seed=0):
    """Smooth random RGB texture (trackable by optical flow), float in [0.1, 0.9]."""
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.0)
    t = (t - t.min()) / (t.max() - t.min())
    return (0.1 + 0.8 * np.stack([t, t[::-1], 0.5 * t + 0.25], axis=2)).astype(np.float32)


def translating(n=6, h=96, w=128, step=2):
    """A textured image shifted left by ``step`` whole pixels per frame."""
    tex = texture(h, w + step * n)
    return [tex[:, step * t:step * t + w].copy() for t in range(n)]


def test_identical_and_offset():
    rng = np.random.default_rng(1)
    ref = [rng.integers(20, 200, (24, 32, 3), dtype=np.uint8) for _ in range(4)]
    assert M.tdc(ref, ref) == 0.0
    assert M.psnr(ref[0], ref[0]) == math.inf
    out = [r + np.uint8(10) for r in ref]  # constant offset of 10 grey levels, no clipping
    assert M.tdc(ref, out) == pytest.approx(0.0, abs=1e-12)
    assert M.psnr(ref[0], out[0]) == pytest.approx(20 * math.log10(255 / 10), abs=1e-4)  # 28.13 dB
    assert M.mse(ref[0], out[0]) == pytest.approx((10 / 255) ** 2, rel=1e-5)


def test_psnr_of_known_mse_and_mask():
    a = np.full((10, 10, 3), 0.5, np.float32)
    b = a.copy()
    b[:5] += 0.1  # top half off by 0.1, bottom half exact
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.005), abs=1e-3)
    top = np.zeros((10, 10), bool)
    top[:5] = True
    assert M.psnr(a, b, top) == pytest.approx(20.0, abs=1e-3)
    assert M.psnr(a, b, ~top) == math.inf
    assert math.isnan(M.psnr(a, b, np.zeros((10, 10), bool)))


def test_alternating_flicker_tdc_is_4d2():
    ref = np.full((16, 16, 3), 0.5, np.float32)
    d = 0.05
    out = [ref + (d if t % 2 else -d) for t in range(7)]
    assert M.tdc([ref] * 7, out) == pytest.approx(4 * d * d, rel=1e-5)
    # uint8, flicker only inside a mask: the masked TDC sees it in full, the frame-wide one diluted
    ref8 = np.full((20, 20, 3), 100, np.uint8)
    out8 = []
    for t in range(5):
        o = ref8.copy()
        o[5:15, 5:15] += 5 if t % 2 else 0
        out8.append(o)
    masks = M.face_masks([[[5, 5, 15, 15]]] * 5, 20, 20)
    assert M.tdc([ref8] * 5, out8, masks) == pytest.approx((5 / 255) ** 2, rel=1e-5)
    assert M.tdc([ref8] * 5, out8) == pytest.approx((5 / 255) ** 2 / 4, rel=1e-5)


def test_face_masks():
    m = M.face_masks([[], [[2, 3, 5, 6, 0.9]], [[0, 0, 2, 2], [8.5, 8.5, 30, 30]]], 10, 10)
    assert [int(x.sum()) for x in m] == [0, 9, 4 + 4]
    assert m[1][3:6, 2:5].all() and not m[1][2, 2] and not m[1][3, 5]
    assert m[2][8:, 8:].all()  # fractional corners widen to whole pixels, clipped to the frame
    assert M.face_mask([[2, 2, 4, 4]], 10, 10, margin=0.5).sum() == 16


def test_warp_error_translation():
    ref = translating()
    h, w = ref[0].shape[:2]
    face = np.zeros((h, w), bool)
    face[16:80, 16:100] = True  # away from the borders the motion uncovers
    masks = [face] * len(ref)
    assert M.warp_error(ref, ref, masks) < 1e-6
    sigma = 0.05
    rng = np.random.default_rng(3)
    noisy = [r + rng.normal(0, sigma, r.shape).astype(np.float32) for r in ref]
    # independent noise on both frames of a pair: E[(n_t - n_t+1)^2] = 2 sigma^2
    assert M.warp_error(ref, noisy, masks) == pytest.approx(2 * sigma ** 2, rel=0.1)
    # a static output on a moving reference is heavily penalised
    assert M.warp_error(ref, [ref[0]] * len(ref), masks) > 10 * M.warp_error(ref, ref, masks) + 1e-3


def test_streaming_meter_equals_list_functions():
    ref = translating(n=5, h=48, w=64)
    rng = np.random.default_rng(4)
    out = [np.clip(r + rng.normal(0, 0.03, r.shape), 0, 1).astype(np.float32) for r in ref]
    masks = [M.face_mask([[8 + t, 8, 40 + t, 40]], 48, 64) for t in range(5)]
    meter = M.FlickerMeter()
    for r, o, m in zip(ref, out, masks):
        meter.update(r, o, m)
    res = meter.result()
    assert res["pairs"] == 4 and res["frames"] == 5
    assert res["tdc"] == M.tdc(ref, out, masks)
    assert res["warp_error"] == M.warp_error(ref, out, masks)
    assert res["warp_error_ref"] < res["warp_error"]


def test_ssim_matches_kornia():
    torch = pytest.importorskip("torch")
    kornia = pytest.importorskip("kornia")
    rng = np.random.default_rng(5)
    a = rng.random((32, 40, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)
    t = [torch.from_numpy(x).permute(2, 0, 1)[None].double() for x in (a, b)]
    expected = kornia.metrics.ssim(t[0], t[1], 11, padding="valid").mean().item()
    assert M.ssim(a, b) == pytest.approx(expected, abs=1e-5)
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    u8 = (a * 255).astype(np.uint8)
    assert M.ssim(u8, u8) == pytest.approx(1.0, abs=1e-5)


def test_token_flip_rate():
    tokens = np.array([[1, 2, 3, 4],
                       [1, 2, 3, 5],   # 1 of 4 flips
                       [0, 2, 3, 5],   # 1 of 4
                       [0, 2, 3, 5]])  # 0 of 4
    assert M.token_flip_rate(tokens) == pytest.approx(2 / 12)
    assert math.isnan(M.token_flip_rate(tokens[:1]))
    meter = M.TokenFlipMeter()
    for row in tokens:
        meter.update(7, row)
    meter.update(8, [1, 1])
    meter.update(8, [2, 2])
    assert meter.per_track() == {7: pytest.approx(2 / 12), 8: 1.0}
    assert meter.rate == pytest.approx(4 / 14)  # pooled: (2 + 2) flips over 12 + 2 positions


def _clips(tmp_path, n_ref=6, n_out=6, ext=".mp4"):
    w, h = 64, 48
    rng = np.random.default_rng(6)
    frames = [pattern(i, w, h) for i in range(max(n_ref, n_out))]
    noisy = [np.clip(f.astype(np.int16) + rng.integers(-12, 13, f.shape), 0, 255).astype(np.uint8) for f in frames]
    ref = make_clip(tmp_path / f"ref{ext}", n=n_ref, size=(w, h), frames=frames)
    out = make_clip(tmp_path / f"out{ext}", n=n_out, size=(w, h), frames=noisy)
    return ref, out


def test_metrics_main_prints_numbers(tmp_path, capsys):
    ref, out = _clips(tmp_path)
    assert M.metrics_main([str(ref), str(out)]) == 0
    text = capsys.readouterr().out
    for key in ("TDC", "E_warp", "PSNR", "SSIM"):
        assert key in text
    assert cli_main(["metrics", str(ref), str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["frames"] == 6 and res["pairs"] == 5 and res["region"] == "frame"
    assert 15 < res["psnr"] < 45 and 0 < res["ssim"] < 1
    assert res["tdc"] > 0 and res["warp_error"] > res["warp_error_ref"]
    # a video against itself: no flicker, infinite PSNR
    assert M.metrics_main([str(ref), str(ref), "--json", "--no-warp"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["tdc"] == 0 and same["psnr"] == "inf" and same["warp_error"] is None


def test_metrics_main_boxes(tmp_path, capsys):
    ref, out = _clips(tmp_path)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"0": [[10, 10, 40, 40, 0.99]], "2": [[12, 10, 42, 40]]}))
    assert M.metrics_main([str(ref), str(out), "--boxes", str(boxes), "--json", "--no-warp"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["region"] == "boxes" and res["frames_with_faces"] == 2 and res["frames_measured"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([[[1, 2, 3]]] * 6))
    assert cli_main(["metrics", str(ref), str(out), "--boxes", str(bad)]) == 2


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])  # mp4 declares its frame count, mkv does not
def test_metrics_mismatched_frame_counts(tmp_path, capsys, ext):
    ref, out = _clips(tmp_path, n_ref=6, n_out=5, ext=ext)
    assert cli_main(["metrics", str(ref), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("frvideo: error:") and "\n" not in err and "frame" in err


def test_metrics_size_mismatch_and_missing(tmp_path, capsys):
    ref = make_clip(tmp_path / "a.mp4", n=3, size=(64, 48))
    out = make_clip(tmp_path / "b.mp4", n=3, size=(48, 32))
    assert cli_main(["metrics", str(ref), str(out)]) == 2
    assert "64x48" in capsys.readouterr().err
    assert cli_main(["metrics", str(ref), str(tmp_path / "nope.mp4")]) == 3
