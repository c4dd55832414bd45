"""Registers, spills and shared memory of our Triton kernels per launch config, compiled
offline for sm_90 (no GPU needed: Triton's bundled ptxas and cuobjdump).

    pip install --target /tmp/tsite triton==3.6.0      # once (`make test` puts it in .venv)
    PYTHONPATH=/tmp/tsite:src python bench/gpu/kernel_regs.py decode [--kind 16bit fp8] [--config NAME ...]
    PYTHONPATH=/tmp/tsite:src python bench/gpu/kernel_regs.py w4     # W4 GEMV configs, W4/W8 GEMM, half2 GEMV vs shipped (per word)
    PYTHONPATH=/tmp/tsite:src python bench/gpu/kernel_regs.py nf4    # NF4 GEMVs (bytes, words), GEMM

One JSON line a config: registers and stack (spill) bytes a thread, shared bytes a program,
SASS instructions, and the programs an H100/H200 SM holds by registers (65,536 an SM,
allocated per warp in 256s), shared memory (228 KiB, 1 KiB reserved a program) and warps
(64). Integer arguments are compiled as divisible by 16, as the JIT specializes them for the
engine's shapes (Llama-3.1-8B: 8 KV heads, head 128, GQA 4; K = 4,096 and 14,336).

decode: the 16-bit kind is compiled with the rotary + KV write inside (``rope``: what the
engine runs for decode-only steps, triton_attention.rope_fits) and without; fp8 caches never
take the rotary path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

SM_REGS, SM_SHARED, SM_WARPS, SM_BLOCKS = 65536, 228 * 1024, 64, 32


def code_instructions(cubin: bytes) -> int:
    """The SASS instructions in a cubin's code sections (.text.*), 16 bytes each on sm_90: the
    count of ``cuobjdump -sass`` without its disassembly (a third of a second a kernel)."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    # ELF64 section headers: name, type, flags, addr, offset, size
    secs = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    strtab = secs[names][4]

    def name(off: int) -> bytes:
        return cubin[strtab + off:cubin.index(b"\0", strtab + off)]

    return sum(size for n, _, _, _, _, size in secs if name(n).startswith(b".text.")) // 16


