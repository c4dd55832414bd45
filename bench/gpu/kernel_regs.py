"""Registers, spills and shared memory of the decode attention kernel per launch config,
compiled offline for sm_90 (no GPU needed: Triton's bundled ptxas and cuobjdump).

    pip install --target /tmp/tsite triton==3.6.0      # once, on a CPU machine
    PYTHONPATH=/tmp/tsite:src python bench/gpu/decode_regs.py [--kind 16bit fp8] [--config NAME ...]

One JSON line a config: regs and stack (spill) bytes a thread, shared bytes a program, and
the programs an H100/H200 SM holds by registers (65,536 a SM), shared memory (228 KiB) and
warps (64). The 16-bit kind is compiled both with the rotary + KV write inside (``rope``:
what the engine runs for decode-only steps, triton_attention.rope_fits) and without; fp8
caches never take the rotary path. Integer arguments are compiled as divisible by 16, as
the JIT specializes them for the engine's shapes (Llama-3.1-8B: 8 KV heads, head 128, GQA 4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from modelport.layers import triton_attention as ta

_PTRS = dict(q_ptr="*bf16", out_ptr="*bf16", part_o_ptr="*fp32", part_lse_ptr="*fp32",
             cnt_ptr="*i32", block_tables_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
             order_ptr="*i32", k_new_ptr="*bf16", v_new_ptr="*bf16", pos_ptr="*i64",
             cos_sin_ptr="*bf16", slot_ptr="*i64")
_INTS = ("stride_kt", "stride_vt", "stride_cs", "stride_qt", "stride_qh", "stride_ot",
         "stride_oh", "stride_bt", "half_stride", "stride_blk", "stride_slot")
SM_REGS, SM_SHARED, SM_WARPS = 65536, 228 * 1024, 64


def compile_decode(cfg: ta.DecodeConfig, kind: str, rope: bool) -> dict:
    fn = ta._decode_kernel
    sig = {**_PTRS, "cache_ptr": "*fp8e4nv" if kind == "fp8" else "*bf16",
           **{a: "i64" if a == "half_stride" else "i32" for a in _INTS}, "sm_scale_log2": "fp32"}
    const = dict(NUM_SPLITS=1, S_PAD=2, G=4, G_PAD=16, D=128, PAGE=16, BLOCK_N=cfg.block_n,
                 K_CVT=cfg.k_cvt, V_CVT=cfg.v_cvt, PDL=True, ORDERED=True, ROPE=rope)
    sig.update(dict.fromkeys(const, "constexpr"))
    idx = fn.arg_names.index
    attrs = {(idx(a),): [["tt.divisibility", 16]] for a in (*_PTRS, "cache_ptr", *_INTS)}
    src = ASTSource(fn=fn, signature=sig, constexprs={(idx(k),): v for k, v in const.items()},
                    attrs=attrs)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        opts["maxnreg"] = cfg.maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    assert m is not None, res
    regs, stack = int(m.group(1)), int(m.group(2))
    threads = 32 * cfg.num_warps
    by_regs = SM_REGS // (-(-regs * 32 // 256) * 256 * cfg.num_warps)  # per-warp granule
    by_shared = SM_SHARED // (k.metadata.shared + 1024)  # + the 1 KiB a block reserves
    return {"kind": kind, "rope": rope, "config": cfg.name, "regs": regs, "stack": stack,
            "shared": k.metadata.shared, "threads": threads,
            "programs_per_sm": min(by_regs, by_shared, SM_WARPS // cfg.num_warps),
            "bound": "regs" if by_regs <= by_shared else "shared"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", nargs="+", default=["16bit", "fp8"], choices=["16bit", "fp8"])
    ap.add_argument("--config", nargs="*", help="config names (default: shipped + candidates)")
    args = ap.parse_args()
    for kind in args.kind:
        if args.config:
            cfgs = [ta.DecodeConfig.parse(n) for n in args.config]
        else:
            shipped = [c for _, c in ta.DECODE_CONFIGS[kind]]
            cfgs = list(dict.fromkeys((*shipped, *ta.DECODE_CANDIDATES[kind])))
        for cfg in cfgs:
            for rope in ((False, True) if kind == "16bit" else (False,)):
                print(json.dumps(compile_decode(cfg, kind, rope)), flush=True)


if __name__ == "__main__":
    main()
