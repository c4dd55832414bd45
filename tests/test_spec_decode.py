"""Speculative decoding by n-gram prompt lookup: proposals, the verify rule, the engine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch

from helpers.tiny_models import make_tiny_llama_dir
from modelport import LLM, SamplingParams
from modelport.config import SpeculativeConfig
from modelport.engine.arg_utils import EngineArgs
from modelport.engine.ngram import propose
from modelport.runner.spec_verify import accepted_tokens, verify

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
# greedy decoding of this tiny random model falls into loops on these: drafts get accepted
PROMPTS = ["abcabcabcabc", "the cat sat on the mat, the cat sat on the", "0101010101"]


def test_ngram_proposes_what_followed_the_latest_match() -> None:
    assert propose([1, 2, 3, 4, 1, 2, 3], 3, 4, 1) == [4, 1, 2]
    assert propose([7, 1, 2, 9, 1, 2, 5, 1, 2], 2, 2, 1) == [5, 1]  # the latest of two matches
    assert propose([1, 2, 3, 9, 8, 2, 3], 2, 3, 1) == [9, 8]  # longest suffix first: [2, 3]
    assert propose([5, 6, 7], 3, 4, 1) == []  # nothing repeats
    assert propose([1, 2, 1, 2, 1, 2], 5, 4, 1) == [1, 2]  # only what is there to copy
    assert propose([4, 4], 3, 2, 2) == []  # shorter than min_n + 1
    assert propose([1, 2, 3, 1], 0, 4, 1) == []


def test_ngram_lookup_bounds_default_as_in_vllm() -> None:
    """vLLM: neither bound -> both 5; one bound -> the other takes its value."""
    def bounds(**kw):
        c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, **kw})
        return c.prompt_lookup_min, c.prompt_lookup_max

    assert bounds() == (5, 5)
    assert bounds(prompt_lookup_max=4) == (4, 4)
    assert bounds(prompt_lookup_min=2) == (2, 2)
    assert bounds(prompt_lookup_min=1, prompt_lookup_max=4) == (1, 4)
    assert bounds(prompt_lookup_max=None, prompt_lookup_min=None) == (5, 5)  # JSON null
    c = SpeculativeConfig(num_speculative_tokens=2)
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (5, 5)
    with pytest.raises(ValueError, match="prompt_lookup_max must be >= 1"):
        SpeculativeConfig.from_dict({"num_speculative_tokens": 2, "prompt_lookup_max": 0})


def test_vllm_speculative_keys_accepted_or_refused_by_name() -> None:
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    c = SpeculativeConfig.from_dict({
        **ngram, "draft_tensor_parallel_size": 1, "quantization": "fp8", "max_model_len": 64,
        "revision": "main", "disable_padded_drafter_batch": True, "enforce_eager": True,
        "rejection_sample_method": "standard", "draft_sample_method": "greedy",
        "suffix_decoding_max_tree_depth": 24, "disable_by_batch_size": 8,
    })
    assert (c.method, c.prompt_lookup_max, c.disable_by_batch_size) == ("ngram", 3, 8)
    assert SpeculativeConfig.from_dict({"model": "[ngram]", "num_speculative_tokens": 2}).method \
        == "ngram"
    d = SpeculativeConfig.from_dict({"model": "some/draft", "num_speculative_tokens": 4,
                                     "draft_tensor_parallel_size": 1, "revision": "main",
                                     "quantization": None})
    assert (d.method, d.draft_tensor_parallel_size) == ("draft_model", 1)
    draft = {"model": "some/draft", "num_speculative_tokens": 4}
    for bad, match in [
        ({**draft, "draft_tensor_parallel_size": 2}, "draft_tensor_parallel_size must be 1"),
        ({**draft, "quantization": "fp8"}, "quantization='fp8' is not supported"),
        ({**ngram, "tensor_parallel_size": 1}, "draft_tensor_parallel_size"),
        ({**ngram, "rejection_sample_method": "synthetic"}, "rejection_sample_method"),
        ({**ngram, "use_heterogeneous_vocab": True}, "use_heterogeneous_vocab"),
        ({**ngram, "draft_tensor_parallel_size": 0}, "draft_tensor_parallel_size must be >= 1"),
        ({**ngram, "disable_padded_drafter_batch": "yes"}, "wrong type"),
        ({**ngram, "draft_tensor_parallel_sizes": 1}, "unknown keys"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict(bad)


def test_draft_max_model_len_is_checked_against_the_lengths(tmp_path: Path) -> None:
    tiny = make_tiny_llama_dir(tmp_path / "tiny")
    kw = dict(model=str(tiny), max_model_len=64)
    spec = {"model": str(tiny), "num_speculative_tokens": 2}
    args = EngineArgs(**kw, speculative_config={**spec, "max_model_len": 64})
    assert args.create_engine_config().speculative_config.max_model_len == 64
    for value, match in [(32, "below max_model_len"), (10**6, "cannot be larger")]:
        args = EngineArgs(**kw, speculative_config={**spec, "max_model_len": value})
        with pytest.raises(ValueError, match=match):
            args.create_engine_config()


def test_speculative_config_from_vllm_dict_and_its_errors() -> None:
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5,
                                     "prompt_lookup_max": 3})
    assert (c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min) == (5, 3, 3)
    for bad, match in [
        ({"method": "ngram", "model": "some/draft", "num_speculative_tokens": 4}, "takes no model"),
        ({"method": "draft_model", "num_speculative_tokens": 4}, "needs method"),
        ({"model": 3, "num_speculative_tokens": 4}, "model path"),
        ({"method": "eagle", "num_speculative_tokens": 4}, "needs method"),
        ({"method": "eagle3", "num_speculative_tokens": 4}, "needs method"),
        ({"method": "medusa", "model": "some/head", "num_speculative_tokens": 4}, "not supported"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, r"\[1, 16\]"),
        ({"num_speculative_tokens": "4"}, "must be an integer"),
        ({"num_speculative_tokens": 4, "prompt_lookup_min": 5, "prompt_lookup_max": 4},
         "prompt_lookup_min"),
        ({"num_speculative_tokens": 4, "typo": 1}, "unknown keys"),
        ({"num_speculative_tokens": 4, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.from_dict(bad)
    d = SpeculativeConfig.from_dict({"model": "some/draft", "num_speculative_tokens": 4})
    assert (d.method, d.model) == ("draft_model", "some/draft")
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert EngineArgs.from_cli_args(args).speculative_config == {"method": "ngram",
                                                                 "num_speculative_tokens": 2}
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", "[1, 2]"])


def test_greedy_verify_keeps_drafts_up_to_the_first_miss() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, tok in enumerate([3, 7, 1, 4]):
        logits[row, tok] = 5.0
    p = SamplingParams(temperature=0)
    assert accepted_tokens(verify(logits, [3, 7, 1], p, None).tolist(), [3, 7, 1]) == [3, 7, 1, 4]
    assert accepted_tokens(verify(logits, [3, 2, 1], p, None).tolist(), [3, 2, 1]) == [3, 7]
    assert accepted_tokens(verify(logits, [0, 7, 1], p, None).tolist(), [0, 7, 1]) == [3]


def test_speculative_sampling_emits_the_models_distribution() -> None:
    """The first token a sampled request emits is distributed as p (after temperature and
    top-k) whatever the draft: a likely draft, an unlikely one, one that top-k removes."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0], [0.0] * 6])
    gen = torch.Generator().manual_seed(0)
    trials = 1500
    for params, expected, drafts in [
        (SamplingParams(temperature=0.8, seed=1), (logits[0] / 0.8).softmax(-1), (5, 3)),
        (SamplingParams(temperature=1.0, top_k=3, seed=1),
         torch.where(logits[0] >= 1.0, logits[0], -torch.inf).softmax(-1), (0, 4)),
    ]:
        for draft in drafts:
            counts = torch.zeros(6)
            for _ in range(trials):
                first = accepted_tokens(verify(logits, [draft], params, gen).tolist(), [draft])[0]
                counts[first] += 1
            err = (counts / trials - expected).abs().max().item()
            assert err < 0.045, (params, draft, counts / trials, expected)  # 3.5 sigma at p = 0.5
            if expected[draft] == 0:
                assert counts[draft] == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("spec") / "hf", seed=3)


