"""ENTED (reference-based restoration): the network's modules and their attention
maps, the restorer contract (scores, reference cache, reference swap), the
VQFR dictionary initialisation, the training stage, keyframe selection, and a
CLI run of the shipped model that must report the sharp keyframe."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from clips import make_clip
from conftest import FixedFaceDetector
from frvideo.errors import EXIT_USAGE, WeightsError
from frvideo.models import load_model_config
from frvideo.nn.texture import LatentRefinement, NeuralTextureAttention, feature_norm
from frvideo.reference import KeyframeSelector, frontalness, keyframe_score
from frvideo.restore import RestoreContext, load_restorer
from frvideo.train.trainer import synthetic_faces
from plugins.ented import EntedRestorer, load_vqfr_codebook
from plugins.ented.arch import DecodeAux, EntedNet
from plugins.ented.train import attention_reconstruction_loss

TINY = dict(img_size=32, nf=16, ch_mult=(2, 2), res_blocks=1, emb_dim=32, codebook_size=24, style_dim=16,
            texture_kernels=4, shuffle=2)  # latent 8 x 8, decoder levels at 8 and 16


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    torch.manual_seed(0)


def tiny_restorer(**over) -> EntedRestorer:
    card = load_model_config("ented")
    return EntedRestorer(EntedNet(**{**TINY, **over}), card)


def rand_faces(b, s=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, s, s, generator=g) * 2 - 1


# -- modules ----------------------------------------------------------------------------

def test_feature_norm_is_centred_and_scale_free():
    x = torch.randn(2, 8, 4, 4) * 3 + 1
    y = feature_norm(x)
    assert torch.allclose(y.mean(1), torch.zeros(2, 4, 4), atol=1e-5)
    assert torch.allclose(feature_norm(10 * x), y, atol=1e-4)  # eps is negligible at this scale


def test_texture_attention_is_stochastic_where_the_paper_says():
    block = NeuralTextureAttention(ref_channels=6, channels=5, k=3)
    f_ref, f_d = torch.randn(2, 6, 4, 5), torch.randn(2, 5, 3, 3)
    tex, c_e = block.extract(f_ref)
    assert tex.shape == (2, 3, 5) and c_e.shape == (2, 3, 20)
    # Eq. 1: softmax over the spatial axis - each of the k rows sums to 1
    assert (c_e >= 0).all() and torch.allclose(c_e.sum(2), torch.ones(2, 3), atol=1e-6)
    out, c_d = block.distribute(f_d, tex)
    assert out.shape == f_d.shape and c_d.shape == (2, 3, 9)
    # Eq. 2: softmax over the k axis - each position's column sums to 1
    assert (c_d >= 0).all() and torch.allclose(c_d.sum(1), torch.ones(2, 9), atol=1e-6)
    # F_o = F_tex^T C~_d: recompute by hand
    f_o = torch.einsum("bkc,bkn->bcn", tex, c_d).reshape(2, 5, 3, 3)
    assert torch.allclose(out, f_d + block.out(f_o), atol=1e-5)


def test_latent_refinement_rows_sum_to_one_and_gamma_matters():
    ref = LatentRefinement(channels=8, style_dim=6)
    z_lq, z_ref = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    omega, (a_lq, a_ref) = ref(z_lq, z_ref, return_attention=True)
    assert omega.shape == (2, 6) and a_lq.shape == (2, 16, 16) and a_ref.shape == (2, 16, 16)
    for a in (a_lq, a_ref):  # Eq. 5/7: softmax along the key positions
        assert (a >= 0).all() and torch.allclose(a.sum(2), torch.ones(2, 16), atol=1e-6)
    before = ref(z_lq, z_ref)
    with torch.no_grad():
        ref.gamma_ref.fill_(1.0)
    assert not torch.allclose(before, ref(z_lq, z_ref))


def test_shapes_and_gradients_through_every_module():
    net = EntedNet(**TINY)
    with torch.no_grad():  # gammas start at 0 (identity); open them so the attention gets gradient too
        net.refine.gamma_lq.fill_(0.5)
        net.refine.gamma_ref.fill_(0.5)
    lq, ref, gt = rand_faces(2, seed=1), rand_faces(2, seed=2), rand_faces(2, seed=3)
    enc = net.encode(lq)
    assert enc.z.shape == (2, 32, 8, 8) and [f.shape[-1] for f in enc.feats] == [16, 8]
    idx = net.quantize.nearest(enc.z)
    assert idx.shape == (2, 64)
    zq = net.quantize.lookup(idx, (8, 8))
    z_st = enc.z + (zq - enc.z).detach()
    rf = net.reference(ref)
    assert rf.z_ref.shape == (2, 32, 8, 8) and [t.shape for t in rf.textures] == [(2, 4, 32), (2, 4, 32)]
    aux = DecodeAux()
    out = net.decode_latent(z_st, enc.feats, rf, aux)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert [a.shape for a in aux.distribute_attn] == [(2, 4, 64), (2, 4, 256)]
    loss = ((out - gt).abs().mean() + ((zq - enc.z.detach()) ** 2).mean()
            + attention_reconstruction_loss(ref, gt, rf.extract_attn, aux.distribute_attn, [8, 16]))
    loss.backward()
    no_grad = []
    for name, p in net.named_parameters():
        noise_strength = p.shape == (1,)  # StyleConv noise weights: the decoder runs without noise
        if noise_strength:
            continue
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0:
            no_grad.append(name)
    assert no_grad == []
    modules = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert modules == {"encoder", "ref_encoder", "quantize", "refine", "decoder"}


def test_attention_reconstruction_loss_is_zero_for_a_perfect_correspondence():
    ref = rand_faces(1, 16)
    s = 4
    n = s * s
    eye = torch.eye(n)[None]  # k = hw: extraction picks one position per kernel, distribution maps it back
    loss = attention_reconstruction_loss(ref, ref, [eye], [eye], [s])
    assert loss.item() < 1e-6
    shuffled = eye[:, torch.randperm(n)]
    assert attention_reconstruction_loss(ref, ref, [eye], [shuffled], [s]).item() > 0.01


# -- the restorer -----------------------------------------------------------------------

def test_restorer_contract_scores_and_tokens():
    r = tiny_restorer()
    x = rand_faces(2)
    ctx = RestoreContext.single(2)
    ctx.references = rand_faces(2, seed=5)
    enc = r.encode(x, ctx)
    assert r.needs_reference and r.codebook_size == 24 and r.input_size == 32
    assert enc.scores.shape == (2, 64, 24) and enc.scores.dtype == torch.float32
    # scores are the negative squared distances of the content latent to the dictionary
    z = r.net.encode(x).z.flatten(2).transpose(1, 2)
    d = ((z[:, :, None, :] - r.net.quantize.embedding.weight[None, None]) ** 2).sum(-1)
    assert torch.allclose(enc.scores, -d, atol=1e-3)
    out = r.decode(enc, enc.scores.argmax(-1), ctx)
    assert out.shape == x.shape and out.abs().max() <= 1
    assert torch.equal(out, r.restore(x, ctx))
    other = r.decode(enc, torch.zeros_like(enc.scores[..., 0], dtype=torch.long), ctx)
    assert not torch.allclose(out, other)


def test_reference_swap_changes_the_output_and_features_are_cached():
    r = tiny_restorer()
    x = rand_faces(2)
    ref_a, ref_b = rand_faces(1, seed=7), rand_faces(1, seed=8)

    def run(ref, rid):
        ctx = RestoreContext.single(2)
        ctx.references = ref.expand(2, -1, -1, -1)
        ctx.reference_ids = [rid, rid]
        return r.restore(x, ctx)

    out_a = run(ref_a, "a")
    assert r.reference_passes == 1  # two faces, one reference: one E_ref pass
    assert torch.equal(run(ref_a, "a"), out_a) and r.reference_passes == 1  # cached
    out_b = run(ref_b, "b")
    assert r.reference_passes == 2
    assert (out_a - out_b).abs().mean() > 1e-4
    # uncached (no ids) gives the same numbers as the cached path
    ctx = RestoreContext.single(2)
    ctx.references = ref_a.expand(2, -1, -1, -1)
    assert torch.allclose(r.restore(x, ctx), out_a, atol=1e-5)


def test_vqfr_dictionary_initialisation(tmp_path):
    net = EntedNet(**{**TINY, "emb_dim": 8, "codebook_size": 6})
    book = torch.randn(6, 8)
    path = tmp_path / "vqfr.pth"
    torch.save({"params_ema": {"quantizer.embedding.weight": book, "decoder.x": torch.zeros(1)}}, path)
    assert load_vqfr_codebook(net, path) == "quantizer.embedding.weight"
    assert torch.equal(net.quantize.embedding.weight.data, book)
    torch.save({"params_ema": {"quantizer.embedding.weight": torch.randn(5, 8)}}, path)
    with pytest.raises(WeightsError, match="no VQ dictionary of shape"):
        load_vqfr_codebook(net, path)


def test_vqfr_dictionary_from_the_official_format_checkpoint():
    path = Path("/tmp/filled/vqfr.pth")  # bench/make_filled_checkpoint.py writes it (official VQFR v2 keys)
    if not path.is_file():
        pytest.skip(f"{path} not found (made by bench/make_filled_checkpoint.py)")
    net = EntedNet(**{**TINY, "emb_dim": 256, "codebook_size": 1024})  # the paper's 1024 x 256
    assert load_vqfr_codebook(net, path) == "quantizer.embedding.weight"
    assert net.quantize.embedding.weight.abs().sum() > 0


def test_paper_card_without_weights_is_a_clear_error(frvideo_home):
    card = load_model_config("ented-paper")
    assert card.arch["img_size"] == 512 and card.arch["codebook_size"] == 1024 and card.arch["emb_dim"] == 256
    assert card.arch["shuffle"] * 2 ** (len(card.arch["ch_mult"]) - 1) == 32  # s = 32: 16 x 16 latent
    with pytest.raises(WeightsError):
        load_restorer("ented-paper")


# -- training ---------------------------------------------------------------------------

def test_training_stage_runs_resumes_and_exports(tmp_path):
    from frvideo.restore import read_checkpoint
    from frvideo.train.trainer import load_config, train_main, trainer_class
    cfg = {"model": {"card": "ented", "arch": {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items()
                                              if k != "img_size"}},
           "stage": "ented", "data": {"synthetic": 6, "size": 32, "crop": None},
           "train": {"batch": 2, "steps": 4, "vq_warmup": 2, "eval_every": 2, "save_every": 2, "log_every": 1,
                     "threads": 1, "device": "cpu", "dead_code_every": 2, "dead_code_window": 1},
           "loss": {"adversarial": 0.1, "gan_type": "nsgan", "disc_ndf": 8, "disc_layers": 2},
           "plugin": {"kmeans_every": 3}}
    import yaml
    path = tmp_path / "ented.yaml"
    path.write_text(yaml.safe_dump(cfg))
    loaded = load_config(path)
    assert trainer_class(loaded).__name__ == "EntedTrainer"
    out = tmp_path / "run"
    assert train_main([str(path), "--output", str(out), "--stop-at", "2", "-q"]) == 0
    assert train_main([str(path), "--output", str(out), "-q"]) == 0  # resumes at 2
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["step"] == 4 and ck["vq_ready"] and {"g_adv", "attn", "codebook"} <= set(ck["history"][-1])
    assert [e["step"] for e in ck["evals"]] == [2, 4] and "psnr_other" in ck["evals"][-1]
    assert train_main([str(path), "--output", str(out), "--export", str(tmp_path / "w.pth")]) == 0
    net = EntedNet(**TINY)
    net.load_state_dict({k: v.float() for k, v in read_checkpoint(tmp_path / "w.pth", ["params_ema"]).items()})


def test_unknown_plugin_key_is_a_config_error(tmp_path):
    from frvideo.errors import ConfigError
    from frvideo.train.trainer import load_config
    from plugins.ented.train import EntedTrainer
    cfg = load_config({"model": {"card": "ented"}, "stage": "ented", "data": {"synthetic": 4, "crop": None},
                       "plugin": {"atention": 1.0}})
    with pytest.raises(ConfigError, match="atention"):
        EntedTrainer(cfg, tmp_path / "run", quiet=True)


# -- keyframes --------------------------------------------------------------------------

FRONTAL = np.array([[38, 45], [62, 45], [50, 58], [40, 72], [60, 72]], np.float32)


def test_frontalness_prefers_a_frontal_face():
    turned = FRONTAL.copy()
    turned[2, 0] += 9  # nose towards one eye: head turned
    turned[3:, 0] += 6
    assert frontalness(FRONTAL) > 0.9 > 0.5 > frontalness(turned)
    # rotation in the image plane does not matter (the alignment removes it)
    c, s = np.cos(0.4), np.sin(0.4)
    rolled = FRONTAL @ np.array([[c, -s], [s, c]], np.float32).T
    assert abs(frontalness(rolled) - frontalness(FRONTAL)) < 1e-6


def _clip_faces(n, sharp, size=128):
    face = synthetic_faces(1, size, seed=3)[0]
    blurred = cv2.GaussianBlur(face, (0, 0), 3.0)
    return [face if i == sharp else blurred for i in range(n)]


def _ahead(frames, i, lookahead=4):
    """What the pipeline passes with ``lookahead`` frames: the track's next frames."""
    return lambda: [(k, frames[k], FRONTAL, 0.99) for k in range(i + 1, min(i + 1 + lookahead, len(frames)))]


