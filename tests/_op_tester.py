"""The shared skeleton of the op tests: one tester class per compiled op (``tests/test_<op>.py``).

A test module describes its op with data and a seeded case builder, and the tester runs the
cases every op has. :class:`OpTester` holds what every compiled op is checked for;
:class:`ReferenceOpTester` adds what an op with a pure-PyTorch twin in
``nns_cuda.ops.reference`` and kernels for the CPU and CUDA is checked for:

* ``test_noncontiguous``: non-contiguous views of every input give the same result, outputs
  NaN-prefilled (:func:`conftest.nan_filled_outputs`: an element a kernel forgot to write fails).
* ``test_opcheck``: ``torch.library.opcheck`` (schema, fake kernel, registrations).
* ``test_bad_arguments``: an argument error names the op and the argument; the compiled op and
  its fake kernel (under ``FakeTensorMode``) raise the same error.
* ``test_matches_reference`` (reference ops): the op on each device against its twin computed in
  float64 on the CPU — code the op shares nothing with — for every configuration and dtype,
  outputs NaN-prefilled.
* ``test_empty``: empty shapes give empty (or all-zero) results of the right shape.
* ``test_invalid_windows``: anchors or indices whose windows do not fit are refused by the op
  and by its twin.
* ``test_cuda_device_mismatch`` (GPU): an argument on the CPU beside CUDA patches is refused with
  the op's message.
* ``test_cuda_large`` (GPU): windows and channel counts beyond one thread block / tile.

Parameters come from the class: a test's arguments ``cfg``, ``nc``, ``oc``, ``bad``, ``large``,
``dtype``, ``mode`` and ``device`` are parametrized (in that order in the test ids) from
``CONFIGS``, ``NONCONTIGUOUS``, ``OPCHECK``, :meth:`OpTester.bad_cases`, ``LARGE``,
``DTYPES``, the two error modes and ``DEVICES``, unless the test parametrizes them itself. The
``cuda`` device carries the ``needs_cuda`` marker: skipped without a GPU, run (``-m needs_cuda``)
on a GPU machine. An op's own tests are further methods of its class. A tester class whose
name does not start with ``Test`` is a base that pytest does not collect; a test of the skeleton
that does not apply to an op is set to ``None`` in its class, with the reason.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from conftest import assert_rel_close, cpu_and_cuda, expect_op_error, nan_filled_outputs, needs_cuda, noncontiguous
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref

#: the dtypes of the reference comparisons, by test id
DTYPES = {"f64": torch.float64, "f32": torch.float32}

#: the module mark of the compiled ops' tests
needs_ops = pytest.mark.skipif(not ops.HAS_OPS, reason="nns_cuda._C not built")

#: the argument names the tester parametrizes, in the order of the test ids
PARAMETERS = ("cfg", "nc", "oc", "bad", "large", "dtype", "mode", "device")


def to(case: dict, device=None, dtype: Optional[torch.dtype] = None) -> dict:
    """``case`` with every tensor moved to ``device`` and every floating tensor cast to ``dtype``
    (each when given); other values unchanged."""
    out = {}
    for key, v in case.items():
        if isinstance(v, torch.Tensor):
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            if device is not None:
                v = v.to(device)
        out[key] = v
    return out


def _parametrized_by_marks(metafunc) -> set:
    names = set()
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0]
        names.update(n.strip() for n in (argnames.split(",") if isinstance(argnames, str) else argnames))
    return names


class OpTester:
    """The checks every compiled op gets. Subclasses set ``OP`` and the data below, and define
    ``make_case(seed, **kw) -> dict`` (the op's keyword arguments, seeded)."""

    #: the op: ``torch.ops.nns_cuda.<OP>``, ``nns_cuda.ops.<OP>``, ``nns_cuda.ops.reference.<OP>``
    OP: str = ""
    #: the op's main tensor argument (its device is the op's device; the op's dtype)
    MAIN = "patches"
    #: devices the op's kernels run on
    DEVICES: Sequence = tuple(cpu_and_cuda())
    #: id -> ``make_case`` keyword arguments (seed included) of the non-contiguous cases
    NONCONTIGUOUS: Dict[str, dict] = {}
    #: further op arguments of the non-contiguous run
    NONCONTIGUOUS_KWARGS: Dict[str, Any] = {}
    #: id -> ``opcheck_args`` keyword arguments of the ``opcheck`` cases
    OPCHECK: Dict[str, dict] = {}
    #: (id, change, exception, message pattern): argument errors, each a change of ``BAD_CASE``
    BAD: List[Tuple[str, dict, type, str]] = []
    #: ``make_case`` keyword arguments (seed included) of the valid case that ``BAD`` spoils
    BAD_CASE: Dict[str, Any] = {}
    #: id -> ``make_case`` keyword arguments of the reference comparisons (the seed is the
    #: position in the dict)
    CONFIGS: Dict[str, dict] = {}
    #: dtypes of the reference comparisons, by test id
    DTYPES: Dict[str, torch.dtype] = DTYPES
    #: id -> ``make_case`` keyword arguments (seed included) of the large GPU cases
    LARGE: Dict[str, dict] = {}

    # ------------------------------------------------------------------------ parametrization
    def pytest_generate_tests(self, metafunc):
        done = _parametrized_by_marks(metafunc)
        for name in PARAMETERS:
            if name in metafunc.fixturenames and name not in done:
                values, ids = self._parameter(name, metafunc.function.__name__)
                metafunc.parametrize(name, values, ids=ids)

    def _parameter(self, name: str, test: str):
        if name == "device":
            return list(self.DEVICES), None
        if name == "mode":
            return ["cpu", "fake"], None
        if name == "bad":
            table = {b[0]: b for b in self.bad_cases()}
        elif name == "dtype":
            table = dict(self.DTYPES)
        else:
            attr = {"cfg": "CONFIGS", "nc": "NONCONTIGUOUS", "oc": "OPCHECK", "large": "LARGE"}[name]
            table = {k: k for k in getattr(self, attr)}
        if not table:  # an empty parameter list would be a silent skip
            raise pytest.UsageError(f"{type(self).__name__}.{test} takes '{name}' but the class defines no "
                                    f"values for it; define them, or set {test} = None in the class")
        return list(table.values()), list(table)

    # ---------------------------------------------------------------------------- the op
    @staticmethod
    def make_case(seed: int, **kw) -> dict:
        raise NotImplementedError("a tester class defines make_case(seed, **kw)")

    def op(self):
        """The compiled op, ``torch.ops.nns_cuda.<OP>``."""
        return getattr(torch.ops.nns_cuda, self.OP)

    def run(self, args: dict, **kw):
        """The op through its Python wrapper ``nns_cuda.ops.<OP>``."""
        return getattr(ops, self.OP)(**args, **kw)

    def case_dtype(self, case: dict) -> torch.dtype:
        return case[self.MAIN].dtype

    def assert_matches(self, out, expected, dtype: torch.dtype) -> None:
        """The op's result ``out`` equals ``expected`` for inputs of ``dtype``."""
        assert_rel_close(out, expected, dtype)

    # ----------------------------------------------------------------------- non-contiguous
    def noncontiguous_args(self, case: dict, device) -> dict:
        """``case`` on ``device`` with every tensor a non-contiguous view of the same values."""
        nc = noncontiguous(to(case, device))
        assert all(not v.is_contiguous() or v.numel() <= 1 for v in nc.values() if isinstance(v, torch.Tensor))
        return nc

    def noncontiguous_expected(self, case: dict):
        return self.reference(case)

    def test_noncontiguous(self, nc, device):
        case = self.make_case(**self.NONCONTIGUOUS[nc])
        expected = self.noncontiguous_expected(case)
        args = self.noncontiguous_args(case, device)
        with nan_filled_outputs():
            out = self.run(args, **self.NONCONTIGUOUS_KWARGS)
        self.assert_matches(out, expected, self.case_dtype(case))

    # ------------------------------------------------------------------------------ opcheck
    def opcheck_args(self, device, extra: tuple = (), cast: Optional[torch.dtype] = None, **kw) -> tuple:
        """The positional arguments of one ``opcheck`` case: ``make_case(**kw)`` on ``device``
        (floating tensors cast to ``cast``), then ``extra``."""
        return tuple(to(self.make_case(**kw), device, cast).values()) + tuple(extra)

    def test_opcheck(self, oc, device):
        torch.library.opcheck(self.op(), self.opcheck_args(device, **self.OPCHECK[oc]))

    # ------------------------------------------------------------------------ argument errors
    def bad_cases(self) -> List[Tuple[str, dict, type, str]]:
        return list(self.BAD)

    def bad_args(self) -> dict:
        """The valid arguments that each argument error changes."""
        return self.make_case(**self.BAD_CASE)

    def test_bad_arguments(self, bad, mode):
        """The compiled op raises ValueError / TypeError naming the op and the argument, and the
        fake kernel (torch.compile / FakeTensorMode) raises the same."""
        _, change, exc, pattern = bad
        args = dict(self.bad_args(), **change)
        expect_op_error(self.op(), args, exc, pattern, mode)


class ReferenceOpTester(OpTester):
    """An op with a pure-PyTorch twin ``nns_cuda.ops.reference.<OP>`` (same signature) and CPU and
    CUDA kernels: the checks of :class:`OpTester`, the comparisons with the twin, empty shapes,
    invalid windows and the GPU cases."""

    #: ``make_case`` keyword arguments of the valid case that ``invalid_cases`` spoils
    INVALID_CASE: Dict[str, Any] = {}
    #: ``make_case`` keyword arguments of the device-mismatch case, and the arguments moved to the CPU
    DEVICE_CASE: Dict[str, Any] = {}
    DEVICE_ARGS: Sequence[str] = ()
    #: further op arguments of the large GPU run
    LARGE_KWARGS: Dict[str, Any] = {}

    def reference(self, case: dict):
        """The twin on the case in float64 on the CPU."""
        return getattr(ref, self.OP)(**to(case, "cpu", torch.float64))

    # ---------------------------------------------------------------- reference comparisons
    def check_reference(self, cfg: str, case: dict, expected) -> None:
        """Checks of the twin's result itself against an oracle (none by default)."""

    def check_result(self, cfg: str, case: dict, out, expected, dtype: torch.dtype) -> None:
        """The op's further properties on the case (none by default)."""

    def test_matches_reference(self, cfg, dtype, device):
        case = self.make_case(list(self.CONFIGS).index(cfg), dtype=dtype, **self.CONFIGS[cfg])
        expected = self.reference(case)
        self.check_reference(cfg, case, expected)
        with nan_filled_outputs():
            out = self.run(to(case, device))
        assert out.device.type == device
        self.assert_matches(out, expected, dtype)
        self.check_result(cfg, case, out, expected, dtype)

    # ------------------------------------------------------------------------------- empty
    def empty_cases(self, device) -> List[Tuple[dict, tuple, bool]]:
        """(arguments on ``device``, the result's shape, whether it must be all zeros)."""
        raise NotImplementedError

    def test_empty(self, device):
        cases = self.empty_cases(device)
        assert cases
        for args, shape, zeros in cases:
            out = self.run(args)
            assert tuple(out.shape) == tuple(shape), (tuple(out.shape), tuple(shape))
            if zeros:
                assert (out == 0).all()

    # --------------------------------------------------------------------- invalid windows
    def invalid_cases(self, case: dict) -> List[Tuple[dict, str, Optional[str]]]:
        """(change of ``case``, the op's message pattern, the twin's message pattern or None)."""
        raise NotImplementedError

    def test_invalid_windows(self, device):
        """Windows that do not fit (or indices out of range): the op raises ValueError with its
        message, and the twin agrees that the arguments are invalid."""
        case = self.make_case(**self.INVALID_CASE)
        cases = self.invalid_cases(case)
        assert cases
        for change, pattern, ref_pattern in cases:
            bad = dict(case, **change)
            with pytest.raises(ValueError, match=pattern):
                self.run(to(bad, device))
            if ref_pattern is not None:
                with pytest.raises(ValueError, match=ref_pattern):
                    getattr(ref, self.OP)(**bad)

    # ------------------------------------------------------------------------------- GPU
    @needs_cuda
    def test_cuda_device_mismatch(self):
        c = to(self.make_case(**self.DEVICE_CASE), "cuda")
        assert self.DEVICE_ARGS
        for key in self.DEVICE_ARGS:
            with pytest.raises(ValueError, match=rf"{self.OP}: {key} must be on the same device as {self.MAIN} "
                                                 rf"\(cuda:0\), got cpu"):
                self.run(dict(c, **{key: c[key].cpu()}))

    def check_large(self, case: dict, out) -> None:
        """Further checks of a large GPU case (none by default)."""

    @needs_cuda
    def test_cuda_large(self, large):
        case = self.make_case(**self.LARGE[large])
        expected = self.reference(case)
        with nan_filled_outputs():
            out = self.run(to(case, "cuda"), **self.LARGE_KWARGS)
        self.assert_matches(out, expected, self.case_dtype(case))
        self.check_large(case, out)