def _llm(tiny: Path, spec: dict | None) -> LLM:
    return LLM(model=str(tiny), device="cpu", max_model_len=256, kv_cache_memory=8 << 20,
               speculative_config=spec)


def test_greedy_outputs_equal_plain_decoding(tiny: Path) -> None:
    """Same tokens as without speculation, in a batch that mixes speculating requests with one
    that cannot speculate (logprobs need every token's distribution) and with stops inside
    an accepted run of drafts (max_tokens, a stop token)."""
    params = [SamplingParams(max_tokens=30, temperature=0),
              SamplingParams(max_tokens=7, temperature=0),
              SamplingParams(max_tokens=30, temperature=0, logprobs=2)]
    plain = _llm(tiny, None).generate(PROMPTS, params, use_tqdm=False)
    spec_llm = _llm(tiny, SPEC)
    spec = spec_llm.generate(PROMPTS, params, use_tqdm=False)
    for a, b in zip(plain, spec):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert len(spec[1].outputs[0].token_ids) == 7
    lp_plain, lp_spec = plain[2].outputs[0].logprobs, spec[2].outputs[0].logprobs
    assert [sorted(x) for x in lp_plain] == [sorted(x) for x in lp_spec]
    stats = spec_llm.llm_engine.core.get_stats()
    assert stats.spec_num_draft_tokens >= 10 and stats.spec_num_accepted_tokens >= 5  # 15, 14
    assert stats.spec_num_accepted_tokens <= stats.spec_num_draft_tokens
    # more running requests than disable_by_batch_size: no drafts, the same tokens
    busy = _llm(tiny, {**SPEC, "disable_by_batch_size": 2})
    assert [o.outputs[0].token_ids for o in busy.generate(PROMPTS, params, use_tqdm=False)] == [
        o.outputs[0].token_ids for o in plain]
    assert busy.llm_engine.core.get_stats().spec_num_draft_tokens < stats.spec_num_draft_tokens
    # a stop token in the middle of accepted drafts ends the output there
    stopped = spec_llm.generate(PROMPTS[1:2], SamplingParams(max_tokens=30, temperature=0,
                                stop_token_ids=[plain[1].outputs[0].token_ids[5]]), use_tqdm=False)
    ref = _llm(tiny, None).generate(PROMPTS[1:2], SamplingParams(max_tokens=30, temperature=0,
                                    stop_token_ids=[plain[1].outputs[0].token_ids[5]]), use_tqdm=False)
    assert stopped[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert stopped[0].outputs[0].finish_reason == "stop"


def test_stop_string_inside_a_multi_token_step(tiny: Path) -> None:
    """A stop string completed by a token in the middle of a speculative step cuts the text
    and the token ids there, as decoding one token at a time does."""
    plain = _llm(tiny, None).generate(PROMPTS[1:2], SamplingParams(max_tokens=30, temperature=0),
                                      use_tqdm=False)[0].outputs[0]
    stop = plain.text[10:12]  # two bytes of the repeating loop
    p = SamplingParams(max_tokens=30, temperature=0, stop=[stop])
    a = _llm(tiny, None).generate(PROMPTS[1:2], p, use_tqdm=False)[0].outputs[0]
    b = _llm(tiny, SPEC).generate(PROMPTS[1:2], p, use_tqdm=False)[0].outputs[0]
    assert stop not in b.text and b.finish_reason == "stop" and b.stop_reason == stop
    assert (b.text, b.token_ids) == (a.text, a.token_ids)


@pytest.mark.parametrize("draft_model", [False, True])
def test_seeded_sampling_with_speculation_is_reproducible(tiny: Path, draft_model: bool) -> None:
    llm = _llm(tiny, {"model": str(tiny), "num_speculative_tokens": 3} if draft_model else SPEC)
    p = SamplingParams(max_tokens=24, temperature=0.7, seed=123)
    first = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p, use_tqdm=False)]
    again = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p, use_tqdm=False)]
    assert first == again and all(len(t) == 24 for t in first)
    assert llm.llm_engine.core.get_stats().spec_num_draft_tokens > 0


