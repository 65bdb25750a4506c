"""``frvideo train CONFIG.yaml``: train a codebook restorer in two stages.

Stages (CodeFormer's recipe, see ``../shared/papers/codeformer.txt``):

* ``codebook``: a VQ autoencoder on clean crops - encoder, codebook, decoder;
  L1 + perceptual (weight-free MS-SSIM + Laplacian L1, VGG when a weight file
  is named) + codebook/commitment losses (+ PatchGAN after ``adv_start``).
  ``vq_warmup`` steps run without quantization, then the whole codebook is
  k-means initialised from recent encoder outputs; codes unused for
  ``dead_code_window`` steps are re-seeded the same way (k-means over recent
  encoder outputs) every ``dead_code_every`` steps.
* ``restoration``: ``init_from`` a codebook run; codebook and decoder frozen
  (``train.freeze``); the encoder now sees degraded crops and learns, with the
  token predictor and the fidelity (CFT) fusion: token cross-entropy to the
  clean crop's stage-1 tokens (a frozen copy of the stage-1 encoder gives them)
  + feature MSE to their codes + L1/perceptual of the output decoded from the
  predicted tokens at a fidelity ``w`` drawn per sample.

The network comes from a model card (``model.card``; ``model.arch`` overrides
its arguments) and must offer the training protocol of ``plugins/lite``:
``encode_latent``, ``decode_latent``, ``quantize`` (a ``VectorQuantizer``),
``encode``, ``decode``, ``encoder``, ``decoder``, ``predictor``, ``fuse``.

A run directory (``output``) holds ``last.pth`` (model, EMA, optimizer(s),
step, codebook statistics, RNG states, history), ``eval.jsonl``,
``train_log.jsonl``, ``loss_curve.png`` and ``config.yaml``. Running the same
command again resumes from ``last.pth``; all randomness of step ``s`` is drawn
from generators seeded with ``(seed, s)``, so a resumed run takes exactly the
same steps as an uninterrupted one (same device and thread count).

``frvideo train CONFIG.yaml --export OUT.pth`` writes the EMA weights of the
run's ``last.pth`` as ``{"params_ema": ...}`` (fp16 unless ``--fp32``), the
file a model card ships.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import queue
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import cv2
import numpy as np
import torch
import yaml

from ..errors import ConfigError, FrvideoError, InputError, UsageError
from ..interrupt import Interrupted
from . import losses as L

__all__ = ["DEFAULTS", "load_config", "Trainer", "kmeans", "reinit_dead_codes", "export_weights", "train_main",
           # shared with the backends' own trainers (plugins/*/train.py)
           "lr_at", "ema_update", "remember_codes", "eval_indices", "degrade_eval", "rng_state", "set_rng_state",
           "write_run_logs", "run_state", "restore_run_state", "vq_gan_state", "restore_vq_gan_state",
           "open_run_dir", "save_run", "run_loop"]

DEFAULTS: dict[str, Any] = {
    "model": {"card": None, "backend": None, "arch": {}},
    "stage": "codebook",  # codebook | restoration
    "data": {
        "root": None,  # a `frvideo dataset` folder (index.jsonl) or a folder of images
        "eval_root": None,  # separate eval set; else `eval_fraction` of root's sources
        "eval_fraction": 0.1,
        "size": 256,  # crops are resized to this (the model's input size)
        "crop": 128,  # random training patch (the networks are fully convolutional); null = whole crop
        "flip": True,
        "eval_count": 16,  # eval crops (evenly spaced over the eval set)
        "cache": True,  # keep decoded, resized crops in memory
        "synthetic": 0,  # > 0: that many random-texture faces instead of root (tests)
        "synthetic_eval": 0,
    },
    # codec_prob: share of training samples that also go through a real x264 intra pass at
    # codec_bpp bits per pixel (a range, drawn log-uniformly), after the preset's damage;
    # frame_scale [lo, hi]: all of it done at a frame scale drawn log-uniformly (frame pixels per
    # crop pixel; degradation.at_frame_scale), null = on the crop itself
    "degradation": {"preset": "vqfr", "eval_seed": 1234, "codec_prob": 0.0, "codec_bpp": [0.3, 2.0],
                    "frame_scale": None},
    "train": {
        "batch": 8, "steps": 1000, "lr": 2e-4, "lr_schedule": "cosine", "lr_min_ratio": 0.1,
        "warmup_steps": 0, "betas": [0.9, 0.99], "weight_decay": 0.0, "grad_clip": None,
        "ema_decay": 0.999, "seed": 0, "device": "auto", "amp": True, "threads": None,
        "workers": 0,  # > 0: that many forked processes make the batches ahead (same batches as 0)
        "log_every": 10, "eval_every": 250, "save_every": 100,
        "vq_warmup": 0, "dead_code_window": 200, "dead_code_every": 100, "code_buffer": 8192,
        "freeze": None,  # module names; default: none (codebook stage), [quantize, decoder] (restoration)
        "fidelity_range": [0.0, 1.0], "fidelity_one_prob": 0.5,  # w per sample in restoration
        "eval_fidelity": [0.0, 0.5, 1.0],
        "disc_lr": None,
        "channels_last": True,  # NHWC: several times faster for these convnets on CPU (oneDNN)
        "cpu_bf16": False,  # bfloat16 autocast on CPU too (AVX512-BF16/AMX machines); amp = CUDA only
    },
    "loss": {
        "l1": 1.0, "ms_ssim": 0.5, "lap_l1": 0.5, "perceptual": 0.0, "vgg_arch": "vgg19",
        "face_feature": 0.0,  # L1 of RetinaFace backbone features (losses.FaceFeatureLoss); needs face_feature_weights
        "codebook": 1.0, "commitment": 0.25,
        "adversarial": 0.0, "adv_start": 0, "gan_type": "hinge", "disc_ndf": 32, "disc_layers": 3,
        "token_ce": 0.5, "feat_mse": 1.0,
    },
    "output": "runs/train",
    "init_from": None,  # restoration: a codebook run's last.pth (its EMA weights are loaded)
    "teacher_from": None,  # restoration: checkpoint whose encoder gives the target tokens (default: init_from)
    "vgg_weights": None,  # a torchvision/BasicSR VGG state dict; enables loss.perceptual
    "face_feature_weights": None,  # RetinaFace MobileNet-0.25 (../shared/weights/detection_mobilenet0.25_Final.pth)
    "plugin": {},  # settings of a backend's own stages (``train_stages``), checked by that trainer
}
_FREE_KEYS = {("model", "arch"), ("plugin",)}  # dicts whose keys are not checked


# --------------------------------------------------------------------------- config

def _merge(base: dict, over: dict, where: str, source: str) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        name = f"{where}.{k}" if where else str(k)
        if k not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"{source}: unknown key {name!r} (known{' under ' + where if where else ''}: {known})")
        if isinstance(base[k], dict) and tuple(name.split(".")) not in _FREE_KEYS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"{source}: {name!r} must be a mapping")
            out[k] = _merge(base[k], v, name, source)
        else:
            out[k] = v
    return out


def _set_key(cfg: dict, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"{source}: unknown key {dotted!r}")
        node = node[p]
    if parts[-1] not in node and tuple(parts[:-1]) not in _FREE_KEYS:
        raise ConfigError(f"{source}: unknown key {dotted!r}")
    node[parts[-1]] = value


def load_config(path: str | Path | dict, overrides: Optional[list[str]] = None) -> dict:
    """A training config (YAML file or dict) merged over :data:`DEFAULTS`;
    ``overrides`` are ``key.sub=value`` strings (values parsed as YAML)."""
    if isinstance(path, dict):
        data, source = path, "config"
    else:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"training config not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"training config {path} is a directory") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at top level")
    cfg = _merge(DEFAULTS, data, "", source)
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        _set_key(cfg, key.strip(), yaml.safe_load(value), f"--set {key}")
    _validate(cfg, source)
    return cfg


def _validate(cfg: dict, source: str) -> None:
    def bad(msg):
        raise ConfigError(f"{source}: {msg}")

    if not cfg["model"]["card"] and not cfg["model"]["backend"]:
        bad("model.card (a model card name) or model.backend is required")
    stages = ("codebook", "restoration", *backend_stages(cfg))
    if cfg["stage"] not in stages:
        bad(f"stage must be one of {', '.join(stages)}, not {cfg['stage']!r}")
    d, t = cfg["data"], cfg["train"]
    if not d["root"] and not d["synthetic"]:
        bad("data.root is required (a `frvideo dataset` folder)")
    for key in ("batch", "steps", "log_every", "eval_every", "save_every"):
        if not isinstance(t[key], int) or t[key] < (0 if key == "steps" else 1):
            bad(f"train.{key} must be a positive integer, not {t[key]!r}")
    for key in ("lr", "ema_decay"):
        if not isinstance(t[key], (int, float)) or not 0 <= t[key] < (1 if key == "ema_decay" else 10):
            bad(f"train.{key} is out of range: {t[key]!r}")
    if not isinstance(d["size"], int) or d["size"] < 8:
        bad(f"data.size must be an integer >= 8, not {d['size']!r}")
    if d["crop"] is not None and (not isinstance(d["crop"], int) or not 8 <= d["crop"] <= d["size"]):
        bad(f"data.crop must be an integer in [8, data.size] or null, not {d['crop']!r}")
    if t["lr_schedule"] not in ("cosine", "constant"):
        bad(f"train.lr_schedule must be cosine or constant, not {t['lr_schedule']!r}")
    if t["device"] not in ("auto", "cpu", "cuda") and not str(t["device"]).startswith("cuda:"):
        bad(f"train.device must be auto, cpu or cuda[:N], not {t['device']!r}")
    if not isinstance(t["workers"], int) or t["workers"] < 0:
        bad(f"train.workers must be an integer >= 0, not {t['workers']!r}")
    if t["workers"] and cfg["stage"] not in ("codebook", "restoration"):
        bad(f"train.workers applies to the codebook and restoration stages, not {cfg['stage']!r}")
    lo, hi = t["fidelity_range"]
    if not 0 <= lo <= hi <= 1:
        bad(f"train.fidelity_range must be within [0, 1], not {t['fidelity_range']!r}")
    if cfg["loss"]["perceptual"] and not cfg["vgg_weights"]:
        bad("loss.perceptual > 0 needs vgg_weights (a VGG state dict file)")
    if cfg["loss"]["face_feature"] and not cfg["face_feature_weights"]:
        bad("loss.face_feature > 0 needs face_feature_weights (RetinaFace MobileNet-0.25's weight file)")
    fs = cfg["degradation"].get("frame_scale")
    if fs is not None and not (isinstance(fs, (list, tuple)) and len(fs) == 2
                               and all(isinstance(v, (int, float)) for v in fs) and 0 < fs[0] <= fs[1] <= 16):
        bad(f"degradation.frame_scale must be [lo, hi] with 0 < lo <= hi <= 16 (frame pixels per crop pixel) "
            f"or null, not {fs!r}")
    if cfg["stage"] not in ("codebook", "restoration"):
        return  # a backend's own stage: its trainer checks the rest
    if cfg["stage"] == "restoration" and not cfg["init_from"]:
        bad("the restoration stage needs init_from (the codebook run's last.pth)")
    if cfg["loss"]["gan_type"] not in ("hinge", "nsgan", "non-saturating", "vanilla"):
        bad(f"loss.gan_type must be hinge or nsgan, not {cfg['loss']['gan_type']!r}")
    try:
        from .degradation import get_preset
        get_preset(cfg["degradation"]["preset"])
    except ValueError as exc:
        bad(str(exc))


# --------------------------------------------------------------------------- model

_PROTOCOL = ("encode_latent", "decode_latent", "quantize", "encode", "decode", "encoder", "decoder")


def _network_class(backend: str):
    from ..restore import Restorer, backend_class
    try:
        return backend_class(backend)
    except ConfigError as exc:
        # a plugin in the source tree that is not registered (yet): plugins/<backend>
        try:
            module = importlib.import_module(f"plugins.{backend}")
        except ImportError:
            raise exc from None
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Restorer) and getattr(obj, "name", None) == backend:
                return obj
        raise exc from None


def _config_backend(cfg: dict) -> str:
    from ..models import load_model_config
    return cfg["model"]["backend"] or load_model_config(cfg["model"]["card"]).backend


def backend_stages(cfg: dict) -> dict[str, str]:
    """Training stages a backend brings itself: its Restorer's ``train_stages``
    (stage name -> 'module:Class' of a trainer with this module's interface:
    ``Cls(cfg, output, fresh=, quiet=)``, ``.run(until)``, ``.out``, ``.step``, and a
    ``last.pth`` holding ``params_ema`` for ``--export``)."""
    return dict(getattr(_network_class(_config_backend(cfg)), "train_stages", None) or {})


def trainer_class(cfg: dict) -> type:
    """The trainer for ``cfg['stage']``: :class:`Trainer` or the backend's own."""
    target = backend_stages(cfg).get(cfg["stage"])
    if target is None:
        return Trainer
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_model(cfg: dict) -> tuple[torch.nn.Module, dict, str]:
    from ..models import load_model_config
    m = cfg["model"]
    arch, backend = {}, m["backend"]
    if m["card"]:
        card = load_model_config(m["card"])
        backend = backend or card.backend
        arch = dict(card.arch)
    arch.update(m["arch"] or {})
    cls = _network_class(backend)
    try:
        net = cls.build_network(arch)
    except TypeError as exc:
        raise ConfigError(f"model arch does not fit backend {backend!r}: {exc}") from None
    missing = [p for p in _PROTOCOL if not hasattr(net, p)]
    if missing:
        raise ConfigError(f"backend {backend!r} cannot be trained here (its network lacks {', '.join(missing)})")
    return net, arch, backend


