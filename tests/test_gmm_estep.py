"""gmm_estep: the fused C++ E-step of the batched GMM against the batched torch E-step.

What is compared: ``torch.ops.nns_cuda.gmm_estep`` (csrc/cpu/gmm_estep_kernel.cpp) vs
``nns_cuda.analysis._gmm_em._estep_torch`` (bmm, max, exp, sum, log, bmm) on coefficients of real
mixtures (k-means++ seeds and a few EM iterations on clustered points), for k = 1 … 12 and point
counts that are not multiples of the kernel's tile; masked slots (the stacked strategy's
``-1e300`` constants); its polynomial exponential against ``torch.exp`` over the whole range,
including underflow; labels (first maximum); NaN propagation; non-contiguous inputs (the same
result bit for bit, outputs NaN-prefilled); ``opcheck``; argument errors (C++ = fake kernel; the
op tester, ``tests/_op_tester.py``); and ``select_k`` end to end with the fused and the torch
E-step. The op has a CPU kernel only.
"""
from __future__ import annotations

import math

import pytest
import torch

from _op_tester import OpTester
from nns_cuda.analysis import _gmm_em as E
from nns_cuda.analysis import gmm
from nns_cuda import ops

pytestmark = pytest.mark.skipif(not (ops.HAS_OPS and hasattr(torch.ops.nns_cuda, "gmm_estep")),
                                reason="nns_cuda._C (with gmm_estep) not built")


