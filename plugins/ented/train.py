"""Training stage ``ented`` (``frvideo train CFG`` with ``stage: ented``; the
toolkit finds it through ``EntedRestorer.train_stages``).

One stage, end to end, as the paper trains (section 3.4, 4.1), on triples
(clean crop, degraded crop, reference): the reference is **another face of the
same person**: another photo of the index's ``identity`` (faces_v2), or another
frame of the same track (at least ``plugin.ref_min_gap`` source frames away when
the track has one: real pose and expression change, not a copy of the target).
People with a single crop are not used: they have no reference.

Losses (Eq. 12): ``loss.l1`` L1 + the weight-free perceptual substitute
(``loss.ms_ssim`` MS-SSIM, ``loss.lap_l1`` Laplacian-pyramid L1; no VGG weights
exist offline; ``loss.perceptual`` with ``vgg_weights`` is the paper's VGG-19
loss of Eq. 10) + quantization (Eq. 4: ``loss.codebook`` and
``loss.commitment`` = beta 0.25) + attention reconstruction (Eq. 11, weight
``plugin.attention``: at every decoder level the reference, downsampled to that
level, warped by (C~_e)^T C~_d must match the downsampled target; L1) +
non-saturating adversarial (Eq. 9, ``loss.adversarial`` with
``loss.gan_type: nsgan``, PatchGAN discriminator; 0 disables it).

Dictionary: ``plugin.codebook_init`` names a VQFR checkpoint to initialise it
from (the paper's choice; then no warm-up is needed); otherwise the first
``train.vq_warmup`` steps decode the unquantized latent and the dictionary is
then k-means initialised from recent encoder outputs. Afterwards it is
re-estimated by k-means every ``plugin.kmeans_every`` steps (Lloyd iterations
started from the current codes, so codes move, not jump) and codes unused for
``train.dead_code_window`` steps are re-seeded every ``train.dead_code_every``.

Eval (EMA weights, ``data.eval_count`` crops of ``data.eval_root``, degraded with
``degradation.eval_seed``): PSNR/SSIM of the input, of the output with the
sharpest other crop of the same track as reference, and with a reference of
another track (``psnr_other``): the gap says how much the reference is used.

Run directory and resume as ``frvideo.train.trainer.Trainer`` (``last.pth`` with
``params_ema`` for ``--export``; randomness of step s from (seed, s)).
"""
from __future__ import annotations

import copy
import random
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from frvideo.errors import ConfigError, InputError
from frvideo.models import load_model_config
from frvideo.train import losses as L
from frvideo.train.trainer import (start_run, degrade_eval, degrade_sample, ema_update, eval_indices, kmeans, lr_at, open_data,
                                   open_run_dir, reinit_dead_codes, remember_codes, restore_run_state,
                                   restore_vq_gan_state, run_loop, run_state, save_run, to_tensor, to_uint8,
                                   vq_gan_state)

from . import EntedRestorer, load_vqfr_codebook
from .arch import DecodeAux, channels_last_convs

PLUGIN_DEFAULTS: dict[str, Any] = {
    "attention": 2.0,  # lambda_att (Eq. 11)
    "ref_min_gap": 6,  # source frames between target and reference, when the track allows
    "kmeans_every": 1000,  # dictionary re-estimation period (paper: 2000 of 400 k steps)
    "kmeans_iters": 3,
    "codebook_init": None,  # a VQFR checkpoint whose dictionary initialises ours
}


def plugin_config(cfg: dict) -> dict:
    extra = set(cfg.get("plugin") or {}) - set(PLUGIN_DEFAULTS)
    if extra:
        raise ConfigError(f"plugin: unknown key(s) {', '.join(sorted(extra))} for stage ented "
                          f"(known: {', '.join(PLUGIN_DEFAULTS)})")
    return {**PLUGIN_DEFAULTS, **(cfg.get("plugin") or {})}


