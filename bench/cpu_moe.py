"""CPU benchmark of a mixture-of-experts GGUF file: experts kept in their blocks vs dequantized
to fp32 (what the engine did before session 28), and llama.cpp on the same file.

No MoE GGUF ships here and nothing is fetched, so ``--write`` makes one: a Qwen3-MoE-shaped
model (default: hidden 1024, 24 layers, 16 heads / 4 KV heads of 64, 32 experts, top 4,
expert intermediate 512, ~1.3B parameters, ~0.4B active) with random weights (std 0.02), its
linear weights in one GGML type, the tokenizer of the embedded default model (SmolLM2's).
Speed does not depend on the values, so the file times what a real one of that shape would.

C1 as in bench/cpu_default.py: a 64-token prompt, 128 new tokens, greedy, ignore_eos -> TTFT
and decode tok/s; `--peer llama.cpp --llama-cpp-python PY` runs the same prompt ids through
llama-cpp-python (a separate venv) right after ours.

    .venv/bin/python bench/cpu_moe.py --write /tmp/moe-q4_0.gguf --qtype Q4_0
    .venv/bin/python bench/cpu_moe.py --model /tmp/moe-q4_0.gguf [--dequantized] \
        [--peer llama.cpp --llama-cpp-python /path/to/venv/bin/python] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_default import _LLAMA_CPP_C1, c1, cpu_model, prompts  # noqa: E402

SHAPE = dict(hidden=1024, layers=24, heads=16, kv_heads=4, head_dim=64, experts=32, top_k=4,
             moe_inter=512, vocab=49152, ctx=4096)


def write_moe_gguf(out: Path, qtype: str, seed: int = 0, **shape: int) -> Path:
    """A Qwen3-MoE GGUF with random weights (llama.cpp's tensor names and metadata keys)."""
    import gguf

    from modelport.loader import default_model_path

    s = {**SHAPE, **shape}
    h, hd, e = s["hidden"], s["head_dim"], s["experts"]
    rng = np.random.default_rng(seed)
    q = gguf.GGMLQuantizationType[qtype]

    def rand(*dims: int) -> np.ndarray:
        return (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)

    w = gguf.GGUFWriter(str(out), arch="qwen3moe")
    w.add_name(f"random-qwen3moe-{qtype}")
    w.add_block_count(s["layers"])
    w.add_context_length(s["ctx"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(s["moe_inter"] * 4)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(e)
    w.add_expert_used_count(s["top_k"])
    w.add_expert_feed_forward_length(s["moe_inter"])
    w.add_file_type(int(q))
    reader = gguf.GGUFReader(str(default_model_path()))  # the default model's tokenizer
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), field.types[0], sub)

    def add(name: str, t: np.ndarray, quantized: bool = True) -> None:
        if quantized:
            w.add_tensor(name, gguf.quants.quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(name, t)

    add("token_embd.weight", rand(s["vocab"], h), quantized=False)
    add("output_norm.weight", np.ones(h, np.float32), quantized=False)
    for i in range(s["layers"]):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", np.ones(h, np.float32), quantized=False)
        add(b + "ffn_norm.weight", np.ones(h, np.float32), quantized=False)
        add(b + "attn_q_norm.weight", np.ones(hd, np.float32), quantized=False)
        add(b + "attn_k_norm.weight", np.ones(hd, np.float32), quantized=False)
        add(b + "attn_q.weight", rand(s["heads"] * hd, h))
        add(b + "attn_k.weight", rand(s["kv_heads"] * hd, h))
        add(b + "attn_v.weight", rand(s["kv_heads"] * hd, h))
        add(b + "attn_output.weight", rand(h, s["heads"] * hd))
        add(b + "ffn_gate_inp.weight", rand(e, h) * 50, quantized=False)  # routers stay F32
        add(b + "ffn_gate_exps.weight", rand(e, s["moe_inter"], h))
        add(b + "ffn_up_exps.weight", rand(e, s["moe_inter"], h))
        add(b + "ffn_down_exps.weight", rand(e, h, s["moe_inter"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def run_modelport(path: Path, dequantized: bool) -> dict:
    from modelport import LLM

    t0 = time.perf_counter()
    llm = LLM(str(path), max_model_len=2048, kv_cache_memory=512 << 20,
              quantization="none" if dequantized else None)
    load_s = time.perf_counter() - t0
    eng = llm.llm_engine
    vocab = eng.config.model_config.vocab_size
    c1(eng, vocab, "warm")
    ttft, tok_s, ids = c1(eng, vocab)
    model = eng.core.runner.model
    kept = sum(1 for m in model.modules() if hasattr(m, "qkernel"))
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"engine": "modelport " + ("dequantized fp32" if dequantized else "kept"),
            "load_s": round(load_s, 2), "kept_layers": kept, "held_gib": round(held / 2**30, 2),
            "c1_ttft_ms": ttft, "c1_decode_tok_s": tok_s, "c1_token_ids": ids[:16]}


def run_llama_cpp(path: Path, py: str, vocab: int) -> dict:
    threads = torch.get_num_threads()
    ids = prompts(1, 64, vocab, 0)[0]
    proc = subprocess.run([py, "-c", _LLAMA_CPP_C1, str(path), str(threads), json.dumps(ids)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-cpp-python failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["c1_token_ids"] = out["c1_token_ids"][:16]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", type=Path, help="write a random Qwen3-MoE GGUF here and exit")
    ap.add_argument("--qtype", default="Q4_0", help="GGML type of the linear weights")
    ap.add_argument("--model", type=Path, help="the MoE GGUF file to run")
    ap.add_argument("--dequantized", action="store_true",
                    help="also run the file dequantized to fp32 (quantization='none')")
    ap.add_argument("--peer", choices=["llama.cpp", "none"], default="none")
    ap.add_argument("--llama-cpp-python", default="python3", metavar="PY")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--threads", type=int, default=0, help="threads for both (0: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.write:
        print(write_moe_gguf(args.write, args.qtype))
        return
    if args.model is None:
        ap.error("--model or --write")
    results = [run_modelport(args.model, False)]
    if args.dequantized:
        results.append(run_modelport(args.model, True))
    if args.peer == "llama.cpp":
        results.append(run_llama_cpp(args.model, args.llama_cpp_python, 49152))
    doc = {"bench": "cpu_moe C1", "model": str(args.model),
           "file_bytes": args.model.stat().st_size, "cpu": cpu_model(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "loadavg": os.getloadavg(),
           "command": " ".join(sys.argv), "results": results}
    print(json.dumps(doc, indent=1))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
