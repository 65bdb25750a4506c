"""The restoration backend contract and the registry of backends.

A backend turns aligned faces (B x 3 x S x S, RGB, [-1, 1], S = ``input_size``)
into restored faces of the same shape. Backends built on a codebook expose the
encode/decode split the temporal smoother needs (see DESIGN.md):

* ``encode(faces, ctx) -> Encoded`` with ``scores``: B x N_tokens x K codebook
  scores (higher = better: logits, or negative squared distances).
* ``decode(encoded, tokens, ctx) -> faces`` from chosen token indices (B x N).
* ``restore(faces, ctx)`` = decode(encode(...), argmax) for one-shot use.

Backends without a codebook (GFPGAN, ``none``) set ``codebook_size = None`` and
override ``restore`` only; the pipeline then skips token smoothing.

Backends are found through the entry-point group ``frvideo.restorers`` (name ->
``module:Class``); the built-ins live in ``plugins/`` and are registered in
pyproject.toml. A model is a YAML file ``configs/models/<name>.yaml`` naming its
backend, architecture arguments and weight file.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch

from .errors import ConfigError, UsageError, WeightsError
from .models import ModelConfig

@dataclass
class RestoreContext:
    """Per-face side information for one batch (all lists have length B)."""

    track_ids: list[int] = field(default_factory=list)
    frame_indices: list[int] = field(default_factory=list)
    fidelity: Optional[float] = None  # None: the model's own default
    references: Optional[torch.Tensor] = None  # B x 3 x S x S, reference-based backends
    # one hashable id per reference (same id = same image): lets a backend cache reference features
    reference_ids: Optional[list] = None
    noise_seeds: Optional[list[int]] = None  # stochastic backends: one seed per face (locked per track)
    steps: Optional[int] = None  # diffusion backends: sampling steps (None: the model card's default)

    @classmethod
    def single(cls, batch_size: int, fidelity: Optional[float] = None) -> "RestoreContext":
        return cls(list(range(batch_size)), [0] * batch_size, fidelity)


@dataclass
class Encoded:
    """What ``encode`` returns: codebook scores plus whatever ``decode`` needs."""

    scores: torch.Tensor  # B x N_tokens x K, float
    state: dict[str, Any] = field(default_factory=dict)


# --precision int8: not a dtype the torch network runs in but the marker that selects a backend's
# int8 ONNX Runtime graphs (frvideo.nn.int8); backends with a card ``int8`` entry handle it in ``to``
INT8 = torch.qint8


def precision_name(dtype: torch.dtype) -> str:
    """How --precision names ``dtype``: fp32, bf16, fp16, int8."""
    return "int8" if dtype == INT8 else {torch.float32: "fp32", torch.bfloat16: "bf16",
                                         torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))


def int8_hint() -> str:
    from .models import all_model_configs
    names = [c.name for c in all_model_configs("restorer") if c.int8]
    return f"models with int8 graphs: {', '.join(names) or 'none'}; use --precision fp32 or bf16"


class Restorer:
    """Base class of every backend. Wraps one ``torch.nn.Module`` (``self.net``)."""

    name: ClassVar[str] = "?"
    input_size: ClassVar[int] = 512
    codebook_size: ClassVar[Optional[int]] = None  # K; None = no token interface
    needs_reference: ClassVar[bool] = False
    # True: a sampler that draws noise (LD-BFR): honours ctx.steps / ctx.noise_seeds and checks the
    # step count in sampling_steps
    stochastic: ClassVar[bool] = False
    # False: used only when asked for by name, never by ``--model auto`` (e.g. a shipped model
    # that measures below ``lite``)
    auto_select: ClassVar[bool] = True
    # training stages the backend implements itself (``frvideo train`` with ``stage: NAME``):
    # NAME -> 'module:Class' (see frvideo.train.trainer.backend_stages)
    train_stages: ClassVar[dict[str, str]] = {}

    def __init__(self, net: torch.nn.Module, config: ModelConfig):
        self.net = net.eval()
        self.config = config

    # -- construction ---------------------------------------------------------
    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def from_checkpoint(cls, config: ModelConfig, weights: Optional[Path]) -> "Restorer":
        net = cls.build_network(dict(config.arch))
        if config.weights is not None:
            if weights is None:
                raise WeightsError(f"model {config.name!r} needs weights but none were resolved")
            state = read_checkpoint(weights, config.weights.param_keys)
            load_state_dict_strict(net, state, weights)
        return cls(net, config)

    # -- device / precision -----------------------------------------------------
    @property
    def max_strength(self) -> float:
        """The auto strength of a fully degraded face (the card's ``defaults: max_strength``)."""
        return float(self.config.defaults.get("max_strength", 1.0))

    @property
    def cpu_batch_size(self) -> Optional[int]:
        """Faces per model call on a CPU when --batch-size is not given (the card's ``defaults:
        cpu_batch_size``; None: the pipeline's default)."""
        value = self.config.defaults.get("cpu_batch_size")
        return int(value) if value else None

    @property
    def device(self) -> torch.device:
        p = next(self.net.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.net.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "Restorer":
        if dtype == INT8:
            raise UsageError(f"--precision int8 is not available for {self.name}: {int8_hint()}")
        self.net.to(device=device, dtype=dtype)
        return self

    # -- the contract ---------------------------------------------------------
    @property
    def has_codebook(self) -> bool:
        return self.codebook_size is not None

    def encode(self, faces: torch.Tensor, ctx: RestoreContext) -> Encoded:
        raise NotImplementedError(f"{self.name} has no codebook interface")

    def decode(self, encoded: Encoded, tokens: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no codebook interface")

    def sampling_steps(self, ctx: Optional[RestoreContext]) -> int:
        """Stochastic backends: the step count for ``ctx`` (its ``steps`` or the card's default),
        a ConfigError if out of range. Called by the CLI before any frame is read."""
        raise NotImplementedError(f"{self.name} does not sample")

    @torch.no_grad()
    def restore(self, faces: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        enc = self.encode(faces, ctx)
        return self.decode(enc, enc.scores.argmax(-1), ctx)


# -- checkpoints -------------------------------------------------------------------

def _check_zip_integrity(path: Path) -> None:
    """A torch zip checkpoint carries a CRC-32 per entry that torch.load never checks: a flipped
    byte in a tensor loads as a wrong weight. Check them (a second read of the file, at disk speed)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # the legacy pickle format has no checksums
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise WeightsError(f"weight file {path} is corrupt ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    if bad is not None:
        raise WeightsError(f"weight file {path} is corrupt: checksum mismatch in {bad}; "
                           f"download or copy it again")


def reject_non_finite(obj: Any, path: Path | str, where: str = "") -> None:
    """WeightsError if any floating-point tensor in a loaded checkpoint holds NaN or inf
    (a corrupt file, or a training run that diverged): nothing is restored from such weights."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and obj.numel() and not bool(torch.isfinite(obj).all()):
            bad = int((~torch.isfinite(obj)).sum())
            raise WeightsError(f"weight file {path} holds non-finite values ({bad} NaN/inf in {where or 'a tensor'}); "
                               f"it is corrupt or from a diverged training run")
    elif isinstance(obj, dict):
        for key, value in obj.items():
            reject_non_finite(value, path, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            reject_non_finite(value, path, f"{where}[{i}]")


def load_checkpoint_file(path: Path | str) -> Any:
    """torch.load (weights only: no pickle code runs) with the checks every checkpoint gets:
    zip checksums, readable, and no NaN/inf in any tensor. Any failure is one WeightsError."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weight file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"weight file {path} is not a regular file")
    _check_zip_integrity(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weight file not found: {path}") from None
    except Exception as exc:  # corrupt zip, pickle error, truncated file
        raise WeightsError(f"cannot read weight file {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    reject_non_finite(ckpt, path)
    return ckpt


def read_checkpoint(path: Path, param_keys: list[str]) -> dict[str, torch.Tensor]:
    """Load a .pth file and pick the state dict the way the official loaders do.

    ``param_keys`` is tried in order (e.g. ['params_ema', 'params']); a file that
    is itself a flat state dict is accepted as is.
    """
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    for key in param_keys:
        if key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise WeightsError(
        f"{path} has none of the entries {param_keys} (found: {', '.join(map(str, list(ckpt)[:5]))})"
    )


def load_state_dict_strict(net: torch.nn.Module, state: dict, source: Path | str) -> None:
    """Strict load with a one-line summary of what does not fit."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise WeightsError(f"{source} does not fit this architecture: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


# -- registry ----------------------------------------------------------------------

def backend_class(backend: str) -> type[Restorer]:
    from .models import ENTRY_POINT_GROUP, _BUILTIN_BACKENDS, registered_class
    return registered_class(ENTRY_POINT_GROUP, _BUILTIN_BACKENDS, backend, Restorer, "restorer")


def load_restorer(name: str, weights=None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> Restorer:
    """Build a backend from its model card, with resolved and verified weights."""
    from .models import load_model_config
    from .weights import resolve

    config = load_model_config(name)
    if config.kind != "restorer":
        raise ConfigError(f"{name!r} is a {config.kind}, not a restoration model")
    cls = backend_class(config.backend)
    path = resolve(config, weights)
    return cls.from_checkpoint(config, path).to(device, dtype)


def _opt_in(backend: str) -> bool:
    """Backends that declare ``auto_select = False`` (ENTED, LD-BFR) run only when named."""
    try:
        return not backend_class(backend).auto_select
    except Exception:  # a broken or missing plugin: loading it will report the real error
        return False


def auto_model_name() -> str:
    """``--model auto``: the highest-priority restorer whose weights are installed."""
    from .models import all_model_configs
    from .weights import find_local, weights_dir

    cards = sorted((c for c in all_model_configs("restorer") if c.weights is not None), key=lambda c: -c.priority)
    for c in cards:
        if find_local(c) is not None and not _opt_in(c.backend):
            return c.name
    files = ", ".join(c.weights.file for c in cards)
    raise WeightsError(f"no restoration model weights found; put one of {files or '(none configured)'} in "
                       f"{weights_dir()}/ (`frvideo models` says where to get them) or use --model none")
