"""A stand-in for torchvision, for bench/anchor.py's official side only.

torchvision's wheel on the package index is CUDA-only and cannot be imported on the
project's CPU machine, and the official CodeFormer code imports it at module level.
This package, written for the benchmark, supplies just what the official inference path
(inference_codeformer.py with RetinaFace and ParseNet) reaches: ``ops.nms``,
``models._utils.IntermediateLayerGetter`` and ``transforms.functional.normalize``. Every
other name the official modules import exists only so that the imports succeed and
raises if it is ever called, so a run that needed more would fail loudly, not differ.
frvideo itself never imports this package.
"""
__version__ = "0.0+frvideo.standin"

from . import models, ops, transforms, utils  # noqa: E402,F401
