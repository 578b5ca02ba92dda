"""Model zoo (by name), users' weights, and the check for layers the scanner supports.

>>> from nns_cuda import models
>>> m = models.build("simple_cnn", num_classes=10)                     # doctest: +SKIP
>>> m = models.load_model("simple_cnn", weights="ckpt.pt")             # doctest: +SKIP
"""
from nns_cuda.models.nets import (
    FCN,
    AlexNetCifar,
    BasicBlock,
    FCNRes,
    LeNet5,
    ResidualBlock,
    ResNetCifar,
    SmallCNN,
    VGGCifar,
)
from nns_cuda.models.zoo import (
    SUPPORTED_LEAF_TYPES,
    TORCHVISION_MODELS,
    UnknownModelError,
    UnsupportedModuleError,
    WeightsMismatchError,
    available,
    build,
    check_supported,
    describe,
    extract_state_dict,
    input_shape,
    load_model,
    unsupported_modules,
)

__all__ = [
    "available", "build", "load_model", "input_shape", "describe", "check_supported",
    "unsupported_modules", "extract_state_dict", "SUPPORTED_LEAF_TYPES", "TORCHVISION_MODELS",
    "UnknownModelError", "WeightsMismatchError", "UnsupportedModuleError",
    "FCN", "FCNRes", "SmallCNN", "LeNet5", "VGGCifar", "AlexNetCifar", "ResNetCifar",
    "BasicBlock", "ResidualBlock",
]
