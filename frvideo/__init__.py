"""frvideo: face restoration for video, streaming end to end."""

__version__ = "0.1.0"
