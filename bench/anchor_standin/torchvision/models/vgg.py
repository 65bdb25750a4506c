from .._missing import missing

vgg19 = missing("models.vgg.vgg19")
vgg16 = missing("models.vgg.vgg16")
