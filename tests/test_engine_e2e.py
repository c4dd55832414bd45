"""The whole engine on CPU against HF transformers, with tiny random models built here."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir, make_tiny_qwen2_dir
from modelport import LLM, SamplingParams

PROMPTS = [
    [256, 10, 20, 30],
    [256] + list(range(40, 77)),  # 38 tokens: spans several blocks and prefill chunks
    [256, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [256, 99],
]
KV_MEM = 8 << 20


def hf_greedy(model_dir, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 local_files_only=True).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_llama_dir(tmp_path_factory.mktemp("llama") / "m")


@pytest.fixture(scope="module")
def llama(llama_dir):
    # a 16-token budget forces the longer prompts through several prefill chunks
    return LLM(str(llama_dir), kv_cache_memory=KV_MEM, max_num_batched_tokens=16, block_size=8)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)


def test_llama_greedy_matches_hf_with_chunked_prefill(llama, llama_dir) -> None:
    outs = llama.generate(prompt_token_ids=PROMPTS, sampling_params=greedy(10), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(llama_dir, prompt, 10)
        assert out.outputs[0].finish_reason == "length"


def test_eager_block_tables_have_a_width_of_whole_16s(llama, llama_dir, monkeypatch) -> None:
    # the Triton kernels specialize on divisibility by 16 of the table stride: a width that
    # followed the longest context would compile new kernel variants mid-run
    from modelport.runner import model_runner

    widths = []
    real = model_runner.AttentionMetadata

    def recording(**kw):
        widths.append((kw["block_tables"].shape[1], kw["max_seq_len"]))
        return real(**kw)

    monkeypatch.setattr(model_runner, "AttentionMetadata", recording)
    outs = llama.generate(prompt_token_ids=PROMPTS[1:2], sampling_params=greedy(4),
                          use_tqdm=False)
    assert outs[0].outputs[0].token_ids == hf_greedy(llama_dir, PROMPTS[1], 4)
    assert widths and all(w % 16 == 0 and w * 8 >= n for w, n in widths)


def test_qwen2_greedy_matches_hf(tmp_path) -> None:
    d = make_tiny_qwen2_dir(tmp_path / "q")
    llm = LLM(str(d), kv_cache_memory=KV_MEM, max_num_batched_tokens=24, block_size=8)
    outs = llm.generate(prompt_token_ids=PROMPTS[:3], sampling_params=greedy(8), use_tqdm=False)
    for prompt, out in zip(PROMPTS[:3], outs):
        assert out.outputs[0].token_ids == hf_greedy(d, prompt, 8)


def test_preemption_gives_same_greedy_output(llama_dir) -> None:
    # 6 blocks of 8 tokens: four ~20-token requests growing to ~44 tokens cannot all fit
    prompts = [[256] + [(7 * i + j) % 250 for j in range(19)] for i in range(4)]
    roomy = LLM(str(llama_dir), kv_cache_memory=KV_MEM, block_size=8)
    want = roomy.generate(prompt_token_ids=prompts, sampling_params=greedy(24), use_tqdm=False)
    per_block = 8 * 2 * 2 * 2 * 16 * 4  # tokens x (K,V) x layers x kv_heads x head_dim x fp32
    tight = LLM(str(llama_dir), kv_cache_memory=6 * per_block, block_size=8, max_model_len=48)
    assert tight.llm_engine.num_kv_blocks == 6
    got = tight.generate(prompt_token_ids=prompts, sampling_params=greedy(24), use_tqdm=False)
    assert tight.llm_engine.core.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert tight.llm_engine.core.kv.num_free_blocks == 6


def test_prefix_cache_hit_reuses_blocks_and_keeps_output(llama) -> None:
    prompt = [256] + list(range(100, 140))
    first = llama.generate(prompt_token_ids=[prompt], sampling_params=greedy(5), use_tqdm=False)[0]
    second = llama.generate(prompt_token_ids=[prompt], sampling_params=greedy(5), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 40  # 5 full blocks of 8; the last token is recomputed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids


def test_seeded_sampling_reproducible_and_batch_independent(llama) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llama.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p, use_tqdm=False)[0]
    again = llama.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p, use_tqdm=False)[0]
    others = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    mixed = llama.generate(prompt_token_ids=[PROMPTS[1], PROMPTS[0], PROMPTS[2]],
                           sampling_params=[others, p, others], use_tqdm=False)[1]
    assert alone.outputs[0].token_ids == again.outputs[0].token_ids == mixed.outputs[0].token_ids
    other_seed = SamplingParams(temperature=1.0, seed=99, max_tokens=12, ignore_eos=True)
    diff = llama.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=other_seed, use_tqdm=False)[0]
    assert diff.outputs[0].token_ids != alone.outputs[0].token_ids


def test_n_greater_than_one(llama) -> None:
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    out = llama.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=p, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


@pytest.mark.parametrize("lm_head_rows", [None, 3])  # 3: a step's prompt rows in pieces
def test_logprobs_and_prompt_logprobs_match_hf(llama, llama_dir, lm_head_rows, monkeypatch) -> None:
    from helpers.tiny_models import hf_reference_logits
    from modelport.runner import model_runner

    if lm_head_rows is not None:
        monkeypatch.setattr(model_runner, "PROMPT_LOGPROB_ROWS", lm_head_rows)
    prompt = PROMPTS[2]
    assert len(prompt) > 2 * 3
    p = greedy(3, logprobs=2, prompt_logprobs=1)
    out = llama.generate(prompt_token_ids=[prompt], sampling_params=p, use_tqdm=False)[0]
    ref = hf_reference_logits(llama_dir, prompt + out.outputs[0].token_ids).log_softmax(-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        lp = out.prompt_logprobs[i][prompt[i]].logprob
        assert abs(lp - float(ref[i - 1, prompt[i]])) < 1e-3
    c = out.outputs[0]
    for j, tok in enumerate(c.token_ids):
        pos = len(prompt) - 1 + j
        entry = c.logprobs[j]
        assert abs(entry[tok].logprob - float(ref[pos, tok])) < 1e-3
        assert entry[tok].rank == 1  # greedy picks the top token
        assert len(entry) == 2 or len(entry) == 3  # chosen + top-2 (chosen may be among them)
    assert abs(c.cumulative_logprob - sum(c.logprobs[j][t].logprob for j, t in enumerate(c.token_ids))) < 1e-5


def test_stop_token_ids_min_tokens_and_max_tokens(llama) -> None:
    base = llama.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(8), use_tqdm=False)[0]
    toks = base.outputs[0].token_ids
    stop_at = toks[3]
    first = toks.index(stop_at)
    out = llama.generate(prompt_token_ids=[PROMPTS[0]],
                         sampling_params=greedy(8, stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == toks[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at


def test_stop_string_truncates_text(llama) -> None:
    base = llama.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(8), use_tqdm=False)[0]
    text = base.outputs[0].text
    if len(text) < 4:
        pytest.fail(f"tiny model produced too little text to test stop strings: {text!r}")
    stop = text[2:4]
    out = llama.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(8, stop=[stop]),
                         use_tqdm=False)[0]
    assert out.outputs[0].text == text[: text.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop


def test_bad_input_is_a_clear_error_and_engine_keeps_serving(llama, tmp_path) -> None:
    with pytest.raises(ValueError, match="is longer than the maximum model length of 512"):
        llama.generate(prompt_token_ids=[[256] * 513], sampling_params=greedy(2), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 259\)"):
        llama.generate(prompt_token_ids=[[256, 100000]], sampling_params=greedy(2), use_tqdm=False)
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "nope"))
    ok = llama.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=greedy(3), use_tqdm=False)
    assert len(ok[0].outputs[0].token_ids) == 3
    assert not llama.llm_engine.has_unfinished_requests()
    llama.llm_engine.core.kv.check_integrity()


def test_unsupported_architecture(tmp_path) -> None:
    import json

    d = make_tiny_llama_dir(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MadeUpForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(d), kv_cache_memory=KV_MEM)


def test_text_prompts_and_chat(llama) -> None:
    out = llama.generate(["héllo wörld 🙂"], greedy(6), use_tqdm=False)[0]
    tok = llama.get_tokenizer()
    assert out.prompt_token_ids == tok.encode("héllo wörld 🙂")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)
    chat = llama.chat([{"role": "user", "content": "hi"}], greedy(4), use_tqdm=False)[0]
    assert tok.decode(chat.prompt_token_ids, skip_special_tokens=False).endswith("assistant\n")
