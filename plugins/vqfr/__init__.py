"""The ``vqfr`` backend: VQFR v1 and v2 (TencentARC/VQFR, Apache-2.0).

VQFR predicts (v2, 'Predict' mode) or looks up (v1, nearest L2) one of 1024
codes for each cell of a 16x16 grid over the 512x512 face, decodes the codes
with a VQGAN decoder ("texture" branch) and warps those features towards the
input with deformable convolutions ("main" branch). The model card's
``arch.version`` (1 or 2) picks the network; the other ``arch`` entries are
the official constructor arguments.

Token interface: ``encode`` returns B x 256 x 1024 scores (v2: the logits of
the code-prediction head; v1: negative squared distances to the codebook
after ``quant_conv``) and keeps the input image, which the main branch needs
(its input-feature conv and, in v1, the final conv); ``decode`` rebuilds the
face from any token grid. v2's ``fidelity`` (ctx.fidelity, else the card's
``defaults.fidelity``) blends the aligned features into the texture features;
at 0 the main branch is skipped (the result is the texture image). v1 has no
fidelity control.
"""
from __future__ import annotations

import copy

import torch

from frvideo.errors import ConfigError
from frvideo.restore import Encoded, RestoreContext, Restorer

from .arch_v1 import VQFRv1
from .arch_v2 import VQFRv2

__all__ = ["VQFRRestorer", "VQFRv1", "VQFRv2"]

_DEFAULT_FIDELITY = 0.0  # the official demo's default (-f 0.0)


class VQFRRestorer(Restorer):
    name = "vqfr"
    codebook_size = 1024

    def __init__(self, net: torch.nn.Module, config):
        super().__init__(net, config)
        if getattr(net, "num_code", self.codebook_size) != self.codebook_size:
            self.codebook_size = net.num_code  # e.g. a reduced test configuration

    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        arch = copy.deepcopy(dict(arch))  # never hand the card's own dicts to a constructor
        version = arch.pop("version", 2)
        networks = {1: VQFRv1, 2: VQFRv2}
        if version not in networks:
            raise ConfigError(f"vqfr: arch.version must be 1 or 2, not {version!r}")
        try:
            return networks[version](**arch)
        except (TypeError, KeyError, ValueError) as exc:
            raise ConfigError(f"vqfr v{version}: bad arch arguments ({type(exc).__name__}: {exc})") from None

    @property
    def version(self) -> int:
        return 1 if isinstance(self.net, VQFRv1) else 2

    def fidelity(self, ctx: RestoreContext) -> float:
        if ctx.fidelity is not None:
            return float(ctx.fidelity)
        return float(self.config.defaults.get("fidelity", _DEFAULT_FIDELITY))

    @torch.no_grad()
    def encode(self, faces: torch.Tensor, ctx: RestoreContext) -> Encoded:
        x = faces.to(device=self.device, dtype=self.dtype)
        out = self.net.encode(x)
        return Encoded(scores=out["scores"].float(), state={"x": x})

    @torch.no_grad()
    def decode(self, encoded: Encoded, tokens: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        x = encoded.state["x"]
        tokens = tokens.to(device=x.device, dtype=torch.long)
        return self.net.decode(x, tokens, self.fidelity(ctx))["main_dec"]