def test_server_with_speculative_config(tiny: Path, tmp_path: Path) -> None:
    """`modelport serve --speculative-config ...`: streamed and whole completions equal plain
    offline decoding, and /metrics counts the drafts."""
    import json

    import httpx

    from helpers.server_proc import start_server, stop_server

    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", str(tiny),
            "--served-model-name", "tiny", "--max-model-len", "256", "--kv-cache-memory", "8MiB",
            "--speculative-config", json.dumps(SPEC)]
    proc, url = start_server(argv, tmp_path / "server.log", timeout=180)
    try:
        want = _llm(tiny, None).generate(PROMPTS[1:2], SamplingParams(max_tokens=24, temperature=0),
                                         use_tqdm=False)[0].outputs[0].text
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 24, "temperature": 0}
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == want
        assert r.json()["usage"]["completion_tokens"] == 24
        with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        drafts = [float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("modelport:spec_decode_num_draft_tokens_total")]
        accepted = [float(line.split()[-1]) for line in metrics.splitlines()
                    if line.startswith("modelport:spec_decode_num_accepted_tokens_total")]
        assert drafts and drafts[0] > 0 and accepted and 0 < accepted[0] <= drafts[0]
    finally:
        stop_server(proc)


def test_scheduler_drafts_rewinds_rejected_positions_and_yields_to_plain_decoding() -> None:
    """Pure scheduler: when the cache has no room for a decoding request's drafts it decodes
    plainly instead of preempting anyone; with room it is scheduled with its n-gram drafts,
    and after the runner kept one of them only the positions holding kept tokens count as
    computed (the rejected drafts' slots are written again later)."""
    from modelport.config import SchedulerConfig
    from modelport.engine.kv_cache_manager import KVCacheManager
    from modelport.engine.request import Request
    from modelport.engine.scheduler import Scheduler, SchedulerOutput

    kv = KVCacheManager(4, 4, True)  # 16 slots
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=16),
                  kv, SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=4,
                                        prompt_lookup_min=1))
    r = Request("a", [5, 6, 7, 5, 6], SamplingParams(max_tokens=7, temperature=0))
    s.add_request(r)
    out = s.schedule()
    assert out.scheduled[0].num_tokens == 5 and out.scheduled[0].spec_token_ids == []
    s.update(out, {"a": 7})  # "5 6 7 5 6 7": drafts would be "5 6 7" (after the first "5 6 7")
    other = Request("x", [1] * 8, SamplingParams(max_tokens=1))
    assert kv.allocate_slots(other, 8) is not None and kv.num_free_blocks == 0  # cache held
    out = s.schedule()
    (x,) = out.scheduled
    assert (x.start, x.num_tokens, x.spec_token_ids, out.preempted_ids) == (5, 1, [], [])
    s.update(out, {"a": 5})
    kv.free(other)
    out = s.schedule()  # "5 6 7 5 6 7 5": "6 7 5" followed the first "5 6 7 5"
    (x,) = out.scheduled
    assert (x.start, x.num_tokens, x.spec_token_ids, x.sample) == (6, 4, [6, 7, 5], True)
    assert r.num_computed_tokens == 10 and len(x.block_ids) == 3
    assert s.schedule().is_empty  # nothing owed while the speculative step is out
    s.update(SchedulerOutput(scheduled=[x]), {}, {"a": [6, 9]})  # kept "6", then the model's 9
    assert r.output_token_ids == [7, 5, 6, 9] and r.num_computed_tokens == 8
    assert (s.num_draft_tokens, s.num_accepted_tokens) == (3, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_outputs_equal_plain_decoding_on_cuda(tiny: Path, dtype: str) -> None:
    """On CUDA, n-grams and a draft model (the target itself). float32 runs the torch
    attention eagerly: every token must equal plain decoding's. bfloat16 runs the Triton
    kernels with CUDA graphs for plain decode steps, and a speculative step's multi-token
    forward takes the prefill kernel, which rounds differently: the first 8 tokens must equal
    (as the bf16 engine test asks of HF), and the self-draft must keep most of its drafts."""
    kw = dict(model=str(tiny), device="cuda", dtype=dtype, max_model_len=256,
              kv_cache_memory=64 << 20)  # a fixed share: not what earlier engines left free
    p = SamplingParams(max_tokens=30, temperature=0)
    plain = [o.outputs[0].token_ids for o in LLM(**kw).generate(PROMPTS, p, use_tqdm=False)]
    for config in (SPEC, {"model": str(tiny), "num_speculative_tokens": 3}):
        llm = LLM(**kw, speculative_config=config)
        spec = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, p, use_tqdm=False)]
        if dtype == "float32":
            assert spec == plain
        else:
            assert [t[:8] for t in spec] == [t[:8] for t in plain]
        st = llm.llm_engine.core.get_stats()
        assert st.spec_num_accepted_tokens > 0
        if "model" in config:
            assert st.spec_num_accepted_tokens >= 0.8 * st.spec_num_draft_tokens
        del llm


