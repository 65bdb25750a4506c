"""Temporal coherence at the level where flicker starts: the codebook tokens.

Per track and per token position, the codebook scores are turned into
probabilities p_t = softmax(scores_t / tau) and averaged in time,
q_t = normalize(alpha * q_{t-1} + (1 - alpha) * p_t). The previous token is kept
unless another one beats it in q_t by ``margin`` (hysteresis), so a face whose
evidence barely changes keeps exactly the same tokens - and decodes to the same
pixels - from frame to frame. State resets on a new track or a scene cut.
Encode and decode stay batched; only this cheap step runs in time order.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class _TrackState:
    q: torch.Tensor  # N x K smoothed probabilities
    tokens: torch.Tensor  # N chosen tokens
    frames: int = 1
    flips: int = 0  # token changes, summed over positions


class TokenSmoother:
    def __init__(self, alpha: float = 0.6, margin: float = 0.1, tau: float = 1.0, max_tracks: int = 256):
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
                keep_score = q.gather(-1, state.tokens[:, None])[:, 0]
                switch = q.gather(-1, best[:, None])[:, 0] - keep_score > self.margin
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
