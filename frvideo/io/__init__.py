"""Video input/output on PyAV: decode with timestamps, encode, copy other streams."""
from .reader import VideoInfo, VideoReader, open_reader
from .writer import EncodeOptions, VideoWriter, open_writer

__all__ = ["VideoInfo", "VideoReader", "open_reader", "EncodeOptions", "VideoWriter", "open_writer",
           "set_codec_threads", "codec_threads"]

_CODEC_THREADS = [0]  # 0: FFmpeg's own choice


def set_codec_threads(n: int) -> None:
    """Threads for each decoder and encoder opened from now on (``--threads``; 0 = FFmpeg's choice)."""
    _CODEC_THREADS[0] = int(n)


def codec_threads() -> int:
    return _CODEC_THREADS[0]
