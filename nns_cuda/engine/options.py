"""The scan's options: backends, strategies, precisions, conv algorithms, and their resolution.

Every option has an ``"auto"`` value; the ``resolve_*`` functions turn ``"auto"`` into a
concrete choice for the input at hand and reject combinations that cannot run, with a message
that says what to do instead. :class:`ScanPlan` holds the resolved numerics of one scan.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from nns_cuda import _extension

__all__ = ["BACKENDS", "STRATEGIES", "PRECISIONS", "CONV_ALGORITHMS", "STORAGE_DTYPES", "LOW_PRECISION_DTYPES",
           "ScanPlan", "check_choice", "check_options", "resolve_backend", "resolve_precision", "resolve_conv_algorithm",
           "reverse_supports", "matmul_precision"]

BACKENDS = ("auto", "reference", "cpu", "cuda")
STRATEGIES = ("auto", "forward", "reverse")
PRECISIONS = ("auto", "fp32", "fp64", "tf32", "bf16", "fp16")
CONV_ALGORITHMS = ("auto", "direct", "gemm", "gather", "implicit")
#: storage dtype of the learned-image patches for each explicit precision
STORAGE_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "tf32": torch.float32, "bf16": torch.bfloat16,
                  "fp16": torch.float16}
#: 16-bit storage dtypes: products and sums are taken in float32, results rounded once
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)

_TF32_NEEDS_GEMM = ("precision='tf32' runs the convolutions as TF32 GEMMs: it needs conv_algorithm='gemm', "
                    "'gather' or 'auto', got 'direct'")


@dataclass(frozen=True)
class ScanPlan:
    """The resolved numerics of one scan.

    Attributes
    ----------
    precision : str
        ``"fp32"``, ``"fp64"``, ``"tf32"``, ``"bf16"`` or ``"fp16"``.
    storage : torch.dtype
        The dtype the learned-image patches are stored in.
    out_dtype : torch.dtype
        The dtype of the results (statistics, filter images, images).
    conv_algorithm : str
        ``"direct"``, ``"gemm"``, ``"gather"`` or ``"implicit"``; ``"autograd"`` for the
        reverse strategy.
    gemm_max_elems : int
        Chunk bound of the GEMM conv ops' temporaries, in elements (0 for the reverse strategy).
    """

    precision: str
    storage: torch.dtype
    out_dtype: torch.dtype
    conv_algorithm: str
    gemm_max_elems: int


def check_choice(option: str, value, allowed: Tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed`` (``option`` names it)."""
    if value not in allowed:
        raise ValueError(f"{option} must be one of {allowed}, got {value!r}")


def check_options(backend: str, strategy: str, precision: str, conv_algorithm: str) -> None:
    """Validate the option values of a :class:`~nns_cuda.engine.scanner.Scanner` (no device needed)."""
    check_choice("backend", backend, BACKENDS)
    check_choice("strategy", strategy, STRATEGIES)
    check_choice("precision", precision, PRECISIONS)
    check_choice("conv_algorithm", conv_algorithm, CONV_ALGORITHMS)
    if precision == "tf32" and conv_algorithm == "direct":
        raise ValueError(_TF32_NEEDS_GEMM)


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs for inputs on ``device``.

    Parameters
    ----------
    backend : {"auto", "reference", "cpu", "cuda"}
        ``"auto"`` prefers the compiled CUDA kernels for GPU inputs, then the compiled CPU
        kernels, then the pure-PyTorch reference.
    device : torch.device
        The device of the input.

    Returns
    -------
    str
        ``"reference"``, ``"cpu"`` or ``"cuda"``.

    Raises
    ------
    ValueError
        For an unknown backend, or ``"cpu"`` / ``"cuda"`` with inputs on another device.
    RuntimeError
        For ``"cpu"`` / ``"cuda"`` when the extension lacks that device's kernels.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if device.type == "cuda" and _extension.has_kernel("cuda"):
            return "cuda"
        if device.type == "cpu" and _extension.has_kernel("cpu"):
            return "cpu"
        return "reference"
    if backend in ("cpu", "cuda"):
        if device.type != backend:
            raise ValueError(f"backend={backend!r} needs inputs on {backend}, got {device}; move x with .to('{backend}') "
                             "or use backend='auto'")
        if not _extension.has_kernel(backend):
            raise RuntimeError(f"backend={backend!r} needs the compiled extension nns_cuda._C with {backend.upper()} "
                               f"kernels, which is not available ({_extension.load_error() or 'built without them'}). "
                               "Rebuild with `pip install --no-build-isolation -e .` (FORCE_CUDA=1 for CUDA) or use "
                               "backend='reference'.")
    return backend


