"""CPU steps with the small ops fused in C (``csrc/cpu_decode.c``).

On a CPU a decode step of a small model (the embedded SmolLM2-135M: 30 layers of width 576)
is mostly dispatch: ~60 torch ops a layer for a few hundred floats each, against four
weight-only GEMMs that do the real work. For a Llama-family model whose linear layers run
torch's int4 or int8 CPU kernels (the default model kept in Q4; K-quant GGUF files) or the
Q8_0 block-scale kernel (quantization/kernels.CpuQ8Kernel, also in csrc/cpu_decode.c),
or are all plain float matmuls (float32 or bfloat16 checkpoints, ``quantization="none"``),
``decode`` runs each layer of a step as its four matmuls, each the op its module would call
(cpu_linear_ops.py), with three C calls between them (residual add + RMSNorm; bias + rotary +
K/V write + attention over the paged cache for decoding rows; SwiGLU), instead of the
module tree (Qwen3's per-head q / k RMSNorm goes into the attention call; an MoE layer of
Mixtral / Qwen2-MoE / Qwen3-MoE runs its attention so and its sparse block from the router's
and experts' ops, cpu_moe_step.py). The C calls read
and write what the matmuls take and give: bf16 between quantized ones, float32 (or bf16)
between float ones; the residual stream stays float32, the KV cache float32 or bf16. Prompt
chunks' attention runs the module path's own code on the rotated q the C call leaves behind. Every CPU step of such a model takes this path, prompt chunks and mixed
steps included, so a row's result does not depend on which other rows share its step (the C
sums round differently from torch's, so the two paths must not be mixed for one request).

The C file is compiled with the system C compiler on first use (well under a second) into
the modelport cache, keyed by the source and this CPU; where no compiler works, or the model
does not fit (another layer type, another kernel, float32 matmuls beside bf16 ones, an fp8
KV cache, a sliding window, LoRA),
``decode`` returns None and the module path runs as before. ``MODELPORT_CPU_KERNELS=0``
turns it off; so does ``MODELPORT_CPU_FAST_DECODE=0`` (cpu_fast.ENABLED), read at call time.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from modelport.layers import cpu_fast
from modelport.layers.attention import get_forward_context, request_attention
from modelport.layers.cpu_linear_ops import linear_op, ops_dtype, q8_matmul_f32
from modelport.quantization.kernels import CPU_INT8_MAX_M

logger = logging.getLogger(__name__)

ENABLED = os.environ.get("MODELPORT_CPU_KERNELS", "1") != "0"
_SRC = Path(__file__).with_name("csrc") / "cpu_decode.c"
_LIB_NAME = "libmodelport_cpu_decode.so"
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

# Threads for mp_decode_attention. It can split its work over pthreads of its own (rows and,
# within a row, context positions), but between torch's int4 GEMMs those threads share the
# cores with torch's OpenMP workers, which spin for a while after each GEMM: end to end on the
# 2-core box a split was slower than one thread for 1 stream x 1,800 tokens (22 vs 17 ms a
# step) and for 8 streams x 900 (57 vs 52 ms of layers a step), though 1.5x faster in the
# microbenchmark (bench/cpu_attention.py; bench/README.md, C1 decode attention).
ATTENTION_THREADS = 1

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_CACHE_DTYPES = (torch.float32, torch.bfloat16)
_SIGNATURES = {
    "mp_add_rmsnorm": (_I, _I, _P, _P, _P, _F, _P, _P),
    "mp_decode_attention": (_I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _P, _P, _I, _P,
                            _P, _P, _F, _P, _P, _P, _I),
    "mp_silu_mul": (_I, _I, _P, _P),
    # the same with the matmuls' dtype as a flag (1: float32, 0: bf16)
    "mp_add_rmsnorm_io": (_I, _I, _P, _P, _I, _P, _F, _P, _P),
    "mp_decode_attention_io": (_I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, _I, _P, _P, _I, _P,
                               _P, _P, _F, _P, _P, _P, _I, _I, _I, _P, _P, _F),
    "mp_silu_mul_io": (_I, _I, _P, _P, _I),
    "mp_moe_sum": (_I, _I, _P, _I, _P, _P),  # one token's MoE sum (cpu_moe_step.py)
    # GGUF Q8_0 matmul on the file's block scales (quantization/kernels.CpuQ8Kernel)
    "mp_q8_matmul": (_I, _I, _I, _P, _I, _P, _P, _P, _I, _I, _I),
    "mp_q8_expand_bf16": (_I, _I, _P, _P, _P, _I, _I),
    # the same with x quantized per block to int8 (int8 x int8 dot products), and that
    # quantization alone (tests); mp_q8_i8_isa (returns int, so not listed) names the path
    "mp_q8_matmul_i8": (_I, _I, _I, _P, _I, _P, _P, _P, _I, _I, _I),
    "mp_q8_quantize_x": (_I, _I, _P, _I, _P, _P),
    "mp_q8_i8_pack": (_I, _I, _P, _P),  # returns int (_RETURNS)
    "mp_q8_i8_isa": (),
    "mp_q8_uses_openmp": (),  # returns int: rows split over torch's OpenMP team
    "mp_q8_expand_bf16_packed": (_I, _I, _P, _P, _P, _I, _I),
}


# the functions that return a value (the others return nothing)
_RETURNS = {"mp_q8_i8_pack": ctypes.c_int, "mp_q8_i8_isa": ctypes.c_int,
            "mp_q8_uses_openmp": ctypes.c_int}


def _cpu_id() -> str:
    """This CPU's model and feature flags: a library built with -march=native is only
    reused on a CPU that has the same."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().split("\n\n", 1)[0]
        keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(keep) or platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc / gcc) on PATH")
    base = [cc, "-O3", "-fPIC", "-shared", "-fopenmp-simd", "-ffp-contract=off", "-pthread", "-o",
            str(out), str(_SRC), "-lm"]
    errors = []
    # -fopenmp: the Q8_0 matmuls split their rows over torch's OpenMP team (libgomp.so.1 is
    # torch's copy once torch is loaded) instead of a pool of their own, whose worker shared a
    # core with torch's spinning ones on a small box (csrc/cpu_decode.c, mp_q8_matmul); some
    # compilers / CPUs lack -march=native or OpenMP
    for extra in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
        r = subprocess.run(base[:1] + extra + base[1:], capture_output=True, text=True,
                           timeout=120)
        if r.returncode == 0:
            return
        errors.append(r.stderr.strip()[-400:])
    raise RuntimeError(f"{cc} failed: {errors[-1]}")


