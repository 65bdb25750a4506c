"""Video input/output on PyAV: decode with timestamps, encode, copy other streams."""
from .reader import VideoInfo, VideoReader, open_reader
from .writer import EncodeOptions, VideoWriter, open_writer

__all__ = ["VideoInfo", "VideoReader", "open_reader", "EncodeOptions", "VideoWriter", "open_writer"]
