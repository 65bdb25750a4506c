"""Face detection, tracking, alignment and blending."""
