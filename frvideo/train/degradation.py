"""Synthetic degradation of clean faces and clips, as in the papers' training.

The model shared by VQFR, CodeFormer and LD-BFR (after GFPGAN / DFDNet):

    y = {[(x (*) k_sigma) |r + n_delta]_JPEG_q} ^r

1. blur with an isotropic Gaussian kernel k_sigma (std ``sigma`` in pixels of
   the input; kernel truncated at 3 sigma, i.e. size 2*ceil(3 sigma) + 1: no
   paper gives a kernel size);
2. downsample by ``r`` (continuous: to round(W / r) x round(H / r), at least
   1 pixel) with **bicubic** interpolation (LD-BFR Sec. 4.1 says bicubic; the
   others don't say);
3. add Gaussian noise of std ``delta`` on the 0-255 scale, independent per
   pixel and channel (CodeFormer Sec. 4.1: "additive Gaussian noise"; VQFR
   doesn't name the noise, LD-BFR mentions Gaussian *or* Poisson for its test
   set - we keep Gaussian), then round and clip to uint8;
4. JPEG-compress with quality ``q`` (OpenCV ``cv2.imencode``, 4:2:0);
5. resize back to the input size with **bilinear** interpolation (the papers
   don't say which; CodeFormer and LD-BFR write the ^r, VQFR's formula omits it
   but trains on 512^2 images, so the size is restored there too).

Parameters are drawn uniformly from the preset's ranges (q as an integer,
both ends included). Presets carry each paper's training ranges:

======================  ==============  ==========  ===========  ==========
preset                  sigma           r           delta        q
======================  ==============  ==========  ===========  ==========
vqfr                    [0.2, 10]       [1, 8]      [0, 15]      [60, 100]
codeformer              [1, 15]         [1, 30]     [0, 20]      [30, 90]
ld-bfr                  [0.2, 10]       [1, 8]      [0, 15]      [60, 100]
ld-bfr-mild (test)      [3, 5]          4           [5, 20]      [60, 80]
ld-bfr-medium (test)    [5, 7]          8           [15, 40]     [40, 60]
ld-bfr-severe (test)    [7, 9]          16          [25, 50]     [30, 40]
======================  ==============  ==========  ===========  ==========

Video: real low-quality video is damaged *consistently* - one camera, one
encoder - so :meth:`Degradation.degrade_clip` draws the parameters once per
clip (same sigma, r, delta, q on every frame; only the noise is fresh per
frame, from a seeded generator), and can then pass the clip through a real
video codec at a low bitrate (:func:`codec_degrade`) for block, ringing and
temporal (motion-compensated) artefacts a per-frame JPEG cannot produce.

Everything is reproducible: the same seed gives bit-identical output (OpenCV
and the codec are run single-threaded where it matters), another seed a
different one.
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Optional, Sequence, Union

import cv2
import numpy as np

__all__ = ["Preset", "DegradationParams", "PRESETS", "get_preset", "Degradation", "degrade",
           "codec_degrade", "at_frame_scale"]


@dataclass(frozen=True)
class Preset:
    name: str
    sigma: tuple[float, float]  # Gaussian blur std, input pixels
    scale: tuple[float, float]  # downsampling factor r (1 = none)
    noise: tuple[float, float]  # Gaussian noise std delta, 0-255 scale
    jpeg: tuple[int, int]  # JPEG quality q, both ends included
    source: str


PRESETS: dict[str, Preset] = {
    # VQFR (Gu et al., ECCV 2022), Sec. 4.1 "Training Datasets": "sigma, r, delta and q are
    # randomly sampled from {0.2:10}, {1:8}, {0:15} and {60:100}". Noise type and the
    # up-resize are not stated: CodeFormer's (Gaussian, resize back) are used.
    "vqfr": Preset("vqfr", (0.2, 10.0), (1.0, 8.0), (0.0, 15.0), (60, 100),
                   "VQFR Sec. 4.1, Training Datasets"),
    # CodeFormer (Zhou et al., NeurIPS 2022), Sec. 4.1 "Training Dataset", Eq. (9): Gaussian
    # kernel k_sigma, downsampling r, additive Gaussian noise n_delta, JPEG q, resize back to
    # 512; "sigma, r, delta, and q from [1, 15], [1, 30], [0, 20], and [30, 90]".
    "codeformer": Preset("codeformer", (1.0, 15.0), (1.0, 30.0), (0.0, 20.0), (30, 90),
                         "CodeFormer Sec. 4.1, Training Dataset, Eq. (9)"),
    # LD-BFR (ACM MM 2024), Sec. 4.1 "Datasets": training follows Eq. (7) with "sigma, r,
    # delta and q randomly sampled from {0.2:10}, {1:8}, {0:15} and {60:100}" (same as VQFR);
    # bicubic downsampling; noise "Gaussian and Poisson" -> Gaussian here.
    "ld-bfr": Preset("ld-bfr", (0.2, 10.0), (1.0, 8.0), (0.0, 15.0), (60, 100),
                     "LD-BFR Sec. 4.1, Datasets, Eq. (7)"),
    # LD-BFR Sec. 4.1 (1) CelebA-Test: the three test splits taken from DR2.
    "ld-bfr-mild": Preset("ld-bfr-mild", (3.0, 5.0), (4.0, 4.0), (5.0, 20.0), (60, 80),
                          "LD-BFR Sec. 4.1, CelebA-Test mild split"),
    "ld-bfr-medium": Preset("ld-bfr-medium", (5.0, 7.0), (8.0, 8.0), (15.0, 40.0), (40, 60),
                            "LD-BFR Sec. 4.1, CelebA-Test medium split"),
    "ld-bfr-severe": Preset("ld-bfr-severe", (7.0, 9.0), (16.0, 16.0), (25.0, 50.0), (30, 40),
                            "LD-BFR Sec. 4.1, CelebA-Test severe split"),
}
# Milder than any paper's ranges: what a phone or webcam recording loses (frvideo's own, for
# the mixtures below: a restorer must also help, and not harm, a lightly damaged face).
PRESETS["light"] = Preset("light", (0.2, 3.0), (1.0, 4.0), (0.0, 8.0), (50, 95), "frvideo: milder than the papers")
# Hard compression of a face that is otherwise only mildly soft (a web re-upload, a small
# stream): the papers pair low JPEG quality only with their strongest blurs, so a network
# trained on them learns to invent a new face wherever it sees blocking.
PRESETS["heavy-jpeg"] = Preset("heavy-jpeg", (0.5, 4.0), (1.0, 6.0), (0.0, 5.0), (20, 50),
                               "frvideo: strong compression, mild blur")
ALIASES = {"ldbfr": "ld-bfr", "ld_bfr": "ld-bfr"}

# Mixtures: each draw first picks a preset by weight, then its parameters.
MIXES: dict[str, tuple[tuple[str, float], ...]] = {
    # lite v2 and the retrained ENTED / LD-BFR: mild to severe
    "frvideo-mix": (("light", 0.4), ("vqfr", 0.35), ("codeformer", 0.25)),
    # lite v3: fewer severe draws and hard compression on its own (a faithful restorer for the
    # mild to moderate damage real footage has; the severe tail teaches the network to invent faces)
    "frvideo-moderate-mix": (("light", 0.3), ("vqfr", 0.35), ("heavy-jpeg", 0.2), ("codeformer", 0.15)),
}


def get_preset(name: Union[str, Preset]):
    """A Preset, or for a mixture name the tuple of (Preset, weight)."""
    if isinstance(name, Preset):
        return name
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key in MIXES:
        return tuple((PRESETS[p], w) for p, w in MIXES[key])
    if key not in PRESETS:
        raise ValueError(f"unknown degradation preset {name!r} (one of {', '.join([*PRESETS, *MIXES])})")
    return PRESETS[key]


@dataclass(frozen=True)
class DegradationParams:
    sigma: float  # blur std (pixels); 0 = no blur
    scale: float  # downsampling factor r >= 1
    noise: float  # noise std on 0-255
    jpeg: int  # JPEG quality 1..100; 100 still re-encodes

    def as_dict(self) -> dict:
        return asdict(self)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    k = 2 * int(math.ceil(3 * sigma)) + 1
    return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def degrade(img: np.ndarray, params: DegradationParams, rng: np.random.Generator) -> np.ndarray:
    """Apply the degradation model with fixed ``params`` to one H x W x 3 uint8 RGB
    image; noise from ``rng``. Returns uint8 RGB of the input's shape."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"degrade wants an H x W x 3 uint8 RGB image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    x = _blur(img.astype(np.float32), params.sigma)
    if params.scale > 1:
        size = (max(1, int(round(w / params.scale))), max(1, int(round(h / params.scale))))
        x = cv2.resize(x, size, interpolation=cv2.INTER_CUBIC)
    if params.noise > 0:
        x = x + rng.normal(0.0, params.noise, x.shape).astype(np.float32)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(x, cv2.COLOR_RGB2BGR),
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(params.jpeg)])
    if not ok:  # pragma: no cover - OpenCV built without JPEG
        raise RuntimeError("OpenCV could not JPEG-encode")
    x = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    if x.shape[:2] != (h, w):
        x = cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)
    return x