def compile_sm90(fn, sig: dict[str, str], const: dict, divisible: tuple[str, ...],  # noqa: ANN001
                 num_warps: int, num_stages: int, maxnreg: int | None = None,
                 loops: bool = True) -> dict:
    """Compile fn for sm_90 and read its resource use. ``loops=False``: no disassembly (no
    loop_instr, None; sass_instr from the code's size, what the disassembly counts)."""
    sig = {**sig, **dict.fromkeys(const, "constexpr")}
    idx = fn.arg_names.index
    attrs = {(idx(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs={(idx(k),): v for k, v in const.items()},
                    attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout if loops else ""
    m = re.search(r"REG:(\d+) STACK:(\d+)", res)
    assert m is not None, res
    regs, stack = int(m.group(1)), int(m.group(2))
    by_regs = SM_REGS // (-(-regs * 32 // 256) * 256 * num_warps)
    by_shared = SM_SHARED // (k.metadata.shared + 1024)
    addrs = [int(m.group(1), 16) for line in sass.splitlines()
             if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", line))]
    instr = code_instructions(k.asm["cubin"])
    assert not loops or len(addrs) == instr, (len(addrs), instr)  # the two counts agree
    # the longest loop: a branch back to a lower address (not to itself: the end's trap)
    loop = 0 if loops else None
    for line in sass.splitlines():
        bm = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\S*\s+(?:`\()?0x([0-9a-f]+)", line)
        if bm and int(bm.group(2), 16) < int(bm.group(1), 16):
            lo, hi = int(bm.group(2), 16), int(bm.group(1), 16)
            loop = max(loop, sum(lo <= x <= hi for x in addrs))
    return {"regs": regs, "stack": stack, "shared": k.metadata.shared, "sass_instr": instr,
            "loop_instr": loop,
            "warps": num_warps, "maxnreg": maxnreg,
            "programs_per_sm": min(by_regs, by_shared, SM_WARPS // num_warps, SM_BLOCKS),
            "bound": "regs" if by_regs <= by_shared else "shared"}


_DECODE_PTRS = dict(q_ptr="*bf16", out_ptr="*bf16", part_o_ptr="*fp32", part_lse_ptr="*fp32",
                    cnt_ptr="*i32", block_tables_ptr="*i32", seq_lens_ptr="*i32",
                    qsl_ptr="*i32", order_ptr="*i32", k_new_ptr="*bf16", v_new_ptr="*bf16",
                    pos_ptr="*i64", cos_sin_ptr="*bf16", slot_ptr="*i64")
_DECODE_INTS = ("stride_kt", "stride_vt", "stride_cs", "stride_qt", "stride_qh", "stride_ot",
                "stride_oh", "stride_bt", "half_stride", "stride_blk", "stride_slot")


def compile_decode(cfg, kind: str, rope: bool) -> dict:  # noqa: ANN001 - a DecodeConfig
    """The decode attention kernel for one config, cache kind ("16bit" / "fp8") and rotary."""
    from modelport.layers import triton_attention as ta

    sig = {**_DECODE_PTRS, "cache_ptr": "*fp8e4nv" if kind == "fp8" else "*bf16",
           **{a: "i64" if a == "half_stride" else "i32" for a in _DECODE_INTS},
           "sm_scale_log2": "fp32"}
    const = dict(NUM_SPLITS=1, S_PAD=2, G=4, G_PAD=16, D=128, PAGE=16, BLOCK_N=cfg.block_n,
                 K_CVT=cfg.k_cvt, V_CVT=cfg.v_cvt, PDL=True, ORDERED=True, ROPE=rope)
    r = compile_sm90(ta._decode_kernel, sig, const, (*_DECODE_PTRS, "cache_ptr", *_DECODE_INTS),
                     cfg.num_warps, cfg.num_stages, cfg.maxnreg or None)
    return {"kernel": "decode", "kind": kind, "rope": rope, "config": cfg.name, **r}


def compile_w4_gemv(c, k: int) -> dict:  # noqa: ANN001 - a triton.Config of gemv_configs
    """The W4 GEMV at one row of x, K = k, groups of 128, for one autotune config."""
    from modelport.quantization import triton_kernels as tk

    sig = dict(x_ptr="*bf16", w_ptr="*i32", sz_ptr="*i32", y_ptr="*bf16", ws_ptr="*fp32",
               cnt_ptr="*i32", N="i32", stride_xm="i32", stride_ym="i32", mag_a="i32",
               mag_b="i32")
    cfg = {n: c.kwargs[n] for n in ("BLOCK_N", "BLOCK_W", "PREFETCH", "SPLIT")}
    const = dict(K=k, GROUP=128, BITS=4, V=4, BLOCK_M=1, EVEN_N=True, PDL=True, **cfg)
    r = compile_sm90(tk.gemv_kernel, sig, const, tuple(list(sig)[:9]), c.num_warps, 1, c.maxnreg)
    return {"kernel": "w4_gemv", "K": k, **cfg, **r}


def compile_w4_gemv_half2(block_n: int, num_warps: int, k: int, asm: bool = True) -> dict:
    """The half2 W4 GEMV (triton_w4_half2, the one-row default), one row, K = k,
    groups of 128, BLOCK_W = 128 * num_warps."""
    from modelport.quantization import triton_w4_half2 as th

    sig = dict(x_ptr="*bf16", w_ptr="*i32", sz_ptr="*i32", y_ptr="*bf16", N="i32")
    const = dict(K=k, GROUP=128, BLOCK_N=block_n, BLOCK_W=128 * num_warps, EVEN_N=True,
                 ASM=asm, PDL=True)
    r = compile_sm90(th.gemv_half2_kernel, sig, const, tuple(sig), num_warps, 1)
    return {"kernel": "w4_gemv_half2", "K": k, "BLOCK_N": block_n, "BLOCK_W": 128 * num_warps,
            "ASM": asm, **r}


def per_word(r: dict) -> dict:
    """SASS instructions per packed word a thread handles. ``instr_per_word``: the whole
    kernel's static count over the words one K step gives a thread (min(BLOCK_W, K / 8) *
    BLOCK_N / threads); at K = 4,096 and BLOCK_W = 512 the K loop runs once, so this is one
    step plus the prologue and the final reduction and store (what a program of the
    K = 4,096 shapes executes). ``loop_per_word``: the K loop's body alone over the words of
    a step (0 where no loop was compiled), the steady state of long K."""
    threads = 32 * r["warps"]
    step = r["BLOCK_W"] * r["BLOCK_N"] / threads
    once = min(r["BLOCK_W"], r["K"] // 8) * r["BLOCK_N"] / threads
    return {"instr_per_word": round(r["sass_instr"] / once, 2),
            "loop_per_word": round(r["loop_instr"] / step, 2)}


def compile_w_gemm(bits: int, group: int, block_k: int) -> dict:
    """The W4/W8 GEMM (5-255 rows) with a 64 x 128 tile, one K step of block_k columns."""
    from modelport.quantization import triton_kernels as tk

    sig = dict(x_ptr="*bf16", w_ptr="*i32", sz_ptr="*i32", y_ptr="*fp32", M="i32", N="i32",
               K="i32", M_BUCKET="i32", stride_xm="i32", stride_wn="i32", stride_sn="i32",
               stride_ym="i32", mag="i32")
    const = dict(GROUP=group, BITS=bits, V=4, BLOCK_K=block_k, BLOCK_M=64, BLOCK_N=128,
                 SPLIT_K=1)
    div = ("x_ptr", "w_ptr", "sz_ptr", "y_ptr", "N", "K", "stride_xm", "stride_wn",
           "stride_sn", "stride_ym")
    r = compile_sm90(tk.gemm.fn, sig, const, div, 8, 3)
    return {"kernel": "w_gemm", "bits": bits, "group": group, "BLOCK_K": block_k, **r}


def nf4_rows() -> list[dict]:
    """The NF4 GEMVs (bytes, words) at one row and the GEMM (64 rows, K split 1 and 4), for
    bitsandbytes' blocks of 64 at K = 4,096 and 14,336."""
    from modelport.quantization import triton_nf4 as tn
    from modelport.quantization import triton_nf4_kernels as nk

    sig = dict(xw_ptr="*i32", w_ptr="*u8", am_ptr="*fp32", t_ptr="*fp32", y_ptr="*bf16",
               N="i32", stride_xm="i32", stride_ym="i32")
    qb, rows = 64, []
    for k in (4096, 14336):
        nb = tn._blocks_per_step(k // qb, qb)
        r = compile_sm90(nk.gemv, sig, dict(K=k, QB=qb, NB=nb, M=1, MP=2,
                                            BLOCK_N=tn.GEMV_BLOCK_N), tuple(sig), 4, 3)
        rows.append({"kernel": "nf4_gemv_bytes", "K": k, "NB": nb, "BLOCK_N": tn.GEMV_BLOCK_N,
                     "step_bytes": tn.GEMV_BLOCK_N * nb * qb // 2, **r})
        nb = tn._blocks_per_step(k // qb, qb, tn.WORDS_BLOCK_N, tn.WORDS_STEP_BYTES)
        r = compile_sm90(nk.gemv_words, {**sig, "w_ptr": "*i32"},
                         dict(K=k, QB=qb, NB=nb, M=1, BLOCK_N=tn.WORDS_BLOCK_N), tuple(sig), 4, 3)
        rows.append({"kernel": "nf4_gemv_words", "K": k, "NB": nb, "BLOCK_N": tn.WORDS_BLOCK_N,
                     "step_bytes": tn.WORDS_BLOCK_N * nb * qb // 2, **r})
        gsig = dict(x_ptr="*bf16", w_ptr="*u8", am_ptr="*fp32", t_ptr="*fp32", y_ptr="*fp32",
                    M="i32", N="i32", stride_xm="i32", stride_ym="i32")
        for split in (1, 4):
            r = compile_sm90(nk.gemm, gsig, dict(K=k, QB=qb, BLOCK_M=64, BLOCK_N=tn.GEMM_BLOCK_N,
                                                 SPLIT_K=split), tuple(gsig), 4, 3)
            rows.append({"kernel": "nf4_gemm", "K": k, "SPLIT_K": split, **r})
    return rows


def decode(args: argparse.Namespace) -> None:
    from modelport.layers import triton_attention as ta

    for kind in args.kind:
        if args.config:
            cfgs = [ta.DecodeConfig.parse(n) for n in args.config]
        else:
            shipped = [c for _, c in ta.DECODE_CONFIGS[kind]]
            cfgs = list(dict.fromkeys((*shipped, *ta.DECODE_CANDIDATES[kind])))
        for cfg in cfgs:
            for rope in ((False, True) if kind == "16bit" else (False,)):
                print(json.dumps(compile_decode(cfg, kind, rope)), flush=True)


def w4(args: argparse.Namespace) -> None:
    from modelport.quantization import triton_kernels as tk

    for k in (4096, 14336):
        for c in tk.gemv_configs:
            if tk.gemv_fits(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"], c.num_warps,
                            c.kwargs["SPLIT"], 1, k, 4):
                print(json.dumps(compile_w4_gemv(c, k)), flush=True)
    for bits in (4, 8):
        for block_k in (32, 128):
            print(json.dumps(compile_w_gemm(bits, 32, block_k)), flush=True)
    # shipped vs half2 at the same tile (16 columns, 4 warps): instructions per packed word
    from modelport.quantization import triton_w4_half2 as th

    base = next(c for c in tk.gemv_configs if c.kwargs["BLOCK_N"] == 16 and c.num_warps == 4
                and not c.kwargs["PREFETCH"] and not c.maxnreg)
    for k in (4096, 14336):
        r = compile_w4_gemv(base, k)
        print(json.dumps({**r, **per_word({**r, **base.kwargs})}), flush=True)
        for c in th.half2_configs:
            r = compile_w4_gemv_half2(c.kwargs["BLOCK_N"], c.num_warps, k)
            print(json.dumps({**r, **per_word(r)}), flush=True)


def nf4(args: argparse.Namespace) -> None:
    for row in nf4_rows():
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--kind", nargs="+", default=["16bit", "fp8"], choices=["16bit", "fp8"])
    d.add_argument("--config", nargs="*", help="config names (default: shipped + candidates)")
    sub.add_parser("w4")
    sub.add_parser("nf4")
    args = ap.parse_args()
    {"decode": decode, "w4": w4, "nf4": nf4}[args.what](args)


if __name__ == "__main__":
    main()
