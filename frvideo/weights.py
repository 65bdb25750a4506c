"""Weight files: find, verify and (when a network is there) download them.

Resolution order for a model card's weight file:
  1. ``--weights PATH`` (a user's own or fine-tuned checkpoint: not hash-checked,
     but loaded with a strict key match),
  2. ``$FRVIDEO_HOME/weights/<file>`` (default ``~/.cache/frvideo``),
  3. a file shipped inside the package (the project's own small checkpoints),
  4. download from the card's url into ``$FRVIDEO_HOME/weights`` with a
     progress bar and sha256 check (skipped when ``FRVIDEO_OFFLINE=1``).
Anything missing or corrupt is one ``WeightsError`` line saying which file,
where to get it and where to put it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from .errors import WeightsError
from .models import CONFIG_ROOT, ModelConfig

REPO_ROOT = CONFIG_ROOT.parent


def frvideo_home() -> Path:
    return Path(os.environ.get("FRVIDEO_HOME", Path.home() / ".cache" / "frvideo")).expanduser()


def weights_dir() -> Path:
    return frvideo_home() / "weights"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified_sha256(path: Path) -> str:
    """sha256 of a file, cached beside it by (size, mtime) so big files are hashed once."""
    st = path.stat()
    stamp = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(stamp.read_text())
        if cached["size"] == st.st_size and cached["mtime"] == st.st_mtime:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = sha256_file(path)
    try:
        stamp.write_text(json.dumps({"size": st.st_size, "mtime": st.st_mtime, "sha256": digest}))
    except OSError:
        pass  # read-only weights folder: just hash again next time
    return digest


def hash_matches(expected: Optional[str], actual: str) -> bool:
    """A short expected value is a prefix (e.g. torch-hub names carry 8 hex digits)."""
    return not expected or actual.startswith(expected.lower())


def _where_to_get(config: ModelConfig, option: str = "--weights") -> str:
    w = config.weights
    src = f"download {w.url}" if w.url else f"get {w.file}"
    return f"{src} and put it in {weights_dir()}/ (or pass {option} PATH)"


def check_file(config: ModelConfig, path: Path, option: str = "--weights") -> Path:
    w = config.weights
    digest = _verified_sha256(path)
    if not hash_matches(w.sha256, digest):
        raise WeightsError(
            f"{path} is corrupt or not the official {w.file} (sha256 {digest[:12]}…, expected {w.sha256[:12]}…); "
            f"delete it, then {_where_to_get(config, option)}")
    return path


def find_local(config: ModelConfig) -> Optional[Path]:
    """The installed weight file of a model, or None (no download, no hashing)."""
    w = config.weights
    if w is None:
        return None
    for candidate in (weights_dir() / w.file, REPO_ROOT / w.shipped if w.shipped else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def check_weights_path(explicit: str | Path, option: str = "--weights") -> Path:
    """A user's weight file: it must be a readable regular file (a FIFO would block torch.load)."""
    path = Path(explicit).expanduser()
    if not str(explicit).strip():
        raise WeightsError(f"{option}: the file name is empty")
    if not path.exists():
        raise WeightsError(f"{option} {explicit}: file not found")
    if not path.is_file():
        raise WeightsError(f"{option} {explicit}: not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise WeightsError(f"{option} {explicit}: cannot read it ({exc.strerror or exc})") from None
    return path


def resolve(config: ModelConfig, explicit: Optional[str | Path] = None, download: bool = True,
            option: str = "--weights") -> Optional[Path]:
    """Path of the weight file for ``config`` (None if the model needs none). ``option``:
    the command-line option that names an explicit file (messages tell the user to use it)."""
    if config.weights is None:
        return None
    if explicit:
        return check_weights_path(explicit, option)
    local = find_local(config)
    if local is not None:
        return check_file(config, local, option)
    offline = os.environ.get("FRVIDEO_OFFLINE", "") not in ("", "0")
    if download and not offline and config.weights.url:
        return download_weights(config, weights_dir(), option=option)
    raise WeightsError(f"model {config.name!r} needs {config.weights.file}: {_where_to_get(config, option)}")


def download_weights(config: ModelConfig, dest: Path, quiet: bool = False, option: str = "--weights") -> Path:
    """Download to ``dest`` with a progress bar; verify sha256 before the file appears."""
    w = config.weights
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / w.file
    tmp = dest / f".{w.file}.download-{os.getpid()}"
    try:
        with urllib.request.urlopen(w.url, timeout=30) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=w.file, disable=quiet) as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        digest = sha256_file(tmp)
        if not hash_matches(w.sha256, digest):
            raise WeightsError(f"downloaded {w.file} has sha256 {digest[:12]}…, expected {w.sha256[:12]}…; "
                               f"the download is corrupt, try again")
        os.replace(tmp, final)
        return final
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(f"model {config.name!r} needs {w.file} and the download failed ({reason}): "
                           f"{_where_to_get(config, option)}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_to(config: ModelConfig, dest: Path) -> Path:
    """``frvideo models fetch``: copy an installed file or download it into ``dest``."""
    if config.weights is None:
        raise WeightsError(f"model {config.name!r} has no weight file")
    local = find_local(config)
    dest.mkdir(parents=True, exist_ok=True)
    if local is not None:
        check_file(config, local)
        target = dest / config.weights.file
        if local.resolve() != target.resolve():
            shutil.copy2(local, target)
        return target
    return download_weights(config, dest)
