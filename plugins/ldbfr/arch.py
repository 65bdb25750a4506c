"""LD-BFR network (../shared/papers/ld-bfr.txt): DC-VQR + DQE + VQ decoder.

    x_LQ -> E_LQ -> f_LQ --nearest code in L_HQ--> f'_HQ                (DC-VQR)
            DCAM(f_LQ, f'_HQ) = f_SCA + f_CCA = f_HQ
    z_T ~ N(0, I) --DDIM, eps-UNet with E-HQI / D-HQI conditioned on f_HQ--> z_0  (DQE)
    z_0 -> decoder -> image

First stage. The paper uses two VQ autoencoders (a compression-16 one whose
codebook L_HQ and encoder E'_HQ serve DC-VQR, and LDM's VQGAN whose latent the
diffusion runs in and whose decoder renders the result). Here one autoencoder
plays both parts: frvideo's own ``lite`` VQ autoencoder (stage 1 of
plugins/lite: pixel-unshuffle x4 + 2 downsamples = compression 16, a
16 x 16 x 64 latent at 256 px, K = 512 codes). So f_HQ, the condition, lives in
the very space the diffusion denoises (it is trained to match E_HQ(x_HQ), the
diffusion's clean latent), and the diffusion is cheap on a CPU (16 x 16 x 64).
Why not an LDM VQModel layout: there is no LDM first stage trained on faces
offline here, and the lite autoencoder is trained on this project's data; the
encoder/decoder classes are plugins/lite's, so its checkpoints' keys
(``encoder.*``/``decoder.*``) map 1:1 onto ``hq_encoder.*``/``decoder.*``.

Modules (checkpoint keys): ``lq_encoder`` (E_LQ), ``hq_encoder`` (E_HQ, only for
training targets), ``quantize`` (L_HQ), ``dcam``, ``unet`` (base +
``unet.e_hqi``/``unet.d_hqi``), ``decoder``, and the buffers ``latent_mean`` /
``latent_std`` (per-channel statistics of E_HQ latents: the diffusion runs on
(z - mean) / std, LDM's ``scale_factor`` made per channel) and ``cond_var`` (the
spread of z_0 around f_HQ, for the conditional Gaussian skip of ``predict_eps``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from frvideo.nn.diffusion import DiffusionSchedule, LatentUNet, _attend, _tokens, ddim_sample, randn_per_sample, \
    sincos_2d
from frvideo.nn.quantizer import VectorQuantizer
from frvideo.nn.vqgan import LightCFT, Normalize, UnshuffleDecoder, UnshuffleEncoder, decode_fused

__all__ = ["DualCrossAttention", "LDBFRNet"]


class DualCrossAttention(nn.Module):
    """DCAM: f_HQ = f_SCA + f_CCA.

    * spatial cross-attention: Q = W_Q f_LQ, K = W_K f'_HQ, V = W_V f'_HQ over the
      h*w tokens (multi-head, 2-D position code on q and k so a token can prefer
      its own neighbourhood; absolute token spacing, so training on crops transfers
      to whole faces); f_SCA = softmax(Q K^T / sqrt(d)) V.
    * channel cross-attention: the channel matrix M_C (C x C per head group) is
      computed from f_LQ alone - softmax of the cosine similarity of its channels
      (two 1x1 projections, L2-normalised over the tokens, learnt temperature as
      in Restormer's transposed attention) - and applied to the codes:
      f_CCA = M_C x (W_V' f'_HQ). It carries the LQ input's colour/identity
      statistics into the fetched codes (the paper's fix for colour shift).
    """

    def __init__(self, dim: int, heads: int = 4, channel_heads: int = 4):
        super().__init__()
        self.heads, self.channel_heads = heads, channel_heads
        self.norm_lq = Normalize(dim, groups=min(32, dim))
        self.norm_hq = Normalize(dim, groups=min(32, dim))
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj_sca = nn.Linear(dim, dim)
        self.cq = nn.Linear(dim, dim)
        self.ck = nn.Linear(dim, dim)
        self.cv = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.ones(channel_heads, 1, 1))
        self.proj_cca = nn.Linear(dim, dim)

    def forward(self, f_lq: torch.Tensor, f_hq_fetched: torch.Tensor) -> torch.Tensor:
        b, c, h, w = f_lq.shape
        a = _tokens(self.norm_lq(f_lq))  # B x N x C
        m = _tokens(self.norm_hq(f_hq_fetched))
        # cell 4: a 16 x 16 grid spans [0, 64] like the UNet's codes, and a training crop's
        # smaller grid keeps the same token spacing
        pos = sincos_2d(h, w, c, f_lq.device, f_lq.dtype, cell=4.0)
        sca = self.proj_sca(_attend(self.q(a + pos), self.k(m + pos), self.v(m), self.heads))
        # channel matrix from f_LQ: per head group, (C/g x N) (N x C/g) cosine similarities
        g = self.channel_heads
        qc = F.normalize(self.cq(a).transpose(1, 2).reshape(b, g, c // g, -1), dim=-1)
        kc = F.normalize(self.ck(a).transpose(1, 2).reshape(b, g, c // g, -1), dim=-1)
        m_c = torch.softmax(qc @ kc.transpose(-2, -1) * self.temperature, dim=-1)  # B x g x C/g x C/g
        vc = self.cv(m).transpose(1, 2).reshape(b, g, c // g, -1)
        cca = self.proj_cca((m_c @ vc).reshape(b, c, -1).transpose(1, 2))
        return (sca + cca).transpose(1, 2).reshape(b, c, h, w)


class LDBFRNet(nn.Module):
    def __init__(self, img_size: int = 256, nf: int = 32, ch_mult: Sequence[int] = (2, 2, 4), res_blocks: int = 2,
                 emb_dim: int = 64, codebook_size: int = 512, shuffle: int = 4, dcam_heads: int = 4,
                 unet_channels: int = 64, unet_mult: Sequence[int] = (1, 2, 2), unet_res_blocks: int = 2,
                 unet_attn_levels: Sequence[int] = (1, 2), unet_heads: int = 4, hqi_heads: int = 4,
                 timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", gaussian_skip: bool = True, skip_fusion: bool = False):
        super().__init__()
        self.img_size = img_size
        self.compression = shuffle * 2 ** (len(ch_mult) - 1)
        self.codebook_size = codebook_size
        self.emb_dim = emb_dim
        self.lq_encoder = UnshuffleEncoder(nf, ch_mult, res_blocks, emb_dim, shuffle)
        self.hq_encoder = UnshuffleEncoder(nf, ch_mult, res_blocks, emb_dim, shuffle)
        self.quantize = VectorQuantizer(codebook_size, emb_dim)
        self.dcam = DualCrossAttention(emb_dim, dcam_heads, dcam_heads)
        self.unet = LatentUNet(emb_dim, unet_channels, unet_mult, unet_res_blocks, unet_attn_levels, unet_heads,
                               cond_channels=emb_dim, hqi_heads=hqi_heads)
        self.decoder = UnshuffleDecoder(nf, ch_mult, res_blocks, emb_dim, shuffle)
        # the fidelity path (``skip_fusion``): the LQ encoder's features fused into the decoder at
        # every level (lite's CFT blocks), so the input's detail need not squeeze through the
        # 16 x 16 latent; f_HQ / the diffusion latent then carry the prior
        self.skip_fusion = skip_fusion
        self.fuse = nn.ModuleList([LightCFT(c) for c in self.decoder.level_channels]) if skip_fusion else None
        self.register_buffer("latent_mean", torch.zeros(1, emb_dim, 1, 1))
        self.register_buffer("latent_std", torch.ones(1, emb_dim, 1, 1))
        # per-channel variance of (normalised) z_0 around the normalised f_HQ, measured by the
        # HQI stage: the width of the Gaussian around the condition in ``predict_eps``
        self.register_buffer("cond_var", torch.ones(1, emb_dim, 1, 1))
        self.schedule = DiffusionSchedule(timesteps, beta_start, beta_end, beta_schedule)
        self.gaussian_skip = gaussian_skip

    # -- DC-VQR ------------------------------------------------------------------------
    def encode_lq(self, x: torch.Tensor) -> torch.Tensor:
        """x_LQ (B x 3 x S x S, [-1, 1]) -> f_LQ (B x D x S/16 x S/16)."""
        return self.encode_lq_skips(x)[0]

    def encode_lq_skips(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(f_LQ, the LQ encoder's features per level, finest first) - the fidelity path's input."""
        f_lq, skips = self.lq_encoder(x.contiguous())
        return f_lq.contiguous(), skips

    def encode_hq(self, x: torch.Tensor) -> torch.Tensor:
        """Clean image -> E_HQ latent (the diffusion's z_0 before normalisation, and f_HQ's target)."""
        return self.hq_encoder(x.contiguous())[0].contiguous()

    def fetch(self, f_lq: torch.Tensor, tokens: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores B x N x K = negative squared distances to L_HQ, f'_HQ = the chosen codes;
        nearest ones unless ``tokens`` are given)."""
        scores = self.quantize.scores(f_lq.float())
        if tokens is None:
            tokens = scores.argmax(-1)
        return scores, self.quantize.lookup(tokens, tuple(f_lq.shape[-2:])).to(f_lq.dtype)

    def dcvqr(self, x_lq: torch.Tensor) -> torch.Tensor:
        """f_HQ for an LQ image (nearest-code fetch)."""
        f_lq = self.encode_lq(x_lq)
        return self.dcam(f_lq, self.fetch(f_lq)[1])

    # -- DQE ----------------------------------------------------------------------------
    def normalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.latent_std + self.latent_mean

    def predict_eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """eps_theta(z_t, t[, cond]) on normalised latents (``cond`` = normalised f_HQ).

        With ``gaussian_skip`` the UNet predicts a correction to the exact eps of a Gaussian
        model of the data - the same eps objective (paper Eq. 5/6), preconditioned like
        EDM's c_skip:

        * unconditional: z_0 ~ N(0, I) (the latents are normalised per channel), so
          skip = sqrt(1 - a) z_t. Why: a plain UNet must first learn to pass z_t through at
          high noise, which took it well over the ~1500 CPU steps we can afford (eps MSE at
          t = 950 stayed at 0.22; 0.0075 with the skip).
        * with the condition: z_0 ~ N(f_HQ, cond_var), skip = sqrt(1 - a) (z_t - sqrt(a)
          f_HQ) / (a cond_var + 1 - a) - the analytic Gaussian-likelihood term that
          classifier guidance would add, in closed form. Why: with eps prediction the x0
          estimate at t = 999 is (z_t - sqrt(1 - a) eps) / sqrt(a) with sqrt(a) = 0.07, so
          eps errors are amplified 14x; the zero-initialised HQI modules alone reached
          16.4 dB after 250 steps (vs 22.4 dB for f_HQ decoded directly) - the samples were
          other faces. The frozen base UNet's correction and the HQI modules are added on
          top of this skip."""
        eps = self.unet(z_t, t, cond)
        if self.gaussian_skip:
            a = self.schedule.alpha(t, z_t)
            if cond is None:
                eps = eps + (1 - a).sqrt() * z_t
            else:
                var = self.cond_var.to(z_t.dtype)
                eps = eps + (1 - a).sqrt() * (z_t - a.sqrt() * cond.to(z_t.dtype)) / (a * var + 1 - a)
        return eps

    @torch.no_grad()
    def enhance(self, f_hq: torch.Tensor, steps: int, generators: Optional[list] = None,
                eta: float = 0.0) -> torch.Tensor:
        """DQE: DDIM from z_T (per-face generators, or fresh noise when None) conditioned
        on f_HQ; returns the raw latent z_0."""
        cond = self.normalize_latent(f_hq)
        x_T = randn_per_sample(f_hq.shape, generators, f_hq.device, f_hq.dtype)
        z0 = ddim_sample(lambda z, t: self.predict_eps(z, t, cond), self.schedule, x_T, steps, eta, generators)
        return self.denormalize_latent(z0)

    # -- decoder ----------------------------------------------------------------------------
    def decode_latent(self, z: torch.Tensor, skips=None, w=0.0, image=None) -> torch.Tensor:
        """Render a latent; with ``skip_fusion`` and ``skips`` the LQ features are fused in at
        fidelity ``w`` (and the output gate moves toward ``image``)."""
        if self.fuse is None:
            return self.decoder(z)
        return decode_fused(self.decoder, self.fuse, z, skips, w, image)

    def forward(self, x: torch.Tensor, steps: int = 4) -> torch.Tensor:
        return self.decode_latent(self.enhance(self.dcvqr(x), steps))
