"""One parser for the ways a user names a model: a zoo name, a factory, or a saved model file.

>>> from nns_cuda import models
>>> m, desc = models.from_spec("simple_cnn", "ckpt.pt")                 # doctest: +SKIP
>>> m, desc = models.from_spec("my_pkg.nets:make_net")                 # doctest: +SKIP
>>> m, desc = models.from_spec("saved_model.pt", "other_weights.pt")   # doctest: +SKIP
"""
from __future__ import annotations

import difflib
import importlib
import os
import zipfile
from typing import Mapping, Optional, Tuple, Union

import torch
from torch import nn

from nns_cuda.models.zoo import WeightsMismatchError, available, build, load_weights

__all__ = ["from_spec", "ModelSpecError"]

WeightsArg = Optional[Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]]

#: Where users find the zoo's names (Python, then the command line).
_ZOO_NAMES_HINT = "Zoo names: nns_cuda.models.available() (command line: nns scan --list-models)"


class ModelSpecError(ValueError):
    """A model spec, or the weights given with it, cannot be turned into a model.

    The message is one line that names the spec (or the file) and what is wrong with it.
    """


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _model_file(path: str) -> nn.Module:
    """The ``nn.Module`` pickled whole in ``path`` by ``torch.save(model, path)``."""
    try:
        # A whole model is a pickle of Python objects: it cannot load with weights_only=True.
        # The user names the file as their own model, as ``torch.load`` would be used on it.
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        if zipfile.is_zipfile(path):
            why = f"{_first_line(e)} (the model's class must be importable here)"
        else:
            why = "not a file written by torch.save, or it is damaged"
        raise ModelSpecError(f"cannot read model file {path}: {why}") from e
    if not isinstance(obj, nn.Module):
        raise ModelSpecError(
            f"{path} holds an object of type {type(obj).__name__}, not a model; for a state dict "
            "give a zoo name as the model and this file as its weights (nns: --model <zoo name> "
            "--weights FILE)")
    return obj


def _factory(spec: str) -> nn.Module:
    """The model made by ``package.module:factory`` (called with no arguments if callable)."""
    mod, _, attr = spec.partition(":")
    if not mod or not attr:
        raise ModelSpecError(f"cannot load {spec!r}: expected 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ModelSpecError(f"cannot load {spec!r}: {' '.join(str(e).split())}") from e
    except Exception as e:  # an error raised while importing the user's module
        raise ModelSpecError(
            f"cannot load {spec!r}: importing {mod} raised {_first_line(e)}") from e
    model = factory() if callable(factory) and not isinstance(factory, nn.Module) else factory
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"{spec} returned an object of type {type(model).__name__}, "
                             "not an nn.Module")
    return model


def _unknown(spec: str) -> ModelSpecError:
    close = difflib.get_close_matches(spec, available(), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ModelSpecError(f"unknown model {spec!r}: not a zoo name, not 'package.module:factory', "
                          f"not a file.{hint} {_ZOO_NAMES_HINT}")


def _weights_label(weights: WeightsArg) -> str:
    return "a state dict" if isinstance(weights, Mapping) else str(weights)


def from_spec(spec: Union[str, "os.PathLike[str]"], weights: WeightsArg = None, *,
              num_classes: int = 10, in_channels: int = 3,
              input_size: Optional[Union[int, Tuple[int, int]]] = None) -> Tuple[nn.Module, str]:
    """Model from a zoo name, ``package.module:factory``, or a ``torch.save``-d model file.

    The spec is tried in this order: a zoo name (:func:`nns_cuda.models.available`), an
    existing file, then ``package.module:factory``.

    Parameters
    ----------
    spec : str or path
        * a zoo name (``"simple_cnn"``, ``"tv:resnet18"``, …): built with ``num_classes``,
          ``in_channels`` and ``input_size``, random weights unless ``weights`` is given;
        * a file written by ``torch.save(model, path)`` (the whole ``nn.Module``; its class
          must be importable);
        * ``"package.module:factory"``: ``factory`` is called with no arguments when it is
          callable (a function or class); an ``nn.Module`` attribute is used as is.
    weights : path or state dict, optional
        Loaded into the model: a ``torch.save``-d state dict, a training checkpoint of
        :func:`nns_cuda.train.fit`, the usual ``{"state_dict": …}`` wrappers (see
        :func:`nns_cuda.models.extract_state_dict`), or an in-memory state dict. Every key and
        shape must match.
    num_classes, in_channels : int
        Zoo models only.
    input_size : int or (int, int), optional
        Zoo models only, where the architecture depends on it (see
        :func:`nns_cuda.models.build`).

    Returns
    -------
    model : nn.Module
        In eval mode (zoo models and model files on the CPU; a factory's model where the
        factory put it).
    description : str
        One line for logs and reports, e.g. ``"zoo model simple_cnn with weights w.pt"``.

    Raises
    ------
    ModelSpecError
        One line: unknown name (with close matches and where to list the zoo's names), a file
        that does not hold a model or cannot be read, a factory that cannot be imported or
        returns something else than an ``nn.Module``, or weights that are missing, unreadable
        or do not fit the model (naming the first mismatching key).
    ValueError
        ``num_classes`` or ``in_channels`` not positive (zoo models).
    """
    if not isinstance(spec, (str, os.PathLike)) or not os.fspath(spec):
        raise ModelSpecError("no model given: expected a zoo name, 'package.module:factory' or "
                             f"a file written by torch.save(model, path). {_ZOO_NAMES_HINT}")
    spec = os.fspath(spec)
    if spec in available():
        model = build(spec, num_classes, in_channels=in_channels,
                      **({"input_size": input_size} if input_size else {}))
        label = f"model {spec!r}"
        desc = f"zoo model {spec}"
        if weights is None:
            desc += " (random weights)"
    elif os.path.isfile(spec):
        model = _model_file(spec)
        label = desc = f"model file {spec}"
    elif ":" in spec:
        model = _factory(spec)
        label = desc = f"factory {spec}"
    else:
        raise _unknown(spec)
    if weights is not None:
        try:
            load_weights(model, weights, label=label)
        except (FileNotFoundError, WeightsMismatchError) as e:
            raise ModelSpecError(str(e)) from e
        desc += f" with weights {_weights_label(weights)}"
    return model.eval(), desc