# --------------------------------------------------------------------------- data

def synthetic_faces(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Random-texture cartoon faces (uint8 RGB size x size), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = rng.uniform(0, 255, 3)
        img = np.empty((size, size, 3), np.float32)
        img[:] = bg
        tex = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), max(0.6, size / 48))
        tex = tex / (tex.std() + 1e-6)
        skin = rng.uniform([150, 100, 70], [240, 200, 170])
        c = size / 2
        face = np.zeros((size, size), np.uint8)
        cv2.ellipse(face, (int(c), int(c * 1.05)), (int(size * rng.uniform(.28, .36)), int(size * rng.uniform(.36, .44))),
                    0, 0, 360, 1, -1)
        img[face > 0] = skin
        for ex in (0.38, 0.62):
            cv2.ellipse(img, (int(size * ex), int(size * 0.45)), (max(1, size // 16), max(1, size // 28)), 0, 0, 360,
                        tuple(float(v) for v in rng.uniform(10, 90, 3)), -1)
        cv2.line(img, (int(c), int(size * .48)), (int(c), int(size * .6)), tuple(float(v) for v in skin * .7),
                 max(1, size // 40))
        cv2.ellipse(img, (int(c), int(size * .72)), (max(1, size // 9), max(1, size // 30)), 0, 0, 360,
                    tuple(float(v) for v in rng.uniform([120, 20, 30], [220, 90, 100])), -1)
        img += tex[..., None] * rng.uniform(6, 20)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


class _Images:
    """Clean crops at ``size`` from a dataset, a folder of images or memory."""

    def __init__(self, size: int, dataset=None, files=None, arrays=None, cache: bool = True):
        self.size, self.dataset, self.files, self.arrays, self.cache = size, dataset, files, arrays, cache
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        if self.arrays is not None:
            return len(self.arrays)
        return len(self.dataset) if self.dataset is not None else len(self.files)

    def _fit(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] != (self.size, self.size):
            interp = cv2.INTER_AREA if img.shape[0] > self.size else cv2.INTER_CUBIC
            img = cv2.resize(img, (self.size, self.size), interpolation=interp)
        return np.ascontiguousarray(img)

    def valid_box(self, i: int) -> Optional[tuple[int, int, int, int]]:
        """(x0, y0, x1, y1) at ``size``: where crop i holds pixels of its source (outside it the
        aligner filled in a mirror image), from the index's ``affine`` and ``frame_size``;
        None when unknown (the whole crop)."""
        if self.dataset is None:
            return None
        e = self.dataset.entry(i)
        if "affine" not in e or "frame_size" not in e:
            return None
        A = np.asarray(e["affine"], np.float64)
        w, h = e["frame_size"]
        k = self.size / float(e.get("size") or self.size)
        pts = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ A.T * k
        x0, y0 = np.clip(np.ceil(pts.min(0)), 0, self.size).astype(int)
        x1, y1 = np.clip(np.floor(pts.max(0)), 0, self.size).astype(int)
        return int(x0), int(y0), int(x1), int(y1)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.arrays is not None:
            return self.arrays[i]
        if i in self._cache:
            return self._cache[i]
        if self.dataset is not None:
            img = self.dataset[i]["image"]
        else:
            bgr = cv2.imread(str(self.files[i]), cv2.IMREAD_COLOR)
            if bgr is None:
                raise InputError(f"cannot read image {self.files[i]}")
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        img = self._fit(img)
        if self.cache:
            self._cache[i] = img
        return img


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _open_images(root: str, size: int, cache: bool):
    """(images, FaceCropDataset or None) for a dataset folder or a folder of images."""
    path = Path(root).expanduser()
    if not path.exists():
        raise InputError(f"training data not found: {root} (build it with `frvideo dataset SRC... --out {root}`)")
    if (path / "index.jsonl").is_file():
        from .dataset import FaceCropDataset
        ds = FaceCropDataset(path, size)
        if len(ds) == 0:
            raise InputError(f"{path}/index.jsonl lists no crops")
        return _Images(size, dataset=ds, cache=cache), ds
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_EXT and not p.name.startswith("."))
        if not files:
            raise InputError(f"{root} has neither index.jsonl nor images")
        return _Images(size, files=files, cache=cache), None
    raise InputError(f"training data {root} is not a folder")


def open_data(cfg: dict) -> tuple[_Images, _Images]:
    d = cfg["data"]
    seed = cfg["train"]["seed"]
    if d["synthetic"]:
        train = _Images(d["size"], arrays=synthetic_faces(d["synthetic"], d["size"], seed))
        n_eval = d["synthetic_eval"] or max(2, d["synthetic"] // 8)
        return train, _Images(d["size"], arrays=synthetic_faces(n_eval, d["size"], seed + 7919))
    train, ds = _open_images(d["root"], d["size"], d["cache"])
    if d["eval_root"]:
        ev, _ = _open_images(d["eval_root"], d["size"], d["cache"])
    elif ds is not None and d["eval_fraction"] > 0:
        tr_ds, ev_ds = ds.split(d["eval_fraction"], seed)
        if len(tr_ds) == 0 or len(ev_ds) == 0:
            raise InputError(f"{d['root']}: cannot split off an eval set (one source only?); set data.eval_root")
        train, ev = _Images(d["size"], dataset=tr_ds, cache=d["cache"]), _Images(d["size"], dataset=ev_ds,
                                                                                  cache=d["cache"])
    else:
        n = len(train)
        k = max(1, int(round(n * d["eval_fraction"])))
        if n < 2:
            raise InputError(f"{d['root']} has fewer than 2 images")
        idx = np.random.default_rng(seed).permutation(n)
        files = train.files
        ev = _Images(d["size"], files=[files[i] for i in sorted(idx[:k])], cache=d["cache"])
        train = _Images(d["size"], files=[files[i] for i in sorted(idx[k:])], cache=d["cache"])
    return train, ev


def to_tensor(images: list[np.ndarray], device) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> list[np.ndarray]:
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(x)


# --------------------------------------------------------------------------- codebook maintenance

def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Lloyd's k-means of N x D points; k x D centers (empty clusters keep their seed point)."""
    x = x.float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("kmeans of no points")
    if n >= k:
        idx = torch.randperm(n, generator=generator)[:k]
    else:
        idx = torch.randint(0, n, (k,), generator=generator)
    centers = x[idx.to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1).to(x.dtype)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)
    return centers


def reinit_dead_codes(quantizer, last_used: torch.Tensor, step: int, window: int, buffer: torch.Tensor,
                      generator: Optional[torch.Generator] = None, optimizer=None) -> torch.Tensor:
    """Re-seed the codes unused for more than ``window`` steps (``step - last_used >
    window``) with k-means centers of ``buffer`` (recent encoder outputs, M x D);
    their Adam moments are reset and ``last_used`` set to ``step``. Returns the
    indices of the re-seeded codes."""
    dead = torch.nonzero(step - last_used > window).flatten()
    if dead.numel() == 0 or buffer.shape[0] == 0:
        return dead[:0]
    weight = quantizer.embedding.weight
    centers = kmeans(buffer.to(weight.device), int(dead.numel()), iters=5, generator=generator)
    with torch.no_grad():
        weight[dead.to(weight.device)] = centers.to(weight.dtype)
    last_used[dead] = step
    if optimizer is not None:
        state = optimizer.state.get(weight)
        if state:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][dead.to(weight.device)] = 0
    return dead


# --------------------------------------------------------------------------- plotting

_COLORS = [(200, 80, 30), (40, 140, 40), (30, 60, 200), (150, 40, 150), (20, 150, 170), (100, 100, 100),
           (0, 120, 255), (180, 180, 0)]


def _panel(canvas, box, series: dict, title: str, log: bool) -> None:
    x0, y0, x1, y1 = box
    cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 0, 0), 1)
    cv2.putText(canvas, title, (x0 + 5, y0 - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    pts = {k: (np.asarray(xs, float), np.asarray(ys, float)) for k, (xs, ys) in series.items() if len(xs)}
    if log:
        pts = {k: (xs[ys > 0], np.log10(ys[ys > 0])) for k, (xs, ys) in pts.items()}
    pts = {k: (xs[np.isfinite(ys)], ys[np.isfinite(ys)]) for k, (xs, ys) in pts.items()}
    pts = {k: v for k, v in pts.items() if len(v[0])}
    if not pts:
        return
    xmin = min(v[0].min() for v in pts.values())
    xmax = max(v[0].max() for v in pts.values())
    ymin = min(v[1].min() for v in pts.values())
    ymax = max(v[1].max() for v in pts.values())
    if xmax <= xmin:
        xmax = xmin + 1
    if ymax - ymin < 1e-9:
        ymin, ymax = ymin - 0.5, ymax + 0.5
    pad = 0.05 * (ymax - ymin)
    ymin, ymax = ymin - pad, ymax + pad

    def px(x, y):
        return (int(x0 + 50 + (x - xmin) / (xmax - xmin) * (x1 - x0 - 60)),
                int(y1 - 20 - (y - ymin) / (ymax - ymin) * (y1 - y0 - 30)))

    for frac in (0.0, 0.5, 1.0):
        y = ymin + frac * (ymax - ymin)
        label = f"{10 ** y:.3g}" if log else f"{y:.3g}"
        cv2.putText(canvas, label, (x0 + 2, px(xmin, y)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (80, 80, 80), 1)
    cv2.putText(canvas, f"step {int(xmin)}", (x0 + 50, y1 - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (80, 80, 80), 1)
    cv2.putText(canvas, f"{int(xmax)}", (x1 - 45, y1 - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (80, 80, 80), 1)
    for j, (name, (xs, ys)) in enumerate(pts.items()):
        color = _COLORS[j % len(_COLORS)]
        p = np.array([px(x, y) for x, y in zip(xs, ys)], np.int32)
        if len(p) > 1:
            cv2.polylines(canvas, [p], False, color, 1, cv2.LINE_AA)
        else:
            cv2.circle(canvas, tuple(int(v) for v in p[0]), 3, color, -1)
        cv2.putText(canvas, name, (x1 - 150, y0 + 15 + 14 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1,
                    cv2.LINE_AA)


def plot_curves(path: Path, history: list[dict], evals: list[dict]) -> None:
    """loss_curve.png: training losses (log scale) above, eval PSNR below."""
    canvas = np.full((620, 900, 3), 255, np.uint8)
    keys = [k for k in (history[-1] if history else {}) if k not in ("step", "lr", "time", "codes_used", "token_acc", "codes_reseeded")]
    series = {k: ([h["step"] for h in history if k in h], [h[k] for h in history if k in h]) for k in keys}
    _panel(canvas, (10, 30, 890, 330), series, "training losses (log10)", log=True)
    ekeys = [k for k in (evals[-1] if evals else {}) if k.startswith("psnr")]
    eseries = {k: ([e["step"] for e in evals if k in e], [e[k] for e in evals if k in e]) for k in ekeys}
    _panel(canvas, (10, 370, 890, 610), eseries, "eval PSNR (dB)", log=False)
    tmp = path.with_name(path.stem + ".tmp.png")
    cv2.imwrite(str(tmp), canvas)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- trainer

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _np_state_out() -> tuple:
    """numpy's global RNG state in a form ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _np_state_in(state) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name} but CUDA is not available")
    return torch.device(name)


# --------------------------------------------------------------------------- shared by all trainers
# (this module's Trainer and the backends' own stages, e.g. plugins/ented, plugins/ldbfr)

def lr_at(train_cfg: dict, step: int) -> float:
    """Learning rate of ``step``: linear warm-up, then cosine down to ``lr_min_ratio`` (or constant)."""
    t = train_cfg
    base = float(t["lr"])
    if step < t["warmup_steps"]:
        return base * (step + 1) / t["warmup_steps"]
    if t["lr_schedule"] == "constant":
        return base
    total = max(1, t["steps"] - t["warmup_steps"])
    frac = min(1.0, (step - t["warmup_steps"]) / total)
    lo = base * float(t["lr_min_ratio"])
    return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * frac))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float, step: int) -> None:
    """EMA of the trained parameters (decay ramped up over the first steps); frozen ones and buffers are copied."""
    decay = min(float(decay), (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), net.parameters()):
        if p.requires_grad:
            pe.lerp_(p.detach(), 1 - decay)
        else:
            pe.copy_(p.detach())
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def remember_codes(buffer: torch.Tensor, z: torch.Tensor, rng: np.random.Generator, capacity: int) -> torch.Tensor:
    """``buffer`` with a random sample of this step's encoder outputs ``z`` added, the oldest
    dropped beyond ``capacity`` rows (the k-means pool of the codebook maintenance)."""
    flat = z.detach().float().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).cpu()
    take = min(flat.shape[0], max(64, capacity // 32))
    sel = torch.from_numpy(rng.choice(flat.shape[0], take, replace=False))
    return torch.cat([buffer, flat[sel]])[-int(capacity):]


def eval_indices(n: int, count: int) -> list[int]:
    """Up to ``count`` eval images evenly spaced over ``n``."""
    k = min(int(count), n)
    return [int(i) for i in np.unique(np.linspace(0, n - 1, k).round().astype(int))]


def patch_origin(valid, size: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """(y, x) of a random crop x crop patch of a size x size image, inside ``valid`` (x0, y0, x1, y1)
    when it fits there (else centred on it): patches of real pixels, not of mirror padding."""
    if valid is None:
        return int(rng.integers(0, size - crop + 1)), int(rng.integers(0, size - crop + 1))
    x0, y0, x1, y1 = valid

    def axis(lo, hi):
        if hi - lo >= crop:
            return int(rng.integers(lo, hi - crop + 1))
        return int(np.clip((lo + hi - crop) // 2, 0, size - crop))
    return axis(y0, y1), axis(x0, x1)


def degrade_sample(dcfg: dict, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One training input: the preset's (or mixture's) damage, then with ``codec_prob`` a real
    x264 pass of the image as a one-frame video; with ``frame_scale`` both at a drawn frame scale."""
    from .degradation import Degradation, at_frame_scale, codec_degrade

    def damage(x: np.ndarray) -> np.ndarray:
        low = Degradation(dcfg["preset"], seed=int(rng.integers(2**63))).apply(x)
        if dcfg.get("codec_prob") and rng.random() < dcfg["codec_prob"]:
            lo, hi = dcfg["codec_bpp"]
            bpp = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            h, w = low.shape[:2]
            low = codec_degrade([low], codec="libx264", bitrate=bpp * w * h * 25, seed=int(rng.integers(2**63)))[0]
        return low

    if not dcfg.get("frame_scale"):
        return damage(img)
    return at_frame_scale(img, frame_scale(dcfg["frame_scale"], rng), damage)


def frame_scale(bounds, rng: np.random.Generator) -> float:
    lo, hi = bounds
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def degrade_eval(cfg: dict, images: list[np.ndarray]) -> list[np.ndarray]:
    """The eval inputs: ``images`` degraded with ``degradation.eval_seed`` (image j: seed (eval_seed, j)),
    at frame scales drawn from (eval_seed, j) too when ``frame_scale`` is set."""
    from .degradation import Degradation, at_frame_scale
    dcfg = cfg["degradation"]
    preset, eseed = dcfg["preset"], int(dcfg["eval_seed"])
    out = []
    for j, img in enumerate(images):
        deg = Degradation(preset, seed=[eseed, j])
        if dcfg.get("frame_scale"):
            out.append(at_frame_scale(img, frame_scale(dcfg["frame_scale"], np.random.default_rng([eseed, j])), deg.apply))
        else:
            out.append(deg.apply(img))
    return out


def rng_state() -> dict:
    """The global RNG states (torch, numpy, python, CUDA), in a form ``torch.load(weights_only=True)`` accepts."""
    return {"torch": torch.get_rng_state(), "numpy": _np_state_out(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_state_in(state["numpy"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_run_logs(out: Path, history: list[dict], evals: list[dict]) -> None:
    """train_log.jsonl, eval.jsonl (each replaced atomically) and loss_curve.png in the run directory."""
    for name, rows in (("train_log.jsonl", history), ("eval.jsonl", evals)):
        tmp = out / (name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, out / name)
    if history or evals:
        plot_curves(out / "loss_curve.png", history, evals)


def start_run(trainer, cfg: dict, output) -> None:
    """The run basics every stage sets the same way: seed, output folder, CPU threads, device."""
    t = cfg["train"]
    trainer.seed = int(t["seed"])
    trainer.out = Path(output or cfg["output"]).expanduser()
    if t["threads"]:
        torch.set_num_threads(int(t["threads"]))
    trainer.device = _resolve_device(str(t["device"]))


def open_train_eval(cfg: dict):
    """The training and eval image sets of ``cfg``; an empty one is an input error."""
    train, evaluation = open_data(cfg)
    if len(train) == 0 or len(evaluation) == 0:
        raise InputError("the training or the eval set is empty")
    return train, evaluation


def run_state(trainer) -> dict:
    """The checkpoint entries every trainer writes (a trainer adds its own)."""
    return {"params": trainer.net.state_dict(), "params_ema": trainer.ema.state_dict(),
            "optimizer": trainer.opt.state_dict(), "step": trainer.step, "history": trainer.history,
            "evals": trainer.evals, "config": trainer.cfg, "arch": trainer.arch, "backend": trainer.backend,
            "stage": trainer.stage}


def restore_run_state(trainer, path: Path) -> dict:
    """Load ``path``, check it is a checkpoint of this stage and arch, restore what :func:`run_state`
    saved; returns the checkpoint for the trainer's own entries."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot resume from {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    from ..restore import reject_non_finite
    reject_non_finite(ck, path)  # a run that diverged (or a corrupt file) is not resumed
    if ck.get("stage") != trainer.stage or ck.get("arch") != trainer.arch:
        raise ConfigError(f"{path} is from another run (stage/arch differ); use another output or --fresh")
    trainer.net.load_state_dict(ck["params"])
    trainer.ema.load_state_dict(ck["params_ema"])
    trainer.opt.load_state_dict(ck["optimizer"])
    trainer.step = int(ck["step"])
    trainer.history, trainer.evals = list(ck["history"]), list(ck["evals"])
    if not trainer.quiet:
        print(f"resuming {trainer.out} from step {trainer.step}", file=sys.stderr)
    return ck


def vq_gan_state(trainer) -> dict:
    """Checkpoint entries of a VQ trainer with an optional discriminator (:class:`Trainer`, ented):
    discriminator, codebook statistics and the global RNG states (exact resume)."""
    return {"disc": trainer.disc.state_dict() if trainer.disc is not None else None,
            "disc_optimizer": trainer.opt_d.state_dict() if trainer.opt_d is not None else None,
            "last_used": trainer.last_used, "buffer": trainer.buffer, "vq_ready": trainer.vq_ready,
            "rng": rng_state()}


def restore_vq_gan_state(trainer, ck: dict) -> None:
    if trainer.disc is not None and ck.get("disc") is not None:
        trainer.disc.load_state_dict(ck["disc"])
        trainer.opt_d.load_state_dict(ck["disc_optimizer"])
    trainer.last_used, trainer.buffer = ck["last_used"], ck["buffer"]
    trainer.vq_ready = bool(ck["vq_ready"])
    set_rng_state(ck["rng"])


def open_run_dir(trainer, fresh: bool) -> None:
    """Create the run directory; resume from its ``last.pth`` unless ``fresh``."""
    trainer.out.mkdir(parents=True, exist_ok=True)
    last = trainer.out / "last.pth"
    if last.is_file() and not fresh:
        trainer._resume(last)


def save_run(trainer) -> Path:
    """``last.pth`` (``trainer.state()``) and the logs."""
    path = trainer.out / "last.pth"
    _atomic_save(trainer.state(), path)
    write_run_logs(trainer.out, trainer.history, trainer.evals)
    return path


def run_loop(trainer, until: Optional[int] = None) -> dict:
    """Train ``trainer`` to ``train.steps`` (or stop early at ``until``, saving as an interruption
    would): a log row (mean losses) every ``log_every`` steps, an eval every ``eval_every`` (and at
    the last step), a save every ``save_every``; Ctrl-C saves and re-raises. ``trainer`` offers
    ``cfg``, ``stage``, ``quiet``, ``out``, ``net``, ``step``, ``history``, ``evals``, ``save()``,
    ``train_step()`` (one step, advancing ``step``; returns its losses) and ``evaluate()`` (the eval
    row; appended to ``evals`` here). Returns the last eval row."""
    from tqdm import tqdm
    t = trainer.cfg["train"]
    total = int(t["steps"])
    stop = total if until is None else min(total, until)
    acc: dict[str, list[float]] = {}
    t0 = time.time()
    bar = tqdm(total=total, initial=trainer.step, desc=f"train {trainer.stage}", unit="step",
               disable=trainer.quiet, dynamic_ncols=True)
    try:
        while trainer.step < stop:
            trainer.net.train()  # evaluate() or a stage's precomputation may have left it in eval mode
            for k, v in trainer.train_step().items():
                acc.setdefault(k, []).append(v)
            bar.update(1)
            if trainer.step % t["log_every"] == 0 or trainer.step == stop:
                row = {"step": trainer.step, **{k: float(np.mean(v)) for k, v in acc.items()},
                       "time": round(time.time() - t0, 2)}
                trainer.history.append(row)
                acc.clear()
                post = {"loss": f"{row['loss']:.4f}"}
                if "token_acc" in row:
                    post["acc"] = f"{row['token_acc']:.3f}"
                if "codes_used" in row:
                    post["codes"] = int(row["codes_used"])
                bar.set_postfix(post)
            if trainer.step % t["eval_every"] == 0 or trainer.step == total:
                ev = trainer.evaluate()
                trainer.evals.append(ev)
                if not trainer.quiet:
                    bar.write("eval " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in ev.items()))
            if trainer.step % t["save_every"] == 0 or trainer.step == stop:
                trainer.save()
    except (KeyboardInterrupt, Interrupted):  # Ctrl-C, or any stop signal under the frvideo command
        bar.close()
        trainer.save()
        print(f"interrupted at step {trainer.step}; saved {trainer.out / 'last.pth'} (run again to resume)",
              file=sys.stderr)
        raise
    bar.close()
    return trainer.evals[-1] if trainer.evals else {}


_WORKER_TRAINER = None  # the Trainer a forked batch worker draws from (inherited, never pickled)


def _worker_loop(tasks, results) -> None:
    """A batch worker: step numbers in, (step, clean, degraded, generator state) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's: it saves and stops us
    seed = _WORKER_TRAINER.seed
    while True:
        step = tasks.get()
        try:
            rng = np.random.default_rng([seed, step])
            hq, lq = _WORKER_TRAINER._batch_arrays(rng)
            results.put((step, (np.stack(hq), np.stack(lq), rng.bit_generator.state)))
        except Exception as exc:  # the main process raises it: a worker's traceback would be lost
            results.put((step, f"{type(exc).__name__}: {exc}"))


class BatchWorkers:
    """Forked processes that make the batches of the coming steps (the degradations, x264 passes
    included, are CPU work that would leave an accelerator waiting). Each batch is drawn from the
    generator of ``(seed, step)``, as in the main process, so a run gives the same batches with any
    number of workers and resumes exactly; at most ``ahead`` batches are asked for ahead, so memory
    stays bounded. Plain processes and two queues rather than multiprocessing.Pool or torch's
    DataLoader: the batch needs the step number and hands back its generator's state, and stopping
    must be immediate (Pool.terminate hung here with a worker blocked on its task queue's lock)."""

    def __init__(self, trainer, workers: int, ahead: Optional[int] = None):
        import multiprocessing as mp
        global _WORKER_TRAINER
        _WORKER_TRAINER = trainer
        ctx = mp.get_context("fork")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.ahead = ahead or 2 * workers
        self.asked: set[int] = set()
        self.ready: dict[int, Any] = {}
        self.next_step = 0
        self.procs = [ctx.Process(target=_worker_loop, args=(self.tasks, self.results), daemon=True)
                      for _ in range(workers)]
        # OpenCV's thread pool does not survive a fork (a forked child waits on threads it does not
        # have: cv2.setNumThreads hangs there), so the children are forked with it at one thread, the
        # workers being the parallelism; the batches use no torch (its pool is never touched there)
        threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for p in self.procs:
                p.start()
        finally:
            cv2.setNumThreads(threads)

    def take(self, step: int, total: int):
        """The arrays and generator state of ``step``'s batch; asks for the batches after it."""
        if step not in self.asked:
            self.next_step = step
        while self.next_step < max(total, step + 1) and self.next_step < step + self.ahead:
            if self.next_step not in self.asked:
                self.tasks.put(self.next_step)
                self.asked.add(self.next_step)
            self.next_step += 1
        while step not in self.ready:
            try:
                got, payload = self.results.get(timeout=10)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"a batch worker died (exit code {dead[0]})") from None
                continue
            self.ready[got] = payload
        self.asked.discard(step)
        payload = self.ready.pop(step)
        if isinstance(payload, str):
            raise RuntimeError(f"batch of step {step}: {payload}")
        return payload

    def close(self) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.join()
        for q in (self.tasks, self.results):
            q.cancel_join_thread()
            q.close()


class Trainer:
    """One training run. ``Trainer(cfg, output).run()``; resumes from ``output/last.pth``."""

    def __init__(self, cfg: dict, output: Optional[str | Path] = None, fresh: bool = False, quiet: bool = False):
        self.cfg = cfg
        self.quiet = quiet
        t, lc = cfg["train"], cfg["loss"]
        self.stage = cfg["stage"]
        self.batch_workers: Optional[BatchWorkers] = None
        start_run(self, cfg, output)
        self.amp = (bool(t["amp"]) and self.device.type == "cuda") or \
            (bool(t["cpu_bf16"]) and self.device.type == "cpu")
        self.memory_format = torch.channels_last if t["channels_last"] else torch.contiguous_format
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

        self.net, self.arch, self.backend = build_model(cfg)
        self.net.to(self.device, memory_format=self.memory_format)
        if self.stage == "restoration":
            self._load_init(cfg["init_from"])
            self.teacher = copy.deepcopy(self.net.encoder).eval().requires_grad_(False)
            if cfg["teacher_from"]:
                self._load_teacher(cfg["teacher_from"])
        else:
            self.teacher = None
        freeze = t["freeze"]
        if freeze is None:
            freeze = ["quantize", "decoder"] if self.stage == "restoration" else []
        for name in freeze:
            mod = getattr(self.net, name, None)
            if not isinstance(mod, torch.nn.Module):
                raise ConfigError(f"train.freeze: the network has no module {name!r}")
            mod.requires_grad_(False)
        self.frozen = list(freeze)
        if self.stage == "codebook":  # the restoration-only parts get no gradient here
            for name in ("predictor", "fuse"):
                if isinstance(getattr(self.net, name, None), torch.nn.Module):
                    getattr(self.net, name).requires_grad_(False)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("every parameter is frozen: nothing to train")
        self.opt = torch.optim.Adam(self.params, lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"])
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)

        self.perc_sub = L.PerceptualSubstitute(lc["ms_ssim"], lc["lap_l1"])
        self.vgg = None
        if lc["perceptual"]:
            self.vgg = L.VGGPerceptualLoss(cfg["vgg_weights"], lc["vgg_arch"]).to(self.device)
        self.face_features = None
        if lc["face_feature"]:
            self.face_features = L.FaceFeatureLoss(cfg["face_feature_weights"]).to(self.device)
        self.disc = self.opt_d = None
        if lc["adversarial"]:
            self.disc = L.PatchDiscriminator(3, lc["disc_ndf"], lc["disc_layers"]).to(
                self.device, memory_format=self.memory_format)
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=t["disc_lr"] or t["lr"], betas=(0.5, 0.99))

        K = self.net.quantize.codebook_size
        D = self.net.quantize.emb_dim
        self.last_used = torch.zeros(K, dtype=torch.long)
        self.buffer = torch.zeros(0, D)
        self.vq_ready = self.stage == "restoration" or int(t["vq_warmup"]) == 0
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []

        self.train_images, self.eval_images = open_train_eval(cfg)
        self._prepare_eval()

        open_run_dir(self, fresh)
        (self.out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    # -- setup --------------------------------------------------------------------
    def _load_init(self, path) -> None:
        from ..restore import load_state_dict_strict, read_checkpoint
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"init_from: {path} not found (train the codebook stage first)")
        state = read_checkpoint(p, ["params_ema", "params"])
        # modules the earlier stage did not have keep their initialisation (as CodeFormer's
        # stage 2 loads the VQGAN); anything else must fit exactly
        own = self.net.state_dict()
        self.init_missing = [k for k in own if k not in state]
        if self.init_missing and not self.quiet:
            print(f"init_from {p}: {len(self.init_missing)} tensors not in the checkpoint keep their "
                  f"initialisation (e.g. {self.init_missing[0]})", file=sys.stderr)
        load_state_dict_strict(self.net, {**{k: own[k] for k in self.init_missing}, **state}, p)

    def _load_teacher(self, path) -> None:
        """The target-token encoder from another run (e.g. the codebook stage's, when
        ``init_from`` is a restoration run whose encoder has learnt degraded inputs)."""
        from ..restore import load_state_dict_strict, read_checkpoint
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"teacher_from: {path} not found")
        state = read_checkpoint(p, ["params_ema", "params"])
        sub = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        load_state_dict_strict(self.teacher, sub, p)

    def _prepare_eval(self) -> None:
        self.eval_idx = eval_indices(len(self.eval_images), self.cfg["data"]["eval_count"])
        self.eval_hq = [self.eval_images[i] for i in self.eval_idx]
        if self.stage == "restoration":
            self.eval_lq = degrade_eval(self.cfg, self.eval_hq)
        else:
            self.eval_lq = self.eval_hq

    # -- checkpoints ------------------------------------------------------------------
    def state(self) -> dict:
        return {**run_state(self), **vq_gan_state(self)}

    def save(self) -> Path:
        return save_run(self)

    def _resume(self, path: Path) -> None:
        restore_vq_gan_state(self, restore_run_state(self, path))

    # -- one step -----------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return lr_at(self.cfg["train"], step)

    def _batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tensors(*self._batch_arrays(rng))

    def _tensors(self, hq, lq) -> tuple[torch.Tensor, torch.Tensor]:
        mf = self.memory_format
        return to_tensor(hq, self.device).contiguous(memory_format=mf), to_tensor(lq, self.device).contiguous(
            memory_format=mf)

    def _batch_arrays(self, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The clean and degraded patches of one batch, drawn from ``rng`` (CPU only: workers run it)."""
        d = self.cfg["data"]
        b = self.cfg["train"]["batch"]
        idx = rng.integers(0, len(self.train_images), b)
        crop = d["crop"] or d["size"]
        hq, lq = [], []
        for i in idx:
            img = self.train_images[int(i)]
            if self.stage == "restoration":
                low = degrade_sample(self.cfg["degradation"], img, rng)
            else:
                low = img
            y, x = patch_origin(self.train_images.valid_box(int(i)), d["size"], crop, rng)
            h, l_ = img[y:y + crop, x:x + crop], low[y:y + crop, x:x + crop]
            if d["flip"] and rng.random() < 0.5:
                h, l_ = h[:, ::-1], l_[:, ::-1]
            hq.append(np.ascontiguousarray(h))
            lq.append(np.ascontiguousarray(l_))
        return hq, lq

    def _step_batch(self) -> tuple[torch.Tensor, torch.Tensor, np.random.Generator]:
        """The batch of this step and the generator the rest of the step draws from. With
        ``train.workers`` the batch comes from a BatchWorkers queue, with the generator in the state
        the batch left it: the same numbers as drawing here."""
        rng = np.random.default_rng([self.seed, self.step])
        workers = int(self.cfg["train"]["workers"])
        if not workers:
            hq, lq = self._batch(rng)
            return hq, lq, rng
        if self.batch_workers is None:
            self.batch_workers = BatchWorkers(self, workers)
        hq, lq, state = self.batch_workers.take(self.step, int(self.cfg["train"]["steps"]))
        rng.bit_generator.state = state
        return (*self._tensors(hq, lq), rng)

    def _image_losses(self, out: torch.Tensor, hq: torch.Tensor, logs: dict) -> torch.Tensor:
        lc = self.cfg["loss"]
        total = out.new_zeros(())
        if lc["l1"]:
            logs["l1"] = lc["l1"] * L.l1_loss(out, hq)
            total = total + logs["l1"]
        for k, v in self.perc_sub(out.float(), hq.float()).items():
            logs[k] = v
            total = total + v
        if self.vgg is not None:
            logs["perceptual"] = lc["perceptual"] * self.vgg(out.float(), hq.float())
            total = total + logs["perceptual"]
        if self.face_features is not None:
            logs["face_feature"] = lc["face_feature"] * self.face_features(out.float(), hq.float())
            total = total + logs["face_feature"]
        if self.disc is not None and self.step >= lc["adv_start"]:
            self.disc.requires_grad_(False)
            logs["g_adv"] = lc["adversarial"] * L.g_loss(self.disc(out), lc["gan_type"])
            total = total + logs["g_adv"]
        return total

    def _remember(self, z: torch.Tensor, rng: np.random.Generator) -> None:
        """Keep a random sample of this step's encoder outputs in the code buffer."""
        self.buffer = remember_codes(self.buffer, z, rng, int(self.cfg["train"]["code_buffer"]))

    def _codebook_step(self, hq: torch.Tensor, rng: np.random.Generator, logs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        lc, t = self.cfg["loss"], self.cfg["train"]
        net = self.net
        z, _ = net.encode_latent(hq)
        total = z.new_zeros(())
        if not self.vq_ready and self.step >= t["vq_warmup"]:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            with torch.no_grad():
                centers = kmeans(self.buffer, net.quantize.codebook_size, iters=10, generator=gen)
                net.quantize.embedding.weight.copy_(centers.to(net.quantize.embedding.weight))
            self.last_used[:] = self.step
            self.vq_ready = True
        if self.vq_ready:
            zf = z.float()
            idx = net.quantize.scores(zf).argmax(-1)
            zq = net.quantize.lookup(idx, tuple(z.shape[-2:]))
            logs["codebook"] = lc["codebook"] * L.codebook_loss(zf, zq)
            logs["commit"] = lc["commitment"] * L.commitment_loss(zf, zq)
            total = total + logs["codebook"] + logs["commit"]
            used = torch.unique(idx).cpu()
            self.last_used[used] = self.step
            logs["codes_used"] = float(used.numel())
            z_dec = z + (zq.to(z.dtype) - z).detach()
        else:
            z_dec = z
        self._remember(z, rng)
        out = net.decode_latent(z_dec)
        total = total + self._image_losses(out, hq, logs)
        return total, out

    def _restoration_step(self, hq, lq, rng, logs) -> tuple[torch.Tensor, torch.Tensor]:
        lc, t = self.cfg["loss"], self.cfg["train"]
        net = self.net
        with torch.no_grad():
            z_hq, _ = self.teacher(hq)
            gt = net.quantize.scores(z_hq.float()).argmax(-1)
            quant_gt = net.quantize.lookup(gt, tuple(z_hq.shape[-2:]))
        enc = net.encode(lq)
        total = hq.new_zeros(())
        if lc["token_ce"]:
            logs["token_ce"] = lc["token_ce"] * L.token_ce_loss(enc.logits, gt)
            total = total + logs["token_ce"]
        if lc["feat_mse"]:
            logs["feat_mse"] = lc["feat_mse"] * L.feature_mse_loss(enc.lq_feat.float(), quant_gt)
            total = total + logs["feat_mse"]
        tokens = enc.logits.argmax(-1)
        logs["token_acc"] = float((tokens == gt).float().mean())
        lo, hi = t["fidelity_range"]
        b = hq.shape[0]
        w = np.where(rng.random(b) < t["fidelity_one_prob"], 1.0, rng.uniform(lo, hi, b))
        w = torch.tensor(w, dtype=hq.dtype, device=hq.device).view(b, 1, 1, 1)
        out = net.decode(tokens, enc, w)
        total = total + self._image_losses(out, hq, logs)
        return total, out

    def train_step(self) -> dict:
        """One optimisation step (all its randomness from ``(seed, step)``); returns the losses."""
        t, lc = self.cfg["train"], self.cfg["loss"]
        hq, lq, rng = self._step_batch()
        lr = self.lr_at(self.step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.net.train()
        logs: dict[str, Any] = {}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.stage == "codebook":
                total, out = self._codebook_step(hq, rng, logs)
            else:
                total, out = self._restoration_step(hq, lq, rng, logs)
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if t["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.params, float(t["grad_clip"]))
        self.opt.step()
        if self.disc is not None and self.step >= lc["adv_start"]:
            self.disc.requires_grad_(True)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                ld = L.d_loss(self.disc(hq), self.disc(out.detach()), lc["gan_type"])
            self.opt_d.zero_grad(set_to_none=True)
            ld.backward()
            self.opt_d.step()
            logs["d_loss"] = ld
        self._update_ema()
        if self.stage == "codebook" and self.vq_ready and t["dead_code_every"] and \
                (self.step + 1) % t["dead_code_every"] == 0:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            dead = reinit_dead_codes(self.net.quantize, self.last_used, self.step, int(t["dead_code_window"]),
                                     self.buffer, gen, self.opt)
            logs["codes_reseeded"] = float(dead.numel())
        self.step += 1
        out_logs = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}
        out_logs["loss"] = float(total.detach())
        out_logs["lr"] = lr
        return out_logs

    def _update_ema(self) -> None:
        ema_update(self.ema, self.net, self.cfg["train"]["ema_decay"], self.step)

    # -- eval -------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        from ..metrics import psnr, ssim
        net = self.ema.eval()
        fids = list(self.cfg["train"]["eval_fidelity"]) if self.stage == "restoration" else [None]
        outs: dict = {f: [] for f in fids}
        codes = []
        for s in range(0, len(self.eval_lq), 4):
            x = to_tensor(self.eval_lq[s:s + 4], self.device).contiguous(memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                if self.stage == "codebook":
                    z, _ = net.encode_latent(x)
                    if self.vq_ready:
                        idx = net.quantize.scores(z.float()).argmax(-1)
                        codes.append(idx.flatten().cpu())
                        z = net.quantize.lookup(idx, tuple(z.shape[-2:]))
                    outs[None] += to_uint8(net.decode_latent(z))
                else:
                    enc = net.encode(x)
                    tokens = enc.logits.argmax(-1)
                    for f in fids:
                        outs[f] += to_uint8(net.decode(tokens, enc, float(f)))
        row: dict[str, Any] = {"step": self.step}
        if self.stage == "restoration":
            row["psnr_input"] = float(np.mean([psnr(h, l_) for h, l_ in zip(self.eval_hq, self.eval_lq)]))
            row["ssim_input"] = float(np.mean([ssim(h, l_) for h, l_ in zip(self.eval_hq, self.eval_lq)]))
        for f, imgs in outs.items():
            tag = "" if f is None else f"_w{f:g}"
            row["psnr" + tag] = float(np.mean([psnr(h, o) for h, o in zip(self.eval_hq, imgs)]))
            row["ssim" + tag] = float(np.mean([ssim(h, o) for h, o in zip(self.eval_hq, imgs)]))
        if codes:
            c = torch.bincount(torch.cat(codes), minlength=net.quantize.codebook_size).float()
            p = c / c.sum()
            row["codes_used"] = int((c > 0).sum())
            row["perplexity"] = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
        return row

    # -- loop -------------------------------------------------------------------------
    def run(self, until: Optional[int] = None) -> dict:
        """Train to ``train.steps`` (or stop early at ``until``, saving as an interruption would)."""
        try:
            return run_loop(self, until)
        finally:
            if self.batch_workers is not None:
                self.batch_workers.close()
                self.batch_workers = None


# --------------------------------------------------------------------------- export

def export_weights(checkpoint: str | Path, out: str | Path, half: bool = True) -> str:
    """Write the EMA weights of a run checkpoint as ``{"params_ema": state}``; returns its sha256."""
    from ..weights import sha256_file
    ck_path = Path(checkpoint)
    if not ck_path.is_file():
        raise InputError(f"no checkpoint at {ck_path} (train first)")
    from ..restore import load_checkpoint_file
    ck = load_checkpoint_file(ck_path)
    state = ck["params_ema"]
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"params_ema": state, "meta": {"step": int(ck["step"]), "stage": ck.get("stage"),
                                                  "arch": ck.get("arch"), "dtype": "float16" if half else "float32"}},
                 out)
    return sha256_file(out)


# --------------------------------------------------------------------------- CLI

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `frvideo train --help`)")


def train_main(argv: list[str]) -> int:
    p = _Parser(prog="frvideo train",
                description="Train a codebook face restorer (stage `codebook`, then `restoration`) from a YAML "
                            "config (see configs/train/). Running again resumes from OUTPUT/last.pth.")
    p.add_argument("config", help="training config YAML")
    p.add_argument("--output", help="run directory (default: the config's output)")
    p.add_argument("--steps", type=int, help="total steps (overrides train.steps)")
    p.add_argument("--device", help="cpu, cuda or auto (overrides train.device)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore OUTPUT/last.pth and start from step 0")
    p.add_argument("--stop-at", type=int, metavar="N",
                   help="stop (and save) after step N, keeping the schedule of train.steps; run again to go on")
    p.add_argument("--export", metavar="OUT.pth",
                   help="do not train: write the EMA weights of OUTPUT/last.pth to OUT.pth (fp16)")
    p.add_argument("--fp32", action="store_true", help="with --export: keep float32")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    overrides = list(args.set)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    cfg = load_config(args.config, overrides)
    output = Path(args.output or cfg["output"])
    if args.export:
        digest = export_weights(output / "last.pth", args.export, half=not args.fp32)
        size = Path(args.export).stat().st_size
        print(f"wrote {args.export} ({size / 1e6:.1f} MB, sha256 {digest})")
        return 0
    trainer = trainer_class(cfg)(cfg, output, fresh=args.fresh, quiet=args.quiet)
    try:
        final = trainer.run(until=args.stop_at)
    except KeyboardInterrupt:
        return 130
    except Interrupted as exc:  # saved by run_loop, which said so: not the pipeline's "no output written"
        return exc.exit_code
    print(f"done: {trainer.out / 'last.pth'} at step {trainer.step}" +
          (" - " + " ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float)) if final else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    try:
        sys.exit(train_main(sys.argv[1:]))
    except FrvideoError as exc:
        print(f"frvideo train: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
