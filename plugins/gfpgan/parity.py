"""Parity adapter for the ``gfpgan_v1_4`` fixture folder (tests/test_parity.py)."""
from __future__ import annotations

import numpy as np
import torch

from .arch import GFPGANv1Clean

FOLDERS = ("gfpgan_v1_4",)


def build_for_fixture(folder: str, manifest: dict) -> torch.nn.Module:
    if folder not in FOLDERS:
        raise ValueError(f"plugins.gfpgan.parity does not know fixture folder {folder!r}")
    return GFPGANv1Clean(**manifest["constructor"])


def fixture_outputs(folder: str, net: GFPGANv1Clean, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The fixture's forward call; ``style_code`` is final_linear's output viewed (b, 16, 512)."""
    captured = {}
    hook = net.final_linear.register_forward_hook(lambda mod, inp, out: captured.__setitem__("style", out))
    try:
        with torch.no_grad():
            image, _ = net(x, return_rgb=False, randomize_noise=False)
    finally:
        hook.remove()
    style = captured["style"]
    return {
        "out": image.numpy(),
        "style_code": style.view(style.shape[0], -1, net.num_style_feat).numpy(),
    }
