"""How the CPU int8 kernel's per-row scale is chosen, and what it costs in perplexity.

`CpuInt8Kernel` (quantization/kernels.py) requantizes a dequantized weight (GGUF Q8_0 / Q5 /
Q6, GPTQ W8, NF4, FP8) to one int8 scale a row: s = max|w| / 127, codes rounded with the fp32
s, and s stored in bf16 for `_weight_int8pack_mm`. This loads a GGUF file kept quantized
with another choice of scale and scores it:

    .venv/bin/python bench/gguf_requant.py --type Q8_0 --out /tmp/smollm2-q8_0.gguf
    .venv/bin/python bench/int8_requant_scales.py shipped|bf16|mse|exact \\
        --model /tmp/smollm2-q8_0.gguf tests/data/quant_eval.txt [more texts]

shipped: as the kernel does; bf16: the scale rounded up to a bf16 first and the codes
rounded with that scale (the matmul then multiplies by the scale the codes were made for);
mse: per row, the bf16 scale of clip ratio 1.0, 0.98 ... 0.5 of max|w| with the smallest
squared error; exact: the file dequantized to fp32 (`quantization="none"`); blocks: Q8_0 on
its block-scale kernel (CpuQ8Kernel, session 31, opt-in: MODELPORT_Q8_CPU=blocks). With
--chunk 16 every prompt chunk is at most 16 rows, so the small-batch kernels score the text
(the C kernel for blocks; torch's int8 GEMM for the row scales); without it, 512-token
windows run the large-batch branch (the weight expanded to bf16; MODELPORT_Q8_LARGE=f32
expands blocks' weight to float32 instead).
Prints the mean relative weight error over the kept layers and one perplexity a text.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def bf16_at_least(s: torch.Tensor) -> torch.Tensor:
    b = s.to(torch.bfloat16)
    bits = b.view(torch.int16)
    bits[b.float() < s] += 1  # one bf16 step up where rounding went below s (s > 0)
    return b


def row_scales(w: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as float, bf16 scale per row)."""
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    if how == "shipped":
        s = amax / 127
        return torch.round(w / s[:, None]).clamp(-127, 127), s.to(torch.bfloat16)
    ratios = [1.0] if how == "bf16" else torch.linspace(1.0, 0.5, 26).tolist()
    best = None
    for r in ratios:
        s = bf16_at_least(amax * r / 127)
        q = torch.round(w / s.float()[:, None]).clamp(-127, 127)
        err = ((q * s.float()[:, None] - w) ** 2).sum(1)
        if best is None:
            best = [err, q, s]
            continue
        m = err < best[0]
        best[0] = torch.where(m, err, best[0])
        best[1][m], best[2][m] = q[m], s[m]
    return best[1], best[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("how", choices=["shipped", "bf16", "mse", "exact", "blocks"])
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--model", required=True)
    ap.add_argument("--chunk", type=int, default=None,
                    help="max_num_batched_tokens: prompt chunks of at most this many tokens "
                         "(16: every Q8_0 matmul on the small-batch kernels)")
    args = ap.parse_args()
    import os

    # Q8_0 on its block-scale kernel (CpuQ8Kernel, opt-in) or the row one
    os.environ["MODELPORT_Q8_CPU"] = "blocks" if args.how == "blocks" else "rows"
    from modelport.quantization import kernels

    errors: list[float] = []

    class Scaled(kernels.CpuInt8Kernel):
        def __init__(self, w: torch.Tensor) -> None:
            torch.nn.Module.__init__(self)
            w = w.float()
            q, s = row_scales(w, args.how)
            errors.append(((q * s.float()[:, None] - w).norm() / w.norm()).item())
            self.register_buffer("qweight", q.to(torch.int8).contiguous())
            self.register_buffer("scale", s)
            self.out_features = w.shape[0]

    kernels.CpuInt8Kernel = Scaled
    from modelport import LLM
    from modelport.quantization.tools.perplexity import perplexity

    extra = {"max_num_batched_tokens": args.chunk} if args.chunk else {}
    llm = LLM(model=args.model, quantization="none" if args.how == "exact" else "gguf",
              max_model_len=2048, **extra)
    if errors:
        print(f"{args.how}: mean relative weight error {statistics.mean(errors):.5f} over "
              f"{len(errors)} layers")
    for f in args.texts:
        t0 = time.perf_counter()
        r = perplexity(llm, open(f).read(), 512)
        print(f"{args.how} {f}: perplexity {r.perplexity:.4f} over {r.tokens} tokens "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
