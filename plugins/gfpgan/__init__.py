"""The ``gfpgan`` backend: GFPGAN v1.4 (GFPGANv1Clean), a U-Net + StyleGAN2 prior.

No codebook, so only ``restore`` is implemented (the pipeline skips token
smoothing). Input and output: B x 3 x 512 x 512 RGB in [-1, 1]; the network's
output is returned unclamped (the pipeline clamps).
"""
import torch

from frvideo.errors import ConfigError
from frvideo.restore import RestoreContext, Restorer

from .arch import GFPGANv1Clean

__all__ = ["GFPGANRestorer", "GFPGANv1Clean"]


class GFPGANRestorer(Restorer):
    name = "gfpgan"
    input_size = 512
    codebook_size = None

    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        arch = dict(arch)
        if arch.get("decoder_load_path") is not None:
            raise ConfigError("gfpgan: arch.decoder_load_path must be null (the decoder comes with the weights)")
        try:
            return GFPGANv1Clean(**arch)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"gfpgan: bad arch arguments ({exc})") from None

    @torch.no_grad()
    def restore(self, faces: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        x = faces.to(device=self.device, dtype=self.dtype)
        # The official inference draws fresh decoder noise on every call
        # (randomize_noise=True). For video that is per-frame flicker in fine
        # texture (hair, skin), so we always use the fixed noise buffers stored
        # with the weights: the same face gives the same output in every frame.
        image, _ = self.net(x, return_rgb=False, randomize_noise=False)
        return image
