"""Never make a face worse: exact pass-through, unbroken tracks, the detail-keeping blend,
the faces file and the identity metric."""
import json
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import torch

from conftest import MEDIA, FixedFaceDetector, need
from frvideo.faces.detail import BlendSettings, FaceBlend
from frvideo.faces.detect import Detections, FaceDetector
from frvideo.io.frames import add_rgb_deltas, to_rgb
from frvideo.pipeline import FacePipeline, PipelineOptions
from frvideo.restore import load_restorer


def _frames(images, pix_fmt="rgb24"):
    out = []
    for i, img in enumerate(images):
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        if pix_fmt != "rgb24":
            f = f.reformat(format=pix_fmt)
        f.pts, f.time_base = i, Fraction(1, 25)
        out.append(f)
    return out


def _samples(frame):
    """Every plane's visible samples as bytes (line padding aside)."""
    out = []
    for i, p in enumerate(frame.planes):
        comps = [c for c in frame.format.components if c.plane == i]
        nbytes = p.width * len(comps) * ((max(c.bits for c in comps) + 7) // 8)
        out.append(np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :nbytes].tobytes())
    return out


def _textured(n, w=160, h=128, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([120 + 50 * np.sin(xx / 5.0), 120 + 50 * np.cos(yy / 4.0), 90 + 40 * np.sin((xx + yy) / 6)], -1)
    return [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(n)]


class _Texture:
    """Test double: a restorer that draws a fixed fine texture on the face (a visible change the
    blend keeps: more detail than the input has, in the colours the input has)."""

    name, input_size, has_codebook, needs_reference, stochastic = "texture", 64, False, False, False
    device, dtype, max_strength = torch.device("cpu"), torch.float32, 1.0

    def restore(self, faces, ctx):
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        return (faces + 0.3 * torch.sin(xx * 1.6) * torch.sin(yy * 1.6)).clamp(-1, 1)


def _run(restorer, frames, detector, **options):
    pipe = FacePipeline(restorer, detector, PipelineOptions(quiet=True, min_face=0, **options))
    return list(pipe.process(frames)), pipe


# -- exact pass-through -------------------------------------------------------------------

@pytest.mark.parametrize("pix_fmt", ["yuv420p", "yuv422p10le", "yuv444p", "rgb24", "gray"])
def test_identity_restorer_gives_every_frame_back_bit_exact(pix_fmt):
    frames = _frames(_textured(8), pix_fmt)
    for temporal in ("off", "full"):
        out, pipe = _run(load_restorer("none"), frames, FixedFaceDetector(range(8), box=(40, 20, 110, 100)),
                         temporal=temporal)
        assert pipe.stats.faces == 8 and pipe.stats.faces_changed == 0
        assert [f.pts for f in out] == [f.pts for f in frames]
        assert all(_samples(a) == _samples(b) for a, b in zip(out, frames)), temporal


def test_model_none_cli_output_equals_decoded_input(tmp_path, home_with_detectors):
    from frvideo.cli import main
    src = need(MEDIA / "videos" / "eval" / "retalk_2.mp4", "eval clip retalk_2")
    # 10 frames into a lossless file, then through `--model none` into another lossless file
    short = tmp_path / "short.mkv"
    with av.open(str(src)) as inp, av.open(str(short), "w") as out:
        s = out.add_stream("ffv1", rate=25)
        s.width, s.height, s.pix_fmt = inp.streams.video[0].width, inp.streams.video[0].height, "yuv420p"
        for i, f in enumerate(inp.decode(video=0)):
            if i == 10:
                break
            f.pts = None
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    dst = tmp_path / "none.mkv"
    assert main([str(short), str(dst), "--model", "none", "--detector", "retinaface-mobile", "-q"]) == 0
    with av.open(str(short)) as a, av.open(str(dst)) as b:
        pairs = list(zip(a.decode(video=0), b.decode(video=0)))
    assert len(pairs) == 10
    assert all(_samples(x) == _samples(y) for x, y in pairs)


def test_change_written_into_planes_leaves_the_rest_exact():
    img = _textured(1, 64, 48)[0]
    f = _frames([img], "yuv420p")[0]
    d = np.zeros((10, 12, 3), np.float32)
    d[...] = (0.1, 0.0, -0.05)
    out = add_rgb_deltas(f, [(20, 10, d)])
    y_before = np.frombuffer(f.planes[0], np.uint8).reshape(48, -1)[:, :64]
    y_after = np.frombuffer(out.planes[0], np.uint8).reshape(48, -1)[:, :64]
    changed = np.argwhere(y_before != y_after)
    assert changed[:, 0].min() >= 10 and changed[:, 0].max() < 20
    assert changed[:, 1].min() >= 20 and changed[:, 1].max() < 32
    rgb = to_rgb(out).astype(int) - to_rgb(f).astype(int)
    assert abs(rgb[12:18, 22:30, 0].mean() - 25.5) < 3 and abs(rgb[12:18, 22:30, 2].mean() + 12.75) < 3
    assert add_rgb_deltas(f, []) is f


# -- unbroken tracks ------------------------------------------------------------------------

def _changed(out, frames):
    return [not np.array_equal(to_rgb(a), to_rgb(b)) for a, b in zip(out, frames)]


def test_detector_misses_inside_a_shot_are_bridged():
    frames = _frames(_textured(14))
    seen = [i for i in range(14) if i not in (4, 5, 6)]  # the detector misses three frames
    log = []
    pipe = FacePipeline(_Texture(), FixedFaceDetector(seen, box=(40, 20, 110, 100)),
                        PipelineOptions(quiet=True, min_face=0, strength=1.0, bridge=8),
                        on_faces=lambda i, faces, chosen: log.append((i, [f.bridged for f in faces])))
    out = list(pipe.process(frames))
    assert all(_changed(out, frames)), "every frame of the shot is restored"
    assert pipe.stats.frames_bridged == 3 and pipe.stats.tracks == 1
    assert [i for i, b in log if b == [True]] == [4, 5, 6]
    # without bridging the gap frames stay raw: the output would toggle restored / raw
    out, pipe = _run(_Texture(), frames, FixedFaceDetector(seen, box=(40, 20, 110, 100)), strength=1.0, bridge=0)
    assert _changed(out, frames) == [i in seen for i in range(14)]


def test_a_face_gone_for_longer_than_the_bridge_is_not_invented():
    frames = _frames(_textured(20))
    seen = list(range(5)) + list(range(15, 20))  # gone for 10 frames
    out, pipe = _run(_Texture(), frames, FixedFaceDetector(seen, box=(40, 20, 110, 100)), strength=1.0, bridge=4)
    assert _changed(out, frames) == [i in seen for i in range(20)]
    assert pipe.stats.frames_bridged == 0


def test_causal_run_predicts_a_missed_face():
    frames = _frames(_textured(12))
    seen = [i for i in range(12) if i not in (6, 7)]
    out, pipe = _run(_Texture(), frames, FixedFaceDetector(seen, box=(40, 20, 110, 100)), strength=1.0,
                     bridge=3, lookahead=0)
    assert all(_changed(out, frames))
    assert pipe.stats.frames_bridged == 2


def test_bridge_defaults_differ_for_files_and_causal_runs():
    """bench/bridge.py: interpolated gaps stay aligned for 8 frames, predicted ones for 3."""
    from frvideo.pipeline import bridge_frames
    assert bridge_frames(None, 4) == 8 and bridge_frames(None, 0) == 3
    assert bridge_frames(5, 0) == 5 and bridge_frames(0, 4) == 0
    frames = _frames(_textured(16))
    seen = [i for i in range(16) if not 6 <= i < 10]  # missed for 4 frames: more than a causal run bridges
    out, pipe = _run(_Texture(), frames, FixedFaceDetector(seen, box=(40, 20, 110, 100)), strength=1.0, lookahead=0)
    assert pipe.bridge == 3 and pipe.stats.frames_bridged == 3
    assert _changed(out, frames) == [i in seen or 6 <= i < 9 for i in range(16)]


class _MovingFace(FaceDetector):
    """A face moving right 4 px per frame, missed on some frames."""

    def __init__(self, missed):
        self.missed, self.calls = set(missed), 0

    def detect(self, image_rgb):
        i, self.calls = self.calls, self.calls + 1
        if i in self.missed:
            return Detections.empty()
        x = 30 + 4 * i
        box = np.array([[x, 20, x + 60, 90]], np.float32)
        lm = np.array([[[x + 18, 48], [x + 42, 48], [x + 30, 60], [x + 21, 74], [x + 39, 74]]], np.float32)
        return Detections(box, lm, np.array([0.99], np.float32))


def test_bridged_landmarks_are_interpolated():
    log = {}
    pipe = FacePipeline(_Texture(), _MovingFace({3, 4}), PipelineOptions(quiet=True, min_face=0, bridge=5),
                        on_faces=lambda i, faces, chosen: log.update({i: faces}))
    list(pipe.process(_frames(_textured(8, w=200))))
    for i in (3, 4):
        (face,) = log[i]
        assert face.bridged and abs(face.landmarks[0, 0] - (30 + 4 * i + 18)) < 1e-4


def test_faces_file_is_read_by_metrics(tmp_path, home_with_detectors, capsys):
    from clips import make_clip

    from frvideo.cli import main
    src = make_clip(tmp_path / "in.mkv", n=6, size=(128, 96))
    faces = tmp_path / "faces.jsonl"
    assert main([str(src), str(tmp_path / "out.mkv"), "--model", "none", "--detector", "yunet", "-q",
                 "--faces", str(faces)]) == 0
    lines = [json.loads(line) for line in faces.read_text().splitlines()]
    assert [r["frame"] for r in lines] == list(range(6)) and all(isinstance(r["faces"], list) for r in lines)
    # a hand-written file with one face per frame: metrics take their boxes from it
    faces.write_text("".join(json.dumps({"frame": i, "faces": [{"track": 0, "box": [10, 10, 60, 60],
                     "landmarks": [[0, 0]] * 5, "score": 1.0, "bridged": False, "restored": True}]}) + "\n"
                     for i in range(6)))
    assert main(["metrics", str(src), str(tmp_path / "out.mkv"), "--boxes", str(faces), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["region"] == "boxes" and res["frames_with_faces"] == 6


# -- the blend --------------------------------------------------------------------------------

def _face_crop(size=256):
    """A sharp real face, aligned: the largest face of a still photo (RetinaFace from ../shared)."""
    from frvideo.faces.align import similarity_transforms, warp_faces
    from frvideo.faces.detect import load_detector
    path = need(MEDIA / "images" / "whole" / "Blake_Lively.jpg", "whole images")
    weights = need(MEDIA.parent / "weights" / "detection_mobilenet0.25_Final.pth", "RetinaFace weights")
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    det = load_detector("retinaface-mobile", weights)
    faces = det.detect(img)
    big = int(np.argmax(faces.boxes[:, 2] - faces.boxes[:, 0]))
    return warp_faces(img, similarity_transforms(faces.landmarks[big][None], size), size)[0]


def _t(img):
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1


def test_auto_strength_leaves_a_clean_face_and_restores_a_degraded_one():
    clean = _face_crop()
    blurred = cv2.resize(cv2.resize(cv2.GaussianBlur(clean, (0, 0), 2.5), (64, 64), interpolation=cv2.INTER_AREA),
                         (256, 256), interpolation=cv2.INTER_CUBIC)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
    blend = FaceBlend(256)
    mask = torch.ones(1, 1, 256, 256)
    strengths = [float(blend.strength(blend.degradation((_t(x) + 1) / 2, mask))) for x in (clean, blurred, noisy)]
    assert strengths[0] < 0.2 and strengths[1] > 0.8 and strengths[2] > 0.8, strengths
    # a model card's max_strength is the auto strength of a fully degraded face; --strength overrides it
    capped = FaceBlend(256, BlendSettings(max_strength=0.4))
    deg = capped.degradation((_t(blurred) + 1) / 2, mask)
    assert float(capped.strength(deg)) == pytest.approx(0.4 * strengths[1], abs=1e-6)
    assert float(FaceBlend(256, BlendSettings(strength=0.9, max_strength=0.4)).strength(deg)) == pytest.approx(0.9)


def test_shipped_cards_cap_auto_strength():
    from frvideo.restore import load_restorer
    assert load_restorer("none").max_strength == 1.0
    assert load_restorer("lite").max_strength == 0.5  # lite v6 (RECIPE.md): the identity bar held at 0.5


def test_blend_keeps_input_colour_and_detail():
    clean = _face_crop()
    x = _t(clean)
    blend = FaceBlend(256, BlendSettings(strength=1.0, consistency=False))
    mask = torch.ones(1, 1, 256, 256)
    # a restorer that casts the face orange: the cast does not reach the output
    cast = (x + torch.tensor([0.2, 0.05, -0.15])[None, :, None, None]).clamp(-1, 1)
    change, _, _ = blend(x, cast, mask)
    assert change.mean((2, 3)).abs().max() < 0.01
    # a restorer that blurs the face: the input's detail comes back
    blurred = torch.from_numpy(cv2.GaussianBlur(clean, (0, 0), 2.0)).permute(2, 0, 1)[None].float() / 127.5 - 1
    change, _, _ = blend(x, blurred, mask)
    out = (x + 1) / 2 + change
    lap = lambda a: float(torch.nn.functional.conv2d(  # noqa: E731
        a.mean(1, keepdim=True), torch.tensor([[[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]], dtype=torch.float32)).var())
    assert lap(out) > 0.7 * lap((x + 1) / 2) > 2 * lap((blurred + 1) / 2)
    # the same blend without detail keeping passes the blur through
    change, _, _ = FaceBlend(256, BlendSettings(strength=1.0, keep_detail=False, consistency=False))(x, blurred, mask)
    assert lap((x + 1) / 2 + change) < 0.6 * lap((x + 1) / 2)


def test_only_what_agrees_with_the_input_is_let_through():
    clean = _face_crop()
    degraded = cv2.GaussianBlur(clean, (0, 0), 2.0)
    x, good = _t(degraded), _t(clean)
    blend = FaceBlend(256, BlendSettings(strength=1.0))
    mask = torch.ones(1, 1, 256, 256)
    # a faithful restoration (the clean face itself) agrees with its blurred input almost everywhere
    w_good = blend.agreement((x + 1) / 2, (good + 1) / 2, mask, torch.zeros(1))
    assert float(w_good.mean()) > 0.7
    # one that invents a dark blotch on the cheek: blocked there, kept elsewhere
    blotched = good.clone()
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    blotched[:, :, ((yy - 170) ** 2 + (xx - 90) ** 2) < 15 ** 2] -= 0.6
    w_bad = blend.agreement((x + 1) / 2, (blotched + 1) / 2, mask, torch.zeros(1))
    assert float(w_bad[0, 0, 170, 90]) < 0.1 and float(w_bad[0, 0, 100, 170]) > 0.5
    change, _, _ = blend(x, blotched, mask)
    assert float(change[0, :, 165:175, 85:95].mean()) > -0.1  # the blotch does not reach the video


# -- identity ---------------------------------------------------------------------------------

def test_identity_distance_known_answers():
    pytest.importorskip("dlib", reason="identity metrics need dlib (pip install -e '.[metrics]')")
    from frvideo.identity import SAME_PERSON, IdentityModel
    path = need(MEDIA / "images" / "whole" / "obama_and_biden.jpg", "whole images")
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    model = IdentityModel()
    # the two men of the photo (boxes from RetinaFace on this image)
    boxes = [(1146, 358, 1327, 596), (758, 393, 935, 639)]
    a, b = (model.descriptor(img, box) for box in boxes)
    blurred = model.descriptor(cv2.GaussianBlur(img, (0, 0), 1.5), boxes[0])
    assert model.distance(a, a) < 1e-6
    assert model.distance(a, blurred) < 0.35  # the same face, softened: still the same person
    assert model.distance(a, b) > SAME_PERSON
