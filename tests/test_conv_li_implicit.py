"""conv_li_implicit (the Triton implicit-gather GEMM, ``nns_cuda/ops/_triton_conv.py``) against the
reference.

The kernel is a CUDA kernel; the CPU test suite checks it under Triton's interpreter
(``TRITON_INTERPRET=1``, which runs the same kernel code on CPU tensors): the test
``test_cpu_cases_under_the_triton_interpreter`` re-runs this file in a subprocess with the
interpreter on, where the ``cpu`` cases below run. On a GPU machine the ``cuda`` cases run
directly.

What is compared (float32 against ``reference.conv_li`` in float64, rel. 1e-5; bfloat16 /
float16 against the reference twin on the same 16-bit inputs): the seeded cases of
``test_conv_li.py`` (strides, padding, dilation, clipped windows, grouped / depthwise, with and
without scale / gate / in_active), the three kinds of placed input copy, uneven and empty pair
lists, outputs NaN-filled so an unwritten element fails, gated-off outputs exactly zero with
NaN inputs, inf / NaN patches of inactive inputs never read, non-contiguous inputs, empty
shapes, ``torch.library.opcheck``, the engine's ``conv_algorithm="implicit"`` against
``"direct"`` on whole models; argument errors (the op and its fake kernel), windows that do not
fit, arguments on another device than the patches, float64 and CPU tensors without the
interpreter refused with a message that says what to use instead; float32 obeys
``torch.backends.cuda.matmul.allow_tf32`` like the cuBLAS formulations.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import nns_cuda as nns
from _op_tester import to
from conftest import assert_rel_close, nan_filled_outputs, needs_cuda, rel_err
from nns_cuda.ops import _triton_conv as T
from nns_cuda.ops.reference import ops as ref
from test_conv_li import CONFIGS, make_case, reference64
from test_conv_li_gather import PLACEMENT, _random_geometries
from test_conv_li_gemm import LOW_TOL, ChunkedConvTester

pytestmark = pytest.mark.skipif(T.triton is None, reason=f"Triton not installed ({T.TRITON_ERROR})")

#: devices the kernel runs on here: the CPU only under the interpreter, CUDA when visible
DEVICES = (["cpu"] if T.INTERPRET else []) + [pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.skipif(T.INTERPRET, reason="this is the run under the interpreter")
def test_cpu_cases_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env=env,
                          capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    summary = [ln for ln in proc.stdout.splitlines() if " passed" in ln]
    assert summary and int(summary[-1].split(" passed")[0].split()[-1]) >= 25, tail


class TestConvLiImplicit(ChunkedConvTester):
    OP = "conv_li_implicit"
    DEVICES = DEVICES
    DTYPES = {"f32": torch.float32}  # float64 is refused: test_refuses_float64
    NONCONTIGUOUS = {"f32": dict(seed=6, dtype=torch.float32, groups=2, s=(2, 1), pre=(3, 1, 1))}
    NONCONTIGUOUS_KWARGS = dict(max_elems=1)
    OPCHECK = {"basic": dict(seed=9, B=1, Ci=2, Co=2, H=6, W=5, dtype=torch.float32),
               "max_elems7": dict(seed=9, B=1, Ci=2, Co=2, H=6, W=5, dtype=torch.float32, extra=(7,))}
    EMPTY_DTYPE = torch.float32
    INVALID_CASE = dict(seed=12, dtype=torch.float32)
    DEVICE_CASE = dict(seed=13, dtype=torch.float32)
    # the large CUDA cases of the direct kernel (thread blocks, channel tiles) do not apply to the
    # Triton kernel, whose tiles the placements and random geometries below cover
    test_cuda_large = None

    def check_result(self, cfg, case, out, expected, dtype):
        assert (expected != 0).any()

    @pytest.mark.parametrize("max_elems", [0, 1], ids=["one_chunk", "per_image"])
    @pytest.mark.parametrize("kind", list(PLACEMENT))
    def test_placements(self, kind, max_elems, device):
        case = make_case(30 + list(PLACEMENT).index(kind), B=3, dtype=torch.float32, **PLACEMENT[kind])
        with nan_filled_outputs():
            out = self.run(to(case, device), max_elems)
        assert_rel_close(out, reference64(case), torch.float32)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
    @pytest.mark.parametrize("cfg", ["basic", "grouped_asym"])
    def test_low_precision(self, cfg, dtype, device):
        if device == "cpu" and dtype == torch.bfloat16:
            pytest.skip("Triton's CPU interpreter computes bfloat16 dots wrongly (numpy has no bfloat16): "
                        "a 16x16 bf16 tl.dot is off by 3e10 there; the cuda case checks bf16")
        case = to(make_case(list(CONFIGS).index(cfg), dtype=torch.float32, **CONFIGS[cfg]), dtype=dtype)
        want = ref.conv_li_implicit(**to(case, "cpu")).double()
        out = self.run(to(case, device))
        assert out.dtype == dtype and not out.isnan().any()
        assert rel_err(out, want) <= LOW_TOL[dtype]
        bad = out.clone()
        bad[:, -1] = 0
        assert rel_err(bad, want) > 10 * LOW_TOL[dtype]

    def test_gated_outputs_are_exact_zeros(self, device):
        case = make_case(3, dtype=torch.float32)
        nan_in = case["patches"].clone()
        nan_in[0, 1, 2, 2] = float("nan")
        case["in_active"][0, 1, 2, 2] = True
        out = self.run(to(dict(case, patches=nan_in), device)).cpu()
        off = (case["gate"] * case["scale"].view(1, -1, 1, 1)) == 0
        assert off.any() and (~off).any()
        assert (out[off] == 0).all()
        assert out[~off].isnan().any()  # the NaN does reach the active outputs that use it

    def test_inactive_inputs_are_never_read(self, device):
        case = make_case(4, dtype=torch.float32)
        g = torch.Generator().manual_seed(5)
        dense = torch.randn(case["patches"].shape, generator=g)
        mask = torch.rand(case["in_active"].shape, generator=g) > 0.5
        dense[~mask] = float("inf")
        out = self.run(to(dict(case, patches=dense, in_active=mask), device))
        expected = ref.conv_li(**dict(to(case, dtype=torch.float64), in_active=None,
                                      patches=torch.where(mask[..., None, None, None], dense, 0.0).double()))
        assert_rel_close(out, expected, torch.float32)

    def test_uneven_and_empty_pair_lists(self, device):
        case = make_case(40, B=2, Ci=5, Co=4, H=8, W=8, pre=(3, 1, 1), dtype=torch.float32)
        act = case["in_active"].clone()
        act[0] = True
        act[1] = False
        act[1, 2, 3, 3] = True
        patches = torch.randn(case["patches"].shape, generator=torch.Generator().manual_seed(41)) * act[..., None, None, None]
        case = dict(case, in_active=act, patches=patches)
        assert_rel_close(self.run(to(case, device)), reference64(case), torch.float32)
        with nan_filled_outputs():
            z = self.run(to(dict(case, in_active=torch.zeros_like(act)), device))
        assert (z == 0).all()

    def test_refuses_float64(self, device):
        with pytest.raises(ValueError, match=r"conv_li_implicit: float64 patches are not supported.*conv_li_gather"):
            self.run(to(make_case(12), device))

    @pytest.mark.parametrize("model_name", ["small_resnet", "alexnet_like"])
    def test_engine_implicit_equals_direct(self, model_name, device):
        """The engine with conv_algorithm="implicit" (every groups==1 conv on the Triton kernel; the
        depthwise one direct) equals the direct scan; float64 models run the cuBLAS gather."""
        from _models import make
        from test_engine import _leaf_layers

        model, x = make(model_name, torch.float32)
        model, x = model.to(device), x.to(device)
        names = [n for n, _ in _leaf_layers(model)]
        kw = dict(strategy="forward", keep_images=True, stats=True)
        d = nns.Scanner(model, names, conv_algorithm="direct", **kw).scan(x)
        i = nns.Scanner(model, names, conv_algorithm="implicit", **kw).scan(x)
        assert i.conv_algorithm == "implicit" and "implicit" in i.conv_algorithms.values()
        assert set(i.conv_algorithms.values()) <= {"implicit", "direct"}
        for n in names:
            assert rel_err(i[n].images, d[n].images) <= 1e-5, n
            assert rel_err(i[n].stats, d[n].stats) <= 1e-5, n
        m64, x64 = make(model_name, torch.float64)
        r64 = nns.Scanner(m64.to(device), names[:2], conv_algorithm="implicit", **kw).scan(x64.to(device))
        assert set(r64.conv_algorithms.values()) <= {"gather", "direct"} and "gather" in r64.conv_algorithms.values()

    # ------------------------------------------------------------ in the main process (no kernel runs)
    @pytest.mark.skipif(T.INTERPRET, reason="the interpreter runs CPU tensors")
    def test_cpu_tensors_need_the_interpreter(self):
        from _models import make

        with pytest.raises(ValueError, match=r"conv_li_implicit is a Triton kernel for CUDA tensors \(got cpu\).*conv_li_gather"):
            self.run(make_case(0, dtype=torch.float32))
        model, x = make("simple_cnn", torch.float32)
        with pytest.raises(ValueError, match=r"conv_algorithm='implicit' cannot run here: .*CUDA"):
            nns.Scanner(model, ["4"], conv_algorithm="implicit").scan(x)
        # the reference backend runs the op's twin
        got = nns.Scanner(model, ["4"], conv_algorithm="implicit", backend="reference", keep_images=True).scan(x)
        want = nns.Scanner(model, ["4"], conv_algorithm="direct", backend="reference", keep_images=True).scan(x)
        assert torch.equal(got["4"].images, want["4"].images) and got.conv_algorithms == {"0": "implicit", "3": "implicit"}

    def test_random_geometries(self, device):
        """12 random geometries (strides, dilations, padding, groups, moving / clipped windows), float32,
        in one chunk and per image, against the float64 reference."""
        for case in _random_geometries(12, seed=11):
            want = reference64(case)
            c32 = to(case, device, torch.float32)
            for max_elems in (0, 1):
                got = self.run(c32, max_elems)
                assert rel_err(got, want) <= 1e-5 and not got.isnan().any(), (max_elems, {
                    k: v for k, v in case.items() if not isinstance(v, torch.Tensor)})
