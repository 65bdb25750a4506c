"""The ``ented`` backend: reference-based face restoration (ENTED).

A degraded face is restored with the help of a high-quality reference face of
the same person; in a video the pipeline gives each track a keyframe of that
track as reference (``frvideo.reference``). Architecture in ``arch.py``;
training stage ``ented`` in ``train.py`` (``frvideo train configs/train/ented.yaml``);
the shipped small model and how it was made: ``RECIPE.md``.

Contract (frvideo.restore): ``needs_reference``; ``encode`` gives the negative
squared distances of the content latent to the VQ dictionary (B x N x K), so the
pipeline's token smoother applies; ``decode(encoded, tokens, ctx)`` looks the
tokens up and decodes with the reference ``ctx.references`` (B x 3 x S x S,
[-1, 1]). Reference features (E_ref, texture extraction) are cached per
``ctx.reference_ids`` entry: a keyframe is encoded once, not once per frame.
Without ``ctx.references`` the face serves as its own reference (``restore``
on a lone photo); the result is then the model without outside help.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Hashable, Optional

import torch

from frvideo.errors import WeightsError
from frvideo.restore import Encoded, RestoreContext, Restorer, read_checkpoint

from .arch import EntedEncoding, EntedNet, ReferenceFeatures, channels_last_convs

__all__ = ["EntedRestorer", "EntedNet", "load_vqfr_codebook"]

REFERENCE_CACHE = 32  # reference feature sets kept (one per live track keyframe is enough)


class EntedRestorer(Restorer):
    name = "ented"
    input_size = 256  # the shipped card's; a card with another img_size sets its own
    codebook_size = 512
    needs_reference = True
    # only when named: the output depends on the reference, and the shipped model measures below lite
    auto_select = False
    train_stages = {"ented": "plugins.ented.train:EntedTrainer"}

    def __init__(self, net, config):
        super().__init__(net, config)
        self.input_size = net.img_size
        self.codebook_size = net.codebook_size
        self._ref_cache: OrderedDict[Hashable, ReferenceFeatures] = OrderedDict()
        self.reference_passes = 0  # E_ref runs so far (how often the cache missed)

    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        return EntedNet(**arch)

    def to(self, device, dtype: torch.dtype = torch.float32) -> "EntedRestorer":
        channels_last_convs(self.net.to(device=device, dtype=dtype))
        self._ref_cache.clear()
        return self

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype).contiguous(memory_format=torch.channels_last)

    # -- references ---------------------------------------------------------------
    @torch.no_grad()
    def reference_features(self, refs: torch.Tensor, ids: Optional[list] = None) -> ReferenceFeatures:
        """B x 3 x S x S references -> their features; rows with an id are cached under it
        (the same id must always mean the same reference image)."""
        ids = list(ids) if ids is not None else [None] * refs.shape[0]
        if len(ids) != refs.shape[0]:
            raise ValueError(f"{len(ids)} reference ids for {refs.shape[0]} references")
        todo = [i for i, key in enumerate(ids) if key is None or key not in self._ref_cache]
        # one E_ref pass for the distinct new references of the batch
        first: dict = {}
        for i in todo:
            first.setdefault(ids[i] if ids[i] is not None else ("row", i), i)
        fresh = {}
        if first:
            rows = list(first.values())
            feats = self.net.reference(self._prep(refs[rows]))
            self.reference_passes += len(rows)
            for j, (key, _) in enumerate(first.items()):
                fresh[key] = feats.index(j)
                if ids[rows[j]] is not None:
                    self._ref_cache[key] = fresh[key]
                    while len(self._ref_cache) > REFERENCE_CACHE:
                        self._ref_cache.popitem(last=False)
        items = []
        for i, key in enumerate(ids):
            if key is None:
                items.append(fresh[("row", i)])
            else:
                if key in self._ref_cache:
                    self._ref_cache.move_to_end(key)
                items.append(self._ref_cache[key] if key in self._ref_cache else fresh[key])
        return ReferenceFeatures.cat(items)

    # -- the contract ---------------------------------------------------------------
    @torch.no_grad()
    def encode(self, faces: torch.Tensor, ctx: RestoreContext) -> Encoded:
        x = self._prep(faces)
        enc = self.net.encode(x)
        scores = self.net.quantize.scores(enc.z.float())
        return Encoded(scores=scores, state={"z": enc.z, "feats": enc.feats, "faces": x})

    @torch.no_grad()
    def decode(self, encoded: Encoded, tokens: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        st = encoded.state
        if ctx is not None and ctx.references is not None:
            ref = self.reference_features(ctx.references, getattr(ctx, "reference_ids", None))
        else:
            ref = self.reference_features(st["faces"])  # no reference: the face itself
        out = self.net.decode(tokens.to(self.device), EntedEncoding(st["z"], st["feats"]), ref)
        return out.clamp(-1, 1).contiguous()


def load_vqfr_codebook(net: EntedNet, path: str | Path) -> str:
    """Initialise the VQ dictionary from a VQFR checkpoint (as the paper does).

    VQFR v2 keeps it as ``quantizer.embedding.weight``, v1 per level as
    ``quantize_group.quantize_dict.<level>.embedding.weight``; the first of those
    whose shape equals the dictionary's (K x emb_dim) is used. Returns its key."""
    state = read_checkpoint(Path(path), ["params_ema", "params"])
    want = tuple(net.quantize.embedding.weight.shape)
    keys = [k for k in state if k.endswith("embedding.weight")]
    keys.sort(key=lambda k: (k != "quantizer.embedding.weight", k))
    for k in keys:
        if tuple(state[k].shape) == want:
            with torch.no_grad():
                net.quantize.embedding.weight.copy_(state[k].float())
            return k
    found = ", ".join(f"{k} {tuple(state[k].shape)}" for k in keys) or "no embedding.weight entries"
    raise WeightsError(f"{path} has no VQ dictionary of shape {want} (found: {found})")
