"""The training toolkit (``frvideo train``) on a tiny synthetic set: both stages
learn, resume is exact, EMA, dead-code re-seeding, losses, config errors."""
import json

import numpy as np
import pytest
import torch
import yaml

from frvideo.errors import ConfigError, InputError
from frvideo.nn.quantizer import VectorQuantizer
from frvideo.train import losses as L
from frvideo.train.trainer import (Trainer, degrade_eval, degrade_sample, export_weights, load_config, reinit_dead_codes,
                                   train_main)

TINY_ARCH = {"img_size": 32, "nf": 32, "ch_mult": [1, 1], "emb_dim": 16, "codebook_size": 32,
             "predictor_channels": 32, "predictor_blocks": 1, "shuffle": 2}


@pytest.fixture(autouse=True, scope="module")
def _keep_threads():
    n = torch.get_num_threads()  # the trainer sets train.threads for the whole process
    yield
    torch.set_num_threads(n)


def tiny_config(out, stage="codebook", **train):
    cfg = {
        "model": {"backend": "lite", "arch": dict(TINY_ARCH)},
        "stage": stage,
        "data": {"synthetic": 12, "synthetic_eval": 2, "size": 32, "crop": 32, "eval_count": 2},
        "degradation": {"preset": "vqfr"},
        "train": {"batch": 4, "steps": 12, "lr": 2e-3, "log_every": 3, "eval_every": 6, "save_every": 6,
                  "vq_warmup": 3, "dead_code_window": 2, "dead_code_every": 3, "code_buffer": 512,
                  "ema_decay": 0.9, "threads": 1, "eval_fidelity": [0.0, 1.0], **train},
        "output": str(out),
    }
    return cfg


@pytest.fixture(scope="module")
def codebook_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cb")
    cfg = load_config(tiny_config(out))
    tr = Trainer(cfg, quiet=True)
    tr.run()
    return tr


def test_codebook_stage_learns(codebook_run):
    h = codebook_run.history
    assert h[-1]["l1"] < h[0]["l1"]
    assert "codebook" in h[-1] and "commit" in h[-1]  # quantization switched on after the warm-up
    out = codebook_run.out
    for name in ("last.pth", "eval.jsonl", "train_log.jsonl", "loss_curve.png", "config.yaml"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12] and all(np.isfinite(r["psnr"]) for r in rows)
    # EMA weights are kept apart from the raw ones
    raw, ema = codebook_run.net.state_dict(), codebook_run.ema.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())


def test_restoration_stage_learns(codebook_run, tmp_path):
    cfg = tiny_config(tmp_path / "rs", stage="restoration", steps=12, lr=3e-3)
    cfg["init_from"] = str(codebook_run.out / "last.pth")
    tr = Trainer(load_config(cfg), quiet=True)
    # frozen codebook and decoder stay as stage 1 left them
    before = {k: v.clone() for k, v in tr.net.state_dict().items() if k.startswith(("quantize", "decoder"))}
    tr.run()
    h = tr.history
    assert h[-1]["loss"] < h[0]["loss"]
    assert h[-1]["token_ce"] < h[0]["token_ce"]
    after = tr.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ev = tr.evals[-1]
    assert {"psnr_input", "psnr_w0", "psnr_w1", "ssim_w1"} <= ev.keys()

    # fidelity fine-tune: decoder unfrozen, target tokens still from the stage-1 encoder
    cfg3 = tiny_config(tmp_path / "fid", stage="restoration", steps=2, freeze=["quantize"])
    cfg3["init_from"] = str(tr.out / "last.pth")
    cfg3["teacher_from"] = str(codebook_run.out / "last.pth")
    tr3 = Trainer(load_config(cfg3), quiet=True)
    stage1 = codebook_run.ema.encoder.state_dict()
    assert all(torch.equal(v, stage1[k]) for k, v in tr3.teacher.state_dict().items())
    dec = {k: v.clone() for k, v in tr3.net.decoder.state_dict().items()}
    tr3.run()
    assert any(not torch.equal(dec[k], v) for k, v in tr3.net.decoder.state_dict().items())


