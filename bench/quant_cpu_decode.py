"""CPU decode speed of the embedded default GGUF (Q4_1): kept quantized vs our fp32 path.

Single stream: 64-token prompt, 128 new tokens, greedy, ignore_eos; decode tok/s from the
engine's own step loop (as bench/cpu_default.py). Batch: 32 concurrent requests, 64 new tokens.
Each variant is measured in a fresh engine in the same process, alternating, best of --repeat.

    .venv/bin/python bench/quant_cpu_decode.py [--repeat 2] [--json out.json]
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


def make_llm(quantization: str | None):  # noqa: ANN201
    from modelport import LLM
    from modelport.engine.arg_utils import EngineArgs

    try:
        return LLM(kv_cache_memory=256 << 20, max_num_seqs=64, max_model_len=2048,
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
        return LLM(kv_cache_memory=256 << 20, max_num_seqs=64, max_model_len=2048,
                   quantization=quantization)
    finally:
        EngineArgs.create_engine_config = orig


def measure(quantization: str | None) -> dict:
    from modelport import SamplingParams

    t0 = time.perf_counter()
    llm = make_llm(quantization)
    load_s = time.perf_counter() - t0
    eng = llm.llm_engine
    vocab = eng.config.model_config.vocab_size
    warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(prompt_token_ids=_prompts(2, 64, vocab, 1), sampling_params=warm, use_tqdm=False)
    eng.add_request("s1", _prompts(1, 64, vocab, 0)[0],
                    SamplingParams(temperature=0, max_tokens=128, ignore_eos=True), output_kind="delta")
    t_first, n = None, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            n += len(o.outputs[0].token_ids)
            if t_first is None and n:
                t_first = time.perf_counter()
    single = (n - 1) / (time.perf_counter() - t_first)
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=_prompts(32, 64, vocab, 2), sampling_params=sp,
                        use_tqdm=False)
    batch = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
    return {"quantization": quantization or "none (fp32)", "load_s": round(load_s, 1),
            "single_decode_tok_s": round(single, 1), "batch32_tok_s": round(batch, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for q in (None, "gguf"):
            r = measure(q)
            key = r["quantization"]
            if key not in best or r["single_decode_tok_s"] > best[key]["single_decode_tok_s"]:
                best[key] = r
    rows = list(best.values())
    fp32, q4 = rows[0]["single_decode_tok_s"], rows[1]["single_decode_tok_s"]
    out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                      f"torch {torch.__version__} ({torch.get_num_threads()} threads)",
           "results": rows, "single_stream_speedup": round(q4 / fp32, 2)}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
