"""frvideo: face restoration for video, streaming end to end."""

__version__ = "0.1.0"

__all__ = ["Filter", "__version__"]


def __getattr__(name: str):
    # `from frvideo import Filter` loads frvideo.filter only when asked for: `import frvideo`
    # (and so `frvideo --help`) stays free of torch; Filter() itself imports the pipeline
    if name == "Filter":
        from .filter import Filter
        return Filter
    raise AttributeError(f"module 'frvideo' has no attribute {name!r}")