def test_keyframe_selection_picks_the_sharp_frame():
    from frvideo.reference import MIN_SWITCH_GAP as gap
    n = gap + 5
    frames = _clip_faces(n, sharp=7)
    sel = KeyframeSelector()
    chosen = [sel.update(0, i, f, FRONTAL, 0.99, new_track=i == 0).frame_index for i, f in enumerate(frames)]
    # causal (no look-ahead): the first frame, held for MIN_SWITCH_GAP frames, then the best frame seen
    assert chosen[:gap] == [0] * gap and chosen[gap:] == [7] * 5
    assert sel.summary() == [f"track 0: reference frame 7 (2 keyframes: 0 from frame 0, 7 from frame {gap})"]
    # with look-ahead, the first reference is the best frame of the window: no switch at all
    frames = _clip_faces(n, sharp=3)
    sel = KeyframeSelector()
    chosen = [sel.update(0, i, f, FRONTAL, 0.99, new_track=i == 0, ahead=_ahead(frames, i)).frame_index
              for i, f in enumerate(frames)]
    assert chosen == [3] * n and sel.summary() == ["track 0: reference frame 3"]
    # hysteresis: a barely better frame does not replace the reference
    sel2 = KeyframeSelector(switch_margin=0.25)
    base = keyframe_score(frames[0], FRONTAL, 0.9)
    sel2.update(1, 0, frames[0], FRONTAL, 0.9)
    assert keyframe_score(frames[1], FRONTAL, 1.0) < 1.25 * base
    assert sel2.update(1, 1, frames[1], FRONTAL, 1.0).frame_index == 0
    # a new track starts over
    assert sel2.update(1, 2, frames[2], FRONTAL, 0.5, new_track=True).frame_index == 2


