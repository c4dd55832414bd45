"""`modelport eval perplexity --model PATH --text FILE`: compare a quantized model to its original."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model (perplexity on a text)")
    sub = p.add_subparsers(dest="eval_command", metavar="EVAL")
    pp = sub.add_parser("perplexity", help="perplexity on a text file, through the engine")
    pp.add_argument("--model", default=None, help="HF folder, .gguf file (default: embedded model)")
    pp.add_argument("--text", required=True, type=Path, help="UTF-8 text file to score")
    pp.add_argument("--quantization", "-q", default=None,
                    help="e.g. gguf (keep GGUF blocks quantized) or fp8 (online); "
                         "AWQ/GPTQ/FP8 checkpoints are detected")
    pp.add_argument("--max-length", type=int, default=512, help="tokens per scored window")
    pp.add_argument("--dtype", default="auto")
    pp.add_argument("--device", default="auto")
    pp.add_argument("--json", action="store_true", help="print the result as JSON")
    pp.set_defaults(func=_perplexity)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _perplexity(args: argparse.Namespace) -> int:
    from modelport import LLM
    from modelport.quantization.tools.perplexity import perplexity

    try:
        text = args.text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print(f"error: cannot read {args.text}: {e}", file=sys.stderr)
        return 2
    try:
        llm = LLM(model=args.model, quantization=args.quantization, dtype=args.dtype,
                  device=args.device, max_model_len=None)
        res = perplexity(llm, text, args.max_length)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"perplexity": res.perplexity, "nll": res.nll, "tokens": res.tokens,
                          "windows": res.windows}))
    else:
        print(f"perplexity {res.perplexity:.4f} (mean NLL {res.nll:.4f} nats over {res.tokens} "
              f"tokens, {res.windows} windows)")
    return 0
