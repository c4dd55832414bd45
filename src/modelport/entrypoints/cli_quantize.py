"""`modelport quantize --method awq|gptq|fp8 --model PATH --output PATH --calib FILE ...`."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quantize", help="write an AWQ / GPTQ / FP8 checkpoint from a float HF folder",
        description="Quantize a float HF checkpoint into the public AWQ (AutoAWQ GEMM), GPTQ "
                    "(AutoGPTQ) or FP8 (compressed-tensors, FP8_DYNAMIC) layout; per-layer "
                    "errors are printed and saved.")
    p.add_argument("--method", required=True, choices=["awq", "gptq", "fp8"])
    p.add_argument("--model", required=True, help="float HF folder (config.json + safetensors)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--calib", type=Path, default=None,
                   help="calibration text: .txt, .jsonl with a \"text\" field a line, or .json (an "
                        "array of strings or {\"text\": ...} objects) (fp8 needs "
                        "none; given, it only measures each layer's error)")
    p.add_argument("--calib-from-model", action="store_true",
                   help="AWQ / GPTQ without a calibration file: the model writes --num-samples "
                        "texts of up to --seq-len tokens itself (saved in the output as "
                        "calibration_from_model.jsonl); better than unrelated text, not as good "
                        "as a sample of your traffic")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--bits", type=int, default=None,
                   help="AWQ: 4; GPTQ: 4 (default) or 8; FP8 is 8-bit")
    p.add_argument("--group-size", type=int, default=None,
                   help="AWQ / GPTQ, default 128; GPTQ also -1: one group per output channel")
    p.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: quantize layer by layer, each linear fitted to its inputs in the "
                        "model quantized so far (default; true_sequential in the config). "
                        "--no-sequential: every layer's inputs from one pass of the float model "
                        "(one forward instead of about three, but all Hessians held at once)")
    p.add_argument("--damp-percent", type=float, default=None,
                   help="GPTQ: Hessian dampening as a fraction of its mean diagonal (default "
                        "0.01, AutoGPTQ's damp_percent); larger leans less on the calibration "
                        "inputs' correlations")
    p.add_argument("--hessian-row-clip", type=float, default=None,
                   help="GPTQ: in the Hessian, a token whose layer input is longer than this "
                        "many times its window's median (massive activations, e.g. the first "
                        "token) counts at that length (default 5; 0: off, as AutoGPTQ)")
    p.add_argument("--zero-point", action=argparse.BooleanOptionalAction, default=None,
                   help="asymmetric quantization with zero points (default: on for AWQ, off "
                        "(symmetric) for GPTQ)")
    p.add_argument("--reference-text", type=Path, default=None,
                   help="a sample of the text the model will serve: warns when the "
                        "calibration text looks unrelated to it, and scores every layer on its "
                        "inputs beside plain round-to-nearest (AWQ / GPTQ)")
    p.add_argument("--min-expert-tokens", type=int, default=None,
                   help="MoE: an expert routed fewer calibration tokens than this (default 32) "
                        "is rounded to nearest instead of GPTQ (AWQ: its down projection keeps "
                        "scale 1); the experts concerned are named in a warning")
    p.add_argument("--device", default="cpu", help="cpu | cuda (where calibration runs)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from modelport.quantization.tools.capture import HESSIAN_ROW_CLIP
    from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model

    zero_point = args.zero_point if args.zero_point is not None else args.method == "awq"
    # an option of another method is refused, not silently ignored
    if args.desc_act and args.method != "gptq":
        print("error: --desc-act applies to --method gptq only", file=sys.stderr)
        return 1
    if args.method == "fp8":
        fixed = "FP8 weights are 8-bit E4M3 with one scale per output channel"
        given = [(flag, why) for flag, why, on in (
            ("--bits", fixed, args.bits not in (None, 8)),
            ("--group-size", fixed, args.group_size is not None),
            ("--zero-point / --no-zero-point", fixed, args.zero_point is not None),
            ("--reference-text", "FP8 fits no calibration text", args.reference_text is not None),
            ("--min-expert-tokens", "FP8 fits no calibration text",
             args.min_expert_tokens is not None),
        ) if on]
        if given:
            print(f"error: {given[0][0]} applies to --method awq / gptq only ({given[0][1]})",
                  file=sys.stderr)
            return 1
    if args.damp_percent is not None and args.method != "gptq":
        print("error: --damp-percent applies to --method gptq only", file=sys.stderr)
        return 1
    if args.hessian_row_clip is not None and args.method != "gptq":
        print("error: --hessian-row-clip applies to --method gptq only", file=sys.stderr)
        return 1
    if args.sequential is not None and args.method != "gptq":
        print("error: --sequential / --no-sequential applies to --method gptq only (AWQ and "
              "FP8 always take their statistics from the float model)", file=sys.stderr)
        return 1
    try:
        opts = QuantizeOptions(
            method=args.method,
            bits=args.bits if args.bits is not None else 8 if args.method == "fp8" else 4,
            group_size=args.group_size if args.group_size is not None else 128,
            desc_act=args.desc_act, zero_point=zero_point, num_samples=args.num_samples,
            seq_len=args.seq_len, reference_text=args.reference_text, device=args.device,
            sequential=args.sequential is not False, calib_from_model=args.calib_from_model,
            damp_percent=args.damp_percent if args.damp_percent is not None else 0.01,
            hessian_row_clip=(args.hessian_row_clip if args.hessian_row_clip is not None
                              else HESSIAN_ROW_CLIP),
            **({} if args.min_expert_tokens is None
               else {"min_expert_tokens": args.min_expert_tokens}))
        tools_log = logging.getLogger("modelport.quantization.tools")
        if not tools_log.hasHandlers():  # not logging's last resort too: printed below, once
            tools_log.addHandler(logging.NullHandler())
        report = quantize_model(args.model, args.output, args.calib, opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if report.layer_errors:
        ref = report.reference_errors
        head = "  reference  (round-to-nearest)" if ref else ""
        print(f"{'layer':60s} rel. output error{head}")
        experts = report.expert_errors()  # MoE: one line per layer and projection
        for name, err in report.layer_errors.items():
            group = re.sub(r"\.experts\.\d+\.(\w+)\.weight$", r".experts.*.\1", name)
            if group in experts:
                agg = experts.pop(group)  # printed at its first expert, once
                print(f"{group:60s} {agg['mean']:16.4f}  (mean of {agg['experts']} experts; "
                      f"max {agg['max']:.4f})")
            if group != name:
                continue
            tail = f"  {ref[name][0]:9.4f}  ({ref[name][1]:.4f})" if name in ref else ""
            print(f"{name:60s} {err:16.4f}{tail}")
        worst = max(report.layer_errors.items(), key=lambda kv: kv[1])
        print(f"worst: {worst[0]} ({worst[1]:.4f})")
        if ref:
            print(f"on the reference sample: {len(report.worse_than_rtn())} of {len(ref)} layers "
                  "worse than round-to-nearest")
    print(f"wrote {report.output}")
    return 0
