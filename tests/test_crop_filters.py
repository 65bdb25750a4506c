"""The OpenCV crop filters keep kornia's definitions (blend and temporal filter numerics unchanged)."""
import math

import pytest
import torch

from frvideo.faces import crop_filters as cf

kornia = pytest.importorskip("kornia")


@pytest.mark.parametrize("sigma,truncate", [(0.5, 3.0), (1.0, 3.0), (2.25, 3.0), (6.0, 3.0), (1.5, 2.5), (4.0, 2.5)])
@pytest.mark.parametrize("border", ["reflect", "replicate"])
def test_gaussian_blur_equals_kornias(sigma, truncate, border):
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    k = 2 * int(math.ceil(truncate * sigma)) + 1
    expected = kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type=border)
    assert torch.allclose(cf.gaussian_blur(x, sigma, border, truncate), expected, atol=1e-6)


def test_gaussian_blur_of_zero_sigma_is_the_input():
    x = torch.rand(1, 1, 8, 8)
    assert cf.gaussian_blur(x, 0.0) is x


@pytest.mark.parametrize("size", [(256, 256), (128, 128), (33, 47)])
def test_pyramid_steps_equal_kornias(size):
    from kornia.geometry.transform import pyrdown, pyrup
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    down = cf.pyr_down(x)
    assert down.shape == pyrdown(x).shape
    assert torch.allclose(down, pyrdown(x), atol=1e-6)
    assert torch.allclose(cf.pyr_up(x), pyrup(x), atol=1e-6)


def test_filters_do_not_touch_their_input_and_take_views():
    x = torch.rand(2, 4, 32, 32)[:, 1:]  # not contiguous
    before = x.clone()
    out = cf.gaussian_blur(x, 1.0)
    assert out.shape == x.shape and torch.equal(x, before)
    assert not torch.allclose(out, x)
