"""Temporal coherence at the level where flicker starts: the codebook tokens.

Per track and per token position, the codebook scores are turned into
probabilities p_t = softmax(scores_t / tau) and averaged in time,
q_t = normalize(alpha * q_{t-1} + (1 - alpha) * p_t). The previous token is kept
unless another one beats it by ``margin`` in log q_t (hysteresis: the
challenger must be exp(margin) times as probable; a log ratio rather than a
probability difference, so it works the same for a peaked distribution and for
a flat one over a large codebook, where a fixed probability gap would never be
reached and the tokens would freeze), so a face whose
evidence barely changes keeps exactly the same tokens - and decodes to the same
pixels - from frame to frame. State resets on a new track or a scene cut.
Encode and decode stay batched; only this cheap step runs in time order.

Also here: landmark smoothing per track (a centred bilateral window for files,
a causal One-Euro filter for live use), and :class:`FaceFilter`, a
motion-compensated recursive filter of the restored face for what tokens do
not decide (the continuous, input-driven part of a decoder's output).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .faces.crop_filters import gaussian_blur


@dataclass
class _TrackState:
    q: torch.Tensor  # N x K smoothed probabilities
    tokens: torch.Tensor  # N chosen tokens
    frames: int = 1
    flips: int = 0  # token changes, summed over positions


class TokenSmoother:
    def __init__(self, alpha: float = 0.6, margin: float = 0.3, tau: float = 1.0, max_tracks: int = 256):
        if not 0.0 <= alpha < 1.0:
            raise ValueError("temporal alpha must be in [0, 1)")
        if margin < 0:
            raise ValueError("temporal margin must be >= 0")
        self.alpha, self.margin, self.tau = alpha, margin, tau
        self.max_tracks = max_tracks
        self.tracks: OrderedDict[int, _TrackState] = OrderedDict()
        self.finished: list[tuple[int, int, int, int]] = []  # (track, frames, positions, flips) of ended tracks

    def reset(self) -> None:
        for tid in list(self.tracks):
            self._end(tid)

    def _end(self, tid: int) -> None:
        s = self.tracks.pop(tid)
        self.finished.append((tid, s.frames, s.tokens.numel(), s.flips))

    def choose(self, scores: torch.Tensor, track_ids: list[int], new_track: list[bool]) -> torch.Tensor:
        """Tokens (B x N) for a batch of faces given in time order within each track."""
        probs = torch.softmax(scores.float() / self.tau, dim=-1)
        out = torch.empty(scores.shape[:2], dtype=torch.long, device=scores.device)
        for b, tid in enumerate(track_ids):
            p = probs[b]
            state = self.tracks.get(tid)
            if new_track[b] and state is not None:
                self._end(tid)
                state = None
            if state is None:
                tokens = p.argmax(-1)
                self.tracks[tid] = _TrackState(p.clone(), tokens)
                if len(self.tracks) > self.max_tracks:
                    self._end(next(iter(self.tracks)))
            else:
                q = self.alpha * state.q + (1.0 - self.alpha) * p
                q = q / q.sum(-1, keepdim=True)
                best = q.argmax(-1)
                keep = q.gather(-1, state.tokens[:, None])[:, 0].clamp_min(1e-30)
                switch = torch.log(q.gather(-1, best[:, None])[:, 0] / keep) > self.margin
                tokens = torch.where(switch, best, state.tokens)
                state.flips += int((tokens != state.tokens).sum())
                state.q, state.tokens = q, tokens
                state.frames += 1
                self.tracks.move_to_end(tid)
            out[b] = tokens
        return out

    def flip_rates(self) -> dict[int, float]:
        """Per track: fraction of token positions that changed per frame transition."""
        rows = list(self.finished) + [(t, s.frames, s.tokens.numel(), s.flips) for t, s in self.tracks.items()]
        return {t: flips / (positions * (frames - 1)) for t, frames, positions, flips in rows if frames > 1}


# -- landmark smoothing ------------------------------------------------------------

def face_scale(landmarks: np.ndarray) -> float:
    """A size for normalising landmark motion: eye-to-mouth extent (robust to head turns)."""
    eyes = landmarks[:2].mean(0)
    mouth = landmarks[3:].mean(0)
    return max(float(np.linalg.norm(eyes - mouth)), float(np.linalg.norm(landmarks[0] - landmarks[1])), 1.0)


def centered_landmarks(past: list[np.ndarray], current: np.ndarray, future: list[np.ndarray],
                       sigma_frames: float, sigma_motion: float = 0.04) -> np.ndarray:
    """Bilateral average in time: near frames with similar landmarks count most.

    Detector jitter (~1-2 % of the face) is averaged away, while a real head
    move (landmarks differ by more than ``sigma_motion`` of the face size) gets
    little weight, so the crop does not lag behind the face.
    """
    scale = face_scale(current)
    pts, offsets = [current], [0]
    pts += past[::-1]
    offsets += [-(i + 1) for i in range(len(past))]
    pts += future
    offsets += [i + 1 for i in range(len(future))]
    stack = np.stack(pts).astype(np.float64)
    d = np.linalg.norm(stack - current[None], axis=2).mean(1) / scale
    w = np.exp(-0.5 * (np.asarray(offsets) / max(sigma_frames, 1e-6)) ** 2 - 0.5 * (d / sigma_motion) ** 2)
    return (stack * w[:, None, None]).sum(0) / w.sum()


class OneEuroLandmarks:
    """Causal One-Euro filter (Casiez et al. 2012) per track, for live use (no delay).

    Works in face-size units so one setting fits small and large faces:
    cutoff = min_cutoff + beta * |speed|; slow jitter is smoothed hard, fast
    motion passes with little lag.
    """

    def __init__(self, fps: float, min_cutoff: float = 1.5, beta: float = 2.0, d_cutoff: float = 1.0):
        self.dt = 1.0 / max(fps, 1e-3)
        self.min_cutoff, self.beta, self.d_cutoff = min_cutoff, beta, d_cutoff
        self.state: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _alpha(self, cutoff):
        r = 2 * math.pi * cutoff * self.dt
        return r / (r + 1)

    def reset(self) -> None:
        self.state.clear()

    def __call__(self, track_id: int, landmarks: np.ndarray, new_track: bool) -> np.ndarray:
        x = landmarks.astype(np.float64)
        if new_track or track_id not in self.state:
            self.state[track_id] = (x, np.zeros_like(x))
            return x
        prev, dprev = self.state[track_id]
        scale = face_scale(x)
        dx = (x - prev) / self.dt / scale
        a_d = self._alpha(self.d_cutoff)
        dx = a_d * dx + (1 - a_d) * dprev
        speed = float(np.linalg.norm(dx, axis=1).mean())
        a = self._alpha(self.min_cutoff + self.beta * speed)
        out = a * x + (1 - a) * prev
        self.state[track_id] = (out, dx)
        return out


# -- restored-face smoothing -----------------------------------------------------------

class FaceFilter:
    """Motion-compensated, motion-adaptive recursive filter of the restored face, per track,
    in the aligned crop.

    A per-frame restorer flickers two ways: decoders that draw on the input
    (CodeFormer's w, lite's fidelity gate, VQFR's texture branch) pass the
    input's noise and compression shimmer through, and decoders that draw on a
    prior (a codebook, a diffusion sampler) invent a slightly different eye or
    tooth texture every frame. The filter keeps a running face per track:
    out_t = y_t + k * (warp(out_{t-1}) - y_t), where warp follows the motion
    measured by dense optical flow (OpenCV DIS) and k is high only where nothing
    really changed. "Really" is read from the *guide*:

    * ``guide="input"`` (default): motion and change are measured on the input
      crops the faces were restored from, blurred (``guide_blur``): a blink or
      a mouth opening is in the input, a texture the decoder drew anew is not,
      so invented detail is held still without holding back real motion.
      k = strength * exp(-(|blur(x_t - warp(x_{t-1}))| / threshold)^2)
      * exp(-(|blur(y_t - warp(out_{t-1}))| / output_threshold)^2); the second,
      loose gate lets go where the restored face jumps far from the past (a
      flow failure the blurred input cannot show).
    * ``guide="output"``: both measured on the restored faces (flow between
      them, gate on their change with ``threshold``): for callers without the
      input crops. It cannot tell invented texture from motion: the flow
      "explains" a new texture as movement, so prior-driven flicker survives.

    Given the input crops, the filter also acts only where the restorer changed
    the face: k is multiplied by min(1, blur(|y_t - x_t|) / restorer_change), so a
    face the restorer left as it was (the ``none`` backend, a clean face) is left
    exactly as it was, and the filter never adds a change of its own.

    The classical motion-compensated temporal denoiser, written here because it
    runs per track in aligned-crop space, which no library offers. State resets
    on a new track or a scene cut.
    """

    def __init__(self, strength: float = 0.8, threshold: float = 0.08, guide: str = "input",
                 motion_compensation: bool = True, guide_blur: float = 3.0,
                 output_threshold: float = 0.3, output_blur: float = 1.5, max_tracks: int = 256,
                 restorer_change: float = 2.0 / 255.0):
        if not 0.0 <= strength < 1.0:
            raise ValueError("face filter strength must be in [0, 1)")
        if threshold <= 0 or output_threshold <= 0:
            raise ValueError("face filter thresholds must be > 0")
        if guide not in ("input", "output"):
            raise ValueError(f"face filter guide must be input or output, not {guide!r}")
        self.strength, self.threshold, self.guide = strength, threshold, guide
        self.output_threshold, self.output_blur, self.guide_blur = output_threshold, output_blur, guide_blur
        self.motion_compensation = motion_compensation
        self.restorer_change = restorer_change
        self.max_tracks = max_tracks
        # per track: the filtered face and the input crop of its last frame
        self.tracks: OrderedDict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = OrderedDict()
        self._dis = None
        self._grid = None  # pixel coordinates of the crop, for cv2.remap

    def reset(self) -> None:
        self.tracks.clear()

    @staticmethod
    def _blur(x: torch.Tensor, sigma_at_256: float) -> torch.Tensor:
        # the kernel scales with the crop so a setting means the same at 256 and 512
        return gaussian_blur(x, sigma_at_256 * x.shape[-1] / 256, "replicate", truncate=2.5)

    def _change(self, a: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
        """Local |a - b| in [0, 1] units (the tensors are in [-1, 1]), 1 x 1 x S x S."""
        return self._blur(a - b, sigma).abs().mean(1, keepdim=True) * 0.5

    def _align_previous(self, prev: torch.Tensor, now_src: torch.Tensor, prev_src: torch.Tensor) -> torch.Tensor:
        """``prev`` (1 x C x S x S) warped by the optical flow from ``prev_src`` to ``now_src``
        (1 x 3 x S x S images the motion is measured on)."""
        import cv2
        if self._dis is None:
            self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)

        def grey(t):
            return np.ascontiguousarray(((t[0].mean(0) + 1) * 127.5).clamp(0, 255).byte().cpu().numpy())

        flow = self._dis.calc(grey(now_src), grey(prev_src), None)  # where each pixel of now is in prev
        h, w = flow.shape[:2]
        if self._grid is None or self._grid[0].shape != (h, w):  # the crop size is fixed per run: build once
            self._grid = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        gx, gy = self._grid
        img = prev[0].permute(1, 2, 0).cpu().numpy()
        warped = cv2.remap(img, gx + flow[..., 0], gy + flow[..., 1], cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        return torch.from_numpy(warped).permute(2, 0, 1)[None].to(prev.device)

    def __call__(self, faces: torch.Tensor, track_ids: list[int], new_track: list[bool],
                 inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Filtered faces (B x 3 x S x S, [-1, 1]), given in time order within each track.
        ``inputs``: the crops the faces were restored from (needed by the input guide)."""
        if self.strength == 0:
            return faces
        by_input = self.guide == "input"
        if by_input and (inputs is None or inputs.shape != faces.shape):
            raise ValueError("the input-guided face filter needs the input crops, one per face")
        if inputs is not None and inputs.shape != faces.shape:
            raise ValueError("the face filter needs one input crop per face")
        out = faces.clone()
        for b, tid in enumerate(track_ids):
            y = faces[b:b + 1].float()
            x = inputs[b:b + 1].float() if inputs is not None else None
            state = None if new_track[b] else self.tracks.get(tid)
            if state is not None and state[0].shape == y.shape:
                prev, prev_x = state
                if by_input:
                    x_blur, prev_x_blur = self._blur(x, self.guide_blur), self._blur(prev_x, self.guide_blur)
                    if self.motion_compensation:  # one flow, measured on the input, moves both
                        both = self._align_previous(torch.cat([prev, prev_x_blur], 1), x_blur, prev_x_blur)
                        prev, prev_x_blur = both[:, :3], both[:, 3:]
                    # blurred first, then compared: the same as comparing blurs, the warp aside
                    in_change = (x_blur - prev_x_blur).abs().mean(1, keepdim=True) * 0.5
                    k = torch.exp(-(in_change / self.threshold) ** 2) \
                        * torch.exp(-(self._change(y, prev, self.output_blur) / self.output_threshold) ** 2)
                else:
                    if self.motion_compensation:
                        prev = self._align_previous(prev, y, prev)
                    k = torch.exp(-(self._change(y, prev, self.output_blur) / self.threshold) ** 2)
                if x is not None:  # only where the restorer changed the face
                    changed = self._blur((y - x).abs(), self.output_blur).mean(1, keepdim=True) * 0.5
                    k = k * (changed / self.restorer_change).clamp(max=1.0)
                y = y + self.strength * k * (prev - y)
            self.tracks[tid] = (y, x)
            self.tracks.move_to_end(tid)
            if len(self.tracks) > self.max_tracks:
                self.tracks.popitem(last=False)
            out[b:b + 1] = y.to(out.dtype)
        return out
