"""LD-BFR (plugins/ldbfr, frvideo/nn/diffusion.py): the DDIM sampler against closed
forms, noise locked per track, the frozen base UNet during HQI training, shapes
through E-HQI / D-HQI, the three training stages, and the CLI with the shipped model."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clips import make_clip
from conftest import FixedFaceDetector
from frvideo.models import ModelConfig, load_model_config
from frvideo.nn.diffusion import (DecoderHQI, DiffusionSchedule, EncoderHQI, LatentUNet, ddim_sample,
                                  ddim_timesteps)
from frvideo.restore import RestoreContext, load_state_dict_strict, read_checkpoint
from frvideo.weights import REPO_ROOT, sha256_file
from plugins.ldbfr import LDBFRNet, LDBFRRestorer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"img_size": 64, "nf": 32, "ch_mult": [1, 1, 1], "res_blocks": 1, "emb_dim": 32, "codebook_size": 16,
        "unet_channels": 32, "unet_mult": [1, 2], "unet_res_blocks": 1, "unet_attn_levels": [1], "timesteps": 100}


def _wake(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give the zero-initialised layers (output projections) small random weights, so an
    untrained network's injections and eps are not exactly zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module


def _tiny_restorer(steps: int = 3) -> LDBFRRestorer:
    torch.manual_seed(0)
    net = _wake(LDBFRNet(**TINY))
    card = ModelConfig(name="ldbfr", backend="ldbfr", arch=dict(TINY), defaults={"steps": steps})
    r = LDBFRRestorer(net, card)
    r.input_size = TINY["img_size"]
    return r


# --------------------------------------------------------------------------- DDIM


def _gaussian_eps(schedule, mu, s):
    """The exact eps-predictor for data x0 ~ N(mu, s^2 I): E[eps | x_t] =
    sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""
    ac = schedule.alphas_cumprod

    def eps(x, t):
        a = ac[t].to(torch.float64).view(-1, *([1] * (x.dim() - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)
    return eps


def test_ddim_timesteps_are_trailing():
    assert ddim_timesteps(1000, 1) == [999]
    assert ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_ddim_follows_the_closed_form_trajectory_on_gaussian_data(steps):
    # with the exact eps of Gaussian data every DDIM step is affine in d = x_t - sqrt(a_t) mu:
    # d' = d (sqrt(a a') s^2 + sqrt((1 - a)(1 - a'))) / (a s^2 + 1 - a)
    sched = DiffusionSchedule()
    mu, s = 0.7, 0.5
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    traj = []
    out = ddim_sample(_gaussian_eps(sched, mu, s), sched, x_T, steps, trajectory=traj)
    ac = sched.alphas_cumprod
    ts = ddim_timesteps(1000, steps)
    alphas = [float(ac[t]) for t in ts] + [1.0]
    d = x_T - math.sqrt(alphas[0]) * mu
    assert len(traj) == steps + 1 and torch.equal(traj[0], x_T)
    for i in range(steps):
        a, a2 = alphas[i], alphas[i + 1]
        d = d * (math.sqrt(a * a2) * s * s + math.sqrt((1 - a) * (1 - a2))) / (a * s * s + 1 - a)
        torch.testing.assert_close(traj[i + 1], math.sqrt(a2) * mu + d, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, traj[-1])


def test_ddim_converges_to_the_probability_flow_solution():
    # many small steps: the ODE maps x_T to mu + s (x_T - sqrt(a_T) mu) / sqrt(a_T s^2 + 1 - a_T)
    sched = DiffusionSchedule()
    mu, s = -0.3, 0.4
    x_T = torch.randn(2, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a_T = float(sched.alphas_cumprod[999])
    exact = mu + s * (x_T - math.sqrt(a_T) * mu) / math.sqrt(a_T * s * s + 1 - a_T)
    err = {n: (ddim_sample(_gaussian_eps(sched, mu, s), sched, x_T, n) - exact).abs().max().item()
           for n in (10, 100, 1000)}
    # DDIM is a first-order solver: the error shrinks roughly with the step size
    assert err[1000] < 1e-2 and err[100] > 4 * err[1000] and err[10] > 4 * err[100], err


def test_ddim_single_step_is_exact_for_a_point_mass():
    # s = 0: the data is the point mu; eps is exact, so x0_hat = mu from any x_T
    sched = DiffusionSchedule(timesteps=50)
    x_T = torch.randn(4, 3, dtype=torch.float64)
    out = ddim_sample(_gaussian_eps(sched, 1.25, 0.0), sched, x_T, 1)
    torch.testing.assert_close(out, torch.full_like(out, 1.25))


def test_ddim_eta_uses_the_given_generators():
    sched = DiffusionSchedule(timesteps=100)
    eps = _gaussian_eps(sched, 0.0, 1.0)
    x = torch.zeros(2, 5, dtype=torch.float64)

    def run(seeds):
        return ddim_sample(eps, sched, x, 5, eta=1.0, generators=[torch.Generator().manual_seed(s) for s in seeds])
    torch.testing.assert_close(run([1, 2]), run([1, 2]))
    assert not torch.allclose(run([1, 2]), run([1, 3]))
    torch.testing.assert_close(run([1, 2])[0], run([1, 3])[0])  # face 0 does not feel face 1's seed


# --------------------------------------------------------------------------- network


def test_hqi_shapes_at_every_level_and_they_inject():
    torch.manual_seed(0)
    unet = _wake(LatentUNet(in_channels=16, model_channels=32, channel_mult=(1, 2, 2), res_blocks=1,
                            attn_levels=(2,), heads=4, cond_channels=16, hqi_heads=4))
    x, cond = torch.randn(2, 16, 16, 16), torch.randn(2, 16, 16, 16)
    t = torch.tensor([10, 900])
    with_c, without = {}, {}
    eps_c = unet(x, t, cond, taps=with_c)
    eps_u = unet(x, t, None, taps=without)
    assert eps_c.shape == x.shape and not torch.allclose(eps_c, eps_u)
    for i, ch in enumerate(unet.level_channels):
        for side in ("enc", "dec"):
            assert with_c[(side, i)].shape == (2, ch, 16 >> i, 16 >> i), (side, i)
        # E-HQI acts at every encoder level (the level's own change, not just what flows down)
    for i, ch in enumerate(unet.level_channels):
        f = torch.randn(2, ch, 16 >> i, 16 >> i)
        e, d = unet.e_hqi[i], unet.d_hqi[len(unet.level_channels) - 1 - i]
        assert e.factor == d.factor == 2 ** i
        for mod in (e, d):
            out = mod(f, cond)
            assert out.shape == f.shape and not torch.allclose(out, f)
    # untrained (zero output projections) injections are the identity: the base UNet is unchanged
    fresh = EncoderHQI(32, 16, 2), DecoderHQI(32, 16, 2)
    f = torch.randn(1, 32, 8, 8)
    for mod in fresh:
        assert torch.equal(mod(f, cond[:1]), f)


def test_gaussian_skips_are_the_exact_gaussian_eps():
    # an untrained UNet outputs exactly 0 (zero-initialised conv_out and injections), so
    # predict_eps is the skip alone: the exact eps of N(0, I) data, or of N(cond, cond_var)
    torch.manual_seed(0)
    net = LDBFRNet(**TINY).eval()
    sched = net.schedule
    z = torch.randn(2, 32, 4, 4)
    cond = torch.randn(2, 32, 4, 4)
    net.cond_var.fill_(0.09)
    t = torch.tensor([10, 90])
    a = sched.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net.predict_eps(z, t), (1 - a).sqrt() * z)
        torch.testing.assert_close(net.predict_eps(z, t, cond),
                                   (1 - a).sqrt() * (z - a.sqrt() * cond) / (a * 0.09 + 1 - a))
        # a condition with (almost) no spread: one DDIM step lands on it, whatever the noise
        net.cond_var.fill_(1e-6)
        f_hq = net.denormalize_latent(cond)
        out = net.enhance(f_hq, 1, [torch.Generator().manual_seed(s) for s in (1, 2)])
    torch.testing.assert_close(out, f_hq, rtol=1e-3, atol=1e-3)


def test_dcvqr_scores_are_negative_squared_code_distances():
    r = _tiny_restorer()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    enc = r.encode(x, RestoreContext.single(2))
    f_lq = enc.state["f_lq"]
    assert enc.scores.shape == (2, 16, 16)  # 4 x 4 tokens, K = 16
    codes = r.net.quantize.embedding.weight
    d2 = ((f_lq.flatten(2).transpose(1, 2)[:, :, None, :] - codes[None, None]) ** 2).sum(-1)
    torch.testing.assert_close(enc.scores, -d2, rtol=1e-4, atol=1e-4)
    out = r.decode(enc, enc.scores.argmax(-1), RestoreContext.single(2))
    assert out.shape == x.shape and out.abs().max() <= 1
    other = r.decode(enc, torch.zeros_like(enc.scores[..., 0], dtype=torch.long), RestoreContext.single(2))
    assert not torch.allclose(out, other)  # the chosen tokens matter


def _ctx(n, seeds, steps=None):
    return RestoreContext(list(range(n)), list(range(n)), noise_seeds=seeds, steps=steps)


def test_locked_noise_gives_identical_outputs_for_identical_inputs():
    r = _tiny_restorer()
    face = torch.rand(1, 3, 64, 64) * 2 - 1
    # the same face on three frames of one track (seed fixed per track), batched and not
    frames = [r.restore(face, _ctx(1, [777])) for _ in range(3)]
    assert all(torch.equal(frames[0], f) for f in frames[1:])
    batch = r.restore(face.expand(3, -1, -1, -1).contiguous(), _ctx(3, [777, 777, 777]))
    assert all(torch.equal(batch[i], batch[0]) for i in range(3))
    torch.testing.assert_close(batch[:1], frames[0], rtol=1e-5, atol=1e-5)
    # another track's seed gives another sample; fresh noise changes every call
    assert not torch.allclose(r.restore(face, _ctx(1, [778])), frames[0])
    fresh = [r.restore(face, _ctx(1, None)) for _ in range(2)]
    assert not torch.allclose(fresh[0], fresh[1])
    # steps 0 = the DC-VQR stage alone: no noise at all
    assert torch.equal(r.restore(face, _ctx(1, None, steps=0)), r.restore(face, _ctx(1, [1], steps=0)))


def test_steps_come_from_the_context_or_the_card():
    r = _tiny_restorer(steps=3)
    face = torch.rand(1, 3, 64, 64) * 2 - 1
    assert r.sampling_steps(_ctx(1, [5])) == 3 and r.sampling_steps(_ctx(1, [5], steps=7)) == 7
    assert not torch.equal(r.restore(face, _ctx(1, [5])), r.restore(face, _ctx(1, [5], steps=7)))
    from frvideo.errors import ConfigError
    with pytest.raises(ConfigError):
        r.sampling_steps(_ctx(1, [5], steps=101))


# --------------------------------------------------------------------------- training


def _tiny_cfg(stage: str, tmp_path: Path, **extra) -> dict:
    from frvideo.train.trainer import load_config
    cfg = {"model": {"card": "ldbfr", "arch": dict(TINY)}, "stage": stage,
           "data": {"synthetic": 8, "synthetic_eval": 2, "size": 64, "crop": 32, "eval_count": 2},
           "degradation": {"preset": "ld-bfr"},
           "train": {"batch": 2, "steps": 2, "threads": 1, "log_every": 1, "eval_every": 2, "save_every": 2},
           "plugin": {"allow_random_init": True, "pool_per_image": 1}, "output": str(tmp_path / stage)}
    for k, v in extra.items():
        cfg[k] = v
    return load_config(cfg)


def test_hqi_step_leaves_the_base_unet_unchanged(tmp_path):
    from plugins.ldbfr.train import HQIStage
    stage = HQIStage(_tiny_cfg("ldbfr-hqi", tmp_path), quiet=True)
    _wake(stage.net.unet, seed=3)  # non-zero injections, so gradients reach every HQI weight
    before = {k: v.clone() for k, v in stage.net.state_dict().items()}
    hqi = {n for n, _ in stage.net.named_parameters() if n.startswith(("unet.e_hqi.", "unet.d_hqi."))}
    assert hqi and all(p.requires_grad == (n in hqi) for n, p in stage.net.named_parameters())
    stage.train_step()
    after = stage.net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= hqi, sorted(changed - hqi)[:5]
    assert any(k.startswith("unet.e_hqi.") for k in changed) and any(k.startswith("unet.d_hqi.") for k in changed)


def test_three_stages_train_resume_and_export(tmp_path, capsys):
    from frvideo.train.trainer import train_main
    import yaml
    runs = {}
    for stage in ("ldbfr-dcvqr", "ldbfr-unet"):
        cfg = _tiny_cfg(stage, tmp_path)
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert train_main([str(path), "-q"]) == 0
        runs[stage] = tmp_path / stage / "last.pth"
    cfg = _tiny_cfg("ldbfr-hqi", tmp_path, init_from=str(runs["ldbfr-unet"]))
    cfg["plugin"]["allow_random_init"] = False
    cfg["plugin"]["dcvqr_from"] = str(runs["ldbfr-dcvqr"])
    path = tmp_path / "hqi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train_main([str(path), "-q", "--stop-at", "1"]) == 0
    assert train_main([str(path), "-q"]) == 0  # resumes to step 2
    ck = torch.load(tmp_path / "ldbfr-hqi" / "last.pth", weights_only=True)
    assert ck["step"] == 2 and ck["stage"] == "ldbfr-hqi" and len(ck["evals"]) == 1
    unet = torch.load(runs["ldbfr-unet"], weights_only=True)["params_ema"]
    dcvqr = torch.load(runs["ldbfr-dcvqr"], weights_only=True)["params_ema"]
    final = ck["params_ema"]
    for k in final:  # each module comes from the stage that trained it (or the one that followed)
        if k.startswith(("lq_encoder.", "dcam.")):
            assert torch.equal(final[k], dcvqr[k]), k
        elif k.startswith("unet.") and not k.startswith(("unet.e_hqi.", "unet.d_hqi.")):
            assert torch.equal(final[k], unet[k]), k
    out = tmp_path / "ldbfr.pth"
    assert train_main([str(path), "--export", str(out)]) == 0
    # the run's arch is TINY over the card's (which names the fidelity path)
    net = LDBFRNet(**{**TINY, "skip_fusion": bool(load_model_config("ldbfr").arch.get("skip_fusion"))})
    load_state_dict_strict(net, {k: v.float() for k, v in read_checkpoint(out, ["params_ema"]).items()}, out)
    capsys.readouterr()


def test_v2_chain_keeps_v1_latent_space_and_unet(tmp_path):
    """lite_codebook may be an LD-BFR checkpoint (its E_HQ / L_HQ), and a v1 network without the
    fidelity path may start the HQI stage of a skip_fusion network (v1's UNet carries over)."""
    from plugins.ldbfr.train import DCVQRStage, HQIStage
    torch.manual_seed(1)
    v1 = _wake(LDBFRNet(**TINY))
    v1_path = tmp_path / "v1.pth"
    torch.save({"params_ema": v1.state_dict()}, v1_path)
    arch = {**TINY, "skip_fusion": True}
    cfg = _tiny_cfg("ldbfr-dcvqr", tmp_path, model={"card": "ldbfr", "arch": arch})
    cfg["plugin"]["lite_codebook"] = str(v1_path)
    stage = DCVQRStage(cfg, quiet=True)
    own = stage.net.state_dict()
    for k, v in v1.state_dict().items():
        if k.startswith("hq_encoder.") or k.startswith("quantize."):
            assert torch.equal(own[k], v), k
    stage.run()
    cfg = _tiny_cfg("ldbfr-hqi", tmp_path, model={"card": "ldbfr", "arch": arch}, init_from=str(v1_path))
    cfg["plugin"].update(allow_random_init=False, dcvqr_from=str(tmp_path / "ldbfr-dcvqr" / "last.pth"))
    hqi = HQIStage(cfg, quiet=True).net.state_dict()
    dcvqr = torch.load(tmp_path / "ldbfr-dcvqr" / "last.pth", weights_only=True)["params_ema"]
    for k, v in v1.state_dict().items():
        if k.startswith("unet."):
            assert torch.equal(hqi[k], v), k
    for k in hqi:
        if k.startswith(("fuse.", "lq_encoder.", "dcam.")):
            assert torch.equal(hqi[k], dcvqr[k]), k
    # without a DC-VQR run to bring it, a missing fidelity path is still an error
    cfg["plugin"]["dcvqr_from"] = None
    cfg["plugin"]["allow_random_init"] = True
    with pytest.raises(Exception, match="fuse"):
        HQIStage(cfg, quiet=True)


def test_hqi_stage_without_its_predecessors_is_a_config_error(tmp_path):
    from frvideo.errors import ConfigError
    from plugins.ldbfr.train import HQIStage
    cfg = _tiny_cfg("ldbfr-hqi", tmp_path)
    cfg["plugin"]["allow_random_init"] = False
    with pytest.raises(ConfigError, match="init_from"):
        HQIStage(cfg, quiet=True)
    cfg["plugin"]["bogus"] = 1
    with pytest.raises(ConfigError, match="plugin.bogus"):
        HQIStage(cfg, quiet=True)


# --------------------------------------------------------------------------- shipped model + CLI


def test_shipped_card_and_file():
    card = load_model_config("ldbfr")
    assert card.backend == "ldbfr" and card.weights.url is None
    path = REPO_ROOT / card.weights.shipped
    assert path.is_file() and path.stat().st_size <= 30 * 1024 * 1024
    assert sha256_file(path) == card.weights.sha256


def _patch_detector(monkeypatch, det):
    import frvideo.faces.detect as detect
    monkeypatch.setattr(detect, "load_detector", lambda *a, **k: det)


def _still_clip(path: Path, n: int) -> Path:
    """n identical frames of a face-like pattern, losslessly coded (identical decoded inputs)."""
    from frvideo.train.trainer import synthetic_faces
    face = synthetic_faces(1, 112, 5)[0]
    frame = np.full((128, 128, 3), 90, np.uint8)
    frame[8:120, 8:120] = face
    return make_clip(path, n=n, size=(128, 128), frames=[frame] * n, codec="ffv1", pix_fmt="yuv444p")


def _frames(path: Path) -> list[np.ndarray]:
    import av
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def test_cli_ldbfr_still_face_stays_still_with_locked_noise(tmp_path, capsys, monkeypatch, frvideo_home):
    from frvideo.cli import main
    n = 4
    clip = _still_clip(tmp_path / "in.mkv", n)
    _patch_detector(monkeypatch, FixedFaceDetector(range(2 * n), box=(30, 24, 98, 110)))
    args = ["--model", "ldbfr", "--codec", "ffv1", "--temporal", "tokens", "--batch-size", "3", "--steps", "2", "-q",
            "--strength", "1"]  # a sharp synthetic face: auto would leave it as it is
    assert main([str(clip), str(tmp_path / "locked.mkv"), *args]) == 0, capsys.readouterr().err
    assert main([str(clip), str(tmp_path / "fresh.mkv"), *args, "--fresh-noise"]) == 0, capsys.readouterr().err
    src, locked, fresh = _frames(clip), _frames(tmp_path / "locked.mkv"), _frames(tmp_path / "fresh.mkv")
    assert len(locked) == len(fresh) == n
    assert not np.array_equal(locked[0], src[0])  # the face was restored
    assert all(np.array_equal(locked[0], f) for f in locked[1:])  # ... identically on every frame
    assert any(not np.array_equal(fresh[0], f) for f in fresh[1:])


def test_cli_ldbfr_bad_steps_and_wrong_weights(tmp_path, capsys, frvideo_home):
    from frvideo.cli import main
    from frvideo.errors import EXIT_USAGE, EXIT_WEIGHTS
    clip = make_clip(tmp_path / "in.mp4", n=2, size=(64, 64))
    for argv, code in ((["--steps", "-1"], EXIT_USAGE), (["--steps", "x"], EXIT_USAGE),
                       (["--steps", "5000"], EXIT_USAGE),  # beyond the trained schedule: caught before decoding
                       (["--model", "lite", "--steps", "4"], EXIT_USAGE),  # not a diffusion model
                       (["--weights", str(REPO_ROOT / "plugins/lite/weights/lite.pth")], EXIT_WEIGHTS)):
        rc = main([str(clip), str(tmp_path / "o.mp4"), "--model", "ldbfr", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == code and len(err) == 1 and err[0].startswith("frvideo: error: "), (argv, err)
        assert not (tmp_path / "o.mp4").exists()


def test_paper_card_without_weights_is_a_clear_error(frvideo_home):
    from frvideo.errors import WeightsError
    from frvideo.restore import load_restorer
    card = load_model_config("ldbfr-paper")
    a = card.arch
    assert a["img_size"] == 512 and a["shuffle"] * 2 ** (len(a["ch_mult"]) - 1) == 16  # the paper's DC-VQR ratio
    with pytest.raises(WeightsError, match="ldbfr-paper.pth"):
        load_restorer("ldbfr-paper")


def test_auto_never_picks_ldbfr(frvideo_home):
    from frvideo.restore import auto_model_name
    assert load_model_config("ldbfr").priority > load_model_config("lite").priority
    assert auto_model_name() == "lite"  # only the shipped models are installed here
