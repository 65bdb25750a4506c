"""Face detectors: RetinaFace (facexlib weights, own implementation) and YuNet.

Tests marked by ``need`` use the real weights and images from ../shared and
skip without them; the ResNet-50 layout and the error tests run anywhere.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from frvideo.errors import WeightsError
from frvideo.faces.detect import Detections
from frvideo.faces.retinaface import RetinaFace, RetinaFaceDetector, nms, prior_boxes

from conftest import MEDIA, WEIGHTS, need

cv2 = pytest.importorskip("cv2")

MOBILE = WEIGHTS / "detection_mobilenet0.25_Final.pth"
YUNET = WEIGHTS / "face_detection_yunet_2023mar.onnx"
IMAGES = MEDIA / "images" / "whole"

# Faces in ../shared/media/images/whole at the default settings (max_size 640),
# checked by drawing the detections: obama_and_biden.jpg has a third face (the
# girl at the bottom right); 10045.png a fourth, false one (a newel-post knob)
# that both detectors only report at full resolution and low thresholds.
EXPECTED_FACES = {
    "00.jpg": 2, "01.jpg": 4, "02.png": 4, "03.jpg": 1, "04.jpg": 1, "05.jpg": 1, "06.png": 2,
    "10045.png": 3, "Blake_Lively.jpg": 2, "obama_and_biden.jpg": 3, "two_people.jpg": 2,
}


def _rgb(path):
    bgr = cv2.imread(str(path))
    assert bgr is not None, path
    return np.ascontiguousarray(bgr[..., ::-1])


@pytest.fixture(scope="module")
def images():
    need(IMAGES, "../shared/media/images/whole")
    return {p.name: _rgb(p) for p in sorted(IMAGES.iterdir()) if p.suffix.lower() in (".jpg", ".png")}


@pytest.fixture(scope="module")
def retina():
    return RetinaFaceDetector(need(MOBILE, "RetinaFace MobileNet weights"))


@pytest.fixture(scope="module")
def yunet():
    from frvideo.faces.yunet import YuNetDetector

    return YuNetDetector(need(YUNET, "YuNet weights"))


@pytest.fixture(scope="module")
def found(images, retina, yunet):
    return {name: (retina.detect(im), yunet.detect(im)) for name, im in images.items()}


def _match(a: Detections, b: Detections) -> list[tuple[int, int]]:
    """Pairs of faces whose box centres are within a quarter of the box width."""
    pairs = []
    for i in range(len(a)):
        ca = (a.boxes[i, :2] + a.boxes[i, 2:]) / 2
        cb = (b.boxes[:, :2] + b.boxes[:, 2:]) / 2
        d = np.linalg.norm(cb - ca, axis=1)
        if len(d) and d.min() < 0.25 * (a.boxes[i, 2] - a.boxes[i, 0]):
            pairs.append((i, int(d.argmin())))
    return pairs


# ---------------------------------------------------------------- real weights

def test_mobilenet_file_loads_strict_and_unchanged():
    state = torch.load(need(MOBILE, "RetinaFace MobileNet weights"), map_location="cpu", weights_only=True)
    net = RetinaFace("mobilenet0.25")
    net.load_state_dict(state, strict=True)
    assert net.state_dict().keys() == state.keys()


def test_module_prefix_is_dropped(tmp_path):
    state = torch.load(need(MOBILE, "RetinaFace MobileNet weights"), map_location="cpu", weights_only=True)
    path = tmp_path / "dp.pth"
    torch.save({"module." + k: v for k, v in state.items()}, path)
    det = RetinaFaceDetector(path)
    assert torch.equal(det.net.state_dict()["ClassHead.0.conv1x1.weight"], state["ClassHead.0.conv1x1.weight"])


def test_face_counts(found):
    counts = {name: (len(r), len(y)) for name, (r, y) in found.items()}
    for name, n in EXPECTED_FACES.items():
        if name in counts:
            assert counts[name] == (n, n), (name, counts[name])
    assert all(r > 0 and y > 0 for r, y in counts.values()), counts


def test_outputs_well_formed(found):
    for name, dets in found.items():
        for d in dets:
            assert d.boxes.dtype == d.landmarks.dtype == d.scores.dtype == np.float32
            assert d.boxes.shape == (len(d), 4) and d.landmarks.shape == (len(d), 5, 2)
            assert np.all(d.boxes[:, 2] > d.boxes[:, 0]) and np.all(d.boxes[:, 3] > d.boxes[:, 1])
            assert np.all(np.diff(d.scores) <= 0), "sorted best first"
            assert np.all((d.scores > 0.8) & (d.scores <= 1))


def test_detectors_agree(found):
    """Same faces; landmarks within a few % of the face width (the two models
    place eye centres and mouth corners slightly differently: ~4 % on average)."""
    rel = []
    for name, (r, y) in found.items():
        pairs = _match(r, y)
        assert len(pairs) == len(r) == len(y), name
        for i, j in pairs:
            width = r.boxes[i, 2] - r.boxes[i, 0]
            d = np.linalg.norm(r.landmarks[i] - y.landmarks[j], axis=1).mean() / width
            assert d < 0.10, (name, i, d)
            rel.append(d)
    assert np.mean(rel) < 0.06, np.mean(rel)


def test_landmark_order(found):
    """Viewer-left eye first, then the other eye, nose, viewer-left mouth corner
    (all faces in the test images are roughly frontal and upright)."""
    for name, dets in found.items():
        for d in dets:
            lm = d.landmarks
            assert np.all(lm[:, 0, 0] < lm[:, 1, 0]), name
            assert np.all(lm[:, 3, 0] < lm[:, 4, 0]), name
            eyes_y = lm[:, :2, 1].mean(1)
            assert np.all(eyes_y < lm[:, 2, 1]) and np.all(lm[:, 2, 1] < lm[:, 3:, 1].mean(1)), name
            inside = (lm >= d.boxes[:, None, :2] - 2) & (lm <= d.boxes[:, None, 2:] + 2)
            assert inside.all(), name


def test_batch_equals_single(images, retina):
    base = images.get("two_people.jpg")
    if base is None:
        pytest.skip("two_people.jpg not in ../shared/media/images/whole")
    frames = [base, np.ascontiguousarray(base[:, ::-1]), np.roll(base, 37, axis=1), images["04.jpg"]]
    batch = retina.detect_batch(frames)
    assert len(batch) == len(frames)
    for frame, got in zip(frames, batch):
        want = retina.detect(frame)
        assert len(got) == len(want) > 0
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-2)
        np.testing.assert_allclose(got.landmarks, want.landmarks, atol=1e-2)
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4)


def test_max_size_keeps_coordinates(images, retina):
    """Shrinking before detection maps results back to full-size pixels: no
    offset, only the noise of the lower resolution (faces of ~50 px at 640)."""
    im = images.get("obama_and_biden.jpg")
    if im is None:
        pytest.skip("obama_and_biden.jpg not in ../shared/media/images/whole")
    full = RetinaFaceDetector(MOBILE, max_size=None).detect(im)
    small = retina.detect(im)
    pairs = _match(full, small)
    assert len(pairs) == len(small) == 3
    signed = []
    for i, j in pairs:
        width = full.boxes[i, 2] - full.boxes[i, 0]
        diff = (small.landmarks[j] - full.landmarks[i]) / width
        assert np.linalg.norm(diff, axis=1).mean() < 0.08
        signed.append(diff)
    assert np.all(np.abs(np.mean(signed, axis=(0, 1))) < 0.02), "systematic offset after rescaling"


def test_no_faces(retina, yunet):
    blank = np.full((240, 320, 3), 128, np.uint8)
    for det in (retina, yunet):
        d = det.detect(blank)
        assert len(d) == 0 and d.boxes.shape == (0, 4) and d.landmarks.shape == (0, 5, 2)


def test_wrong_weights_raise_weights_error(tmp_path):
    need(WEIGHTS, "../shared/weights")
    from frvideo.faces.yunet import YuNetDetector

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    cases = [
        lambda: RetinaFaceDetector(tmp_path / "missing.pth"),
        lambda: RetinaFaceDetector(junk),
        lambda: RetinaFaceDetector(YUNET),
        lambda: RetinaFaceDetector(MOBILE, backbone="resnet50"),
        lambda: YuNetDetector(tmp_path / "missing.onnx"),
        lambda: YuNetDetector(junk),
        lambda: YuNetDetector(MOBILE),
    ]
    for make in cases:
        with pytest.raises(WeightsError) as info:
            make()
        assert "\n" not in str(info.value)


# ------------------------------------------------------- no shared files needed

def _torchvision_resnet50_body() -> dict[str, tuple]:
    """Keys and shapes torchvision's resnet50 has inside facexlib's ``body``
    (IntermediateLayerGetter up to layer4: no avgpool/fc), derived from
    torchvision's definition: Bottleneck blocks (3, 4, 6, 3), width 64/128/256/512,
    expansion 4, 1x1 -> 3x3 -> 1x1 convs, ``downsample`` = (1x1 conv, BN) on each
    layer's first block."""
    keys: dict[str, tuple] = {}

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{name}.{p}"] = (c,)
        keys[f"{name}.num_batches_tracked"] = ()

    keys["body.conv1.weight"] = (64, 3, 7, 7)
    bn("body.bn1", 64)
    cin = 64
    for li, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for b in range(blocks):
            pre = f"body.layer{li}.{b}"
            keys[f"{pre}.conv1.weight"] = (planes, cin, 1, 1)
            bn(f"{pre}.bn1", planes)
            keys[f"{pre}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{pre}.bn2", planes)
            keys[f"{pre}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{pre}.bn3", planes * 4)
            if b == 0:
                keys[f"{pre}.downsample.0.weight"] = (planes * 4, cin, 1, 1)
                bn(f"{pre}.downsample.1", planes * 4)
            cin = planes * 4
    return keys


