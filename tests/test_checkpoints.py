"""Checkpoint files: which entry holds the weights, and one-line errors when they do not fit.

The official loaders read CodeFormer's weights from ``params_ema`` only, and
GFPGAN's / VQFR's from ``params_ema`` if present, else ``params`` (both strict).
Tiny random networks, no ../shared needed.
"""
import math

import pytest
import torch

from frvideo.errors import WeightsError
from frvideo.models import ModelConfig, WeightSpec
from frvideo.restore import read_checkpoint
from plugins.codeformer import CodeFormerRestorer
from plugins.gfpgan import GFPGANRestorer

CODEFORMER_TINY = dict(dim_embd=64, n_head=4, n_layers=1, codebook_size=64, connect_list=["16", "32"],
                       img_size=32, nf=32, ch_mult=(1, 2), emb_dim=32)
GFPGAN_TINY = dict(out_size=64, num_style_feat=32, channel_multiplier=1, decoder_load_path=None, fix_decoder=False,
                   num_mlp=2, input_is_latent=True, different_w=True, narrow=1 / 16, sft_half=True)

VQFR_V2_TINY = dict(
    version=2, base_channels=32, channel_multipliers=[1, 1, 2], num_enc_blocks=1, use_enc_attention=True,
    num_dec_blocks=1, use_dec_attention=True, code_dim=32, inpfeat_dim=8,
    align_opt={"cond_channels": 8, "deformable_groups": 4}, code_selection_mode="Predict",
    quantizer_opt={"type": "L2VectorQuantizer", "num_code": 48, "code_dim": 32, "spatial_size": [4, 4]})

# (restorer class, tiny arch, param_key list as in the model card)
BACKENDS = {
    "codeformer": (CodeFormerRestorer, CODEFORMER_TINY, ["params_ema"]),
    "gfpgan": (GFPGANRestorer, GFPGAN_TINY, ["params_ema", "params"]),
}
try:
    from plugins.vqfr import VQFRRestorer
except ImportError:  # backend not there
    pass
else:
    BACKENDS["vqfr"] = (VQFRRestorer, VQFR_V2_TINY, ["params_ema", "params"])


def _config(backend: str, param_keys=None) -> ModelConfig:
    cls, arch, keys = BACKENDS[backend]
    return ModelConfig(name=f"{backend}-tiny", backend=backend, arch=arch,
                       weights=WeightSpec(file="x.pth", param_keys=list(param_keys or keys)))


def _random_state(backend: str, seed: int) -> dict:
    """A state dict of the tiny network with every float tensor random (seeded)."""
    cls, arch, _ = BACKENDS[backend]
    g = torch.Generator().manual_seed(seed)
    sd = cls.build_network(arch).state_dict()
    return {k: (torch.randn(v.shape, generator=g) / math.sqrt(max(v[0].numel(), 1)) if v.is_floating_point()
                and v.dim() else v.clone()) for k, v in sd.items()}


def _save(tmp_path, name: str, obj) -> str:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _assert_loaded(restorer, sd: dict) -> None:
    got = restorer.net.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_params_ema_loads(tmp_path, backend):
    sd = _random_state(backend, 1)
    path = _save(tmp_path, "ema.pth", {"params_ema": sd, "iter": 1000})
    cls = BACKENDS[backend][0]
    _assert_loaded(cls.from_checkpoint(_config(backend), path), sd)


@pytest.mark.parametrize("backend", sorted(set(BACKENDS) - {"codeformer"}))
def test_params_loads_where_the_official_loader_accepts_it(tmp_path, backend):
    sd = _random_state(backend, 2)
    path = _save(tmp_path, "params.pth", {"params": sd})
    _assert_loaded(BACKENDS[backend][0].from_checkpoint(_config(backend), path), sd)


