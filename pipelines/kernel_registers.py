"""Registers, spills and shared memory of the KSA Triton kernels compiled for Hopper (sm_90a), without a GPU.

Triton ships ptxas, so a CPU machine can compile every kernel for the H100 / H200 and read what ptxas
reports: the figures TRITON.md section 6 and docs/results/kernels.md quote (registers decide how many
programs fit an SM). ``tests/ops/test_ksa_triton.py::test_compiles_for_hopper`` compiles through the same
``compile_for_sm90``.

How to run (repository root; ``TRITON_INTERPRET`` must be unset, the interpreter compiles nothing)::

    python pipelines/kernel_registers.py                 # default tiles, D = 64 (S = 1) and D = 128 (S = 1, 2)
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def compile_for_sm90(kernel, constexprs: dict, num_warps: int, num_stages: int, dtype: str = "bf16"):
    """``kernel`` compiled for sm_90 with the signature the JIT would build (and its 16-divisibility hints on
    pointers and strides): pointers ``*dtype`` except the int / fp32 tables and statistics, lower-case
    arguments int32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif name.islower() or name in ("W", "M", "T", "TS"):
            sig[name] = "i32"
        elif name in ("EV_OFF", "LENGTHS", "SUM_OFF", "ROWS", "CUM"):
            sig[name] = "*i64"
        elif "TABLE" in name or name == "COST":
            sig[name] = "*i32"
        elif name.startswith(("LSE", "DELTA", "DQA", "DQSA")):
            sig[name] = "*fp32"
        else:
            sig[name] = "*" + dtype
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if sig[name].startswith("*") or name.startswith("stride")}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps,
                                                                               num_stages=num_stages))


def ptxas_usage(compiled) -> dict:
    """Registers per thread and spill bytes as ptxas reports them for sm_90a, and shared memory (bytes)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        report = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    regs = re.findall(r"Used (\d+) registers", report)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {"registers": int(regs[-1]), "spill_bytes": sum(map(int, spills[-1])), "shared": compiled.metadata.shared}


def default_tile_kernels(head_dim: int, sums: int) -> list[tuple[str, object, dict, int, int]]:
    """(name, kernel, constexprs, warps, stages) of forward, dQ (and its atomic-mode form) and dK/dV at the
    default tiles of ``triton_op.default_config`` for bf16, k = 8, GQA off."""
    import torch

    from ksa_rec.ops.ksa.triton_bwd import ksa_bwd_dkdv_kernel, ksa_bwd_dq_kernel
    from ksa_rec.ops.ksa.triton_fwd import ksa_fwd_kernel
    from ksa_rec.ops.ksa.triton_op import default_config, sum_rows_per_block

    cfg = default_config(head_dim, torch.bfloat16)
    common = dict(GROUP=1, CHUNK=8, SUMS=sums, UNIT=8, HEAD_DIM=head_dim, HAS_SUM=sums > 0, DOT_PREC=None,
                  INTERPRET=False)
    dq = dict(H=8, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n,
              SUM_ROWS=sum_rows_per_block(cfg.dq_block_m, 8, sums), **common)
    return [
        ("forward", ksa_fwd_kernel, dict(H=8, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                         SUM_ROWS=sum_rows_per_block(cfg.block_m, 8, sums), **common),
         cfg.fwd_warps, cfg.fwd_stages),
        ("dQ", ksa_bwd_dq_kernel, dict(EVENT_DQ=True, **dq), cfg.dq_warps, cfg.dq_stages),
        ("dQ (atomic mode: summary rows only)", ksa_bwd_dq_kernel, dict(EVENT_DQ=False, **dq), cfg.dq_warps,
         cfg.dq_stages),
        ("dK/dV", ksa_bwd_dkdv_kernel, dict(HK=8, BLOCK_N=cfg.dkdv_block_n, BLOCK_M=cfg.dkdv_block_m, ATOMIC_DQ=False,
                                            **common), cfg.dkdv_warps, cfg.dkdv_stages),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["64:1", "128:1", "128:2"], metavar="D:S",
                        help="head dim and summary tokens per case")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_registers: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    print("| D | S | kernel | warps | stages | registers / thread | spill bytes | shared KB |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        head_dim, sums = map(int, case.split(":"))
        for name, kernel, constexprs, warps, stages in default_tile_kernels(head_dim, sums):
            use = ptxas_usage(compile_for_sm90(kernel, constexprs, warps, stages))
            print(f"| {head_dim} | {sums} | {name} | {warps} | {stages} | {use['registers']} | {use['spill_bytes']} | "
                  f"{use['shared'] / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
