"""The pure-PyTorch DCNv2 against plain convolutions and an explicit reference."""
import math

import pytest
import torch
import torch.nn.functional as F

from frvideo.nn.dcn import DCNv2Pack, modulated_deform_conv2d


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny tensors: threading only adds overhead."""


def _reference_dcn(x, offset, mask, weight, bias, pad=1):
    """Slow DCNv2 written from the definition: explicit 4-corner gather, float64."""
    x, offset, mask, weight = (t.double() for t in (x, offset, mask, weight))
    b, c, h, w = x.shape
    cout, _, kh, kw = weight.shape
    k_taps = kh * kw
    ho, wo = offset.shape[-2:]
    dg = offset.shape[1] // (2 * k_taps)
    cg = c // dg
    cols = torch.zeros(b, c, k_taps, ho, wo, dtype=torch.float64)
    for n in range(b):
        for g in range(dg):
            for i in range(kh):
                for j in range(kw):
                    k = i * kw + j
                    for oy in range(ho):
                        for ox in range(wo):
                            py = oy - pad + i + offset[n, g * 2 * k_taps + 2 * k, oy, ox].item()
                            px = ox - pad + j + offset[n, g * 2 * k_taps + 2 * k + 1, oy, ox].item()
                            if py <= -1 or py >= h or px <= -1 or px >= w:
                                continue
                            y0, x0 = math.floor(py), math.floor(px)
                            ly, lx = py - y0, px - x0
                            val = torch.zeros(cg, dtype=torch.float64)
                            for yy, xx, wt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                                               (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    val += wt * x[n, g * cg:(g + 1) * cg, yy, xx]
                            cols[n, g * cg:(g + 1) * cg, k, oy, ox] = val * mask[n, g * k_taps + k, oy, ox]
    out = torch.einsum("ok,bkp->bop", weight.reshape(cout, c * k_taps), cols.reshape(b, c * k_taps, ho * wo))
    return (out.reshape(b, cout, ho, wo) + bias.double().view(1, -1, 1, 1)).float()


def _weights(c_in=8, c_out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(c_out, c_in, 3, 3, generator=g) / 5, torch.randn(c_out, generator=g)


def test_zero_offset_full_mask_is_conv2d():
    x = torch.randn(2, 8, 11, 13)
    weight, bias = _weights()
    offset = torch.zeros(2, 2 * 4 * 9, 11, 13)
    mask = torch.ones(2, 4 * 9, 11, 13)
    got = modulated_deform_conv2d(x, offset, mask, weight, bias, padding=1)
    torch.testing.assert_close(got, F.conv2d(x, weight, bias, padding=1), atol=1e-5, rtol=1e-5)


def test_integer_shift_is_shifted_conv():
    """dy = +2, dx = -1 on every tap of group 1 only: that group sees the input shifted."""
    x = torch.randn(1, 8, 12, 10)
    weight, bias = _weights()
    dg, k = 2, 9
    offset = torch.zeros(1, 2 * dg * k, 12, 10)
    offset[:, 2 * k + 0:4 * k:2] = 2.0  # group 1, dy of every tap (interleaved layout)
    offset[:, 2 * k + 1:4 * k:2] = -1.0  # group 1, dx
    got = modulated_deform_conv2d(x, offset, None, weight, bias, padding=1)
    # sample at (y + 2, x - 1): a valid conv over a zero-padded canvas, the window moved by (2, -1)
    pad = 4
    xp = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]

    def window(dy, dx):
        return xp[:, :, pad - 1 + dy:pad + 1 + dy + h, pad - 1 + dx:pad + 1 + dx + w]

    x_ref = torch.cat([window(0, 0)[:, :4], window(2, -1)[:, 4:]], dim=1)
    torch.testing.assert_close(got, F.conv2d(x_ref, weight, bias), atol=1e-5, rtol=1e-5)


def test_points_outside_the_image_read_zero():
    """A point at py = -1 (or beyond H) reads 0; at py = -0.5 it reads half of row 0."""
    x = torch.rand(1, 1, 4, 4) + 1.0
    weight = torch.zeros(1, 1, 3, 3)
    weight[0, 0, 1, 1] = 1.0  # centre tap only: out = sample at (oy + dy, ox + dx)
    bias = torch.zeros(1)

    def sample(dy, dx):
        offset = torch.zeros(1, 18, 4, 4)
        offset[:, 2 * 4] = dy
        offset[:, 2 * 4 + 1] = dx
        return modulated_deform_conv2d(x, offset, torch.ones(1, 9, 4, 4), weight, bias, padding=1)[0, 0]

    out = sample(-1.0, 0.0)  # row 0 samples y = -1: zero; row r samples row r-1
    assert torch.all(out[0] == 0)
    torch.testing.assert_close(out[1:], x[0, 0, :-1])
    out = sample(-0.5, 0.0)
    torch.testing.assert_close(out[0], 0.5 * x[0, 0, 0])
    out = sample(0.0, 4.0)  # px >= W everywhere
    assert torch.all(out == 0)
    out = sample(0.0, 0.25)  # last column: corner x = 4 is outside, weight 0.75 on x = 3
    torch.testing.assert_close(out[:, 3], 0.75 * x[0, 0, :, 3])


@pytest.mark.parametrize("dg", [1, 2])
def test_random_fractional_offsets_match_reference(dg):
    g = torch.Generator().manual_seed(dg)
    x = torch.randn(2, 4, 6, 7, generator=g)
    weight, bias = _weights(4, 3, seed=dg)
    offset = 2.5 * torch.randn(2, 2 * dg * 9, 6, 7, generator=g)
    mask = torch.rand(2, dg * 9, 6, 7, generator=g)
    got = modulated_deform_conv2d(x, offset, mask, weight, bias, padding=1)
    torch.testing.assert_close(got, _reference_dcn(x, offset, mask, weight, bias), atol=2e-5, rtol=1e-5)


def test_row_chunking_and_half_precision(monkeypatch):
    import frvideo.nn.dcn as dcn

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 9, 8, generator=g)
    weight, bias = _weights(4, 4, seed=3)
    offset = torch.randn(1, 2 * 2 * 9, 9, 8, generator=g)
    mask = torch.rand(1, 2 * 9, 9, 8, generator=g)
    whole = modulated_deform_conv2d(x, offset, mask, weight, bias, padding=1)
    monkeypatch.setattr(dcn, "_MAX_COLUMN_ELEMENTS", 4 * 9 * 8 * 2)  # two rows per chunk
    torch.testing.assert_close(modulated_deform_conv2d(x, offset, mask, weight, bias, padding=1), whole)
    half = modulated_deform_conv2d(x.bfloat16(), offset.bfloat16(), mask.bfloat16(), weight, bias, padding=1)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), whole, atol=0.15, rtol=0.05)


def test_pack_splits_offsets_and_mask():
    """cat(o1, o2) is the offset, sigmoid of the third chunk the mask."""
    pack = DCNv2Pack(4, 5, 3, padding=1, deformable_groups=2, cond_channels=3)
    assert [k for k in pack.state_dict()] == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    torch.nn.init.normal_(pack.conv_offset.weight, std=0.3)
    x, cond = torch.randn(1, 4, 5, 6), torch.randn(1, 3, 5, 6)
    raw = pack.conv_offset(cond)
    offset = raw[:, :36]
    mask = torch.sigmoid(raw[:, 36:])
    with torch.no_grad():
        want = _reference_dcn(x, offset, mask, pack.weight, pack.bias)
        torch.testing.assert_close(pack(x, cond), want, atol=2e-5, rtol=1e-5)
