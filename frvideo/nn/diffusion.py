"""Latent diffusion building blocks: a conditional UNet and the DDIM sampler.

Used by LD-BFR (``plugins/ldbfr``; paper: ../shared/papers/ld-bfr.txt), written
for this project after the latent-diffusion (LDM) recipe:

* :class:`DiffusionSchedule` - the DDPM forward process; the default betas are
  LDM's "scaled linear" schedule (sqrt-betas linear from sqrt(0.00085) to
  sqrt(0.012), T = 1000 steps), ``q_sample`` draws z_t = sqrt(a_t) z_0 +
  sqrt(1 - a_t) eps (a_t = alphas_cumprod[t]).
* :func:`ddim_sample` - DDIM (Song et al. 2021) with an eps-predicting model.
  Two deliberate differences from LDM's ``DDIMSampler``: the S sampling steps
  are spaced "trailing" (t_i = round(T - i T / S) - 1, so S = 1 starts at
  t = 999, pure noise; LDM's uniform spacing + 1 would start one step at t = 1,
  an almost clean latent), and the last step goes to alpha = 1 (it returns the
  x0 prediction; LDM stops at alphas_cumprod[0]). ``eta`` = 0 is deterministic
  given z_T, which is what lets a video backend lock its noise per track.
* :class:`LatentUNet` - the eps model: an LDM-style UNet (time-conditioned
  ResBlocks, self-attention at chosen levels, skip connections per block) with
  optional condition injection per level: :class:`EncoderHQI` after each
  encoder level and :class:`DecoderHQI` after each decoder level (LD-BFR's
  E-HQI / D-HQI). The injection modules live in ``e_hqi`` / ``d_hqi`` so a
  trainer can freeze the base UNet (everything else) and train only them; their
  output projections start at zero, so an untrained injection leaves the base
  UNet's prediction unchanged.

All tensors are B x C x H x W; attention works on the H*W tokens.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vqgan import Normalize

__all__ = [
    "DiffusionSchedule", "ddim_timesteps", "ddim_sample", "randn_per_sample", "timestep_embedding",
    "sincos_2d", "TimestepResBlock", "SelfAttention2d", "EncoderHQI", "DecoderHQI", "LatentUNet",
]


# --------------------------------------------------------------------------- schedule + sampler

class DiffusionSchedule:
    """DDPM noise schedule; ``alphas_cumprod`` in float64 (cast where used)."""

    def __init__(self, timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 kind: str = "scaled_linear"):
        if kind == "scaled_linear":
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta schedule {kind!r} (scaled_linear, linear)")
        self.timesteps = timesteps
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """a_t for a batch of integer steps, shaped B x 1 x 1 x 1 like ``like``."""
        a = self.alphas_cumprod.to(like.device)[t.long()]
        return a.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        a = self.alpha(t, z0)
        return a.sqrt() * z0 + (1 - a).sqrt() * noise


def ddim_timesteps(total: int, steps: int) -> list[int]:
    """The ``steps`` DDPM steps DDIM visits, from the noisiest down ("trailing" spacing)."""
    if not 1 <= steps <= total:
        raise ValueError(f"DDIM steps must be in [1, {total}], not {steps}")
    return [int(round(total - i * total / steps)) - 1 for i in range(steps)]


def randn_per_sample(shape: Sequence[int], generators: Optional[Sequence[torch.Generator]],
                     device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of ``shape`` (B x ...), sample b drawn from ``generators[b]``
    (on the CPU, so a seed gives the same noise on every device); fresh (global RNG)
    when ``generators`` is None."""
    if generators is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    noise = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=device, dtype=dtype)