def test_params_only_is_refused_where_the_official_loader_wants_params_ema(tmp_path):
    # CodeFormer's inference script reads checkpoint['params_ema'] and nothing else
    path = _save(tmp_path, "params.pth", {"params": _random_state("codeformer", 2)})
    with pytest.raises(WeightsError) as e:
        CodeFormerRestorer.from_checkpoint(_config("codeformer"), path)
    msg = str(e.value)
    assert "\n" not in msg and "params_ema" in msg


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_params_ema_takes_precedence_over_params(tmp_path, backend):
    ema, raw = _random_state(backend, 3), _random_state(backend, 4)
    cls = BACKENDS[backend][0]
    for ckpt in ({"params": raw, "params_ema": ema}, {"params_ema": ema, "params": raw}):  # order-independent
        path = _save(tmp_path, "both.pth", ckpt)
        _assert_loaded(cls.from_checkpoint(_config(backend, ["params_ema", "params"]), path), ema)
    # read_checkpoint follows the given order
    path = _save(tmp_path, "both.pth", {"params": raw, "params_ema": ema})
    picked = read_checkpoint(path, ["params", "params_ema"])
    assert all(torch.equal(picked[k], raw[k]) for k in raw)


def test_flat_state_dict_is_accepted(tmp_path):
    sd = _random_state("gfpgan", 5)
    path = _save(tmp_path, "flat.pth", sd)
    _assert_loaded(GFPGANRestorer.from_checkpoint(_config("gfpgan"), path), sd)


def _one_line_error(cls, config, path) -> str:
    with pytest.raises(WeightsError) as e:
        cls.from_checkpoint(config, path)
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_missing_key_is_named(tmp_path, backend):
    sd = _random_state(backend, 6)
    key = sorted(sd)[len(sd) // 2]
    del sd[key]
    path = _save(tmp_path, "missing.pth", {"params_ema": sd})
    msg = _one_line_error(BACKENDS[backend][0], _config(backend), path)
    assert key in msg and "missing" in msg


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_wrong_shape_is_named(tmp_path, backend):
    sd = _random_state(backend, 7)
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.dim() >= 2)
    sd[key] = torch.zeros(*sd[key].shape[:-1], sd[key].shape[-1] + 1)
    path = _save(tmp_path, "shape.pth", {"params_ema": sd})
    msg = _one_line_error(BACKENDS[backend][0], _config(backend), path)
    assert key in msg and "shape" in msg
    assert str(tuple(sd[key].shape)) in msg  # the file's shape is shown


def test_unexpected_key_is_named(tmp_path):
    sd = _random_state("codeformer", 8)
    sd["extra.weight"] = torch.zeros(3)
    path = _save(tmp_path, "extra.pth", {"params_ema": sd})
    msg = _one_line_error(CodeFormerRestorer, _config("codeformer"), path)
    assert "extra.weight" in msg


def test_unreadable_files(tmp_path):
    config = _config("codeformer")
    msg = _one_line_error(CodeFormerRestorer, config, tmp_path / "absent.pth")
    assert "not found" in msg
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"PK\x03\x04 this is not a torch file\n\n")
    _one_line_error(CodeFormerRestorer, config, bad)
    notdict = _save(tmp_path, "list.pth", [torch.zeros(1)])
    _one_line_error(CodeFormerRestorer, config, notdict)


@pytest.mark.parametrize("card,keys", [("codeformer", ["params_ema"]), ("gfpgan", ["params_ema", "params"]),
                                       ("vqfr", ["params_ema", "params"]), ("vqfr-v1", ["params_ema", "params"])])
def test_model_cards_read_the_entries_the_official_loaders_read(card, keys):
    from frvideo.errors import ConfigError
    from frvideo.models import load_model_config

    try:
        config = load_model_config(card)
    except ConfigError:
        pytest.skip(f"no model card {card!r}")
    assert config.weights is not None and config.weights.param_keys == keys


def test_checkpoint_with_non_string_keys_is_a_weights_error(tmp_path):
    import torch

    from frvideo.errors import WeightsError
    from frvideo.restore import read_checkpoint
    f = tmp_path / "odd.pth"
    torch.save({1: "x"}, f)
    with pytest.raises(WeightsError):
        read_checkpoint(f, ["params_ema"])
