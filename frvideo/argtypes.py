"""Number types for argparse options: one parser for every range check, so each
command-line tool reports a bad value the same way (a one-line usage error)."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional


def number(kind: type = float, low: Optional[float] = None, high: Optional[float] = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type=`` that parses ``kind`` (int or float) within [low, high]
    (an open end with ``low_open``/``high_open``; None = unbounded). NaN and inf are refused."""
    noun = "a whole number" if kind is int else "a number"
    lo = "(" if low_open or low is None else "["
    hi = ")" if high_open or high is None else "]"
    interval = f"{lo}{'-inf' if low is None else format(low, 'g')}, {'inf' if high is None else format(high, 'g')}{hi}"

    def parse(text: str):
        try:
            v = kind(text.strip()) if isinstance(text, str) else kind(text)
        except (ValueError, TypeError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if isinstance(v, float) and not math.isfinite(v):  # nan, inf: never a meaningful setting
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        outside = (isinstance(v, float) and math.isnan(v)) \
            or (low is not None and (v <= low if low_open else v < low)) \
            or (high is not None and (v >= high if high_open else v > high))
        if outside:
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return v

    parse.range_checked = True  # tests: every numeric option must use this parser
    return parse
