"""linear_li: compiled kernels (CPU, CUDA) against the reference and a float64 einsum.

What is compared (the op tester, ``tests/_op_tester.py``, plus the test below):
``ops.linear_li`` vs ``reference.linear_li`` in float64 and vs an explicit ``einsum`` oracle, for
gates absent / dense / sparse (the op switches to a gathered-rows GEMM below half density) /
all-zero / bool, float64 and float32, gated-off rows exactly zero, non-contiguous inputs, empty
shapes, ``opcheck``, argument errors (C++ = fake kernel), and on a GPU arguments on the wrong
device. Also an autograd oracle: a two-layer MLP's learned images ``x ⊙ ∂a/∂x``.
"""
from __future__ import annotations

import torch

from _op_tester import ReferenceOpTester, needs_ops, to
from conftest import assert_rel_close, rel_err
from nns_cuda import ops
from nns_cuda.ops.reference import ops as ref

pytestmark = needs_ops


def make_case(seed, *, B=3, Nin=7, Nout=9, P=20, density=0.5, gate="float", dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(B, Nin, P, generator=g, dtype=dtype)
    weight = torch.randn(Nout, Nin, generator=g, dtype=dtype)
    on = torch.rand(B, Nout, generator=g) < density
    if gate is None:
        gt = None
    elif gate == "bool":
        gt = on
    else:
        gt = on.to(dtype) * (torch.rand(B, Nout, generator=g, dtype=dtype) + 0.5)
    return dict(dense=dense, weight=weight, gate=gt)


def einsum_oracle(c):
    out = torch.einsum("oi,bip->bop", c["weight"].double(), c["dense"].double())
    if c["gate"] is not None:
        out = out * c["gate"].double().unsqueeze(-1)
    return out


CONFIGS = {
    "no_gate": dict(gate=None),
    "dense_gate": dict(density=0.9),
    "sparse_gate": dict(density=0.2),
    "sparse_gate_big": dict(B=4, Nin=33, Nout=40, P=50, density=0.3),
    "all_off": dict(density=0.0),
    "bool_gate_sparse": dict(gate="bool", density=0.3),
    "bool_gate_dense": dict(gate="bool", density=0.8),
}


def _bad_cases():
    c = make_case(44)
    return [
        ("dense_rank", dict(dense=c["dense"][0]), ValueError, r"linear_li: dense must be 3-D \[B, Nin, P\], got \[7, 20\]"),
        ("dense_dtype", dict(dense=c["dense"].int()), TypeError, r"linear_li: dense must be float32, float64, bfloat16 or float16, got torch.int32"),
        ("weight_rank", dict(weight=c["weight"][0]), ValueError, r"linear_li: weight must be 2-D \[Nout, Nin\], got \[7\]"),
        ("weight_cols", dict(weight=c["weight"][:, :3]), ValueError, r"linear_li: weight must be \[Nout, Nin=7\], got \[9, 3\]"),
        ("weight_dtype", dict(weight=c["weight"].long()), TypeError, r"linear_li: weight must be a floating-point tensor"),
        ("gate_shape", dict(gate=c["gate"][0]), ValueError, r"linear_li: gate must be \[B, Nout\] = \[3, 9\], got \[9\]"),
        ("gate_dtype", dict(gate=c["gate"].long()), TypeError, r"linear_li: gate must be a floating-point or bool tensor"),
    ]


BAD = _bad_cases()


class TestLinearLi(ReferenceOpTester):
    OP = "linear_li"
    MAIN = "dense"
    make_case = staticmethod(make_case)
    CONFIGS = CONFIGS
    NONCONTIGUOUS = {"0.2": dict(seed=40, density=0.2), "0.9": dict(seed=40, density=0.9)}
    OPCHECK = {"0.2": dict(seed=43, density=0.2), "0.2_no_gate": dict(seed=43, density=0.2, gate=None),
               "0.9": dict(seed=43, density=0.9), "0.9_no_gate": dict(seed=43, density=0.9, gate=None)}
    BAD = BAD
    BAD_CASE = dict(seed=44)
    DEVICE_CASE = dict(seed=45)
    DEVICE_ARGS = ("weight", "gate")
    # linear_li has no windows: every shape the checks accept is valid
    test_invalid_windows = None
    # one GEMM per sample: the CPU cases cover its shapes
    test_cuda_large = None

    def check_reference(self, cfg, case, expected):
        assert rel_err(einsum_oracle(case), expected) <= 1e-12 or expected.abs().max() == 0

    def assert_matches(self, out, expected, dtype):
        if expected.abs().max() == 0:
            assert (out == 0).all() and out.shape == expected.shape
        else:
            assert_rel_close(out, expected, dtype)

    def check_result(self, cfg, case, out, expected, dtype):
        if case["gate"] is not None:  # gated-off rows exactly zero
            assert (out.cpu()[case["gate"] == 0] == 0).all()

    def noncontiguous_args(self, case, device):
        c = to(case, device)
        nc = dict(dense=c["dense"].transpose(1, 2).contiguous().transpose(1, 2),
                  weight=c["weight"].t().contiguous().t(),
                  gate=torch.stack([c["gate"], c["gate"]], -1)[..., 1])
        assert not any(v.is_contiguous() for v in nc.values())
        return nc

    def empty_cases(self, device):
        out = []
        for kw in (dict(B=0), dict(Nout=0), dict(P=0), dict(Nin=0)):
            case = to(make_case(42, **kw), device)
            expected = ref.linear_li(**to(case, "cpu"))
            assert (expected == 0).all()
            out.append((case, tuple(expected.shape), True))
        return out

    def test_mlp_autograd_oracle(self, device):
        """Two ReLU layers on a flat input: LI of the second layer's neurons = x ⊙ ∂a2/∂x."""
        g = torch.Generator().manual_seed(41)
        B, N0, N1, N2 = 2, 6, 8, 5
        x = torch.randn(B, N0, generator=g, dtype=torch.float64)
        W1 = torch.randn(N1, N0, generator=g, dtype=torch.float64)
        W2 = torch.randn(N2, N1, generator=g, dtype=torch.float64)
        net = lambda v: torch.relu(torch.relu(v @ W1.T) @ W2.T)  # noqa: E731
        jac = torch.autograd.functional.jacobian(net, x)              # [B, N2, B, N0]
        li = jac[torch.arange(B), :, torch.arange(B)] * x.unsqueeze(1)  # [B, N2, N0]
        z1 = x @ W1.T
        z2 = torch.relu(z1) @ W2.T
        dense0 = torch.diag_embed(x)                                  # [B, N0, P=N0]: pixel images
        l1 = ops.linear_li(dense0.to(device), W1.to(device), (z1 > 0).double().to(device))
        l2 = ops.linear_li(l1, W2.to(device), (z2 > 0).to(device))
        assert rel_err(l2.cpu(), li) <= 1e-12 and (li != 0).any()