def test_keyframe_does_not_switch_on_every_frame_while_a_track_gets_sharper():
    from frvideo.reference import MIN_SWITCH_GAP as gap
    face = synthetic_faces(1, 128, seed=3)[0]
    # the first 8 frames get sharper frame by frame (focus settling), then stay sharp; each step
    # beats the previous score by more than the margin (the old best-so-far rule switched on 6 of them)
    frames = [cv2.GaussianBlur(face, (0, 0), 3.0 - 0.4 * i) if i < 8 else face for i in range(40)]
    scores = [keyframe_score(f, FRONTAL, 0.99) for f in frames[:8]]
    assert all(b > 1.25 * a for a, b in zip(scores[2:], scores[3:]))
    for lookahead in (0, 4):
        sel = KeyframeSelector()
        chosen = [sel.update(0, i, f, FRONTAL, 0.99, new_track=i == 0, ahead=_ahead(frames, i, lookahead))
                  .frame_index for i, f in enumerate(frames)]
        switches = [i for i in range(1, len(chosen)) if chosen[i] != chosen[i - 1]]
        assert switches == [gap], (lookahead, chosen)  # one switch, after the hold, to a sharp frame
        assert chosen[0] == (0 if lookahead == 0 else 4) and chosen[-1] == 7
        assert len(sel.tracks[0].history) == 2


