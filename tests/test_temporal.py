"""Token and landmark smoothing: stability where the evidence is noise,
following where it really changes."""
import numpy as np
import torch

from frvideo.faces.align import FFHQ_TEMPLATE_512
from frvideo.temporal import OneEuroLandmarks, TokenSmoother, centered_landmarks


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