def test_resnet50_key_layout():
    """detection_Resnet50_Final.pth (not available here) must load: the body
    matches torchvision's resnet50 names, the rest matches the MobileNet model's
    names at width 256 (cfg_re50: in_channel 256, out_channel 256)."""
    own = {k: tuple(v.shape) for k, v in RetinaFace("resnet50").state_dict().items()}
    body = {k: v for k, v in own.items() if k.startswith("body.")}
    assert body == _torchvision_resnet50_body()
    # torchvision resnet50 has 25,557,032 parameters, of which fc holds 2048*1000+1000
    n_body = sum(p.numel() for n, p in RetinaFace("resnet50").named_parameters() if n.startswith("body."))
    assert n_body == 25_557_032 - 2_049_000

    mobile = {k: tuple(v.shape) for k, v in RetinaFace("mobilenet0.25").state_dict().items()}
    rest = {k: v for k, v in own.items() if not k.startswith("body.")}
    assert rest.keys() == {k for k in mobile if not k.startswith("body.")}
    assert rest["fpn.output1.0.weight"] == (256, 512, 1, 1)
    assert rest["fpn.output2.0.weight"] == (256, 1024, 1, 1)
    assert rest["fpn.output3.0.weight"] == (256, 2048, 1, 1)
    assert rest["ssh1.conv3X3.0.weight"] == (128, 256, 3, 3)
    assert rest["ssh3.conv7x7_3.0.weight"] == (64, 64, 3, 3)
    for i in range(3):
        assert rest[f"ClassHead.{i}.conv1x1.weight"] == (4, 256, 1, 1)
        assert rest[f"BboxHead.{i}.conv1x1.weight"] == (8, 256, 1, 1)
        assert rest[f"LandmarkHead.{i}.conv1x1.weight"] == (20, 256, 1, 1)


