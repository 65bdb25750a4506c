"""The shipped ``lite`` restorer: loads through its card, honours the token
contract, and restores a degraded real face."""
import cv2
import numpy as np
import pytest
import torch

from frvideo.metrics import psnr
from frvideo.models import load_model_config
from frvideo.restore import RestoreContext, load_restorer
from frvideo.train.degradation import DegradationParams, degrade
from frvideo.weights import REPO_ROOT, sha256_file

from conftest import MEDIA, WEIGHTS, need


@pytest.fixture(scope="module")
def lite():
    return load_restorer("lite")  # card -> shipped file (sha256-checked) -> strict load


def test_card_and_shipped_file():
    card = load_model_config("lite")
    assert card.backend == "lite" and card.weights.url is None
    path = REPO_ROOT / card.weights.shipped
    assert path.is_file() and path.stat().st_size <= 20 * 1024 * 1024
    assert sha256_file(path) == card.weights.sha256
    # lowest priority of the restorers: official models win under --model auto
    from frvideo.models import all_model_configs
    others = [c.priority for c in all_model_configs("restorer") if c.name not in ("lite", "none")]
    assert all(card.priority < p for p in others)


def test_token_contract(lite):
    s = lite.input_size
    x = torch.rand(2, 3, s, s) * 2 - 1
    ctx = RestoreContext.single(2)
    enc = lite.encode(x, ctx)
    n = (s // lite.net.compression) ** 2
    assert enc.scores.shape == (2, n, lite.codebook_size) and enc.scores.dtype == torch.float32
    out = lite.decode(enc, enc.scores.argmax(-1), ctx)
    assert out.shape == x.shape
    assert torch.equal(out, lite.restore(x, ctx))
    # the fidelity weight changes the output; other tokens change it too
    assert not torch.allclose(out, lite.restore(x, RestoreContext.single(2, fidelity=0.0)))
    assert not torch.allclose(out, lite.decode(enc, torch.zeros_like(enc.scores[..., 0], dtype=torch.long), ctx))


def _real_face(size: int) -> np.ndarray:
    """An aligned face crop from a real clip (the middle frame of an eval clip)."""
    import av

    from frvideo.faces.align import similarity_transforms, warp_faces
    from frvideo.faces.detect import load_detector
    clip = need(MEDIA / "videos" / "eval" / "retalk_1.mp4", "../shared/media")
    weights = need(WEIGHTS / "detection_mobilenet0.25_Final.pth", "../shared/weights")
    with av.open(str(clip)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i == 60:
                frame = f.to_ndarray(format="rgb24")
                break
    det = load_detector("retinaface-mobile", weights=weights).detect(frame)
    assert len(det) >= 1
    crop = warp_faces(frame, similarity_transforms(det.landmarks[:1], 512), 512)[0]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def test_restores_a_degraded_real_face(lite):
    clean = _real_face(lite.input_size)
    params = DegradationParams(sigma=3.0, scale=4.0, noise=8.0, jpeg=70)
    low = degrade(clean, params, np.random.default_rng(0))
    x = torch.from_numpy(low).permute(2, 0, 1)[None].float() / 127.5 - 1
    y = lite.restore(x, RestoreContext.single(1))
    out = ((y[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
    assert psnr(clean, out) > psnr(clean, low) + 0.3, (psnr(clean, out), psnr(clean, low))
