"""Layers shared by the backends (each written once, used by several plugins)."""
