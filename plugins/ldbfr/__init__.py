"""The ``ldbfr`` backend: LD-BFR, VQ restoration + latent diffusion enhancement.

Network: plugins/ldbfr/arch.py (DC-VQR, DQE, decoder); trained by this project
with ``frvideo train`` in the paper's three stages (``train_stages`` below;
configs/train/ldbfr_*.yaml; plugins/ldbfr/RECIPE.md) and shipped as
plugins/ldbfr/weights/ldbfr.pth. Faces are taken at ``input_size`` (256).

Token contract: ``encode`` returns the negative squared distances of the LQ
features f_LQ to the HQ codebook (B x N x K) - the nearest-code fetch of DC-VQR
- so the pipeline's token smoother picks f'_HQ; ``decode`` looks the chosen
codes up, runs DCAM, then DDIM (eta 0, ``ctx.steps`` or the card's
``defaults.steps``) and the decoder.

Noise: face b starts from z_T drawn from ``torch.Generator().manual_seed(
ctx.noise_seeds[b])`` - the pipeline gives one seed per track, so the same face
gets the same noise on every frame and a still face stays still. With
``noise_seeds`` None (``--fresh-noise``) every call draws fresh noise.
``defaults.steps: 0`` on a card (or ``ctx.steps == 0``) skips the diffusion:
the DC-VQR stage alone, f_HQ decoded directly.
"""
from __future__ import annotations

import torch

from frvideo.errors import ConfigError
from frvideo.restore import Encoded, RestoreContext, Restorer

from .arch import LDBFRNet

__all__ = ["LDBFRRestorer", "LDBFRNet"]


class LDBFRRestorer(Restorer):
    name = "ldbfr"
    input_size = 256
    codebook_size = 512
    # the shipped ldbfr-lite measures below lite (plugins/ldbfr/RECIPE.md) and is slower:
    # --model auto never picks it, --model ldbfr does
    auto_select = False
    stochastic = True
    train_stages = {
        "ldbfr-dcvqr": "plugins.ldbfr.train:DCVQRStage",
        "ldbfr-unet": "plugins.ldbfr.train:UNetStage",
        "ldbfr-hqi": "plugins.ldbfr.train:HQIStage",
    }

    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        return LDBFRNet(**arch)

    @classmethod
    def from_checkpoint(cls, config, weights):
        restorer = super().from_checkpoint(config, weights)
        restorer.codebook_size = restorer.net.codebook_size  # a custom card may use another K
        restorer.input_size = restorer.net.img_size
        return restorer

    def sampling_steps(self, ctx: RestoreContext | None) -> int:
        steps = getattr(ctx, "steps", None) if ctx is not None else None
        if steps is None:
            steps = self.config.defaults.get("steps", 4)
        steps = int(steps)
        if not 0 <= steps <= self.net.schedule.timesteps:
            raise ConfigError(f"--steps must be in [0, {self.net.schedule.timesteps}], not {steps}")
        return steps

    @staticmethod
    def generators(ctx: RestoreContext | None, batch: int):
        seeds = getattr(ctx, "noise_seeds", None) if ctx is not None else None
        if seeds is None:
            return None  # fresh noise
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} noise seeds for {batch} faces")
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    @torch.no_grad()
    def encode(self, faces: torch.Tensor, ctx: RestoreContext) -> Encoded:
        x = faces.to(device=self.device, dtype=self.dtype)
        f_lq, skips = self.net.encode_lq_skips(x)
        scores = self.net.quantize.scores(f_lq.float())
        return Encoded(scores=scores, state={"f_lq": f_lq, "skips": skips, "image": x})

    @torch.no_grad()
    def decode(self, encoded: Encoded, tokens: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        f_lq = encoded.state["f_lq"]
        _, fetched = self.net.fetch(f_lq, tokens.to(self.device))
        f_hq = self.net.dcam(f_lq, fetched)
        steps = self.sampling_steps(ctx)
        z = self.net.enhance(f_hq, steps, self.generators(ctx, f_hq.shape[0])) if steps > 0 else f_hq
        state = encoded.state
        return self.net.decode_latent(z, state.get("skips"), self._fidelity(ctx), state.get("image")) \
            .clamp(-1, 1).contiguous()

    def _fidelity(self, ctx: RestoreContext | None) -> float:
        """w of the fidelity path (``skip_fusion`` networks): ``--fidelity``, else the card's default."""
        if ctx is not None and ctx.fidelity is not None:
            return float(ctx.fidelity)
        return float(self.config.defaults.get("fidelity", 1.0))
