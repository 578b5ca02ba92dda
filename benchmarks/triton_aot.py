"""Compile the Triton implicit-gather conv kernel ahead of time for a GPU this machine does not have.

    python -m benchmarks.triton_aot [--arch 90] [--json PATH]

Triton compiles to PTX and a cubin without a GPU (``triton.compile`` with a ``GPUTarget``; ptxas
ships with Triton). This checks, on a CPU-only machine, what the interpreter cannot
(``tests/test_conv_li_implicit.py`` runs the kernel's arithmetic under ``TRITON_INTERPRET=1``):

* every variant the engine can launch compiles for the card: fp32 with IEEE products, fp32 with
  TF32, fp16, bf16, with and without the gate / scale multiplier, for every block configuration
  the launch heuristic (``_launch_config``) can pick and every one ``benchmarks/tune_implicit.py``
  tries;
* the static shared memory of each fits the card's per-block limit (227 KiB on sm_90: a
  configuration over it would fail at launch, on the device, and cost device time);
* the tensor cores are used exactly when they should be: TF32 / fp16 / bf16 variants contain
  ``wgmma`` (sm_90) or ``mma`` instructions of that type, IEEE variants none;
* registers per thread and spills (``ptxas -v``): the heuristic's configurations must not spill
  (the tuner's may: it measures them).

``tests/test_triton_aot.py`` runs it in CI; ``benchmarks/NOTES.md`` records its table.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Tuple

#: the per-block shared memory a kernel may use (opt-in maximum), bytes, by compute capability
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

#: the kernel's variants: name -> (pointer dtype of patches / Q / OUT, LOWP, PREC)
VARIANTS = {
    "fp32-ieee": ("fp32", False, "ieee"),
    "fp32-tf32": ("fp32", False, "tf32"),
    "fp16": ("fp16", True, "tf32"),
    "bf16": ("bf16", True, "tf32"),
}


def _signature(dt: str) -> Dict[str, str]:
    sig = {"WT": "*fp32", "Q": f"*{dt}", "SEL": "*i64", "ROWS": "*i64", "OFF": "*i64", "CNT": "*i64",
           "WBASE": "*i64", "OBASE": "*i64", "MBASE": "*i64", "MUL": "*fp32", "OUT": f"*{dt}",
           "M": "i32", "N": "i32", "ROW_STRIDE": "i32", "MUL_STRIDE": "i32"}
    for c in ("HAS_MUL", "LOWP", "PREC", "BM", "BN", "BK"):
        sig[c] = "constexpr"
    return sig


def _ptxas() -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"triton_aot: Triton's ptxas not found at {path}")
    return path


def compile_variant(variant: str, has_mul: bool, cfg: Tuple[int, int, int, int, int], arch: int = 90
                    ) -> Dict[str, Any]:
    """Compile ``_implicit_kernel`` for ``sm_<arch>`` and describe the result (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nns_cuda.ops import _triton_conv as T

    if T.triton is None:
        raise RuntimeError(f"triton_aot: Triton is not installed ({T.TRITON_ERROR})")
    if T.INTERPRET:
        raise RuntimeError("triton_aot: TRITON_INTERPRET=1 is set; unset it to compile for a GPU")
    dt, lowp, prec = VARIANTS[variant]
    BM, BN, BK, warps, stages = cfg
    k = T._implicit_kernel
    const = {"HAS_MUL": has_mul, "LOWP": lowp, "PREC": prec, "BM": BM, "BN": BN, "BK": BK}
    src = ASTSource(fn=k, signature=_signature(dt),
                    constexprs={(k.arg_names.index(n),): v for n, v in const.items()})
    c = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": warps, "num_stages": stages})
    ptx = c.asm["ptx"]
    wgmma = re.findall(r"wgmma\.mma_async[^\s]*", ptx)
    mma = re.findall(r"\bmma\.sync[^\s]*", ptx)
    tc_types = sorted({t for ins in wgmma + mma for t in re.findall(r"\.(tf32|f16|bf16)", ins)})
    regs, spill_st, spill_ld = _ptxas_usage(ptx, arch)
    return {"variant": variant, "has_mul": has_mul, "config": list(cfg), "arch": arch,
            "shared_bytes": int(c.metadata.shared), "smem_limit": SMEM_LIMIT.get(arch),
            "tensor_core": "wgmma" if wgmma else ("mma" if mma else None), "tc_types": tc_types,
            "fma_f32": len(re.findall(r"\bfma\.rn\.f32", ptx)),
            "registers": regs, "spill_stores": spill_st, "spill_loads": spill_ld}


def _ptxas_usage(ptx: str, arch: int) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([_ptxas(), f"-arch=sm_{arch}{suffix}", "-v", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"triton_aot: ptxas failed on the kernel's PTX:\n{r.stderr[-2000:]}")
    text = r.stdout + r.stderr
    m = re.search(r"Used (\d+) registers", text)
    s = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(m.group(1)) if m else None, int(s.group(1)) if s else None, int(s.group(2)) if s else None)


def heuristic_configs(variant: str) -> List[Tuple[int, int, int, int, int]]:
    """Every configuration :func:`nns_cuda.ops._triton_conv._launch_config` can pick for ``variant``."""
    from nns_cuda.ops import _triton_conv as T

    fma = VARIANTS[variant][2] == "ieee"
    out: List[Tuple[int, int, int, int, int]] = []
    for M in (16, 32, 64, 4096):
        for N in (16, 32, 64, 128, 3 * 224 * 224):
            cfg = T._launch_config(M, N, fma=fma)
            if cfg not in out:
                out.append(cfg)
    return out


def tuner_configs() -> List[Tuple[int, int, int, int, int]]:
    from .tune_implicit import CONFIGS

    return list(CONFIGS)


def run_all(arch: int = 90, variants: Iterable[str] = tuple(VARIANTS), both_mul: bool = True
            ) -> List[Dict[str, Any]]:
    """The heuristic's configurations, then the tuner's, for every variant (gate·scale on, and off
    too with ``both_mul``)."""
    rows = []
    for v in variants:
        heur = heuristic_configs(v)
        for cfg in heur + [c for c in tuner_configs() if c not in heur]:
            for has_mul in ((True, False) if both_mul else (True,)):
                row = compile_variant(v, has_mul, cfg, arch)
                row["source"] = "heuristic" if cfg in heur else "tuner"
                rows.append(row)
    return rows


def problems(row: Dict[str, Any]) -> List[str]:
    """What is wrong with one compiled variant (empty: nothing)."""
    out = []
    lim = row["smem_limit"]
    if lim is not None and row["shared_bytes"] > lim:
        out.append(f"shared memory {row['shared_bytes']} B > the sm_{row['arch']} limit {lim} B")
    want_tc = row["variant"] != "fp32-ieee"
    if want_tc and row["tensor_core"] is None:
        out.append("no tensor-core (wgmma / mma) instruction")
    if want_tc:
        want = {"fp32-tf32": "tf32", "fp16": "f16", "bf16": "bf16"}[row["variant"]]
        if want not in row["tc_types"]:
            out.append(f"tensor-core instructions are {row['tc_types']}, not {want}")
    if not want_tc and row["tensor_core"] is not None:
        out.append(f"IEEE variant uses the tensor cores ({row['tensor_core']} {row['tc_types']})")
    if not want_tc and row["fma_f32"] == 0:
        out.append("IEEE variant has no fma.rn.f32")
    if row.get("source") == "heuristic" and (row["spill_stores"] or row["spill_loads"]):
        out.append(f"the launch heuristic's configuration spills {row['spill_stores']}/{row['spill_loads']} B "
                   f"per thread ({row['registers']} registers)")
    return out


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| variant | gate·scale | BM, BN, BK, warps, stages | from | shared KiB | tensor cores | regs | spills (st/ld B) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tc = f"{r['tensor_core']} {'/'.join(r['tc_types'])}" if r["tensor_core"] else f"none ({r['fma_f32']} fma.f32)"
        lines.append(f"| {r['variant']} | {'yes' if r['has_mul'] else 'no'} | {', '.join(map(str, r['config']))} | "
                     f"{r.get('source', '')} | {r['shared_bytes'] / 1024:.1f} | {tc} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_aot", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100 / H200)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    rows = run_all(a.arch)
    print(table(rows))
    bad = [(r, problems(r)) for r in rows if problems(r)]
    for r, why in bad:
        print(f"PROBLEM {r['variant']} mul={r['has_mul']} {r['config']}: {'; '.join(why)}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"arch": a.arch, "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
