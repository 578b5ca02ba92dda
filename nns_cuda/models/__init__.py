"""Model zoo (by name), users' weights and models, and the check for layers the scanner supports.

>>> from nns_cuda import models
>>> m = models.build("simple_cnn", num_classes=10)                     # doctest: +SKIP
>>> m = models.load_model("simple_cnn", weights="ckpt.pt")             # doctest: +SKIP
>>> m, desc = models.from_spec("my_pkg.nets:make_net")                 # doctest: +SKIP
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
from nns_cuda.models.spec import ModelSpecError, from_spec
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
    load_weights,
    unsupported_modules,
)

__all__ = [
    "available", "build", "load_model", "load_weights", "from_spec", "input_shape", "describe",
    "check_supported", "unsupported_modules", "extract_state_dict", "SUPPORTED_LEAF_TYPES",
    "TORCHVISION_MODELS", "UnknownModelError", "WeightsMismatchError", "UnsupportedModuleError",
    "ModelSpecError",
    "FCN", "FCNRes", "SmallCNN", "LeNet5", "VGGCifar", "AlexNetCifar", "ResNetCifar",
    "BasicBlock", "ResidualBlock",
]
