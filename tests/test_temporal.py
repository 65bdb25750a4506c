"""Token and landmark smoothing: stability where the evidence is noise,
following where it really changes."""
import numpy as np
import pytest
import torch

from frvideo.faces.align import FFHQ_TEMPLATE_512
from frvideo.temporal import FaceFilter, OneEuroLandmarks, TokenSmoother, centered_landmarks


def noisy_scores(T, N=64, K=32, seed=0, gap=0.5, noise=1.0):
    """Two nearly tied codes per position: argmax flips with the noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, K, generator=g) - 5
    base[:, 0] = 0.0
    base[:, 1] = -gap
    return [base + noise * torch.randn(N, K, generator=g) * (torch.arange(K) < 2) for _ in range(T)]


def run(smoother, scores, track=0):
    return [smoother.choose(s[None], [track], [t == 0])[0] for t, s in enumerate(scores)]


def flips(tokens):
    return sum(int((a != b).sum()) for a, b in zip(tokens, tokens[1:]))


def test_hysteresis_removes_noise_flips():
    scores = noisy_scores(30)
    raw = [s.argmax(-1) for s in scores]
    assert flips(raw) > 100
    light = flips(run(TokenSmoother(alpha=0.6, margin=0.3), scores))
    strong = flips(run(TokenSmoother(alpha=0.8, margin=0.5), scores))
    assert light < flips(raw) / 3
    assert strong < light / 3  # more memory and a wider margin: fewer flips still


def test_real_change_is_followed():
    N, K = 16, 8
    a = torch.full((N, K), -10.0)
    a[:, 2] = 10.0
    b = torch.full((N, K), -10.0)
    b[:, 5] = 10.0
    tokens = run(TokenSmoother(alpha=0.6, margin=0.3), [a] * 5 + [b] * 6)
    assert (tokens[4] == 2).all()
    assert (tokens[-1] == 5).all()  # switched after a few frames
    assert sum(bool((t == 5).all()) for t in tokens[5:]) >= 4


def test_tracks_are_independent_and_reset():
    s = TokenSmoother()
    a = torch.zeros(1, 4, 3)
    a[..., 0] = 5
    b = torch.zeros(1, 4, 3)
    b[..., 2] = 5
    assert (s.choose(a, [1], [True]) == 0).all()
    assert (s.choose(b, [2], [True]) == 2).all()  # another track: its own state
    assert (s.choose(b, [1], [True]) == 2).all()  # new track with the same id: no memory
    assert (s.choose(torch.cat([a, b]), [3, 4], [True, True]) == torch.tensor([[0], [2]])).all()


def test_flip_rate_reported():
    s = TokenSmoother(alpha=0.0, margin=0.0)
    x = torch.zeros(1, 10, 2)
    x[..., 0] = 1
    y = x.flip(-1)
    for i, t in enumerate([x, y, x]):
        s.choose(t, [7], [i == 0])
    assert s.flip_rates() == {7: 1.0}


def _face(shift=0.0):
    return (FFHQ_TEMPLATE_512 * 0.4 + 100 + shift).astype(np.float64)


def test_centered_window_removes_jitter_but_follows_a_move():
    rng = np.random.default_rng(0)
    jitter = [_face() + rng.normal(0, 1.0, (5, 2)) for _ in range(9)]
    out = centered_landmarks(jitter[:4], jitter[4], jitter[5:], sigma_frames=2)
    assert np.abs(out - _face()).mean() < 0.6 * np.abs(jitter[4] - _face()).mean()
    # a 30 px jump (a real move): the smoothed point stays with the current face
    moved = [_face()] * 4 + [_face(30)] * 5
    out = centered_landmarks(moved[:4], moved[4], moved[5:], sigma_frames=2)
    assert np.abs(out - _face(30)).max() < 1.0


def test_one_euro_smooths_jitter_and_tracks_motion():
    rng = np.random.default_rng(1)
    f = OneEuroLandmarks(fps=25)
    errs = []
    for t in range(50):
        raw = _face() + rng.normal(0, 1.0, (5, 2))
        out = f(0, raw, t == 0)
        if t > 10:
            errs.append((np.abs(out - _face()).mean(), np.abs(raw - _face()).mean()))
    smooth, raw = np.mean(errs, axis=0)
    assert smooth < 0.7 * raw
    for t in range(10):  # steady motion of 8 px per frame: lag stays small
        out = f(0, _face(8.0 * (t + 1)), False)
    assert np.abs(out - _face(80)).mean() < 8.0


def test_flat_distribution_over_a_large_codebook_still_switches():
    """A probability-gap margin would never fire when every p is ~1/K; the log ratio does."""
    K = 1024
    a = torch.zeros(1, 4, K)
    a[..., 3] = 3.0
    b = torch.zeros(1, 4, K)
    b[..., 9] = 3.0  # p(best) ~ 0.02: a clear winner, yet a tiny probability
    s = TokenSmoother(alpha=0.6, margin=0.3)
    tokens = [s.choose(x, [0], [i == 0])[0] for i, x in enumerate([a] * 3 + [b] * 6)]
    assert (tokens[2] == 3).all() and (tokens[-1] == 9).all()


# -- restored-face filter --------------------------------------------------------------

def _face_sequence(T, noise, seed=0, size=64):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, size, size, generator=g) * 1.6 - 0.8
    base = torch.nn.functional.avg_pool2d(base, 5, 1, 2)  # smooth "face" content
    return base, [base + noise * torch.randn(base.shape, generator=g) for _ in range(T)]


def _filter(f, seq, track=0):
    return [f(x, [track], [t == 0]) for t, x in enumerate(seq)]


def test_face_filter_averages_noise_on_a_still_face():
    # iid noise on a still face: a recursive filter with weight s leaves (1 - s) / (1 + s) of
    # the noise variance (0.25 at s = 0.6) where it does not let go
    base, seq = _face_sequence(40, noise=0.02)
    out = _filter(FaceFilter(strength=0.6, threshold=0.05, guide="output"), seq)
    var_in = torch.stack([x - base for x in seq[10:]]).var().item()
    var_out = torch.stack([x - base for x in out[10:]]).var().item()
    assert 0.2 < var_out / var_in < 0.35
    # frame-to-frame change (what flicker metrics see) drops even more
    d_in = torch.stack([b - a for a, b in zip(seq[10:], seq[11:])]).pow(2).mean().item()
    d_out = torch.stack([b - a for a, b in zip(out[10:], out[11:])]).pow(2).mean().item()
    assert d_out < 0.25 * d_in


def test_face_filter_follows_a_real_change_at_once():
    base, seq = _face_sequence(12, noise=0.01)
    changed = base.clone()
    changed[..., 20:44, 20:44] += 0.5  # a mouth opens: far above the threshold
    seq[8:] = [changed + (x - base) for x in seq[8:]]
    out = _filter(FaceFilter(strength=0.8, threshold=0.05, guide="output"), seq)
    region = (..., slice(24, 40), slice(24, 40))
    assert (out[8][region] - seq[8][region]).abs().max() < 0.01  # no ghost of the closed mouth
    # and where nothing changed, the filter keeps averaging
    assert (out[8][..., :8, :8] - seq[8][..., :8, :8]).abs().mean() > 0.002


def test_face_filter_tracks_are_independent_and_reset():
    _, a = _face_sequence(3, noise=0.0, seed=1)
    _, b = _face_sequence(3, noise=0.0, seed=2)
    f = FaceFilter(strength=0.9, threshold=10.0, guide="output")  # threshold so high that it always averages
    f(a[0], [1], [True])
    out_b = f(b[0], [2], [True])
    assert torch.equal(out_b, b[0])  # a new track starts from its own face
    assert torch.allclose(f(a[1], [1], [False]), a[0] * 0.9 + a[1] * 0.1, atol=1e-6)
    assert torch.equal(f(b[1], [2], [True]), b[1])  # new_track: no memory of the old one
    f.reset()
    assert torch.equal(f(a[2], [1], [False]), a[2])
    assert torch.equal(FaceFilter(strength=0.0)(a[0], [1], [False], inputs=a[0]), a[0])


def test_face_filter_compensates_motion():
    # a textured face drifting 1-2 px per frame under noise: warped by optical flow, the
    # past still averages the noise away; without the warp it would ghost (worse than no filter)
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 128, 128, generator=g), 7, 1, 3)
    base = (base - base.mean()) / base.std() * 0.4
    clean = [torch.roll(base, shifts=(t, 2 * t), dims=(2, 3)) for t in range(16)]
    seq = [c + 0.03 * torch.randn(c.shape, generator=g) for c in clean]

    def error(frames):  # vs the clean face, away from the wrap-around border of roll
        return torch.stack([(a - c)[..., 8:-8, 8:-8].pow(2).mean() for a, c in zip(frames[5:], clean[5:])]).mean()

    compensated = _filter(FaceFilter(strength=0.6, threshold=0.05, guide="output"), seq)
    uncompensated = _filter(FaceFilter(strength=0.6, threshold=0.05, guide="output", motion_compensation=False), seq)
    assert error(compensated) < 0.5 * error(seq)
    assert error(uncompensated) > error(seq)


def _guided(f, outputs, inputs, track=0):
    return [f(y, [track], [t == 0], inputs=x) for t, (y, x) in enumerate(zip(outputs, inputs))]


def _frame_change(seq):
    return torch.stack([(b - a)[..., 8:-8, 8:-8].pow(2).mean() for a, b in zip(seq[5:], seq[6:])]).mean()


def _invented_texture(T, seed, size=64, amplitude=0.12):
    """A still input face and restorations that invent a new smooth texture on it every frame
    (a codebook or diffusion decoder's flicker): larger than the output-guided threshold."""
    g = torch.Generator().manual_seed(seed)
    base, inputs = _face_sequence(T, noise=0.01, seed=seed, size=size)
    texture = [torch.nn.functional.avg_pool2d(torch.randn(1, 3, size, size, generator=g), 5, 1, 2) * amplitude * 5
               for _ in range(T)]
    return base, inputs, [base + t for t in texture]


def test_input_guided_filter_holds_invented_texture_still():
    # what the decoder invents is not in the input: guided by the input the filter holds it still;
    # guided by the restored faces the texture change reads as motion or as a real change and survives
    _, inputs, outputs = _invented_texture(24, seed=3)
    by_input = _guided(FaceFilter(strength=0.8), outputs, inputs)
    by_output = _guided(FaceFilter(strength=0.8, threshold=0.05, guide="output"), outputs, inputs)
    assert _frame_change(by_input) < 0.2 * _frame_change(outputs)
    assert _frame_change(by_output) > 0.5 * _frame_change(outputs)


def test_input_guided_filter_follows_a_change_in_the_input():
    base, inputs = _face_sequence(12, noise=0.01, seed=4)
    changed = base.clone()
    changed[..., 20:44, 20:44] += 0.5  # a mouth opens: in the input and in the restoration
    inputs[8:] = [changed + (x - base) for x in inputs[8:]]
    g = torch.Generator().manual_seed(9)  # the restorer removes the input's noise and adds its own
    outputs = [x + 0.01 * torch.randn(x.shape, generator=g) for x in inputs]
    out = _guided(FaceFilter(strength=0.8), outputs, inputs)
    region = (..., slice(26, 38), slice(26, 38))
    assert (out[8][region] - outputs[8][region]).abs().max() < 0.02  # no ghost of the closed mouth
    assert (out[8][..., :8, :8] - outputs[8][..., :8, :8]).abs().mean() > 0.002  # still averaging elsewhere


def test_input_guided_filter_compensates_motion_measured_on_the_input():
    # the face drifts 1-2 px per frame; the input is a blurred, noisy view of it, the restoration
    # a sharp noisy one: the flow from the blurred input lines the past up well enough to average
    g = torch.Generator().manual_seed(5)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 3, 128, 128, generator=g), 7, 1, 3)
    base = (base - base.mean()) / base.std() * 0.4
    clean = [torch.roll(base, shifts=(t, 2 * t), dims=(2, 3)) for t in range(16)]
    inputs = [torch.nn.functional.avg_pool2d(c, 5, 1, 2) + 0.03 * torch.randn(c.shape, generator=g) for c in clean]
    outputs = [c + 0.03 * torch.randn(c.shape, generator=g) for c in clean]

    def error(frames):
        return torch.stack([(a - c)[..., 8:-8, 8:-8].pow(2).mean() for a, c in zip(frames[5:], clean[5:])]).mean()

    compensated = _guided(FaceFilter(strength=0.6), outputs, inputs)
    uncompensated = _guided(FaceFilter(strength=0.6, motion_compensation=False), outputs, inputs)
    assert error(compensated) < 0.5 * error(outputs)
    assert error(uncompensated) > error(compensated)


