"""CPU benchmark of the embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF).

C1 single stream: 64-token prompt, 128 new tokens, greedy, ignore_eos -> TTFT and decode tok/s.
C2 concurrency: 32 requests of ~64-token prompts, 64 new tokens each -> aggregate generated tok/s
(prefill included). `--peer hf` runs HF transformers fp32 on the same weights in the same process,
so the ratio is measured on one machine in one run. `--peer llama.cpp --llama-cpp-python PY` runs
C1 through llama-cpp-python (BENCH.md's peer) on the same GGUF file, in the interpreter PY (a
separate venv: it is not a modelport dependency), right after ours.

    .venv/bin/python bench/cpu_default.py [--peer hf|llama.cpp|both] [--json out.json]

`--model F` runs another GGUF file or HF folder instead (e.g. a Q8_0 copy of the default model
that bench/gguf_requant.py wrote), `--quantization Q` passes LLM(quantization=Q) (`none`: the
weights dequantized to fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
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


AB_KNOBS = {"fast_decode": ("cpu_fast", "ENABLED"),
            "greedy_head": ("cpu_fast", "GREEDY_INT8_HEAD"),
            "cpu_kernels": ("cpu_kernels", "ENABLED")}


def c1_ab(eng, vocab: int, rounds: int, knob: str = "fast_decode") -> dict:
    """C1 with a CPU switch off and on, interleaved in this process (off, on, off, on, ...):
    the same-run ratio, and whether greedy tokens agree. ``knob``: fast_decode (the decode
    fast paths, cpu_fast.ENABLED), greedy_head (the exact int8-screened greedy LM head,
    cpu_fast.GREEDY_INT8_HEAD) or cpu_kernels (the decode step's small ops fused in C,
    cpu_kernels.ENABLED; its greedy tokens may differ from the module path's after a
    near-tie, as its sums round differently)."""
    import importlib
    from statistics import median

    module, attr = AB_KNOBS[knob]
    mod = importlib.import_module(f"modelport.layers.{module}")
    saved = getattr(mod, attr)
    runs: dict[str, list[float]] = {"off": [], "on": []}
    tokens: dict[str, list[int]] = {}
    try:
        for i in range(rounds):
            for mode in ("off", "on"):
                setattr(mod, attr, mode == "on")
                _, tok_s, ids = c1(eng, vocab, f"c1-ab-{mode}-{i}")
                runs[mode].append(tok_s)
                if tokens.setdefault(mode, ids) != ids:
                    raise AssertionError(f"C1 greedy tokens changed between {mode} runs")
    finally:
        setattr(mod, attr, saved)
    off, on = median(runs["off"]), median(runs["on"])
    return {"knob": knob, "decode_tok_s_off": runs["off"], "decode_tok_s_on": runs["on"],
            "median_off": off, "median_on": on, "speedup": round(on / off, 2),
            "greedy_tokens_identical": tokens["off"] == tokens["on"]}


def run_modelport(args, quantization: str | None = None) -> dict:
    from modelport import LLM, SamplingParams

    t0 = time.perf_counter()
    if quantization is None:
        quantization = args.quantization
    llm = LLM(args.model, kv_cache_memory=256 << 20, max_model_len=2048, max_num_seqs=64,
              quantization=quantization)
    load_s = time.perf_counter() - t0
    eng = llm.llm_engine
    vocab = eng.config.model_config.vocab_size
    kernels = sorted({type(m.qkernel).__name__ for m in eng.core.runner.model.modules()
                      if hasattr(m, "qkernel")})
    head = eng.core.runner.model.lm_head.weight.dtype
    kept = (f"{'/'.join(kernels)} kept" if args.model else "Q4_1 kept") if kernels else None
    name = (f"modelport {args.model or 'default model'} quantization={quantization!r}: "
            + (f"{kept}, {str(head).removeprefix('torch.')} LM head" if kept else "fp32"))
    res = {"engine": name, "load_s": round(load_s, 2)}

    # C1: time to first token and decode rate from the engine's own step loop
    llm.generate(prompt_token_ids=prompts(1, 64, vocab, 1), sampling_params=SamplingParams(
        temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)  # warm-up
    if args.ab:
        res["c1_ab"] = c1_ab(eng, vocab, args.ab, args.ab_knob)
    ttft_ms, tok_s, ids = c1(eng, vocab)
    res["c1_token_ids"] = ids
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


# C1 through llama-cpp-python, run in the interpreter that has it: the same 64 prompt ids as
# ours, greedy, 128 new tokens without stopping at EOS (Llama.generate does not stop by itself)
_LLAMA_CPP_C1 = r"""
import json, sys, time
import llama_cpp
path, threads, ids = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
t0 = time.perf_counter()
llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                      n_batch=512, verbose=False)
load_s = time.perf_counter() - t0
def c1(n):
    llm.reset()
    t0 = time.perf_counter(); first = None; out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        if first is None:
            first = time.perf_counter()
        if len(out) == n:
            break
    return first - t0, time.perf_counter() - first, out
