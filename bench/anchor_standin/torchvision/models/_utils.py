from collections import OrderedDict

from torch import nn


class IntermediateLayerGetter(nn.ModuleDict):
    """torchvision's contract: keep a model's direct children up to the last one named in
    ``return_layers`` (a dict child name -> output name), run them in order, and return an
    OrderedDict of the named children's outputs. Same child names, so state-dict keys match."""

    def __init__(self, model: nn.Module, return_layers: dict):
        if not set(return_layers).issubset(name for name, _ in model.named_children()):
            raise ValueError("return_layers are not present in model")
        wanted = dict(return_layers)
        layers = OrderedDict()
        for name, module in model.named_children():
            layers[name] = module
            wanted.pop(name, None)
            if not wanted:
                break
        super().__init__(layers)
        self.return_layers = dict(return_layers)

    def forward(self, x):
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out