def test_resume_is_exact(tmp_path):
    def cfg_for(name):
        c = tiny_config(tmp_path / name, steps=6, save_every=100, eval_every=100, log_every=1,
                        vq_warmup=2, dead_code_every=2)
        c["loss"] = {"adversarial": 0.1, "adv_start": 2}
        return load_config(c)

    straight = Trainer(cfg_for("a"), quiet=True)
    straight.run()
    first = Trainer(cfg_for("b"), quiet=True)
    first.run(until=3)  # as if interrupted after step 3
    assert (tmp_path / "b" / "last.pth").is_file()
    resumed = Trainer(cfg_for("b"), quiet=True)
    assert resumed.step == 3
    resumed.run()
    for a, b in ((straight.net, resumed.net), (straight.ema, resumed.ema), (straight.disc, resumed.disc)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    assert torch.equal(straight.last_used, resumed.last_used)


def test_a_stop_signal_saves_the_run(tmp_path):
    """Under the frvideo command every stop signal arrives as interrupt.Interrupted (not
    KeyboardInterrupt): the run is saved where it stopped and the next run resumes there."""
    from frvideo.interrupt import Interrupted
    cfg = load_config(tiny_config(tmp_path / "sig", steps=6, save_every=100, eval_every=100, log_every=1))
    tr = Trainer(cfg, quiet=True)
    step = tr.train_step

    def stopped_at_4():
        if tr.step == 4:
            raise Interrupted(15)
        return step()
    tr.train_step = stopped_at_4
    with pytest.raises(Interrupted):
        tr.run()
    again = Trainer(cfg, quiet=True)
    assert again.step == 4 and len(again.history) == 4


def test_batch_workers_give_the_same_run(codebook_run, tmp_path):
    """train.workers moves the batches (degradations, x264 passes) to forked processes: the run is
    the same to the bit as with none, interrupted and resumed too."""
    def cfg_for(name, workers):
        c = tiny_config(tmp_path / name, stage="restoration", steps=5, workers=workers, save_every=100,
                        eval_every=100, log_every=1)
        c["init_from"] = str(codebook_run.out / "last.pth")
        c["degradation"] = {"preset": "vqfr", "codec_prob": 0.5}
        return load_config(c)

    inline = Trainer(cfg_for("w0", 0), quiet=True)
    inline.run()
    forked = Trainer(cfg_for("w2", 2), quiet=True)
    forked.run(until=2)
    assert forked.batch_workers is None  # the pool is closed when a run returns
    resumed = Trainer(cfg_for("w2", 2), quiet=True)
    resumed.run()
    sa, sb = inline.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [h["loss"] for h in inline.history] == [h["loss"] for h in resumed.history]


def test_dead_codes_reseeded_only():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 4)
    opt = torch.optim.Adam(q.parameters(), lr=0.1)
    q.embedding.weight.sum().backward()
    opt.step()
    last_used = torch.tensor([10, 10, 1, 10, 2, 10, 10, 0])
    before = q.embedding.weight.detach().clone()
    buffer = torch.randn(256, 4) + 5.0
    dead = reinit_dead_codes(q, last_used, step=10, window=5, buffer=buffer,
                             generator=torch.Generator().manual_seed(0), optimizer=opt)
    assert sorted(dead.tolist()) == [2, 4, 7]
    after = q.embedding.weight.detach()
    live = [0, 1, 3, 5, 6]
    assert torch.equal(before[live], after[live])
    assert not torch.equal(before[[2, 4, 7]], after[[2, 4, 7]])
    assert (after[[2, 4, 7]].mean(1) > 3).all()  # moved to where the encoder outputs are
    assert last_used[[2, 4, 7]].tolist() == [10, 10, 10]
    assert (opt.state[q.embedding.weight]["exp_avg"][[2, 4, 7]] == 0).all()


def test_losses():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(L.ms_ssim_loss(a, a)) == pytest.approx(0, abs=1e-5)
    assert float(L.laplacian_l1_loss(a, a)) == 0
    b = (a + 0.3 * torch.randn_like(a)).clamp(-1, 1)
    assert float(L.ms_ssim_loss(a, b)) > 0.1
    logits = torch.randn(2, 5, 7)
    assert float(L.token_ce_loss(logits, logits.argmax(-1))) < float(L.token_ce_loss(logits, logits.argmin(-1)))
    d = L.PatchDiscriminator(3, 16, 2)
    assert d(a).shape[:2] == (2, 1)
    for kind in ("hinge", "nsgan"):
        assert torch.isfinite(L.d_loss(d(a), d(b), kind)) and torch.isfinite(L.g_loss(d(b), kind))