@torch.no_grad()
def ddim_sample(eps_model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], schedule: DiffusionSchedule,
                x_T: torch.Tensor, steps: int, eta: float = 0.0,
                generators: Optional[Sequence[torch.Generator]] = None,
                trajectory: Optional[list] = None) -> torch.Tensor:
    """Run DDIM from ``x_T`` (B x ...) for ``steps`` steps; returns the x0 estimate.

    ``eps_model(x_t, t)`` (t: B integer steps) predicts the noise. Per step, with
    a = a_t and a' = a of the next (less noisy) visited step (1 after the last):
    x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a);  sigma = eta sqrt((1 - a') / (1 - a)
    (1 - a / a')); x_prev = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps + sigma noise.
    ``trajectory``, when a list, receives x after every step (x_T first).
    """
    ts = ddim_timesteps(schedule.timesteps, steps)
    ac = schedule.alphas_cumprod
    x = x_T
    if trajectory is not None:
        trajectory.append(x.clone())
    for i, t in enumerate(ts):
        a = float(ac[t])
        a_prev = float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = eps_model(x, t_batch).to(x.dtype)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) if eta > 0 else 0.0
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(0.0, 1 - a_prev - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * randn_per_sample(x.shape, generators, x.device, x.dtype)
        if trajectory is not None:
            trajectory.append(x.clone())
    return x


# --------------------------------------------------------------------------- embeddings

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps (B) -> B x dim: [cos(t f_i), sin(t f_i)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def sincos_2d(h: int, w: int, dim: int, device=None, dtype=torch.float32, cell: Optional[float] = None) -> torch.Tensor:
    """(h*w) x dim 2-D sinusoidal position code of the cell centres. By default the
    grid is mapped to [0, 64]^2 whatever its size, so grids of different resolution
    over the same face agree (a 4x4 UNet level and the 16x16 condition); with
    ``cell`` a cell is ``cell`` units wide instead, so a crop's grid has the same
    spacing as the whole face's (for attention within one grid trained on crops).
    Half the channels code y, half x."""
    def axis(n: int, d: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float32, device=device) + 0.5
        pos = pos * cell if cell is not None else pos / n * 64.0
        half = max(1, d // 2)
        freqs = torch.exp(-math.log(64.0) * torch.arange(half, dtype=torch.float32, device=device) / half)
        args = pos[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)[:, :d]

    dy, dx = dim // 2, dim - dim // 2
    py = axis(h, dy)[:, None, :].expand(h, w, dy)
    px = axis(w, dx)[None, :, :].expand(h, w, dx)
    return torch.cat([py, px], dim=-1).reshape(h * w, dim).to(dtype)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # B x C x H x W -> B x N x C


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention of B x N x C queries over B x M x C keys."""
    b, n, c = q.shape
    m = k.shape[1]
    q = q.view(b, n, heads, c // heads).transpose(1, 2)
    k = k.view(b, m, heads, c // heads).transpose(1, 2)
    v = v.reshape(b, m, heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, n, -1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# --------------------------------------------------------------------------- UNet blocks

class TimestepResBlock(nn.Module):
    """GroupNorm-SiLU-conv; GroupNorm then scale/shift from the time embedding
    (``norm2(h) * (1 + scale) + shift``, LDM's ``use_scale_shift_norm``); SiLU-conv
    (zero-init); a 1x1 skip when the width changes. Why scale-shift: with the plain
    "h + emb" the following GroupNorm removes most of the time signal at these
    narrow widths (2 channels per group at 64 channels) - the first UNet trained
    here learnt an eps almost independent of t."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_channels, 2 * out_channels)
        self.norm2 = Normalize(out_channels)
        self.conv2 = _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over H*W tokens with a residual (out proj zero-init)."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = _tokens(self.qkv(self.norm(x))).chunk(3, dim=-1)
        out = _attend(q, k, v, self.heads).transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class EncoderHQI(nn.Module):
    """E-HQI: f_o = f_i + SA(Conv(Concat(f_i, PixelUnshuffle(f_HQ)))).

    The condition (B x cond_channels x R x R) is pixel-unshuffled by ``factor`` to
    this level's resolution R / factor, concatenated with the UNet feature, fused
    by a 3x3 conv, and self-attention over the merged tokens (position-coded)
    decides where its texture goes. The attention's output projection starts at
    zero: an untrained E-HQI is the identity."""

    def __init__(self, channels: int, cond_channels: int, factor: int, heads: int = 4):
        super().__init__()
        self.factor = factor
        self.heads = heads
        self.fuse = nn.Conv2d(channels + cond_channels * factor * factor, channels, 3, padding=1)
        self.norm = Normalize(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, f: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        c_level = F.pixel_unshuffle(cond, self.factor) if self.factor > 1 else cond
        y = self.fuse(torch.cat([f, c_level.to(f.dtype)], dim=1))
        b, c, h, w = y.shape
        q, k, v = _tokens(self.qkv(self.norm(y))).chunk(3, dim=-1)
        pos = sincos_2d(h, w, c, y.device, y.dtype)
        # position enters q and k only (where to look), not v (what is carried)
        out = _attend(q + pos, k + pos, v, self.heads).transpose(1, 2).reshape(b, c, h, w)
        return f + self.proj_out(out)


class DecoderHQI(nn.Module):
    """D-HQI: f_o = f_i + CA(AdaLN(f_i, MLP(f_HQ)), f_HQ).

    AdaLN: channel LayerNorm of each token of f_i, then (1 + scale) x + shift with
    scale/shift per token from a token-wise MLP of the condition pixel-unshuffled
    to this level's resolution (last layer zero-init: starts as plain LayerNorm).
    Cross-attention: queries from that, keys/values from the full-resolution
    condition tokens (both position-coded for q/k). Output projection zero-init."""

    def __init__(self, channels: int, cond_channels: int, factor: int, heads: int = 4, hidden: Optional[int] = None):
        super().__init__()
        self.factor = factor
        self.heads = heads
        hidden = hidden or channels
        self.mlp = nn.Sequential(nn.Conv2d(cond_channels * factor * factor, hidden, 1), nn.SiLU(),
                                 _zero(nn.Conv2d(hidden, 2 * channels, 1)))
        self.norm_cond = Normalize(cond_channels, groups=min(32, cond_channels))
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(cond_channels, channels)
        self.v = nn.Linear(cond_channels, channels)
        self.proj_out = _zero(nn.Linear(channels, channels))

    def forward(self, f: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c, h, w = f.shape
        cond = cond.to(f.dtype)
        c_level = F.pixel_unshuffle(cond, self.factor) if self.factor > 1 else cond
        scale, shift = _tokens(self.mlp(c_level)).chunk(2, dim=-1)  # B x hw x C each
        x = F.layer_norm(_tokens(f), (c,))
        x = x * (1 + scale) + shift
        kv = _tokens(self.norm_cond(cond))
        ch, cw = cond.shape[-2:]
        q = self.q(x + sincos_2d(h, w, c, f.device, f.dtype))
        k = self.k(kv) + sincos_2d(ch, cw, c, f.device, f.dtype)
        out = self.proj_out(_attend(q, k, self.v(kv), self.heads))
        return f + out.transpose(1, 2).reshape(b, c, h, w)


class LatentUNet(nn.Module):
    """eps model of a latent diffusion: B x in_channels x R x R (+ step t) -> eps.

    Levels ``i = 0..L-1`` at resolution R / 2^i with ``model_channels *
    channel_mult[i]`` channels and ``res_blocks`` TimestepResBlocks each (+
    SelfAttention2d at the levels in ``attn_levels``); middle: ResBlock, attention,
    ResBlock; decoder levels take ``res_blocks + 1`` blocks each over the skip
    concatenation (LDM's layout). With ``cond_channels`` the network gets an
    E-HQI after every encoder level and a D-HQI after every decoder level; the
    condition must be at resolution R (it is pixel-unshuffled per level).
    """

    def __init__(self, in_channels: int = 64, model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2),
                 res_blocks: int = 2, attn_levels: Sequence[int] = (1, 2), heads: int = 4,
                 cond_channels: Optional[int] = None, hqi_heads: int = 4):
        super().__init__()
        self.model_channels = model_channels
        self.levels = len(channel_mult)
        self.res_blocks = res_blocks
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        attn_levels = set(attn_levels)

        self.down = nn.ModuleList()  # per level: ModuleList of blocks (ResBlock [+ attention])
        self.downsample = nn.ModuleList()
        skip_channels = [model_channels]
        ch = model_channels
        self.level_channels = []
        for i, mult in enumerate(channel_mult):
            blocks = nn.ModuleList()
            for _ in range(res_blocks):
                blocks.append(nn.ModuleList([TimestepResBlock(ch, model_channels * mult, emb)] +
                                            ([SelfAttention2d(model_channels * mult, heads)] if i in attn_levels else [])))
                ch = model_channels * mult
                skip_channels.append(ch)
            self.down.append(blocks)
            self.level_channels.append(ch)
            if i != len(channel_mult) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
        self.mid = nn.ModuleList([TimestepResBlock(ch, ch, emb), SelfAttention2d(ch, heads), TimestepResBlock(ch, ch, emb)])

        self.up = nn.ModuleList()  # coarsest level first
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(res_blocks + 1):
                out = model_channels * channel_mult[i]
                blocks.append(nn.ModuleList([TimestepResBlock(ch + skip_channels.pop(), out, emb)] +
                                            ([SelfAttention2d(out, heads)] if i in attn_levels else [])))
                ch = out
            self.up.append(blocks)
            if i != 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.norm_out = Normalize(ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

        self.cond_channels = cond_channels
        if cond_channels:
            self.e_hqi = nn.ModuleList([EncoderHQI(c, cond_channels, 2 ** i, hqi_heads)
                                        for i, c in enumerate(self.level_channels)])
            self.d_hqi = nn.ModuleList([DecoderHQI(c, cond_channels, 2 ** i, hqi_heads)
                                        for i, c in reversed(list(enumerate(self.level_channels)))])
        else:
            self.e_hqi = self.d_hqi = None

    def hqi_parameters(self):
        """The condition-injection parameters (trained while the base UNet is frozen)."""
        mods = [m for m in (self.e_hqi, self.d_hqi) if m is not None]
        return [p for m in mods for p in m.parameters()]

    def base_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(("e_hqi.", "d_hqi."))]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                taps: Optional[dict] = None) -> torch.Tensor:
        """``cond`` None: the unconditional base UNet (injections skipped). ``taps``, when
        a dict, receives the features after every injection point, keyed
        ``('enc'|'dec', level)`` (for tests and inspection)."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(x.dtype))
        inject = cond is not None and self.e_hqi is not None
        # NCHW-contiguous: channels-last inputs (e.g. from an HWC image batch) crashed the
        # CPU backward of this graph (segfault, torch 2.13); the copy is tiny at latent size
        x = x.contiguous()
        cond = cond.contiguous() if inject else None
        h = self.conv_in(x)
        hs = [h]
        for i, blocks in enumerate(self.down):
            for j, block in enumerate(blocks):
                h = block[0](h, emb)
                for extra in block[1:]:
                    h = extra(h)
                if j == len(blocks) - 1 and inject:
                    h = self.e_hqi[i](h, cond)  # E-HQI at the end of the level (its skip carries it too)
                if j == len(blocks) - 1 and taps is not None:
                    taps[("enc", i)] = h
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for k, blocks in enumerate(self.up):
            level = self.levels - 1 - k
            for block in blocks:
                h = block[0](torch.cat([h, hs.pop()], dim=1), emb)
                for extra in block[1:]:
                    h = extra(h)
            if inject:
                h = self.d_hqi[k](h, cond)
            if taps is not None:
                taps[("dec", level)] = h
            if k < len(self.upsample):
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