def attention_reconstruction_loss(ref: torch.Tensor, gt: torch.Tensor, extract_attn: list[torch.Tensor],
                                  distribute_attn: list[torch.Tensor], level_sizes: list[int]) -> torch.Tensor:
    """Eq. 11: sum over levels of || I_gt(l) - I_ref(l) (C~_e)^T C~_d ||_1 (mean per pixel),
    I(l) bilinearly downsampled to the level's resolution."""
    total = gt.new_zeros(())
    for c_e, c_d, s in zip(extract_attn, distribute_attn, level_sizes):
        r = F.interpolate(ref.float(), size=(s, s), mode="bilinear", align_corners=False).flatten(2)  # B x 3 x hw
        g = F.interpolate(gt.float(), size=(s, s), mode="bilinear", align_corners=False).flatten(2)
        warped = torch.bmm(torch.bmm(r, c_e.float().transpose(1, 2)), c_d.float())  # B x 3 x hw
        total = total + (g - warped).abs().mean()
    return total


def kmeans_refine(codes: torch.Tensor, data: torch.Tensor, iters: int) -> torch.Tensor:
    """Lloyd iterations of ``data`` (N x D) started from ``codes`` (K x D); empty clusters keep their code."""
    centers = codes.detach().float().clone()
    x = data.float()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=centers.shape[0]).unsqueeze(1).float()
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
    return centers


class _Tracks:
    """Track structure of an image set: for each crop, the crops usable as its reference."""

    def __init__(self, images, min_gap: int):
        ds = getattr(images, "dataset", None)
        n = len(images)
        self.refs: list[list[int]] = []
        if ds is None:  # a folder of images / synthetic faces: every image its own track (reference = itself)
            self.refs = [[i] for i in range(n)]
            self.track_of = list(range(n))
            return
        # one person = one group: the index's ``identity`` when it has one (faces_v2: several
        # photos of an LFW name, one clip's frames), else the track (a clip's face)
        groups: dict[str, list[int]] = {}
        for i in range(n):
            e = ds.entry(i)
            groups.setdefault(str(e.get("identity") or e["track"]), []).append(i)
        self.track_of = [0] * n
        self.refs = [[] for _ in range(n)]
        for t, (name, idx) in enumerate(sorted(groups.items())):
            where = {i: (ds.entry(i)["source"], int(ds.entry(i).get("frame", 0))) for i in idx}
            for i in idx:
                self.track_of[i] = t
                # another photo, or a frame of the same clip at least min_gap frames away
                far = [j for j in idx if where[j][0] != where[i][0] or abs(where[j][1] - where[i][1]) >= min_gap]
                self.refs[i] = far or [j for j in idx if j != i]
        self.sharpness = [float(ds.entry(i).get("sharpness", 0.0)) for i in range(n)]

    def usable(self) -> list[int]:
        return [i for i, r in enumerate(self.refs) if r]


