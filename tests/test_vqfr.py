"""VQFR backend on reduced random configurations (the full nets are covered by test_parity)."""
import copy
import json
import math

import pytest
import torch

from conftest import SHARED
from frvideo.errors import ConfigError
from frvideo.models import ModelConfig, load_model_config
from frvideo.restore import RestoreContext
from plugins.vqfr import VQFRRestorer, VQFRv1, VQFRv2

V2_ARCH = dict(
    version=2, base_channels=32, channel_multipliers=[1, 1, 2], num_enc_blocks=1, use_enc_attention=True,
    num_dec_blocks=1, use_dec_attention=True, code_dim=32, inpfeat_dim=8,
    align_opt={"cond_channels": 8, "deformable_groups": 4}, code_selection_mode="Predict",
    quantizer_opt={"type": "L2VectorQuantizer", "num_code": 48, "code_dim": 32, "spatial_size": [4, 4]})

V1_ARCH = dict(
    version=1, base_channels=32, proj_patch_size=4, resolution_scale_rates=[1, 2, 2], channel_multipliers=[1, 1, 2],
    encoder_num_blocks=1, decoder_num_blocks=1, quant_level=["Level_4"], fix_keys=["embedding"],
    inpfeat_extraction_opt={"in_dim": 3, "out_dim": 8}, align_from_patch=4,
    align_opt={f"Level_{s}": {"cond_channels": 8, "cond_downscale_rate": s, "deformable_groups": 4} for s in (4, 2, 1)},
    quantizer_opt={"Level_4": {"type": "L2VectorQuantizerKmeans", "in_dim": 64, "num_code": 40, "code_dim": 16,
                               "reservoir_size": 64, "reestimate_iters": 10, "reestimate_maxiters": -1,
                               "warmup_iters": -1}})


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: threading only adds overhead."""


def _make(arch, defaults=None, seed=0):
    """A restorer with random weights at the scale fill.py uses (so offsets are non-trivial)."""
    cfg = ModelConfig(name="vqfr-test", backend="vqfr", arch=copy.deepcopy(arch), defaults=defaults or {})
    net = VQFRRestorer.build_network(cfg.arch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in net.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if p.dim() <= 1:
                p.copy_(1 + 0.1 * n if key.endswith("weight") else 0.1 * n)
            else:
                p.copy_(n / math.sqrt(p[0].numel()))
    return VQFRRestorer(net, cfg)


def _faces(b=2, size=16, seed=1):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def v1():
    return _make(V1_ARCH, seed=3)


@pytest.fixture(scope="module")
def v2():
    return _make(V2_ARCH, defaults={"fidelity": 0.5}, seed=4)


def test_build_picks_version_and_leaves_arch_alone():
    arch = copy.deepcopy(V1_ARCH)
    assert isinstance(VQFRRestorer.build_network(arch), VQFRv1)
    assert arch == V1_ARCH  # neither 'version' popped nor align_opt filled in
    assert isinstance(VQFRRestorer.build_network(dict(V2_ARCH)), VQFRv2)
    with pytest.raises(ConfigError):
        VQFRRestorer.build_network({**V2_ARCH, "version": 3})
    with pytest.raises(ConfigError):
        VQFRRestorer.build_network({**V2_ARCH, "quantizer_opt": {"type": "L2VectorQuantizerKmeans"}})


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_restore_is_decode_of_argmax_and_matches_official_forward(which, request):
    r = request.getfixturevalue(which)
    x = _faces()
    ctx = RestoreContext.single(2, fidelity=1.0)
    enc = r.encode(x, ctx)
    assert enc.scores.shape == (2, 16, r.codebook_size) and enc.scores.dtype == torch.float32
    tokens = enc.scores.argmax(-1)
    assert len(tokens.unique()) > 1
    out = r.decode(enc, tokens, ctx)
    assert out.shape == x.shape
    assert torch.equal(out, r.restore(x, ctx))
    with torch.no_grad():
        official = r.net(x, fidelity_ratio=1.0 if which == "v2" else None)
    assert torch.equal(official["main_dec"], out)
    assert list(official) == (["enc_feat", "quant_logit", "texture_dec", "main_dec"] if which == "v2"
                              else ["dec", "main_dec"])


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_decode_uses_the_given_tokens_and_batches(which, request):
    r = request.getfixturevalue(which)
    x = _faces()
    ctx = RestoreContext.single(2, fidelity=1.0)
    enc = r.encode(x, ctx)
    tokens = enc.scores.argmax(-1)
    other = tokens.clone()
    other[:, :4] = (other[:, :4] + 1) % r.codebook_size
    changed = r.decode(enc, other, ctx)
    base = r.decode(enc, tokens, ctx)
    assert not torch.allclose(changed, base)
    # one face alone gives the same result as in the batch
    single = r.restore(x[1:], RestoreContext.single(1, fidelity=1.0))
    torch.testing.assert_close(single, base[1:], atol=1e-5, rtol=1e-5)


def test_v1_scores_are_negative_squared_distances(v1):
    x = _faces(1)
    enc = v1.encode(x, RestoreContext.single(1))
    with torch.no_grad():
        z = v1.net.quantizer.quantize_dict["Level_4"].quant_conv(v1.net.encoder(x)["Level_4"])
        codes = v1.net.quantizer.quantize_dict["Level_4"].embedding.weight
        d2 = ((z.flatten(2).transpose(1, 2)[:, :, None, :] - codes[None, None]) ** 2).sum(-1)
    torch.testing.assert_close(enc.scores, -d2, atol=1e-4, rtol=1e-4)
    assert torch.equal(enc.scores.argmax(-1), d2.argmin(-1))


def test_v2_scores_are_the_prediction_logits_and_nearest_mode(v2):
    x = _faces(1)
    enc = v2.encode(x, RestoreContext.single(1))
    with torch.no_grad():
        assert torch.equal(enc.scores, v2.net(x)["quant_logit"])
    nearest = _make({**V2_ARCH, "code_selection_mode": "Nearest"}, seed=4)
    assert nearest.net.feat2index is None
    enc = nearest.encode(x, RestoreContext.single(1))
    with torch.no_grad():
        feat = nearest.net.encoder(x).flatten(2).transpose(1, 2)
        d2 = torch.cdist(feat, nearest.net.quantizer.embedding.weight[None]) ** 2
    assert torch.equal(enc.scores.argmax(-1), d2.argmin(-1))


def test_v2_fidelity(v2):
    x = _faces(1)
    enc = v2.encode(x, RestoreContext.single(1))
    tokens = enc.scores.argmax(-1)
    out = {f: v2.decode(enc, tokens, RestoreContext.single(1, fidelity=f)) for f in (0.0, 0.5, 1.0)}
    assert not torch.allclose(out[0.0], out[1.0], atol=1e-3)
    assert not torch.allclose(out[0.5], out[1.0], atol=1e-3)
    with torch.no_grad():
        official = v2.net(x, fidelity_ratio=0.0)
    assert torch.equal(out[0.0], official["texture_dec"])  # ratio 0: the texture branch alone
    # ctx.fidelity None falls back to the card's default (0.5 here)
    assert torch.equal(v2.decode(enc, tokens, RestoreContext.single(1)), out[0.5])


def test_v1_ignores_fidelity(v1):
    x = _faces(1)
    enc = v1.encode(x, RestoreContext.single(1))
    tokens = enc.scores.argmax(-1)
    a = v1.decode(enc, tokens, RestoreContext.single(1, fidelity=0.0))
    assert torch.equal(a, v1.decode(enc, tokens, RestoreContext.single(1, fidelity=1.0)))


def test_other_dtype(v2):
    r = _make(V2_ARCH, seed=4).to("cpu", torch.float64)
    x = _faces(1)
    out = r.restore(x, RestoreContext.single(1, fidelity=1.0))
    assert out.dtype == torch.float64
    ref = v2.restore(x, RestoreContext.single(1, fidelity=1.0))
    torch.testing.assert_close(out.float(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,folder", [("vqfr", "vqfr_v2"), ("vqfr-v1", "vqfr_v1")])
def test_model_cards(name, folder):
    cfg = load_model_config(name)
    assert cfg.backend == "vqfr" and cfg.weights is not None
    assert cfg.weights.param_keys == ["params_ema", "params"]
    if name == "vqfr":
        assert cfg.defaults["fidelity"] == 0.0
    manifest = SHARED / "parity" / folder / "manifest.json"
    if not manifest.is_file():
        pytest.skip("parity manifests not found")
    man = json.loads(manifest.read_text())
    with torch.device("meta"):
        net = VQFRRestorer.build_network(cfg.arch)
    sd = net.state_dict()
    assert list(sd) == list(man["keys"])
    assert all(list(sd[k].shape) == v["shape"] for k, v in man["keys"].items())


def test_code_distances_are_fp32_for_bf16_features():
    from plugins.vqfr.blocks import nearest_code_scores
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 64, 4, 4, generator=g).bfloat16()
    codes = torch.randn(256, 64, generator=g).bfloat16()
    scores = nearest_code_scores(z, codes)
    assert scores.dtype == torch.float32
    assert torch.equal(scores.argmax(-1), nearest_code_scores(z.float(), codes.float()).argmax(-1))
