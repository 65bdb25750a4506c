import torch

from .._missing import missing

adjust_brightness = missing("transforms.functional.adjust_brightness")
adjust_contrast = missing("transforms.functional.adjust_contrast")
adjust_hue = missing("transforms.functional.adjust_hue")
adjust_saturation = missing("transforms.functional.adjust_saturation")
rgb_to_grayscale = missing("transforms.functional.rgb_to_grayscale")


def normalize(tensor: torch.Tensor, mean, std, inplace: bool = False) -> torch.Tensor:
    """(tensor - mean) / std per channel of a (..., C, H, W) float tensor, as torchvision does."""
    if not inplace:
        tensor = tensor.clone()
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std)
