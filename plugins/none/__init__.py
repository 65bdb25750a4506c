"""The ``none`` backend: faces pass through unchanged.

Lets detection, tracking, alignment and blending be previewed (with ``--draw``)
and measured without any model cost.
"""
import torch

from frvideo.restore import RestoreContext, Restorer


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


class NoneRestorer(Restorer):
    name = "none"

    @classmethod
    def build_network(cls, arch: dict) -> torch.nn.Module:
        return _Identity()

    def restore(self, faces: torch.Tensor, ctx: RestoreContext) -> torch.Tensor:
        return faces
