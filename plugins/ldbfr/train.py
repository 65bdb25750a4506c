"""LD-BFR's three training stages, run by ``frvideo train CFG`` (``stage:`` below).

The paper's recipe (Sec. 3.4), on this project's data and first stage
(plugins/ldbfr/arch.py: one lite VQ autoencoder for DC-VQR and the diffusion):

* ``ldbfr-dcvqr`` (:class:`DCVQRStage`): E_LQ + DCAM on degraded/clean pairs;
  L = ||f_HQ - E_HQ(x_HQ)||^2 + lambda ||D(f_HQ) - x_HQ||^2 (``plugin.feat_mse``,
  ``plugin.pixel_mse``) + ``plugin.fetch_mse`` ||f_LQ - q(E_HQ(x_HQ))||^2, an
  addition that keeps f_LQ in the codebook's space so the nearest-code fetch
  (and the token scores the smoother sees) stays meaningful. Codebook,
  E_HQ and the decoder are frozen. Initialised from plugins/lite: the stage-1
  (codebook) run for E_HQ / L_HQ / decoder (``plugin.lite_codebook``) and
  E_LQ from lite's restoration encoder (``plugin.lite_lq_encoder``).
* ``ldbfr-unet`` (:class:`UNetStage`): the unconditional eps-UNet on the clean
  latents E_HQ(x) (all training crops + their mirror images, encoded once and
  normalised per channel: the statistics become the net's ``latent_mean`` /
  ``latent_std``); L = ||eps - eps_theta(z_t, t)||^2.
* ``ldbfr-hqi`` (:class:`HQIStage`): only E-HQI / D-HQI train (the base UNet and
  everything else frozen); L = ||eps - eps_theta(z_t, f_HQ, t)||^2 with f_HQ =
  DC-VQR(x_LQ) from a pool of ``plugin.pool_per_image`` degraded copies per
  training crop (computed once with the DC-VQR stage's EMA weights: a CPU
  cannot afford the DC-VQR forward for every sample of every step).
  ``init_from`` = the UNet run, ``plugin.dcvqr_from`` = the DC-VQR run (the two
  are independent and may run side by side).

Each stage writes OUTPUT/last.pth (``params``, ``params_ema`` - the whole
network, so ``frvideo train CFG --export OUT.pth`` gives a self-contained
checkpoint -, optimizer, step, history, evals), eval.jsonl, train_log.jsonl,
loss_curve.png and config.yaml; running the command again resumes. All
randomness of step s comes from generators seeded with (seed, s).
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from frvideo.errors import ConfigError, InputError
from frvideo.train.trainer import (start_run, open_train_eval, degrade_eval, degrade_sample, ema_update, eval_indices, lr_at,
                                   open_run_dir, restore_run_state, run_loop, run_state, save_run, to_tensor,
                                   to_uint8)

from .arch import LDBFRNet

__all__ = ["DCVQRStage", "UNetStage", "HQIStage", "PLUGIN_DEFAULTS"]

PLUGIN_DEFAULTS: dict[str, Any] = {
    # initialisation
    "lite_codebook": None,  # lite stage-1 run (last.pth or export): E_HQ, L_HQ, decoder
    "lite_lq_encoder": None,  # a lite restorer checkpoint whose encoder starts E_LQ (e.g. plugins/lite/weights/lite.pth)
    # skip_fusion networks: the same lite restorer also starts the fidelity path (its CFT blocks
    # and its decoder, trained with the LQ features fused in); ldbfr-dcvqr then trains them too
    "train_fidelity_path": True,
    "fidelity_one_prob": 0.6,  # w = 1 for this share of the samples, else uniform in [0, 1]
    "dcvqr_from": None,  # ldbfr-hqi: the ldbfr-dcvqr run (E_LQ, DCAM)
    "allow_random_init": False,  # tests only: train a stage without its predecessors' weights
    # ldbfr-dcvqr losses
    "feat_mse": 1.0,
    "pixel_mse": 10.0,
    "fetch_mse": 0.25,
    # ldbfr-hqi
    "pool_per_image": 2,
    "pool_images": None,  # ldbfr-unet / ldbfr-hqi: at most this many training crops encoded (None: all)
    "eval_steps": [4],  # DDIM steps of the eval samples
    "eval_seed": 7,  # noise seed of the eval samples (face j: eval_seed + j)
    "encode_batch": 16,
}


def _plugin_cfg(cfg: dict) -> dict:
    p = dict(PLUGIN_DEFAULTS)
    for k, v in (cfg.get("plugin") or {}).items():
        if k not in PLUGIN_DEFAULTS:
            raise ConfigError(f"unknown key 'plugin.{k}' for the LD-BFR stages (known: {', '.join(PLUGIN_DEFAULTS)})")
        p[k] = v
    return p


def _read_state(path, what: str) -> dict:
    from frvideo.restore import read_checkpoint
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"{what}: {path} not found")
    return read_checkpoint(p, ["params_ema", "params"])


def _load_prefixed(module: torch.nn.Module, state: dict, src_prefix: str, source: str,
                   optional: tuple[str, ...] = ()) -> None:
    """Load ``state[src_prefix + k]`` into ``module`` (strict, but keys starting with one of
    ``optional`` may be missing: they keep their initialisation)."""
    from frvideo.restore import load_state_dict_strict
    sub = {k[len(src_prefix):]: v for k, v in state.items() if k.startswith(src_prefix)}
    own = module.state_dict()
    for k in own:
        if k not in sub and k.startswith(optional):
            sub[k] = own[k]
    load_state_dict_strict(module, sub, source)


class _Stage:
    """Shared machinery: network from the card, init, freezing, Adam + EMA, cosine lr,
    checkpoints/resume, logs and the training loop."""

    stage = "?"
    backend = "ldbfr"

    def __init__(self, cfg: dict, output: Optional[str | Path] = None, fresh: bool = False, quiet: bool = False):
        from frvideo.models import load_model_config
        self.cfg, self.quiet = cfg, quiet
        self.p = _plugin_cfg(cfg)
        t = cfg["train"]
        start_run(self, cfg, output)
        torch.manual_seed(self.seed)
        m = cfg["model"]
        self.arch = dict(load_model_config(m["card"]).arch) if m["card"] else {}
        self.arch.update(m["arch"] or {})
        try:
            self.net = LDBFRNet(**self.arch)
        except TypeError as exc:
            raise ConfigError(f"model arch does not fit backend 'ldbfr': {exc}") from None
        self.init_weights()
        self.net.to(self.device)
        self.net.requires_grad_(False)
        self.params = self.trainable()
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.Adam(self.params, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.train_images, self.eval_images = open_train_eval(cfg)
        self.eval_idx = eval_indices(len(self.eval_images), cfg["data"]["eval_count"])
        self.eval_hq = [self.eval_images[i] for i in self.eval_idx]
        self.eval_lq = degrade_eval(cfg, self.eval_hq)
        open_run_dir(self, fresh)
        self.prepare()
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    # -- what a stage defines -------------------------------------------------------------
    def init_weights(self) -> None:
        raise NotImplementedError

    def trainable(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Precomputation after init/resume (latents, pools)."""

    def train_step(self) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------
    def _need(self, key: str, what: str):
        if self.p[key]:
            return self.p[key]
        if self.p["allow_random_init"]:
            return None
        raise ConfigError(f"stage {self.stage} needs plugin.{key} ({what})")

    def _init_from_lite(self) -> None:
        path = self._need("lite_codebook", "the lite stage-1 codebook run, e.g. /tmp/lite_runs/codebook/last.pth")
        if path:
            state = _read_state(path, "plugin.lite_codebook")
            # an LD-BFR checkpoint may stand in for the lite run: its E_HQ, L_HQ and decoder are that
            # run's (so a v2 DC-VQR keeps v1's latent space, and v1's trained UNet stays valid)
            encoder = "hq_encoder." if any(k.startswith("hq_encoder.") for k in state) else "encoder."
            _load_prefixed(self.net.hq_encoder, state, encoder, path)
            _load_prefixed(self.net.quantize, state, "quantize.", path)
            # stage-1 lite runs predate the decoder's fidelity gate (zero-init, unused here)
            _load_prefixed(self.net.decoder, state, "decoder.", path, optional=("gate.",))

    def _init_from_run(self, key: str, path, modules: Optional[list[str]] = None,
                       later: tuple[str, ...] = ()) -> None:
        """Load an earlier LD-BFR run's EMA weights (all of them, or the named modules); tensors
        under the prefixes ``later`` may be missing (another run loads them next)."""
        state = _read_state(path, key)
        if modules is None:
            # cond_var is measured by the HQI stage itself (runs made before it existed lack it)
            _load_prefixed(self.net, state, "", path, optional=("cond_var", *later))
            return
        for name in modules:
            _load_prefixed(getattr(self.net, name), state, name + ".", path)

    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg["train"], step)

    def _rng(self) -> tuple[np.random.Generator, torch.Generator]:
        rng = np.random.default_rng([self.seed, self.step])
        return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))

    def _optimize(self, loss: torch.Tensor) -> None:
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg["train"]["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.params, float(self.cfg["train"]["grad_clip"]))
        self.opt.step()
        ema_update(self.ema, self.net, self.cfg["train"]["ema_decay"], self.step)
        self.step += 1

    def _eval_psnr(self, outs: list[np.ndarray]) -> tuple[float, float]:
        from frvideo.metrics import psnr, ssim
        return (float(np.mean([psnr(h, o) for h, o in zip(self.eval_hq, outs)])),
                float(np.mean([ssim(h, o) for h, o in zip(self.eval_hq, outs)])))

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return run_state(self)

    def save(self) -> Path:
        return save_run(self)

    def _resume(self, path: Path) -> None:
        restore_run_state(self, path)

    # -- loop --------------------------------------------------------------------------------
    def run(self, until: Optional[int] = None) -> dict:
        return run_loop(self, until)

    # -- data ----------------------------------------------------------------------------------
    def _pairs(self, rng: np.random.Generator, count: int, crop: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` (clean, degraded) training crops: random image, degradation, crop, flip."""
        d = self.cfg["data"]
        hq, lq = [], []
        for i in rng.integers(0, len(self.train_images), count):
            img = self.train_images[int(i)]
            low = degrade_sample(self.cfg["degradation"], img, rng)
            c = crop or d["size"]
            y, x = (int(rng.integers(0, (d["size"] - c) // 16 + 1)) * 16 for _ in range(2))  # on the token grid
            h, l_ = img[y:y + c, x:x + c], low[y:y + c, x:x + c]
            if d["flip"] and rng.random() < 0.5:
                h, l_ = h[:, ::-1], l_[:, ::-1]
            hq.append(np.ascontiguousarray(h))
            lq.append(np.ascontiguousarray(l_))
        return to_tensor(hq, self.device), to_tensor(lq, self.device)


class DCVQRStage(_Stage):
    """Stage 1 of LD-BFR: E_LQ + DCAM (see the module docstring)."""

    stage = "ldbfr-dcvqr"

    def init_weights(self) -> None:
        self._init_from_lite()
        path = self.p["lite_lq_encoder"]
        if path:
            state = _read_state(path, "plugin.lite_lq_encoder")
            _load_prefixed(self.net.lq_encoder, state, "encoder.", path)
            if self.net.skip_fusion:  # the restorer's fidelity path: its decoder and CFT blocks
                _load_prefixed(self.net.decoder, state, "decoder.", path)
                _load_prefixed(self.net.fuse, state, "fuse.", path)
        elif self.p["lite_codebook"]:  # start E_LQ as the clean encoder
            self.net.lq_encoder.load_state_dict(self.net.hq_encoder.state_dict())

    def trainable(self):
        params = list(self.net.lq_encoder.parameters()) + list(self.net.dcam.parameters())
        if self.net.skip_fusion and self.p["train_fidelity_path"]:
            params += list(self.net.decoder.parameters()) + list(self.net.fuse.parameters())
        return params

    def _fidelity(self, rng: np.random.Generator, n: int) -> torch.Tensor:
        """Per-sample w (B x 1 x 1 x 1) for the fidelity path, w = 1 most often."""
        w = np.where(rng.random(n) < self.p["fidelity_one_prob"], 1.0, rng.random(n))
        return torch.tensor(w, dtype=torch.float32, device=self.device).view(n, 1, 1, 1)

    def losses(self, hq: torch.Tensor, lq: torch.Tensor, w=0.0) -> tuple[torch.Tensor, dict]:
        net, p = self.net, self.p
        with torch.no_grad():
            target = net.encode_hq(hq)
            target_codes = net.fetch(target)[1]
        f_lq, skips = net.encode_lq_skips(lq)
        _, fetched = net.fetch(f_lq.detach())
        f_hq = net.dcam(f_lq, fetched)
        logs = {"feat_mse": p["feat_mse"] * F.mse_loss(f_hq, target),
                "pixel_mse": p["pixel_mse"] * F.mse_loss(net.decode_latent(f_hq, skips, w, lq), hq)}
        if p["fetch_mse"]:
            logs["fetch_mse"] = p["fetch_mse"] * F.mse_loss(f_lq, target_codes)
        return sum(logs.values()), logs

    def train_step(self) -> dict:
        rng, _ = self._rng()
        hq, lq = self._pairs(rng, int(self.cfg["train"]["batch"]), self.cfg["data"]["crop"])
        w = self._fidelity(rng, len(hq)) if self.net.skip_fusion else 0.0
        loss, logs = self.losses(hq, lq, w)
        lr = self.lr_at(self.step)
        self._optimize(loss)
        return {**{k: float(v.detach()) for k, v in logs.items()}, "loss": float(loss.detach()), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        net = self.ema.eval()
        fetch_out, dcvqr_out = [], []
        for s in range(0, len(self.eval_lq), 4):
            x = to_tensor(self.eval_lq[s:s + 4], self.device)
            f_lq, skips = net.encode_lq_skips(x)
            fetched = net.fetch(f_lq)[1]
            fetch_out += to_uint8(net.decode_latent(fetched))
            dcvqr_out += to_uint8(net.decode_latent(net.dcam(f_lq, fetched), skips, 1.0, x))
        row: dict[str, Any] = {"step": self.step}
        row["psnr_input"], row["ssim_input"] = self._eval_psnr(self.eval_lq)
        row["psnr_fetch"], row["ssim_fetch"] = self._eval_psnr(fetch_out)
        row["psnr"], row["ssim"] = self._eval_psnr(dcvqr_out)
        return row


class _LatentStage(_Stage):
    """Stages on latents: ``self.z0`` (normalised clean latents, M x D x h x w)."""

    def _encode_clean(self, images: list[np.ndarray], flip: bool) -> torch.Tensor:
        net, bs = self.net, int(self.p["encode_batch"])
        out = []
        with torch.no_grad():
            for s in range(0, len(images), bs):
                x = to_tensor(images[s:s + bs], self.device)
                if flip:
                    x = x.flip(-1)
                out.append(net.encode_hq(x).float())
        return torch.cat(out)

    def _eps_loss(self, z0: torch.Tensor, cond: Optional[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        b = z0.shape[0]
        t = torch.randint(0, self.net.schedule.timesteps, (b,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        t, noise = t.to(self.device), noise.to(self.device)
        z_t = self.net.schedule.q_sample(z0, t, noise)
        return F.mse_loss(self.net.predict_eps(z_t, t, cond), noise)

    @torch.no_grad()
    def _eval_eps(self, net: LDBFRNet, z0: torch.Tensor, cond: Optional[torch.Tensor]) -> dict:
        """eps MSE at fixed steps with fixed noise (comparable across evals)."""
        gen = torch.Generator().manual_seed(1234)
        row = {}
        total = net.schedule.timesteps
        for t_val in sorted({min(total - 1, round(f * total)) for f in (0.05, 0.25, 0.5, 0.75, 0.95)}):
            noise = torch.randn(z0.shape, generator=gen).to(self.device)
            t = torch.full((z0.shape[0],), t_val, dtype=torch.long, device=self.device)
            z_t = net.schedule.q_sample(z0, t, noise)
            row[f"eps_mse_t{t_val}"] = float(F.mse_loss(net.predict_eps(z_t, t, cond), noise))
        return row


class UNetStage(_LatentStage):
    """Stage 2 of LD-BFR: the unconditional eps-UNet on clean latents."""

    stage = "ldbfr-unet"

    def init_weights(self) -> None:
        self._init_from_lite()

    def trainable(self):
        return [p for _, p in self.net.unet.base_named_parameters()]

    def prepare(self) -> None:
        n = len(self.train_images)
        picked = range(n) if not self.p["pool_images"] or self.p["pool_images"] >= n else sorted(
            np.random.default_rng([self.seed, 104729]).choice(n, int(self.p["pool_images"]), replace=False).tolist())
        images = [self.train_images[i] for i in picked]
        t0 = time.time()
        z = torch.cat([self._encode_clean(images, False), self._encode_clean(images, True)])
        # per-channel statistics of the clean latents (LDM's scale_factor, per channel)
        mean = z.mean(dim=(0, 2, 3), keepdim=True)
        std = z.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)
        for net in (self.net, self.ema):
            net.latent_mean.copy_(mean)
            net.latent_std.copy_(std)
        self.z0 = self.net.normalize_latent(z.to(self.device))
        self.eval_z0 = self.net.normalize_latent(self._encode_clean(self.eval_hq, False).to(self.device))
        if not self.quiet:
            print(f"encoded {z.shape[0]} clean latents in {time.time() - t0:.1f} s", file=sys.stderr)

    def train_step(self) -> dict:
        rng, gen = self._rng()
        idx = torch.from_numpy(rng.integers(0, self.z0.shape[0], int(self.cfg["train"]["batch"])))
        loss = self._eps_loss(self.z0[idx.to(self.device)], None, gen)
        lr = self.lr_at(self.step)
        self._optimize(loss)
        return {"eps_mse": float(loss.detach()), "loss": float(loss.detach()), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        return {"step": self.step, **self._eval_eps(self.ema.eval(), self.eval_z0, None)}


class HQIStage(_LatentStage):
    """Stage 3 of LD-BFR: E-HQI / D-HQI on the frozen base UNet."""

    stage = "ldbfr-hqi"

    def init_weights(self) -> None:
        path = self.cfg["init_from"] or self._need("init_from", "the ldbfr-unet run's last.pth")
        dcvqr = self._need("dcvqr_from", "the ldbfr-dcvqr run's last.pth")
        if path:
            # a network without the fidelity path (e.g. the shipped v1 ldbfr.pth, for its UNet and
            # HQI) may start a skip_fusion run: the DC-VQR run brings decoder and fuse below
            later = ("fuse.", "decoder.gate.") if self.net.skip_fusion and dcvqr else ()
            self._init_from_run("init_from", path, later=later)
        if dcvqr:  # with skip_fusion the DC-VQR run also trained the fidelity path (decoder, fuse)
            self._init_from_run("plugin.dcvqr_from", dcvqr,
                                ["lq_encoder", "dcam"] + (["decoder", "fuse"] if self.net.skip_fusion else []))

    def _need(self, key, what):
        if key == "init_from":
            if self.p["allow_random_init"]:
                return None
            raise ConfigError(f"stage {self.stage} needs init_from ({what})")
        return super()._need(key, what)

    def trainable(self):
        return self.net.unet.hqi_parameters()

    def prepare(self) -> None:
        t0 = time.time()
        rng = np.random.default_rng([self.seed, 7919])
        net, bs = self.net.eval(), int(self.p["encode_batch"])
        n = len(self.train_images)
        images = range(n) if not self.p["pool_images"] or self.p["pool_images"] >= n else \
            sorted(rng.choice(n, int(self.p["pool_images"]), replace=False).tolist())
        order = [(i, int(rng.integers(2)), int(rng.integers(2**63))) for _ in range(int(self.p["pool_per_image"]))
                 for i in images]
        z0, cond = [], []
        with torch.no_grad():
            for s in range(0, len(order), bs):
                chunk = order[s:s + bs]
                hq = [self.train_images[i][:, ::-1] if flip else self.train_images[i] for i, flip, _ in chunk]
                hq = [np.ascontiguousarray(h) for h in hq]
                lq = [degrade_sample(self.cfg["degradation"], h, np.random.default_rng(seed))
                      for h, (_, _, seed) in zip(hq, chunk)]
                z0.append(net.encode_hq(to_tensor(hq, self.device)).float())
                cond.append(net.dcvqr(to_tensor(lq, self.device)).float())
        self.z0 = net.normalize_latent(torch.cat(z0))
        self.cond = net.normalize_latent(torch.cat(cond))
        # how far the clean latent lies from the condition, per channel (the conditional
        # Gaussian skip of LDBFRNet.predict_eps); measured on this pool, stored in the net
        cond_var = (self.z0 - self.cond).pow(2).mean(dim=(0, 2, 3), keepdim=True).clamp(min=1e-3)
        for m in (self.net, self.ema):
            m.cond_var.copy_(cond_var)
        x = to_tensor(self.eval_lq, self.device)
        with torch.no_grad():
            self.eval_f_hq = net.dcvqr(x)
            self.eval_skips = net.encode_lq_skips(x)[1]
            self.eval_z0 = net.normalize_latent(net.encode_hq(to_tensor(self.eval_hq, self.device)))
        if not self.quiet:
            print(f"built a pool of {self.z0.shape[0]} (latent, condition) pairs in {time.time() - t0:.1f} s",
                  file=sys.stderr)

    def train_step(self) -> dict:
        rng, gen = self._rng()
        idx = torch.from_numpy(rng.integers(0, self.z0.shape[0], int(self.cfg["train"]["batch"]))).to(self.device)
        loss = self._eps_loss(self.z0[idx], self.cond[idx], gen)
        lr = self.lr_at(self.step)
        self._optimize(loss)
        return {"eps_mse": float(loss.detach()), "loss": float(loss.detach()), "lr": lr}

    @torch.no_grad()
    def evaluate(self) -> dict:
        net = self.ema.eval()
        row: dict[str, Any] = {"step": self.step}
        row.update(self._eval_eps(net, self.eval_z0, net.normalize_latent(self.eval_f_hq)))
        row["psnr_input"], row["ssim_input"] = self._eval_psnr(self.eval_lq)
        x = to_tensor(self.eval_lq, self.device)

        def render(z):  # with the fidelity path at w = 1 when the network has one
            return to_uint8(net.decode_latent(z, self.eval_skips, 1.0, x))
        row["psnr_dcvqr"], row["ssim_dcvqr"] = self._eval_psnr(render(self.eval_f_hq))
        seed = int(self.p["eval_seed"])
        for steps in self.p["eval_steps"]:
            gens = [torch.Generator().manual_seed(seed + j) for j in range(self.eval_f_hq.shape[0])]
            z = net.enhance(self.eval_f_hq, int(steps), gens)
            row[f"psnr_s{steps}"], row[f"ssim_s{steps}"] = self._eval_psnr(render(z))
        return row
