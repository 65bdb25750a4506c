"""Parity adapter for the ../shared/parity folders vqfr_v1 and vqfr_v2 (see tests/test_parity.py)."""
from __future__ import annotations

import numpy as np
import torch

from . import VQFRRestorer

_VERSION = {"vqfr_v1": 1, "vqfr_v2": 2}


def build_for_fixture(folder: str, manifest: dict) -> torch.nn.Module:
    return VQFRRestorer.build_network({"version": _VERSION[folder], **manifest["constructor"]})


@torch.no_grad()
def fixture_outputs(folder: str, net: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The stored outputs: the official forward dict plus the codes (and v1's quant_conv output)."""
    enc = net.encode(x)
    tokens = enc["scores"].argmax(-1)
    out = {"quant_index": tokens}
    if _VERSION[folder] == 1:
        out.update(net.decode(x, tokens), z_conv=enc["z_conv"])
    else:
        # texture features once, main branch at both fidelity ratios
        texture_dec, feats = net.decode_texture(tokens, net.token_grid(x))
        out.update(enc_feat=enc["enc_feat"], quant_logit=enc["quant_logit"], texture_dec=texture_dec)
        for f in (0.0, 1.0):
            out[f"main_dec_f{f}"] = net.decode_main(feats, x, f)
    return {k: v.cpu().numpy() for k, v in out.items()}