def _points(g: int, s: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(g, 4, 2, generator=gen, dtype=torch.float64) * 4
    lab = torch.randint(0, 4, (g, s), generator=gen)
    pts = torch.gather(centres, 1, lab[..., None].expand(g, s, 2))
    return pts + torch.randn(g, s, 2, generator=gen, dtype=torch.float64) * torch.rand(g, 1, 1, generator=gen,
                                                                                        dtype=torch.float64)


def _coefs(g: int, s: int, k: int, seed: int, iters: int = 3):
    z, _, _ = E.standardise(_points(g, s, seed))
    phit = E.features(z).transpose(1, 2).contiguous()
    idx = E.kmeans_plusplus(z, k, seed) if k > 1 else torch.zeros(g, 1, dtype=torch.long)
    mom = torch.gather(phit, 2, idx[:, None, :].expand(g, 6, k)).transpose(1, 2)
    reg = torch.full((g, 1), 1e-6, dtype=torch.float64)
    theta = E._m_step(mom, reg)
    theta[..., 0] = math.log(1.0 / s)
    for _ in range(iters):
        w, _ = E._coefficients(theta)
        mom, _ = E._estep_torch(w, phit.clone(), k)
        theta = E._m_step(mom, reg)
    w, _ = E._coefficients(theta)
    return w, phit


def _reference(w, phit):
    lp = torch.bmm(w, phit)
    mx = lp.amax(1, keepdim=True)
    e = (lp - mx).exp()
    tot = e.sum(1)
    ll = tot.log().mean(-1) + mx[:, 0].mean(-1)
    mom = torch.bmm(phit, (e / tot[:, None, :]).transpose(1, 2)).transpose(1, 2)
    return mom, ll, E.argmax_dim1(lp)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def make_case(seed, *, g=3, s=64, k=4, want_moments=True, want_labels=True):
    """The op's arguments: the coefficients of ``g`` fitted ``k``-component mixtures and the
    features of their ``s`` points (``_coefs``)."""
    w, phit = _coefs(g, s, k, seed=seed)
    return dict(coef=w, phit=phit, want_moments=want_moments, want_labels=want_labels)


def _bad_cases():
    c = make_case(7, g=2, s=20, k=3)
    w, phit = c["coef"], c["phit"]
    return [
        ("coef_rank", dict(coef=w[0]), ValueError, r"gmm_estep: coef must be 3-D \[B, k, 6\]"),
        ("phit_rank", dict(phit=phit[0]), ValueError, r"gmm_estep: phit must be 3-D \[B, 6, S\]"),
        ("coef_dtype", dict(coef=w.float()), TypeError, r"gmm_estep: coef must be torch.float64, got torch.float32"),
        ("phit_dtype", dict(phit=phit.float()), TypeError, r"gmm_estep: phit must be torch.float64"),
        ("batch_mismatch", dict(coef=w[:1]), ValueError, r"gmm_estep: coef must be \[B, k, 6\] and phit \[B, 6, S\]"),
        ("coef_features", dict(coef=w[..., :5].contiguous()), ValueError, r"coef must be \[B, k, 6\]"),
        ("too_many_components", dict(coef=w.new_zeros(2, 65, 6)), ValueError,
         r"gmm_estep: the number of components k must be in \[1, 64\], got 65"),
        ("no_points", dict(phit=phit[..., :0]), ValueError, r"gmm_estep: phit needs at least one point"),
    ]


class TestGmmEstep(OpTester):
    OP = "gmm_estep"
    MAIN = "coef"
    DEVICES = ("cpu",)  # a CPU kernel only
    make_case = staticmethod(make_case)
    NONCONTIGUOUS = {"f64": dict(seed=5, g=3, s=64, k=4)}
    OPCHECK = {"all_outputs": dict(seed=6, g=2, s=33, k=3),
               "loglik_only": dict(seed=6, g=2, s=33, k=3, want_moments=False, want_labels=False)}
    BAD = _bad_cases()
    BAD_CASE = dict(seed=7, g=2, s=20, k=3, want_labels=False)

    def run(self, args):
        return self.op()(**args)

    def noncontiguous_args(self, case, device):
        w, phit = case["coef"].to(device), case["phit"].to(device)
        wt = w.transpose(0, 1).contiguous().transpose(0, 1)
        pt = phit.transpose(1, 2).contiguous().transpose(1, 2)
        assert not wt.is_contiguous() and not pt.is_contiguous()
        return dict(case, coef=wt, phit=pt)

    def noncontiguous_expected(self, case):
        return self.run(case)

    def assert_matches(self, out, expected, dtype):
        assert all(torch.equal(x, y) for x, y in zip(out, expected))

    @pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 10, 12])
    @pytest.mark.parametrize("s", [1, 7, 129, 1000])
    def test_fused_equals_torch(self, k, s):
        w, phit = _coefs(5, max(s, 4 * k), k, seed=10 * k + s)  # fitted on enough points,
        phit = phit[..., :s].contiguous()  # evaluated on s of them (the E-step needs no s >= k)
        mom_r, ll_r, lab_r = _reference(w, phit)
        mom, ll, lab = torch.ops.nns_cuda.gmm_estep(w, phit, True, True)
        assert mom.shape == (5, k, 6) and ll.shape == (5,) and lab.shape == (5, s) and lab.dtype == torch.long
        # lp is the expanded quadratic form const + p·x + q·x²: for tight clusters its six terms are
        # ~1e4 × its value, and bmm and the kernel add them in different orders, so lp (and the
        # log-likelihood built from it) agree to ~1e-11 relative, not to the last bit
        assert _rel(mom, mom_r) < 1e-11
        assert float(((ll - ll_r).abs() / ll_r.abs().clamp_min(1e-12)).max()) < 1e-9
        assert torch.equal(lab, lab_r)
        # the torch E-step of the EM loop (blocked log products) agrees too
        mom_t, ll_t = E._estep_torch(w, phit.clone(), k)
        assert _rel(mom, mom_t) < 1e-11 and _rel(ll, ll_t) < 1e-9
        # outputs not asked for are empty
        m0, l0, b0 = torch.ops.nns_cuda.gmm_estep(w, phit, False, False)
        assert m0.numel() == 0 and b0.numel() == 0 and torch.equal(l0, ll)


    def test_masked_slots_are_never_responsible(self):
        w, phit = _coefs(4, 300, 3, seed=1)
        pad = w.new_zeros(4, 2, 6)
        pad[..., 0] = E._MASKED
        wm = torch.cat([w, pad], 1)
        mom, ll, lab = torch.ops.nns_cuda.gmm_estep(wm, phit, True, True)
        mom3, ll3, lab3 = torch.ops.nns_cuda.gmm_estep(w, phit, True, True)
        assert torch.equal(mom[:, 3:], torch.zeros_like(mom[:, 3:]))
        assert _rel(mom[:, :3], mom3) < 1e-15 and _rel(ll, ll3) < 1e-15 and torch.equal(lab, lab3)


    def test_exponential_over_its_range(self):
        # two components with lp = 0 and lp = v: loglik = mean log(1 + e^v), resp_1 = e^v / (1 + e^v)
        v = torch.cat([-torch.logspace(-300, math.log10(745.0), 20000, dtype=torch.float64),
                       torch.tensor([0.0, -708.0, -708.5, -709.0, -744.0, -746.0, -1e4], dtype=torch.float64)])
        phit = torch.zeros(1, 6, v.numel(), dtype=torch.float64)
        phit[0, 0] = 1.0
        phit[0, 1] = v
        coef = torch.tensor([[[0.0] * 6, [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
        mom, ll, _ = torch.ops.nns_cuda.gmm_estep(coef, phit, True, False)
        e = torch.exp(v)
        want = e / (1 + e)
        assert abs(float(mom[0, 1, 0] - want.sum())) <= 4e-16 * float(want.sum())
        # (the kernel sums 20,000 logarithms in a different order than torch.mean)
        assert abs(float(ll[0] - torch.log1p(e).mean())) <= 1e-13 * float(torch.log1p(e).mean())
        # each point on its own (resp_1 of point i = mom of a one-point data set)
        one = phit[0].t().reshape(-1, 6, 1)[:, :, :]  # [N, 6, 1]
        m1, _, _ = torch.ops.nns_cuda.gmm_estep(coef.expand(one.shape[0], 2, 6), one, True, False)
        got = m1[:, 1, 0]
        ok = want > 1e-300
        assert float(((got[ok] - want[ok]).abs() / want[ok]).max()) < 4e-16
        assert bool((got[v < -708.0] == 0).all())  # beyond exp's normal range: exactly 0 (< 1e-307)


    def test_labels_first_maximum_on_ties(self):
        # three identical components: every label is 0, as torch.argmax
        w, phit = _coefs(2, 50, 1, seed=3)
        w3 = w.expand(2, 3, 6).contiguous()
        _, _, lab = torch.ops.nns_cuda.gmm_estep(w3, phit, False, True)
        assert torch.equal(lab, torch.zeros_like(lab))


    def test_nan_propagates(self):
        w, phit = _coefs(3, 40, 2, seed=4)
        w[1, 0, 1] = math.nan
        mom, ll, _ = torch.ops.nns_cuda.gmm_estep(w, phit, True, False)
        assert math.isnan(float(ll[1])) and bool(mom[1].isnan().any())
        assert torch.isfinite(ll[[0, 2]]).all() and torch.isfinite(mom[[0, 2]]).all()


    def test_select_k_fused_equals_torch(self, monkeypatch):
        pts = _points(24, 400, seed=8) * 3.0
        monkeypatch.setattr(E, "ESTEP", "fused")
        a = gmm.select_k(pts, k_max=6, warn=False)
        monkeypatch.setattr(E, "ESTEP", "torch")
        b = gmm.select_k(pts, k_max=6, warn=False)
        assert torch.equal(a.k, b.k)
        assert float((a.labels == b.labels).double().mean()) == 1.0
        assert float(((a.loglik_per_k - b.loglik_per_k) / b.loglik_per_k).abs().max()) < 1e-9
        monkeypatch.setattr(E, "ESTEP", "bogus")
        with pytest.raises(ValueError, match="ESTEP must be 'auto', 'fused' or 'torch'"):
            gmm.select_k(pts, k_max=6, warn=False)


    def test_bench_gmm_times_both_esteps(self, tmp_path):
        import json

        from benchmarks import bench_gmm

        out = tmp_path / "gmm.json"
        assert bench_gmm.main(["--filters", "6", "--samples", "80", "--k-max", "4", "--sk-filters", "2",
                               "--repeat", "1", "--json", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["correctness"]["same_k"] >= 0.95
        impls = {r["estep"] for r in res["torch"]}
        assert impls == {"fused", "torch"}
        assert all(r["wall_s"] > 0 and r["speedup_wall"] > 0 for r in res["torch"])
