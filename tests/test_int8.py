"""--precision int8: lite's shipped ONNX Runtime graphs restore like the float network, go through
the whole pipeline, and every way to ask for them wrongly is a one-line usage error."""
import cv2
import numpy as np
import pytest
import torch

from frvideo.cli import main
from frvideo.errors import EXIT_USAGE
from frvideo.metrics import psnr
from frvideo.models import load_model_config
from frvideo.restore import INT8, RestoreContext, load_restorer
from frvideo.train.degradation import DegradationParams, degrade
from frvideo.weights import REPO_ROOT, sha256_file

from clips import make_clip, video_summary
from test_cli import fails
from test_lite import _real_face

pytest.importorskip("onnxruntime", reason="--precision int8 needs onnxruntime (a frvideo dependency)")


def test_card_names_the_shipped_graphs_and_their_source():
    card = load_model_config("lite")
    assert card.int8["built_from"] == card.weights.sha256  # rebuilt whenever lite.pth changes
    for part in ("encoder", "decoder"):
        assert sha256_file(REPO_ROOT / card.int8[part]) == card.int8[f"{part}_sha256"]


def test_int8_restores_a_real_face_like_fp32(one_thread):
    fp32, int8 = load_restorer("lite"), load_restorer("lite", dtype=INT8)
    assert int8.int8 is not None and fp32.int8 is None
    clean = _real_face(256)
    low = degrade(clean, DegradationParams(sigma=3.0, scale=4.0, noise=8.0, jpeg=70), np.random.default_rng(0))
    x = torch.from_numpy(np.stack([low, clean])).permute(0, 3, 1, 2).float() / 127.5 - 1  # a batch of 2
    ctx = RestoreContext.single(2)
    enc = int8.encode(x, ctx)
    assert enc.scores.shape == fp32.encode(x, ctx).scores.shape and enc.scores.dtype == torch.float32
    a, b = fp32.restore(x, ctx), int8.restore(x, ctx)
    assert b.shape == a.shape and b.dtype == torch.float32

    def image(t):
        return ((t.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    for i in range(2):
        assert psnr(image(a[i]), image(b[i])) > 36, i  # int8 rounding only (RECIPE.md: 37-47 dB)
    assert psnr(clean, image(b[0])) > psnr(clean, low) + 0.3  # and it still restores


def test_int8_cli_run(tmp_path, home_with_detectors):
    face = cv2.resize(_real_face(256), (128, 128))
    frame = np.zeros((160, 224, 3), np.uint8)
    frame[16:144, 48:176] = face
    src = make_clip(tmp_path / "in.mp4", n=6, size=(224, 160), frames=[frame] * 6)
    dst = tmp_path / "out.mp4"
    assert main([str(src), str(dst), "--model", "lite", "--precision", "int8", "--detector", "yunet",
                 "--preset", "ultrafast", "-q"]) == 0
    assert len(video_summary(dst)["times"]) == len(video_summary(src)["times"])


@pytest.mark.parametrize("extra, says", [
    (["--model", "codeformer"], "int8 is not available for 'codeformer'"),
    (["--model", "lite", "--device", "cuda"], None),  # no GPU here: the device error; with one: cpu only
    (["--model", "lite", "--fidelity", "0.5"], "built for --fidelity 1"),
])
def test_int8_usage_errors(tmp_path, capsys, frvideo_home, extra, says):
    src = make_clip(tmp_path / "in.mp4", n=2)
    err = fails([str(src), str(tmp_path / "o.mp4"), "--precision", "int8", *extra, "-q"], capsys, EXIT_USAGE)
    if says:
        assert says in err, err
    assert not (tmp_path / "o.mp4").exists()


def test_int8_refuses_other_weights(tmp_path, capsys, frvideo_home):
    """Graphs built from the shipped lite.pth do not run a user's own checkpoint."""
    own = tmp_path / "my_lite.pth"
    torch.save({"params_ema": load_restorer("lite").net.state_dict()}, own)  # same network, other bytes
    src = make_clip(tmp_path / "in.mp4", n=2)
    err = fails([str(src), str(tmp_path / "o.mp4"), "--model", "lite", "--weights", str(own),
                 "--precision", "int8", "-q"], capsys, EXIT_USAGE)
    assert "built from the shipped lite.pth" in err, err


def test_build_int8_graph_quantizes_convolutions(tmp_path, one_thread):
    pytest.importorskip("onnx", reason="building int8 graphs needs onnx (pip install 'frvideo[int8-build]')")
    import onnx

    from frvideo.nn.int8 import Int8Graph, build_int8_graph
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 3, 3, padding=1))
    samples = [torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(8)]
    path = build_int8_graph(net, [samples[0]], ["x"], ["y"], ({"x": s.numpy()} for s in samples), tmp_path / "g.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x = torch.rand(3, 3, 32, 32) * 2 - 1  # dynamic batch
    (y,) = Int8Graph(path)(x=x.numpy())
    with torch.no_grad():
        ref = net(x).numpy()
    assert y.shape == ref.shape
    err, spread = np.abs(y - ref).mean(), np.abs(ref - ref.mean()).mean()
    assert 0 < err < 0.2 * spread, (err, spread)  # rounded (so really int8), but close


@pytest.mark.parametrize("extra, expect", [
    (["--live"], INT8),  # live values time: auto takes lite's int8 graphs on a CPU
    ([], torch.float32),  # a file run keeps fp32 (on a CPU without bf16 units)
    (["--live", "--fidelity", "0.5"], torch.float32),  # graphs built for fidelity 1 only
    (["--live", "--precision", "fp32"], torch.float32),  # asked for by name
])
def test_live_auto_precision_takes_int8(monkeypatch, extra, expect):
    from frvideo import cli, hardware
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: False)
    args, origin = cli._parse_restore_args(["in.mp4", "out.mp4", "--model", "lite", "--device", "cpu", *extra])
    assert cli.validate_model_args(args, cli._OptionCheck(origin))["dtype"] == expect


def test_models_names_the_int8_graphs(capsys, frvideo_home):
    assert main(["models"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and line.split()}
    assert "--precision int8" in lines["lite"] and "int8" not in lines["ented"]
