"""Where the engine's CUDA memory goes before it sizes the KV cache, next to the planner's
model of it (planner/memory.py), for the Llama-3.1-8B shape with dummy bf16 weights.

For each setting: the bytes allocated when the profiling forward starts (weights, buffers),
the peak of the forward alone, the bytes live when the sampler starts (the logits), the peak
with the sampler, what the allocator holds in part-used segments afterwards, memory outside
torch's allocator, the engine's KV blocks; then the planner's activation and non-torch
estimates and its KV blocks for the same settings. One JSON line a setting.

    PYTHONPATH=src python3 bench/gpu/planner_probe.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [  # max_model_len, max_num_seqs, gpu_memory_utilization, max_num_batched_tokens
    (8192, 256, 0.9, 2048), (4096, 64, 0.8, 2048), (8192, 256, 0.9, 16384),
    (8192, 1024, 0.9, 16384),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import logging
    import sys

    log = logging.getLogger("modelport.runner.model_runner")  # the engine's "CUDA memory" line
    log.setLevel(logging.INFO)
    log.addHandler(logging.StreamHandler(sys.stdout))

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny_models import _byte_level_tokenizer
    from modelport import LLM
    from modelport.planner.hardware import resolve_device
    from modelport.planner.model_source import resolve_model
    from modelport.planner.plan import PlanRequest, make_plan
    from modelport.planner.presets import find_model_preset
    from modelport.runner import model_runner

    folder = Path(tempfile.mkdtemp(prefix="probe-"))
    cfg = dict(find_model_preset("llama-3.1-8b")[1], model_type="llama")
    (folder / "config.json").write_text(json.dumps(cfg))
    _byte_level_tokenizer().save_pretrained(folder)
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    rec: dict[str, int] = {}
    real_profile, real_sampler = model_runner.ModelRunner.profile_run, model_runner.Sampler

    def profile_run(self):
        rec["start_alloc"] = torch.cuda.memory_allocated(dev)
        real_profile(self)
        torch.cuda.synchronize(dev)
        rec["peak"] = torch.cuda.max_memory_allocated(dev)

    class Sampler(real_sampler):
        def __call__(self, logits, rows):
            torch.cuda.synchronize(dev)
            rec["forward_peak"] = torch.cuda.max_memory_allocated(dev)
            rec["sampler_start_alloc"] = torch.cuda.memory_allocated(dev)
            return super().__call__(logits, rows)

    model_runner.ModelRunner.profile_run = profile_run
    model_runner.Sampler = Sampler
    out = []
    for ml, seqs, util, budget in SETTINGS:
        rec.clear()
        llm = LLM(str(folder), device="cuda", dtype="bfloat16", load_format="dummy",
                  max_model_len=ml, max_num_seqs=seqs, gpu_memory_utilization=util,
                  max_num_batched_tokens=budget)
        blocks = llm.llm_engine.num_kv_blocks
        del llm
        torch.cuda.empty_cache()
        free2, tot = torch.cuda.mem_get_info(dev)
        plan = make_plan(PlanRequest(resolve_model(str(folder)),
                                     resolve_device(None, gpu_memory_gib=total / 2**30,
                                                    bandwidth_tbps=1, tflops=1),
                                     max_model_len=ml, max_num_seqs=seqs, dtype="bf16",
                                     gpu_memory_utilization=util, max_num_batched_tokens=budget))
        mb = plan.budget
        row = {
            "max_model_len": ml, "max_num_seqs": seqs, "util": util, "budget": budget,
            "engine_blocks": blocks, "plan_blocks": plan.kv.num_blocks,
            "total_gib": total / 2**30,
            **{k: round(v / 2**30, 4) for k, v in rec.items()},
            "forward_act_gib": round((rec["forward_peak"] - rec["start_alloc"]) / 2**30, 4),
            "sampler_act_gib": round((rec["peak"] - rec["sampler_start_alloc"]) / 2**30, 4),
            "logits_gib": round((rec["sampler_start_alloc"] - rec["start_alloc"]) / 2**30, 4),
            "profile_act_gib": round((rec["peak"] - rec["start_alloc"]) / 2**30, 4),
            "non_torch_after_release_gib": round((tot - free2 - torch.cuda.memory_reserved(dev))
                                                 / 2**30, 4),
            "plan_weights_gib": round(mb.weights_bytes / 2**30, 4),
            "plan_buffers_gib": round(mb.buffer_bytes / 2**30, 4),
            "plan_activation_gib": round(mb.activation_bytes / 2**30, 4),
            "plan_non_torch_gib": round(mb.non_torch_bytes / 2**30, 4),
        }
        print(json.dumps(row), flush=True)
        out.append(row)
    if args.out:
        with open(args.out, "a") as f:
            for r in out:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