def test_draft_model_greedy_outputs_equal_plain_decoding(tiny: Path, tmp_path: Path) -> None:
    """A draft model beside the target on the same block tables: with the target itself as
    the draft every draft is kept; with another, smaller random model few are; either way the
    greedy tokens are plain decoding's, with a logprobs request decoding plainly beside them."""
    params = [SamplingParams(max_tokens=20, temperature=0),
              SamplingParams(max_tokens=9, temperature=0),
              SamplingParams(max_tokens=20, temperature=0, logprobs=1)]
    plain = [o.outputs[0].token_ids for o in _llm(tiny, None).generate(PROMPTS, params, use_tqdm=False)]
    other = make_tiny_llama_dir(tmp_path / "draft", seed=5, num_layers=1)
    for draft, k in ((tiny, 3), (other, 2)):
        llm = _llm(tiny, {"model": str(draft), "num_speculative_tokens": k})
        outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert outs == plain, draft
        st = llm.llm_engine.core.get_stats()
        assert st.spec_num_draft_tokens > 10
        if draft == tiny:  # its own greedy continuation: every draft kept
            assert st.spec_num_accepted_tokens == st.spec_num_draft_tokens
        else:
            assert st.spec_num_accepted_tokens < st.spec_num_draft_tokens
    # its KV shares the target's blocks: fewer blocks from the same memory
    assert llm.llm_engine.core.num_kv_blocks < _llm(tiny, None).llm_engine.core.num_kv_blocks


