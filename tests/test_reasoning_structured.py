"""Structured outputs with a reasoning parser, as vLLM: the grammar constrains only the answer
after the reasoning (engine/structured_output.py).

- In process (LLM(..., reasoning_parser=...)) on a tiny Llama whose tokenizer has `<think>`
  and `</think>` as single tokens, with its logits scripted (a big bonus on the next token of
  a script) so the generation is known: the thinking, which no grammar would allow, comes out
  as scripted; the answer after `</think>` follows the grammar (the scripted tokens it
  refuses are masked); a prompt that already ended the reasoning (Qwen3's enable_thinking
  false) gets the grammar from the first token; without a parser, or with
  enable_in_reasoning, the grammar starts at once (the old behaviour).
- Over HTTP (`--reasoning-parser qwen3`): a logit_bias on `</think>` ends the thinking at
  the first token and the answer is the schema's JSON, as content (streamed too); with
  enable_thinking false the same request is constrained from the first token; a named
  tool_choice (the same grammar path) also waits for the reasoning.
"""

from __future__ import annotations

import json

import httpx
import pytest

from helpers.server_proc import serving
from helpers.tiny_models import TINY_VOCAB, make_tiny_llama_dir
from modelport.engine.structured_output import REASONING_TAGS, ReasoningEnd

START, END = TINY_VOCAB, TINY_VOCAB + 1  # the think tags' ids
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
OK_JSON = ('{"ok": true}', '{"ok": false}')  # xgrammar's separators without whitespace
# ids of "Hi!": bytes, one token each; no grammar here allows them at the start
HI = list(b"Hi!")
BAD = ord("x")  # what the script wants after it ends: no answer below allows it


# ---------------------------------------------------------------- the end of reasoning, by ids


def test_reasoning_ends_at_the_last_think_tag_as_vllm_decides() -> None:
    end = ReasoningEnd(START, END)
    assert end.ended([1, START, 2, END])
    assert end.ended([1, START, END, 3, 4])  # the prompt closed an empty thinking block
    assert not end.ended([1, START, 2])
    assert not end.ended([1, END, 2, START, 3])  # thinking again after an earlier block
    assert not end.ended([1, 2, 3])
    vocab = {"<think>": START, "</think>": END}
    assert set(REASONING_TAGS) == {"deepseek_r1", "qwen3", "mistral", "granite", "glm45",
                                   "deepseek_v3", "seed_oss", "hunyuan_a13b"}
    assert ReasoningEnd.from_vocab("qwen3", vocab) == end
    with pytest.raises(
        RuntimeError,
        match="^DeepSeekR1ReasoningParser reasoning parser could "
        "not locate think start/end tokens in the tokenizer!$",
    ):
        ReasoningEnd.from_vocab("deepseek_r1", {"<think>": START})


def test_engine_args_take_vllms_reasoning_settings() -> None:
    from modelport.engine.arg_utils import EngineArgs

    def resolve(**kw):
        return EngineArgs(**kw)._resolve_structured_outputs()

    assert resolve() == (None, False)
    assert resolve(reasoning_parser="qwen3") == ("qwen3", False)
    assert resolve(
        structured_outputs_config={"reasoning_parser": "deepseek_r1", "enable_in_reasoning": True}
    ) == ("deepseek_r1", True)
    with pytest.raises(ValueError, match="unknown reasoning parser 'nemotron'"):
        resolve(reasoning_parser="nemotron")
    with pytest.raises(ValueError, match="differ"):
        resolve(
            reasoning_parser="qwen3", structured_outputs_config={"reasoning_parser": "deepseek_r1"}
        )
    with pytest.raises(ValueError, match="unsupported keys whitespace_pattern"):
        resolve(structured_outputs_config={"whitespace_pattern": " "})


class RecordingMatcher:
    """A GrammarMatcher stand-in that accepts anything and records what it was fed."""

    def __init__(self) -> None:
        self.fed: list[int] = []

    def accept_token(self, token: int) -> bool:
        self.fed.append(token)
        return True

    def is_terminated(self) -> bool:
        return False


