"""What this machine can do, read at run time: cores, native bf16, the thread split.

* ``native_bf16_cpu()``: bf16 matrix units on the CPU (x86 ``avx512_bf16`` or
  ``amx_bf16`` in /proc/cpuinfo's flags; ``bf16`` in an Arm CPU's features). Without
  them torch emulates bf16 and a model runs many times slower than in fp32 (measured
  here on an AVX2 CPU: a first batch of 4 CodeFormer faces had not finished after
  581 CPU-s, while a whole fp32 run of the same clip took about 190-240).
* ``default_threads()``: compute threads for torch (and OpenCV, and each codec): one
  core left for the pipeline's other stages (decoding, detection ahead, encoding run
  side by side with the model), at most 8; on a 2-core machine both cores, since leaving
  one idles half the machine while the model runs: measured there (bench/README.md,
  "Against the official CodeFormer script"), CodeFormer 39 s wall with 2 threads vs 53 s
  with 1, lite equal (23.2 s) at +12% CPU. Waiting OpenMP threads sleep
  (OMP_WAIT_POLICY=PASSIVE, set by the CLI); spinning ones wasted CPU when cores were
  shared (one RetinaFace detection: 0.09 CPU-s with 1 thread, 1.38 with 2 on a loaded
  2-core machine, before that setting).
"""
from __future__ import annotations

import os
import platform
from functools import lru_cache

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    cores = usable_cores()
    return cores if cores <= 2 else min(8, cores - 1)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 ``flags`` / Arm ``Features`` of /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16_cpu() -> bool:
    flags = cpu_flags()
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "bf16" in flags
    return any(f in flags for f in BF16_CPU_FLAGS)


def apply_threads(n: int) -> None:
    """Use ``n`` compute threads in torch and OpenCV, and per codec (see frvideo.io)."""
    import cv2
    import torch

    from .io import set_codec_threads

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)  # the pipeline's own threads are the parallelism between ops
    except RuntimeError:  # already set, or parallel work has started (a second run in one process)
        pass
    cv2.setNumThreads(n)
    set_codec_threads(n)
