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
import sys
import time

import torch


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000, vocab - 1000) for _ in range(length)] for _ in range(n)]


def c1(eng, vocab: int, rid: str = "c1") -> tuple[float, float, list[int]]:
    """One C1 stream through the engine's step loop: (TTFT ms, decode tok/s, token ids)."""
    from modelport import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    eng.add_request(rid, prompts(1, 64, vocab, 0)[0], p, output_kind="delta")
    t_start = time.perf_counter()
    t_first = None
    ids: list[int] = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            ids += o.outputs[0].token_ids
            if t_first is None and ids:
                t_first = time.perf_counter()
    t_end = time.perf_counter()
    return (round((t_first - t_start) * 1000, 1), round((len(ids) - 1) / (t_end - t_first), 1),
            ids)


def c1_ab(eng, vocab: int, rounds: int) -> dict:
    """C1 with the CPU decode fast paths (layers/cpu_fast.py) off and on, interleaved in this
    process (off, on, off, on, ...): the same-run ratio, and whether greedy tokens agree."""
    from statistics import median

    from modelport.layers import cpu_fast

    saved = cpu_fast.ENABLED
    runs: dict[str, list[float]] = {"off": [], "on": []}
    tokens: dict[str, list[int]] = {}
    try:
        for i in range(rounds):
            for mode in ("off", "on"):
                cpu_fast.ENABLED = mode == "on"
                _, tok_s, ids = c1(eng, vocab, f"c1-ab-{mode}-{i}")
                runs[mode].append(tok_s)
                if tokens.setdefault(mode, ids) != ids:
                    raise AssertionError(f"C1 greedy tokens changed between {mode} runs")
    finally:
        cpu_fast.ENABLED = saved
    off, on = median(runs["off"]), median(runs["on"])
    return {"decode_tok_s_off": runs["off"], "decode_tok_s_on": runs["on"],
            "median_off": off, "median_on": on, "speedup": round(on / off, 2),
            "greedy_tokens_identical": tokens["off"] == tokens["on"]}


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
    llm.generate(prompt_token_ids=prompts(1, 64, vocab, 1), sampling_params=SamplingParams(
        temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)  # warm-up
    if args.ab:
        res["c1_ab"] = c1_ab(eng, vocab, args.ab)
    ttft_ms, tok_s, _ = c1(eng, vocab)
    res["c1_ttft_ms"] = ttft_ms
    res["c1_decode_tok_s"] = tok_s

    if args.skip_c2:
        return res
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
    ap.add_argument("--ab", type=int, default=0, metavar="N",
                    help="also run C1 N times each with the CPU decode fast paths off and on, "
                    "interleaved (MODELPORT_CPU_FAST_DECODE switches them for the rest)")
    ap.add_argument("--skip-c2", action="store_true", help="C1 only")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = {
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    machine["fast_decode_env"] = os.environ.get("MODELPORT_CPU_FAST_DECODE", "1")
    load_before = list(os.getloadavg())
    results = [run_modelport(args)]
    if args.quantized:
        results += [run_modelport(args, "none"), run_modelport(args, "gguf")]
    if args.peer == "hf":
        results.append(run_hf(args))
    machine["loadavg_before_after"] = [load_before, list(os.getloadavg())]
    report = {"command": " ".join(["python"] + sys.argv), "machine": machine, "results": results,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
