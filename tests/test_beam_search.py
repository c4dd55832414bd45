"""LLM.beam_search() as vLLM's: BeamSearchParams, BeamSearchOutput / BeamSearchSequence, the
length-penalised score, EOS ending a beam, on tiny random Llamas (max_model_len 64).

One model is as built; in the other the EOS row of lm_head is a scaled copy of the row of the
first greedy token, so EOS is a likely candidate and beams end early."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from helpers.tiny_models import hf_reference_logits, make_tiny_llama_dir
from modelport import LLM, BeamSearchParams, SamplingParams
from modelport.beam_search import BeamSearchOutput, BeamSearchSequence, get_beam_search_score
from modelport.sampling_params import BeamSearchParams as BeamSearchParamsFromModule

EOS = 257
PROMPT = "hello"
PROMPT_IDS = list(PROMPT.encode())  # the byte-level tiny tokenizer: one id per byte


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    out = make_tiny_llama_dir(tmp_path_factory.mktemp("beam") / "tiny")
    # a random tiny model's next-token distribution is nearly flat (every logprob ~ -5.5), so
    # beams tie to float rounding, which depends on how a step's rows were batched (a server's
    # timing): a sharper head keeps the beams' order decided by the model, not by rounding
    w = load_file(str(out / "model.safetensors"))
    w["lm_head.weight"] = w["lm_head.weight"] * 4
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_model_len=64, kv_cache_memory=8 << 20)


@pytest.fixture(scope="module")
def eos_dir(model_dir, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("beam_eos") / "tiny"
    shutil.copytree(model_dir, out)
    first = int(hf_reference_logits(model_dir, PROMPT_IDS)[-1].argmax())
    w = load_file(str(out / "model.safetensors"))
    w["lm_head.weight"][EOS] = 1.5 * w["lm_head.weight"][first]
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def eos_llm(eos_dir):
    return LLM(str(eos_dir), max_model_len=64, kv_cache_memory=8 << 20)


def _score(seq: BeamSearchSequence, length_penalty: float) -> float:
    n = len(seq.tokens) - (1 if seq.tokens[-1] == EOS else 0)
    return seq.cum_logprob / n**length_penalty


def _reference_cum_logprob(model_dir, tokens: list[int], n_prompt: int) -> float:
    lp = hf_reference_logits(model_dir, tokens).log_softmax(-1)
    return float(sum(lp[i - 1, tokens[i]] for i in range(n_prompt, len(tokens))))


def test_params_exported_and_validated() -> None:
    assert BeamSearchParams is BeamSearchParamsFromModule
    p = BeamSearchParams(beam_width=2, max_tokens=4)
    assert (p.ignore_eos, p.temperature, p.length_penalty, p.include_stop_str_in_output) == (
        False, 0.0, 1.0, False)
    with pytest.raises(ValueError, match="beam_width must be an integer >= 1, got 0"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    with pytest.raises(ValueError, match="max_tokens"):
        BeamSearchParams(beam_width=2, max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="length_penalty"):
        BeamSearchParams(beam_width=2, max_tokens=4, length_penalty=float("nan"))


def test_bad_calls_are_clear_errors(llm) -> None:
    with pytest.raises(ValueError, match="takes a BeamSearchParams"):
        llm.beam_search([PROMPT], SamplingParams())
    with pytest.raises(ValueError, match="LoRA"):
        llm.beam_search([PROMPT], BeamSearchParams(beam_width=2, max_tokens=2), lora_request=1)
    # 2 * beam_width candidates are asked for as logprobs: not past max_logprobs (20)
    with pytest.raises(ValueError, match=r"2 \* beam_width = 22 logprobs .* max_logprobs \(20\)"):
        llm.beam_search([PROMPT], BeamSearchParams(beam_width=11, max_tokens=2))
    with pytest.raises(ValueError, match="maximum model length"):
        llm.beam_search([[65] * 70], BeamSearchParams(beam_width=2, max_tokens=2))


def test_beam_width_1_is_greedy(llm) -> None:
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                 logprobs=0), use_tqdm=False)[0].outputs[0]
    out = llm.beam_search([PROMPT], BeamSearchParams(beam_width=1, max_tokens=10,
                                                     ignore_eos=True))
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], BeamSearchOutput)
    (seq,) = out[0].sequences
    assert seq.tokens == PROMPT_IDS + greedy.token_ids  # vLLM: tokens hold the prompt too
    assert seq.output_token_ids == greedy.token_ids
    assert seq.cum_logprob == pytest.approx(greedy.cumulative_logprob, abs=1e-4)
    assert seq.text == PROMPT + greedy.text
    assert seq.finish_reason == "length" and len(seq.logprobs) == 10


def test_beam_width_3_sorted_scored_and_beats_greedy(llm, model_dir) -> None:
    n = 8
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True,
                                                 logprobs=0), use_tqdm=False)[0].outputs[0]
    (out,) = llm.beam_search([{"prompt": PROMPT}], BeamSearchParams(beam_width=3, max_tokens=n,
                                                                    ignore_eos=True))
    seqs = out.sequences
    assert len(seqs) == 3 and len({tuple(s.tokens) for s in seqs}) == 3
    scores = [_score(s, 1.0) for s in seqs]
    assert scores == sorted(scores, reverse=True)
    for s in seqs:
        assert len(s.output_token_ids) == n and s.finish_reason == "length"
        assert all(len(pos) >= 6 for pos in s.logprobs)  # the 2 * beam_width candidates
        ref = _reference_cum_logprob(model_dir, s.tokens, len(PROMPT_IDS))
        assert s.cum_logprob == pytest.approx(ref, abs=1e-3)
    ref_greedy = _reference_cum_logprob(model_dir, PROMPT_IDS + greedy.token_ids, len(PROMPT_IDS))
    assert seqs[0].cum_logprob >= ref_greedy - 1e-4
    assert seqs[0].cum_logprob > ref_greedy  # this model's greedy path is not the best one
    # TokensPrompt dicts, token lists, several prompts and concurrency_limit answer the same
    outs = llm.beam_search([{"prompt_token_ids": PROMPT_IDS}, PROMPT_IDS, "hi"],
                           BeamSearchParams(beam_width=3, max_tokens=n, ignore_eos=True),
                           concurrency_limit=2)
    assert [s.tokens for s in outs[0].sequences] == [s.tokens for s in seqs]
    assert [s.tokens for s in outs[1].sequences] == [s.tokens for s in seqs]
    assert outs[2].sequences[0].tokens[:2] == list(b"hi")


def test_eos_ends_a_beam(eos_llm, eos_dir) -> None:
    params = BeamSearchParams(beam_width=3, max_tokens=8)
    (out,) = eos_llm.beam_search([PROMPT], params)
    stopped = [s for s in out.sequences if s.finish_reason == "stop"]
    assert stopped
    for s in stopped:
        assert s.tokens[-1] == EOS and EOS not in s.tokens[:-1]
        assert len(s.output_token_ids) < 8
        assert s.text == eos_llm.get_tokenizer().decode(s.tokens[:-1])  # EOS left out
        ref = _reference_cum_logprob(eos_dir, s.tokens, len(PROMPT_IDS))
        assert s.cum_logprob == pytest.approx(ref, abs=1e-3)
    (kept,) = eos_llm.beam_search([PROMPT], BeamSearchParams(
        beam_width=3, max_tokens=8, include_stop_str_in_output=True))
    assert kept.sequences[0].finish_reason == "stop"
    assert kept.sequences[0].text.endswith("<|eos|>")
    (ignored,) = eos_llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=8,
                                                                ignore_eos=True))
    assert all(s.finish_reason == "length" and len(s.output_token_ids) == 8
               for s in ignored.sequences)


def test_length_penalty_changes_the_ranking_per_vllm_formula(eos_llm) -> None:
    best = {}
    for lp in (0.0, 1.0, 10.0):
        (out,) = eos_llm.beam_search([PROMPT], BeamSearchParams(beam_width=3, max_tokens=8,
                                                                length_penalty=lp))
        scores = [_score(s, lp) for s in out.sequences]
        assert scores == sorted(scores, reverse=True)
        best[lp] = out.sequences[0]
    # a short EOS-ended beam wins on cumulative logprob (lp 0) and per token (lp 1)...
    assert best[0.0].finish_reason == "stop" and best[1.0].finish_reason == "stop"
    # ...and a strong length penalty exponent favours the long beams
    assert best[10.0].finish_reason == "length" and len(best[10.0].output_token_ids) == 8


def test_score_formula() -> None:
    # cum / len ** length_penalty, len = prompt + output, a final EOS not counted
    assert get_beam_search_score([1, 2, 3, 4], -8.0, EOS, 1.0) == pytest.approx(-2.0)
    assert get_beam_search_score([1, 2, 3, EOS], -6.0, EOS, 1.0) == pytest.approx(-2.0)
    assert get_beam_search_score([1, 2, 3, 4], -8.0, EOS, 2.0) == pytest.approx(-0.5)
    assert get_beam_search_score([1, 2, 3, 4], -8.0, [EOS, 4], 0.0) == pytest.approx(-8.0)
    assert torch.isfinite(torch.tensor(get_beam_search_score([EOS], -1.0, EOS)))


# ---------------------------------------------------------------- the server's use_beam_search


@pytest.fixture(scope="module")
def base(model_dir, tmp_path_factory):
    from helpers.server_proc import serving

    log = tmp_path_factory.mktemp("beamsrv") / "server.log"
    argv = ["-m", "modelport.entrypoints.cli", "serve", "--model", "./tiny",
            "--max-model-len", "64", "--kv-cache-memory", "8MiB"]  # fmt: skip
    with serving(argv, log, timeout=180, cwd=model_dir.parent) as url:
        yield url


def _post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=120)


def _ok(r: httpx.Response) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def _token_strs(llm, ids: list[int]) -> list[str]:
    tok = llm.get_tokenizer()
    return [tok.decode([t], skip_special_tokens=False) for t in ids]


def _expected(llm, prompt, n: int, max_tokens: int, **kw) -> list[BeamSearchSequence]:
    out = llm.beam_search([prompt], BeamSearchParams(beam_width=n, max_tokens=max_tokens, **kw))
    return out[0].sequences


def test_server_completions_beam_search_equals_llm_beam_search(base, llm) -> None:
    body = {"prompt": PROMPT, "n": 3, "use_beam_search": True, "temperature": 0,
            "max_tokens": 6, "logprobs": 1}
    resp = _ok(_post(base, "/v1/completions", body))
    want = _expected(llm, PROMPT, 3, 6)
    assert len(want) == 3
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2]
    tok = llm.get_tokenizer()
    for c, seq in zip(resp["choices"], want, strict=True):
        assert c["logprobs"]["tokens"] == _token_strs(llm, seq.output_token_ids)
        assert c["text"] == tok.decode(seq.output_token_ids)
        assert c["finish_reason"] == seq.finish_reason
    n_gen = sum(len(s.output_token_ids) for s in want)
    assert resp["usage"] == {"prompt_tokens": len(PROMPT_IDS), "completion_tokens": n_gen,
                             "total_tokens": len(PROMPT_IDS) + n_gen}
    # two prompts: choices prompt_index * n + beam rank
    two = _ok(_post(base, "/v1/completions", {**body, "prompt": [PROMPT, PROMPT]}))
    assert [c["text"] for c in two["choices"]] == [c["text"] for c in resp["choices"]] * 2


def test_server_completions_beam_search_stream_is_one_event_as_vllm(base) -> None:
    # vLLM's serving_completion streams no beam search: stream true gets the whole
    # CompletionResponse as the one SSE event, then [DONE]
    body = {"prompt": PROMPT, "n": 3, "use_beam_search": True, "temperature": 0,
            "max_tokens": 6, "logprobs": 1}
    resp = _ok(_post(base, "/v1/completions", body))
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert len(lines) == 2 and lines[1] == "data: [DONE]"
    event = json.loads(lines[0].removeprefix("data: "))
    assert event["object"] == "text_completion"
    assert event["choices"] == resp["choices"]
    assert event["usage"] == resp["usage"]


def test_server_chat_beam_search_stream_is_chunks_as_vllm(base) -> None:
    # vLLM's serving_chat sends the beam search's single final output through its chunk
    # stream: a role chunk per choice, then each beam's whole text with its finish_reason
    body = {"messages": [{"role": "user", "content": PROMPT}], "n": 3,
            "use_beam_search": True, "temperature": 0, "max_tokens": 5}
    resp = _ok(_post(base, "/v1/chat/completions", body))
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert all(ev["object"] == "chat.completion.chunk" for ev in events)
    texts = {i: "" for i in range(3)}
    finish = {}
    roles = {}
    for ev in events:
        for c in ev["choices"]:
            if "role" in c["delta"]:
                roles[c["index"]] = c["delta"]["role"]
            texts[c["index"]] += c["delta"].get("content") or ""
            if c.get("finish_reason"):
                finish[c["index"]] = c["finish_reason"]
    assert roles == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in resp["choices"]]
    assert [finish[i] for i in range(3)] == [c["finish_reason"] for c in resp["choices"]]


def test_server_chat_beam_search_equals_llm_beam_search(base, llm) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    ids = _ok(_post(base, "/tokenize", {"messages": messages}))["tokens"]
    body = {"messages": messages, "n": 3, "use_beam_search": True, "temperature": 0,
            "max_tokens": 5, "logprobs": True, "length_penalty": 0.5}
    resp = _ok(_post(base, "/v1/chat/completions", body))
    want = _expected(llm, {"prompt_token_ids": ids}, 3, 5, length_penalty=0.5)
    assert [c["index"] for c in resp["choices"]] == [0, 1, 2]
    tok = llm.get_tokenizer()
    for c, seq in zip(resp["choices"], want, strict=True):
        assert [t["token"] for t in c["logprobs"]["content"]] == _token_strs(
            llm, seq.output_token_ids)
        assert c["message"]["content"] == tok.decode(seq.output_token_ids)
    n_gen = sum(len(s.output_token_ids) for s in want)
    assert resp["usage"]["prompt_tokens"] == len(ids)
    assert resp["usage"]["completion_tokens"] == n_gen


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_beam_search_n1_is_greedy(base, path) -> None:
    if path == "/v1/completions":
        body: dict = {"prompt": PROMPT, "logprobs": 0}
    else:
        body = {"messages": [{"role": "user", "content": PROMPT}], "logprobs": True}
    body |= {"temperature": 0, "max_tokens": 8, "ignore_eos": True}
    beam = _ok(_post(base, path, {**body, "use_beam_search": True}))["choices"]
    greedy = _ok(_post(base, path, body))["choices"]
    assert len(beam) == 1
    if path == "/v1/completions":
        assert beam[0]["logprobs"]["tokens"] == greedy[0]["logprobs"]["tokens"]
        assert beam[0]["text"] == greedy[0]["text"]
    else:
        b, g = beam[0]["logprobs"]["content"], greedy[0]["logprobs"]["content"]
        assert [t["token"] for t in b] == [t["token"] for t in g]
        assert [t["logprob"] for t in b] == pytest.approx([t["logprob"] for t in g], abs=1e-4)
        assert beam[0]["message"] == greedy[0]["message"]


def _beam_body(path: str) -> dict:
    return ({"prompt": PROMPT} if path == "/v1/completions"
            else {"messages": [{"role": "user", "content": PROMPT}]})


def _beam_choices(resp: dict) -> list:
    return [(c.get("text"), c.get("message"), c["finish_reason"]) for c in resp["choices"]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("extra", [
    {"stop": ["x"]}, {"top_p": 0.5}, {"top_k": 3}, {"min_p": 0.2},
    {"presence_penalty": 1.5}, {"repetition_penalty": 1.3}, {"min_tokens": 2},
    {"logit_bias": {"104": 100}}, {"prompt_logprobs": 1},
    {"response_format": {"type": "json_object"}},
])
def test_server_beam_search_ignores_sampling_fields_as_vllm(base, path, extra) -> None:
    # vLLM's to_beam_search_params takes n, temperature, length_penalty, ignore_eos and
    # include_stop_str_in_output and refuses nothing: every other field is ignored
    body = {**_beam_body(path), "use_beam_search": True, "n": 2, "max_tokens": 4,
            "temperature": 0}
    plain = _ok(_post(base, path, body))
    resp = _ok(_post(base, path, {**body, **extra}))
    assert _beam_choices(resp) == _beam_choices(plain)
    if "prompt_logprobs" in extra:  # a beam search has none: null, as vLLM's
        assert all(c.get("prompt_logprobs") is None for c in resp["choices"])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_beam_search_temperature_defaults_to_1_as_vllm(base, path) -> None:
    # vLLM: request temperature, else the generation config's, else 1.0
    logprobs = {"logprobs": 1} if path == "/v1/completions" else {"logprobs": True}
    body = {**_beam_body(path), "use_beam_search": True, "n": 2, "max_tokens": 4, **logprobs}
    unset = _ok(_post(base, path, body))
    one = _ok(_post(base, path, {**body, "temperature": 1.0}))
    # the same tokens and texts; logprobs to float noise (the second request's prompt comes
    # from the prefix cache, a prefill of other shapes); temperature 0 would change them a lot
    _assert_same_up_to_float_noise(unset["choices"], one["choices"])


def _assert_same_up_to_float_noise(a, b, path: str = "choices") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_same_up_to_float_noise(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_up_to_float_noise(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_server_beam_search_n_past_max_logprobs_is_400(base, path) -> None:
    # 2 * n logprobs per step > --max-logprobs (20): the engine's limit, named as n
    r = _post(base, path, {**_beam_body(path), "use_beam_search": True, "max_tokens": 2,
                           "n": 11})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n"
    assert "beam" in err["message"]
