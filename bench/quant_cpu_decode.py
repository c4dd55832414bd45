"""CPU decode speed of the embedded default GGUF (Q4_1): kept quantized vs our fp32 path.

Three engines: quantization="none" (the file dequantized to fp32), the default (no
quantization=: on an AVX2/AVX-512 CPU Q4-Q8 blocks stay quantized; the tied LM head reads a
bf16 copy and refines each row's top logits from the fp32 table) and quantization="gguf"
(kept on any CPU; for this tied model the same head). --model FILE.gguf (e.g. a Q8_0 copy
made by bench/gguf_requant.py) measures that file instead (5- to 8-bit types run the int8
kernel).

Single stream: 64-token prompt, 128 new tokens, greedy, ignore_eos; decode tok/s from the
engine's own step loop (as bench/cpu_default.py). --batch: also 32 concurrent requests, 64 new
tokens each (aggregate tok/s).
Both engines are built once in one process and measured alternately --repeat times (the
box may be shared: other load only slows a run down, so the best and the median are kept).

    .venv/bin/python bench/quant_cpu_decode.py [--repeat 5] [--batch] [--json out.json]
        [--model FILE.gguf] [--q8-ab]

--q8-ab (with a Q8_0 --model): engines "gguf" on the per-row requantized int8 kernel
(MODELPORT_Q8_CPU=rows, the default before session 32) and "gguf" on the Q8_0 block-scale kernel
(quantization/kernels.CpuQ8Kernel).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import time

import torch


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(n)]


def make_llm(quantization: str | None, model: str | None = None):  # noqa: ANN201
    from modelport import LLM
    from modelport.engine.arg_utils import EngineArgs

    try:
        return LLM(model, kv_cache_memory=256 << 20, max_num_seqs=64, max_model_len=2048,
                   quantization=quantization)
    except ValueError as e:
        if "not supported by this build yet" not in str(e):
            raise
    # an engine build whose EngineArgs still refuses quantization: set it on the load config
    orig = EngineArgs.create_engine_config

    def patched(self):  # type: ignore[no-untyped-def]
        q, self.quantization = self.quantization, None
        cfg = orig(self)
        self.quantization = q
        return dataclasses.replace(cfg, load_config=dataclasses.replace(cfg.load_config,
                                                                        quantization=q))

    EngineArgs.create_engine_config = patched
    try:
        return LLM(model, kv_cache_memory=256 << 20, max_num_seqs=64, max_model_len=2048,
                   quantization=quantization)
    finally:
        EngineArgs.create_engine_config = orig


def single_stream(llm, tokens: int) -> float:  # noqa: ANN001
    """Decode tok/s of one greedy request (64-token prompt) from the engine's step loop."""
    from modelport import SamplingParams

    eng = llm.llm_engine
    vocab = eng.config.model_config.vocab_size
    rid = f"s{time.monotonic_ns()}"
    eng.add_request(rid, _prompts(1, 64, vocab, 0)[0],
                    SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True),
                    output_kind="delta")
    t_first, n = None, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            n += len(o.outputs[0].token_ids)
            if t_first is None and n:
                t_first = time.perf_counter()
    return (n - 1) / (time.perf_counter() - t_first)


def batch32(llm) -> float:  # noqa: ANN001
    from modelport import SamplingParams

    vocab = llm.llm_engine.config.model_config.vocab_size
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=_prompts(32, 64, vocab, 2), sampling_params=sp,
                        use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5, help="alternating rounds; best is kept")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", action="store_true", help="also 32 concurrent requests")
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", default=None,
                    help="another GGUF file (e.g. a Q8_0 copy from bench/gguf_requant.py)")
    ap.add_argument("--q8-ab", action="store_true",
                    help="engines: gguf with MODELPORT_Q8_CPU=rows, gguf with =blocks")
    args = ap.parse_args()
    from modelport import SamplingParams

    variants = {}
    names = {"none": "none (fp32)", None: "default (auto)", "gguf": "gguf (explicit)"}
    builds = [(q, names[q], None) for q in ("none", None, "gguf")]
    if args.q8_ab:  # Q8_0 on CPU: per-row requantized int8 (before) against its block scales
        builds = [("gguf", "gguf, Q8_0 rows (MODELPORT_Q8_CPU=rows)", "rows"),
                  ("gguf", "gguf, Q8_0 blocks (MODELPORT_Q8_CPU=blocks)", "blocks")]
    for q, name, q8 in builds:
        t0 = time.perf_counter()
        before = os.environ.get("MODELPORT_Q8_CPU")
        if q8 is not None:  # read when the kernels are built, i.e. by make_llm
            os.environ["MODELPORT_Q8_CPU"] = q8
        try:
            llm = make_llm(q, args.model)
        finally:
            if before is None:
                os.environ.pop("MODELPORT_Q8_CPU", None)
            else:
                os.environ["MODELPORT_Q8_CPU"] = before
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate(prompt_token_ids=[[1000] * 64], sampling_params=warm, use_tqdm=False)
        variants[name] = {"llm": llm, "load_s": round(time.perf_counter() - t0, 1),
                                        "single": [], "batch": []}
    for _ in range(args.repeat):  # alternate, so load from other processes hits both alike
        for v in variants.values():
            v["single"].append(single_stream(v["llm"], args.tokens))
            if args.batch:
                v["batch"].append(batch32(v["llm"]))
            print(json.dumps({k: [round(x, 1) for x in v[k]] for k in ("single", "batch")}),
                  flush=True)
    rows = []
    for name, v in variants.items():
        row = {"quantization": name, "load_s": v["load_s"],
               "single_decode_tok_s_best": round(max(v["single"]), 1),
               "single_decode_tok_s_median": round(sorted(v["single"])[len(v["single"]) // 2], 1)}
        if v["batch"]:
            row["batch32_tok_s_best"] = round(max(v["batch"]), 1)
        rows.append(row)
    out = {"model": args.model or "embedded default (Q4_1)",
           "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
           "results": rows,
           # with --q8-ab: against the first engine, the row path
           ("single_stream_speedup_best_vs_rows" if args.q8_ab
            else "single_stream_speedup_best_vs_fp32"): {
               r["quantization"]: round(r["single_decode_tok_s_best"]
                                        / rows[0]["single_decode_tok_s_best"], 2)
               for r in rows[1:]}}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