class EntedTrainer:
    """``EntedTrainer(cfg, output).run()``; resumes from ``output/last.pth``."""

    def __init__(self, cfg: dict, output: Optional[str | Path] = None, fresh: bool = False, quiet: bool = False):
        self.cfg, self.quiet = cfg, quiet
        self.plugin = plugin_config(cfg)
        t, lc, d = cfg["train"], cfg["loss"], cfg["data"]
        if d["crop"] not in (None, d["size"]):
            raise ConfigError("stage ented trains on whole faces (the attention looks across the face): "
                              "set data.crop: null")
        self.stage = cfg["stage"]
        start_run(self, cfg, output)
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

        arch = {}
        if cfg["model"]["card"]:
            arch = dict(load_model_config(cfg["model"]["card"]).arch)
        arch.update(cfg["model"]["arch"] or {})
        arch["img_size"] = d["size"]
        self.arch = arch
        try:
            self.net = EntedRestorer.build_network(arch)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model arch does not fit backend 'ented': {exc}") from None
        self.backend = "ented"
        self.vq_ready = int(t["vq_warmup"]) == 0
        if self.plugin["codebook_init"]:
            key = load_vqfr_codebook(self.net, self.plugin["codebook_init"])
            self.vq_ready = True
            if not quiet:
                print(f"dictionary initialised from {self.plugin['codebook_init']} ({key})", file=sys.stderr)
        channels_last_convs(self.net.to(self.device))
        self.params = list(self.net.parameters())
        self.opt = torch.optim.Adam(self.params, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.perc_sub = L.PerceptualSubstitute(lc["ms_ssim"], lc["lap_l1"])
        self.vgg = L.VGGPerceptualLoss(cfg["vgg_weights"], lc["vgg_arch"]).to(self.device) if lc["perceptual"] else None
        self.disc = self.opt_d = None
        if lc["adversarial"]:
            self.disc = channels_last_convs(L.PatchDiscriminator(3, lc["disc_ndf"], lc["disc_layers"]).to(self.device))
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=t["disc_lr"] or t["lr"], betas=(0.5, 0.99))
        K, D = self.net.quantize.codebook_size, self.net.quantize.emb_dim
        self.last_used = torch.zeros(K, dtype=torch.long)
        self.buffer = torch.zeros(0, D)
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        s = self.net.img_size // self.net.compression
        self.level_sizes = [s * 2**i for i in range(len(self.net.decoder.conv_a))]

        self.train_images, self.eval_images = open_data(cfg)
        self.train_tracks = _Tracks(self.train_images, int(self.plugin["ref_min_gap"]))
        self.usable = self.train_tracks.usable()
        if not self.usable:
            raise InputError("no training crop has a reference (every track has a single crop)")
        self._prepare_eval()
        open_run_dir(self, fresh)
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    # -- eval set -------------------------------------------------------------------
    def _prepare_eval(self) -> None:
        n = len(self.eval_images)
        self.eval_idx = eval_indices(n, self.cfg["data"]["eval_count"])
        tracks = _Tracks(self.eval_images, 0)
        sharp = getattr(tracks, "sharpness", [0.0] * n)

        def best_ref(i: int, same: bool) -> int:
            if same:
                pool = [j for j in tracks.refs[i] if j != i] or [i]
            else:
                pool = [j for j in range(n) if tracks.track_of[j] != tracks.track_of[i]] or [i]
            return max(pool, key=lambda j: sharp[j])

        self.eval_hq = [self.eval_images[i] for i in self.eval_idx]
        self.eval_ref = [self.eval_images[best_ref(i, True)] for i in self.eval_idx]
        self.eval_other = [self.eval_images[best_ref(i, False)] for i in self.eval_idx]
        self.eval_lq = degrade_eval(self.cfg, self.eval_hq)

    # -- checkpoints ------------------------------------------------------------------
    def state(self) -> dict:
        return {**run_state(self), **vq_gan_state(self)}

    def save(self) -> Path:
        return save_run(self)

    def _resume(self, path: Path) -> None:
        restore_vq_gan_state(self, restore_run_state(self, path))

    # -- one step ---------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg["train"], step)

    def _batch(self, rng: np.random.Generator):
        b = self.cfg["train"]["batch"]
        hq, lq, ref = [], [], []
        for i in rng.choice(self.usable, b):
            img = self.train_images[int(i)]
            r = self.train_images[int(rng.choice(self.train_tracks.refs[int(i)]))]
            low = degrade_sample(self.cfg["degradation"], img, rng)
            if self.cfg["data"]["flip"] and rng.random() < 0.5:  # the whole triple: the pose relation stays
                img, low, r = img[:, ::-1], low[:, ::-1], r[:, ::-1]
            hq.append(np.ascontiguousarray(img))
            lq.append(np.ascontiguousarray(low))
            ref.append(np.ascontiguousarray(r))
        cl = torch.channels_last
        return tuple(to_tensor(x, self.device).contiguous(memory_format=cl) for x in (hq, lq, ref))

    def train_step(self) -> dict:
        t, lc, pc = self.cfg["train"], self.cfg["loss"], self.plugin
        rng = np.random.default_rng([self.seed, self.step])
        hq, lq, ref = self._batch(rng)
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        net = self.net.train()
        logs: dict[str, Any] = {}
        quant = net.quantize
        if not self.vq_ready and self.step >= t["vq_warmup"] and self.buffer.shape[0]:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            with torch.no_grad():  # end of the VQ warm-up: the dictionary starts as k-means of recent latents
                centers = kmeans(self.buffer, quant.codebook_size, 10, gen)
                quant.embedding.weight.copy_(centers.to(quant.embedding.weight))
            self.last_used[:] = self.step
            self.vq_ready = True
        enc = net.encode(lq)
        z = enc.z
        total = z.new_zeros(())
        if self.vq_ready:
            idx = quant.scores(z.float()).argmax(-1)
            zq = quant.lookup(idx, tuple(z.shape[-2:]))
            logs["codebook"] = lc["codebook"] * L.codebook_loss(z.float(), zq)  # Eq. 4, first term
            logs["commit"] = lc["commitment"] * L.commitment_loss(z.float(), zq)  # Eq. 4, beta term
            total = total + logs["codebook"] + logs["commit"]
            used = torch.unique(idx).cpu()
            self.last_used[used] = self.step
            logs["codes_used"] = float(used.numel())
            z_dec = z + (zq.to(z.dtype) - z).detach()  # straight-through
        else:
            z_dec = z
        self.buffer = remember_codes(self.buffer, z, rng, int(t["code_buffer"]))
        aux = DecodeAux()
        ref_feats = net.reference(ref)
        out = net.decode_latent(z_dec, enc.feats, ref_feats, aux)
        if lc["l1"]:
            logs["l1"] = lc["l1"] * L.l1_loss(out, hq)
            total = total + logs["l1"]
        for k, v in self.perc_sub(out.float(), hq.float()).items():
            logs[k] = v
            total = total + v
        if self.vgg is not None:
            logs["perceptual"] = lc["perceptual"] * self.vgg(out.float(), hq.float())
            total = total + logs["perceptual"]
        if pc["attention"]:
            logs["attn"] = pc["attention"] * attention_reconstruction_loss(
                ref, hq, ref_feats.extract_attn, aux.distribute_attn, self.level_sizes)
            total = total + logs["attn"]
        adv = self.disc is not None and self.step >= lc["adv_start"]
        if adv:
            self.disc.requires_grad_(False)
            logs["g_adv"] = lc["adversarial"] * L.g_loss(self.disc(out), lc["gan_type"])  # Eq. 9
            total = total + logs["g_adv"]
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.params, float(t["grad_clip"]))
        self.opt.step()
        if adv:
            self.disc.requires_grad_(True)
            ld = L.d_loss(self.disc(hq), self.disc(out.detach()), lc["gan_type"])
            self.opt_d.zero_grad(set_to_none=True)
            ld.backward()
            self.opt_d.step()
            logs["d_loss"] = ld
        ema_update(self.ema, self.net, t["ema_decay"], self.step)
        if self.vq_ready:
            self._maintain_dictionary(rng, logs)
        self.step += 1
        out_logs = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}
        out_logs["loss"] = float(total.detach())
        out_logs["lr"] = lr
        return out_logs

    def _maintain_dictionary(self, rng: np.random.Generator, logs: dict) -> None:
        t, pc = self.cfg["train"], self.plugin
        quant = self.net.quantize
        if pc["kmeans_every"] and (self.step + 1) % int(pc["kmeans_every"]) == 0 and self.buffer.shape[0]:
            with torch.no_grad():
                w = quant.embedding.weight
                w.copy_(kmeans_refine(w, self.buffer.to(w.device), int(pc["kmeans_iters"])).to(w))
            logs["kmeans"] = 1.0
        if t["dead_code_every"] and (self.step + 1) % t["dead_code_every"] == 0:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            dead = reinit_dead_codes(quant, self.last_used, self.step, int(t["dead_code_window"]), self.buffer, gen,
                                     self.opt)
            logs["codes_reseeded"] = float(dead.numel())

    # -- eval -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        from frvideo.metrics import psnr, ssim
        net = self.ema.eval()
        outs: dict[str, list] = {"": [], "_other": []}
        for s in range(0, len(self.eval_lq), 4):
            x = to_tensor(self.eval_lq[s:s + 4], self.device)
            enc = net.encode(x)
            tokens = net.quantize.nearest(enc.z) if self.vq_ready else None
            for tag, refs in (("", self.eval_ref), ("_other", self.eval_other)):
                rf = net.reference(to_tensor(refs[s:s + 4], self.device))
                if tokens is None:
                    y = net.decode_latent(enc.z, enc.feats, rf)
                else:
                    y = net.decode(tokens, enc, rf)
                outs[tag] += to_uint8(y)
        row: dict[str, Any] = {"step": self.step}
        row["psnr_input"] = float(np.mean([psnr(h, l_) for h, l_ in zip(self.eval_hq, self.eval_lq)]))
        for tag, imgs in outs.items():
            row["psnr" + tag] = float(np.mean([psnr(h, o) for h, o in zip(self.eval_hq, imgs)]))
            row["ssim" + tag] = float(np.mean([ssim(h, o) for h, o in zip(self.eval_hq, imgs)]))
        return row

    # -- loop -------------------------------------------------------------------------
    def run(self, until: Optional[int] = None) -> dict:
        return run_loop(self, until)
