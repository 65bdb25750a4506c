"""Training support: the synthetic degradation model (``degradation``) that
turns clean faces or clips into low-quality inputs for training and for
synthetic benchmarks; dataset builder, trainer and losses live beside it."""
