"""What the ``nns`` commands and the demo share: the one-line user error, the engine options,
the ``--samples`` option, loading a model, a file or the data a command analyses, and cutting
samples into batches."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple

from nns_cuda._files import is_torch_archive

__all__ = ["CLIError", "BAD_INPUT", "error_line", "guarded", "note", "engine_options", "MAX_MEMORY_HELP",
           "samples_option", "DeprecatedAlias", "model_options", "load_model", "read_torch_file", "load_data", "take",
           "batches", "IMAGE_EXTENSIONS"]

#: Exceptions that mean "the input was wrong" (exit status 2); anything else exits with 1.
BAD_INPUT = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, IndexError, NotImplementedError,
             ImportError)


class CLIError(Exception):
    """A user-facing error (printed as one line without the exception's type, exit status 2)."""


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        msg = " ".join(e.args[0].split())
    return msg or type(e).__name__


def error_line(command: str, e: BaseException) -> str:
    """The one line that ``nns <command>`` prints for the error ``e``."""
    if isinstance(e, CLIError):
        return f"nns {command}: error: {_one_line(e)}"
    return f"nns {command}: error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)"


def guarded(command: str, args: Any, fn: Callable[[], Optional[int]]) -> int:
    """``fn()`` as an exit status: bad input (:data:`BAD_INPUT`, :class:`CLIError`) prints one line
    and gives 2; with ``args.debug`` the exception propagates (the caller shows the traceback)."""
    try:
        return int(fn() or 0)
    except (CLIError,) + BAD_INPUT as e:
        if getattr(args, "debug", False):
            raise
        print(error_line(command, e), file=sys.stderr)
        return 2


def note(who: str, message: str) -> None:
    """Print ``"<who>: <message>"`` on stderr: what a command tells the user besides its results."""
    print(f"{who}: {message}", file=sys.stderr)


class DeprecatedAlias(argparse.Action):
    """An old option name that still works: it stores into the new option's ``dest`` and says on
    stderr that it is deprecated (``help`` names the new option)."""

    def __init__(self, option_strings, dest, new: str = "", **kw):
        self.new = new
        kw.setdefault("help", f"deprecated alias of {new}")
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        note(parser.prog, f"{option_string} is deprecated; use {self.new} (same meaning)")
        setattr(namespace, self.dest, values)


def samples_option(p, *, default: Optional[int], help: str, old: Sequence[str] = ("--max-samples",)) -> None:
    """Add ``--samples N`` to the parser (or group) ``p``, with the names ``old`` (default
    ``--max-samples``) as its deprecated aliases."""
    p.add_argument("--samples", type=int, default=default, metavar="N", help=help)
    for name in old:
        p.add_argument(name, type=int, action=DeprecatedAlias, dest="samples", new="--samples",
                       default=argparse.SUPPRESS, metavar="N")


#: Help of ``--max-memory`` (argparse text: ``%%`` is a percent sign): the defaults of
#: :func:`nns_cuda.engine.memory.default_budget`.
MAX_MEMORY_HELP = ("memory budget of the engine, e.g. 2G or 512M; larger work is chunked (default: on the "
                   "CPU 2 GiB, or 25%% of the RAM if less, and up to 8 GiB for one sample before the reverse "
                   "strategy is chosen; on CUDA 60%% of the free GPU memory)")


def engine_options(p, *, batch: Optional[int] = 64, batch_help: str = "samples per batch (default %(default)s)") -> None:
    """Add the engine's options (``--device``, ``--backend``, ``--batch-size``, ``--max-memory``)
    to the parser ``p``, as a group."""
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"],
                   help="learned-image backend: auto = fastest available (CUDA kernels for GPU inputs, "
                        "C++ kernels on the CPU, else pure PyTorch)")
    g.add_argument("--batch-size", type=int, default=batch, help=batch_help)
    g.add_argument("--max-memory", default=None, metavar="SIZE", help=MAX_MEMORY_HELP)


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------
def model_options(p) -> None:
    """Add ``--model``, ``--weights`` and ``--num-classes`` (the arguments of :func:`load_model`)
    to the parser ``p``."""
    p.add_argument("--model", default=None, help="zoo name, package.module:factory, or a torch.save'd model file "
                                                "(default: the demo model, well-trained checkpoint)")
    p.add_argument("--weights", default=None, help="state dict / checkpoint for the model")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a zoo model")


