"""What the ``nns`` commands and the demo share: the one-line user error, the engine options,
loading a model or the data a command analyses, and cutting samples into batches."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Optional, Sequence, Tuple

__all__ = ["CLIError", "BAD_INPUT", "error_line", "guarded", "engine_options", "model_options", "load_model", "load_data", "take", "batches",
           "IMAGE_EXTENSIONS"]

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


def engine_options(p, *, batch: Optional[int] = 64, batch_help: str = "samples per batch (default %(default)s)") -> None:
    """Add the engine's options (``--device``, ``--backend``, ``--batch-size``, ``--max-memory``)
    to the parser ``p``, as a group."""
    g = p.add_argument_group("engine")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "cpu", "cuda"],
                   help="learned-image backend: auto = fastest available (CUDA kernels for GPU inputs, "
                        "C++ kernels on the CPU, else pure PyTorch)")
    g.add_argument("--batch-size", type=int, default=batch, help=batch_help)
    g.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the engine, e.g. 2G or 512M (default: 25%% of RAM up to 8 GiB, "
                        "or 60%% of free GPU memory); larger work is chunked")


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
               input_size: Optional[int] = None, which: str = "best"):
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
        return models.from_spec(spec, weights, num_classes=num_classes, in_channels=in_channels,
                                input_size=input_size)
    except models.ModelSpecError as e:
        raise CLIError(str(e)) from None


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
              input_size: Optional[int] = None):
    """The first ``samples`` images of the embedded digits or of a folder.

    Parameters
    ----------
    spec : "digits" or a folder
        ``"digits"``: the embedded cluttered digits, split ``split`` (labels and boxes); a
        folder: its image files in sorted order (the whole image is the foreground, no labels),
        with ``in_channels`` channels, resized to ``input_size`` (or the first image's size).

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

    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(spec) for f in fs
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise CLIError(f"--data {spec!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    files = files[:samples]
    imgs = [load_image(f, channels=in_channels) for f in files]
    size = (input_size, input_size) if input_size else tuple(imgs[0].shape[-2:])
    imgs = [im if tuple(im.shape[-2:]) == size else
            F.interpolate(im[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
            for im in imgs]
    x = torch.stack(imgs)
    m = torch.ones(x.shape[0], *size, dtype=torch.bool)
    return x, None, m, f"{len(files)} image(s) from {spec} at {size[0]}x{size[1]} (whole image = foreground)"