def load_library() -> ctypes.CDLL | None:
    """The compiled kernels (built and cached on first call), or None where they cannot
    be built here (logged once)."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        from modelport.loader.cache import default_cache_dir

        try:
            key = hashlib.sha256(_SRC.read_bytes() + _cpu_id().encode()).hexdigest()[:16]
            folder = default_cache_dir() / "cpu_kernels" / key
            path = folder / _LIB_NAME
            if not path.exists():
                from modelport.loader.cache import build_entry

                build_entry(folder, lambda tmp: _compile(tmp / _LIB_NAME))
            lib = ctypes.CDLL(str(path))
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = _RETURNS.get(name)
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means: use the module path
            logger.info("CPU decode kernels unavailable (%s); using the torch path", e)
            _lib = None
        return _lib


class _Layer:
    """One decoder layer's weights as the C path reads them (pointers taken once)."""

    def __init__(self, layer) -> None:
        from modelport.layers.cpu_moe_step import MoeFfn
        from modelport.layers.fused_moe import SparseMoeBlock

        attn, ffn = layer.self_attn, _ffn(layer)
        self.idx = attn.attn.layer_idx
        self.keep = []  # the tensors whose pointers are held below
        self.ln1, self.eps1 = self._f32(layer.input_layernorm.weight), layer.input_layernorm.eps
        self.ln2 = self._f32(layer.post_attention_layernorm.weight)
        self.eps2 = layer.post_attention_layernorm.eps
        # an MoE layer's SparseMoeBlock (cpu_moe_step.py): its ops in self.moe, not self.ops
        self.moe = MoeFfn.build(ffn) if isinstance(ffn, SparseMoeBlock) else None
        assert not isinstance(self.moe, str), self.moe  # _fits checked it
        lins = [attn.qkv_proj, attn.o_proj]
        if self.moe is None:
            lins += [ffn.gate_up_proj, ffn.down_proj]
        self.ops = [linear_op(lin, lin is attn.qkv_proj) for lin in lins]
        # (op, args) of each matmul: [0] for steps of up to CPU_INT8_MAX_M rows, [1] above
        pairs = [(op.small, op.large) for op in self.ops] + [None, None]
        self.qkv, self.o, self.gate_up, self.down = pairs[:4]
        bias = self.ops[0].c_bias
        self.keep.append(bias)
        self.bias = bias.data_ptr() if bias is not None else None
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3
        self.qn = self._f32(qn.weight) if qn is not None else None
        self.kn = self._f32(kn.weight) if kn is not None else None
        self.qk_eps = qn.eps if qn is not None else 0.0

    def float32_outputs(self) -> None:
        """In a bf16 plan: a Q8_0 o / down projection (any_dtype) writes float32, as its module
        does on the model's float32 activations; the C norm after it reads either dtype."""
        for i, name in ((1, "o"), (3, "down")):
            if i < len(self.ops) and self.ops[i].any_dtype:
                call = (q8_matmul_f32, self.ops[i].small[1])
                setattr(self, name, (call, call))

    def _f32(self, t: torch.Tensor) -> int:
        t = t.detach().float().contiguous()
        self.keep.append(t)
        return t.data_ptr()