def load_model(spec: Optional[str], weights: Optional[str] = None, *, num_classes: int = 10, in_channels: int = 3,
               input_size: Optional[int] = None, which: str = "best", who: str = "nns"):
    """A model and its one-line description.

    Parameters
    ----------
    spec : str or None
        A zoo name, ``package.module:factory`` or a ``torch.save``'d model file (see
        :func:`nns_cuda.models.from_spec`); None: the demo model (trained and cached on first
        use), its ``which`` checkpoint.
    weights : str, optional
        State dict / checkpoint file loaded into the model.
    num_classes, in_channels, input_size : int
        Zoo models only.
    which : "best" or "last"
        The demo model's well-trained (best validation accuracy) or over-fitted (last) checkpoint.
    who : str
        The command, for the note on stderr that a zoo model without ``weights`` has random weights.

    Returns
    -------
    (nn.Module in eval mode, str)
    """
    from nns_cuda import models

    if spec is None:
        from nns_cuda import train as nns_train

        demo = nns_train.default_demo_model(progress=sys.stderr.isatty())
        ck = demo.history.best_checkpoint if which == "best" else demo.history.last_checkpoint
        m = models.load_model(demo.name, weights=weights or ck)
        return m, f"demo model {demo.name} ({'well-trained' if which == 'best' else 'over-fitted'}: {ck})"
    try:
        out = models.from_spec(spec, weights, num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    except models.ModelSpecError as e:
        raise CLIError(str(e)) from None
    if weights is None and spec in models.available():
        note(who, f"no --weights given: {spec} has random weights, so the results describe an untrained network")
    return out


def read_torch_file(path: str, option: str, *, weights_only: bool = True) -> Any:
    """``torch.load(path)`` on the CPU, with one line of ours instead of torch's advice on errors.

    Parameters
    ----------
    path : str
    option : str
        The option that named the file (``"--images"``), for the message.
    weights_only : bool
        Only tensors and plain containers (True), or any pickled object of the user's own file.

    Raises
    ------
    CLIError
        The file is missing, damaged, not written by ``torch.save``, or (``weights_only``) holds
        Python objects.
    """
    import torch

    if not os.path.isfile(path):
        raise CLIError(f"{option} {path}: no such file")
    try:
        with warnings.catch_warnings():  # torch's warnings about the pickle inside are not the user's concern
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        archive = is_torch_archive(path)
        if weights_only and archive and "weights only" in str(e).lower():
            why = "it holds Python objects, not only tensors and lists / dicts of them"
        elif archive:
            why = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
        else:
            why = "not a file written by torch.save, or it is damaged"
        raise CLIError(f"{option} {path}: cannot read it: {why}") from None


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
#: File endings of the images read from a folder (``--data FOLDER``).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def take(ds: Any, indices: Sequence[int]):
    """Samples ``ds[i]`` (``(x, y, fg_mask)`` each) stacked: ``x [N, D, H, W]``, ``y [N]`` long,
    ``fg_mask [N, H, W]``."""
    import torch

    items = [ds[i] for i in indices]
    x = torch.stack([it[0] for it in items])
    y = torch.as_tensor([int(it[1]) for it in items])
    m = torch.stack([torch.as_tensor(it[2]) for it in items])
    return x, y, m


def batches(x, y, m, batch_size: int, device: Any = None) -> List[Tuple[Any, Any, Any]]:
    """``[(x, y, fg_mask), ...]``: consecutive batches of ``batch_size`` samples (on ``device`` if given)."""
    out = []
    for s in range(0, x.shape[0], batch_size):
        b = (x[s:s + batch_size], y[s:s + batch_size], m[s:s + batch_size])
        out.append(b if device is None else tuple(t.to(device) for t in b))
    return out


def load_data(spec: str, *, split: str = "test", samples: int = 16, in_channels: int = 3,
              input_size: Optional[int] = None, who: str = "nns"):
    """The first ``samples`` images of the embedded digits or of a folder.

    Parameters
    ----------
    spec : "digits" or a folder
        ``"digits"``: the embedded cluttered digits, split ``split`` (labels and boxes); a
        folder: its image files in sorted order (the whole image is the foreground, no labels),
        with ``in_channels`` channels, resized to ``input_size`` (or the first image's size).
        Files that are not images (by their ending) are skipped and resized images are
        counted; both are said on stderr, prefixed by ``who``.

    Returns
    -------
    x : Tensor [N, D, H, W]
    y : Tensor [N] or None
    fg_mask : Tensor [N, H, W] bool
    description : str
    """
    import torch
    import torch.nn.functional as F

    if samples < 1:
        raise CLIError(f"--samples must be at least 1, got {samples}")
    if spec == "digits":
        from nns_cuda import data as nns_data

        ds = nns_data.cluttered_digits(split, seed=0)
        n = min(samples, len(ds))
        x, y, m = take(ds, range(n))
        return x, y, m.bool(), f"cluttered digits, split {split!r}, first {n} samples"
    if not os.path.isdir(spec):
        raise CLIError(f"--data {spec!r}: neither 'digits' nor an existing folder of images")
    from nns_cuda.data import load_image

    every = sorted(os.path.relpath(os.path.join(r, f), spec) for r, _, fs in os.walk(spec) for f in fs)
    files = [f for f in every if f.lower().endswith(IMAGE_EXTENSIONS)]
    skipped = [f for f in every if not f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise CLIError(f"--data {spec!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    if skipped:
        note(who, f"--data {spec}: skipped {len(skipped)} file(s) that are not images: {_first_few(skipped)}")
    n_all = len(files)
    files = files[:samples]
    imgs = [load_image(os.path.join(spec, f), channels=in_channels) for f in files]
    size = (input_size, input_size) if input_size else tuple(imgs[0].shape[-2:])
    resized = [f"{f} ({im.shape[-2]}x{im.shape[-1]})" for f, im in zip(files, imgs) if tuple(im.shape[-2:]) != size]
    if resized:
        note(who, f"--data {spec}: resized {len(resized)} of {len(files)} image(s) to {size[0]}x{size[1]}: "
                  f"{_first_few(resized)}")
    imgs = [im if tuple(im.shape[-2:]) == size else
            F.interpolate(im[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
            for im in imgs]
    x = torch.stack(imgs)
    m = torch.ones(x.shape[0], *size, dtype=torch.bool)
    of = f" (the first {len(files)} of {n_all})" if n_all > len(files) else ""
    return x, None, m, (f"{len(files)} image(s){of} from {spec} at {size[0]}x{size[1]} (whole image = foreground"
                        f"{f'; {len(resized)} resized' if resized else ''}"
                        f"{f'; {len(skipped)} non-image file(s) skipped' if skipped else ''})")


def _first_few(names: Sequence[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