c1(48)  # warm-up
ttft, rest, out = c1(128)
print(json.dumps({"engine": f"llama-cpp-python {llama_cpp.__version__}, {threads} threads",
                  "load_s": round(load_s, 2), "c1_ttft_ms": round(ttft * 1000, 1),
                  "c1_decode_tok_s": round((len(out) - 1) / rest, 1), "c1_token_ids": out}))
"""


def run_llama_cpp(args) -> dict:
    from modelport.loader import default_model_path

    threads = args.threads or torch.get_num_threads()
    vocab = 49152  # SmolLM2's; prompts() draws ids well inside it, as for our engine
    ids = prompts(1, 64, vocab, 0)[0]
    proc = subprocess.run([args.llama_cpp_python, "-c", _LLAMA_CPP_C1, str(default_model_path()),
                           str(threads), json.dumps(ids)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-cpp-python failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer", choices=["hf", "llama.cpp", "both", "none"], default="none")
    ap.add_argument("--llama-cpp-python", default="python3", metavar="PY",
                    help="the interpreter with llama-cpp-python installed (--peer llama.cpp)")
    ap.add_argument("--quantized", action="store_true",
                    help="besides the default (Q4_1 kept on an AVX2 CPU), also quantization="
                    "'none' (fp32) and 'gguf' (kept, bf16 LM head)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--ab", type=int, default=0, metavar="N",
                    help="also run C1 N times each with the CPU decode fast paths off and on, "
                    "interleaved (MODELPORT_CPU_FAST_DECODE switches them for the rest)")
    ap.add_argument("--ab-knob", choices=sorted(AB_KNOBS), default="fast_decode",
                    help="the switch --ab flips: the CPU decode fast paths, or the exact greedy "
                    "int8-screened LM head (MODELPORT_CPU_GREEDY_INT8_HEAD)")
    ap.add_argument("--skip-c2", action="store_true", help="C1 only")
    ap.add_argument("--model", default=None,
                    help="a GGUF file or HF folder instead of the embedded default model")
    ap.add_argument("--quantization", default=None,
                    help="LLM(quantization=...) for the first run, e.g. none (fp32 weights)")
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
    machine["greedy_int8_head_env"] = os.environ.get("MODELPORT_CPU_GREEDY_INT8_HEAD", "1")
    machine["cpu_kernels_env"] = os.environ.get("MODELPORT_CPU_KERNELS", "1")
    load_before = list(os.getloadavg())
    results = [run_modelport(args)]
    if args.quantized:
        results += [run_modelport(args, "none"), run_modelport(args, "gguf")]
    if args.peer in ("hf", "both"):
        results.append(run_hf(args))
    if args.peer in ("llama.cpp", "both"):
        results.append(run_llama_cpp(args))
    ours = results[0].get("c1_token_ids") or []
    for r in results[1:]:  # greedy agreement with the default engine (same prompt ids)
        theirs = r.get("c1_token_ids") or []
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                    min(len(ours), len(theirs)))
        if theirs:
            r["c1_same_leading_tokens_as_default"] = same
    machine["loadavg_before_after"] = [load_before, list(os.getloadavg())]
    report = {"command": " ".join(["python"] + sys.argv), "machine": machine, "results": results,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
