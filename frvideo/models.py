"""Model cards: ``configs/models/<name>.yaml`` parsed into ``ModelConfig``.

A card names the backend (entry point), the architecture arguments and the
weight file (name, download url, sha256, which checkpoint entry holds the
state dict). Detectors have cards too (``kind: detector``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import ConfigError

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
MODELS_DIR = CONFIG_ROOT / "models"
PRESETS_DIR = CONFIG_ROOT / "presets"


@dataclass(frozen=True)
class WeightSpec:
    file: str
    url: Optional[str] = None
    sha256: Optional[str] = None
    param_keys: list[str] = field(default_factory=lambda: ["params_ema", "params"])
    shipped: Optional[str] = None  # path relative to the repo root of a file shipped in the package
    license: Optional[str] = None


@dataclass(frozen=True)
class ModelConfig:
    name: str
    backend: str
    kind: str = "restorer"  # or "detector"
    description: str = ""
    arch: dict[str, Any] = field(default_factory=dict)
    weights: Optional[WeightSpec] = None
    defaults: dict[str, Any] = field(default_factory=dict)
    priority: int = 0  # for --model/--detector auto: higher is preferred
    # int8 graphs of the shipped weights (--precision int8; frvideo.nn.int8): file paths relative
    # to the repo root, their sha256, the sha256 of the checkpoint they were built from
    int8: dict[str, Any] = field(default_factory=dict)


MAX_CONFIG_BYTES = 1 << 20  # a config or model card is a few lines; anything huge is a mistake


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file")
    if not path.is_file():  # a FIFO or device would block or never end
        raise ConfigError(f"config {path} is not a regular file")
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is too large for a YAML file of options "
                              f"({path.stat().st_size} bytes)")
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if b"\0" in raw:
        raise ConfigError(f"config {path} is a binary file, not YAML")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"config {path} is nested too deeply") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at top level")
    return data


def load_model_config(name: str) -> ModelConfig:
    path = MODELS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model {name!r} (known: {', '.join(model_names())})")
    return parse_model_config(_read_yaml(path), path)


def parse_model_config(data: dict, source: Path | str) -> ModelConfig:
    try:
        w = data.get("weights")
        weights = None
        if w is not None:
            keys = w.get("param_key", ["params_ema", "params"])
            weights = WeightSpec(
                file=w["file"], url=w.get("url"), sha256=w.get("sha256"),
                param_keys=[keys] if isinstance(keys, str) else list(keys),
                shipped=w.get("shipped"), license=w.get("license"),
            )
        return ModelConfig(
            name=data["name"], backend=data.get("backend", data["name"]), kind=data.get("kind", "restorer"),
            description=data.get("description", ""), arch=dict(data.get("arch") or {}), weights=weights,
            defaults=dict(data.get("defaults") or {}), priority=int(data.get("priority", 0)),
            int8=dict(data.get("int8") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: bad model card ({type(exc).__name__}: {exc})") from None


def model_names(kind: Optional[str] = None) -> list[str]:
    names = []
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        if kind is None or _read_yaml(path).get("kind", "restorer") == kind:
            names.append(path.stem)
    return names


def all_model_configs(kind: Optional[str] = None) -> list[ModelConfig]:
    return [load_model_config(n) for n in model_names(kind)]


def load_preset(name_or_path: str) -> dict:
    """A preset name from configs/presets/ or a path to a YAML file of CLI options."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PRESETS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(p.stem for p in sorted(PRESETS_DIR.glob("*.yaml")))
            raise ConfigError(f"no preset or config file {name_or_path!r} (presets: {known})")
    return _read_yaml(path)


# Backends by name. Kept here, not in restore.py, so that listing models (`frvideo models`)
# needs no torch.
ENTRY_POINT_GROUP = "frvideo.restorers"

# Used when the package is run from a source tree without being installed
# (entry points only exist for installed distributions).
_BUILTIN_BACKENDS = {
    "none": "plugins.none:NoneRestorer",
    "codeformer": "plugins.codeformer:CodeFormerRestorer",
    "gfpgan": "plugins.gfpgan:GFPGANRestorer",
    "vqfr": "plugins.vqfr:VQFRRestorer",
    "lite": "plugins.lite:LiteRestorer",
    "ldbfr": "plugins.ldbfr:LDBFRRestorer",
    "ented": "plugins.ented:EntedRestorer",
}


def registered(group: str, builtins: dict[str, str]) -> dict[str, str]:
    """Name -> 'module:Class' of a plugin registry: the built-ins (a source tree that is not
    installed has no entry points) overridden by the installed entry points of ``group``."""
    found = dict(builtins)
    for ep in metadata.entry_points(group=group):
        found[ep.name] = ep.value
    return found


def registered_class(group: str, builtins: dict[str, str], name: str, base: type, what: str) -> type:
    """The class registered as ``name``, checked to be a subclass of ``base``."""
    import importlib

    known = registered(group, builtins)
    target = known.get(name)
    if target is None:
        raise ConfigError(f"no {what} backend {name!r} is installed (installed: {', '.join(sorted(known))})")
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"entry point {name!r} -> {target} is not a frvideo {base.__name__}")
    return cls


def backend_entry_points() -> dict[str, str]:
    """Restorer backend name -> 'module:Class'."""
    return registered(ENTRY_POINT_GROUP, _BUILTIN_BACKENDS)
