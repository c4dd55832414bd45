"""CPU benchmark of the embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF).

C1 single stream: 64-token prompt, 128 new tokens, greedy, ignore_eos -> TTFT and decode tok/s.
C2 concurrency: 32 requests of ~64-token prompts, 64 new tokens each -> aggregate generated tok/s
(prefill included). `--peer hf` runs HF transformers fp32 on the same weights in the same process,
so the ratio is measured on one machine in one run.

    .venv/bin/python bench/cpu_default.py [--peer hf] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time

import torch


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(n)]


def run_modelport(args, quantization: str | None = None) -> dict:
    from modelport import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(kv_cache_memory=256 << 20, max_model_len=2048, max_num_seqs=64,
              quantization=quantization)
    load_s = time.perf_counter() - t0
    eng = llm.llm_engine
    vocab = eng.config.model_config.vocab_size
    kept = any(hasattr(m, "qkernel") for m in eng.core.runner.model.modules())
    head = eng.core.runner.model.lm_head.weight.dtype
    name = (f"modelport quantization={quantization!r}: "
            + (f"Q4_1 kept, {str(head).removeprefix('torch.')} LM head" if kept else "fp32"))
    res = {"engine": name, "load_s": round(load_s, 2)}

    # C1: time to first token and decode rate from the engine's own step loop
    p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts(1, 64, vocab, 1), sampling_params=SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    eng.add_request("c1", prompts(1, 64, vocab, 0)[0], p, output_kind="delta")
    t_start = time.perf_counter()
    t_first = None
    n_tokens = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            n_tokens += len(o.outputs[0].token_ids)
            if t_first is None and n_tokens:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    res["c1_ttft_ms"] = round((t_first - t_start) * 1000, 1)
    res["c1_decode_tok_s"] = round((n_tokens - 1) / (t_end - t_first), 1)

    # C2: 32 concurrent requests
    ps = prompts(32, 64, vocab, 2)
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=ps, sampling_params=sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    res["c2_generated_tokens"] = gen
    res["c2_seconds"] = round(dt, 2)
    res["c2_tok_s"] = round(gen / dt, 1)
    return res


def run_hf(args) -> dict:
    from transformers import AutoModelForCausalLM

    from modelport.loader import default_model_path

    path = default_model_path()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    res = {"engine": "hf-transformers-fp32", "load_s": round(time.perf_counter() - t0, 2)}
    vocab = model.config.vocab_size
    ids = torch.tensor(prompts(1, 64, vocab, 0))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, do_sample=False, min_new_tokens=1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=128, do_sample=False, min_new_tokens=128)
        total = time.perf_counter() - t0
        res["c1_ttft_ms"] = round(ttft * 1000, 1)
        res["c1_decode_tok_s"] = round(127 / (total - ttft), 1)
        batch = torch.tensor(prompts(32, 64, vocab, 2))
        t0 = time.perf_counter()
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=64,
                             do_sample=False, min_new_tokens=64)
        dt = time.perf_counter() - t0
    gen = (out.shape[1] - batch.shape[1]) * batch.shape[0]
    res["c2_generated_tokens"] = gen
    res["c2_seconds"] = round(dt, 2)
    res["c2_tok_s"] = round(gen / dt, 1)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["hf", "none"], default="none")
    ap.add_argument("--quantized", action="store_true",
                    help="besides the default (Q4_1 kept on an AVX2 CPU), also quantization="
                    "'none' (fp32) and 'gguf' (kept, bf16 LM head)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    results = [run_modelport(args)]
    if args.quantized:
        results += [run_modelport(args, "none"), run_modelport(args, "gguf")]
    if args.peer == "hf":
        results.append(run_hf(args))
    report = {"machine": machine, "results": results,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