def resolve_precision(precision: str, x: torch.Tensor) -> Tuple[str, torch.dtype, torch.dtype]:
    """The precision a scan of ``x`` runs in.

    Parameters
    ----------
    precision : {"auto", "fp32", "fp64", "tf32", "bf16", "fp16"}
        ``"auto"`` is the input's dtype (``"fp32"`` or ``"fp64"``). ``"tf32"`` exists only on
        CUDA: on any other device it raises ``ValueError`` (it never falls back silently).
    x : Tensor [B, ...]
        The input (its dtype and device are used).

    Returns
    -------
    (name, storage dtype, result dtype)
        Results (statistics, filter images, images) are float32 for ``"tf32"``, ``"bf16"``
        and ``"fp16"``.
    """
    check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        name = "fp64" if x.dtype == torch.float64 else "fp32"
        return name, x.dtype, x.dtype
    if precision == "tf32" and x.device.type != "cuda":
        raise ValueError(f"precision='tf32' exists only on CUDA (TensorFloat-32 is an NVIDIA tensor-core "
                         f"format), but the input is on {x.device}; use precision='fp32' (or 'bf16') here, or "
                         "move the model and the input to a GPU")
    storage = STORAGE_DTYPES[precision]
    return precision, storage, (torch.float32 if storage in LOW_PRECISION_DTYPES or precision == "tf32" else storage)


def resolve_conv_algorithm(conv_algorithm: str, device: torch.device, precision: str,
                           backend: Optional[str] = None) -> str:
    """The conv algorithm of the forward strategy.

    ``"auto"`` is ``"direct"`` on the CPU, where it was measured fastest (``benchmarks/NOTES.md``),
    and ``"gather"`` on CUDA for every precision: cuBLAS GEMMs (tensor cores for tf32 / bf16 /
    fp16) over the active pairs only. The CUDA choice is a prediction from the arithmetic (the
    gated FLOP floor), not yet measured; ``benchmarks/device_check.sh`` times every algorithm
    side by side on a GPU.

    Parameters
    ----------
    conv_algorithm : {"auto", "direct", "gemm", "gather", "implicit"}
    device : torch.device
        The device of the input.
    precision : str
        The resolved precision (:func:`resolve_precision`).
    backend : str or None
        The resolved backend; the ``"reference"`` backend runs the twin of ``"implicit"``
        anywhere, the others need Triton on CUDA for it.

    Returns
    -------
    str
        ``"direct"``, ``"gemm"``, ``"gather"`` or ``"implicit"``.

    Raises
    ------
    ValueError
        For an unknown value, ``"implicit"`` where Triton cannot run, or ``"tf32"`` with
        ``"direct"``.
    """
    check_choice("conv_algorithm", conv_algorithm, CONV_ALGORITHMS)
    if conv_algorithm == "auto":
        return "gather" if device.type == "cuda" else "direct"
    if conv_algorithm == "implicit" and backend != "reference":  # the reference runs its twin
        from nns_cuda.ops import _triton_conv

        why = _triton_conv.available(device)
        if why:
            raise ValueError(f"conv_algorithm='implicit' cannot run here: {why}")
    if precision == "tf32" and conv_algorithm == "direct":
        raise ValueError(_TF32_NEEDS_GEMM)
    return conv_algorithm


def reverse_supports(option: str, precision: str, dtype: torch.dtype) -> bool:
    """Whether the reverse strategy (autograd in the input's dtype ``dtype``) honours the
    ``precision`` option ``option`` (resolved: ``precision``): only ``"auto"`` or the input's
    own dtype."""
    return option == "auto" or (precision != "tf32" and STORAGE_DTYPES[precision] == dtype)


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Set torch's TF32 switches for a block; restore them afterwards.

    On CUDA, ``"tf32"`` turns cuBLAS TF32 on; ``"fp32"`` turns TF32 off for cuBLAS and cuDNN
    (whose default is on), so that an explicit fp32 is IEEE float32 throughout. Other
    precisions (``"auto"`` included), and the CPU, leave the switches alone.
    """
    if device.type != "cuda" or precision not in ("tf32", "fp32"):
        yield
        return
    on = precision == "tf32"
    mm, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = (mm.allow_tf32, cudnn.allow_tf32)
        mm.allow_tf32 = on
        if not on:
            cudnn.allow_tf32 = False
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mm.allow_tf32, cudnn.allow_tf32 = old
