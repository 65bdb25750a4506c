from . import _utils, vgg  # noqa: F401
from .._missing import missing

mobilenet_v2 = missing("models.mobilenet_v2")
resnet50 = missing("models.resnet50")
