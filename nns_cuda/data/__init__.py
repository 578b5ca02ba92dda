"""Data: the embedded default data set ("cluttered digits") and loaders for users' data.

Every data set yields ``(x, y, fg_mask)``: ``x`` float32 ``[C, H, W]``, ``y`` an int class
index, ``fg_mask`` bool ``[H, W]`` (the union of the object boxes, docs/spec.md §3).

>>> from nns_cuda import data
>>> ds = data.cluttered_digits(split="train", seed=0)     # doctest: +SKIP
>>> x, y, fg_mask = ds[0]                                  # doctest: +SKIP
"""
from nns_cuda.data._io import default_cache_dir
from nns_cuda.data.cluttered import (
    DEFAULT_STYLE,
    SMALL_TRAIN_SIZE,
    ClutteredDigits,
    SplitLoaders,
    cluttered_digits,
    cluttered_digits_loaders,
    generate_cluttered_digits,
    source_split_indices,
)
from nns_cuda.data.loaders import (
    BoxOutOfImageError,
    CifarFolder,
    CocoBoxes,
    DataFormatError,
    ImageFolderBoxes,
    load_image,
    make_loaders,
    read_voc_xml,
)
from nns_cuda.data.transforms import PairTransform, boxes_to_mask

__all__ = [
    "ClutteredDigits",
    "SplitLoaders",
    "SMALL_TRAIN_SIZE",
    "DEFAULT_STYLE",
    "cluttered_digits",
    "cluttered_digits_loaders",
    "generate_cluttered_digits",
    "source_split_indices",
    "ImageFolderBoxes",
    "CocoBoxes",
    "CifarFolder",
    "read_voc_xml",
    "load_image",
    "make_loaders",
    "DataFormatError",
    "BoxOutOfImageError",
    "PairTransform",
    "boxes_to_mask",
    "default_cache_dir",
]
