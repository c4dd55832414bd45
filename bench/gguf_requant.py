"""Rewrite a GGUF file with its linear weights in another GGML type (for the CPU benches).

The embedded default model is the only GGUF on a box without a hub; this makes a Q8_0 (or
Q5_0 / Q5_1 / Q4_0: the types gguf-py can write) copy of it, metadata and tokenizer kept,
every blk.*.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}.weight dequantized
and quantized again, other tensors copied as they are.

    .venv/bin/python bench/gguf_requant.py --type Q8_0 --out /tmp/smollm2-q8_0.gguf [--model F]
        [--only attn_v ffn_down]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


def requantize(src: Path, out: Path, type_name: str, only: tuple[str, ...] = ()) -> Path:
    """``only``: requantize just the linear weights whose name holds one of these (e.g.
    ("attn_v", "ffn_down") for a Q4_K_M-like mix of the default model)."""
    import gguf

    target = gguf.GGMLQuantizationType[type_name]
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch=arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        if (LINEAR.search(t.name) and t.tensor_type != target
                and (not only or any(o in t.name for o in only))):
            dense = gguf.quants.dequantize(t.data, t.tensor_type)
            writer.add_tensor(t.name, gguf.quants.quantize(dense, target), raw_dtype=target)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--type", default="Q8_0")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded model")
    ap.add_argument("--only", nargs="*", default=(),
                    help="only linear weights whose name holds one of these, e.g. attn_v ffn_down")
    args = ap.parse_args()
    if args.model is None:
        from modelport.loader import default_model_path

        args.model = default_model_path()
    print(requantize(args.model, args.out, args.type, tuple(args.only)))


if __name__ == "__main__":
    main()
