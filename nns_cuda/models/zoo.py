"""Model zoo: build models by name, load users' weights, check supported layers."""
from __future__ import annotations

import contextlib
import difflib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from nns_cuda._files import is_torch_archive
from nns_cuda._modules import UnsupportedModuleError
from nns_cuda.models.nets import FCN, AlexNetCifar, FCNRes, LeNet5, ResNetCifar, SmallCNN, VGGCifar

__all__ = [
    "available", "build", "load_model", "load_weights", "input_shape", "describe",
    "check_supported", "unsupported_modules", "extract_state_dict", "SUPPORTED_LEAF_TYPES", "TORCHVISION_MODELS",
    "UnknownModelError", "WeightsMismatchError", "UnsupportedModuleError",
]

#: Leaf module types the scanner's engine supports (docs/spec.md §1). Containers (Sequential, the
#: residual blocks) are free; their forward may only compose these and add branches.
SUPPORTED_LEAF_TYPES: Tuple[type, ...] = (
    nn.Conv2d, nn.Linear, nn.ReLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Flatten, nn.Identity,
)

#: torchvision constructors offered as ``"tv:<name>"`` (random weights, never downloaded):
#: those built only from supported layers.
TORCHVISION_MODELS: Tuple[str, ...] = (
    "alexnet",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "wide_resnet50_2", "wide_resnet101_2",
)


class UnknownModelError(ValueError):
    """The model name is not in the zoo."""


#: How to make a weights file, for the messages about a file that is not one.
HOW_TO_SAVE_WEIGHTS = "make one with torch.save(model.state_dict(), PATH) or `nns train`"


class WeightsMismatchError(ValueError):
    """A state dict does not fit the model (missing / unexpected key, or shape)."""


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    input_size: int          # documented square input side
    description: str
    uses_input_size: bool    # whether the architecture depends on the input size


def _square(input_size: Optional[Union[int, Tuple[int, int]]], default: int):
    return default if input_size is None else input_size


def _prod_input(in_channels: int, input_size: Union[int, Tuple[int, int]]) -> int:
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    return int(in_channels * h * w)


def _fcn(num_classes: int, in_channels: int, input_size, in_features: Optional[int] = None,
         hidden: int = 500) -> nn.Module:
    return FCN(in_features or _prod_input(in_channels, _square(input_size, 32)), num_classes,
               hidden)


def _fcn_res(num_classes: int, in_channels: int, input_size, in_features: Optional[int] = None,
             hidden: int = 500) -> nn.Module:
    return FCNRes(in_features or _prod_input(in_channels, _square(input_size, 32)), num_classes,
                  hidden)


def _replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    if in_channels == 3:
        return model
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, m.groups, m.bias is not None, m.padding_mode)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return model
    raise ValueError("model has no Conv2d to adapt to in_channels")  # pragma: no cover


def _torchvision(tv_name: str) -> Callable[..., nn.Module]:
    def make(num_classes: int, in_channels: int, input_size, **kwargs: Any) -> nn.Module:
        try:
            import torchvision
        except ImportError as e:  # pragma: no cover - torchvision is installed in the venv
            raise ImportError(f"model 'tv:{tv_name}' needs torchvision "
                              "(pip install torchvision)") from e
        ctor = getattr(torchvision.models, tv_name)
        kwargs.pop("weights", None)
        model = ctor(weights=None, num_classes=num_classes, **kwargs)
        return _replace_first_conv(model, in_channels)
    return make


def _registry() -> Dict[str, _Entry]:
    reg: Dict[str, _Entry] = {
        "fcn": _Entry(_fcn, 32, "thesis FCN: flatten, in-500-500-classes (784 for 1x28x28)",
                      True),
        "fcn_res": _Entry(_fcn_res, 32, "thesis FCN with one residual block", True),
        "simple_cnn": _Entry(
            lambda num_classes, in_channels, input_size, **kw: SmallCNN(
                in_channels, num_classes, (10, 10, 10), kw.pop("fc_width", 64),
                _square(input_size, 32), **kw),
            32, "thesis simple CNN (ch. 3): 3 conv x 10 filters, 2 max-pools, FC 64", True),
        "cnn_32_64_64": _Entry(
            lambda num_classes, in_channels, input_size, **kw: SmallCNN(
                in_channels, num_classes, (32, 64, 64), kw.pop("fc_width", 64),
                _square(input_size, 32), **kw),
            32, "thesis ch. 6 CNN: conv 32-64-64, 2 max-pools, FC 64", True),
        "lenet5": _Entry(
            lambda num_classes, in_channels, input_size, **kw: LeNet5(
                in_channels, num_classes, _square(input_size, 32), **kw),
            32, "LeNet-5 (ReLU, average pools): conv 6-16, FC 120-84", True),
        "vgg11_cifar": _Entry(
            lambda num_classes, in_channels, input_size, **kw: VGGCifar(
                "vgg11", in_channels, num_classes, **kw),
            32, "VGG-11 with BN for 32x32 inputs", False),
        "vgg16_cifar": _Entry(
            lambda num_classes, in_channels, input_size, **kw: VGGCifar(
                "vgg16", in_channels, num_classes, **kw),
            32, "VGG-16 with BN for 32x32 inputs", False),
        "alexnet_cifar": _Entry(
            lambda num_classes, in_channels, input_size, **kw: AlexNetCifar(
                in_channels, num_classes, input_size=_square(input_size, 32), **kw),
            32, "AlexNet for 32x32 inputs (5 conv, 3 max-pools, FC 1024-1024)", True),
        "alexnet": _Entry(_torchvision("alexnet"), 224, "torchvision AlexNet (224x224)", False),
        "resnet10_cifar": _Entry(
            lambda num_classes, in_channels, input_size, **kw: ResNetCifar(
                (1, 1, 1, 1), in_channels, num_classes, **kw),
            32, "ResNet-10 for 32x32 inputs (3x3 stem, basic blocks 1-1-1-1)", False),
        "resnet18_cifar": _Entry(
            lambda num_classes, in_channels, input_size, **kw: ResNetCifar(
                (2, 2, 2, 2), in_channels, num_classes, **kw),
            32, "ResNet-18 for 32x32 inputs (3x3 stem, basic blocks 2-2-2-2)", False),
    }
    for n in TORCHVISION_MODELS:
        reg[f"tv:{n}"] = _Entry(_torchvision(n), 224, f"torchvision {n}, random weights", False)
    return reg


