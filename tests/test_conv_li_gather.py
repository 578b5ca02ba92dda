"""conv_li_gather (batched GEMMs over the active (input neuron, tap) pairs) against the reference.

Every test of ``tests/test_conv_li_gemm.py`` (its ``GemmTests``) runs again here for
``conv_li_gather``: the same seeded cases against ``reference.conv_li`` in float64, every
chunking path, 16-bit patches, non-contiguous inputs, NaN-filled outputs, in_active masking of
NaN / inf patches, exact zeros where gated off, empty shapes, opcheck, argument errors of the C++
op and the fake kernel, windows that do not fit, CUDA cases.

The tests below cover what is particular to the gather: the three ways the op builds its placed
copy of the input (none: input windows already are the output window; a placement per input
position: all output windows are one window; several placements per input position: windows
that move with the position), uneven numbers of active pairs (padding of the GEMM's inner
dimension), positions without any active pair, and the engine's deep-layer shape.
"""
from __future__ import annotations

import pytest
import torch

from _op_tester import needs_ops, to
from conftest import assert_rel_close, nan_filled_outputs, rel_err
from nns_cuda import ops
from test_conv_li import make_case, reference64
from test_conv_li_gemm import CHUNKS, GemmTests

pytestmark = needs_ops


#: (case kwargs, what the op's placed copy of the input is)
PLACEMENT = {
    # input windows = output window = the image (pre RF 5 > 4): Q is the input itself
    "no_copy": dict(H=4, W=4, pre=(5, 1, 2), Ci=6, Co=5),
    # output windows = the image, input windows smaller: one placement per input position
    "one_offset": dict(H=6, W=5, pre=(5, 1, 2), Ci=6, Co=5),
    # windows move with the position: up to Kh*Kw placements per input position
    "moving": dict(H=9, W=8, pre=(3, 1, 1), Ci=6, Co=5),
    # strided, windows moving, some input rows used by one tap only
    "moving_stride2": dict(H=11, W=9, s=(2, 2), pre=(3, 1, 1), Ci=3, Co=4),
}


def _random_geometries(n: int, seed: int):
    """Random conv geometries: kernels 1-5, strides 1-3, dilations 1-2, padding, grouped, input
    windows from several virtual first layers (some clipped, some moving), activity masks on or
    off, scale / gate on or off."""
    import random

    rnd = random.Random(seed)
    out = []
    while len(out) < n:
        k = (rnd.choice([1, 2, 3, 5]), rnd.choice([1, 2, 3]))
        d = (rnd.choice([1, 2]), rnd.choice([1, 2]))
        G = rnd.choice([1, 1, 2])
        kw = dict(B=rnd.randint(1, 3), Ci=G * rnd.randint(1, 3), Co=G * rnd.randint(1, 3), groups=G,
                  H=rnd.randint(4, 13), W=rnd.randint(4, 13), D=rnd.randint(1, 3), k=k,
                  s=(rnd.choice([1, 2, 3]), rnd.choice([1, 2])), d=d,
                  p=(rnd.randint(0, k[0] - 1), rnd.randint(0, k[1] - 1)),
                  pre=rnd.choice([(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2), (2, 2, 0), (7, 3, 3)]),
                  scale=rnd.random() < 0.7, gate=rnd.random() < 0.7, in_active=rnd.random() < 0.8)
        try:
            case = make_case(1000 + len(out), **kw)
        except Exception:  # a geometry with no output position
            continue
        if case["ay_out"].numel() and case["ax_out"].numel():
            out.append(case)
    return out


class TestConvLiGather(GemmTests):
    OP = "conv_li_gather"

    @pytest.mark.parametrize("chunk", ["default", "rows", "position"])
    @pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
    @pytest.mark.parametrize("kind", list(PLACEMENT))
    def test_gather_placements(self, kind, dtype, chunk, device):
        case = make_case(30 + list(PLACEMENT).index(kind), B=3, dtype=dtype, **PLACEMENT[kind])
        ay_out, rho = case["ay_out"], case["rh_out"]
        if kind in ("no_copy", "one_offset"):  # the geometry is what the case claims
            assert (ay_out == ay_out[0]).all() and rho == 4 + 2 * (kind == "one_offset")
        if kind == "no_copy":
            assert case["patches"].shape[-2:] == (rho, case["rw_out"])
        expected = reference64(case)
        with nan_filled_outputs():
            out = ops.conv_li_gather(**to(case, device), max_elems=CHUNKS[chunk])
        assert_rel_close(out, expected, dtype)
        assert (expected != 0).any()

    def test_gather_uneven_and_empty_pair_lists(self, device):
        """Positions with many, few and no active pairs in one batched GEMM: the padding rows add
        nothing, and a position (or a whole chunk) without any active input is all zeros."""
        case = make_case(40, B=2, Ci=5, Co=4, H=8, W=8, pre=(3, 1, 1))
        act = case["in_active"].clone()
        act[0] = True                   # image 0: every pair active
        act[1] = False
        act[1, 2, 3, 3] = True          # image 1: one active input neuron
        patches = torch.randn(case["patches"].shape, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(41)) * act[..., None, None, None]
        case = dict(case, in_active=act, patches=patches)
        expected = reference64(case)
        out = ops.conv_li_gather(**to(case, device)).cpu()
        assert_rel_close(out, expected, torch.float64)
        assert (out[1, :, :2] == 0).all() and (out[1, :, 5:] == 0).all()  # out of that neuron's reach
        assert (out[1, :, 2:5, 2:5] != 0).any()
        none = dict(case, in_active=torch.zeros_like(act))
        z = ops.conv_li_gather(**to(none, device), max_elems=1)
        assert (z == 0).all()

    def test_gather_deep_layer_shape(self, device):
        """The engine's case: 3x3 / pad 1 over a 4x4 grid whose windows are the whole image, about
        half the inputs active, 16 channels, float32 — against the float64 reference and against
        the direct kernel."""
        case = make_case(42, B=2, Ci=16, Co=12, H=4, W=4, D=3, pre=(9, 1, 4), dtype=torch.float32)
        expected = reference64(case)
        out = ops.conv_li_gather(**to(case, device))
        assert_rel_close(out, expected, torch.float32)
        assert rel_err(out.cpu(), ops.conv_li(**case)) <= 1e-5

    def test_gather_random_geometries(self, device):
        """40 random geometries (float64), each at three chunk bounds, against the reference."""
        for case in _random_geometries(40, seed=7):
            want = reference64(case)
            for max_elems in (0, 1, 5000):
                got = ops.conv_li_gather(**to(case, device), max_elems=max_elems)
                assert rel_err(got, want) <= 1e-12 and not got.isnan().any(), (max_elems, {
                    k: v for k, v in case.items() if not isinstance(v, torch.Tensor)})
