"""bench/quant_decode.py (decode tok/s per weight format at several batch sizes) on CPU with a
tiny model: one JSON line per (format, batch), packed formats smaller than the float model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from helpers.tiny_models import make_tiny_llama_dir

SCRIPT = Path(__file__).parents[1] / "bench" / "quant_decode.py"


def _script():  # noqa: ANN202 - bench/ is not a package
    spec = importlib.util.spec_from_file_location("quant_decode", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_row_per_format_and_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPORT_DUMMY_GGUF_TYPE", "Q8_0")  # restored after (the script sets it)
    model = make_tiny_llama_dir(tmp_path / "m", hidden_size=128, intermediate_size=256,
                                with_tokenizer=False)
    out = tmp_path / "r.jsonl"
    rc = _script().main(["--model", str(model), "--device", "cpu", "--dtype", "float32",
                         "--formats", "none", "fp8", "awq", "gguf-q8_0", "--batch-sizes", "1", "3",
                         "--input-len", "8", "--output-len", "4", "--num-iters", "1",
                         "--num-iters-warmup", "0", "--output-json", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["format"], r["batch"]) for r in rows] == [
        (f, b) for f in ("none", "fp8", "awq", "gguf-q8_0") for b in (1, 3)]
    for r in rows:
        assert r["decode_tok_s"] > 0 and r["itl_ms"] > 0 and r["workload"]["output_len"] == 4
        assert abs(r["decode_tok_s"] - r["batch"] * 1e3 / r["itl_ms"]) / r["decode_tok_s"] < 0.01
    size = {r["format"]: r["weights_mb"] for r in rows}
    assert size["fp8"] < size["none"] and size["awq"] < size["none"]
    assert size["gguf-q8_0"] < size["none"]