def test_draft_model_errors(tiny: Path, tmp_path: Path) -> None:
    wide = make_tiny_llama_dir(tmp_path / "wide", seed=1, vocab_size=320)
    with pytest.raises(ValueError, match="vocabulary"):
        _llm(tiny, {"model": str(wide), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        LLM(model=str(tiny), device="cpu", tensor_parallel_size=2,
            speculative_config={"model": str(tiny), "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="speculative_config.model"):
        _llm(tiny, {"model": str(tmp_path / "missing"), "num_speculative_tokens": 2})


def test_draft_model_reach_follows_rope_scaling(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A yarn target defaults to original x factor positions: a draft that reaches fewer
    lowers that default (logged); a given longer max_model_len is refused naming the draft's
    reach; a draft with the same yarn scaling reaches the whole length and speculates."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    target = make_tiny_llama_dir(tmp_path / "t", seed=3, rope_scaling=yarn,
                                 max_position_embeddings=32)
    short = make_tiny_llama_dir(tmp_path / "short", seed=5, num_layers=1,
                                max_position_embeddings=64)
    scaled = make_tiny_llama_dir(tmp_path / "scaled", seed=5, num_layers=1, rope_scaling=yarn,
                                 max_position_embeddings=32)
    kw = dict(model=str(target), device="cpu")
    assert EngineArgs(**kw).create_engine_config().scheduler_config.max_model_len == 128
    with caplog.at_level(logging.INFO, logger="modelport.engine.arg_utils"):
        cfg = EngineArgs(**kw, speculative_config={"model": str(short),
                                                   "num_speculative_tokens": 2}
                         ).create_engine_config()
    assert cfg.scheduler_config.max_model_len == 64
    assert "max_model_len defaults to 64, the positions the draft model reaches" in caplog.text
    with pytest.raises(ValueError, match=r"the draft model reaches 64 positions, below "
                                         r"max_model_len \(128\)"):
        EngineArgs(**kw, max_model_len=128, speculative_config={
            "model": str(short), "num_speculative_tokens": 2}).create_engine_config()
    prompt = [256] + [(7 * i + 3) % 256 for i in range(59)]  # past the original 32
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    llm_kw = dict(model=str(target), device="cpu", kv_cache_memory=8 << 20)
    plain = LLM(**llm_kw).generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    llm = LLM(**llm_kw, speculative_config={"model": str(scaled), "num_speculative_tokens": 2})
    assert llm.llm_engine.config.scheduler_config.max_model_len == 128
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    assert out[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert llm.llm_engine.core.get_stats().spec_num_draft_tokens > 0
