"""Write a model's parity-filled weights as a checkpoint in the official file format.

The network is built from the model card (configs/models/<model>.yaml), checked
against the parity manifest (official key names and shapes), and filled with
``fill_state_dict(net.state_dict(), salt)`` of ../shared/parity/fill.py (salt:
the fixture folder's, 0 unless --salt). The file holds ``{KEY: state_dict}``
with KEY ``params_ema`` (default; what every official loader reads first) or
``params`` (accepted by the official VQFR and GFPGAN loaders, not CodeFormer's).

Filled weights are not trained: restored faces look like noise. The file is for
exercising the real pipeline end to end (``frvideo ... --weights FILE``) and for
checking that a checkpoint loads exactly like the parity network.

    .venv/bin/python bench/make_filled_checkpoint.py codeformer /tmp/filled/codeformer.pth
    .venv/bin/python bench/make_filled_checkpoint.py vqfr /tmp/filled/vqfr.pth --key params

The output must lie outside the repository (weights are never committed).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from frvideo.errors import ConfigError  # noqa: E402
from frvideo.models import load_model_config  # noqa: E402
from frvideo.restore import Restorer, backend_class  # noqa: E402

# (backend, arch.version) -> parity fixture folder, plugin package (when the backend is not registered)
FOLDERS = {
    ("codeformer", None): ("codeformer", "plugins.codeformer"),
    ("gfpgan", None): ("gfpgan_v1_4", "plugins.gfpgan"),
    ("vqfr", 2): ("vqfr_v2", "plugins.vqfr"),
    ("vqfr", 1): ("vqfr_v1", "plugins.vqfr"),
}
# which entries the official loader of each backend accepts
ACCEPTED_KEYS = {"codeformer": ("params_ema",), "gfpgan": ("params_ema", "params"), "vqfr": ("params_ema", "params")}


def restorer_class(backend: str, plugin: str) -> type[Restorer]:
    try:
        return backend_class(backend)
    except ConfigError:  # backend not registered (yet): the plugin package directly
        module = importlib.import_module(plugin)
        return next(c for c in vars(module).values()
                    if isinstance(c, type) and issubclass(c, Restorer) and c is not Restorer)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="model card name: codeformer, gfpgan, vqfr, vqfr-v1")
    ap.add_argument("output", type=Path, help="the .pth file to write (outside the repository)")
    ap.add_argument("--key", default="params_ema", choices=["params_ema", "params"])
    ap.add_argument("--salt", type=int, default=None, help="fill salt (default: the fixture folder's, 0)")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("FRVIDEO_SHARED", REPO.parent / "shared")))
    args = ap.parse_args()

    out = args.output.expanduser().resolve()
    if out == REPO or REPO in out.parents:
        ap.error(f"{args.output} is inside the repository ({REPO}); write weights elsewhere, e.g. /tmp/filled/")
    card = load_model_config(args.model)
    version = card.arch.get("version", 2) if card.backend == "vqfr" else None
    if (card.backend, version) not in FOLDERS:
        ap.error(f"no parity fixture for backend {card.backend!r}")
    if args.key not in ACCEPTED_KEYS[card.backend]:
        ap.error(f"the official {card.backend} loader does not read {args.key!r} "
                 f"(it reads {', '.join(ACCEPTED_KEYS[card.backend])})")
    folder_name, plugin = FOLDERS[(card.backend, version)]
    parity = args.shared / "parity"
    folder = parity / folder_name
    manifest = json.loads((folder / "manifest.json").read_text())
    salt = args.salt if args.salt is not None else json.loads((folder / "outputs.json").read_text())["salt"]

    spec = importlib.util.spec_from_file_location("parity_fill", parity / "fill.py")
    fill = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fill)

    net = restorer_class(card.backend, plugin).build_network(dict(card.arch))
    sd = net.state_dict()
    keys = manifest["keys"]
    bad = sorted(set(sd) ^ set(keys)) or [k for k in keys if list(sd[k].shape) != keys[k]["shape"]]
    if bad:
        raise SystemExit(f"{args.model}: the card's network is not the official one ({len(bad)} keys differ, "
                         f"e.g. {bad[0]})")
    filled = fill.fill_state_dict(sd, salt)
    net.load_state_dict(filled, strict=True)  # the same check the official loaders make
    # official key order, plain contiguous tensors
    state = {k: filled[k].contiguous() for k in keys}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({args.key: state}, tmp)
    os.replace(tmp, out)
    n = sum(v.numel() for v in state.values())
    print(f"{args.model}: {len(state)} tensors, {n / 1e6:.1f} M values, salt {salt}, "
          f"under {args.key!r} -> {out} ({out.stat().st_size / 2 ** 20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
