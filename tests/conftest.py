"""Shared test helpers: devices, the ``needs_cuda`` marker, NaN-filled outputs, and
receptive-field geometry for building realistic patch anchors.

``cpu_and_cuda()`` is a device list for ``pytest.mark.parametrize``; its ``"cuda"`` entry
carries the ``needs_cuda`` marker, which skips the test cleanly when no GPU is visible (and
only then: on a GPU machine a missing CUDA kernel is a failure, not a skip).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import pytest
import torch
import torch.utils.deterministic  # noqa: F401  (fill_uninitialized_memory)

#: Marker for tests that need a CUDA device (``@needs_cuda`` or ``pytest.param(..., marks=needs_cuda)``).
needs_cuda = pytest.mark.needs_cuda

HAS_CUDA = torch.cuda.is_available()


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: needs a CUDA device (skipped on CPU-only machines)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible)")
    for item in items:
        if "needs_cuda" in item.keywords:
            item.add_marker(skip)


def cpu_and_cuda() -> List:
    """Devices to parametrize over: ``"cpu"`` and ``"cuda"`` (the latter marked ``needs_cuda``)."""
    return ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(params=cpu_and_cuda())
def device(request) -> str:
    """Each test that takes ``device`` runs on the CPU and (when visible) on the GPU."""
    return request.param


def noncontiguous(args: dict) -> dict:
    """The same keyword arguments with every tensor replaced by a non-contiguous view of the same
    values (every other element of a doubled tensor); other values unchanged."""
    return {k: torch.stack([v, torch.zeros_like(v)], dim=-1)[..., 0] if isinstance(v, torch.Tensor) else v
            for k, v in args.items()}


@contextlib.contextmanager
def nan_filled_outputs() -> Iterator[None]:
    """Within the block, ``torch.empty`` (and the kernels' ``at::empty``) fill floating
    tensors with NaN, so that an output element a kernel forgets to write shows up as NaN."""
    old = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        # the mechanism itself must work, or the NaN checks below prove nothing
        assert torch.empty(4).isnan().all(), "torch.empty no longer fills with NaN"
        if HAS_CUDA:
            assert torch.empty(4, device="cuda").isnan().all()
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)
        torch.utils.deterministic.fill_uninitialized_memory = old_fill


@pytest.fixture
def nan_fill():
    """Fixture form of :func:`nan_filled_outputs`."""
    with nan_filled_outputs():
        yield


# ------------------------------------------------------------------- receptive-field geometry

def rf_anchors(n: int, H: int, J: int, P: int, R: int) -> Tuple[torch.Tensor, int]:
    """Anchors of a layer with ``n`` grid rows, jump ``J``, start offset ``P`` and receptive
    field ``R`` on an image of ``H`` rows, as the engine chooses them (reference/ops.py):
    ``Rh = min(R, H)``, ``ay[y] = clamp(y·J − P, 0, H − Rh)``. Returns ``(ay int64 [n], Rh)``."""
    Rh = min(R, H)
    ay = (torch.arange(n, dtype=torch.int64) * J - P).clamp(0, H - Rh)
    return ay, Rh


def conv_geometry(n_in: int, J: int, P: int, R: int, k: int, s: int, p: int, d: int = 1):
    """Grid size and geometry ``(n_out, J', P', R')`` after a conv / pool with kernel ``k``,
    stride ``s``, padding ``p``, dilation ``d`` on a layer of geometry ``(J, P, R)``."""
    n_out = (n_in + 2 * p - d * (k - 1) - 1) // s + 1
    return n_out, J * s, P + p * J, R + (k - 1) * d * J


# ------------------------------------------------------------------------------- comparisons

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (computed in float64 on the CPU)."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / max(scale, 1e-300)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Same shape, no NaN (unwritten outputs), and relative error within ``TOL[dtype]``."""
    assert tuple(actual.shape) == tuple(expected.shape), (tuple(actual.shape), tuple(expected.shape))
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert not actual.isnan().any(), "output holds NaN: an element was not written"
    err = rel_err(actual, expected)
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]:.0e}"


def expect_op_error(op, args: dict, exc, pattern: str, mode: str) -> None:
    """Call ``op(**args)`` on real tensors (``mode="cpu"``) or under ``FakeTensorMode``
    (``mode="fake"``, the fake kernel) and expect ``exc`` whose message matches ``pattern``:
    the C++ checks and the fake kernels must raise the same named error."""
    if mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake = FakeTensorMode()
        args = {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with fake, pytest.raises(exc, match=pattern):
            op(**args)
    else:
        with pytest.raises(exc, match=pattern):
            op(**args)