class Degradation:
    """``deg = Degradation("codeformer", seed=0)``; ``params = deg.sample()``;
    ``deg.apply(img, params, rng)``; ``deg.degrade_clip(frames)``.

    One seeded generator drives everything, so a given seed and call sequence
    reproduces bit for bit. ``codec``/``bitrate`` make :meth:`degrade_clip`
    finish with :func:`codec_degrade` by default.
    """

    def __init__(self, preset: Union[str, Preset] = "codeformer", seed: Optional[int] = None,
                 codec: Optional[str] = None, bitrate=None):
        self.preset = get_preset(preset)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.codec = codec
        self.bitrate = bitrate
        self.last_params: Optional[DegradationParams] = None  # of the last degrade_clip

    def sample(self) -> DegradationParams:
        p, u = self.preset, self.rng.uniform
        if isinstance(p, tuple):  # a mixture: pick a preset first
            weights = np.array([w for _, w in p], np.float64)
            p = p[int(self.rng.choice(len(p), p=weights / weights.sum()))][0]
        return DegradationParams(sigma=float(u(*p.sigma)), scale=float(u(*p.scale)),
                                 noise=float(u(*p.noise)),
                                 jpeg=int(self.rng.integers(p.jpeg[0], p.jpeg[1] + 1)))

    def apply(self, img: np.ndarray, params: Optional[DegradationParams] = None,
              rng: Optional[np.random.Generator] = None) -> np.ndarray:
        """Degrade one image; ``params`` default to a fresh :meth:`sample`, noise
        comes from ``rng`` (default: this object's generator)."""
        if params is None:
            params = self.sample()
        return degrade(img, params, self.rng if rng is None else rng)

    __call__ = apply

    def degrade_clip(self, frames: Sequence[np.ndarray], params: Optional[DegradationParams] = None,
                     codec: Optional[str] = None, bitrate=None, fps: float = 25) -> list[np.ndarray]:
        """Per-clip degradation: one parameter draw for the whole clip, fresh
        noise per frame from a generator seeded from this object's; then, when
        ``codec`` (or the constructor's) is set, a real codec pass at ``bitrate``."""
        if params is None:
            params = self.sample()
        noise_rng = np.random.default_rng(int(self.rng.integers(2 ** 63)))
        out = [degrade(f, params, noise_rng) for f in frames]
        codec = codec or self.codec
        if codec:
            out = codec_degrade(out, codec=codec, bitrate=bitrate if bitrate is not None else self.bitrate,
                                seed=int(self.rng.integers(2 ** 63)), fps=fps)
        self.last_params = params
        return out


