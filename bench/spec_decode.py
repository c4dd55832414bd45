"""Speculative decoding (n-gram prompt lookup) against plain decoding, single stream, same run.

The embedded default model (SmolLM2-135M-Instruct, the CPU default path) on chat prompts
that copy from their context (editing code, fixing a list) and one that does not (a story),
greedy, one request at a time: decode tok/s = (output tokens - 1) / (time after the first
token), the share of drafts accepted, and whether each output equals plain decoding's.

``--draft-layers N`` adds draft-model rows: the target's own first N decoder layers (with its
final norm and tied head) written as a float HF folder, a draft with the target's vocabulary
that needs no download (an early exit of the model; no training).

    .venv/bin/python bench/spec_decode.py [--k 2 4] [--draft-layers 6] [--max-tokens 128]
        [--repeat 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)


def variance(values):
    m = mean(values)
    total = 0
    for v in values:
        total += (v - m) ** 2
    return total / len(values)
'''

PROMPTS = {
    "code-edit": "Rewrite this Python code with type hints and docstrings. Keep the logic.\n\n"
                 + CODE,
    "list-fix": "Copy this shopping list and put each item on its own line, keeping the "
                "quantities: 2 apples, 1 loaf of bread, 3 onions, 500 g of rice, 1 bottle of "
                "olive oil, 6 eggs, 2 lemons, 1 jar of honey.",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run(llm, prompt: str, max_tokens: int, repeat: int) -> dict:  # noqa: ANN001
    from modelport import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=False)
    best = None
    for _ in range(repeat):
        core = llm.llm_engine.core
        before = core.get_stats()
        t0 = time.perf_counter()
        out = llm.chat([{"role": "user", "content": prompt}], params, use_tqdm=False)[0]
        t1 = time.perf_counter()
        after = core.get_stats()
        m = out.metrics
        n = len(out.outputs[0].token_ids)
        # decode time: from the first token (its server clock) to the end
        ttft = (m.first_token_time - m.arrival_time) if m and m.first_token_time else 0.0
        decode_s = (t1 - t0) - ttft
        tok_s = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        row = {"tokens": n, "decode_tok_s": round(tok_s, 1), "ttft_ms": round(ttft * 1e3, 1),
               "drafts": after.spec_num_draft_tokens - before.spec_num_draft_tokens,
               "accepted": after.spec_num_accepted_tokens - before.spec_num_accepted_tokens,
               "token_ids": out.outputs[0].token_ids}
        if best is None or row["decode_tok_s"] > best["decode_tok_s"]:
            best = row
    return best


def truncated_draft(layers: int, work: Path) -> Path:
    """The embedded default's first ``layers`` decoder layers as a float32 HF folder."""
    import json as _json

    from safetensors.torch import load_file, save_file

    from modelport import LLM
    from modelport.loader import default_model_path, gguf_cache_folder
    from modelport.loader.cache import entry_dir

    LLM(max_model_len=256, kv_cache_memory=32 << 20, device="cpu", quantization="none")  # fills the caches
    gguf = default_model_path()
    out = work / f"draft-{layers}"
    out.mkdir(parents=True, exist_ok=True)
    for f in [*gguf_cache_folder(gguf).iterdir(), *entry_dir(gguf, "gguf-tokenizer").iterdir()]:
        if f.suffix == ".safetensors":
            keep = {n: t for n, t in load_file(str(f)).items()
                    if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers}
            save_file(keep, str(out / f.name), metadata={"format": "pt"})
        elif f.name == "config.json":
            cfg = _json.loads(f.read_text())
            cfg["num_hidden_layers"] = layers
            (out / f.name).write_text(_json.dumps(cfg))
        elif f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, nargs="*", default=[2, 4], help="num_speculative_tokens")
    ap.add_argument("--draft-layers", type=int, nargs="*", default=[],
                    help="draft-model rows: the target's first N layers as the draft")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    from modelport import LLM

    configs = [("plain", None)] + [
        (f"ngram k={k}", {"method": "ngram", "num_speculative_tokens": k,
                            "prompt_lookup_max": 4, "prompt_lookup_min": 1}) for k in args.k]
    work = Path(tempfile.mkdtemp(prefix="specdraft-"))
    for layers in args.draft_layers:
        draft = str(truncated_draft(layers, work))
        configs += [(f"draft {layers} layers k={k}", {"model": draft, "num_speculative_tokens": k})
                    for k in args.k]
    results: dict[str, dict] = {}
    for label, spec in configs:
        llm = LLM(max_model_len=1024, kv_cache_memory=128 << 20, device="cpu",
                  speculative_config=spec)
        llm.generate(["warm up"], use_tqdm=False)
        results[label] = {name: run(llm, p, args.max_tokens, args.repeat)
                          for name, p in PROMPTS.items()}
        del llm
    rows = []
    for label, per in results.items():
        for name, r in per.items():
            plain = results["plain"][name]
            rows.append({
                "config": label, "prompt": name, "tokens": r["tokens"],
                "decode_tok_s": r["decode_tok_s"],
                "vs_plain": round(r["decode_tok_s"] / plain["decode_tok_s"], 2),
                "accepted": f"{r['accepted']}/{r['drafts']}",
                "same_tokens_as_plain": r["token_ids"] == plain["token_ids"],
            })
            print(json.dumps(rows[-1]))
    out = {"bench": "spec_decode", "machine": platform.processor() or platform.machine(),
           "cpus": torch.get_num_threads(), "torch": torch.__version__,
           "command": "bench/spec_decode.py " + " ".join(
               f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
               for k, v in vars(args).items() if v is not None),
           "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
