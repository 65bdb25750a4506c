"""Reproduces ../shared/parity/codeformer (see tests/test_parity.py)."""
import numpy as np
import torch

from .arch import CodeFormer

FIDELITIES = (0.0, 0.5, 1.0)


def build_for_fixture(folder: str, manifest: dict) -> torch.nn.Module:
    return CodeFormer(**manifest["constructor"])


def fixture_outputs(folder: str, net: CodeFormer, x: torch.Tensor) -> dict[str, np.ndarray]:
    """The official ``net(x, w=w, adain=True)`` for each stored w.

    Encodes once and decodes per w: bit-identical to three forward calls (the
    encoder side does not depend on w; tests/test_codeformer.py checks the split)
    at two thirds of the cost.
    """
    enc = net.encode(x)
    idx = enc.logits.argmax(-1)
    outputs = {f"out_w{w}": net.decode(idx, enc, w=w, adain=True).numpy() for w in FIDELITIES}
    outputs.update(logits=enc.logits.numpy(), idx=idx.numpy(), lq_feat=enc.lq_feat.numpy())
    return outputs
