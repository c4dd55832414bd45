"""Decode tokens/s of one model in each weight format, at batch 1 and batch 64 (issue 8's
table: format, size, decode tok/s at batch 1 and 64).

One engine per format, built from the same config (``--load-format dummy``: random weights
packed in that format, the way a checkpoint stores them); per batch size, warm-up iterations
then timed ones of ``--input-len`` random prompt tokens and ``--output-len`` greedy tokens
(``modelport.bench.latency``'s loop). Decode tok/s = batch / inter-token latency. Prints one
JSON line per (format, batch):

    PYTHONPATH=src python3 bench/quant_decode.py --model-config bench/configs/llama-3.1-8b.json \
        --formats none awq gptq fp8 bitsandbytes gguf-q4_k gguf-q8_0 --batch-sizes 1 64 \
        --output-json out.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from modelport.bench import _harness as h
from modelport.bench import latency


def weight_bytes(core: Any) -> int:
    """Bytes of the model's parameters and buffers as loaded (packed formats as packed)."""
    model = core.runner.model
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
    return sum(seen.values())


def measure(args: argparse.Namespace, path: str, vocab: int, fmt: str) -> list[dict[str, Any]]:
    run_args = argparse.Namespace(**vars(args))
    run_args.quantization = None if fmt == "none" else fmt
    if fmt.startswith("gguf-"):  # gguf-q4_k, gguf-q8_0, gguf-q4_0: every linear in that type
        run_args.quantization = "gguf"
        os.environ["MODELPORT_DUMMY_GGUF_TYPE"] = fmt[5:].upper()
    core = h.build_engine(run_args, path)
    size = weight_bytes(core)
    rows = []
    for bs in args.batch_sizes:
        run_args.batch_size = bs
        itls, ttfts = [], []
        for it in range(args.num_iters_warmup + args.num_iters):
            t0, stamps, _ = latency._one_iteration(core, run_args, vocab, args.seed + it,
                                                   h.resolved_device(args))
            if it >= args.num_iters_warmup and len(stamps) > 1:
                ttfts.append(stamps[0] - t0)
                itls.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
        itl = statistics.median(itls)
        rows.append({
            "format": fmt, "batch": bs, "weights_mb": round(size / 1e6, 2),
            "itl_ms": round(itl * 1e3, 3), "decode_tok_s": round(bs / itl, 1),
            "ttft_ms": round(statistics.median(ttfts) * 1e3, 2),
            "itl_ms_all": [round(x * 1e3, 3) for x in itls],
        })
    del core
    h.free_cuda()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    latency.add_args(p)
    p.add_argument("--formats", nargs="+",
                   default=["none", "awq", "gptq", "fp8", "bitsandbytes", "gguf-q4_k", "gguf-q8_0"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.set_defaults(load_format="dummy", input_len=512, num_iters=3, num_iters_warmup=1)
    args = p.parse_args(argv)
    from modelport.loader import load_model_config, resolve_model

    path = h.model_path(args)
    vocab = load_model_config(resolve_model(path)).vocab_size
    env = h.environment(h.resolved_device(args))
    for fmt in args.formats:
        for row in measure(args, path, vocab, fmt):
            line = json.dumps({"bench": "quant_decode", "env": env, "model": args.model_config or args.model,
                               "workload": {"input_len": args.input_len, "output_len": args.output_len},
                               **row, "command": " ".join(sys.argv)})
            print(line, flush=True)
            if args.output_json:
                with Path(args.output_json).open("a") as f:
                    f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
