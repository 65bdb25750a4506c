"""GFPGAN backend and the shared StyleGAN2 layers, on a tiny random network.

Numerical agreement with the official code is checked by test_parity.py
(fixture gfpgan_v1_4); these tests cover the restorer contract and properties
that hold for any weights.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from frvideo.errors import ConfigError
from frvideo.models import ModelConfig, load_model_config
from frvideo.nn.stylegan2 import ModulatedConv2d, StyleGAN2Generator
from frvideo.restore import RestoreContext
from plugins.gfpgan import GFPGANRestorer

# Same structure as v1.4 (latent input, one latent per layer, half SFT), tiny widths:
# decoder channels 32 (4..32 px) / 16 (64 px), U-Net half of that.
TINY_ARCH = dict(out_size=64, num_style_feat=32, channel_multiplier=1, decoder_load_path=None, fix_decoder=False,
                 num_mlp=2, input_is_latent=True, different_w=True, narrow=1 / 16, sft_half=True)


def _randomize(net: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (the default init zeroes the noise strengths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            n = torch.randn(p.shape, generator=g)
            if p.dim() <= 1:
                p.copy_(1 + 0.1 * n if name.endswith("weight") else 0.1 * n)
            else:
                p.copy_(n / math.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def restorer():
    net = GFPGANRestorer.build_network(TINY_ARCH)
    _randomize(net)
    return GFPGANRestorer(net, ModelConfig(name="gfpgan-tiny", backend="gfpgan", arch=TINY_ARCH))


def _faces(b: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, 64, 64, generator=g) * 2 - 1


def test_restore_shape_and_dtype(restorer):
    assert restorer.codebook_size is None and not restorer.has_codebook
    x = _faces(2).double()
    out = restorer.restore(x, RestoreContext.single(2))
    assert out.shape == x.shape
    assert out.dtype == restorer.dtype and torch.isfinite(out).all()


def test_restore_deterministic(restorer):
    x = _faces(1)
    a = restorer.restore(x, RestoreContext.single(1))
    b = restorer.restore(x, RestoreContext.single(1))
    assert torch.equal(a, b)


def test_batch_equals_single(restorer):
    x = _faces(2, seed=3)
    both = restorer.restore(x, RestoreContext.single(2))
    one_by_one = torch.cat([restorer.restore(x[i:i + 1], RestoreContext.single(1)) for i in range(2)])
    scale = max(1.0, float(both.abs().max()))
    assert (both - one_by_one).abs().max() <= 1e-5 * scale


def test_stored_noise_differs_from_fresh_noise(restorer):
    x = _faces(1)
    stored = restorer.restore(x, RestoreContext.single(1))
    with torch.no_grad():
        fresh, _ = restorer.net(x, return_rgb=False, randomize_noise=True)
    assert (fresh - stored).abs().max() > 1e-3


@pytest.mark.parametrize("sample_mode", [None, "upsample"])
def test_modulated_conv_demodulation(sample_mode):
    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 5, 3, num_style_feat=16, demodulate=True, sample_mode=sample_mode)
    style = torch.randn(3, 16)
    weight = conv.modulated_weight(style)  # (b, C_out, C_in, k, k)
    norms = weight.square().sum(dim=(2, 3, 4)).sqrt()
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)

    # The batched forward equals a per-sample convolution with those effective weights.
    x = torch.randn(3, 8, 6, 6)
    with torch.no_grad():
        got = conv(x, style)
        xs = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) if sample_mode else x
        ref = torch.cat([F.conv2d(xs[i:i + 1], weight[i], padding=1) for i in range(3)])
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)


def test_generator_plain_stylegan2():
    torch.manual_seed(0)
    gen = StyleGAN2Generator(out_size=16, num_style_feat=8, num_mlp=2, channel_multiplier=1, narrow=1 / 32)
    assert [tuple(b.shape[-2:]) for b in gen.stored_noise()] == [(4, 4), (8, 8), (8, 8), (16, 16), (16, 16)]
    with torch.no_grad():
        image, latent = gen([torch.randn(2, 8)], randomize_noise=False, return_latents=True)
    assert image.shape == (2, 3, 16, 16) and latent.shape == (2, gen.num_latent, 8)


def test_card_builds_v14_layout():
    card = load_model_config("gfpgan")
    assert card.backend == "gfpgan" and card.weights.param_keys == ["params_ema", "params"]
    with torch.device("meta"):
        net = GFPGANRestorer.build_network(card.arch)
    sd = net.state_dict()
    assert len(sd) == 285 and sum(v.numel() for v in sd.values()) == 87_143_276
    assert tuple(sd["final_linear.weight"].shape) == (16 * 512, 256 * 16)
    assert tuple(sd["stylegan_decoder.noises.noise14"].shape) == (1, 1, 512, 512)


def test_decoder_load_path_rejected():
    with pytest.raises(ConfigError):
        GFPGANRestorer.build_network({**TINY_ARCH, "decoder_load_path": "stylegan2.pth"})