def test_mobilenet_layout_without_file():
    """The MobileNet model has facexlib's 300 state-dict entries (no fc/avg)."""
    sd = RetinaFace("mobilenet0.25").state_dict()
    assert len(sd) == 300
    assert tuple(sd["body.stage1.0.0.weight"].shape) == (8, 3, 3, 3)
    assert tuple(sd["body.stage3.1.3.weight"].shape) == (256, 256, 1, 1)
    assert not any(k.startswith(("body.fc", "body.avg")) for k in sd)


@pytest.mark.parametrize("backbone", ["mobilenet0.25", "resnet50"])
def test_heads_match_priors(backbone):
    """One prediction per prior, for sizes that are not multiples of 32."""
    net = RetinaFace(backbone).eval()
    with torch.no_grad():
        loc, prob, ldm = net(torch.zeros(2, 3, 70, 100))
    n = len(prior_boxes(70, 100))
    assert loc.shape == (2, n, 4) and prob.shape == (2, n) and ldm.shape == (2, n, 10)


def test_prior_boxes_match_facexlib_formula():
    """facexlib's PriorBox: per level (steps 8/16/32), rows then columns then the
    two min sizes; centres at (j + 0.5) * step, ceil(size / step) cells."""
    h, w = 50, 70
    pri = prior_boxes(h, w)
    expect = []
    for step, sizes in zip((8, 16, 32), ((16, 32), (64, 128), (256, 512))):
        for i in range(-(-h // step)):
            for j in range(-(-w // step)):
                for s in sizes:
                    expect.append([(j + 0.5) * step, (i + 0.5) * step, s, s])
    np.testing.assert_allclose(pri, np.asarray(expect, np.float32))


def test_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], np.float32)
    scores = np.array([0.9, 0.95, 0.8, 0.85], np.float32)
    # IoU(0,1) = 81/119 = 0.68 -> 0 dropped; IoU(1,3) = 36/114 = 0.32, IoU(0,3) irrelevant
    assert nms(boxes, scores, 0.4).tolist() == [1, 3, 2]
    assert nms(boxes, scores, 0.3).tolist() == [1, 2]
    assert nms(boxes[:0], scores[:0], 0.4).tolist() == []


def test_batchnorm_folding_keeps_the_network_outputs():
    from frvideo.faces.embedded import SHIPPED_WEIGHTS, load_embedded_net
    from frvideo.nn.fuse import fuse_conv_batchnorm
    x = torch.randn(1, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = load_embedded_net(SHIPPED_WEIGHTS)[0](x)
        fused_net = fuse_conv_batchnorm(load_embedded_net(SHIPPED_WEIGHTS)[0])
        out = fused_net(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused_net.modules())
    for a, b in zip(ref, out):
        assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="eval"):
        fuse_conv_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3)))