def test_vgg_loss_loads_standard_state_dict(tmp_path):
    # a torchvision-layout vgg16 state dict (features.N.* and classifier.*)
    feats = L.VGGFeatures("vgg16", ["relu5_3"])
    state = {k: torch.randn_like(v) * 0.05 for k, v in feats.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(state, tmp_path / "vgg16.pth")
    loss = L.VGGPerceptualLoss(tmp_path / "vgg16.pth", "vgg16")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0 and float(loss(x, -x)) > 0
    assert torch.equal(loss.vgg.features[0].weight, state["features.0.weight"])


def test_export(codebook_run, tmp_path):
    digest = export_weights(codebook_run.out / "last.pth", tmp_path / "w.pth")
    ck = torch.load(tmp_path / "w.pth", weights_only=True)
    assert len(digest) == 64 and all(v.dtype != torch.float32 for v in ck["params_ema"].values())


def test_face_feature_loss(shared_weights, codebook_run, tmp_path):
    """RetinaFace's backbone as a loss: zero for the same face, larger for a worse copy and for
    another face, gradients to the restoration only; and a restoration run that logs it."""
    retinaface = shared_weights / "detection_mobilenet0.25_Final.pth"
    loss = L.FaceFeatureLoss(retinaface)
    g = torch.Generator().manual_seed(0)
    face = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, 3, 1, 1)
    light = face + 0.05 * torch.randn(face.shape, generator=g)
    heavy = face + 0.3 * torch.randn(face.shape, generator=g)
    assert float(loss(face, face)) == 0.0
    assert 0 < float(loss(light, face)) < float(loss(heavy, face))
    assert float(loss(face.flip(0), face)) > float(loss(light, face))  # the other image of the batch
    out = light.clone().requires_grad_(True)
    loss(out, face).backward()
    assert out.grad.abs().sum() > 0 and not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.body.training  # BatchNorm statistics never move

    cfg = tiny_config(tmp_path / "ff", stage="restoration", steps=3)
    cfg["init_from"] = str(codebook_run.out / "last.pth")
    cfg["loss"] = {"face_feature": 0.2}
    cfg["face_feature_weights"] = str(retinaface)
    tr = Trainer(load_config(cfg), quiet=True)
    tr.run()
    assert all(h["face_feature"] > 0 for h in tr.history)


def test_frame_scale_degradation(tmp_path):
    """degradation.frame_scale: the same damage done at a drawn frame scale, reproducibly."""
    rng = np.random.default_rng(0)
    img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    on_crop = {"preset": "vqfr", "codec_prob": 1.0, "codec_bpp": [0.5, 0.5], "frame_scale": None}
    scaled = {**on_crop, "frame_scale": [1.5, 3.0]}
    a = degrade_sample(scaled, img, np.random.default_rng(1))
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, degrade_sample(scaled, img, np.random.default_rng(1)))
    assert not np.array_equal(a, degrade_sample(on_crop, img, np.random.default_rng(1)))
    cfg = load_config({**tiny_config(tmp_path / "e"), "degradation": {"frame_scale": [1.5, 3.0], "eval_seed": 7}})
    first, again = degrade_eval(cfg, [img, img]), degrade_eval(cfg, [img, img])
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], first[1])  # image j: its own draw


def test_config_errors(tmp_path):
    bad = tiny_config(tmp_path / "x")
    bad["train"]["learning_rate"] = 1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError) as e:
        train_main([str(path)])
    assert "train.learning_rate" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        train_main([str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="init_from"):
        load_config({**tiny_config(tmp_path / "y"), "stage": "restoration"})
    no_weights = tiny_config(tmp_path / "v")
    no_weights["loss"] = {"face_feature": 0.1}
    with pytest.raises(ConfigError, match="face_feature_weights"):
        load_config(no_weights)
    scaled = tiny_config(tmp_path / "w")
    scaled["degradation"] = {"frame_scale": [2.0, 1.0]}
    with pytest.raises(ConfigError, match="degradation.frame_scale"):
        load_config(scaled)
    with pytest.raises(ConfigError, match="train.workers"):
        load_config(tiny_config(tmp_path / "u", workers=-1))
    nodata = tiny_config(tmp_path / "z")
    nodata["data"] = {"root": str(tmp_path / "nowhere"), "size": 32, "crop": 32}
    with pytest.raises(InputError, match="nowhere"):
        Trainer(load_config(nodata), quiet=True)