def test_the_scheduler_feeds_the_grammar_only_the_tokens_after_the_end_tag() -> None:
    """Pure Python: while reasoning, the request offers the sampler no grammar and the
    scheduler advances none; the end tag itself is not fed; the next token is."""
    from modelport.config import SchedulerConfig
    from modelport.engine.kv_cache_manager import KVCacheManager
    from modelport.engine.request import Request
    from modelport.engine.scheduler import Scheduler
    from modelport.sampling_params import SamplingParams

    kv = KVCacheManager(16, 4, True)
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64), kv)
    params = SamplingParams(max_tokens=10, temperature=0, structured_outputs={"regex": "a"})
    r = Request("r", [1, 2, 3], params, eos_token_ids=(2,))
    r.grammar, r.reasoning = RecordingMatcher(), ReasoningEnd(START, END)
    s.add_request(r)
    offered = []
    for token in (START, 11, 12, END, 13, 14):
        out = s.schedule()
        offered.append(out.scheduled[0].request.active_grammar)
        s.update(out, {"r": token})
    assert r.output_token_ids == [START, 11, 12, END, 13, 14]
    assert r.grammar.fed == [13, 14]
    assert offered == [None] * 4 + [r.grammar] * 2


# ---------------------------------------------------------------- in process, scripted


@pytest.fixture(scope="module")
def think_model(tmp_path_factory):
    """The tiny Llama with `<think>` / `</think>` added as single (non-special) tokens."""
    pytest.importorskip("xgrammar")
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    path = make_tiny_llama_dir(tmp_path_factory.mktemp("think") / "tiny", vocab_size=END + 1)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")]
    )
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [START, END]
    tok.save_pretrained(path)
    return path


def _llm(path, **kw):
    from modelport import LLM

    return LLM(str(path), max_model_len=128, kv_cache_memory=8 << 20, **kw)


def _scripted(llm, script: list[int]) -> None:
    """Each sampling step (one request at a time) favours the script's next token, then BAD
    for ever: what the sampler picks is the script unless a grammar masks it."""
    model = llm.llm_engine.core.runner.model
    compute = type(model).compute_logits
    steps = iter(script)

    def logits(hidden):
        out = compute(model, hidden)
        out[:, next(steps, BAD)] += 1000.0
        return out

    model.compute_logits = logits


def _generate(llm, script: list[int], so: dict, prompt: list[int] | None = None):
    from modelport import SamplingParams

    _scripted(llm, script)
    prompt = prompt or [*b"user\nhi\nassistant\n"]
    params = SamplingParams(temperature=0, max_tokens=40, structured_outputs=so)
    (out,) = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
    return out.outputs[0]


@pytest.fixture(scope="module")
def r1(think_model):
    return _llm(think_model, reasoning_parser="deepseek_r1")


@pytest.mark.parametrize(
    "so",
    [
        {"choice": ["yes", "no"]},
        {"json": SCHEMA, "disable_any_whitespace": True},
        {"regex": "(yes|no)"},
    ],
)
def test_the_thinking_is_free_and_the_answer_after_it_follows_the_grammar(r1, so) -> None:
    out = _generate(r1, [START, *HI, END], so)
    ids = out.token_ids
    # the thinking came out as scripted, though no grammar here allows any of it
    assert ids[:5] == [START, *HI, END], ids
    assert out.text.startswith("<think>Hi!</think>")
    answer = out.text.removeprefix("<think>Hi!</think>")
    # after </think> the script wants "x" for ever: the grammar masked it
    if "json" in so:
        assert answer in OK_JSON and json.loads(answer)["ok"] in (True, False)
    else:
        assert answer in ("yes", "no")
    assert BAD not in ids
    assert out.finish_reason == "stop"


def test_a_thinking_cut_short_is_unconstrained_to_the_end(r1) -> None:
    from modelport import SamplingParams

    out = _generate(r1, [START, *HI], {"choice": ["yes", "no"]})  # then "x" for ever
    assert out.token_ids == [START, *HI] + [BAD] * (40 - 4)
    assert out.finish_reason == "length"
    # as an unconstrained request is, whatever the parser (it only starts grammars)
    _scripted(r1, [START, *HI, END, *b"ok"])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    (plain,) = r1.generate({"prompt_token_ids": [*b"user\nhi\n"]}, params, use_tqdm=False)
    assert plain.outputs[0].token_ids == [START, *HI, END, *b"ok", BAD]


def test_a_prompt_that_ended_the_reasoning_gets_the_grammar_from_the_first_token(r1) -> None:
    """Qwen3's template with enable_thinking false closes an empty thinking block in the
    prompt; a prompt that opens one leaves the thinking free (the opening tag is not
    generated then)."""
    head = [*b"user\nhi\nassistant\n"]
    closed = [*head, START, *b"\n\n", END, *b"\n\n"]
    out = _generate(r1, [START, *HI, END], {"choice": ["yes", "no"]}, prompt=closed)
    assert out.text in ("yes", "no")  # the scripted <think> was masked at once
    opened = [*head, START, *b"\n"]
    out = _generate(r1, [*HI, END], {"choice": ["yes", "no"]}, prompt=opened)
    assert out.text in ("Hi!</think>yes", "Hi!</think>no")