def test_input_guided_filter_needs_the_inputs():
    _, seq = _face_sequence(2, noise=0.0)
    with pytest.raises(ValueError, match="input crops"):
        FaceFilter()(seq[0], [0], [True])
    with pytest.raises(ValueError, match="guide"):
        FaceFilter(guide="restored")


def _run_pipeline(restorer, frames, temporal):
    from fractions import Fraction

    import av

    from frvideo.io.frames import to_rgb
    from frvideo.pipeline import FacePipeline, PipelineOptions
    from tests.conftest import FixedFaceDetector

    pipe = FacePipeline(restorer, FixedFaceDetector(range(len(frames)), box=(30, 15, 90, 85)),
                        PipelineOptions(temporal=temporal, min_face=0, quiet=True, strength=1.0))
    out = []
    for i, img in enumerate(frames):
        f = av.VideoFrame.from_ndarray(img, format="rgb24")
        f.pts, f.time_base = i, Fraction(1, 25)
        out.append(f)
    return [to_rgb(f).astype(np.float64) for f in pipe.process(out)]


def _still_scene(n, noise, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:128]
    scene = np.stack([128 + 60 * np.sin(xx / 7.0), 128 + 60 * np.cos(yy / 5.0), 120 + 0 * xx], -1)
    return [np.clip(scene + rng.normal(0, noise, scene.shape), 0, 255).astype(np.uint8) for _ in range(n)]