_REGISTRY = _registry()


def available() -> List[str]:
    """Names accepted by :func:`build`, sorted (zoo names first, then ``tv:*``)."""
    zoo = sorted(n for n in _REGISTRY if not n.startswith("tv:"))
    return zoo + sorted(n for n in _REGISTRY if n.startswith("tv:"))


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}.{hint} Known models: "
                                f"{', '.join(available())}")
    return _REGISTRY[name]


def describe(name: str) -> str:
    """One-line description of a zoo model."""
    return _entry(name).description


def input_shape(name: str, in_channels: int = 3,
                input_size: Optional[int] = None) -> Tuple[int, int, int]:
    """Documented input shape ``(C, H, W)`` of a zoo model (32×32, or 224×224 for
    ``alexnet`` and the ``tv:*`` models)."""
    s = _entry(name).input_size if input_size is None else int(input_size)
    return (int(in_channels), s, s)


@contextlib.contextmanager
def _seeded(seed: Optional[int]) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def build(name: str, num_classes: int = 10, *, in_channels: int = 3,
          input_size: Optional[Union[int, Tuple[int, int]]] = None, seed: Optional[int] = None,
          **kwargs: Any) -> nn.Module:
    """Build a zoo model with random weights (never downloads).

    Parameters
    ----------
    name : str
        One of :func:`available`: ``"fcn"``, ``"fcn_res"``, ``"simple_cnn"``,
        ``"cnn_32_64_64"``, ``"lenet5"``, ``"vgg11_cifar"``, ``"vgg16_cifar"``,
        ``"alexnet_cifar"``, ``"alexnet"``, ``"resnet10_cifar"``, ``"resnet18_cifar"``,
        ``"tv:resnet18"``, ``"tv:vgg16"``, …
    num_classes : int
    in_channels : int
        Input channels (3 for RGB, 1 for grey).
    input_size : int or (int, int), optional
        Input side where the architecture depends on it (``fcn``: ``in_features =
        in_channels·H·W``, so ``in_channels=1, input_size=28`` gives the thesis's
        784-500-500-10; the flatten size of ``simple_cnn``, ``cnn_32_64_64``, ``lenet5``,
        ``alexnet_cifar``). Default 32.
    seed : int, optional
        Seed of the weight initialisation (the global RNG is left untouched).
    **kwargs
        Passed to the architecture (e.g. ``hidden=``, ``dropout=``, ``batch_norm=``).

    Returns
    -------
    nn.Module
        In training mode (call ``.eval()`` before scanning). Maps ``[B, *input_shape(name)]``
        to ``[B, num_classes]``.

    Raises
    ------
    UnknownModelError
        Unknown name; the message lists the known names.
    """
    entry = _entry(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    with _seeded(seed):
        return entry.builder(num_classes=num_classes, in_channels=in_channels,
                             input_size=input_size, **kwargs)


def extract_state_dict(obj: Any, source: str = "weights") -> Dict[str, torch.Tensor]:
    """The state dict inside a loaded weights object.

    Accepts a plain state dict, an ``nns_cuda`` training checkpoint (``{"model": …}``), or the
    common ``{"state_dict": …}`` / ``{"model_state_dict": …}`` wrappers; strips a
    ``module.`` prefix shared by every key (``DataParallel``).
    """
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise WeightsMismatchError(f"{source}: expected a state dict (mapping of names to "
                                   f"tensors), got {type(obj).__name__}; {HOW_TO_SAVE_WEIGHTS}")
    for key in ("model", "state_dict", "model_state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()):
            obj = inner
            break
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsMismatchError(f"{source}: not a state dict: entry {bad[0]!r} is not a "
                                   "tensor")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _first_mismatch(model_state: Mapping[str, torch.Tensor],
                    state: Mapping[str, torch.Tensor]) -> Optional[str]:
    for k, v in model_state.items():
        if k not in state:
            return f"missing key {k!r} (expected shape {list(v.shape)})"
        if tuple(state[k].shape) != tuple(v.shape):
            return (f"shape mismatch for key {k!r}: {list(state[k].shape)} in the file, "
                    f"{list(v.shape)} in the model (num_classes / in_channels / input_size?)")
    for k, v in state.items():
        if k not in model_state:
            return f"unexpected key {k!r} (shape {list(v.shape)})"
    return None


def _read_weights(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors of ours (not torch's advice).

    Raises
    ------
    FileNotFoundError
        No such file.
    WeightsMismatchError
        The file is not a ``torch.save`` archive of tensors: damaged, not written by
        ``torch.save``, or holding Python objects (a whole pickled model).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's warnings about the pickle inside are not the user's concern
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types here (UnpicklingError, RuntimeError, struct.error, ...)
        if is_torch_archive(path) and "weights only" in str(e).lower():
            why = ("it holds Python objects, not only tensors (a whole saved model? give it as "
                   "the model, not as its weights)")
        elif is_torch_archive(path):
            why = f"a torch.save archive that cannot be read (damaged?): {type(e).__name__}: {_short(e)}"
        else:
            why = f"not a file written by torch.save, or it is damaged; {HOW_TO_SAVE_WEIGHTS}"
        raise WeightsMismatchError(f"cannot read weights file {path}: {why}") from e


def _short(e: BaseException, n: int = 120) -> str:
    """The first ``n`` characters of ``e``'s message, on one line."""
    msg = " ".join(str(e).split())
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def load_weights(model: nn.Module, weights: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
                 *, label: str = "the model",
                 map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Load a state dict (a file or in memory) into ``model``, all keys and shapes checked.

    Parameters
    ----------
    model : nn.Module
        Loaded in place.
    weights : path or state dict
        As for :func:`load_model`.
    label : str
        How error messages name the model (e.g. ``"model 'simple_cnn'"``).
    map_location : str or torch.device

    Returns
    -------
    nn.Module
        ``model`` itself (its train / eval mode unchanged).

    Raises
    ------
    FileNotFoundError, WeightsMismatchError
        See :func:`load_model`.
    """
    if isinstance(weights, Mapping):
        source, obj = "weights", weights
    else:
        source, obj = str(weights), _read_weights(weights, map_location)
    state = extract_state_dict(obj, source)
    problem = _first_mismatch(model.state_dict(), state)
    if problem is not None:
        raise WeightsMismatchError(f"weights {source} do not match {label}: {problem}")
    model.load_state_dict(state, strict=True)
    return model


def load_model(name: str, weights: Optional[Union[str, os.PathLike, Mapping[str, torch.Tensor]]] = None,
               num_classes: int = 10, *, map_location: Union[str, torch.device] = "cpu",
               **build_kwargs: Any) -> nn.Module:
    """Build a zoo model and load a user's weights into it.

    Parameters
    ----------
    name : str
        Zoo name (see :func:`build`).
    weights : path or state dict, optional
        A ``torch.save``-d state dict, a training checkpoint of :func:`nns_cuda.train.fit`,
        or an in-memory state dict. ``None`` keeps the random weights.
    num_classes : int
    map_location : str or torch.device
    **build_kwargs
        ``in_channels``, ``input_size``, … as :func:`build`.

    Returns
    -------
    nn.Module
        In eval mode.

    Raises
    ------
    FileNotFoundError
        The weights file does not exist.
    WeightsMismatchError
        The file is unreadable, or its state dict does not fit the model: the message names the
        first mismatching key (missing, unexpected or of another shape) in the model's order.
    """
    model = build(name, num_classes, **build_kwargs)
    if weights is not None:
        load_weights(model, weights, label=f"model {name!r}", map_location=map_location)
    return model.eval()


def unsupported_modules(model: nn.Module) -> List[Tuple[str, str]]:
    """Leaf modules of ``model`` whose type is not in :data:`SUPPORTED_LEAF_TYPES`.

    Returns
    -------
    list of (qualified name, type name)
    """
    out = []
    for qname, m in model.named_modules():
        if next(m.children(), None) is None and not isinstance(m, SUPPORTED_LEAF_TYPES):
            if qname == "" and not list(m.parameters(recurse=False)):
                continue  # an empty container used as a model
            out.append((qname or "<model>", type(m).__name__))
    return out


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModuleError` listing the unsupported leaf modules, if any."""
    bad = unsupported_modules(model)
    if bad:
        listed = ", ".join(f"{n} ({t})" for n, t in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise UnsupportedModuleError(
            f"model has modules the scanner does not support: {listed}{more}. Supported: "
            f"{', '.join(t.__name__ for t in SUPPORTED_LEAF_TYPES)} and residual '+'")