# -- the shipped model, end to end ------------------------------------------------------

def test_shipped_card_and_file():
    from frvideo.weights import REPO_ROOT, sha256_file
    card = load_model_config("ented")
    path = REPO_ROOT / card.weights.shipped
    assert path.is_file() and path.stat().st_size <= 30 * 1024 * 1024
    assert sha256_file(path) == card.weights.sha256


def _patch_detector(monkeypatch, det):
    import frvideo.faces.detect as detect
    monkeypatch.setattr(detect, "load_detector", lambda *a, **k: det)


def test_cli_restores_a_clip_with_the_sharp_keyframe(tmp_path, capsys, monkeypatch, frvideo_home):
    from frvideo.cli import main
    n, sharp = 10, 3  # the sharp frame is in frame 0's look-ahead window (4 frames)
    clip = make_clip(tmp_path / "in.mp4", n=n, size=(128, 128), frames=_clip_faces(n, sharp))
    _patch_detector(monkeypatch, FixedFaceDetector(range(n), box=(24, 20, 104, 112)))
    out = tmp_path / "out.mp4"
    rc = main([str(clip), str(out), "--model", "ented", "--preset", "ultrafast", "--batch-size", "3"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert out.is_file()
    lines = [ln for ln in err.splitlines() if ln.startswith("frvideo: track 0")]
    assert lines == [f"frvideo: track 0: reference frame {sharp}"], err  # chosen at frame 0, never switched


def test_cli_reference_options_errors(tmp_path, capsys, monkeypatch, frvideo_home):
    from frvideo.cli import main
    clip = make_clip(tmp_path / "in.mp4", n=3, size=(64, 64))
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((64, 64, 3), 128, np.uint8))
    _patch_detector(monkeypatch, FixedFaceDetector([]))  # finds no face anywhere
    cases = [
        (["--model", "ented", "--reference-image", str(blank)], 3, "no face found in reference image"),
        (["--model", "ented", "--reference-image", str(tmp_path / "nope.png")], 3, "reference image not found"),
        (["--model", "ented", "--reference-frame", "1", "--reference-image", str(blank)], EXIT_USAGE, "not both"),
        (["--model", "none", "--reference-frame", "1"], EXIT_USAGE, "reference-based models"),
        # a reference-based restorer for the references is refused before any weights are looked for
        (["--model", "ented", "--reference-restorer", "ented-paper"], EXIT_USAGE, "needs a reference itself"),
    ]
    for extra, code, text in cases:
        rc = main([str(clip), str(tmp_path / "o.mp4"), "-q", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == code and len(err) == 1 and err[0].startswith("frvideo: error:") and text in err[0], (extra, err)
        assert not (tmp_path / "o.mp4").exists()


def test_cli_reference_image_is_used_for_every_track(tmp_path, capsys, monkeypatch, frvideo_home):
    from frvideo.cli import main
    n = 4
    clip = make_clip(tmp_path / "in.mp4", n=n, size=(128, 128), frames=_clip_faces(n, 0))
    img = tmp_path / "ref.png"
    cv2.imwrite(str(img), cv2.cvtColor(_clip_faces(1, 0)[0], cv2.COLOR_RGB2BGR))
    # the detector double counts calls: call 0 is the reference image, then the n frames
    _patch_detector(monkeypatch, FixedFaceDetector(range(n + 1), box=(24, 20, 104, 112)))
    rc = main([str(clip), str(tmp_path / "o.mp4"), "--model", "ented", "--reference-image", str(img),
               "--preset", "ultrafast"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"frvideo: track 0: reference image {img}" in err


def test_keyframe_crops_of_old_tracks_are_dropped(monkeypatch):
    import frvideo.reference as reference
    monkeypatch.setattr(reference, "MAX_HELD_REFERENCES", 2)
    face = _clip_faces(1, 0)[0]
    sel = KeyframeSelector()
    for tid in range(4):  # four tracks one after the other
        sel.update(tid, tid, face, FRONTAL, 0.9, new_track=True)
    held = [tid for tid, s in sel.tracks.items() if s.current is not None]
    assert held == [2, 3]  # memory stays bounded on a long video with many tracks
    assert len(sel.summary()) == 4  # ... while every track still gets its summary line


def test_model_auto_never_picks_the_reference_based_model(frvideo_home):
    from frvideo.restore import auto_model_name
    assert load_model_config("ented").priority > load_model_config("lite").priority
    # ented ships in the package with a priority above lite, yet --model auto skips it (reference-based
    # backends only run when named); which shipped model auto picks (lite, ldbfr) is not this test's concern
    assert auto_model_name() not in ("ented", "ented-paper")


def test_codebook_scores_of_a_float_latent_with_a_bf16_codebook():
    """--precision auto picks bf16 where the CPU has bf16 units: the backends then score a float
    latent against a bf16 codebook (distances in fp32 so near-ties are decided exactly)."""
    from frvideo.nn.quantizer import VectorQuantizer
    torch.manual_seed(0)
    q = VectorQuantizer(16, 8)
    z = torch.randn(2, 8, 4, 4)
    want = q.scores(z)
    got = q.to(torch.bfloat16).scores(z)
    assert got.dtype == torch.float32
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
