"""Quantized models through the engine: LLM(...), prompt-logprob perplexity, the eval CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir, run_one_sequence
from modelport import LLM, SamplingParams
from modelport.config import LoadConfig
from modelport.entrypoints.cli import main as cli_main
from modelport.loader import load_model, load_model_config, resolve_model
from modelport.quantization.tools.perplexity import perplexity
from modelport.quantization.tools.quantize import QuantizeOptions, quantize_model

TEXT = Path(__file__).parent / "data" / "quant_eval.txt"
KW = {"kv_cache_memory": 16 << 20, "max_model_len": 512, "device": "cpu"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qe")
    tiny = make_tiny_llama_dir(root / "hf", seed=17)
    opts = QuantizeOptions(method="gptq", bits=8, group_size=32, num_samples=4, seq_len=128,
                           zero_point=False)
    q = quantize_model(str(tiny), root / "gptq8", TEXT, opts, progress=False).output
    return tiny, q


@pytest.fixture(scope="module")
def float_llm(folders: tuple[Path, Path]) -> LLM:
    return LLM(model=str(folders[0]), **KW)


def test_perplexity_through_the_engine_matches_a_direct_forward(
    folders: tuple[Path, Path], float_llm: LLM
) -> None:
    tiny, _ = folders
    llm = float_llm
    res = perplexity(llm, TEXT.read_text(), max_length=256)
    ids = llm.get_tokenizer().encode(TEXT.read_text(), add_special_tokens=False)
    src = resolve_model(str(tiny))
    model = load_model(src, load_model_config(src), LoadConfig(), torch.float32, torch.device("cpu"))
    total, count = 0.0, 0
    for i in range(0, len(ids), 256):
        win = ids[i : i + 256]
        if len(win) < 2:
            continue
        logits = run_one_sequence(model, win)
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(win[1:]),
                                                   reduction="sum").item()
        count += len(win) - 1
    assert res.tokens == count
    assert res.perplexity == pytest.approx(math.exp(total / count), rel=1e-3)


def test_quantized_checkpoint_is_detected_and_served(
    folders: tuple[Path, Path], float_llm: LLM
) -> None:
    _, q = folders
    ppl_f = perplexity(float_llm, TEXT.read_text(), 256).perplexity
    llm = LLM(model=str(q), **KW)  # quantization_config detected, no flag needed
    core_model = llm.llm_engine.core.runner.model
    assert any(hasattr(m, "qkernel") for m in core_model.modules())
    ppl_q = perplexity(llm, TEXT.read_text(), 256).perplexity
    assert abs(ppl_q / ppl_f - 1) < 0.02, (ppl_f, ppl_q)
    out = llm.generate(["The harbour"], SamplingParams(temperature=0, max_tokens=8))
    assert len(out[0].outputs[0].token_ids) == 8


def test_engine_args_reject_wrong_quantization_early(folders: tuple[Path, Path]) -> None:
    tiny, q = folders
    with pytest.raises(ValueError, match="not a awq checkpoint"):
        LLM(model=str(tiny), quantization="awq", **KW)
    with pytest.raises(ValueError, match="is a gptq checkpoint but quantization='fp8'"):
        LLM(model=str(q), quantization="fp8", **KW)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        LLM(model=str(tiny), quantization="int3", **KW)


def test_eval_perplexity_cli(folders: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    tiny, _ = folders
    rc = cli_main(["eval", "perplexity", "--model", str(tiny), "--text", str(TEXT),
                   "--max-length", "256", "--device", "cpu", "--json"])
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0
    res = json.loads(out)
    assert res["tokens"] > 2000 and res["perplexity"] > 1
    assert cli_main(["eval", "perplexity", "--model", str(tiny), "--text", "/nonexistent.txt"]) == 2