def test_without_a_parser_or_with_enable_in_reasoning_the_grammar_starts_at_once(
    r1, think_model
) -> None:
    so = {"choice": ["yes", "no"]}
    assert _generate(r1, [START, *HI, END], so).text.startswith("<think>Hi!</think>")
    for kw in (
        {},
        {"reasoning_parser": "qwen3", "structured_outputs_config": {"enable_in_reasoning": True}},
    ):
        llm = _llm(think_model, **kw)
        out = _generate(llm, [START, *HI, END], so)
        assert out.text in ("yes", "no"), kw
        del llm


def test_a_tokenizer_without_think_tags_fails_the_engine_at_start(tmp_path) -> None:
    path = make_tiny_llama_dir(tmp_path / "tiny")  # byte level: "<think>" is 7 tokens
    with pytest.raises(
        RuntimeError,
        match="Qwen3ReasoningParser reasoning parser could not locate think start/end tokens",
    ):
        _llm(path, reasoning_parser="qwen3")


# ---------------------------------------------------------------- over HTTP

THINK_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
ASK = [{"role": "user", "content": "Is it ok?"}]
END_FIRST = {"logit_bias": {str(END): 100}}  # the first token ends the thinking
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


@pytest.fixture(scope="module")
def qwen3(think_model, tmp_path_factory):
    (think_model / "chat_template.jinja").write_text(THINK_TEMPLATE)
    log = tmp_path_factory.mktemp("qwen3so") / "server.log"
    argv = [
        "-m",
        "modelport.entrypoints.cli",
        "serve",
        "--model",
        str(think_model),
        "--max-model-len",
        "256",
        "--kv-cache-memory",
        "8MiB",
        "--reasoning-parser",
        "qwen3",
    ]
    with serving(argv, log) as url:
        yield url


def _chat(base: str, body: dict) -> dict:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        timeout=120,
        json={"messages": ASK, "max_tokens": 40, "temperature": 0, **body},
    )
    assert r.status_code == 200, r.text
    return r.json()


def _streamed(base: str, body: dict) -> tuple[str | None, str]:
    reasoning, content = None, ""
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        timeout=120,
        json={"messages": ASK, "max_tokens": 40, "temperature": 0, **body, "stream": True},
    ) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:])["choices"]:
                if "reasoning" in ch["delta"]:
                    reasoning = (reasoning or "") + ch["delta"]["reasoning"]
                content += ch["delta"].get("content") or ""
    return reasoning, content


JSON_SO = {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}}


def test_http_the_grammar_waits_for_the_thinking_unless_it_is_off(qwen3) -> None:
    body = {**JSON_SO, **END_FIRST, "logprobs": True}
    choice = _chat(qwen3, body)["choices"][0]
    msg = choice["message"]
    # </think> came first (no JSON grammar allows it), then the schema's JSON
    assert choice["logprobs"]["content"][0]["token"] == "</think>"
    assert msg["reasoning"] == "" and msg["content"] in OK_JSON
    assert _streamed(qwen3, body) == (None, msg["content"])  # no empty reasoning deltas
    # enable_thinking false: the prompt ended the thinking, the grammar applies at once
    body = {**body, **NO_THINKING}
    choice = _chat(qwen3, body)["choices"][0]
    assert choice["logprobs"]["content"][0]["token"] == "{"  # the bias lost to the grammar
    assert (choice["message"]["reasoning"], choice["message"]["content"][:7]) == (None, '{"ok": ')
    assert choice["message"]["content"] in OK_JSON
    assert _streamed(qwen3, body) == (None, choice["message"]["content"])


def test_http_a_named_tool_choice_also_waits_for_the_thinking(qwen3) -> None:
    tool = {"type": "function", "function": {"name": "answer", "parameters": SCHEMA}}
    # the call's grammar allows any whitespace: the random model is kept from looping on it
    no_ws = {str(b): -100 for b in b" \t\r\n"}
    body = {
        "logit_bias": {**END_FIRST["logit_bias"], **no_ws},
        "tools": [tool],
        "max_tokens": 60,
        "logprobs": True,
        "tool_choice": {"type": "function", "function": {"name": "answer"}},
    }
    choice = _chat(qwen3, body)["choices"][0]
    assert choice["logprobs"]["content"][0]["token"] == "</think>"
    msg = choice["message"]
    assert msg["reasoning"] == ""
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "answer"
    assert json.loads(call["function"]["arguments"])["ok"] in (True, False)
    off = _chat(qwen3, {**body, **NO_THINKING})["choices"][0]["message"]
    assert off["reasoning"] is None and off["tool_calls"][0]["function"]["name"] == "answer"
