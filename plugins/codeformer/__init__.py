"""The ``codeformer`` backend: CodeFormer with its token (encode/decode) interface.

Scores are the transformer's logits over the 1024-entry codebook for the 16x16
latent grid (256 tokens); decode looks the chosen tokens up, matches them to the
input's feature statistics (AdaIN) and runs the generator with the fidelity
weight ``w`` (``ctx.fidelity``, else the model card's ``defaults.fidelity``).
"""
import torch

from frvideo.restore import Encoded, RestoreContext, Restorer

from .arch import CodeFormer, CodeFormerEncoding

__all__ = ["CodeFormerRestorer"]


class CodeFormerRestorer(Restorer):
    name = "codeformer"
    codebook_size = 1024

    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        return CodeFormer(**arch)

    def _fidelity(self, ctx: RestoreContext) -> float:
        if ctx.fidelity is not None:
            return float(ctx.fidelity)
        return float(self.config.defaults.get("fidelity", 0.5))

    @torch.no_grad()
    def encode(self, faces: torch.Tensor, ctx: RestoreContext) -> Encoded:
        enc = self.net.encode(faces.to(device=self.device, dtype=self.dtype))
        # scores in float32 whatever the net's precision, for the token smoother
        return Encoded(scores=enc.logits.float(), state={"lq_feat": enc.lq_feat, "skips": enc.skips})

    @torch.no_grad()
    def decode(self, encoded: Encoded, tokens: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        state = encoded.state
        enc = CodeFormerEncoding(encoded.scores, state["lq_feat"], state["skips"])
        return self.net.decode(tokens.to(self.device), enc, w=self._fidelity(ctx), adain=True)
