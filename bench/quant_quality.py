"""Quality table: size on disk and perplexity of SmolLM2-135M-Instruct in each format.

The float source is the embedded default GGUF dequantized by our loader (its on-disk cache)
plus the tokenizer the loader extracted, written as an HF folder; `modelport quantize` then
makes AWQ / GPTQ / FP8 checkpoints from it (calibration text: --calib, by default this repo's
README.md and docs, i.e. not the evaluation text; or --calib-from-model N, text the model
writes itself, as `modelport quantize --calib-from-model` does), and every variant is scored
through the engine's prompt logprobs on tests/data/quant_eval.txt. GGUF Q4_1 is scored both kept
quantized (--quantization gguf) and dequantized. NF4 is written in bitsandbytes' layout by
our encoder (no calibration: absmax scaling and the nearest NF4 code). Two baselines, plain
round-to-nearest at 4 bits in groups of 64 (no calibration), are written in the AWQ layout
(with zero points) and the GPTQ layout (symmetric), so each calibrated method can be read
against the rounding it refines. AWQ and GPTQ also score every layer on the evaluation text's
inputs beside that rounding (`--reference-text`; the quantization itself never sees the text):
the "layers worse than RTN" column counts where the calibrated weights lost to plain rounding.

    .venv/bin/python bench/quant_quality.py [--calib FILE | --calib-from-model N] [--work DIR]
        [--json out.json] [--skip WORD ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "tests" / "data" / "quant_eval.txt"


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def float_folder(work: Path) -> Path:
    """An HF folder (config, float32 safetensors, tokenizer) of the default model."""
    from modelport import LLM
    from modelport.loader import default_model_path, gguf_cache_folder
    from modelport.loader.cache import entry_dir

    # the dequantized path writes the fp32 cache (the default keeps Q4_1 blocks instead)
    LLM(max_model_len=512, kv_cache_memory=64 << 20, device="cpu", quantization="none")
    gguf = default_model_path()
    cached = gguf_cache_folder(gguf)
    tok = entry_dir(gguf, "gguf-tokenizer")
    out = work / "smollm2-f32"
    out.mkdir(parents=True, exist_ok=True)
    for f in [*cached.iterdir(), *tok.iterdir()]:
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def nf4_folder(src: Path, out: Path) -> Path:
    """A bitsandbytes NF4 checkpoint (blocks of 64, double quant; bnb's layout, written by
    ``nf4_encode``: nearest code of the NF4 book after absmax scaling, as bnb quantizes)."""
    from safetensors.torch import load_file

    from modelport.quantization.nf4 import NF4Config, nf4_encode
    from modelport.quantization.tools.writer import is_quantizable, write_checkpoint

    if (out / "config.json").is_file():
        return out
    tensors: dict = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, w in load_file(str(f)).items():
            if is_quantizable(name):
                pieces = nf4_encode(w, 64, True)
                tensors.update({f"{name}{'.' + k if k else ''}": v for k, v in pieces.items()})
            else:
                tensors[name] = w
    return write_checkpoint(src, out, tensors, NF4Config(double_quant=True))  # floats: fp16


def rtn_folder(src: Path, out: Path, sym: bool, group: int = 64) -> Path:
    """Round-to-nearest 4-bit weights in groups of ``group``: the AWQ layout with zero points,
    or the GPTQ layout when symmetric. No calibration: the baseline AWQ and GPTQ refine."""
    from safetensors.torch import load_file

    from modelport.quantization.awq import AWQConfig, pack_awq
    from modelport.quantization.gptq import GPTQConfig, pack_gptq
    from modelport.quantization.tools.rtn import rtn_quantize
    from modelport.quantization.tools.writer import is_quantizable, write_checkpoint

    if (out / "config.json").is_file():
        return out
    tensors: dict = {}
    for f in sorted(src.glob("*.safetensors")):
        for name, w in load_file(str(f)).items():
            if not is_quantizable(name):
                tensors[name] = w
                continue
            codes, zeros, scales = rtn_quantize(w.float(), 4, group, sym)
            pieces = pack_gptq(codes, zeros, scales, 4, group_size=group) if sym else pack_awq(codes, zeros, scales)
            prefix = name.removesuffix(".weight")
            tensors.update({f"{prefix}.{k}": v for k, v in pieces.items()})
    cfg = (GPTQConfig(bits=4, group_size=group, sym=True, true_sequential=False) if sym
           else AWQConfig(bits=4, group_size=group, zero_point=True))
    return write_checkpoint(src, out, tensors, cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=Path, default=None)
    ap.add_argument("--calib-from-model", type=int, default=0, metavar="N",
                    help="calibrate AWQ / GPTQ on N texts of up to 512 tokens written by the "
                         "float model itself (generated once, saved as WORK/calib_from_model.jsonl)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", nargs="*", default=[],
                    help="labels' first words to leave out, e.g. GPTQ-W8 as 'W8'")
    args = ap.parse_args()
    from modelport import LLM
    from modelport.loader import default_model_path
    from modelport.quantization.tools.perplexity import perplexity
    from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model

    work = args.work or Path(tempfile.mkdtemp(prefix="quantq-"))
    work.mkdir(parents=True, exist_ok=True)
    calib = args.calib
    if calib is None:
        calib = work / "calib.txt"
        docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
        calib.write_text("\n\n".join(p.read_text() for p in docs if p.is_file()))
    src = float_folder(work)
    if args.calib_from_model:
        from modelport.quantization.tools.selfcalib import generate_calibration

        calib = work / "calib_from_model.jsonl"
        if not calib.is_file():
            t0 = time.perf_counter()
            texts = generate_calibration(str(src), args.calib_from_model, 512)
            calib.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            print(f"calibration from the model: {len(texts)} texts in {time.perf_counter() - t0:.0f} s")
    text = TEXT.read_text()
    variants: list[tuple[str, str, str | None, Path]] = [
        ("fp32 (GGUF dequantized)", str(src), None, src),
        ("GGUF Q4_1 kept quantized", str(default_model_path()), "gguf", default_model_path()),
    ]
    if "RTN" not in args.skip:
        for label, sym in [("RTN W4 g64 zero-point (AWQ layout)", False),
                           ("RTN W4 g64 symmetric (GPTQ layout)", True)]:
            folder = rtn_folder(src, work / ("rtn-sym" if sym else "rtn-asym"), sym)
            variants.append((label, str(folder), None, folder))
    worse: dict[str, str] = {}  # label -> "n of m" layers worse than RTN on the eval text
    for label, opts in [
        ("AWQ W4 g64", QuantizeOptions("awq", 4, 64, reference_text=TEXT)),
        ("GPTQ W4 g64 act-order", QuantizeOptions("gptq", 4, 64, desc_act=True, zero_point=False,
                                                  reference_text=TEXT)),
        ("GPTQ W4 g64 act-order zero-point", QuantizeOptions("gptq", 4, 64, desc_act=True,
                                                             reference_text=TEXT)),
        # AutoGPTQ's Hessian: massive-activation tokens counted at their full length
        ("GPTQ W4 g64 act-order zero-point uncapped", QuantizeOptions(
            "gptq", 4, 64, desc_act=True, reference_text=TEXT, hessian_row_clip=0)),
        ("GPTQ W8 g64", QuantizeOptions("gptq", 8, 64, zero_point=False)),
        ("FP8 E4M3 per-channel", QuantizeOptions("fp8")),
    ]:
        if any(word in label.split() for word in args.skip):
            continue
        folder = work / label.split()[0].lower() / (
            f"{opts.bits}{'' if opts.zero_point else 'sym'}{'' if opts.hessian_row_clip else '-uncapped'}")
        report = folder / "quantization_report.json"
        if not (folder / "config.json").is_file():  # re-runs reuse finished checkpoints
            t0 = time.perf_counter()
            rep = quantize_model(str(src), folder, calib if opts.method != "fp8" else None, opts)
            print(f"{label}: quantized in {time.perf_counter() - t0:.0f} s; warnings: {rep.warnings}")
        ref = json.loads(report.read_text()).get("reference_relative_output_error") if report.is_file() else None
        if ref:
            n = sum(e["quantized"] > 1.05 * e["round_to_nearest"] for e in ref.values())
            worse[label] = f"{n} of {len(ref)}"
        variants.append((label, str(folder), None, folder))
    if "NF4" not in args.skip:
        nf4 = nf4_folder(src, work / "nf4")
        variants.append(("NF4 (bitsandbytes layout) b64 double-quant", str(nf4), None, nf4))
    rows = []
    base = None
    for label, model, q, path in variants:
        llm = LLM(model=model, quantization=q, max_model_len=512, kv_cache_memory=64 << 20,
                  device="cpu")
        ppl = perplexity(llm, text, 512).perplexity
        base = base or ppl
        rows.append({"format": label, "size_mb": round(_size(path) / 2**20, 1),
                     "perplexity": round(ppl, 3), "vs_fp32": f"{100 * (ppl / base - 1):+.2f}%"})
        if label in worse:
            rows[-1]["layers_worse_than_rtn_on_text"] = worse[label]
        print(rows[-1])
        del llm
    out = {"text": str(TEXT.relative_to(ROOT)), "rows": rows}
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
