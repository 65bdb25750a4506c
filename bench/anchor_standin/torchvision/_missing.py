def missing(name: str):
    """A placeholder for a torchvision function the official inference path never calls."""

    def call(*args, **kwargs):
        raise NotImplementedError(f"torchvision.{name} is not in bench/anchor_standin (not needed by the "
                                  "official CodeFormer inference path)")

    call.__name__ = name.rsplit(".", 1)[-1]
    return call