def at_frame_scale(img: np.ndarray, scale: float, damage) -> np.ndarray:
    """``damage`` applied to ``img`` (an aligned crop) as if it happened in a frame where the face
    has ``scale`` frame pixels per crop pixel, then the crop taken back out as the pipeline takes it.

    In a video the camera, the encoder and the bench's degradations damage the *frame*; the
    pipeline then warps the face to the model's input size with a bilinear ``warpAffine``
    (``faces/align.py``), which for a face larger than the crop decimates without low-pass. So a
    blur of sigma frame pixels is sigma / scale crop pixels, JPEG and codec blocks are 8 / scale
    crop pixels, and the noise is resampled. Damage applied to the crop itself (scale 1) only
    ever shows the model 8-pixel blocks. The crop is resized to the frame scale (area when
    smaller, cubic when larger), ``damage``d there, and brought back with bilinear interpolation."""
    h, w = img.shape[:2]
    size = (max(8, int(round(w * scale))), max(8, int(round(h * scale))))
    if size == (w, h):
        return damage(img)
    frame = cv2.resize(img, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    return cv2.resize(damage(frame), (w, h), interpolation=cv2.INTER_LINEAR)


# Default codec bitrate, in bits per pixel per frame: visible blocking on faces at x264.
DEFAULT_BPP = 0.05


def codec_degrade(frames: Sequence[np.ndarray], codec: str = "libx264", bitrate=None,
                  seed: Optional[int] = None, fps: float = 25) -> list[np.ndarray]:
    """Encode RGB uint8 frames (all one size) with a real video codec at a low
    bitrate through PyAV, in memory, and decode them back: same count, size and
    dtype. ``bitrate`` in bit/s: a number, a (low, high) range drawn log-uniformly
    with ``seed``, or None for ``DEFAULT_BPP`` bits per pixel per frame. Codecs:
    whatever FFmpeg encodes to yuv420p (libx264, libx265, mpeg4, libvpx, mpeg2video,
    mjpeg...). Odd sizes are edge-padded to even for 4:2:0, then cropped back."""
    import av

    frames = [np.asarray(f) for f in frames]
    if not frames:
        return []
    h, w = frames[0].shape[:2]
    for f in frames:
        if f.shape != (h, w, 3) or f.dtype != np.uint8:
            raise ValueError(f"codec_degrade wants H x W x 3 uint8 frames of one size; got {f.dtype} {f.shape}")
    # Even height for 4:2:0; width edge-padded to a multiple of 128 so that every plane's row fills
    # its stride: x264 otherwise reads the stride padding PyAV leaves uninitialised, and the same
    # seed gave different frames from call to call (seen with PyAV 18.1 on 720-wide frames).
    ph, pw = h + h % 2, -(-w // 128) * 128
    rng = np.random.default_rng(seed)
    if bitrate is None:
        bitrate = DEFAULT_BPP * w * h * fps  # of the picture, not its padding
    elif isinstance(bitrate, (tuple, list)):
        lo, hi = bitrate
        bitrate = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    bitrate = max(1000, int(bitrate))

    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.bit_rate = bitrate
        cc = stream.codec_context
        cc.thread_count = 1  # deterministic output
        opts = {"threads": "1"}
        if codec == "libx264":
            opts.update(preset="veryfast")
        elif codec == "libx265":
            opts.update(preset="veryfast", **{"x265-params": "log-level=error:pools=1:frame-threads=1"})
        cc.options = opts
        for i, f in enumerate(frames):
            if (ph, pw) != (h, w):
                f = np.pad(f, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24").reformat(format="yuv420p")
            vf.pts = i
            for pkt in stream.encode(vf):
                out.mux(pkt)
        for pkt in stream.encode(None):
            out.mux(pkt)
    buf.seek(0)
    decoded = []
    with av.open(buf, "r") as inp:
        for frame in inp.decode(video=0):
            decoded.append(frame.to_ndarray(format="rgb24")[:h, :w].copy())
    if len(decoded) != len(frames):
        raise RuntimeError(f"{codec} round trip gave {len(decoded)} frames for {len(frames)}")
    return decoded