class _InventingRestorer:
    """Test double: a restorer that invents a new fine texture on the face every call."""

    name, input_size, has_codebook, needs_reference, stochastic = "inventing", 64, False, False, False
    device, dtype, max_strength = torch.device("cpu"), torch.float32, 1.0

    def __init__(self):
        self.g = torch.Generator().manual_seed(3)

    def restore(self, faces, ctx):
        return faces + 0.1 * torch.randn(faces.shape, generator=self.g)


def test_pipeline_full_mode_steadies_invented_texture():
    # a still face; the restorer draws a new texture on it every frame: full smoothing holds it
    frames = _still_scene(12, noise=0.0)

    def flicker(imgs):  # mean squared frame-to-frame change inside the face box
        x1, y1, x2, y2 = 45, 30, 75, 70
        return np.mean([(b - a)[y1:y2, x1:x2].var() for a, b in zip(imgs[4:], imgs[5:])])

    off, full = _run_pipeline(_InventingRestorer(), frames, "off"), _run_pipeline(_InventingRestorer(), frames, "full")
    assert len(off) == len(full) == 12
    assert flicker(full) < 0.4 * flicker(off)
    assert np.array_equal(off[0], full[0])  # the first frame of a track has no past: identical either way


def test_pipeline_filter_leaves_an_unchanged_face_alone():
    # the pass-through backend under input noise: every temporal mode gives the input back exactly
    from frvideo.restore import load_restorer

    frames = _still_scene(10, noise=8.0)
    for temporal in ("off", "full"):
        out = _run_pipeline(load_restorer("none"), frames, temporal)
        assert all(np.array_equal(o, f) for o, f in zip(out, frames)), temporal
