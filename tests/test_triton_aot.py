"""The Triton implicit-gather conv kernel compiled ahead of time for sm_90 (H100 / H200), on a
machine without a GPU (``benchmarks/triton_aot.py``).

What is checked, per variant (fp32 IEEE, fp32 TF32, fp16, bf16): every block configuration the
launch heuristic can pick compiles to a cubin, fits the per-block shared memory, uses the tensor
cores (wgmma / mma of the variant's type) exactly when it should, and does not spill registers;
every configuration the tuner tries compiles and fits. A planted configuration known to spill
(64 × 128 FMA tile on 4 warps, which the heuristic used to pick) must be reported.
"""
from __future__ import annotations

import pytest

from nns_cuda.ops import _triton_conv as T

pytestmark = [
    pytest.mark.skipif(T.triton is None, reason=f"Triton not installed ({T.TRITON_ERROR})"),
    pytest.mark.skipif(T.INTERPRET, reason="TRITON_INTERPRET=1: no GPU compilation in this process"),
]

aot = pytest.importorskip("benchmarks.triton_aot")


def _ptxas_or_skip():
    try:
        aot._ptxas()
    except FileNotFoundError as e:  # pragma: no cover - depends on the Triton wheel
        pytest.skip(str(e))


@pytest.mark.parametrize("variant", list(aot.VARIANTS))
def test_every_launchable_configuration_compiles_for_sm90(variant):
    _ptxas_or_skip()
    rows = aot.run_all(90, variants=[variant], both_mul=False)
    assert {tuple(r["config"]) for r in rows if r["source"] == "heuristic"} == set(aot.heuristic_configs(variant))
    assert {tuple(r["config"]) for r in rows} >= set(aot.tuner_configs())
    bad = {(tuple(r["config"]), r["source"]): aot.problems(r) for r in rows if aot.problems(r)}
    assert not bad, f"{variant}: {bad}"
    for r in rows:
        assert 0 < r["shared_bytes"] <= aot.SMEM_LIMIT[90]
        assert r["registers"] is not None and r["registers"] <= 255


def test_heuristic_uses_eight_warps_for_the_large_fma_tile():
    assert T._launch_config(256, 3 * 32 * 32, fma=True) == (64, 128, 32, 8, 3)
    assert T._launch_config(256, 3 * 32 * 32, fma=False) == (64, 128, 32, 4, 3)
    assert T._launch_config(16, 16, fma=True) == (16, 16, 32, 4, 3)


def test_a_spilling_configuration_is_reported():
    _ptxas_or_skip()
    row = aot.compile_variant("fp32-ieee", True, (64, 128, 32, 4, 3), 90)
    row["source"] = "heuristic"
    assert row["spill_stores"] > 0, row
    assert any("spills" in p for p in aot.problems(row))


def test_problems_names_each_defect():
    ok = {"variant": "fp32-tf32", "has_mul": True, "config": [64, 128, 32, 4, 3], "arch": 90,
          "shared_bytes": 1000, "smem_limit": aot.SMEM_LIMIT[90], "tensor_core": "wgmma", "tc_types": ["tf32"],
          "fma_f32": 0, "registers": 200, "spill_stores": 0, "spill_loads": 0, "source": "heuristic"}
    assert aot.problems(ok) == []
    assert "shared memory" in aot.problems({**ok, "shared_bytes": 10 ** 6})[0]
    assert "no tensor-core" in aot.problems({**ok, "tensor_core": None, "tc_types": []})[0]
    assert "not tf32" in aot.problems({**ok, "tc_types": ["f16"]})[0]
    assert "uses the tensor cores" in aot.problems({**ok, "variant": "fp32-ieee", "fma_f32": 10})[0]
    assert "no fma" in aot.problems({**ok, "variant": "fp32-ieee", "tensor_core": None, "tc_types": []})[0]
    assert aot.problems({**ok, "spill_stores": 8, "source": "tuner"}) == []