def _fits(model) -> str | None:
    """Why this LlamaModel cannot take the C path (None: it can)."""
    from modelport.layers.activation import SiluAndMul
    from modelport.layers.attention import Attention
    from modelport.layers.cpu_moe_step import MoeFfn
    from modelport.layers.fused_moe import SparseMoeBlock
    from modelport.layers.layernorm import RMSNorm
    from modelport.layers.linear import Linear, MergedLinear, QKVLinear
    from modelport.layers.rotary import RotaryEmbedding
    from modelport.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP
    from modelport.models.moe import MoeDecoderLayer
    from modelport.models.qwen3 import Qwen3Attention, Qwen3DecoderLayer

    if _hooked(model.modules()):
        return "forward hooks on its modules (e.g. calibration statistics), which C would skip"
    if not model.layers or type(model.norm) is not RMSNorm:
        return "no layers / another final norm"
    rotary = model.layers[0].self_attn.rotary_emb
    if (type(rotary) is not RotaryEmbedding
            or rotary.cos_sin_cache.dtype not in (torch.float32, torch.bfloat16)):
        return "another rotary embedding"
    dtypes, inters = set(), set()
    for layer in model.layers:
        kinds = ((LlamaDecoderLayer, LlamaAttention), (Qwen3DecoderLayer, Qwen3Attention),
                 (MoeDecoderLayer, LlamaAttention), (MoeDecoderLayer, Qwen3Attention))
        ffn = _ffn(layer)
        if (type(layer), type(layer.self_attn)) not in kinds or not (
                (type(ffn) is LlamaMLP and type(ffn.act) is SiluAndMul)
                or (type(layer) is MoeDecoderLayer and type(ffn) is SparseMoeBlock)):
            return f"layer type {type(layer).__name__}"
        lins = [(layer.self_attn.qkv_proj, QKVLinear), (layer.self_attn.o_proj, Linear)]
        if type(ffn) is SparseMoeBlock:  # Mixtral / Qwen2-MoE / Qwen3-MoE (cpu_moe_step.py)
            moe = MoeFfn.build(ffn)
            if isinstance(moe, str):
                return moe
            dtypes.update(op.dtype for op in moe.ops if not op.any_dtype)  # as below
        else:
            lins += [(ffn.gate_up_proj, MergedLinear), (ffn.down_proj, Linear)]
        a = layer.self_attn
        if type(a) is Qwen3Attention:  # q / k RMSNorm per head before rotary, in the C call
            qn, kn = a.q_norm, a.k_norm
            if (type(qn) is not RMSNorm or type(kn) is not RMSNorm or qn.eps != kn.eps
                    or qn.weight.shape[0] != a.attn.head_dim
                    or kn.weight.shape[0] != a.attn.head_dim):
                return "q / k norms other than one RMSNorm of head_dim each (one eps)"
        if a.rotary_emb is not rotary or type(a.attn) is not Attention:
            return "another attention"
        if a.attn.backend_kwargs or a.attn.head_dim > 512 or a.attn.head_dim % 2:
            return "attention options (window / soft cap / head size)"
        if a.attn.num_heads % a.attn.num_kv_heads or a.attn.num_heads > 64 * a.attn.num_kv_heads:
            return "heads not a multiple of kv heads (at most 64 a group)"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not RMSNorm:
                return "another norm"
        for lin, cls in lins:
            if type(lin) is not cls:  # a LoRA / GEMV subclass swapped in
                return f"{type(lin).__name__} layer"
            op = linear_op(lin, lin is a.qkv_proj)
            if isinstance(op, str):
                return op
            if not op.any_dtype:  # a Q8_0 matmul takes either dtype
                dtypes.add(op.dtype)
        if type(ffn) is not SparseMoeBlock:  # read once the classes are known (TP wraps them)
            inters.add(ffn.down_proj.input_size)
    if len(dtypes) > 1:  # the C calls between two matmuls write one dtype
        return "float32 matmuls beside bf16 ones (int4 / int8 kernels or bf16 weights)"
    if len(inters) > 1:  # one SwiGLU buffer for the dense feed-forwards
        return "dense feed-forwards of more than one intermediate size"
    return None


