"""CodeFormer backend: token interface, batching, fidelity, precision.

Runs on a tiny random-init network (32x32 faces, 16x16 latent, 1 transformer
layer, 64 codes, fusion at both resolutions); the full-size network is checked
against the official outputs by tests/test_parity.py.
"""
import pytest
import torch

from frvideo.models import ModelConfig, load_model_config
from frvideo.nn.quantizer import VectorQuantizer
from frvideo.restore import RestoreContext
from plugins.codeformer import CodeFormerRestorer
from plugins.codeformer.arch import CodeFormer

TINY = dict(
    dim_embd=64, n_head=4, n_layers=1, codebook_size=64, connect_list=["16", "32"],
    img_size=32, nf=32, ch_mult=(1, 2), emb_dim=32,
)


@pytest.fixture(scope="module")
def restorer():
    torch.manual_seed(0)
    config = ModelConfig(name="tiny", backend="codeformer", arch=TINY, defaults={"fidelity": 0.5})
    return CodeFormerRestorer(CodeFormerRestorer.build_network(TINY), config)


@pytest.fixture(scope="module")
def faces():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1


def ctx(batch, fidelity=None):
    return RestoreContext.single(batch, fidelity)


def test_scores_cover_the_latent_grid(restorer, faces):
    enc = restorer.encode(faces, ctx(2))
    assert enc.scores.shape == (2, 16 * 16, TINY["codebook_size"])
    assert enc.scores.dtype == torch.float32


def test_decode_of_argmax_is_restore_and_forward(restorer, faces):
    enc = restorer.encode(faces, ctx(2, 0.7))
    split = restorer.decode(enc, enc.scores.argmax(-1), ctx(2, 0.7))
    assert torch.equal(split, restorer.restore(faces, ctx(2, 0.7)))
    with torch.no_grad():
        out, logits, _ = restorer.net(faces, w=0.7, adain=True)
    assert torch.equal(split, out)
    assert torch.equal(enc.scores, logits)


def test_decode_follows_the_given_tokens(restorer, faces):
    enc = restorer.encode(faces, ctx(2))
    tokens = enc.scores.argmax(-1)
    other = tokens.clone()
    other[:, :16] = (other[:, :16] + 1) % TINY["codebook_size"]
    a, b = restorer.decode(enc, tokens, ctx(2)), restorer.decode(enc, other, ctx(2))
    assert not torch.allclose(a, b)


def test_batch_equals_one_at_a_time(restorer, faces):
    both = restorer.restore(faces, ctx(2))
    singles = torch.cat([restorer.restore(faces[i : i + 1], ctx(1)) for i in range(2)])
    assert torch.allclose(both, singles, atol=1e-5)


def test_fidelity_weight(restorer, faces):
    outs = {w: restorer.restore(faces, ctx(2, w)) for w in (0.0, 0.5, 1.0)}
    assert not torch.allclose(outs[0.0], outs[0.5])
    assert not torch.allclose(outs[0.5], outs[1.0])
    assert torch.equal(restorer.restore(faces, ctx(2)), outs[0.5])  # None -> card default 0.5


def test_zero_fidelity_skips_fusion(faces):
    torch.manual_seed(0)
    config = ModelConfig(name="tiny", backend="codeformer", arch=TINY, defaults={"fidelity": 0.5})
    r = CodeFormerRestorer(CodeFormer(**TINY), config)
    before = r.restore(faces, ctx(2, 0.0))
    with torch.no_grad():
        for p in r.net.fuse_convs_dict.parameters():
            p.fill_(float("nan"))
    assert torch.equal(r.restore(faces, ctx(2, 0.0)), before)
    assert r.restore(faces, ctx(2, 0.1)).isnan().all()


def test_input_is_cast_to_the_net_precision(faces):
    torch.manual_seed(0)
    config = ModelConfig(name="tiny", backend="codeformer", arch=TINY)
    r = CodeFormerRestorer(CodeFormer(**TINY), config)
    ref = r.restore(faces, ctx(2, 0.5))
    r.to("cpu", torch.float64)
    out = r.restore(faces, ctx(2, 0.5))  # float32 faces into a float64 net
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), ref, atol=1e-4)


def test_full_size_layout_matches_upstream_tables():
    arch = load_model_config("codeformer").arch
    with torch.device("meta"):
        net = CodeFormerRestorer.build_network(arch)
    assert sum(p.numel() for p in net.state_dict().values()) == 94_112_707
    assert net.enc_taps == {"32": 14, "64": 11, "128": 8, "256": 5}
    assert net.gen_taps == {9: "32", 12: "64", 15: "128", 18: "256"}
    enc, gen = net.encoder.level_resblocks, net.generator.level_resblocks
    # upstream's tables for the resolutions connect_list leaves out
    assert (enc[512][-1], enc[16][-1], gen[512][0], gen[16][-1]) == (2, 18, 21, 6)


def test_quantizer_scores_lookup():
    torch.manual_seed(0)
    q = VectorQuantizer(codebook_size=10, emb_dim=4)
    z = torch.randn(2, 4, 3, 5)
    flat = z.flatten(2).transpose(1, 2)
    dist = torch.cdist(flat, q.embedding.weight.expand(2, -1, -1)) ** 2
    assert torch.allclose(q.scores(z), -dist, atol=1e-5)
    idx = q.nearest(z)
    assert torch.equal(idx, dist.argmin(-1))
    codes = q.lookup(idx, (3, 5))
    assert codes.shape == z.shape
    assert torch.equal(codes[1, :, 2, 4], q.embedding.weight[idx[1, 2 * 5 + 4]])
