"""Architecture parity with the official networks (../shared/parity).

For every fixture folder under $FRVIDEO_PARITY_DIR (default ../shared/parity):
build our network from the manifest's constructor, check its state-dict keys
and shapes equal the manifest, load ``fill_state_dict`` weights (salt from the
folder's outputs.json, fill.py from the root) with strict=True, run the
official forward call and compare every stored output:
integer tokens exactly, images within 1e-3 * max(1, max|ref|), other float
outputs (logits, 16x16 features) within atol 1e-4 - the tolerances the parity
README states. Each backend package's ``parity`` module knows its folders.
"""
import importlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED

PARITY_DIR = Path(os.environ.get("FRVIDEO_PARITY_DIR", SHARED / "parity"))

# fixture folder -> backend package that reproduces it
FOLDER_TO_PLUGIN = {
    "codeformer": "plugins.codeformer.parity",
    "vqfr_v1": "plugins.vqfr.parity",
    "vqfr_v2": "plugins.vqfr.parity",
    "gfpgan_v1_4": "plugins.gfpgan.parity",
}


def _folders():
    if not PARITY_DIR.is_dir():
        return []
    return sorted(p.name for p in PARITY_DIR.iterdir() if (p / "manifest.json").is_file())


def _fill_module():
    spec = importlib.util.spec_from_file_location("parity_fill", PARITY_DIR / "fill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parity_fixtures_present():
    if not PARITY_DIR.is_dir():
        pytest.skip(f"parity fixtures not found at {PARITY_DIR}")
    unknown = [f for f in _folders() if f not in FOLDER_TO_PLUGIN]
    assert not unknown, f"fixture folders with no backend: {unknown}"


@pytest.mark.parametrize("folder", _folders() or ["<none>"])
def test_parity(folder):
    if folder == "<none>":
        pytest.skip(f"parity fixtures not found at {PARITY_DIR}")
    d = PARITY_DIR / folder
    manifest = json.loads((d / "manifest.json").read_text())
    salt = json.loads((d / "outputs.json").read_text())["salt"]
    adapter = importlib.import_module(FOLDER_TO_PLUGIN[folder])

    net = adapter.build_for_fixture(folder, manifest).eval()
    sd = net.state_dict()
    assert list(sd) == list(manifest["keys"]) or set(sd) == set(manifest["keys"])
    for k, v in manifest["keys"].items():
        assert list(sd[k].shape) == v["shape"], k
    net.load_state_dict(_fill_module().fill_state_dict(sd, salt), strict=True)

    x = torch.from_numpy(np.load(d / "input.npy"))
    with torch.no_grad():
        outputs = adapter.fixture_outputs(folder, net, x)

    stored = {p.stem for p in d.glob("*.npy")} - {"input"}
    assert set(outputs) == stored, f"outputs {sorted(outputs)} vs stored {sorted(stored)}"
    for name in sorted(stored):
        ref = np.load(d / f"{name}.npy")
        got = np.asarray(outputs[name])
        assert got.shape == ref.shape, name
        if ref.dtype.kind in "iu":
            assert np.array_equal(got, ref), f"{name}: {(got != ref).sum()} tokens differ"
        elif ref.ndim == 4 and ref.shape[-1] >= 256:
            tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
            err = float(np.abs(got - ref).max())
            assert err <= tol, f"{name}: max abs err {err:.3g} > {tol:.3g}"
        else:
            err = float(np.abs(got - ref).max())
            assert err <= 1e-4, f"{name}: max abs err {err:.3g} > 1e-4"