def _ffn(layer):
    """A decoder layer's feed-forward module (Mixtral's is ``block_sparse_moe``)."""
    return getattr(layer, getattr(layer, "ffn_name", "mlp"), None)


def _hooked(modules) -> bool:
    """Whether any of these modules has forward hooks (the C path would not call them)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class DecodePlan:
    """The C path for one LlamaModel (built at its first CPU step)."""

    def __init__(self, model, lib: ctypes.CDLL) -> None:
        self.lib = lib
        # the hook tables of the modules whose forward C replaces (filled in place by
        # register_forward_hook): a hook added after this plan was built sends the step back
        # to the module path
        self.hook_tables = [d for layer in model.layers for m in layer.modules()
                            for d in (m._forward_hooks, m._forward_pre_hooks)]
        first = model.layers[0].self_attn
        self.nh, self.nkv = first.attn.num_heads, first.attn.num_kv_heads
        self.hd, self.scale = first.attn.head_dim, float(first.attn.scale)
        rotary = first.rotary_emb
        self.rot_dim = rotary.rotary_dim
        self.cos_sin = rotary.cos_sin_cache.float().contiguous()  # a bf16 model's: widened
        self.hidden = model.norm.weight.shape[0]
        self.layers = [_Layer(layer) for layer in model.layers]
        # the dense feed-forwards' one intermediate size (_fits); 0 where every layer is MoE
        self.inter = max((_ffn(layer).down_proj.input_size for layer in model.layers
                          if hasattr(_ffn(layer), "down_proj")), default=0)
        self.norm_w = model.norm.weight.detach().float().contiguous()
        self.norm_eps = model.norm.eps
        # every matmul's input and output (float32 where all of them take either: Q8_0)
        self.dtype = ops_dtype(op for L in self.layers
                               for op in L.ops + (L.moe.ops if L.moe else []))
        self.io_f32 = int(self.dtype == torch.float32)
        if not self.io_f32:  # Q8_0 o / down projections beside bf16 matmuls: float32 out
            for L in self.layers:
                L.float32_outputs()
        self.kinds = sorted({op.kind for L in self.layers
                             for op in L.ops + (L.moe.ops if L.moe else [])})
        self.moe = any(L.moe is not None for L in self.layers)

    def run(self, x: torch.Tensor, positions: torch.Tensor, ctx) -> torch.Tensor | None:
        meta = ctx.attn_metadata
        rows, h = x.shape
        caches = ctx.kv_caches
        if any(c.dtype not in _CACHE_DTYPES or not c.is_contiguous() for c in caches):
            return None
        lib, nh, nkv, hd, f32, dt = (self.lib, self.nh, self.nkv, self.hd, self.io_f32,
                                     self.dtype)
        big = int(rows > CPU_INT8_MAX_M)  # the int8 kernel's branch (CpuInt8Kernel.forward;
        # a Q8_0 op's two are the same call, which picks its own)
        qkv_n = (nh + 2 * nkv) * hd
        # per token row: its request, how many positions it sees, whether C attends for it
        # (the one new token of a decoding request) or the prompt-chunk loop below does
        qsl = meta.query_start_loc_cpu
        row_req = torch.empty(rows, dtype=torch.int32)
        attend = torch.zeros(rows, dtype=torch.uint8)
        chunks = []
        for i, n in enumerate(meta.seq_lens_cpu):
            s, e = qsl[i], qsl[i + 1]
            row_req[s:e] = i
            if e - s == 1:
                attend[s] = 1
            elif e > s:
                chunks.append((i, s, e, n))
        positions = positions.contiguous()
        row_len = (positions + 1).to(torch.int32)
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        tables = meta.block_tables.to(torch.int32).contiguous()
        resid = x.float().contiguous().clone()
        xb = torch.empty(rows, h, dtype=dt)
        attn = torch.empty(rows, nh * hd, dtype=dt)
        act = torch.empty(rows, self.inter, dtype=dt)
        threads = ATTENTION_THREADS
        work = torch.empty(attention_work_floats(rows, nh, nkv, hd, threads),
                           dtype=torch.float32)
        rows_of = torch.empty(rows, dtype=torch.int32)
        qf = work[: rows * qkv_n].view(rows, nh + 2 * nkv, hd)[:, :nh]  # rotated q (fp32)
        out = torch.empty(rows, h, dtype=torch.float32)
        rp, xbp, ap, actp, wp = (resid.data_ptr(), xb.data_ptr(), attn.data_ptr(),
                                 act.data_ptr(), work.data_ptr())
        cs, pp, sp, tp = (self.cos_sin.data_ptr(), positions.data_ptr(), slots.data_ptr(),
                          tables.data_ptr())
        rq, rl, at, ro = (row_req.data_ptr(), row_len.data_ptr(), attend.data_ptr(),
                          rows_of.data_ptr())

        width = tables.shape[1]
        norm, attend_fn, silu = (lib.mp_add_rmsnorm_io, lib.mp_decode_attention_io,
                                 lib.mp_silu_mul_io)
        xb16, xb32 = (None, xbp) if f32 else (xbp, None)
        # an MoE layer's router reads its input in float32, beside the bf16 copy for the experts
        xf = xb if f32 or not self.moe else torch.empty(rows, h, dtype=torch.float32)
        delta = None  # the last feed-forward's output (an MoE block's: float32)
        for L in self.layers:
            cache = caches[L.idx]
            _, nb, bs, _, _ = cache.shape
            norm(rows, h, rp, delta.data_ptr() if delta is not None else None,
                 int(delta is not None and delta.dtype == torch.float32), L.ln1, L.eps1, xb16,
                 xb32)
            fn, args = L.qkv[big]
            qkv = fn(xb, *args)
            attend_fn(rows, nh, nkv, hd, self.rot_dim, qkv.data_ptr(), L.bias, cs, pp,
                      cache.data_ptr(), nb, bs, sp, tp, width, rq, rl, at, self.scale, ap, wp,
                      ro, threads, f32, int(cache.dtype == torch.bfloat16), L.qn, L.kn,
                      L.qk_eps)
            for i, s, e, n in chunks:  # prompt chunks: the module path's attention
                attn[s:e] = request_attention(qf[s:e], cache, tables[i], n,
                                              self.scale).reshape(e - s, -1)
            fn, args = L.o[big]
            o = fn(attn, *args)
            o_f32 = int(o.dtype == torch.float32)  # a Q8_0 o in a bf16 step: float32
            if L.moe is not None:
                norm(rows, h, rp, o.data_ptr(), o_f32, L.ln2, L.eps2, xb16, xf.data_ptr())
                delta = L.moe(lib, xf, xb)
                continue
            norm(rows, h, rp, o.data_ptr(), o_f32, L.ln2, L.eps2, xb16, xb32)
            fn, args = L.gate_up[big]
            gu = fn(xb, *args)
            silu(rows, self.inter, gu.data_ptr(), actp, f32)
            fn, args = L.down[big]
            delta = fn(act, *args)
        norm(rows, h, rp, delta.data_ptr(), int(delta.dtype == torch.float32),
             self.norm_w.data_ptr(), self.norm_eps, None, out.data_ptr())
        return out if x.dtype == torch.float32 else out.to(x.dtype)


def attention_work_floats(rows: int, nh: int, nkv: int, hd: int, threads: int) -> int:
    """Length of mp_decode_attention's float32 `work` buffer: each row's q | k | v, then one
    partial-softmax slot (group maxima, sums and weighted V rows) per (row, KV head) and one
    more per thread beyond the first (a thread's range of positions may start mid-item)."""
    threads = max(1, min(threads, 16))
    slot = -(-(nh // nkv) * (hd + 2) // 16) * 16  # whole cache lines
    return rows * (nh + 2 * nkv) * hd + (rows * nkv + threads) * slot


def decode(model, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """The final normed hidden states of a CPU step through the C path, or None (the caller
    runs its modules) where that path does not apply."""
    if not (ENABLED and cpu_fast.ENABLED) or x.is_cuda or x.dim() != 2:
        return None
    ctx = get_forward_context()
    meta = ctx.attn_metadata
    if meta is None or ctx.piecewise:
        return None
    plan = model.__dict__.get("_cpu_decode_plan")
    if plan is None:
        lib = load_library()
        why = "the C kernels could not be built" if lib is None else _fits(model)
        if why is None and any(c.dtype not in _CACHE_DTYPES for c in ctx.kv_caches):
            why = "a KV cache neither float32 nor bfloat16 (fp8)"
        plan = DecodePlan(model, lib) if why is None else False
        if why is not None:
            logger.debug("CPU decode kernels not used: %s", why)
        else:
            logger.info("CPU steps: %d layers (%s matmuls) with their small ops fused in C "
                        "(MODELPORT_CPU_KERNELS=0 turns this off)", len(plan.layers),
                        "/".join(plan.kinds))
        model.__dict__["_cpu_decode_plan"] = plan
    if plan is False or any(plan.hook_tables):
        return None
    return plan.run(x, positions, ctx)
