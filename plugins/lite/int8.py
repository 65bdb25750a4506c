"""``lite`` in int8 (``--precision int8``): the network split at the token interface into two
ONNX Runtime graphs, so the pipeline's codebook-token smoothing still runs between them:

* encoder graph: face ``x`` -> token ``logits``, the encoder latent ``lq`` and the skip features;
* decoder graph: ``tokens`` (after smoothing), ``lq``, ``x`` and the skips -> the restored face.

Both are built once from the shipped ``lite.pth`` and shipped beside it (the card's ``int8``
entry names them, their sha256 and the sha256 of the checkpoint they were built from). Build
(calibration: aligned crops of faces that are not eval clips, each clean and degraded):

    frvideo dataset ../shared/media/videos/train ../shared/media/images/cropped_faces \\
        --out /tmp/calib --size 256 --every 25
    python -m plugins.lite.int8 --calib /tmp/calib --out plugins/lite/weights

The token predictor stays float: it is cheap (a 16x16 grid) and its logits decide the tokens.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from frvideo.errors import UsageError
from frvideo.nn.int8 import Int8Graph, build_int8_graph
from frvideo.weights import sha256_file

from .arch import LiteEncoding, LiteNet

ENCODER_INPUTS = ["x"]
DECODER_FIXED_INPUTS = ["tokens", "lq", "x"]


def skip_names(net: LiteNet) -> list[str]:
    return [f"skip{i}" for i in range(len(net.decoder.level_channels))]


def decoder_feeds(tokens: torch.Tensor, enc: LiteEncoding, skips: list[str]) -> dict:
    """The decoder graph's inputs (numpy) for ``tokens`` and an encoding."""
    feeds = {"tokens": tokens.to(torch.int64).numpy(), "lq": enc.lq_feat.numpy(), "x": enc.image.numpy()}
    feeds.update({n: s.numpy() for n, s in zip(skips, enc.skips)})
    return feeds


class _Encoder(torch.nn.Module):
    def __init__(self, net: LiteNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        enc = self.net.encode(x)
        return (enc.logits, enc.lq_feat, *enc.skips)


class _Decoder(torch.nn.Module):
    """Fidelity w is fixed at build time (the card's default, 1.0): a graph input would keep the
    CFT branches that w = 0 removes, for no use in the pipeline."""

    def __init__(self, net: LiteNet, w: float):
        super().__init__()
        self.net, self.w = net, float(w)

    def forward(self, tokens, lq, x, *skips):
        return self.net.decode(tokens, LiteEncoding(None, lq, list(skips), x), w=self.w)


class LiteInt8:
    """The two graphs of one lite checkpoint, called like LiteNet.encode / LiteNet.decode."""

    def __init__(self, encoder: Path, decoder: Path, threads: int, fidelity: float):
        self.encoder = Int8Graph(encoder, threads)
        self.decoder = Int8Graph(decoder, threads)
        self.fidelity = float(fidelity)
        self.skips = [n for n in self.decoder.input_names if n not in DECODER_FIXED_INPUTS]

    def encode(self, x: torch.Tensor) -> LiteEncoding:
        image = x.float().contiguous()
        logits, lq, *skips = self.encoder(x=image.numpy())
        return LiteEncoding(torch.from_numpy(logits), torch.from_numpy(lq), [torch.from_numpy(s) for s in skips],
                            image)

    def decode(self, tokens: torch.Tensor, enc: LiteEncoding, w: float) -> torch.Tensor:
        if abs(float(w) - self.fidelity) > 1e-6:
            raise UsageError(f"lite's int8 graphs are built for --fidelity {self.fidelity:g}; "
                             f"use --precision fp32 for --fidelity {float(w):g}")
        (out,) = self.decoder(**decoder_feeds(tokens, enc, self.skips))
        return torch.from_numpy(out)


def calibration_faces(root: Path, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Each crop of a ``frvideo dataset`` folder clean and once degraded (frvideo-mix), as
    1 x 3 x size x size tensors in [-1, 1]: the range of inputs the pipeline hands lite."""
    from frvideo.train.dataset import FaceCropDataset
    from frvideo.train.degradation import Degradation

    crops = FaceCropDataset(root, size=size)
    degradation = Degradation("frvideo-mix", seed=seed)
    faces = []
    for i in range(len(crops)):
        image = crops.load(i)
        for version in (image, degradation.apply(image)):
            faces.append(torch.from_numpy(np.ascontiguousarray(version)).permute(2, 0, 1)[None].float() / 127.5 - 1)
    return faces


def build(weights: Path, calib: Path, out: Path, fidelity: float = 1.0) -> tuple[Path, Path]:
    from frvideo.restore import load_restorer

    # float32, contiguous (NCHW) as the exporter wants it: not the restorer's channels_last copy
    net = load_restorer("lite", weights=weights).net.to(memory_format=torch.contiguous_format)
    faces = calibration_faces(calib, net.img_size)
    if not faces:
        raise SystemExit(f"no crops in {calib}")
    with torch.no_grad():
        encoded = [net.encode(x) for x in faces]
    names = skip_names(net)
    example = faces[0]
    enc0 = encoded[0]
    tokens0 = enc0.logits.argmax(-1)
    out.mkdir(parents=True, exist_ok=True)
    encoder = build_int8_graph(_Encoder(net), [example], ENCODER_INPUTS, ["logits", "lq", *names],
                               ({"x": x.numpy()} for x in faces), out / "lite_encoder_int8.onnx",
                               keep_float=["/net/predictor"])

    decoder = build_int8_graph(_Decoder(net, fidelity), [tokens0, enc0.lq_feat, example, *enc0.skips],
                               DECODER_FIXED_INPUTS + names, ["out"],
                               (decoder_feeds(e.logits.argmax(-1), e, names) for e in encoded),
                               out / "lite_decoder_int8.onnx")
    return encoder, decoder


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description="Build lite's int8 ONNX Runtime graphs from a checkpoint")
    ap.add_argument("--weights", type=Path, default=here / "weights" / "lite.pth")
    ap.add_argument("--calib", type=Path, required=True, help="a frvideo dataset folder of aligned crops")
    ap.add_argument("--out", type=Path, default=here / "weights")
    args = ap.parse_args()
    paths = build(args.weights, args.calib, args.out)
    print(f"built from {args.weights} (sha256 {sha256_file(args.weights)})")
    for p in paths:
        print(f"{p}: {p.stat().st_size / 1e6:.1f} MB, sha256 {sha256_file(p)}")


if __name__ == "__main__":
    main()
