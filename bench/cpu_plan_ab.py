"""C1 of the default model with two versions of the C step swapped in one engine, interleaved.

`--old DIR` is a copy of src/modelport/layers from another commit (its cpu_kernels.py and
csrc/cpu_decode.c are what count); its DecodePlan is built on the same model and put in place
of the current one round by round (old, new, old, new, ...), so both see the same load on a
shared box. Greedy tokens must be identical where the two compute the same thing.

    git show HEAD:src/modelport/layers/cpu_kernels.py > /tmp/old/cpu_kernels.py  (and csrc/)
    .venv/bin/python bench/cpu_plan_ab.py --old /tmp/old --rounds 4 --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).parent))
from cpu_default import c1  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="folder with the old cpu_kernels.py")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("old_cpu_kernels", args.old / "cpu_kernels.py")
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    from modelport import LLM, SamplingParams

    load_before = list(os.getloadavg())
    llm = LLM(args.model, kv_cache_memory=256 << 20, max_model_len=2048, max_num_seqs=64)
    eng = llm.llm_engine
    vocab = eng.config.model_config.vocab_size
    llm.generate(prompt_token_ids=[[1000 + i for i in range(64)]], use_tqdm=False,
                 sampling_params=SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    inner = eng.core.runner.model.model
    new_plan = inner.__dict__["_cpu_decode_plan"]
    old_lib = old.load_library()
    assert old_lib is not None and old._fits(inner) is None, "the old C step does not take it"
    plans = {"old": old.DecodePlan(inner, old_lib), "new": new_plan}
    runs: dict[str, list[float]] = {"old": [], "new": []}
    tokens: dict[str, list[int]] = {}
    for i in range(args.rounds):
        for name, plan in plans.items():
            inner.__dict__["_cpu_decode_plan"] = plan
            _, tok_s, ids = c1(eng, vocab, f"ab-{name}-{i}")
            runs[name].append(tok_s)
            tokens.setdefault(name, ids)
    inner.__dict__["_cpu_decode_plan"] = new_plan
    report = {"command": " ".join(["python"] + sys.argv), "decode_tok_s": runs,
              "median": {k: median(v) for k, v in runs.items()},
              "new_over_old": round(median(runs["new"]) / median(runs["old"]), 3),
              "greedy_tokens_identical": tokens["old"] == tokens["new"],
              "loadavg_before_after": [load_before, list(os.getloadavg())],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
