"""The ``lite`` backend: frvideo's own small codebook restorer (CPU-friendly).

Trained by this project with ``frvideo train`` (configs/train/lite_*.yaml;
plugins/lite/RECIPE.md) and shipped as plugins/lite/weights/lite.pth, so the
tool restores faces on an offline machine with no downloads. Faces are taken at
``input_size`` (256). Scores are the token predictor's logits over the K-entry
codebook for the latent grid (B x N x K, N = (256 / compression)^2); decode
looks the chosen tokens up and runs the decoder, fusing the encoder features in
with the fidelity weight ``w`` (``ctx.fidelity``, else the card's
``defaults.fidelity``): 0 = the codebook prior alone, 1 = closest to the input.

``--precision int8`` runs the shipped weights' int8 ONNX Runtime graphs instead (int8.py; the
card's ``int8`` entry), split at the same token interface.
"""
import torch

from frvideo.errors import UsageError
from frvideo.restore import INT8, Encoded, RestoreContext, Restorer, int8_hint

from .arch import LiteEncoding, LiteNet

__all__ = ["LiteRestorer", "LiteNet"]


class LiteRestorer(Restorer):
    name = "lite"
    input_size = 256
    codebook_size = 512  # the shipped card's K (build_network checks the arch agrees)

    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        return LiteNet(**arch)

    int8 = None  # the LiteInt8 graphs under --precision int8

    @classmethod
    def from_checkpoint(cls, config, weights):
        restorer = super().from_checkpoint(config, weights)
        restorer.weights_path = weights
        k = restorer.net.codebook_size
        if k != cls.codebook_size:  # a custom card with another K: report the real one
            restorer.codebook_size = k
        return restorer

    def to(self, device, dtype: torch.dtype = torch.float32) -> "LiteRestorer":
        if dtype == INT8:
            self.int8 = self._load_int8()
            dtype = torch.float32  # the float network stays loaded for the rest of the interface
        # NHWC: oneDNN runs these convs several times faster than NCHW on CPU
        self.net.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        return self

    def _load_int8(self):
        from frvideo.weights import REPO_ROOT, sha256_file

        from .int8 import LiteInt8

        spec = self.config.int8
        if not spec:  # a custom card without graphs
            raise UsageError(f"--precision int8 is not available for this {self.name} card: {int8_hint()}")
        if sha256_file(self.weights_path) != spec["built_from"]:
            raise UsageError(f"lite's int8 graphs are built from the shipped lite.pth, not {self.weights_path}; "
                             "use --precision fp32, or build graphs for it (python -m plugins.lite.int8)")
        paths = {}
        for part in ("encoder", "decoder"):
            path = REPO_ROOT / spec[part]
            if not path.is_file() or sha256_file(path) != spec[f"{part}_sha256"]:
                raise UsageError(f"lite's int8 graph {path} is missing or altered (sha256 differs from the card); "
                                 "reinstall frvideo or use --precision fp32")
            paths[part] = path
        return LiteInt8(paths["encoder"], paths["decoder"], torch.get_num_threads(),
                        float(spec.get("fidelity", 1.0)))

    def _fidelity(self, ctx: RestoreContext) -> float:
        if ctx is not None and ctx.fidelity is not None:
            return float(ctx.fidelity)
        return float(self.config.defaults.get("fidelity", 1.0))

    @torch.no_grad()
    def encode(self, faces: torch.Tensor, ctx: RestoreContext) -> Encoded:
        if self.int8 is not None:
            enc = self.int8.encode(faces)
            return Encoded(scores=enc.logits, state={"lq_feat": enc.lq_feat, "skips": enc.skips, "image": enc.image})
        x = faces.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)
        enc = self.net.encode(x)
        return Encoded(scores=enc.logits.float(),
                       state={"lq_feat": enc.lq_feat, "skips": enc.skips, "image": enc.image})

    @torch.no_grad()
    def decode(self, encoded: Encoded, tokens: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        state = encoded.state
        enc = LiteEncoding(encoded.scores, state["lq_feat"], state["skips"], state.get("image"))
        if self.int8 is not None:
            return self.int8.decode(tokens, enc, w=self._fidelity(ctx)).clamp(-1, 1).contiguous()
        out = self.net.decode(tokens.to(self.device), enc, w=self._fidelity(ctx))
        return out.clamp(-1, 1).contiguous()
