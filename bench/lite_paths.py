"""Which part of ``lite`` does the restoring: the network's paths one by one on aligned faces
of the eval clips, before the pipeline's blend (so what the model itself does is seen).

Faces: the largest face of frames 0, 8 and 16 of each eval clip (RetinaFace-mobile landmarks
of the clean frame, aligned to 256), clean and in the quality bench's three degraded
families (bench/quality.py: ``mild`` and ``vqfr`` with a real x264 pass, ``simple``), the same
per-clip parameter draws as that bench.

Paths (all from the same weights):

* ``w=1``: the model as the pipeline runs it at the card's fidelity (its own tokens);
* ``w=1, clean tokens``: the tokens the encoder picks on the *clean* face (an oracle): how much
  better the codebook could make it;
* ``w=1, no codebook``: the encoder latent decoded as it is, no quantization;
* ``w=0``: the codebook prior alone (``--fidelity 0``);
* ``w=1, flip ensemble``: the mean of the face and its mirror image restored (test-time
  self-ensemble, twice the cost).

Metrics vs the clean crop: PSNR over the face region of the crop (bench/lite_quality.py's
box) and the identity distance (frvideo.identity: dlib's descriptor, the same box for every
row).

    FRVIDEO_HOME=<detectors> OMP_NUM_THREADS=1 python bench/lite_paths.py [--weights PATH] [--panels DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lite_quality import face_region  # noqa: E402
from quality import SHARED, degrade_family, face_scale, read_clip  # noqa: E402

from frvideo.faces.align import similarity_transforms, warp_faces  # noqa: E402
from frvideo.faces.detect import load_detector  # noqa: E402
from frvideo.identity import IdentityModel  # noqa: E402
from frvideo.metrics import psnr  # noqa: E402
from frvideo.pipeline import crops_to_tensor  # noqa: E402
from frvideo.restore import load_restorer  # noqa: E402

FRAMES = (0, 8, 16)
SIZE = 256
ID_BOX = (28, 28, 228, 240)  # the face in a 256 aligned crop, for dlib's landmarks


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return crops_to_tensor(img[None], "cpu", torch.float32)


def to_image(y: torch.Tensor) -> np.ndarray:
    return ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()


def paths(net):
    """name -> f(degraded, clean) -> restored, every tensor 1 x 3 x S x S in [-1, 1]."""
    def own(x, c, w=1.0):
        e = net.encode(x)
        return net.decode(e.logits.argmax(-1), e, w=w)

    def clean_tokens(x, c):
        e = net.encode(x)
        return net.decode(net.encode(c).logits.argmax(-1), e, w=1.0)

    def no_codebook(x, c):
        e = net.encode(x)
        return net.decode_latent(e.lq_feat, e.skips, 1.0, e.image)

    def flip_ensemble(x, c):
        y = own(torch.cat([x, x.flip(-1)]), None)
        return 0.5 * (y[:1] + y[1:].flip(-1))

    return {"w=1": own, "w=1, clean tokens": clean_tokens, "w=1, no codebook": no_codebook,
            "w=0": lambda x, c: own(x, c, 0.0), "w=1, flip ensemble": flip_ensemble}


def largest(detections):
    return detections.landmarks[int(np.argmax(detections.boxes[:, 2] - detections.boxes[:, 0]))]


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default=None, help="a lite checkpoint (default: the shipped lite.pth)")
    ap.add_argument("--panels", default=None, help="folder for clean | degraded | each path PNGs (frame 8)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    detector = load_detector("retinaface-mobile")
    net = load_restorer("lite", weights=args.weights).net.eval()
    identity = IdentityModel()
    region = face_region(SIZE)
    runs = paths(net)
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for number, clip in enumerate(sorted((SHARED / "media/videos/eval").glob("*.mp4"))):
        clean, fps = read_clip(clip, max(FRAMES) + 1)
        scale = face_scale(largest(detector.detect(clean[0])))
        families = {f: degrade_family(f, clean, fps, number, scale) for f in ("mild", "vqfr", "simple")}
        for t in FRAMES:
            A = similarity_transforms(largest(detector.detect(clean[t]))[None], SIZE)
            ref = warp_faces(clean[t], A, SIZE)[0]
            ref_id = identity.descriptor(ref, ID_BOX)
            for family, frames in families.items():
                x = warp_faces(frames[t], A, SIZE)[0]
                outs = {"input": x, **{name: to_image(f(to_tensor(x), to_tensor(ref))) for name, f in runs.items()}}
                for name, out in outs.items():
                    rows.setdefault((family, name), []).append(
                        (psnr(ref, out, region), identity.distance(ref_id, identity.descriptor(out, ID_BOX))))
                if args.panels and t == FRAMES[1]:
                    Path(args.panels).mkdir(parents=True, exist_ok=True)
                    strip = np.concatenate([ref, *outs.values()], 1)
                    cv2.imwrite(str(Path(args.panels) / f"{clip.stem}_{family}.png"), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
        print(f"{clip.stem} done", file=sys.stderr)
    print("| family | path | face PSNR (dB) | identity | faces |\n|---|---|---|---|---|")
    for family in ("mild", "vqfr", "simple"):
        for name in ("input", *runs):
            v = np.array(rows[(family, name)])
            print(f"| {family} | {name} | {v[:, 0].mean():.2f} | {v[:, 1].mean():.3f} | {len(v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
